"""
The time partitions of readings and quarantine, on a real PostgreSQL: the
migrations of a database holding them, partitions made ahead (once, by
gateways that agree), a reading far outside them kept in the default
partition and moved out later, a change of width, and retention.
"""

from __future__ import annotations

import datetime
import json
import threading
import time

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from gateway.storage import schema
from gateway.storage.packing import PACK_LOCK, Packer
from gateway.storage.partitions import BOUNDS, Partitions, partition_name, uncovered
from gateway.storage.pool import PgPool
from tests.gatewayproc import gatewayctl
from tests.test_store import add_pg_device

UTC = datetime.timezone.utc
DAY = 86400.0
NOW = datetime.datetime(2026, 11, 27, 15, 30, tzinfo=UTC)


# Devices 1 and 2 of a fresh database, as a migration test's readings name them.
TWO_DEVICES = "INSERT INTO devices (name, token_id, token_hash) VALUES ('a', 'x', '\\x00'), ('b', 'y', '\\x00')"


HALF_DAY_2 = datetime.timedelta(minutes=49)  # the 50th of day 2's readings, one a minute


def bounds(sql) -> list[tuple[str, datetime.datetime, datetime.datetime]]:
    return sql(BOUNDS, ("readings",))


def day(d: int, hour: int = 0) -> datetime.datetime:
    return datetime.datetime(2026, 11, d, hour, tzinfo=UTC)


def test_uncovered_parts_and_names():
    taken = [(day(2), day(3)), (day(4, 12), day(5))]
    assert uncovered(day(1), day(6), taken) == [(day(1), day(2)), (day(3), day(4, 12)), (day(5), day(6))]
    assert uncovered(day(2), day(3), taken) == []
    assert partition_name(day(27)) == "readings_20261127"
    assert partition_name(day(27, 6)) == "readings_20261127_060000"


def test_the_migration_keeps_every_reading_in_partitions_by_day(old_database):
    conn = psycopg2.connect(old_database(7))
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO devices (name, token_id, token_hash) VALUES ('a', 'x', '\\x00')")
            cur.execute(
                "INSERT INTO readings (device_id, metric, ts, value) SELECT 1, 'm', t, extract(epoch FROM t) "
                "FROM generate_series(timestamptz '2026-11-25 22:00Z', '2026-11-27 02:00Z', '10 minutes') t"
            )
            cur.execute("INSERT INTO readings (device_id, metric, ts, value) VALUES (1, 'm', 'epoch', 0)")
            cur.execute("SELECT tx::text, id, ts, value FROM readings ORDER BY tx, id")
            before = cur.fetchall()
        conn.commit()
        assert schema.migrate(conn, upto=8) == [8]
        with conn.cursor() as cur:
            cur.execute("SELECT tx::text, id, ts, value FROM readings ORDER BY tx, id")
            assert cur.fetchall() == before  # every reading, with its upload order
            cur.execute(BOUNDS, ("readings",))
            assert [row[0] for row in cur.fetchall()] == [
                "readings_19700101",
                "readings_20261125",
                "readings_20261126",
                "readings_20261127",
            ]
            cur.execute("SELECT count(*) FROM readings_default")
            assert cur.fetchone() == (0,)
            # The natural key still holds, and new ids follow the old ones.
            cur.execute(
                "INSERT INTO readings (device_id, metric, ts, value) VALUES (1, 'm', '2026-11-26 12:00Z', 1), "
                "(1, 'm', '2027-01-01Z', 2) ON CONFLICT (device_id, metric, ts) DO NOTHING RETURNING id"
            )
            [(new_id,)] = cur.fetchall()
            assert new_id > max(row[1] for row in before)
            cur.execute("SELECT count(*) FROM readings_default")
            assert cur.fetchone() == (1,)
        conn.commit()
    finally:
        conn.close()


def test_the_migration_keeps_every_quarantined_reading_in_partitions_by_day(old_database):
    conn = psycopg2.connect(old_database(10))
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO devices (name, token_id, token_hash) VALUES ('a', 'x', '\\x00')")
            cur.execute(
                "INSERT INTO quarantine (device_id, metric, ts, value, rule, source) SELECT 1, 'm', t, 900, "
                "'m.max: 900 is above 200', 'mqtt 10.0.0.1:1' "
                "FROM generate_series(timestamptz '2026-11-25 22:00Z', '2026-11-26 02:00Z', '1 hour') t"
            )
            cur.execute("SELECT id, ts, value, rule, source, received_at FROM quarantine ORDER BY id")
            before = cur.fetchall()
        conn.commit()
        assert schema.migrate(conn, upto=11) == [11]
        with conn.cursor() as cur:
            cur.execute("SELECT id, ts, value, rule, source, received_at FROM quarantine ORDER BY id")
            assert cur.fetchall() == before
            cur.execute(BOUNDS, ("quarantine",))
            assert [row[0] for row in cur.fetchall()] == ["quarantine_20261125", "quarantine_20261126"]
            # Each reading is still held once, and new ids follow the old ones.
            cur.execute(
                "INSERT INTO quarantine (device_id, metric, ts, value, rule, source) VALUES "
                "(1, 'm', '2026-11-26 01:00Z', 901, 'r', 's'), (1, 'm', '2030-01-01Z', 902, 'r', 's') "
                "ON CONFLICT (device_id, metric, ts) DO NOTHING RETURNING id"
            )
            [(new_id,)] = cur.fetchall()
            assert new_id > max(row[0] for row in before)
            cur.execute("SELECT count(*) FROM quarantine_default")
            assert cur.fetchone() == (1,)
        conn.commit()
    finally:
        conn.close()


