"""
What a stored reading costs on disk, and what retention costs.

    python benchmarks/storage.py [--readings 1000000] [--db DSN] [--json FILE]

1. Bytes per reading, all indexes included, after ``--readings`` readings
   (100 devices × 10 metrics, one a second, in the gateway's own batches of
   5,000) are stored, and the rate they were stored at on one connection:
   in the schema before time partitions (version 7), in version 13 (the
   last with an index on (device_id, ts)), in 14, in 15 and in the current
   one, with the batch statement's check of the cold tier and without it.
   Measured after VACUUM, from pg_total_relation_size of readings, every
   partition and readings_arrivals. Schema 14 is the last that held each
   reading's metric name; 15 the last with an id, an arrival time and a
   btree entry for the upload order in every reading.
2. The cold tier: the same readings folded into one row per (device,
   metric, hour), as --compress-after does: bytes per reading there, the
   time the fold takes, and ``gatewayctl export``'s query over the folded
   readings against the same query over them while hot. Their values repeat
   (and compress); so the cold tier is measured again with whole hours of
   random values (10 devices × 10 metrics, one a second for an hour), which
   nothing compresses.
3. Retention: a day of those readings removed by dropping its partition,
   against the same rows removed by the chunked DELETE (5,000 a statement,
   as retention deletes what no partition drop can take).
4. Leaner hot rows: the same readings copied in the order they arrived
   into tables laid out as schema 11 had them (the upload order indexed on
   (tx, id)), as schema 13 had them (on tx alone: btree deduplication folds
   a transaction's rows into one entry), as schema 14 had them (no index on
   (device_id, ts)), as schema 15 had them (metric ids from the dictionary
   instead of names), with the natural key ordered (device, ts, metric), with
   no ``id`` column, with neither ``id`` nor ``received_at`` (an open
   partition now), with the upload order's btree replaced by a BRIN index
   (a packed partition now), and with no index for the upload order at all.
   Bytes per reading each, and again after the indexes are rebuilt (pages
   90% full, as PostgreSQL builds them, and full).
5. Packing (--pack-after): the current schema's partitions of section 1
   with their indexes rebuilt by REINDEX TABLE CONCURRENTLY and their btree
   on tx dropped, as the gateway does once a partition closes: bytes per
   reading after, and the seconds that takes per million readings.
6. The read API's page of a device's readings in time order, now (each
   metric's times from the natural key, merged) and as schema 13 read it
   (one scan of an index on (device_id, ts), made for the measurement):
   milliseconds for the first 100 readings and for 1,000 from the middle,
   for a device of section 1 (10 metrics) and for one with 200 metrics
   (500 readings each, on the next day); and for one metric of the first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import psycopg2

from common import drop_database, workspace
from gateway.api.read import READINGS
from gateway.cli.export import EXPORT_COLD_SQL, EXPORT_SQL
from gateway.outbound.retention import RETENTION_CHUNK, RETENTION_DELETE
from gateway.storage.cold import FOLD
from gateway.storage.packing import DROP_UPLOAD_INDEX, INDEXES_OF
from gateway.storage.partitions import upload_index
from gateway.storage import schema
from gateway.storage.queries import ADD_METRICS
from gateway.storage.writes import write_batch_sql

DEVICES, METRICS, BATCH = 100, 10, 5000
START = datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc)


def database_at(server_dsn: str, name: str, version: int) -> str:
    """A database with the schema up to ``version``."""
    drop_database(server_dsn, name)
    admin = psycopg2.connect(server_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    admin.close()
    dsn = psycopg2.extensions.make_dsn(server_dsn, dbname=name)
    conn = psycopg2.connect(dsn)
    schema.migrate(conn, upto=version)
    conn.close()
    return dsn


def partition_days(conn, days: int, version: int = schema.LATEST) -> None:
    """Day partitions for the readings stored (the gateway makes them ahead; here the range is known)."""
    with conn.cursor() as cur:
        for d in range(days):
            lo = START + datetime.timedelta(days=d)
            cur.execute(
                f"CREATE TABLE readings_{lo:%Y%m%d} PARTITION OF readings FOR VALUES FROM (%s) TO (%s)",
                (lo, lo + datetime.timedelta(days=1)),
            )
            if version >= 16:
                cur.execute(upload_index(f"readings_{lo:%Y%m%d}"))
    conn.commit()


def legacy_batch_sql(cold_check: bool) -> str:
    """The batch statement of schemas 7 to 14, which stored each reading's metric name: today's without the lookup."""
    statement = write_batch_sql(cold_check)
    for now, then in (
        (
            "INSERT INTO readings (device_id, metric_id, ts, value)",
            "INSERT INTO readings (device_id, metric, ts, value)",
        ),
        ("u.device_id, k.id, u.ts, u.value FROM u LEFT JOIN metrics k ON k.name = u.metric", "* FROM u"),
        ("ORDER BY u.device_id, k.id, u.ts, u.n", "ORDER BY u.device_id, u.metric, u.ts, u.n"),
        ("ON CONFLICT (device_id, metric_id, ts)", "ON CONFLICT (device_id, metric, ts)"),
    ):
        assert now in statement, now
        statement = statement.replace(now, then)
    return statement.replace("SELECT * FROM u", "SELECT u.device_id, u.metric, u.ts, u.value FROM u")


def fill(conn, readings: int, cold_check: bool = True, version: int = schema.LATEST) -> float:
    """
    Store ``readings`` with the gateway's batch statement (as of schema 10: ``cold_check``; before 15: with metric
    names in every row); seconds taken.
    """
    statement = write_batch_sql(cold_check) if version >= 15 else legacy_batch_sql(cold_check)
    with conn.cursor() as cur:
        if version >= 15:  # the names in the dictionary, as the gateway adds them before a batch that has new ones
            cur.execute(ADD_METRICS, ([f"metric_{m}" for m in range(METRICS)],))
        cur.execute(
            "INSERT INTO devices (name, token_id, token_hash) SELECT 'd' || i, 't' || i, '\\x00' "
            "FROM generate_series(1, %s) i",
            (DEVICES,),
        )
        cur.execute("SELECT id FROM devices ORDER BY id")
        ids = [row[0] for row in cur.fetchall()]
    conn.commit()
    base = int(START.timestamp() * 1_000_000)
    started = time.perf_counter()
    n = 0
    while n < readings:
        size = min(BATCH, readings - n)
        k = range(n, n + size)
        # one reading a second per device and metric: reading k is second k // (DEVICES * METRICS)
        devices = [ids[i % DEVICES] for i in k]
        metrics = [f"metric_{(i // DEVICES) % METRICS}" for i in k]
        ts = [base + (i // (DEVICES * METRICS)) * 1_000_000 for i in k]
        with conn.cursor() as cur:
            cur.execute(statement, (devices, metrics, ts, [20.0 + (i % 97) / 10 for i in k]))
        conn.commit()
        n += size
    return time.perf_counter() - started


def size_of_readings(conn) -> int:
    """Bytes of readings, its partitions and (from schema 16) their arrivals, one row per transaction."""
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE readings")
        cur.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "WHERE c.oid = 'readings'::regclass OR c.oid = to_regclass('readings_arrivals') OR c.oid IN "
            "(SELECT inhrelid FROM pg_inherits WHERE inhparent = 'readings'::regclass)"
        )
        size = cur.fetchone()[0]
    conn.autocommit = False
    return int(size)


def packed(conn, readings: int, size: int) -> dict:
    """
    The partitions packed as --pack-after packs them (fillfactor 100, REINDEX TABLE CONCURRENTLY): bytes after,
    time taken.
    """
    conn.autocommit = True
    started = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'readings'::regclass AND c.relname <> 'readings_default'"
        )
        for (name,) in cur.fetchall():
            cur.execute(INDEXES_OF, (f'"{name}"',))
            for (index,) in cur.fetchall():
                cur.execute(f"ALTER INDEX {index} SET (fillfactor = 100)")
            cur.execute(f'REINDEX TABLE CONCURRENTLY "{name}"')
            cur.execute(DROP_UPLOAD_INDEX.format(name=name))
            cur.execute(f'ANALYZE "{name}"')
    seconds = time.perf_counter() - started
    conn.autocommit = False
    after = size_of_readings(conn)
    return {
        "bytes_per_reading_before": size / readings,
        "bytes_per_reading": after / readings,
        "seconds_per_million": seconds / readings * 1e6,
    }


def export_seconds(conn, sql: str) -> tuple[float, int]:
    """gatewayctl export's query, every row fetched through a named cursor as the command does."""
    started = time.perf_counter()
    with conn.cursor(name="bench_export") as cur:
        cur.itersize = 10_000
        cur.execute(sql, {"device": None, "since": None, "until": None})
        count = sum(1 for _ in cur)
    conn.rollback()
    return time.perf_counter() - started, count


