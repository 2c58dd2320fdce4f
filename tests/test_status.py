"""
Silence and quality flags: StatusWatch on a task.Clock against a real
PostgreSQL (the timer is driven by the clock; the queries are real).
"""

from __future__ import annotations

import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from gateway.config import duration
from gateway.storage.pool import PgPool
from gateway.ingest.quality import QualityRules
from gateway.ops.status import StatusPolicy, StatusWatch
from gateway.ingest.vendor import device_type_from_table
from tests.test_operations import until
from tests.test_store import add_pg_device

TRACKER = device_type_from_table(
    "tracker", {"timestamp": "t", "expected_interval": "5m", "metrics": [{"path": "v"}]}, duration
)


async def watching(db_dsn, policy):
    pool = PgPool(reactor, 1)
    await pool.start(db_dsn)
    clock = Clock()
    clock.advance(time.time())
    watch = StatusWatch(lambda sql, params: pool.run(lambda c: c.runQuery(sql, params)), policy, clock, 30)
    return pool, clock, watch


async def tick(clock, watch, seconds):
    """Advance the injected clock; wait (on the real reactor) for the check the timer started."""
    clock.advance(seconds)
    await until(lambda: watch.checked_at == clock.seconds())


@pytest_twisted.ensureDeferred
async def test_silent_after_the_expected_interval_and_heard_again(db_dsn, sql):
    policy = StatusPolicy(QualityRules(), {"tracker": TRACKER})
    pool, clock, watch = await watching(db_dsn, policy)
    events = []
    observer = lambda e: events.append(e) if e.get("device") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        for name in ("own", "typed", "untyped"):
            add_pg_device(sql, name)
        sql("UPDATE devices SET expected_interval = 60 WHERE name = 'own'")
        sql("UPDATE devices SET device_type = 'tracker' WHERE name = 'typed'")
        sql("UPDATE devices SET last_seen = to_timestamp(%s)", (clock.seconds(),))
        watch.startService()
        await until(lambda: watch.checked_at == clock.seconds())
        assert watch.silent == {}
        await tick(clock, watch, 90)  # three timer periods: 'own' (60 s) is silent, 'typed' (5 m) not yet
        assert set(watch.silent) == {"own"}
        await tick(clock, watch, 240)
        assert set(watch.silent) == {"own", "typed"}  # 'untyped' has no expected interval: never silent
        assert watch.silent["typed"]["silent_for"] == 330
        sql("UPDATE devices SET last_seen = to_timestamp(%s) WHERE name = 'own'", (clock.seconds(),))
        await tick(clock, watch, 30)
        assert set(watch.silent) == {"typed"}
        said = [
            (e["device"], e["log_level"]) for e in events if "silent" in e["log_format"] or "heard" in e["log_format"]
        ]
        assert said == [("own", LogLevel.warn), ("typed", LogLevel.warn), ("own", LogLevel.info)]
    finally:
        globalLogPublisher.removeObserver(observer)
        watch.stopService()
        await pool.close()


@pytest_twisted.ensureDeferred
async def test_flag_set_over_the_threshold_and_cleared_once_the_window_passes(db_dsn, sql):
    policy = StatusPolicy(QualityRules(flag_failures=3, flag_window=600), {})
    pool, clock, watch = await watching(db_dsn, policy)
    try:
        add_pg_device(sql, "noisy")
        add_pg_device(sql, "fine")
        for i in range(2):
            sql(
                "INSERT INTO quarantine (device_id, metric, ts, value, rule, source) "
                "SELECT id, 'oil_temp', to_timestamp(%s), 999, 'oil_temp.max', 'https' "
                "FROM devices WHERE name = 'noisy'",
                (i,),
            )
        sql("INSERT INTO rejected_input (source, device, reason, raw) VALUES ('https', 'noisy', 'x', '')")
        sql("INSERT INTO rejected_input (source, device, reason, raw) VALUES ('https', 'fine', 'x', '')")
        watch.startService()
        await until(lambda: watch.checked_at == clock.seconds())
        assert set(watch.flagged) == {"noisy"}
        assert watch.flagged["noisy"]["quality"]["failures"] == 3
        await tick(clock, watch, 630)  # the failures are now older than the window
        assert watch.flagged == {}
    finally:
        watch.stopService()
        await pool.close()