def test_the_upload_order_is_indexed_by_transaction_alone_after_the_migration(old_database):
    conn = psycopg2.connect(old_database(11))
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO devices (name, token_id, token_hash) VALUES ('a', 'x', '\\x00')")
            for d in (25, 26):
                cur.execute(
                    f"CREATE TABLE readings_202611{d} PARTITION OF readings "
                    f"FOR VALUES FROM ('2026-11-{d}Z') TO ('2026-11-{d + 1}Z')"
                )
            for hour in range(3):  # three transactions over two days' partitions
                cur.execute(
                    "INSERT INTO readings (device_id, metric, ts, value) SELECT 1, 'm' || %s, t, 1 "
                    "FROM generate_series(timestamptz '2026-11-25 23:00Z', '2026-11-26 01:00Z', '1 minute') t",
                    (hour,),
                )
                conn.commit()
            cur.execute("SELECT tx::text, id FROM readings ORDER BY tx, id")
            before = cur.fetchall()
        assert schema.migrate(conn, upto=12) == [12]
        with conn.cursor() as cur:
            cur.execute(
                "SELECT i.indrelid::regclass::text, regexp_replace(pg_get_indexdef(i.indexrelid), '.* USING ', '') "
                "FROM pg_index i WHERE i.indrelid IN (SELECT inhrelid FROM pg_inherits "
                "WHERE inhparent = 'readings'::regclass) AND pg_get_indexdef(i.indexrelid) LIKE '%%(tx%%' ORDER BY 1"
            )
            assert cur.fetchall() == [
                ("readings_20261125", "btree (tx)"),
                ("readings_20261126", "btree (tx)"),
                ("readings_default", "btree (tx)"),
            ]
            cur.execute("SELECT tx::text, id FROM readings ORDER BY tx, id")
            assert cur.fetchall() == before
            # A cursor in the middle of a transaction: the next readings in upload order, from the index.
            tx, id_ = before[200]
            cur.execute("SET enable_seqscan = off")
            query = "SELECT tx::text, id FROM readings WHERE (tx, id) > (%s::xid8, %s) ORDER BY tx, id LIMIT 50"
            cur.execute(query, (tx, id_))
            assert cur.fetchall() == before[201:251]
            cur.execute("EXPLAIN " + query, (tx, id_))
            plan = "\n".join(row[0] for row in cur.fetchall())
            assert "readings_upload_order" in plan or "_tx_idx" in plan, plan
        conn.commit()
    finally:
        conn.close()


