"""
Vehicle trackers through the gateway, beside TGP in the same run.

    python benchmarks/trackers.py [--devices 1000] [--duration 20] [--idle 10000] [--db DSN] [--json FILE]

1. The most records a second the gateway answers from ``--devices``
   simulated Teltonika trackers (Codec 8, 10 records a packet, each record a
   position and three IO elements: nine readings), and the most readings a
   second from as many TGP devices (10 readings a frame), each on a fresh
   database; then the trackers at half their most: the answer's p50 and p99,
   beside TGP's at half of its most;
   then as many trackers over UDP (a datagram of 10 records, sent again
   unchanged until answered): records a second at most, and a check that
   every answered record is stored.
2. The gateway's RSS with ``--idle`` Teltonika trackers connected, each
   sending a record a minute.

Each run is ``gatewayctl simulate`` against ``twistd -n gateway``; the load
generator shares the cores with the gateway and PostgreSQL. ``--json``
writes every figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import psutil
import psycopg2

from common import Gateway, drop_database, fresh_database, idle, machine, raise_fd_limit, simulate, workspace


TELTONIKA = ("--teltonika", "tcp:0:interface=127.0.0.1", "--teltonika", "udp:0:interface=127.0.0.1")


def stored_records(dsn: str) -> int:
    """Records stored: one latitude each (every simulated record has a fix)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM readings r JOIN metrics m ON m.id = r.metric_id WHERE m.name = 'lat'")
            return cur.fetchone()[0]
    finally:
        conn.close()


def fresh(tmp: Path, server: str, name: str) -> tuple[Gateway, str]:
    dsn = fresh_database(server, name)
    return Gateway(dsn, tmp / f"gw-{name}", *TELTONIKA), dsn


def run(tmp: Path, server: str, name: str, protocol: str, devices: int, rate: float, seconds: float) -> dict:
    gateway, dsn = fresh(tmp, server, name)
    process = psutil.Process(gateway.proc.pid)
    try:
        before = process.cpu_times()
        result = simulate(gateway, dsn, protocol, devices, rate, seconds, 10)
        after = process.cpu_times()
        cpu = (after.user + after.system) - (before.user + before.system)
        result["gateway_cpu_s_per_million"] = cpu / max(1, result["acked"]) * 1e6
        result["gateway_rss_mb"] = process.memory_info().rss / 2**20
        if protocol.startswith("teltonika"):
            # Every answered record is stored (more may be: stored, but the answer was on its way at the end).
            result["stored_records"] = stored_records(dsn)
            if result["stored_records"] < result["acked"]:
                raise SystemExit(f"{protocol}: {result['acked']} records answered, {result['stored_records']} stored")
        return result
    finally:
        gateway.stop()
        drop_database(server, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000, help="trackers, and TGP devices [1000]")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of each run [20]")
    parser.add_argument("--idle", type=int, default=10_000, help="idle trackers for the RSS figure [10000]")
    parser.add_argument("--db", help="a PostgreSQL server DSN (default: an embedded one)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    raise_fd_limit()
    figures: dict = {}
    with workspace(args.db) as (tmp, server):
        figures["machine"] = machine(server)
        most = figures["teltonika_max"] = run(tmp, server, "trk_max", "teltonika", args.devices, 0, args.duration)
        tgp = figures["tgp_max"] = run(tmp, server, "trk_tgp", "tcp", args.devices, 0, args.duration)
        half = figures["teltonika_half"] = run(
            tmp, server, "trk_half", "teltonika", args.devices, most["rate"] / 2, args.duration
        )
        # The same number of TGP devices at half of their most, for the answers' p99 of a protocol without the
        # trackers' code: what the machine itself adds at this load.
        tgp_half = figures["tgp_half"] = run(tmp, server, "trk_tgp_half", "tcp", args.devices, tgp["rate"] / 2,
                                             args.duration)  # fmt: skip
        udp = figures["teltonika_udp_max"] = run(
            tmp, server, "trk_udp", "teltonika-udp", args.devices, 0, args.duration
        )
        print(
            f"{args.devices} Teltonika trackers: {most['rate']:,.0f} records/s at most ({most['rate'] * 9:,.0f} "
            f"readings/s); {args.devices} TGP devices: {tgp['rate']:,.0f} readings/s; at half the trackers' most: "
            f"answers p50 {half['p50_ms']} ms, p99 {half['p99_ms']} ms; TGP at half its most: p50 "
            f"{tgp_half['p50_ms']} ms, p99 {tgp_half['p99_ms']} ms"
        )
        print(
            f"{args.devices} Teltonika trackers over UDP: {udp['rate']:,.0f} records/s at most "
            f"({udp['rate'] / most['rate']:.2f} of TCP); {udp['acked']:,} answered, {udp['stored_records']:,} stored"
        )
        dsn = fresh_database(server, "trackers_idle")
        figures["idle"] = quiet = idle(tmp, dsn, "teltonika", args.idle, *TELTONIKA)
        drop_database(server, "trackers_idle")
        print(
            f"{quiet['connected']:,} idle trackers: gateway RSS {quiet['rss_mb']:.1f} MB "
            f"({quiet['kb_per_device']:.1f} KB a tracker)"
        )
    figures.update({
        "teltonika_records_per_s": most["rate"],
        "teltonika_readings_per_s": most["rate"] * 9,
        "tgp_readings_per_s": tgp["rate"],
        "teltonika_half_p99_ms": half["p99_ms"],
        "tgp_half_p99_ms": tgp_half["p99_ms"],
        "teltonika_udp_records_per_s": udp["rate"],
        "idle_trackers_rss_mb": quiet["rss_mb"],
    })  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
