"""
What a stored reading costs on disk, and what retention costs.

    python benchmarks/storage.py [--readings 1000000] [--db DSN] [--json FILE]

1. Bytes per reading, all indexes included, after ``--readings`` readings
   (100 devices × 10 metrics, one a second, in the gateway's own batches of
   5,000) are stored: in the schema before time partitions (version 7) and
   in the current one. Measured after VACUUM, from pg_total_relation_size
   of readings and every partition.
2. Retention: a day of those readings removed by dropping its partition,
   against the same rows removed by the chunked DELETE (5,000 a statement,
   as retention deletes what no partition drop can take).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import psycopg2

from common import drop_database, workspace
from gateway.outbound.retention import RETENTION_CHUNK
from gateway.storage import schema
from gateway.storage.store import WRITE_BATCH

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


def partition_days(conn, days: int) -> None:
    """Day partitions for the readings stored (the gateway makes them ahead; here the range is known)."""
    with conn.cursor() as cur:
        for d in range(days):
            lo = START + datetime.timedelta(days=d)
            cur.execute(
                f"CREATE TABLE readings_{lo:%Y%m%d} PARTITION OF readings FOR VALUES FROM (%s) TO (%s)",
                (lo, lo + datetime.timedelta(days=1)),
            )
    conn.commit()


def fill(conn, readings: int) -> float:
    """Store ``readings`` with the gateway's batch statement; seconds taken."""
    with conn.cursor() as cur:
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
            cur.execute(WRITE_BATCH, (devices, metrics, ts, [20.0 + (i % 97) / 10 for i in k]))
        conn.commit()
        n += size
    return time.perf_counter() - started


def size_of_readings(conn) -> int:
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE readings")
        cur.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "WHERE c.oid = 'readings'::regclass OR c.oid IN "
            "(SELECT inhrelid FROM pg_inherits WHERE inhparent = 'readings'::regclass)"
        )
        size = cur.fetchone()[0]
    conn.autocommit = False
    return int(size)


def measure(server_dsn: str, readings: int) -> dict:
    out: dict = {"readings": readings}
    days = readings // (DEVICES * METRICS * 86400) + 1
    for label, version in (("v7", 7), ("partitioned", schema.LATEST)):
        dsn = database_at(server_dsn, f"bench_storage_{label}", version)
        conn = psycopg2.connect(dsn)
        try:
            if version >= 8:
                partition_days(conn, days + 1)
            seconds = fill(conn, readings)
            size = size_of_readings(conn)
        finally:
            conn.close()
            drop_database(server_dsn, f"bench_storage_{label}")
        out[label] = {"bytes_per_reading": size / readings, "fill_readings_per_s": readings / seconds}

    # Retention: the same day of readings, dropped whole or deleted in chunks.
    dsn = database_at(server_dsn, "bench_storage_retention", schema.LATEST)
    conn = psycopg2.connect(dsn)
    try:
        partition_days(conn, 2)
        fill(conn, readings)
        first_day = f"readings_{START:%Y%m%d}"
        with conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {first_day}")
            in_day = cur.fetchone()[0]
            # The other day's rows as a copy, to be deleted row by row from a table of its own.
            cur.execute(f"CREATE TABLE chunked AS SELECT * FROM {first_day}")
            cur.execute("CREATE INDEX ON chunked (tx, id)")
        conn.commit()
        started = time.perf_counter()
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE {first_day}")
        conn.commit()
        drop_s = time.perf_counter() - started
        started = time.perf_counter()
        while True:
            with conn.cursor() as cur:
                cur.execute(
                    "DELETE FROM chunked d USING (SELECT tx, id FROM chunked ORDER BY tx, id LIMIT %s) old "
                    "WHERE d.tx = old.tx AND d.id = old.id",
                    (RETENTION_CHUNK,),
                )
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