def test_a_device_s_readings_page_in_time_order_from_the_natural_key_after_the_migration(old_database):
    from gateway.api.read import READINGS

    conn = psycopg2.connect(old_database(13))
    try:
        with conn.cursor() as cur:
            cur.execute(TWO_DEVICES)
            for d in (25, 26):
                cur.execute(
                    f"CREATE TABLE readings_202611{d} PARTITION OF readings "
                    f"FOR VALUES FROM ('2026-11-{d}Z') TO ('2026-11-{d + 1}Z')"
                )
            # Device 1: five metrics at their own paces over two days' partitions and the default one (1 Jan),
            # some sharing times; device 2 at the same times, which no page of device 1 may show.
            start = int(datetime.datetime(2026, 11, 25, 23, 50, tzinfo=UTC).timestamp() * 1_000_000)
            rows = [
                (device, f"m{m}", start + i * (m + 1) * 7_000_000, float(i))
                for device in (1, 2)
                for m in range(5)
                for i in range(40)
            ]
            rows.append((1, "m9", int(datetime.datetime(2027, 1, 1, tzinfo=UTC).timestamp() * 1_000_000), 9.0))
            # As schema 13's batch statement stored them: metric names in the rows, the twin beside them.
            cur.execute(
                "INSERT INTO readings (device_id, metric, ts, value) "
                "SELECT d, m, timestamptz 'epoch' + t * interval '1 microsecond', v "
                "FROM unnest(%s::integer[], %s::text[], %s::bigint[], %s::float8[]) AS u(d, m, t, v)",
                [list(c) for c in zip(*rows)],
            )
            cur.execute(
                "INSERT INTO twin (device_id, metric, ts, value) SELECT DISTINCT ON (device_id, metric) "
                "device_id, metric, ts, value FROM readings ORDER BY device_id, metric, ts DESC"
            )
        conn.commit()
        assert schema.migrate(conn, upto=15) == [14, 15]
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_index i WHERE i.indrelid IN (SELECT inhrelid FROM pg_inherits "
                "WHERE inhparent = 'readings'::regclass) AND pg_get_indexdef(i.indexrelid) LIKE '%%(device_id, ts)'"
            )
            assert cur.fetchone() == (0,)

            def pages(limit: int, **given) -> list[tuple]:
                params = {"device": 1, "metric": None, "since": None, "until": None, "after_ts": None}
                params.update(given, after_metric=None, limit=limit + 1)
                seen = []
                while True:
                    cur.execute(READINGS, params)
                    got = cur.fetchall()
                    seen += got[:limit]
                    if len(got) <= limit:
                        return seen
                    params.update(after_ts=got[limit - 1][1], after_metric=got[limit - 1][0])

            everything = sorted(((m, t, v) for d, m, t, v in rows if d == 1), key=lambda r: (r[1], r[0]))
            assert len(everything) == 201
            assert pages(7) == pages(1000) == everything
            since, until = start + 100_000_000, start + 400_000_000
            assert pages(3, metric="m2", since=since, until=until) == [
                r for r in everything if r[0] == "m2" and since <= r[1] < until
            ]
            assert pages(4, since=start + 35_000_000) == [r for r in everything if r[1] >= start + 35_000_000]
        conn.rollback()
    finally:
        conn.close()


def three_transactions(conn, column: str, value: str, order: str = "") -> None:
    """
    Devices 1 and 2, a partition for 25 Nov 2026 and three transactions, one per metric, each storing two
    readings of each device that day and one on 1 Jan 2027 (in the default partition); ``column`` is the
    metric's column, ``value`` the SQL of its value from the metric's name.
    """
    with conn.cursor() as cur:
        cur.execute(TWO_DEVICES)
        cur.execute(
            "CREATE TABLE readings_20261125 PARTITION OF readings FOR VALUES FROM ('2026-11-25Z') TO ('2026-11-26Z')"
        )
        for metric in ("oil_temp", "density", "rpm"):
            cur.execute(
                f"INSERT INTO readings (device_id, {column}, ts, value) SELECT d, {value}, t, random() "
                "FROM generate_series(1, 2) d, unnest(array[timestamptz '2026-11-25 10:00Z', "
                f"'2026-11-25 10:00:01Z', '2027-01-01Z']) t{order}",
                (metric,),
            )
            conn.commit()


def test_the_metric_dictionary_migration_keeps_every_reading_its_order_and_its_key(old_database):
    from gateway.storage.writes import write_batch_sql

    conn = psycopg2.connect(old_database(14))
    try:
        three_transactions(conn, "metric", "%s")
        with conn.cursor() as cur:
            cur.execute(
                "SELECT tx::text, id, tableoid::regclass::text, device_id, metric, ts, value, received_at "
                "FROM readings ORDER BY tx, id"
            )
            before = cur.fetchall()
        assert schema.migrate(conn, upto=15) == [15]
        with conn.cursor() as cur:
            cur.execute("SELECT name FROM metrics ORDER BY id")
            assert [name for (name,) in cur.fetchall()] == ["density", "oil_temp", "rpm"]
            cur.execute(
                "SELECT r.tx::text, r.id, r.tableoid::regclass::text, r.device_id, k.name, r.ts, r.value, "
                "r.received_at FROM readings r JOIN metrics k ON k.id = r.metric_id ORDER BY r.tx, r.id"
            )
            assert cur.fetchall() == before  # every reading, in its partition, in its upload order
            cur.execute(
                "SELECT count(*) FROM pg_index i WHERE i.indisunique AND i.indrelid IN "
                "(SELECT inhrelid FROM pg_inherits WHERE inhparent = 'readings'::regclass) "
                "AND pg_get_indexdef(i.indexrelid) LIKE '%%(device_id, metric_id, ts)'"
            )
            assert cur.fetchone() == (2,)
            # The batch statement takes names: known ones keep their key, a new one gets an id.
            cur.execute("SELECT metric_id_of('vibration')")
            cur.execute(
                write_batch_sql(), ([1, 1], ["oil_temp", "vibration"], [1795600800000000, 1795600800000000], [1.0, 2.0])
            )
            assert cur.fetchone()[0] == 1  # 2026-11-25 10:00Z of oil_temp was stored before the migration
            cur.execute("SELECT count(*) FROM readings")
            assert cur.fetchone() == (len(before) + 1,)
        conn.rollback()
    finally:
        conn.close()


