"""
IStore: one contract run against MemoryStore and PostgresStore (a real
PostgreSQL), then the PostgreSQL-only behaviour: group commit under
concurrency, isolation of a refused reading, outages and reconnection.
"""

from __future__ import annotations

import json
import random

import psycopg2
import psycopg2.extensions
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from zope.interface.verify import verifyObject

from gateway.storage import schema
from gateway import tokens
from gateway.readings import (
    Source,
    Device,
    Quarantined,
    Reading,
    StoreOverloaded,
    StoreRejected,
    StoreUnavailable,
    WriteResult,
)
from gateway.storage.journal import Journal
from gateway.storage.interface import IStore
from gateway.storage.memory import MemoryStore
from gateway.storage.pool import session_dsn
from gateway.storage.store import PostgresStore
from tests.gatewayproc import gatewayctl


def add_pg_device(sql, name: str, revoked: bool = False) -> str:
    new = tokens.new_token()
    sql(
        "INSERT INTO devices (name, token_id, token_hash, revoked_at) VALUES (%s, %s, %s, %s)",
        (name, new.token_id, new.digest, "now" if revoked else None),
    )
    return new.token


async def open_pg_store(dsn: str, **kw) -> PostgresStore:
    store = PostgresStore(reactor, **kw)
    await store.connect(dsn)
    store.startService()
    return store


@pytest_twisted.async_yield_fixture(params=["memory", "postgres"])
async def kit(request):
    """(store, add_device(name, revoked=False) -> token, stored_count())"""
    if request.param == "memory":
        store = MemoryStore()

        def add(name, revoked=False):
            token = store.add_device(name)
            if revoked:
                store.revoke(name)
            return token

        yield store, add, lambda: len(store.readings), lambda: len(store.rejected)
        return
    sql = request.getfixturevalue("sql")
    store = await open_pg_store(request.getfixturevalue("db_dsn"))
    yield (
        store,
        lambda name, revoked=False: add_pg_device(sql, name, revoked),
        lambda: sql("SELECT count(*) FROM readings")[0][0],
        lambda: sql("SELECT count(*) FROM rejected_input")[0][0],
    )
    await store.stopService()


def readings(n: int, metric: str = "oil_temp", start: int = 0) -> list[Reading]:
    return [Reading(metric, (start + i) * 1000, float(i)) for i in range(n)]


def test_implements_istore(kit):
    assert verifyObject(IStore, kit[0])


@pytest_twisted.ensureDeferred
async def test_authenticate(kit):
    store, add, _, _ = kit
    token = add("truck-17")
    device = await store.authenticate(token)
    assert isinstance(device, Device) and device.name == "truck-17"
    token_id, secret = tokens.split_token(token)
    wrong = token_id + "." + ("A" if secret[0] != "A" else "B") + secret[1:]
    assert await store.authenticate(wrong) is None
    assert await store.authenticate("nonsense") is None
    assert await store.authenticate(tokens.new_token().token) is None


@pytest_twisted.ensureDeferred
async def test_device_key_for_the_binary_protocol(kit):
    store, add, _, _ = kit
    token = add("truck-5")
    add("truck-6", revoked=True)
    device, stored = await store.device_key("truck-5")
    assert device.name == "truck-5"
    nonce = b"n" * 32
    assert tokens.proof_matches(tokens.auth_proof(token, nonce, "truck-5"), stored, nonce, "truck-5")
    assert await store.device_key("truck-6") is None
    assert await store.device_key("nobody") is None


@pytest_twisted.ensureDeferred
async def test_a_tracker_is_found_by_its_imei_unless_revoked(kit, request):
    store, add, _, _ = kit
    add("truck-9")
    add("truck-8", revoked=True)
    if isinstance(store, MemoryStore):
        store.imeis.update({"356307042441013": "truck-9", "356307042441014": "truck-8"})
    else:
        sql = request.getfixturevalue("sql")
        sql("UPDATE devices SET imei = '356307042441013' WHERE name = 'truck-9'")
        sql("UPDATE devices SET imei = '356307042441014' WHERE name = 'truck-8'")
    device = await store.device_by_imei("356307042441013")
    assert isinstance(device, Device) and device.name == "truck-9"
    assert await store.device_by_imei("356307042441014") is None  # revoked
    assert await store.device_by_imei("000000000000000") is None


