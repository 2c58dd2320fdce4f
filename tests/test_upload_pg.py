"""
The uploader against a real PostgreSQL and a real HTTPS receiver (with its
own CA) that fails, delays, refuses and drops connections on a script.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from collections import Counter, defaultdict

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from gateway.storage.pool import PgPool
from gateway.outbound.sinks import Rule, Sink
from twisted.internet.threads import deferToThread

from gateway.outbound.retention import Retention
from gateway.outbound.ledger import START, Batch, Ledger, Wait, owner_lock_held
from gateway.outbound.sender import HTTPSender
from gateway.outbound.uploader import OwnerLock, Uploader
from tests.certs import TestCA
from tests.receiver import Receiver, listen
from tests.gatewayproc import gatewayctl
from tests.test_store import add_pg_device


async def until(condition, timeout: float = 30.0, step: float = 0.02, what: str = "condition"):
    waited = 0.0
    while not condition():
        if waited > timeout:
            pytest.fail(f"{what} not reached in {timeout:g}s")
        await deferLater(reactor, step, lambda: None)
        waited += step


def add_readings(sql, device: str, count: int, start: int = 0, metric: str = "oil_temp", value=None) -> None:
    """``count`` readings of one device, one second apart, in one transaction."""
    sql(
        "INSERT INTO readings (device_id, metric_id, ts, value) "
        "SELECT d.id, metric_id_of(%s), timestamptz '2026-01-01' + make_interval(secs => i), coalesce(%s, i) "
        "FROM devices d, generate_series(%s, %s) i WHERE d.name = %s",
        (metric, value, start, start + count - 1, device),
    )


def key_of(line) -> tuple:
    return (line["device"], line["metric"], line["ts"])


@pytest.fixture
def ca(tmp_path):
    ca = TestCA()
    ca.write(tmp_path / "upload-ca.pem")
    return ca


@pytest.fixture
def receiver(ca):
    receiver = Receiver(reactor)
    port = listen(reactor, receiver, ca)
    receiver.url = f"https://localhost:{port.getHost().port}/ingest"
    yield receiver
    port.stopListening()


def fast_sink(receiver, tmp_path, **changes) -> Sink:
    values = dict(
        name="cloud",
        url=receiver.url,
        ca=tmp_path / "upload-ca.pem",
        batch=100,
        flush=0.05,
        backoff=0.02,
        backoff_cap=0.2,
        timeout=5.0,
    )
    values.update(changes)
    return Sink(**values)


async def running_uploader(db_dsn, *sinks, owner="gw-a") -> Uploader:
    uploader = Uploader(reactor, sinks, owner, deferToThread)
    await uploader.connect(db_dsn)
    uploader.startService()
    return uploader


@pytest_twisted.ensureDeferred
async def test_every_reading_arrives_in_order_through_failures(db_dsn, sql, receiver, tmp_path):
    for name in ("truck-1", "truck-2", "truck-3"):
        add_pg_device(sql, name)
    receiver.script.extend(
        [("status", 500), "drop", ("status", 429, 1), ("delay", 0.3), ("status", 503), "ok", "drop", ("status", 502)]
    )
    uploader = await running_uploader(db_dsn, fast_sink(receiver, tmp_path))
    try:
        for chunk in range(10):  # readings keep arriving while batches fail
            for name in ("truck-1", "truck-2", "truck-3"):
                add_readings(sql, name, 70, start=chunk * 70)
            await deferLater(reactor, 0.05, lambda: None)
        await until(lambda: len({key_of(r) for r in receiver.readings}) == 2100, what="all 2100 readings")
        # The last batch's row goes once its 2xx is recorded, a moment after the receiver has it.
        await until(lambda: sql("SELECT count(*) FROM upload_batches") == [(0,)], what="every batch settled")
    finally:
        await uploader.stopService()
    stored = {
        (d, "oil_temp", ts)
        for d, ts in sql(
            "SELECT d.name, to_char(r.ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') "
            "FROM readings r JOIN devices d ON d.id = r.device_id"
        )
    }
    assert {key_of(r) for r in receiver.readings} == stored
    # each device's readings arrive in the order they were stored
    seen = defaultdict(list)
    for line in receiver.readings:
        seen[line["device"]].append(line["ts"])
    for device, stamps in seen.items():
        assert stamps == sorted(stamps), device
        assert len(stamps) == 700
    # every failed attempt was retried with the same key; batches hold disjoint readings
    assert len(receiver.attempts) == len(receiver.accepted) + 6
    assert len({b.key for b in receiver.accepted}) == len(receiver.accepted)
    assert all(len(b.lines) <= 100 for b in receiver.accepted)
    retried = {key for key, n in Counter(receiver.attempts).items() if n > 1}
    assert retried and retried <= {b.key for b in receiver.accepted}
    assert sql("SELECT count(*) FROM upload_batches") == [(0,)]
    sent, readings_sent, failures = sql("SELECT batches_sent, readings_sent, failures FROM upload_sinks")[0]
    assert (sent, readings_sent, failures) == (len(receiver.accepted), 2100, 6)
    first = receiver.accepted[0]
    assert first.headers["user-agent"].startswith("txgateway/")
    assert set(first.lines[0]) == {"device", "metric", "ts", "value", "received_at"}


@pytest_twisted.ensureDeferred
async def test_batches_are_sent_without_a_log_line_per_connection(db_dsn, sql, receiver, tmp_path):
    """One structured line per event: no "Starting factory" / "Stopping factory" pair per batch."""
    from tests.conftest import log_lines

    add_pg_device(sql, "truck-1")
    with log_lines() as lines:
        uploader = await running_uploader(db_dsn, fast_sink(receiver, tmp_path, batch=10))
        try:
            add_readings(sql, "truck-1", 50)
            await until(lambda: len(receiver.accepted) == 5, what="five batches")
        finally:
            await uploader.stopService()
    noise = [line for line in lines if "factory" in line.lower()]
    assert noise == []


@pytest_twisted.ensureDeferred
async def test_a_refused_batch_is_parked_and_retry_dead_sends_it_again(db_dsn, sql, receiver, tmp_path, capsys):
    add_pg_device(sql, "truck-1")
    add_readings(sql, "truck-1", 250)
    receiver.script.extend(["ok", ("status", 400)])
    uploader = await running_uploader(db_dsn, fast_sink(receiver, tmp_path))
    try:
        await until(lambda: len(receiver.accepted) == 2, what="two batches accepted")
        # The second accepted batch's row goes a moment after its 2xx arrives.
        await until(
            lambda: sql("SELECT count(*) FROM upload_batches WHERE state <> 'parked'") == [(0,)],
            what="the accepted batches settled",
        )
        parked = sql("SELECT key::text, status, response, readings, state FROM upload_batches")
        assert len(parked) == 1
        key, status, response, readings, state = parked[0]
        assert (status, readings, state) == (400, 100, "parked")
        assert json.loads(response) == {"error": "scripted 400"}
        assert receiver.attempts[1] == key and key not in {b.key for b in receiver.accepted}
        assert "HTTP 400" in sql("SELECT last_error FROM upload_sinks")[0][0]
        assert uploader.loops["cloud"].counters.parked == 1
        await uploader.look()  # what /healthz shows, as the monitor reads it every few seconds
        health = uploader.sink_status()["cloud"]
        assert health["parked_batches"] == 1  # the batches after it went: last_error says the sink works now

        from gateway.cli.main import main

        assert main(["upload", "retry-dead", "cloud", "--db", db_dsn]) == 0
        await until(lambda: len(receiver.accepted) == 3, what="the parked batch sent again")
        await until(lambda: sql("SELECT count(*) FROM upload_batches") == [(0,)], what="its row gone after the 2xx")
        await uploader.look()
        health = uploader.sink_status()["cloud"]
        assert (health["parked_batches"], health["last_error"], health["lag_seconds"]) == (0, None, 0.0)
        assert health["checked_seconds_ago"] is not None

        capsys.readouterr()
        assert main(["upload", "status", "--db", db_dsn]) == 0
        text = capsys.readouterr().out
        assert re.search(r"time \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z\n", text), text
        assert re.search(r"last sent     \d{4}-\d\d-\d\dT[\d:.]+Z\n", text), text
        assert "+00" not in text
        assert main(["upload", "status", "--json", "--db", db_dsn]) == 0
        [doc] = json.loads(capsys.readouterr().out)
        assert doc["cursor_time"].endswith("Z") and doc["last_sent_at"].endswith("Z") and doc["lag_seconds"] == 0.0
    finally:
        await uploader.stopService()
    assert receiver.accepted[-1].key == key
    assert len({key_of(r) for r in receiver.readings}) == 250
    assert sql("SELECT count(*) FROM upload_batches") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_a_reading_whose_transaction_commits_late_is_not_skipped(db_dsn, sql, receiver, tmp_path, monkeypatch):
    add_pg_device(sql, "truck-1")
    late = psycopg2.connect(db_dsn)
    with late.cursor() as cur:  # takes the lower transaction number, commits last
        cur.execute(
            "INSERT INTO readings (device_id, metric_id, ts, value) "
            "SELECT id, metric_id_of('late'), '2026-01-01', 1 FROM devices WHERE name = 'truck-1' RETURNING tx"
        )
        late_tx = cur.fetchone()[0]
    add_readings(sql, "truck-1", 10)
    assert min(row[0] for row in sql("SELECT tx FROM readings WHERE metric_id = metric_id_of('oil_temp')")) > late_tx
    from gateway.outbound.ledger import Ledger, Wait

    cuts: list = []
    cut = Ledger.cut

    def counted(self, sink, force=False):
        return cut(self, sink, force).addCallback(lambda result: cuts.append(result) or result)

    monkeypatch.setattr(Ledger, "cut", counted)
    uploader = await running_uploader(db_dsn, fast_sink(receiver, tmp_path, batch=5))
    try:
        # The uploader looks three times (each after its flush interval) while the early transaction is open ...
        await until(lambda: len(cuts) >= 3, what="three looks for a batch")
        # ... and each time finds nothing final: what was stored after that transaction began waits for it.
        assert all(isinstance(c, Wait) for c in cuts), cuts
        assert receiver.readings == []
        late.commit()
        await until(lambda: len(receiver.readings) == 11, what="all 11 readings")
    finally:
        late.close()
        await uploader.stopService()
    assert receiver.readings[0]["metric"] == "late"


@pytest_twisted.ensureDeferred
async def test_two_gateways_send_disjoint_batches_that_cover_everything(db_dsn, sql, receiver, tmp_path):
    for name in ("truck-1", "truck-2"):
        add_pg_device(sql, name)
    sink = fast_sink(receiver, tmp_path, batch=50)
    a = await running_uploader(db_dsn, sink, owner="gw-a")
    b = await running_uploader(db_dsn, sink, owner="gw-b")
    try:
        for chunk in range(20):
            add_readings(sql, "truck-1", 40, start=chunk * 40)
            add_readings(sql, "truck-2", 40, start=chunk * 40)
            await deferLater(reactor, 0.02, lambda: None)
        await until(lambda: len(receiver.readings) >= 1600, what="1600 readings")
        await deferLater(reactor, 0.3, lambda: None)
    finally:
        await a.stopService()
        await b.stopService()
    keys = [key_of(r) for r in receiver.readings]
    assert len(keys) == len(set(keys)) == 1600
    assert len(receiver.attempts) == len(set(receiver.attempts))
    sent = {loop.counters.batches_sent for loop in (a.loops["cloud"], b.loops["cloud"])}
    assert 0 not in sent, "both gateways took part"


async def thirty_readings(db_dsn, sql, receiver, tmp_path) -> tuple[Sink, PgPool]:
    """30 readings of truck-1, a sink taking 20 a batch, and a connection for ledgers."""
    add_pg_device(sql, "truck-1")
    add_readings(sql, "truck-1", 30)
    pool = PgPool(reactor, 1)
    await pool.start(db_dsn)
    return fast_sink(receiver, tmp_path, batch=20), pool


@pytest_twisted.ensureDeferred
async def test_a_batch_waits_for_its_own_readings_age_not_for_that_of_what_was_sent_before(
    db_dsn, sql, receiver, tmp_path
):
    sink, pool = await thirty_readings(db_dsn, sql, receiver, tmp_path)
    sink = dataclasses.replace(sink, batch=30, flush=60.0)
    try:
        ledger = Ledger(pool, "gw-a", deferToThread)
        await ledger.register([sink])
        sql("UPDATE readings_arrivals SET received_at = now() - interval '1 hour'")
        sent = await ledger.cut(sink)  # all 30, which arrived an hour ago
        assert isinstance(sent, Batch) and sent.readings == 30
        add_readings(sql, "truck-1", 3, start=100)  # new: a batch of 3 waits out the flush interval
        wait = await ledger.cut(sink)
        assert isinstance(wait, Wait) and 59 < wait.seconds <= 60
        sql("UPDATE readings_arrivals SET received_at = now() - interval '61 seconds' WHERE readings = 3")
        late = await ledger.cut(sink)
        assert isinstance(late, Batch) and late.readings == 3 and late.after == sent.last
    finally:
        await pool.close()


@pytest_twisted.ensureDeferred
async def test_an_unfinished_batch_is_resent_whole_with_its_key(db_dsn, sql, receiver, tmp_path):
    sink, pool = await thirty_readings(db_dsn, sql, receiver, tmp_path)
    alive = OwnerLock(reactor, "gw-a")  # gw-a's owner lock stays held: it is stuck, not gone
    await alive.pool.start(db_dsn)
    try:
        assert await alive.hold()
        a, b = Ledger(pool, "gw-a", deferToThread), Ledger(pool, "gw-b", deferToThread)
        await a.register([sink])
        cut = await a.cut(sink)
        assert isinstance(cut, Batch) and cut.readings == 20
        [cut] = await a.fill(sink, cut)
        # gw-a stops here, after cutting (and perhaps sending). gw-b waits for the lease...
        assert await b.claim(sink) is None
        # ...while gw-a, restarted, takes it back at once (unless it still holds it): same key, same bytes
        assert await a.claim(sink, holding=[cut.id]) is None
        [again] = await a.fill(sink, await a.claim(sink))
        assert (again.key, again.body, again.readings) == (cut.key, cut.body, 20)
        sql("UPDATE upload_batches SET lease_until = now() - interval '1 second'")
        [taken] = await b.fill(sink, await b.claim(sink))
        assert (taken.key, taken.body) == (cut.key, cut.body)
        rest = await b.cut(sink, force=True)
        assert isinstance(rest, Batch) and rest.readings == 10 and rest.key != cut.key
        assert isinstance(await b.cut(sink, force=True), Wait)
    finally:
        await pool.close()
        await alive.pool.close()
    lines = gzip.decompress(cut.body).decode().splitlines()
    assert [json.loads(line)["value"] for line in lines] == list(range(20))


@pytest_twisted.ensureDeferred
async def test_a_batch_whose_gateway_is_gone_is_claimed_at_once(db_dsn, sql, receiver, tmp_path):
    sink, pool = await thirty_readings(db_dsn, sql, receiver, tmp_path)
    locks = {owner: OwnerLock(reactor, owner) for owner in ("gw-a", "gw-b")}
    twin = OwnerLock(reactor, "gw-a")  # a second process with gw-a's DATA_DIR/gateway-id
    for lock in (*locks.values(), twin):
        await lock.pool.start(db_dsn)
    try:
        assert await locks["gw-a"].hold() and await locks["gw-b"].hold()
        assert await locks["gw-a"].hold()  # again: still held, by the same session
        assert not await twin.hold()
        a, b = Ledger(pool, "gw-a", deferToThread), Ledger(pool, "gw-b", deferToThread)
        await a.register([sink])
        [cut] = await a.fill(sink, await a.cut(sink))
        assert await b.claim(sink) is None  # gw-a is alive and its lease runs
        await locks["gw-a"].pool.close()  # gw-a is gone: its session, and so its lock, ends with its backend
        held = "SELECT " + owner_lock_held("'gw-a'")
        await until(lambda: sql(held) == [(False,)], timeout=60, what="gw-a's session ended")
        assert sql("SELECT lease_until > now() + interval '30 seconds' FROM upload_batches") == [(True,)]
        [taken] = await b.fill(sink, await b.claim(sink))
        assert (taken.key, taken.body, taken.readings) == (cut.key, cut.body, 20)
        # Now gw-b's, and gw-b is alive: a gateway with gw-a's id, started again, waits for the lease too.
        assert await twin.hold()
        assert await a.claim(sink) is None
    finally:
        await pool.close()
        for lock in (*locks.values(), twin):
            await lock.pool.close()


@pytest_twisted.ensureDeferred
async def test_batches_respect_the_compressed_size_limit(db_dsn, sql, receiver, tmp_path):
    add_pg_device(sql, "truck-1")
    sql(
        "INSERT INTO readings (device_id, metric_id, ts, value) SELECT d.id, metric_id_of('m' || i), now(), random() "
        "FROM devices d, generate_series(1, 3000) i"
    )
    uploader = await running_uploader(db_dsn, fast_sink(receiver, tmp_path, batch=3000, batch_bytes=16384))
    try:
        await until(lambda: len(receiver.readings) == 3000, what="3000 readings")
    finally:
        await uploader.stopService()
    sizes = [len(b.body) for b in receiver.accepted]
    assert len(sizes) >= 3 and max(sizes) <= 16384
    assert sorted(sizes)[-2] > 16384 / 2, "batches are cut near the limit, not far below it"


@pytest_twisted.ensureDeferred
async def test_certificate_and_host_name_are_verified(db_dsn, sql, receiver, tmp_path, ca):
    add_pg_device(sql, "truck-1")
    add_readings(sql, "truck-1", 5)
    other = TestCA("someone else")
    other.write(tmp_path / "other-ca.pem")
    wrong_name = Receiver(reactor)
    port = listen(reactor, wrong_name, ca, names=("other.example",))
    untrusted = fast_sink(receiver, tmp_path, name="untrusted", ca=tmp_path / "other-ca.pem")
    misnamed = fast_sink(receiver, tmp_path, name="misnamed", url=f"https://127.0.0.1:{port.getHost().port}/x")
    uploader = await running_uploader(db_dsn, untrusted, misnamed)
    try:
        await until(lambda: all(loop.counters.failures >= 2 for loop in uploader.loops.values()), what="failures")
    finally:
        await uploader.stopService()
        await port.stopListening()
    assert receiver.accepted == [] and wrong_name.accepted == []
    assert "not trusted" in uploader.loops["untrusted"].counters.last_error
    assert "does not name the host" in uploader.loops["misnamed"].counters.last_error
    errors = dict(sql("SELECT name, last_error FROM upload_sinks"))
    assert "not trusted" in errors["untrusted"]


@pytest_twisted.ensureDeferred
async def test_edge_reduction_sends_deadband_and_aggregates(db_dsn, sql, receiver, tmp_path):
    add_pg_device(sql, "truck-1")
    values = [20.0, 20.1, 20.2, 21.0, 21.05, 25.0]
    for i, v in enumerate(values):
        add_readings(sql, "truck-1", 1, start=i, metric="oil_temp", value=v)
    add_readings(sql, "truck-1", 120, metric="vibration")  # values 0..119, 2 minutes
    add_readings(sql, "truck-1", 3, metric="fuel")
    rules = (Rule("oil_*", deadband=0.5), Rule("vib*", aggregate=60))
    receiver.script.append(("status", 500))
    uploader = await running_uploader(db_dsn, fast_sink(receiver, tmp_path, batch=1000, rules=rules))
    try:
        await until(lambda: len(receiver.accepted) == 1, what="one batch")
    finally:
        await uploader.stopService()
    lines = receiver.accepted[0].lines
    assert [line["value"] for line in lines if line["metric"] == "oil_temp"] == [20.0, 21.0, 25.0]
    assert [line["value"] for line in lines if line["metric"] == "fuel"] == [0, 1, 2]
    aggregates = [line for line in lines if line["metric"] == "vibration"]
    assert [(a["count"], a["min"], a["max"], a["mean"], a["interval"]) for a in aggregates] == [
        (60, 0, 59, 29.5, 60),
        (60, 60, 119, 89.5, 60),
    ]
    # the retried batch was the same bytes, and the deadband remembers what was sent
    assert receiver.attempts[0] == receiver.accepted[0].key
    assert sql("SELECT metric, value FROM upload_deadband") == [("oil_temp", 25.0)]


@pytest_twisted.ensureDeferred
async def test_retention_deletes_only_what_every_sink_has_sent(db_dsn, sql, receiver, tmp_path):
    add_pg_device(sql, "truck-1")
    add_readings(sql, "truck-1", 300)
    sql("UPDATE readings_arrivals SET received_at = now() - interval '2 days'")
    receiver.script.extend(["ok", ("status", 400)])  # the second batch is parked
    uploader = await running_uploader(db_dsn, fast_sink(receiver, tmp_path))
    retention = Retention(reactor, 86400)
    await retention.connect(db_dsn)
    try:
        await until(lambda: len(receiver.accepted) == 2, what="two batches")
        add_readings(sql, "truck-1", 5, start=1000)  # new readings are kept
        await until(lambda: sql("SELECT count(*) FROM upload_batches") == [(1,)], what="the parked batch")
        await retention.sweep()
    finally:
        await uploader.stopService()
        await retention.pool.close()
    # the sent batch before the parked one is gone; the parked batch and everything after it stay
    left = sql("SELECT min(value), max(value), count(*) FROM readings")[0]
    assert left == (100, 1004, 205)
    out = gatewayctl("upload", "status", "--db", db_dsn).stdout  # no partition made: all in the default one
    assert "holds back    partition readings_default and later" in out


def test_sink_repr_hides_header_values():
    sink = Sink(name="cloud", url="https://x.example/", headers=(("Authorization", "Bearer s3cret"),))
    assert "s3cret" not in repr(sink) and "s3cret" not in str(dataclasses.asdict(sink).keys())


@pytest_twisted.ensureDeferred
async def test_the_sender_sends_headers_and_reads_the_refusal(receiver, tmp_path):
    sink = fast_sink(receiver, tmp_path, headers=(("Authorization", "Bearer s3cret"),))
    sender = HTTPSender(reactor, sink)
    receiver.script.append(("status", 429, "7"))
    batch = Batch(1, "0f0e0d0c-0b0a-4908-8706-050403020100", START, START, 1, gzip.compress(b'{"a":1}\n'))
    try:
        refused = await sender.send(batch)
        accepted = await sender.send(batch)
    finally:
        await sender.close()
    assert (refused.status, refused.retry_after) == (429, "7")
    assert json.loads(refused.body) == {"error": "scripted 429"}
    assert accepted.status == 200
    got = receiver.accepted[0]
    assert got.key == batch.key and got.headers["authorization"] == "Bearer s3cret"
    assert got.lines == [{"a": 1}]


@pytest_twisted.ensureDeferred
async def test_retention_without_sinks_names_the_sinks_that_hold_it_back(tmp_path, db_dsn, sql):
    """With --retention and no sink configured, a sink left in the database is named at start."""
    from twisted.logger import formatEvent, globalLogPublisher

    from tests.conftest import start_service

    sql("INSERT INTO upload_sinks (name, url) VALUES ('old-lake', 'https://lake.invalid/in')")
    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        service = await start_service(tmp_path, db_dsn, retention="30d")
        try:
            ok, doc = await service.health.check()
            assert doc["retention"] == {
                "dropped_partitions": 0,
                "deleted_readings": 0,
                "deleted_quarantined": 0,
                "held": {},
            }
            # The partitions of today and the next two days were made at start.
            assert len(sql("SELECT 1 FROM pg_inherits WHERE inhparent = 'readings'::regclass")) == 4
        finally:
            await service.stopService()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert any("sink old-lake is in the database but not configured here" in line for line in lines), lines[-20:]