def test_the_lean_row_migration_keeps_every_reading_and_moves_no_cursor_past_an_unsent_one(old_database):
    from gateway.outbound.ledger import START
    from gateway.storage.writes import write_batch_sql

    conn = psycopg2.connect(old_database(15))
    end = (2147483647, 2147483647, "infinity")
    try:
        three_transactions(conn, "metric_id", "metric_id_of(%s)", " ORDER BY d DESC, t DESC")
        with conn.cursor() as cur:
            # 25 Nov was packed: it keeps the BRIN index alone. The default partition is still filling.
            cur.execute("INSERT INTO readings_packed (lo, bytes_before, bytes_after) VALUES ('2026-11-25Z', 2, 1)")
            cur.execute(
                "SELECT r.tx::text::bigint, r.tableoid::regclass::text, r.device_id, k.name, r.ts, r.value "
                "FROM readings r JOIN metrics k ON k.id = r.metric_id ORDER BY r.tx, r.id"
            )
            before = cur.fetchall()
            cur.execute("SELECT tx::text::bigint, min(received_at) FROM readings GROUP BY tx ORDER BY tx")
            arrivals = [(tx, at, 6) for tx, at in cur.fetchall()]
            cur.execute("SELECT tx::text, id FROM readings ORDER BY tx, id")
            order = cur.fetchall()
            # Sink "mid" sent 8 readings: the first transaction and two of the second. Sink "whole" sent the first.
            cur.execute(
                "INSERT INTO upload_sinks (name, url, cursor_tx, cursor_id) VALUES "
                "('mid', 'https://x/', %s::xid8, %s), ('whole', 'https://y/', %s::xid8, %s)",
                (*order[7], *order[5]),
            )
            # Batches in flight: "whole" holds the second transaction and two of the third; "mid" the next four.
            cur.execute(
                "INSERT INTO upload_batches (sink, key, after_tx, after_id, last_tx, last_id, readings) VALUES "
                "('whole', '00000000-0000-4000-8000-000000000001', %s::xid8, %s, %s::xid8, %s, 8), "
                "('mid', '00000000-0000-4000-8000-000000000002', %s::xid8, %s, %s::xid8, %s, 4), "
                "('whole', '00000000-0000-4000-8000-000000000003', '0', 0, %s::xid8, %s, 6)",
                (*order[5], *order[13], *order[7], *order[11], *order[5]),
            )
        conn.commit()
        assert schema.migrate(conn, upto=16) == [16]
        with conn.cursor() as cur:
            cur.execute(
                "SELECT r.tx, r.tableoid::regclass::text, r.device_id, k.name, r.ts, r.value "
                "FROM readings r JOIN metrics k ON k.id = r.metric_id ORDER BY r.tx, r.device_id DESC, r.ts DESC"
            )
            assert cur.fetchall() == before  # every reading, in its partition and its transaction
            cur.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'readings'")
            assert {name for (name,) in cur.fetchall()} == {"tx", "ts", "value", "device_id", "metric_id"}
            cur.execute("SELECT tx, received_at, readings FROM readings_arrivals ORDER BY tx")
            assert cur.fetchall() == arrivals
            tx1, tx2, tx3 = (a[0] for a in arrivals)
            # A cursor partway through a transaction goes back to its start: nothing unsent is passed.
            cur.execute(
                "SELECT name, cursor_tx, cursor_device, cursor_metric, cursor_ts::text FROM upload_sinks ORDER BY name"
            )
            assert cur.fetchall() == [("mid", tx2, *START[1:]), ("whole", tx1, *end)]
            cur.execute(
                "SELECT key::text, after_tx, after_device, after_metric, after_ts::text, "
                "last_tx, last_device, last_metric, last_ts::text, readings FROM upload_batches ORDER BY id"
            )
            held, mid, first = cur.fetchall()
            # A batch that ended partway through a transaction ends with it, under a new key.
            assert held[0] != "00000000-0000-4000-8000-000000000001"
            assert held[1:] == (tx1, *end, tx3, *end, 12)
            assert mid[0] != "00000000-0000-4000-8000-000000000002"
            assert mid[1:] == (tx2, *START[1:], tx2, *end, 6)
            # One that ended with its transaction keeps its key and its readings.
            assert first == ("00000000-0000-4000-8000-000000000003", 0, *end, tx1, *end, 6)
            cur.execute(
                "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am m "
                "ON m.oid = c.relam WHERE m.amname = 'brin' AND i.indrelid IN "
                "(SELECT inhrelid FROM pg_inherits WHERE inhparent = 'readings'::regclass)"
            )
            assert cur.fetchone() == (2,)
            cur.execute("SELECT relname FROM pg_class WHERE relname ~ 'upload_tx'")
            assert cur.fetchall() == [("readings_default_upload_tx",)]
            cur.execute("SELECT tablename FROM pg_stats WHERE attname = 'tx' AND tablename ~ '^readings_2'")
            assert cur.fetchall() == [("readings_20261125",)]  # analyzed: the planner trusts its BRIN index
            # The batch statement's readings are counted in their transaction's arrival.
            cur.execute("SELECT metric_id_of('vibration')")
            cur.execute(
                write_batch_sql(), ([1, 2], ["oil_temp", "vibration"], [1795600800000000, 1795600800000000], [1.0, 2.0])
            )
            assert cur.fetchone()[0] == 1  # device 1's oil_temp at 2026-11-25 10:00Z was stored before
            cur.execute(
                "SELECT a.readings, a.received_at = now() FROM readings_arrivals a "
                "WHERE a.tx = pg_current_xact_id()::text::bigint"
            )
            assert cur.fetchall() == [(1, True)]
        conn.rollback()
    finally:
        conn.close()