@pytest_twisted.ensureDeferred
async def test_revoked_device_is_refused(kit):
    store, add, _, _ = kit
    token = add("old-truck", revoked=True)
    assert await store.authenticate(token) is None


@pytest_twisted.ensureDeferred
async def test_write_then_retransmit_counts_duplicates(kit):
    store, add, stored, _ = kit
    device = await store.authenticate(add("truck-1"))
    assert await store.write(device, readings(10)) == WriteResult(10, 0)
    assert await store.write(device, readings(15)) == WriteResult(5, 10)
    assert stored() == 15


@pytest_twisted.ensureDeferred
async def test_several_writes_of_a_device_commit_together_each_with_its_result(kit):
    store, add, stored, _ = kit
    device = await store.authenticate(add("truck-1"))
    assert await store.write(device, readings(3)) == WriteResult(3, 0)
    again = [Reading("oil_temp", 0, 5.0)]  # stored before with 0.0: a conflict
    results = await store.write_many(device, [(readings(5), ()), (readings(2, start=10), ()), (again, ()), ([], ())])
    assert results == [WriteResult(2, 3), WriteResult(2, 0), WriteResult(0, 0, (), 1), WriteResult(0, 0)]
    assert stored() == 7


@pytest_twisted.ensureDeferred
async def test_the_same_reading_twice_in_one_write(kit):
    store, add, stored, _ = kit
    device = await store.authenticate(add("truck-1"))
    r = Reading("rpm", 5_000, 1.0)
    # the same copy again is a duplicate; another value for the key is a conflict
    assert await store.write(device, [r, r, Reading("rpm", 5_000, 2.0)]) == WriteResult(1, 1, (), 1)
    assert stored() == 1


@pytest_twisted.ensureDeferred
async def test_devices_do_not_share_keys(kit):
    store, add, stored, _ = kit
    a = await store.authenticate(add("a"))
    b = await store.authenticate(add("b"))
    assert await store.write(a, readings(3)) == WriteResult(3, 0)
    assert await store.write(b, readings(3)) == WriteResult(3, 0)
    assert stored() == 6


@pytest_twisted.ensureDeferred
async def test_reject_keeps_input(kit):
    store, _, _, rejected = kit
    await store.keep_rejected_input(Source("https", "127.0.0.1", 1, tls=True), "invalid_json: x", b"{", "truck-1")
    assert rejected() == 1


@pytest_twisted.ensureDeferred
async def test_check_answers(kit):
    assert await kit[0].check() is None


# -- PostgreSQL only -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_timestamps_keep_microseconds(db_dsn, sql):
    store = await open_pg_store(db_dsn)
    try:
        device = await store.authenticate(add_pg_device(sql, "t"))
        ts = 1795341600123456  # 2026-11-22T10:00:00.123456Z
        await store.write(device, [Reading("m", ts, 1.5), Reading("m", -62135596800000000, 2.0)])
        rows = sql("SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), value FROM readings ORDER BY ts")
        assert rows == [("0001-01-01 00:00:00.000000", 2.0), ("2026-11-22 10:00:00.123456", 1.5)]
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_concurrent_overlapping_writers_store_each_reading_once(db_dsn, sql):
    """50 writers, overlapping keys, several connections: exactly once, honest counts."""
    store = await open_pg_store(db_dsn, pool_size=4, max_batch=500, commit_delay=0.001)
    try:
        devices = [await store.authenticate(add_pg_device(sql, f"d{i}")) for i in range(5)]
        rng = random.Random(7)
        writes = []
        for w in range(50):
            device = devices[w % 5]
            start = rng.randrange(0, 200)
            writes.append((device, readings(rng.randrange(1, 60), start=start)))
        results = await gatherResults([store.write(d, r) for d, r in writes])
        distinct = {(d.id, r.metric, r.ts_us) for d, rs in writes for r in rs}
        assert sum(res.accepted for res in results) == len(distinct)
        for (_, rs), res in zip(writes, results):
            assert res.accepted + res.duplicates + res.conflicts == len(rs)  # each reading counted once
        assert sql("SELECT count(*) FROM readings")[0][0] == len(distinct)
        assert store.batches < 50  # writes were grouped into fewer transactions
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_new_metric_names_enter_the_dictionary_once_whichever_gateway_meets_them_first(db_dsn, sql, monkeypatch):
    """Two gateways meet the same new names at once, in opposite orders: each name once, every reading stored."""
    import gateway.storage.store as store_module

    monkeypatch.setattr(store_module, "MAX_METRICS_KNOWN", 30)  # forgotten and added again as a no-op
    stores = [await open_pg_store(db_dsn, pool_size=2, max_batch=200) for _ in range(2)]
    try:
        devices = [await store.authenticate(add_pg_device(sql, f"g{i}")) for i, store in enumerate(stores)]
        names = [f"sensor_{i:02}" for i in range(40)]
        # One write with more new names than a store remembers: added, and none remembered.
        assert (await stores[0].write(devices[0], [Reading(name, 9_000_000, 0.0) for name in names])).accepted == 40
        assert len(stores[0].metrics_known) <= 30
        writes = []
        for rnd in range(5):
            for k, (store, device) in enumerate(zip(stores, devices)):
                order = names if k == 0 else names[::-1]
                writes += [
                    store.write(device, [Reading(name, rnd * 1_000_000 + j, float(j)) for j in range(3)])
                    for name in order
                ]
        results = await gatherResults(writes)
        assert all(r.accepted == 3 for r in results)
        assert sql("SELECT count(*), count(DISTINCT name) FROM metrics") == [(40, 40)]
        assert all(len(store.metrics_known) <= 30 for store in stores)
        stored = sql(
            "SELECT d.name, k.name, count(*) FROM readings r JOIN devices d ON d.id = r.device_id "
            "JOIN metrics k ON k.id = r.metric_id GROUP BY 1, 2"
        )
        assert sorted(stored) == sorted((f"g{i}", name, 16 - i) for i in range(2) for name in names)
    finally:
        for store in stores:
            await store.stopService()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("n", [5, 700])  # one statement; BEGIN + INSERT + COMMIT, bisected down to one
