"""
The plant floor's protocols: OPC UA subscriptions and Sparkplug B.

    python benchmarks/plant.py [--items 10000] [--duration 20] [--devices 100] [--db DSN] [--json FILE]

1. OPC UA: the simulated server (``gatewayctl simulate --protocol opcua``,
   asyncua's server, a process of its own) changes ``--items`` Double tags
   every second, all in one source timestamp a round; the gateway monitors
   every one (one session; the nodes are the metrics of 100 devices; 1 s
   publishing, 1 s sampling). Each tag holds its round's number, so the readings with a
   source time in the ``--duration`` s window tell the rounds the server
   made (its share of the target rate) and the share of their values stored;
   notification-to-COMMIT p50/p99 (``gatewayctl opcua status``), the
   gateway's CPU per thousand values, and its RSS.
2. TGP with and without OPC UA in the gateway: TGP at its most (simulated
   devices, 100 readings a frame) against a gateway with no ``[[opcua]]``,
   then against one that also monitors ``--tgp-items`` tags changing every
   second: the cost of asyncua's thread to the reactor's transports.
3. Sparkplug B against MQTT JSON, both consumed from Mosquitto: simulated
   edge nodes publish DDATA of 100 metrics at QoS 1 as fast as the broker
   takes them, to a gateway that is the Sparkplug host application; then
   simulated devices publish the gateway's JSON, 100 readings a message, to
   a gateway with an ``--mqtt-source`` (``run.py``'s measure): readings a
   second stored, first message to last reading, and CPU per million.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import psycopg2

from common import BIN, Gateway, drop_database, fresh_database, machine, simulate, workspace
from modbus_poll import provision
from run import mqtt_source, through_broker
from upload_load import stored

NAMESPACE = "urn:txgateway:simulator"


def opcua_server(items: int) -> tuple[subprocess.Popen, str]:
    argv = [str(BIN / "gatewayctl"), "simulate", "--protocol", "opcua", "--target", "127.0.0.1:0"]
    proc = subprocess.Popen(
        [*argv, "--items", str(items), "--period", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("ready "):
        proc.kill()
        raise SystemExit(f"the OPC UA server did not start: {line!r}")
    return proc, line.split()[1]


def opcua_config(url: str, items: int, devices: int = 100) -> str:
    """One server, one session: ``items`` tags as the metrics of ``devices`` devices (sim-0 …)."""
    per = max(1, items // devices)
    lines = ["[[opcua]]", 'name = "bench"', f'endpoint = "{url}"', 'publishing = "1s"', 'sampling = "1s"']
    lines += ["queue-size = 10"]  # rounds that meet in one publish (a busy server) are all kept
    for i in range(items):
        lines += ["[[opcua.node]]", f'node = "nsu={NAMESPACE};s=Bench.Tag{i:05d}"', f'metric = "tag{i:05d}"']
        lines += [f'device = "sim-{i // per}"']
    return "\n".join(lines) + "\n"


def opcua_status(dsn: str) -> list[dict]:
    """What the gateway last reported of its OPC UA sessions (``gatewayctl opcua status`` reads the same rows)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status, extract(epoch FROM now() - updated_at) FROM opcua_sources")
            return [{**status, "reported_seconds_ago": float(age)} for status, age in cur.fetchall()]
    finally:
        conn.close()


def rounds_stored(dsn: str, start: float, end: float) -> tuple[int, int]:
    """The server's rounds with a source time in the window (every tag holds its round's number), and the
    readings stored of them."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT min(value), max(value), count(*) FROM readings "
                "WHERE ts >= to_timestamp(%s) AND ts < to_timestamp(%s)",
                (start, end),
            )
            low, high, count = cur.fetchone()
    finally:
        conn.close()
    return (int(high - low) + 1 if count else 0), count


def subscribed(dsn: str, timeout: float = 120) -> None:
    """Wait until values flow: the gateway has stored readings from its sessions."""
    deadline = time.monotonic() + timeout
    while stored(dsn) == 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"no OPC UA value was stored: {opcua_status(dsn)}")
        time.sleep(0.2)


def reported_since(dsn: str, since: float, timeout: float = 30) -> list[dict]:
    """The gateway's OPC UA status once it reported after ``since`` (a time.time())."""
    deadline = time.monotonic() + timeout
    while True:
        status = opcua_status(dsn)
        if all(time.time() - s["reported_seconds_ago"] > since for s in status) or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def opcua(tmp: Path, server_dsn: str, items: int, duration: float) -> dict:
    dsn = fresh_database(server_dsn, "bench_opcua")
    server, url = opcua_server(items)
    try:
        provision(dsn, 100)
        config = tmp / "opcua.toml"
        config.write_text(opcua_config(url, items))
        gateway = Gateway(dsn, tmp / "gw-opcua", "--config", str(config))
        process = psutil.Process(gateway.proc.pid)
        try:
            subscribed(dsn)
            time.sleep(2)  # the last subscriptions made (they are made one after another)
            cpu_before = sum(process.cpu_times()[:2])
            server_before = sum(psutil.Process(server.pid).cpu_times()[:2])
            start = time.time()
            time.sleep(duration)
            end = time.time()
            cpu = sum(process.cpu_times()[:2]) - cpu_before
            server_cpu = sum(psutil.Process(server.pid).cpu_times()[:2]) - server_before
            status = reported_since(dsn, end + 1)  # the window's values committed, and reported
            rounds, kept = rounds_stored(dsn, start, end)
            p99s = sorted(s["commit_p99_seconds"] for s in status if s["commit_p99_seconds"] is not None)
            rss = process.memory_info().rss / 2**20
        finally:
            gateway.stop()
    finally:
        server.kill()
        server.wait()
        drop_database(server_dsn, "bench_opcua")
    elapsed = end - start
    return {
        "items": items,
        "duration_s": duration,
        "rounds": rounds,
        "values_per_s": items * rounds / elapsed,
        "server_share_of_target": rounds / elapsed,
        "stored_share": kept / (items * rounds) if rounds else 0.0,
        "gaps": {r: n for s in status for r, n in s["gaps_by_reason"].items()},
        "commit_p99_ms": p99s[-1] * 1000 if p99s else None,
        "gateway_cpu_ms_per_thousand_values": cpu / max(1, kept) * 1e6,
        "gateway_cpu_share": cpu / elapsed,
        "server_cpu_share": server_cpu / elapsed,
        "rss_mb": rss,
    }