def cold_tier(conn, readings: int, days: int) -> dict:
    """Fold every partition into the cold tier; its bytes per reading and export time against the hot ones."""
    hot_export, hot_count = export_seconds(conn, EXPORT_SQL)
    started = time.perf_counter()
    with conn.cursor() as cur:
        for d in range(days):
            cur.execute(FOLD.format(name=f"readings_{START + datetime.timedelta(days=d):%Y%m%d}"))
            cur.execute(f"TRUNCATE readings_{START + datetime.timedelta(days=d):%Y%m%d}")
    conn.commit()
    fold_s = time.perf_counter() - started
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE readings_cold")
        cur.execute("SELECT pg_total_relation_size('readings_cold'), (SELECT count(*) FROM readings_cold)")
        size, rows = cur.fetchone()
    conn.autocommit = False
    cold_export, cold_count = export_seconds(conn, EXPORT_COLD_SQL)
    assert hot_count == cold_count == readings, (hot_count, cold_count)
    return {
        "bytes_per_reading": size / readings,
        "rows": rows,
        "fold_readings_per_s": readings / fold_s,
        "export_hot_s": hot_export,
        "export_cold_s": cold_export,
        "export_cold_x_hot": cold_export / hot_export,
    }


def cold_noise(server_dsn: str) -> dict:
    """The cold tier's cost for values nothing compresses: whole hours of random values at one a second."""
    dsn = database_at(server_dsn, "bench_storage_noise", schema.LATEST)
    conn = psycopg2.connect(dsn)
    count = 10 * 10 * 3600
    try:
        partition_days(conn, 2)
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO devices (name, token_id, token_hash) SELECT 'd' || i, 't' || i, '\\x00' "
                "FROM generate_series(1, 10) i"
            )
            cur.execute(
                "INSERT INTO readings (device_id, metric_id, ts, value) "
                "SELECT d.id, k.id, %s + s * interval '1 second', 20 + random() * 10 "
                "FROM devices d, generate_series(0, 3599) s, "
                "(SELECT metric_id_of('metric_' || m) FROM generate_series(0, 9) m) k(id)",
                (START,),
            )
        conn.commit()
        hot = size_of_readings(conn)
        out = {"readings": count, "hot_bytes_per_reading": hot / count, **cold_tier(conn, count, 2)}
    finally:
        conn.close()
        drop_database(server_dsn, "bench_storage_noise")
    return out