async def test_a_refused_reading_fails_only_its_sender(db_dsn, sql, n):
    """The database refuses one reading; its batch-mates commit, its sender hears which one."""
    sql("ALTER TABLE readings ADD CONSTRAINT no_666 CHECK (value <> -666)")
    store = await open_pg_store(db_dsn, pool_size=1, commit_delay=0.05)
    try:
        a = await store.authenticate(add_pg_device(sql, "a"))
        b = await store.authenticate(add_pg_device(sql, "b"))
        bad = readings(n)
        bad[2] = Reading("oil_temp", bad[2].ts_us, -666.0)
        da, db = store.write(a, bad), store.write(b, readings(n + 2))
        results = await DeferredList([da, db], consumeErrors=True)
        (ok_a, res_a), (ok_b, res_b) = results
        assert not ok_a and res_a.check(StoreRejected)
        assert res_a.value.index == 2 and "readings[2]" in res_a.value.message
        assert "no_666" in res_a.value.message
        assert ok_b and res_b == WriteResult(n + 2, 0)
        assert store.batches == 1  # they did share one batch
        counts = dict(sql("SELECT d.name, count(*) FROM readings r JOIN devices d ON d.id = r.device_id GROUP BY 1"))
        assert counts == {"a": n - 1, "b": n + 2}
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_batches_run_the_statement_prepared_on_each_connection_or_in_full_once_it_is_lost(db_dsn, sql):
    store = await open_pg_store(db_dsn, pool_size=1)
    try:
        device = await store.authenticate(add_pg_device(sql, "a"))
        prepared = "SELECT generic_plans + custom_plans FROM pg_prepared_statements WHERE name = 'gateway_write_batch'"
        assert await store.pool.run(lambda c: c.runQuery(prepared)) == [(0,)]
        for n in (1, 3):
            await store.write(device, readings(n, start=10 * n))
        assert await store.pool.run(lambda c: c.runQuery(prepared)) == [(2,)]
        # Gone from the session (as behind a pooler that hands out another server connection): the full
        # statement is sent instead, and the readings are stored all the same.
        await store.pool.run(lambda c: c.runOperation("DEALLOCATE gateway_write_batch"))
        assert await store.write(device, readings(2, start=100)) == WriteResult(2, 0)
        assert await store.write(device, readings(2, start=200)) == WriteResult(2, 0)
        assert sql("SELECT count(*) FROM readings") == [(8,)]
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_refused_reading_fails_only_its_part_of_writes_committed_together(db_dsn, sql):
    sql("ALTER TABLE readings ADD CONSTRAINT no_666 CHECK (value <> -666)")
    store = await open_pg_store(db_dsn, pool_size=1)
    try:
        a = await store.authenticate(add_pg_device(sql, "a"))
        b = await store.authenticate(add_pg_device(sql, "b"))
        bad = [Reading("oil_temp", 7_000, 1.0), Reading("oil_temp", 8_000, -666.0)]
        parts = [(readings(3), ()), (bad, ()), (readings(2, start=20), ())]
        together, alone = store.write_many(a, parts), store.write(b, readings(4))
        first, refused, last = await together
        assert first == WriteResult(3, 0) and last == WriteResult(2, 0)
        assert isinstance(refused, StoreRejected) and refused.index == 1 and "no_666" in refused.message
        assert await alone == WriteResult(4, 0)
        counts = dict(sql("SELECT d.name, count(*) FROM readings r JOIN devices d ON d.id = r.device_id GROUP BY 1"))
        assert counts == {"a": 6, "b": 4}  # the refused part's good reading is stored too, as with one write
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("n", [50, 1000])
async def test_retransmitted_and_repeated_readings_in_a_batch_of_either_size(db_dsn, sql, n):
    store = await open_pg_store(db_dsn)
    try:
        device = await store.authenticate(add_pg_device(sql, "a"))
        assert await store.write(device, readings(n)) == WriteResult(n, 0)
        batch = readings(2 * n)  # its first half is stored already
        batch.append(batch[-1])  # and one reading twice in this write
        assert await store.write(device, batch) == WriteResult(n, n + 1)
        assert sql("SELECT count(*) FROM readings") == [(2 * n,)]
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_full_queue_is_refused_not_buffered(db_dsn, sql):
    store = await open_pg_store(db_dsn, pool_size=1, commit_delay=0, max_queue=10)
    try:
        device = await store.authenticate(add_pg_device(sql, "a"))
        first = store.write(device, readings(5))  # in flight
        queued = [store.write(device, readings(5, start=100)), store.write(device, readings(5, start=200))]
        with pytest.raises(StoreOverloaded):
            await store.write(device, readings(1, start=300))
        assert [await d for d in [first, *queued]] == [WriteResult(5, 0)] * 3
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_unreachable_database_is_unavailable():
    store = PostgresStore(reactor, pool_size=2)
    up = await store.connect("host=127.0.0.1 port=1 dbname=x user=x connect_timeout=2")
    assert up == 0
    device = Device(1, "a")
    with pytest.raises(StoreUnavailable):
        await store.write(device, readings(1))
    with pytest.raises(StoreUnavailable):
        await store.check()
    await store.pool.close()