def tgp_beside_opcua(tmp: Path, server_dsn: str, items: int, duration: float, devices: int) -> dict:
    out = {}
    for label, with_opcua in (("without", False), ("with", True)):
        dsn = fresh_database(server_dsn, f"bench_tgp_{label}")
        server = None
        try:
            extra: list[str] = []
            if with_opcua:
                server, url = opcua_server(items)
                provision(dsn, devices)
                config = tmp / "tgp-opcua.toml"
                config.write_text(opcua_config(url, items, min(devices, 100)))
                extra = ["--config", str(config)]
            gateway = Gateway(dsn, tmp / f"gw-tgp-{label}", *extra)
            try:
                if with_opcua:
                    subscribed(dsn)
                result = simulate(gateway, dsn, "tcp", devices, 0, duration, 100)
            finally:
                gateway.stop()
        finally:
            if server is not None:
                server.kill()
                server.wait()
            drop_database(server_dsn, f"bench_tgp_{label}")
        out[label] = {"readings_per_s": result["rate"], "p99_ms": result["p99_ms"]}
    out["ratio"] = out["with"]["readings_per_s"] / out["without"]["readings_per_s"]
    out["opcua_items"] = items
    return out


def sparkplug(tmp: Path, server_dsn: str, duration: float, devices: int) -> dict:
    """Edge nodes publishing DDATA of 100 metrics at QoS 1 to Mosquitto, the gateway their host application."""
    config = tmp / "sparkplug.toml"

    def options(port: int) -> list[str]:
        config.write_text(
            "[[mqtt_source]]\n"
            f'name = "plant"\nurl = "mqtt://127.0.0.1:{port}"\nformat = "sparkplug"\nhost-id = "bench"\n'
            'device-name = "{device}"\n'
        )
        return ["--config", str(config)]

    def load(port: int, dsn: str) -> tuple[dict, int]:
        target = SimpleNamespace(data_dir=tmp / "sparkplug-sim", ports={"sparkplug": port})
        result = simulate_sparkplug(target, dsn, devices, duration)
        expected = result["readings"] + devices * 100  # and each device's DBIRTH
        return {"published": result["readings"], "expected": expected}, expected

    return through_broker(tmp, server_dsn, "sparkplug", options, load)


def simulate_sparkplug(target: SimpleNamespace, dsn: str, devices: int, duration: float) -> dict:
    argv = [
        str(BIN / "gatewayctl"), "simulate", "--db", dsn, "--data-dir", str(target.data_dir),
        "--target", f"127.0.0.1:{target.ports['sparkplug']}", "--protocol", "sparkplug", "--devices", str(devices),
        "--rate", "0", "--duration", str(duration), "--batch", "100", "--qos", "1", "--json",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"simulate --protocol sparkplug failed: {out.stderr}")
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000, help="OPC UA tags changing every second [10000]")
    parser.add_argument("--tgp-items", type=int, default=1000, help="OPC UA tags beside the TGP run [1000]")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured in each run [20]")
    parser.add_argument("--devices", type=int, default=100, help="TGP devices, and Sparkplug/MQTT devices [100]")
    parser.add_argument("--db", help="PostgreSQL server DSN (default: embedded, in a temporary directory)")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--sparkplug-only", action="store_true", help="only Sparkplug B against MQTT JSON")
    args = parser.parse_args()
    with workspace(args.db) as (tmp, server_dsn):
        figures = {"machine": machine(server_dsn)}
        if not args.sparkplug_only:
            figures["opcua"] = opcua(tmp, server_dsn, args.items, args.duration)
            figures["tgp_beside_opcua"] = tgp_beside_opcua(tmp, server_dsn, args.tgp_items, args.duration, args.devices)
        figures["sparkplug"] = sparkplug(tmp, server_dsn, args.duration, args.devices)
        figures["mqtt_json_source"] = mqtt_source(tmp, server_dsn, args.duration, args.devices, 0)
        figures["sparkplug_x_mqtt_json"] = (
            figures["sparkplug"]["readings_per_s"] / figures["mqtt_json_source"]["readings_per_s"]
        )
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    sys.exit(main())