def test_a_large_release_from_quarantine_commits_a_chunk_at_a_time(db_dsn, sql):
    from gateway.storage.queries import RELEASE_CHUNK

    add_pg_device(sql, "truck-1")
    [(device,)] = sql("SELECT id FROM devices")
    held = 2 * RELEASE_CHUNK + 7
    sql(
        "INSERT INTO quarantine (device_id, metric, ts, value, rule, source) SELECT %s, 'oil_temp', "
        "timestamptz '2026-11-20Z' + i * interval '1 second', 250, 'oil_temp.max: 250 is above 200', 'https' "
        "FROM generate_series(1, %s) i",
        (device, held),
    )
    sql(
        "INSERT INTO readings (device_id, metric_id, ts, value) VALUES (%s, metric_id_of('oil_temp'), "
        "timestamptz '2026-11-20Z' + interval '1 second', 250)",
        (device,),
    )
    out = gatewayctl("quarantine", "release", "--all", "--db", db_dsn)
    assert f"released {held} readings: {held - 1} stored, 1 stored already" in out.stderr + out.stdout
    assert sql("SELECT count(*) FROM quarantine") == [(0,)]
    assert sql("SELECT count(*), count(DISTINCT ts) FROM readings") == [(held, held)]
    groups = [n for (n,) in sql("SELECT count(*) FROM readings GROUP BY tx ORDER BY tx")]
    assert groups == [1, RELEASE_CHUNK - 1, RELEASE_CHUNK, 7]


@pytest.fixture
def pools(db_dsn):
    made = []

    async def start(n: int = 1):
        for _ in range(n):
            pool = PgPool(reactor, 1)
            await pool.start(db_dsn)
            made.append(pool)
        return made

    yield start
    for pool in made:
        pytest_twisted.blockon(pool.close())


@pytest_twisted.ensureDeferred
async def test_partitions_are_made_ahead_once_by_gateways_that_agree(pools, sql):
    a, b = await pools(2)
    made = await gatherResults([Partitions(a, DAY).maintain(NOW), Partitions(b, DAY).maintain(NOW)])
    days = ["20261127", "20261128", "20261129"]
    assert sorted(made[0] + made[1]) == [f"quarantine_{d}" for d in days] + [f"readings_{d}" for d in days]
    assert await Partitions(a, DAY).maintain(NOW) == []
    [(name, lo, hi)] = [b for b in bounds(sql) if b[0] == "readings_20261128"]
    assert (lo, hi) == (day(28), day(29))
    # A narrower width fills only what is not covered yet.
    later = NOW + datetime.timedelta(days=2, hours=3)
    made = await Partitions(a, 6 * 3600).maintain(later)
    assert made == [f"{t}_20261130{h}" for t in ("readings", "quarantine") for h in ("", "_060000")]
    assert sql(BOUNDS, ("quarantine",))[-1] == ("quarantine_20261130_060000", day(30, 6), day(30, 12))