async def write_until_stored(store, device, batch) -> list:
    """Write until the store takes it (the pool reconnects with backoff: up to ~10 s); every outcome on the way."""
    outcomes = []
    for _ in range(100):
        try:
            outcomes.append(await store.write(device, batch))
            break
        except StoreUnavailable as e:
            outcomes.append(e)
            await deferLater(reactor, 0.1, lambda: None)
    return outcomes


@pytest_twisted.ensureDeferred
async def test_reconnects_after_connections_are_killed(db_dsn, sql):
    store = await open_pg_store(db_dsn, pool_size=2, commit_delay=0)
    try:
        device = await store.authenticate(add_pg_device(sql, "a"))
        assert await store.write(device, readings(3)) == WriteResult(3, 0)
        killed = sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'txgateway' AND datname = current_database()"
        )[0][0]
        assert killed == 2
        outcomes = await write_until_stored(store, device, readings(3, start=10))
        assert outcomes[-1] in (WriteResult(3, 0), WriteResult(0, 3))
        assert sql("SELECT count(*) FROM readings")[0][0] == 6
        assert await store.check() is None
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_cluster_dsn_finds_the_writable_server_and_leaves_one_turned_read_only(db_dsn, sql):
    """
    A failover as the store sees it: a DSN of several hosts (the first gone), and a server that turns
    read-only under an open connection (a demoted primary). Writes are never refused as bad input: they
    fail as unavailable (not acknowledged, so sent again) until a connection to a writable server is made.
    """
    params = psycopg2.extensions.parse_dsn(db_dsn)
    hosts = f"host=127.0.0.1,{params.get('host', '127.0.0.1')} port=1,{params.get('port', 5432)}"
    cluster = psycopg2.extensions.make_dsn(db_dsn, host=None, port=None, hostaddr=None) + " " + hosts
    assert "target_session_attrs=read-write" in session_dsn(cluster).replace("'", "")
    store = await open_pg_store(cluster, pool_size=1, commit_delay=0)
    try:
        device = await store.authenticate(add_pg_device(sql, "a"))
        assert await store.write(device, readings(3)) == WriteResult(3, 0)
        await store.pool.run(lambda c: c.runOperation("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"))
        outcomes = await write_until_stored(store, device, readings(3, start=10))
        assert isinstance(outcomes[0], StoreUnavailable) and outcomes[-1] == WriteResult(3, 0)
        assert sql("SELECT count(*) FROM readings")[0][0] == 6
        assert sql("SELECT count(*) FROM rejected_input")[0][0] == 0
    finally:
        await store.stopService()


