"""
TGP ingest against the database ceiling, and the memory of idle devices.

    python benchmarks/tgp_load.py [--duration 10] [--devices 100] [--batch 100]
                                  [--idle 1000,10000] [--db DSN] [--json FILE]

In one run on one machine:

1. the database ceiling (one process, the gateway's schema and statement);
2. TGP over TCP at the most the gateway acknowledges (``gatewayctl simulate
   --rate 0``: every device keeps its window of frames in flight);
3. TGP over TCP at half that rate: ack latency p50/p99;
4. the gateway's RSS with N idle authenticated devices over TCP and over TLS.

The simulator runs on the same cores as the gateway and PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import psutil
from common import (
    Gateway,
    ceiling,
    drop_database,
    fresh_database,
    machine,
    raise_fd_limit,
    simulate,
    simulate_argv,
    workspace,
)


def idle_rss(gateway: Gateway, dsn: str, protocol: str, devices: int) -> dict:
    """Connect `devices` devices that send one reading a minute; the gateway's RSS once all are in."""
    process = psutil.Process(gateway.proc.pid)
    before = process.memory_info().rss
    sim = subprocess.Popen(
        simulate_argv(gateway, dsn, protocol, devices, rate=devices / 60, duration=600, batch=1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        connected = 0
        while time.monotonic() < deadline:
            port = gateway.ports[protocol]
            connected = sum(
                1
                for c in process.net_connections("tcp")
                if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
            )
            if connected >= devices:
                break
            time.sleep(1)
        time.sleep(5)  # handshakes finished, declarations acknowledged
        rss = process.memory_info().rss
    finally:
        sim.terminate()
        sim.wait(60)
    time.sleep(3)
    return {
        "devices": devices,
        "connected": connected,
        "rss_mb": rss / 2**20,
        "rss_before_mb": before / 2**20,
        "kb_per_device": (rss - before) / 1024 / max(1, connected),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--idle", default="1000,10000", help="idle device counts to measure RSS with ('' for none)")
    parser.add_argument("--db", help="PostgreSQL server DSN (default: embedded, in a temporary directory)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    fd_limit = raise_fd_limit()

    with workspace(args.db) as (tmp, server_dsn):
        figures: dict = {
            "machine": {**machine(server_dsn), "fd_limit": fd_limit},
            "ceiling": ceiling(fresh_database(server_dsn, "bench_ceiling"), args.duration),
        }
        dsn = fresh_database(server_dsn, "bench_gateway")
        gateway = Gateway(dsn, tmp / "gw")
        try:
            process = psutil.Process(gateway.proc.pid)
            cpu = sum(process.cpu_times()[:2])
            figures["tcp_max"] = simulate(gateway, dsn, "tcp", args.devices, 0, args.duration, args.batch)
            cpu = sum(process.cpu_times()[:2]) - cpu
            figures["tcp_max"]["gateway_cpu_s_per_million"] = cpu / max(1, figures["tcp_max"]["acked"]) * 1e6
            figures["tls_max"] = simulate(gateway, dsn, "tls", args.devices, 0, args.duration, args.batch)
        finally:
            gateway.stop()
        # Latency at half the rate, in a steady state: a fresh database and
        # gateway, not a server still vacuuming the millions of rows just written.
        half = figures["tcp_max"]["rate"] / 2
        drop_database(server_dsn, "bench_gateway")  # its autovacuum would compete with the next run
        dsn = fresh_database(server_dsn, "bench_gateway_half")
        gateway = Gateway(dsn, tmp / "gw")
        try:
            figures["tcp_half"] = simulate(gateway, dsn, "tcp", args.devices, half, args.duration, args.batch)
        finally:
            gateway.stop()
        figures["idle"] = []
        for count in [int(c) for c in args.idle.split(",") if c]:
            for protocol in ("tcp", "tls"):
                gateway = Gateway(dsn, tmp / "gw")  # a fresh process: RSS not inflated by the load runs
                try:
                    figures["idle"].append({"protocol": protocol, **idle_rss(gateway, dsn, protocol, count)})
                finally:
                    gateway.stop()

    ceiling_rps = figures["ceiling"]["readings_per_s"]
    print(f"machine: {figures['machine']}")
    print(f"{'run':<34}{'readings/s':>12}{'x ceiling':>11}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    print(f"{'database ceiling':<34}{ceiling_rps:>12,.0f}{1:>11.2f}")
    for key, label in (
        ("tcp_max", f"TGP/TCP, most acknowledged ({args.devices} dev)"),
        ("tls_max", f"TGP/TLS, most acknowledged ({args.devices} dev)"),
        ("tcp_half", "TGP/TCP at half of the TCP most"),
    ):
        f = figures[key]
        print(
            f"{label:<34}{f['rate']:>12,.0f}{f['rate'] / ceiling_rps:>11.2f}{f['p50_ms']:>9.1f}{f['p99_ms']:>9.1f}"
            f"{sum(f['errors'].values()):>8}"
        )
    print(
        f"gateway CPU seconds per million readings at the most: {figures['tcp_max']['gateway_cpu_s_per_million']:.1f}"
    )
    for idle in figures["idle"]:
        print(
            f"{idle['connected']:>6} idle {idle['protocol'].upper():<4} devices: gateway RSS {idle['rss_mb']:.0f} MB "
            f"({idle['kb_per_device']:.1f} KB each over {idle['rss_before_mb']:.0f} MB)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