# Leaner layouts of the hot table (section 4): (name, columns, indexes), each filled from readings in arrival order.
LEAN_LAYOUTS = (
    (
        "schema_11",
        "tx xid8, id bigint, ts timestamptz, value float8, received_at timestamptz, device_id integer, metric text",
        ("UNIQUE (device_id, metric, ts)", "(tx, id)", "(device_id, ts)"),
    ),
    (
        "schema_13",
        "tx xid8, id bigint, ts timestamptz, value float8, received_at timestamptz, device_id integer, metric text",
        ("UNIQUE (device_id, metric, ts)", "(tx)", "(device_id, ts)"),
    ),
    (
        "schema_14",
        "tx xid8, id bigint, ts timestamptz, value float8, received_at timestamptz, device_id integer, metric text",
        ("UNIQUE (device_id, metric, ts)", "(tx)"),
    ),
    (
        "key_device_ts_metric",
        "tx xid8, id bigint, ts timestamptz, value float8, received_at timestamptz, device_id integer, metric text",
        ("UNIQUE (device_id, ts, metric)", "(tx)"),
    ),
    (
        "schema_15",
        "tx xid8, id bigint, ts timestamptz, value float8, received_at timestamptz, device_id integer, metric integer",
        ("UNIQUE (device_id, metric, ts)", "(tx)"),
    ),
    (
        "no_id",
        "tx xid8, ts timestamptz, value float8, received_at timestamptz, device_id integer, metric integer",
        ("UNIQUE (device_id, metric, ts)", "(tx)"),
    ),
    (
        "no_id_no_received_at",
        "tx xid8, ts timestamptz, value float8, device_id integer, metric integer",
        ("UNIQUE (device_id, metric, ts)", "(tx)"),
    ),
    (
        "brin_upload_index",
        "tx bigint, ts timestamptz, value float8, device_id integer, metric integer",
        ("UNIQUE (device_id, metric, ts)", "USING brin (tx) WITH (pages_per_range = 32)"),
    ),
    (
        "no_upload_index",
        "tx bigint, ts timestamptz, value float8, device_id integer, metric integer",
        ("UNIQUE (device_id, metric, ts)",),
    ),
)
# How each layout's columns are made from today's readings (r) and their arrivals (a).
LEAN_VALUES = {
    "id": "row_number() OVER ()",
    "received_at": "a.received_at",
    "tx xid8": "r.tx::text::xid8",
    "metric text": "m.name",
    "metric integer": "r.metric_id",
}