def twin_rows(sql) -> dict[tuple[str, str], tuple[int, float]]:
    rows = sql(
        "SELECT d.name, t.metric, (extract(epoch FROM t.ts) * 1000000)::bigint, t.value "
        "FROM twin t JOIN devices d ON d.id = t.device_id"
    )
    return {(name, metric): (ts, value) for name, metric, ts, value in rows}


@pytest_twisted.ensureDeferred
async def test_twin_keeps_the_newest_value_and_ignores_late_older_readings(db_dsn, sql):
    store = await open_pg_store(db_dsn)
    try:
        device = await store.authenticate(add_pg_device(sql, "a"))
        await store.write(device, [Reading("oil_temp", 2_000, 80.0), Reading("density", 1_000, 0.9)])
        await store.write(device, [Reading("oil_temp", 1_000, 70.0)])  # late and older: stored, twin unmoved
        assert twin_rows(sql) == {("a", "oil_temp"): (2_000, 80.0), ("a", "density"): (1_000, 0.9)}
        await store.write(device, [Reading("oil_temp", 3_000, 90.0), Reading("oil_temp", 2_500, 85.0)])
        assert twin_rows(sql)[("a", "oil_temp")] == (3_000, 90.0)
        # One key twice in a batch: the readings keep the first copy, and so does the twin.
        await store.write(device, [Reading("oil_temp", 4_000, 1.0), Reading("oil_temp", 4_000, 2.0)])
        assert sql("SELECT value FROM readings WHERE ts = timestamptz 'epoch' + interval '4 ms'") == [(1.0,)]
        assert twin_rows(sql)[("a", "oil_temp")] == (4_000, 1.0)
        # A retransmission with another value changes neither.
        await store.write(device, [Reading("oil_temp", 4_000, 3.0)])
        assert twin_rows(sql)[("a", "oil_temp")] == (4_000, 1.0)
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_twin_newer_only_across_two_gateways_sharing_the_database(db_dsn, sql):
    """Interleaved writes from two stores: the twin ends at the newest reading whichever committed last."""
    first, second = await open_pg_store(db_dsn), await open_pg_store(db_dsn)
    try:
        device = await first.authenticate(add_pg_device(sql, "a"))
        writes = []
        for i in range(200):
            store = first if i % 2 else second
            ts = (i * 7919) % 200  # a scrambled order of 0..199
            writes.append(store.write(device, [Reading("oil_temp", ts * 1000, float(ts))]))
        for d in writes:
            await d
        assert twin_rows(sql) == {("a", "oil_temp"): (199_000, 199.0)}
        assert sql("SELECT count(*) FROM readings")[0][0] == 200
    finally:
        await first.stopService()
        await second.stopService()


def test_migration_fills_the_twin_from_readings_stored_before_it(old_database):
    conn = psycopg2.connect(old_database(3))
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO devices (name, token_id, token_hash) VALUES ('a', 'x', '\\x00')")
            cur.execute(
                "INSERT INTO readings (device_id, metric, ts, value) VALUES "
                "(1, 'oil_temp', 'epoch', 1), (1, 'oil_temp', '2026-01-01Z', 2), (1, 'rpm', 'epoch', 3)"
            )
        conn.commit()
        assert schema.migrate(conn) == list(range(4, schema.LATEST + 1))
        with conn.cursor() as cur:
            cur.execute("SELECT metric, value FROM twin ORDER BY metric")
            assert cur.fetchall() == [("oil_temp", 2.0), ("rpm", 3.0)]
    finally:
        conn.close()