@pytest_twisted.ensureDeferred
async def test_a_reading_outside_every_partition_is_kept_then_moved_into_its_own(pools, sql):
    [pool] = await pools()
    device = add_pg_device(sql, "truck-17") and sql("SELECT id FROM devices")[0][0]
    await Partitions(pool, DAY).maintain(NOW)
    sql(
        "INSERT INTO readings (device_id, metric_id, ts, value) "
        "VALUES (%s, metric_id_of('m'), '2031-05-05 05:05Z', 1), "
        "(%s, metric_id_of('m'), '2031-05-05 06:00Z', 2), (%s, metric_id_of('m'), '2026-11-27 16:00Z', 3)",
        (device, device, device),
    )
    assert sql("SELECT count(*) FROM readings_default") == [(2,)]
    before = sql("SELECT tx, ts, value FROM readings ORDER BY tx, ts")
    sql(
        "INSERT INTO quarantine (device_id, metric, ts, value, rule, source) "
        "VALUES (%s, 'm', '2031-05-05 07:00Z', 900, 'm.max', 'mqtt'), (%s, 'm', '1999-01-01Z', 900, 'm.max', 'mqtt')",
        (device, device),
    )
    quarantined = sql("SELECT id, ts FROM quarantine ORDER BY id")
    keeper = Partitions(pool, DAY)
    assert await keeper.maintain(NOW) == ["readings_20310505", "quarantine_19990101", "quarantine_20310505"]
    assert keeper.moved == 4
    assert sql("SELECT count(*) FROM quarantine_default") == [(0,)]
    assert sql("SELECT id, ts FROM quarantine ORDER BY id") == quarantined
    assert sql("SELECT count(*) FROM readings_default") == [(0,)]
    assert sql("SELECT count(*) FROM readings_20310505") == [(2,)]
    assert sql("SELECT tx, ts, value FROM readings ORDER BY tx, ts") == before
    # The moved readings are still unique: sending one again stores nothing.
    sql(
        "INSERT INTO readings (device_id, metric_id, ts, value) VALUES (%s, metric_id_of('m'), '2031-05-05 05:05Z', 1) "
        "ON CONFLICT (device_id, metric_id, ts) DO NOTHING",
        (device,),
    )
    assert sql("SELECT count(*) FROM readings") == [(3,)]


@pytest_twisted.ensureDeferred
async def test_retention_drops_whole_partitions_once_sent_and_deletes_only_what_is_left(db_dsn, sql):
    from gateway.outbound.retention import Retention

    add_pg_device(sql, "truck-17")
    retention = Retention(reactor, 86400)
    await retention.connect(db_dsn)
    try:
        await Partitions(retention.pool, DAY).maintain(day(1))
        for d in (1, 2, 3):  # each day in a transaction of its own: day 1 first in upload order
            sql(
                "INSERT INTO readings (device_id, metric_id, ts, value) "
                "SELECT 1, metric_id_of('m'), %s + make_interval(secs => i * 60), i FROM generate_series(0, 99) i",
                (day(d),),
            )
        sql("UPDATE readings_arrivals SET received_at = now() - interval '10 days'")
        # Quarantined readings: one of day 2 held for ten days, one of day 3 just now, one from long ago
        # (in quarantine_default) held for ten days. None is ever uploaded: only their age counts.
        sql(
            "INSERT INTO quarantine (device_id, metric, ts, value, rule, source, received_at) VALUES "
            "(1, 'm', %s, 900, 'm.max', 'mqtt', now() - interval '10 days'), (1, 'm', %s, 900, 'm.max', 'mqtt', now()),"
            "(1, 'm', '1999-01-01Z', 900, 'm.max', 'mqtt', now() - interval '10 days')",
            (day(2, 1), day(3, 1)),
        )
        # The one sink has sent day 1 and half of day 2.
        [at] = sql("SELECT tx, device_id, metric_id, ts FROM readings WHERE ts = %s", (day(2) + HALF_DAY_2,))
        sql(
            "INSERT INTO upload_sinks (name, url, cursor_tx, cursor_device, cursor_metric, cursor_ts) "
            "VALUES ('cloud', 'https://x/', %s, %s, %s, %s)",
            at,
        )
        await retention.sweep()
        names = [b[0] for b in bounds(sql)]
        assert "readings_20261101" not in names and {"readings_20261102", "readings_20261103"} <= set(names)
        assert retention.held == {
            "readings_20261102": "not yet sent to every sink",
            "readings_20261103": "not yet sent to every sink",
            "quarantine_20261103": "holds readings that arrived within the retention period",
        }
        assert [b[0] for b in sql(BOUNDS, ("quarantine",))] == ["quarantine_20261103"]
        assert sql("SELECT ts FROM quarantine") == [(day(3, 1),)]
        assert retention.status()["deleted_quarantined"] == 1  # the one from 1999, row by row
        assert sql("SELECT count(*) FROM readings_20261102") == [(50,)]  # the sent half, deleted row by row
        assert sql("SELECT count(*) FROM readings_20261103") == [(100,)]
        # Day 1's transaction has no reading left: its arrival is forgotten. Days 2 and 3 keep theirs.
        arrivals = sql("SELECT tx, readings FROM readings_arrivals ORDER BY tx")
        assert [n for _, n in arrivals] == [100, 100] and arrivals[0][0] == at[0], arrivals
        sql("ANALYZE readings")
        sql("ANALYZE quarantine")
        storage = json.loads(gatewayctl("storage", "--json", "--db", db_dsn).stdout)
        by_name = {p["partition"]: p for p in storage}
        held = by_name["quarantine"]  # every quarantine partition on one line: what is left is day 3's reading
        assert (held["readings_estimate"], held["sent_to_every_sink"]) == (1, None) and held["bytes"] > 0
        assert held["from"] == "2026-11-03T00:00:00Z"
        assert by_name["readings_20261103"]["readings_estimate"] == 100
        assert by_name["readings_20261103"]["from"] == "2026-11-03T00:00:00Z"
        assert not by_name["readings_20261102"]["sent_to_every_sink"]
        assert by_name["readings_default"]["sent_to_every_sink"]  # empty
        assert "readings_20261101" not in by_name and by_name["readings_20261103"]["bytes"] > 0
        text = gatewayctl("storage", "--db", db_dsn).stdout
        assert "readings_20261102" in text and "NOT YET SENT to every sink" in text
        assert "held, never uploaded" in text
        # Everything sent, but one reading of day 3 arrived just now: that partition waits for it.
        sql("INSERT INTO readings (device_id, metric_id, ts, value) VALUES (1, metric_id_of('m'), %s, 7)", (day(3, 5),))
        sql("UPDATE upload_sinks SET cursor_tx = pg_current_xact_id()::text::bigint")
        await retention.sweep()
        names = [b[0] for b in bounds(sql)]
        assert "readings_20261102" not in names and "readings_20261103" in names
        assert retention.held == {
            "readings_20261103": "holds readings that arrived within the retention period",
            "quarantine_20261103": "holds readings that arrived within the retention period",
        }
        assert retention.status()["dropped_partitions"] == 4  # readings of days 1 and 2, quarantine of 1 and 2
        # Day 2's arrival goes with its partition, day 3's with its old readings, deleted row by row; the one of
        # the reading just now stays with it.
        assert sql("SELECT count(*) FROM readings_20261103") == [(1,)]
        assert [n for (n,) in sql("SELECT readings FROM readings_arrivals ORDER BY tx")] == [1]
    finally:
        await retention.pool.close()


