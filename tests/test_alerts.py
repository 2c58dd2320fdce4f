"""
Edge alerts: the [[alert]] tables, evaluation with hysteresis and rate of
change, and end to end through HTTPS ingest, the database, GET /v1/alerts
and a webhook that fails before it takes the notices.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted

from gateway.outbound.alerts import AlertError, AlertRule, rules_from_tables
from gateway.config import ConfigError, build_config, duration
from tests.test_api import ctl, close_gateway, open_gateway, reading
from tests.test_operations import until
from tests.test_store import add_pg_device
from tests.test_upload_pg import ca, receiver  # noqa: F401 - fixtures

NOW_MS = int(time.time() * 1000)

RULES = [
    {"name": "oil-hot", "metric": "oil_temp", "above": 120, "clear": 110, "devices": "truck-*"},
    {"name": "oil-climbing", "metric": "oil_temp", "rise": 15, "window": "5m", "clear": 5},
]


def test_threshold_with_hysteresis_and_rate_rules():
    hot, climbing = rules_from_tables(RULES, duration)
    assert hot == AlertRule("oil-hot", "oil_temp", "truck-*", above=120, clear=110)
    assert hot.fires(121) and not hot.fires(120)
    assert not hot.clears(115) and hot.clears(110)
    assert climbing.window == 300 and climbing.fires(16) and climbing.clears(5) and not climbing.clears(6)
    low = rules_from_tables([{"name": "low", "metric": "p", "below": 1.5}], duration)[0]
    assert low.fires(1.4) and low.clears(1.5) and not low.clears(1.49)
    assert hot.applies("truck-7", "oil_temp") and not hot.applies("loader-1", "oil_temp")


@pytest.mark.parametrize(
    "table, message",
    [
        ({"name": "a", "metric": "m"}, "give exactly one of above, below, rise or fall"),
        ({"name": "a", "metric": "m", "above": 1, "below": 0}, "give exactly one"),
        ({"name": "a", "metric": "m", "rise": 5}, r"a.window: needed by rise"),
        ({"name": "a", "metric": "m", "above": 100, "clear": 110}, "a.clear: 110 must not be above above"),
        ({"name": "a", "metric": "m", "above": "hot"}, r"a.above: 'hot' is not a number"),
        ({"name": "a b", "metric": "m", "above": 1}, r"#1.name: must be"),
        ({"name": "a", "metric": "m", "above": 1, "colour": 1}, "unknown key 'colour'"),
    ],
)
def test_alert_table_errors_name_the_rule_and_key(table, message):
    with pytest.raises(AlertError, match=message):
        rules_from_tables([table], duration)


def test_a_bad_alert_table_stops_the_start_with_one_line():
    with pytest.raises(ConfigError, match=r"^\[\[alert\]\] a: give exactly one of above, below, rise or fall$"):
        build_config({}, {"alert": [{"name": "a", "metric": "m"}]})


@pytest_twisted.ensureDeferred
async def test_alerts_fire_clear_are_listed_and_reach_a_failing_webhook(tmp_path, db_dsn, sql, receiver):  # noqa: F811
    receiver.script.extend([("status", 503), "drop"])  # two failures before the webhook takes anything
    service, gw = await open_gateway(
        tmp_path,
        db_dsn,
        {"alert": RULES},
        alert_webhook=receiver.url,
        upload_ca=str(tmp_path / "upload-ca.pem"),
        upload_backoff=0.05,
    )
    try:
        token = (await ctl(db_dsn, "token", "add", "dash", "--role", "reader")).strip()
        truck, loader = add_pg_device(sql, "truck-1"), add_pg_device(sql, "loader-1")
        t = NOW_MS - 60_000

        async def send(device, *values):
            nonlocal t
            for v in values:
                t += 1000
                assert (await gw.post(device, [reading("oil_temp", t, v)]))[0] == 200
            await service.alerts.settled()

        await send(truck, 100, 125)  # +25 within 5 m: both rules fire
        await send(loader, 130)  # not a truck-*: no oil-hot; its first reading: no rise
        code, body = await gw.get("/v1/alerts?state=open", token)
        assert sorted((a["rule"], a["device"]) for a in body["alerts"]) == [
            ("oil-climbing", "truck-1"),
            ("oil-hot", "truck-1"),
        ]
        hot = next(a for a in body["alerts"] if a["rule"] == "oil-hot")
        assert hot["message"] == "oil_temp 125 is above 120" and hot["fired_reading"]["value"] == 125

        await send(truck, 118)  # under 120, above the 110 that clears it: still open
        assert ("oil-hot", 1) in service.alerts.open
        # A late, older reading below the clearing level changes nothing.
        assert (await gw.post(truck, [reading("oil_temp", NOW_MS - 3_600_000, 50)]))[0] == 200
        await service.alerts.settled()
        assert ("oil-hot", 1) in service.alerts.open
        await send(truck, 109)  # clears oil-hot; the rise from 100 to 109 within 5 m is 9, above 5: climbing stays
        code, body = await gw.get("/v1/alerts?state=cleared", token)
        assert [(a["rule"], a["cleared_reading"]["value"]) for a in body["alerts"]] == [("oil-hot", 109)]
        assert sql("SELECT count(*) FROM alerts WHERE cleared_at IS NULL")[0][0] == 1

        # The webhook: refused twice, then every notice once, an alert's fired before its cleared.
        await until(lambda: len(receiver.accepted) == 3, seconds=15)
        events = [(r.lines[0]["rule"], r.lines[0]["event"]) for r in receiver.accepted]
        assert sorted(events) == [("oil-climbing", "fired"), ("oil-hot", "cleared"), ("oil-hot", "fired")]
        assert events.index(("oil-hot", "fired")) < events.index(("oil-hot", "cleared"))  # in order per alert
        assert len({r.key for r in receiver.accepted}) == 3
        assert all(r.lines[0]["key"] == r.key for r in receiver.accepted)
        assert service.notifier.failures == 2
        await until(lambda: sql("SELECT count(*) FROM alert_notices WHERE sent_at IS NULL")[0][0] == 0)
    finally:
        await close_gateway(service, gw)


@pytest_twisted.ensureDeferred
async def test_open_alerts_survive_a_restart_and_clear_after_it(tmp_path, db_dsn, sql):
    rules = {"alert": RULES[:1]}
    service, gw = await open_gateway(tmp_path, db_dsn, rules)
    truck = add_pg_device(sql, "truck-1")
    try:
        await gw.post(truck, [reading("oil_temp", NOW_MS - 2000, 130)])
        await service.alerts.settled()
    finally:
        await close_gateway(service, gw)
    service, gw = await open_gateway(tmp_path, db_dsn, rules)
    try:
        assert [(a["rule"], a["device"]) for a in service.console.namespace()["alerts"]()] == [("oil-hot", "truck-1")]
        await gw.post(truck, [reading("oil_temp", NOW_MS - 1000, 100)])
        await service.alerts.settled()
        assert sql("SELECT cleared_value FROM alerts") == [(100.0,)]
        assert sql("SELECT count(*) FROM alert_notices")[0][0] == 0  # no webhook: no notices kept
    finally:
        await close_gateway(service, gw)


class _RecordingPool:
    """Takes the engine's statements without a database: this test is about evaluation, not storage."""

    def __init__(self):
        self.statements = []

    def run(self, work):
        from twisted.internet.defer import succeed

        class Conn:
            def runQuery(_, sql, params=None):
                self.statements.append((sql, params))
                return succeed([(1,)])

        return work(Conn())