HELD = (Quarantined(1, Reading("oil_temp", 5_000, 900.0), "oil_temp.max: 900 is above 200"),)


@pytest_twisted.ensureDeferred
async def test_quarantined_readings_commit_with_the_write_once_each(kit):
    store, add, stored, _ = kit
    device = await store.authenticate(add("truck-1"))
    source = Source("https", "10.0.0.5", 4431, tls=True)
    assert await store.write(device, readings(2), source, HELD) == WriteResult(2, 0)
    assert await store.write(device, readings(2), source, HELD) == WriteResult(0, 2)  # a retransmission
    assert await store.write(device, [], source, HELD) == WriteResult(0, 0)  # only quarantined readings
    assert stored() == 2
    if isinstance(store, MemoryStore):
        assert list(store.quarantined.values()) == [(900.0, HELD[0].rule)]


@pytest_twisted.ensureDeferred
async def test_quarantine_rows_name_rule_and_source(db_dsn, sql):
    store = await open_pg_store(db_dsn)
    try:
        device = await store.authenticate(add_pg_device(sql, "truck-1"))
        await store.write(device, readings(1), Source("tgp", "10.0.0.7", 40000), HELD)
    finally:
        await store.stopService()
    rows = sql("SELECT metric, value, rule, source FROM quarantine")
    assert rows == [("oil_temp", 900.0, HELD[0].rule, "tgp 10.0.0.7:40000")]


@pytest_twisted.ensureDeferred
async def test_during_an_outage_quarantined_readings_go_to_the_journal_with_the_rest(db_dsn, sql, tmp_path):
    """A write holding quarantined readings is acknowledged from the journal, then replayed into both tables."""
    add_pg_device(sql, "truck-1")
    journal = Journal(tmp_path / "journal", 10_000_000, in_thread=deferToThread)
    journal.open()
    down = PostgresStore(reactor, pool_size=1, journal=journal)
    assert await down.connect("host=127.0.0.1 port=1 dbname=x user=x connect_timeout=2") == 0
    device = Device(sql("SELECT id FROM devices")[0][0], "truck-1")
    assert await down.write(device, readings(3), Source("tgp", "10.0.0.7", 40000), HELD) == WriteResult(3, 0)
    parts = [(readings(2, start=10), ()), (readings(1, start=20), ())]  # messages stored together: each journaled
    assert await down.write_many(device, parts, Source("mqtt", "10.0.0.8", 1883)) == [WriteResult(2, 0)] + [
        WriteResult(1, 0)
    ]
    await down.pool.close()
    await journal.close()
    assert sql("SELECT count(*) FROM quarantine") == [(0,)]

    journal = Journal(tmp_path / "journal", 10_000_000, in_thread=deferToThread)
    journal.open()
    up = await open_pg_store(db_dsn, journal=journal)
    try:
        journal.seal()
        assert await up.replay() == 6
    finally:
        await up.stopService()
        await journal.close()
    assert sql("SELECT count(*) FROM readings") == [(6,)]
    assert sql("SELECT metric, value, rule, source FROM quarantine") == [
        ("oil_temp", 900.0, HELD[0].rule, "tgp 10.0.0.7:40000")
    ]


@pytest_twisted.ensureDeferred
async def test_another_value_for_a_stored_key_is_a_conflict_not_a_duplicate(kit):
    """The first value stays (idempotent storage); a different one is counted apart from retransmissions."""
    store, add, stored, _ = kit
    device = await store.authenticate(add("truck-1"))
    assert await store.write(device, [Reading("oil_temp", 1000, 80.0)]) == WriteResult(1, 0)
    assert await store.write(device, [Reading("oil_temp", 1000, 80.0)]) == WriteResult(0, 1)
    changed = [Reading("oil_temp", 1000, 99.5), Reading("oil_temp", 2000, 81.0)]
    assert await store.write(device, changed) == WriteResult(1, 0, (), 1)
    # within one write: the first copy is stored, a second with another value is a conflict
    twice = [Reading("density", 5000, 0.87), Reading("density", 5000, 0.91)]
    assert await store.write(device, twice) == WriteResult(1, 0, (), 1)
    assert stored() == 3


