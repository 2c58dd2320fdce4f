"""
The gateway polling many Modbus/TCP slaves at once.

    python benchmarks/modbus_poll.py [--devices 1000] [--interval 1] [--duration 20] [--db DSN]

The slaves are ``tests/modbus_server.py`` in a process of their own: one
port each on 127.0.0.1, unit 1, five float32 values (ten holding
registers) and an input register. The gateway polls each every
``--interval`` seconds (two reads a poll). Figures, over ``--duration``
seconds after a warm-up of two intervals:

- completeness: readings stored with a time in the window ÷ the readings
  the schedule asks for (1.00: every slot of every device read);
- gaps by reason, from ``gatewayctl modbus status``;
- poll time p50/p99 across devices (first request to last answer, the last
  poll of each), and how evenly the polls spread over the interval (the
  busiest tenth of it holds this share of the first polls: 0.10 is even);
- the gateway's CPU seconds per thousand polls, and its RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg2

from common import BIN, ROOT, Gateway, drop_database, fresh_database, raise_fd_limit, workspace

METRICS = 6  # five float32 holding values and one input register


def slaves_spec(devices: int) -> dict:
    holding = {str(a): 0x4148 if a % 2 == 0 else 0 for a in range(10)}  # 12.5 as float32, big word order
    return {
        "servers": {f"m{i}": {"units": {"1": {"holding": holding, "input": {"0": i % 65536}}}} for i in range(devices)}
    }


def config(ports: dict[str, int], dsn: str, interval: float) -> str:
    lines = []
    for i in range(len(ports)):
        lines += [
            "[[modbus]]",
            f'device = "sim-{i}"',
            'host = "127.0.0.1"',
            f"port = {ports[f'm{i}']}",
            f"interval = {interval}",
            f"timeout = {min(2.0, interval * 0.9)}",
        ]
        for k in range(5):
            lines += ["[[modbus.register]]", f'metric = "v{k}"', f"address = {2 * k}", 'type = "float32"']
        lines += ["[[modbus.register]]", 'metric = "count"', "address = 0", 'kind = "input"']
    return "\n".join(lines) + "\n"


def provision(dsn: str, devices: int) -> None:
    from gateway.cli.simulate import provision_simulated

    conn = psycopg2.connect(dsn)
    try:
        provision_simulated(conn, devices)
    finally:
        conn.close()


def stored_between(dsn: str, start: float, end: float) -> int:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM readings WHERE ts >= to_timestamp(%s) AND ts < to_timestamp(%s)", (start, end)
            )
            return cur.fetchone()[0]
    finally:
        conn.close()


def statuses(dsn: str) -> list[dict]:
    out = subprocess.run(
        [str(BIN / "gatewayctl"), "modbus", "status", "--json", "--db", dsn], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def run(tmp: Path, server_dsn: str, devices: int, interval: float, duration: float) -> dict:
    dsn = fresh_database(server_dsn, "bench_modbus")
    spec = tmp / "modbus-slaves.json"
    spec.write_text(json.dumps(slaves_spec(devices)))
    slaves = subprocess.Popen(
        [sys.executable, "-m", "tests.modbus_server", str(spec)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        ports = json.loads(slaves.stdout.readline())
        provision(dsn, devices)
        path = tmp / "modbus.toml"
        path.write_text(config(ports, dsn, interval))
        gateway = Gateway(dsn, tmp / "gw-modbus", "--config", str(path))
        process = psutil.Process(gateway.proc.pid)
        try:
            time.sleep(2 * interval)  # every device's first poll falls in the first interval
            start = time.time()
            cpu_before = sum(process.cpu_times()[:2])
            slave_cpu_before = sum(psutil.Process(slaves.pid).cpu_times()[:2])
            time.sleep(duration)
            end = time.time()
            cpu = sum(process.cpu_times()[:2]) - cpu_before
            slave_cpu = sum(psutil.Process(slaves.pid).cpu_times()[:2]) - slave_cpu_before
            rss = process.memory_info().rss / 2**20
            # The window's last polls stored, and every device's state reported (every 5 s) since.
            deadline = time.time() + 30
            while True:
                status = statuses(dsn)
                fresh = all(s["reported_seconds_ago"] < time.time() - end - interval for s in status)
                if (fresh and len(status) == devices) or time.time() > deadline:
                    break
                time.sleep(0.5)
            stored = stored_between(dsn, start, end)
        finally:
            gateway.stop()
    finally:
        slaves.kill()
        slaves.wait()
        drop_database(server_dsn, "bench_modbus")
    expected = devices * METRICS * duration / interval
    gaps: dict[str, int] = {}
    for s in status:
        for reason, n in s["gaps_by_reason"].items():
            gaps[reason] = gaps.get(reason, 0) + n
    poll_times = [s["last_poll_seconds"] for s in status if s["last_poll_seconds"] is not None]
    polls = devices * duration / interval
    return {
        "devices": devices,
        "interval_s": interval,
        "duration_s": duration,
        "readings_expected": expected,
        "readings_stored": stored,
        "completeness": stored / expected,
        "readings_per_s": stored / duration,
        "gaps": gaps,
        "poll_p50_ms": percentile(poll_times, 50) * 1000,
        "poll_p99_ms": percentile(poll_times, 99) * 1000,
        "gateway_cpu_s_per_thousand_polls": cpu / polls * 1000,
        "gateway_cpu_share": cpu / duration,
        "slaves_cpu_share": slave_cpu / duration,
        "rss_mb": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000, help="Modbus slaves, one port each [1000]")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between two polls of a device [1]")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured [20]")
    parser.add_argument("--db", help="PostgreSQL server DSN (default: embedded, in a temporary directory)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    raise_fd_limit()
    with workspace(args.db) as (tmp, server_dsn):
        figures = run(tmp, server_dsn, args.devices, args.interval, args.duration)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