def lean_layouts(conn, readings: int) -> dict:
    """Bytes per reading of the hot table laid out as LEAN_LAYOUTS says, indexes made before the rows came."""
    out = {}
    with conn.cursor() as cur:
        for name, columns, indexes in LEAN_LAYOUTS:
            cur.execute(f"CREATE TABLE lean_{name} ({columns})")
            for n, index in enumerate(indexes):
                unique, cols = ("UNIQUE ", index[len("UNIQUE ") :]) if index.startswith("UNIQUE") else ("", index)
                cur.execute(f"CREATE {unique}INDEX lean_{name}_{n} ON lean_{name} {cols}")
            made = [
                f"{LEAN_VALUES.get(c, LEAN_VALUES.get(c.split()[0], 'r.' + c.split()[0]))} AS {c.split()[0]}"
                for c in columns.split(", ")
            ]
            values = ", ".join(made)
            key = indexes[0][len("UNIQUE (") : -1]  # the natural key's columns, named as the layout names them
            # In arrival order, a transaction's rows at a time sorted by the natural key, as the batch statement
            # stores them.
            cur.execute("SELECT tx FROM readings_arrivals ORDER BY 1")
            for (tx,) in cur.fetchall():
                cur.execute(
                    f"INSERT INTO lean_{name} SELECT * FROM (SELECT {values} FROM readings r "
                    "JOIN metrics m ON m.id = r.metric_id JOIN readings_arrivals a ON a.tx = r.tx "
                    f"WHERE r.tx = %s) s ORDER BY {key}",
                    (tx,),
                )
        conn.commit()
        conn.autocommit = True
        for name, _, indexes_of in LEAN_LAYOUTS:
            cur.execute(f"VACUUM ANALYZE lean_{name}")
            cur.execute(f"SELECT pg_total_relation_size('lean_{name}'), pg_relation_size('lean_{name}')")
            total, heap = cur.fetchone()
            cur.execute(
                "SELECT i.indexrelid::regclass::text, pg_relation_size(i.indexrelid) FROM pg_index i "
                "WHERE i.indrelid = %s::regclass ORDER BY 1",
                (f"lean_{name}",),
            )
            indexes = {index: size / readings for index, size in cur.fetchall()}
            # Its indexes built again in one pass, as a closed partition's are: pages 90% full (PostgreSQL's
            # default), then full.
            cur.execute(f"REINDEX TABLE lean_{name}")
            cur.execute(f"SELECT pg_total_relation_size('lean_{name}')")
            reindexed = cur.fetchone()[0]
            for n, index in enumerate(indexes_of):
                if "USING" not in index:  # a btree
                    cur.execute(f"ALTER INDEX lean_{name}_{n} SET (fillfactor = 100)")
            cur.execute(f"REINDEX TABLE lean_{name}")
            cur.execute(f"SELECT pg_total_relation_size('lean_{name}')")
            out[name] = {
                "bytes_per_reading": total / readings,
                "heap_bytes_per_reading": heap / readings,
                "index_bytes_per_reading": indexes,
                "reindexed_bytes_per_reading": reindexed / readings,
                "reindexed_full_bytes_per_reading": cur.fetchone()[0] / readings,
            }
            cur.execute(f"DROP TABLE lean_{name}")
        conn.autocommit = False
    return out