def test_rate_rule_memory_is_bounded_however_fast_a_device_sends():
    from twisted.internet.task import Clock

    from gateway.outbound.alerts import AlertEngine, CLEAR, FIRE, WINDOW_STEPS
    from gateway.readings import Device, Reading

    pool = _RecordingPool()
    engine = AlertEngine(rules_from_tables(RULES[1:], duration), pool, Clock())
    device = Device(1, "truck-1")
    # 100 readings a second for 10 minutes, rising 1 per minute: never 15 within 5 minutes.
    for i in range(0, 60_000, 100):
        engine.observe(device, [Reading("oil_temp", (i + j) * 10_000, (i + j) / 6000) for j in range(100)])
    state = engine._states[("oil-climbing", 1)]
    assert len(state.points) <= WINDOW_STEPS + 2
    assert pool.statements == []
    engine.observe(device, [Reading("oil_temp", 600_000_000, 30.0)])  # +20 within the window: fires
    engine.observe(device, [Reading("oil_temp", 600_010_000, 9.0)])  # rise now under 5: clears
    assert [sql for sql, _ in pool.statements] == [FIRE, CLEAR]


def test_a_command_rule_watches_command_names_and_devices():
    [rule] = rules_from_tables([{"name": "lost", "command": "reboot*", "devices": "truck-*"}], duration)
    assert rule.watches("truck-1", "reboot-now") and not rule.watches("pump-1", "reboot")
    assert not rule.watches("truck-1", "sample") and not rule.applies("truck-1", "command:reboot*")
    for table, words in [
        ({"name": "x", "command": "reboot", "above": 3}, "x.above: a command rule takes only command and devices"),
        ({"name": "x", "command": ""}, "x.command: '' is not a command name"),
    ]:
        with pytest.raises(AlertError, match=words):
            rules_from_tables([table], duration)
