"""
The gateway in a steady state: ingest at the most it acknowledges, with the
uploader and retention running, for a long time.

    python benchmarks/soak.py (--minutes M | --readings N) [--devices 100] [--retention 600]
                              [--no-upload] [--db DSN] [--json FILE]

Simulated TGP devices (``gatewayctl simulate``, 100 readings a frame) send
as fast as the gateway acknowledges; an upload receiver on loopback takes
every batch (``--no-upload``: no sink, to see what the uploader costs);
``--retention`` (10 minutes by default) removes what was sent.
The run is cut into tenths; for each it reports readings/s, ack latency
p99, the gateway's and PostgreSQL's RSS, and bytes on disk per reading
stored (readings and its partitions, indexes included). With ``--readings
N`` the length of a tenth is worked out from the rate of a short run
(``SIZING_S`` seconds) before the first, so that every tenth is as long.

Targets: the last tenth's rate at least 80% of the first's; its p99 at
most twice the first's; the gateway's RSS grown by less than 10%.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import psutil
import psycopg2

from common import Gateway, drop_database, fresh_database, simulate, workspace
from upload_load import Receiver, upload_args

SIZING_S = 10.0

DISK = """
SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c
WHERE c.oid = 'readings'::regclass OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'readings'::regclass)
"""


def database_figures(dsn: str) -> tuple[int, int]:
    """(bytes of readings on disk, readings stored now)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(DISK)
            size = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM readings")
            return int(size), cur.fetchone()[0]
    finally:
        conn.close()


def postgres_rss_mb(dsn: str) -> float:
    """Every PostgreSQL process's RSS (shared memory counted once per process: an upper bound)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            postmaster = psutil.Process(cur.fetchone()[0]).parent()  # while this backend lives
    finally:
        conn.close()
    total = 0
    for p in [postmaster, *postmaster.children()]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def run(
    tmp: Path,
    server_dsn: str,
    minutes: float | None,
    readings: int | None,
    devices: int,
    retention: float,
    upload: bool = True,
) -> dict:
    dsn = fresh_database(server_dsn, "bench_soak")
    receiver = Receiver(tmp / "soak-receiver")
    tenths = []
    try:
        sink = upload_args(receiver) if upload else []
        gateway = Gateway(dsn, tmp / "gw-soak", *sink, "--retention", str(int(retention)), "--partition", "1h")
        process = psutil.Process(gateway.proc.pid)
        try:
            tenth_s = (minutes or 0.0) * 6.0
            if readings is not None:  # the length, from the rate of a short run before the first tenth
                sizing = simulate(gateway, dsn, "tcp", devices, 0, SIZING_S, 100)
                tenth_s = max(1.0, (readings - sizing["acked"]) / 10 / max(1.0, sizing["rate"]))
            for i in range(10):
                result = simulate(gateway, dsn, "tcp", devices, 0, tenth_s, 100)
                size, count = database_figures(dsn)
                tenths.append(
                    {
                        "readings_per_s": result["rate"],
                        "acked": result["acked"],
                        "p99_ms": result["p99_ms"],
                        "gateway_rss_mb": process.memory_info().rss / 2**20,
                        "postgres_rss_mb": postgres_rss_mb(dsn),
                        "bytes_per_reading": size / max(1, count),
                        "readings_kept": count,
                        "received": receiver.stats()["readings"],
                    }
                )
                print(json.dumps({"tenth": i + 1, **tenths[-1]}), flush=True)
        finally:
            gateway.stop()
    finally:
        receiver.stop()
        drop_database(server_dsn, "bench_soak")
    first, last = tenths[0], tenths[-1]
    return {
        "tenths": tenths,
        "readings_acked": sum(t["acked"] for t in tenths),
        "last_x_first_rate": last["readings_per_s"] / first["readings_per_s"],
        "last_x_first_p99": last["p99_ms"] / first["p99_ms"],
        "gateway_rss_growth": last["gateway_rss_mb"] / first["gateway_rss_mb"] - 1,
        "targets": {
            "last tenth's rate >= 80% of the first's": last["readings_per_s"] >= 0.8 * first["readings_per_s"],
            "last tenth's p99 <= 2x the first's": last["p99_ms"] <= 2 * first["p99_ms"],
            "gateway RSS growth < 10%": last["gateway_rss_mb"] < 1.1 * first["gateway_rss_mb"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--minutes", type=float, help="length of the run")
    length.add_argument("--readings", type=int, help="readings to store (the length follows from the rate)")
    parser.add_argument("--devices", type=int, default=100, help="simulated TGP devices [100]")
    parser.add_argument("--retention", type=float, default=600, help="--retention of the gateway, seconds [600]")
    parser.add_argument("--no-upload", action="store_true", help="no sink: ingest and retention alone")
    parser.add_argument("--db", help="PostgreSQL server DSN (default: embedded, in a temporary directory)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    started = time.monotonic()
    with workspace(args.db) as (tmp, server_dsn):
        figures = run(
            tmp, server_dsn, args.minutes, args.readings, args.devices, args.retention, upload=not args.no_upload
        )
    figures["seconds"] = time.monotonic() - started
    for name, ok in figures["targets"].items():
        print(f"{'met   ' if ok else 'MISSED'} {name}")
    print(
        f"{figures['readings_acked']:,} readings; last/first tenth: rate {figures['last_x_first_rate']:.2f}x, "
        f"p99 {figures['last_x_first_p99']:.2f}x, gateway RSS {figures['gateway_rss_growth']:+.1%}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