# The read API's page as schema 13 read it, from an index on (device_id, ts) (names from the dictionary, as now).
READINGS_SCHEMA_13 = """
SELECT metric, (extract(epoch FROM ts) * 1000000)::bigint, value
FROM (SELECT k.name AS metric, r.ts, r.value, r.device_id FROM readings r JOIN metrics k ON k.id = r.metric_id) r
WHERE device_id = %(device)s
  AND (%(metric)s::text IS NULL OR metric = %(metric)s)
  AND (%(since)s::bigint IS NULL OR ts >= timestamptz 'epoch' + %(since)s * interval '1 microsecond')
  AND (%(until)s::bigint IS NULL OR ts < timestamptz 'epoch' + %(until)s * interval '1 microsecond')
  AND (%(after_ts)s::bigint IS NULL
       OR (ts, metric) > (timestamptz 'epoch' + %(after_ts)s * interval '1 microsecond', %(after_metric)s::text))
ORDER BY ts, metric
LIMIT %(limit)s
"""
MANY_METRICS, MANY_EACH = 200, 500


def read_pages(conn) -> dict:
    """Section 6: the read API's pages now and as schema 13 read them (milliseconds, median of 20)."""
    statement = write_batch_sql()
    with conn.cursor() as cur:
        cur.execute(ADD_METRICS, ([f"tag_{m}" for m in range(MANY_METRICS)],))
        cur.execute("INSERT INTO devices (name, token_id, token_hash) VALUES ('many', 'many', '\\x00') RETURNING id")
        many = cur.fetchone()[0]
        cur.execute("SELECT id FROM devices WHERE name = %s", (f"d{DEVICES // 2}",))
        ten = cur.fetchone()[0]
    next_day = int((START + datetime.timedelta(days=1)).timestamp() * 1_000_000)
    total = MANY_METRICS * MANY_EACH
    for first in range(0, total, BATCH):
        k = range(first, min(first + BATCH, total))
        with conn.cursor() as cur:
            cur.execute(
                statement,
                (
                    [many] * len(k),
                    [f"tag_{i % MANY_METRICS}" for i in k],
                    [next_day + (i // MANY_METRICS) * 1_000_000 for i in k],
                    [float(i) for i in k],
                ),
            )
        conn.commit()
    size_of_readings(conn)  # VACUUM ANALYZE, as autovacuum would have by the time anyone reads
    base = int(START.timestamp() * 1_000_000)
    cases = {
        "10_metrics_first_100": {"device": ten},
        "10_metrics_1000_from_the_middle": {"device": ten, "after_ts": base + 50_000_000, "limit": 1001},
        "1_metric_first_100": {"device": ten, "metric": "metric_3"},
        "200_metrics_first_100": {"device": many},
        "200_metrics_1000_from_the_middle": {
            "device": many,
            "after_ts": next_day + MANY_EACH // 2 * 1_000_000,
            "after_metric": "tag_150",
            "limit": 1001,
        },
    }
    blank = {"metric": None, "since": None, "until": None, "after_ts": None, "after_metric": None, "limit": 101}

    def median_ms(sql: str) -> dict:
        out, rows = {}, {}
        with conn.cursor() as cur:
            for case, given in cases.items():
                params = {**blank, **given}
                cur.execute(sql, params)
                rows[case] = cur.fetchall()
                times = []
                for _ in range(20):
                    started = time.perf_counter()
                    cur.execute(sql, params)
                    cur.fetchall()
                    times.append(time.perf_counter() - started)
                out[case] = sorted(times)[len(times) // 2] * 1000
        conn.rollback()
        return {"ms": out, "rows": rows}

    now = median_ms(READINGS)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE INDEX bench_device_time ON readings (device_id, ts)")
        cur.execute("ANALYZE readings")
    conn.autocommit = False
    before = median_ms(READINGS_SCHEMA_13)
    with conn.cursor() as cur:
        cur.execute("DROP INDEX bench_device_time")
    conn.commit()
    if now["rows"] != before["rows"]:
        raise SystemExit("section 6: the two page queries disagree")
    return {"now_ms": now["ms"], "schema_13_ms": before["ms"]}


def measure(server_dsn: str, readings: int) -> dict:
    out: dict = {"readings": readings}
    days = readings // (DEVICES * METRICS * 86400) + 1
    runs = (
        ("v7", 7, False),
        ("schema_13", 13, True),
        ("schema_14", 14, True),
        ("schema_15", 15, True),
        ("partitioned_no_cold_check", schema.LATEST, False),
        ("partitioned", schema.LATEST, True),
    )
    for label, version, cold_check in runs:
        dsn = database_at(server_dsn, f"bench_storage_{label}", version)
        conn = psycopg2.connect(dsn)
        try:
            if version >= 8:
                partition_days(conn, days + 1, version)
            seconds = fill(conn, readings, cold_check, version)
            size = size_of_readings(conn)
            out[label] = {"bytes_per_reading": size / readings, "fill_readings_per_s": readings / seconds}
            if label == "partitioned":
                out["packed"] = packed(conn, readings, size)
                out["lean"] = lean_layouts(conn, readings)
                out["cold"] = cold_tier(conn, readings, days + 1)
        finally:
            conn.close()
            drop_database(server_dsn, f"bench_storage_{label}")

    out["cold_noise"] = cold_noise(server_dsn)

    # Retention: the same day of readings, dropped whole or deleted in chunks.
    dsn = database_at(server_dsn, "bench_storage_retention", schema.LATEST)
    conn = psycopg2.connect(dsn)
    try:
        partition_days(conn, 2)
        fill(conn, readings)
        out["read_page"] = read_pages(conn)
        first_day = f"readings_{START:%Y%m%d}"
        with conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {first_day}")
            in_day = cur.fetchone()[0]
            # The other day's rows as a copy, to be deleted row by row from a table of its own.
            cur.execute(f"CREATE TABLE chunked AS SELECT * FROM {first_day}")
            cur.execute("CREATE UNIQUE INDEX ON chunked (device_id, metric_id, ts)")
            cur.execute("CREATE INDEX ON chunked USING brin (tx) WITH (pages_per_range = 32)")
        conn.commit()
        started = time.perf_counter()
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE {first_day}")
        conn.commit()
        drop_s = time.perf_counter() - started
        chunked_delete = RETENTION_DELETE.format(bound="").replace("FROM readings ", "FROM chunked ")
        assert chunked_delete.count("FROM chunked ") == 2, chunked_delete
        started = time.perf_counter()
        while True:
            with conn.cursor() as cur:
                # retention's statement (everything past the limit, no sink to wait for), on the copy
                cur.execute(chunked_delete, {"age": 0, "chunk": RETENTION_CHUNK})
                count = cur.rowcount
            conn.commit()
            if count < RETENTION_CHUNK:
                break
        delete_s = time.perf_counter() - started
    finally:
        conn.close()
        drop_database(server_dsn, "bench_storage_retention")
    out["retention"] = {
        "readings": in_day,
        "drop_s": drop_s,
        "delete_s": delete_s,
        "delete_x_drop": delete_s / drop_s,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readings", type=int, default=1_000_000, help="readings stored [1000000]")
    parser.add_argument("--db", help="PostgreSQL server DSN (default: embedded, in a temporary directory)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    with workspace(args.db) as (tmp, server_dsn):
        figures = measure(server_dsn, args.readings)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