@pytest_twisted.ensureDeferred
async def test_conflicting_values_are_kept_once_each_and_listed(db_dsn, sql):
    store = await open_pg_store(db_dsn)
    try:
        device = await store.authenticate(add_pg_device(sql, "truck-1"))
        await store.write(device, [Reading("oil_temp", 1000, 80.0)], Source("tgp", "10.0.0.7", 40000))
        for _ in range(2):  # the same conflicting value sent twice is kept once
            result = await store.write(device, [Reading("oil_temp", 1000, 99.5)], Source("tgp", "10.0.0.7", 40001))
            assert result == WriteResult(0, 0, (), 1)
    finally:
        await store.stopService()
    assert sql("SELECT value FROM readings") == [(80.0,)]
    rows = sql("SELECT metric, stored_value, sent_value, source FROM conflicts")
    assert rows == [("oil_temp", 80.0, 99.5, "tgp 10.0.0.7:40001")]
    listed = await deferToThread(gatewayctl, "conflicts", "list", "--json", "--db", db_dsn)
    [doc] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (doc["device"], doc["ts"], doc["stored_value"], doc["sent_value"]) == (
        "truck-1",
        "1970-01-01T00:00:00.001Z",
        80.0,
        99.5,
    )


_SAME_KEY_DEVICES = iter(range(1_000_000))


@given(
    st.lists(
        st.lists(
            st.tuples(st.sampled_from(["oil_temp", "rpm"]), st.integers(0, 2), st.sampled_from([1.0, 2.0])), max_size=4
        ),
        min_size=2,
        max_size=6,
    )
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest_twisted.ensureDeferred
async def test_a_devices_pipelined_writes_keep_the_first_value_sent_and_each_is_told_its_own_counts(
    db_dsn, sql, frames
):
    """
    Frames of one device written without waiting for each other (TGP pipelining), over several
    connections and small batches: per (metric, time) the first value sent is stored, and each
    frame is told accepted, duplicates and conflicts as if the frames had been stored one by one.
    """
    expected, first = [], {}
    for frame in frames:
        accepted = duplicates = conflicts = 0
        for metric, second, value in frame:
            key = (metric, second)
            if key not in first:
                first[key], accepted = value, accepted + 1
            elif first[key] == value:
                duplicates += 1
            else:
                conflicts += 1
        expected.append(WriteResult(accepted, duplicates, (), conflicts))

    store = await open_pg_store(db_dsn, pool_size=3, max_batch=2)
    try:
        device = await store.authenticate(add_pg_device(sql, f"pipelined-{next(_SAME_KEY_DEVICES)}"))
        writes = [store.write(device, [Reading(m, s * 1_000_000, v) for m, s, v in frame]) for frame in frames]
        results = await gatherResults(writes)
        stored = sql(
            "SELECT k.name, (extract(epoch FROM r.ts))::int, r.value FROM readings r"
            " JOIN metrics k ON k.id = r.metric_id WHERE r.device_id = %s",
            (device.id,),
        )
    finally:
        await store.stopService()
    assert results == expected
    assert sorted(stored) == sorted((m, s, v) for (m, s), v in first.items())


@pytest_twisted.ensureDeferred
async def test_an_mqtt_session_is_present_only_when_kept_and_not_expired(kit):
    store, add, _, _ = kit
    device = await store.authenticate(add("truck-1"))
    assert await store.session_begins(device.id, "c1", False, 3600) is False  # first connection
    await store.session_ends(device.id, "c1")
    assert await store.session_begins(device.id, "c1", False, 3600) is True
    assert await store.session_begins(device.id, "c2", False, 3600) is False  # another client id
    assert await store.session_begins(device.id, "c1", True, 0) is False  # a clean start discards it
    assert await store.session_begins(device.id, "c1", False, 0) is False


@pytest_twisted.ensureDeferred
async def test_an_expired_mqtt_session_is_not_present_and_expired_ones_are_forgotten(db_dsn, sql):
    store = await open_pg_store(db_dsn)
    try:
        device = await store.authenticate(add_pg_device(sql, "truck-1"))
        for client in ("old", "c1"):
            await store.session_begins(device.id, client, False, 60)
            await store.session_ends(device.id, client)
        sql("UPDATE mqtt_sessions SET ended_at = now() - interval '61 seconds'")
        assert await store.session_begins(device.id, "c1", False, 60) is False
        # the device's other expired session is gone with that connection
        assert sql("SELECT client_id, ended_at FROM mqtt_sessions") == [("c1", None)]
    finally:
        await store.stopService()