def test_a_rebuild_under_way_is_not_taken_for_one_cut_short(db_dsn, sql):
    from gateway.storage.packing import LEFT_BEHIND

    sql("CREATE TABLE readings_20261101 PARTITION OF readings FOR VALUES FROM ('2026-11-01Z') TO ('2026-11-02Z')")
    add_pg_device(sql, "truck-1")
    # A writer's open transaction makes an administrator's REINDEX CONCURRENTLY wait with its copies made.
    writer = psycopg2.connect(db_dsn)
    admin = psycopg2.connect(db_dsn)
    admin.autocommit = True
    rebuild = threading.Thread(
        target=lambda: admin.cursor().execute("REINDEX TABLE CONCURRENTLY readings_20261101"), daemon=True
    )
    try:
        with writer.cursor() as cur:
            cur.execute(
                "INSERT INTO readings (device_id, metric_id, ts, value) "
                "SELECT id, metric_id_of('m'), '2026-11-01Z', 1 FROM devices"
            )
        rebuild.start()
        deadline = time.monotonic() + 120
        while not sql("SELECT 1 FROM pg_class WHERE relname ~ '^readings_20261101.*_ccnew'"):
            assert time.monotonic() < deadline, "the rebuild never started"
            time.sleep(0.05)
        assert sql(LEFT_BEHIND) == []
    finally:
        writer.rollback()
        writer.close()
        rebuild.join(120)
        admin.close()
    assert not rebuild.is_alive()
    assert sql("SELECT count(*) FROM pg_class WHERE relname ~ '_ccnew'") == [(0,)]
    # Once it is over, a copy left invalid is one cut short.
    sql(
        "INSERT INTO readings (device_id, metric_id, ts, value) "
        "SELECT id, metric_id_of(m), '2026-11-01Z', 1 FROM devices, "
        "unnest(array['n', 'o']) m"
    )
    with pytest.raises(psycopg2.errors.UniqueViolation):
        sql("CREATE UNIQUE INDEX CONCURRENTLY readings_20261101_natural_key_ccnew ON readings_20261101 (device_id)")
    assert sql(LEFT_BEHIND) == [("public.readings_20261101_natural_key_ccnew",)]


@pytest_twisted.ensureDeferred
async def test_a_closed_partition_is_packed_once_newest_first_and_keeps_every_reading(db_dsn, sql):
    from gateway.storage.partitions import upload_index

    for d in (1, 2, 3):
        sql(
            f"CREATE TABLE readings_2026110{d} PARTITION OF readings "
            f"FOR VALUES FROM ('2026-11-0{d}Z') TO ('2026-11-0{d + 1}Z')"
        )
        sql(upload_index(f"readings_2026110{d}"))  # as the gateway makes its partitions
    sql("CREATE TABLE readings_20990101 PARTITION OF readings FOR VALUES FROM ('2099-01-01Z') TO ('2099-01-02Z')")
    sql(upload_index("readings_20990101"))
    for i in range(40):
        add_pg_device(sql, f"truck-{i}")
    # As devices send them: time first, every device and metric at each second, so that each (device, metric)
    # grows at its own place in the natural key and its pages are split in halves.
    sql(
        "INSERT INTO readings (device_id, metric_id, ts, value) "
        "SELECT d.id, k.id, day + s * interval '1 second', s FROM devices d, "
        "(SELECT m, metric_id_of('m' || m) FROM generate_series(0, 3) m) k(m, id), "
        "generate_series(0, 299) s, unnest(array[timestamptz '2026-11-01Z', '2026-11-02Z', '2026-11-03Z', "
        "'2099-01-01Z']) day ORDER BY day, s, d.id, k.m"
    )
    sql("INSERT INTO readings_cold_ranges (lo, hi) VALUES ('2026-11-01Z', '2026-11-02Z')")  # folded: empty soon
    # A copy of an index that a rebuild cut short leaves behind: invalid (here: not unique), still updated.
    with pytest.raises(psycopg2.errors.UniqueViolation):
        sql("CREATE UNIQUE INDEX CONCURRENTLY readings_20261102_natural_key_ccnew ON readings_20261102 (device_id)")
    rows = "SELECT tableoid::regclass::text, device_id, metric_id, ts, value FROM readings ORDER BY 2, 3, 4"
    before = sql(rows)
    sizes = dict(sql("SELECT relname, pg_indexes_size(oid) FROM pg_class WHERE relname ~ '^readings_20'"))

    packer = Packer(reactor, 3600.0)
    await packer.connect(db_dsn)
    try:
        sql("SELECT pg_advisory_lock(%s)", (PACK_LOCK,))  # another gateway packing
        assert await packer.run_pass() is None
        sql("SELECT pg_advisory_unlock(%s)", (PACK_LOCK,))
        newest = await packer.run_pass()
        assert newest is not None and newest["partition"] == "readings_20261103"
        assert 0.9 * 40 * 4 * 300 <= newest["readings"] <= 1.1 * 40 * 4 * 300  # PostgreSQL's estimate
        assert newest["bytes_before"] == sizes["readings_20261103"]
        assert newest["bytes_after"] < 0.85 * newest["bytes_before"], newest
        assert (await packer.run_pass())["partition"] == "readings_20261102"
        assert await packer.run_pass() is None  # 1 November is folded, 2099 is open: nothing left to pack
    finally:
        await packer.pool.close()

    assert sql("SELECT count(*) FROM pg_class WHERE relname ~ '_ccnew'") == [(0,)]
    assert [lo.day for (lo,) in sql("SELECT lo FROM readings_packed ORDER BY lo")] == [2, 3]
    after = dict(sql("SELECT relname, pg_indexes_size(oid) FROM pg_class WHERE relname ~ '^readings_20'"))
    assert after["readings_20261101"] == sizes["readings_20261101"]
    assert after["readings_20990101"] == sizes["readings_20990101"]
    assert sql(rows) == before
    # The rebuilt indexes are still the partitions of the table's: the natural key holds and plans use them.
    attached = sql(
        "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE c.relkind = 'i' AND c.oid IN "
        "(SELECT indexrelid FROM pg_index WHERE indrelid = 'readings_20261103'::regclass)"
    )
    assert attached == [(2,)]  # the natural key and the upload order
    fill = sql(
        "SELECT c.relname, m.amname, c.reloptions FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_am m ON m.oid = c.relam WHERE i.indrelid IN ('readings_20261102'::regclass, "
        "'readings_20261103'::regclass, 'readings_20990101'::regclass) ORDER BY 1"
    )
    # Packed: the natural key's pages full, and the upload order read through BRIN alone (it has no pages to
    # fill), the open partition's btree on tx gone.
    brin = ["pages_per_range=32", "autosummarize=on"]
    assert [(name[len("readings_20261102_") :], am, options) for name, am, options in fill] == [
        ("device_id_metric_ts_key", "btree", ["fillfactor=100"]),
        ("tx_idx", "brin", brin),
        ("device_id_metric_ts_key", "btree", ["fillfactor=100"]),
        ("tx_idx", "brin", brin),
        ("device_id_metric_ts_key", "btree", None),
        ("tx_idx", "brin", brin),
        ("upload_tx", "btree", None),
    ], fill
    again = (
        "INSERT INTO readings (device_id, metric_id, ts, value) "
        "SELECT device_id, metric_id, ts, 0 FROM readings_20261103 "
        "LIMIT 10 ON CONFLICT (device_id, metric_id, ts) DO NOTHING RETURNING 1"
    )
    assert sql(again) == []
    assert packer.status()["packed_partitions"] == 2 and packer.status()["last_error"] == ""
    listed = {p["partition"]: p["packed"] for p in json.loads(gatewayctl("storage", "--json", "--db", db_dsn).stdout)}
    assert (listed["readings_20261101"], listed["readings_20261102"], listed["readings_20261103"]) == (
        False,
        True,
        True,
    )
    assert "indexes packed" in gatewayctl("storage", "--db", db_dsn).stdout
