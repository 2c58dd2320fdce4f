"""
Commands through the gateway: round trip, sustained rate, and what they cost
ingest.

    python benchmarks/commands.py [--devices 1000] [--duration 20] [--db DSN] [--json FILE]

1. Round trip: ``--devices`` simulated devices connected over MQTT (5.0,
   QoS 1), then over TGP (version 3), each running what it is sent at once
   (``gatewayctl simulate --command-delay 0``); commands are POSTed to the
   HTTPS API (an operator token, keep-alive connections, a few a second to
   devices chosen at random) for ``--duration`` seconds. The round trip is
   from just before the POST to the time the ledger recorded the device's
   result (``command_events``, same machine, same clock): p50 and p99.
2. Ingest and commands together, over TGP with ``--ingest-devices`` (100): the most
   readings/s the gateway acknowledges alone; then readings at half that
   with commands POSTed as fast as ``--senders`` connections can: commands
   finished per second, and the readings/s ingest kept meanwhile; then
   readings at the most again while commands go at the rate of part 1, and
   alone once more: readings/s with command traffic against the mean of the
   two runs without, in the same run.

The load generators share the machine's cores with the gateway and
PostgreSQL. ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import ssl
import subprocess
import threading
import time
from pathlib import Path

import psycopg2

from common import BIN, Gateway, drop_database, fresh_database, machine, raise_fd_limit, simulate, workspace

ROUND_TRIP_RATE = 20.0  # commands a second in part 1 (and as background traffic in part 2)


class Sender:
    """POSTs commands to the HTTPS API on keep-alive connections, from threads; keeps when each was sent."""

    def __init__(self, gateway: Gateway, token: str, devices: int) -> None:
        self.port = gateway.ports["https"]
        self.context = ssl.create_default_context(cafile=str(gateway.data_dir / "tls" / "ca.crt"))
        self.context.check_hostname = False
        self.token = token
        self.devices = devices
        self.sent: dict[str, float] = {}  # id -> wall-clock time just before its POST
        self.refused = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.counter = 0

    def _connection(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=30)

    def _post(self, conn: http.client.HTTPSConnection, prefix: str) -> None:
        with self.lock:
            self.counter += 1
            id_ = f"{prefix}-{self.counter}"
        device = f"sim-{random.randrange(self.devices)}"
        body = json.dumps({"name": "bench", "params": {"n": self.counter}, "ttl": "5m", "id": id_})
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        started = time.time()
        conn.request("POST", f"/v1/devices/{device}/commands", body, headers)
        response = conn.getresponse()
        response.read()
        if response.status == 202:
            self.sent[id_] = started
        else:
            self.refused += 1

    def paced(self, rate: float, seconds: float, prefix: str) -> threading.Thread:
        def run() -> None:
            conn = self._connection()
            deadline = time.monotonic() + seconds
            next_at = time.monotonic()
            while time.monotonic() < deadline and not self.stop.is_set():
                self._post(conn, prefix)
                next_at += 1 / rate
                time.sleep(max(0.0, next_at - time.monotonic()))
            conn.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def flood(self, senders: int, seconds: float, prefix: str) -> list[threading.Thread]:
        def run() -> None:
            conn = self._connection()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not self.stop.is_set():
                self._post(conn, prefix)
            conn.close()

        threads = [threading.Thread(target=run, daemon=True) for _ in range(senders)]
        for t in threads:
            t.start()
        return threads


def finished(dsn: str, ids: list[str]) -> dict[str, tuple[str, float]]:
    """The ids' final states and when the ledger recorded them (epoch seconds)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT c.id, c.state, extract(epoch FROM e.at) FROM commands c JOIN command_events e "
                "ON e.command_id = c.id AND e.state = c.state "
                "WHERE c.id = ANY(%s) AND c.state IN ('succeeded', 'failed', 'expired', 'canceled')",
                (ids,),
            )
            return {id_: (state, float(at)) for id_, state, at in cur.fetchall()}
    finally:
        conn.close()


def settle(dsn: str, ids: list[str], timeout: float = 60.0) -> dict[str, tuple[str, float]]:
    deadline = time.monotonic() + timeout
    while True:
        done = finished(dsn, ids)
        if len(done) == len(ids) or time.monotonic() > deadline:
            return done
        time.sleep(0.5)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def simulator(gateway: Gateway, dsn: str, protocol: str, devices: int, rate: float, seconds: float) -> subprocess.Popen:
    argv = [
        str(BIN / "gatewayctl"), "simulate", "--db", dsn, "--data-dir", str(gateway.data_dir),
        "--target", f"localhost:{gateway.ports[protocol]}", "--protocol", protocol, "--devices", str(devices),
        "--rate", str(rate), "--duration", str(seconds), "--batch", "100", "--command-delay", "0", "--quiet",
        "--json",
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def summary_of(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"simulate failed: {err}")
    return json.loads(out)


def connected_wait(devices: int) -> float:
    return 2.0 + devices / 400  # the simulator connects 500 devices a second; the gateway answers each CONNECT


def round_trip(gateway: Gateway, dsn: str, token: str, protocol: str, devices: int, seconds: float) -> dict:
    warm = connected_wait(devices)
    sim = simulator(gateway, dsn, protocol, devices, devices / 10, warm + seconds + 5)
    time.sleep(warm)
    sender = Sender(gateway, token, devices)
    sender.paced(ROUND_TRIP_RATE, seconds, f"rt-{protocol}").join()
    ids = list(sender.sent)
    done = settle(dsn, ids)
    summary_of(sim)
    times = [(at - sender.sent[id_]) * 1000 for id_, (state, at) in done.items() if state == "succeeded"]
    return {
        "protocol": protocol,
        "devices": devices,
        "sent": len(ids),
        "succeeded": len(times),
        "refused": sender.refused,
        "p50_ms": round(percentile(times, 50), 2),
        "p99_ms": round(percentile(times, 99), 2),
    }


def ingest_with_commands(gateway: Gateway, dsn: str, token: str, seconds: float, senders: int, devices: int) -> dict:
    alone = simulate(gateway, dsn, "tcp", devices, 0, seconds)
    most = alone["rate"]
    # Half the most, with commands as fast as they go.
    sim = simulator(gateway, dsn, "tcp", devices, most / 2, seconds + 4)
    time.sleep(2)
    sender = Sender(gateway, token, devices)
    started = time.time()
    for t in sender.flood(senders, seconds, "flood"):
        t.join()
    half = summary_of(sim)
    done = settle(dsn, list(sender.sent))
    window = [at for state, at in done.values() if state == "succeeded" and at <= started + seconds]
    # The most again, with commands at the round trip's rate.
    sim = simulator(gateway, dsn, "tcp", devices, 0, seconds + 2)
    time.sleep(1)
    background = Sender(gateway, token, devices)
    background.paced(ROUND_TRIP_RATE, seconds, "bg").join()
    busy = summary_of(sim)
    settle(dsn, list(background.sent))
    # And alone again: the mean of the two runs alone, before and after, is what the run with commands is
    # compared with (a machine warming up or slowing down favours neither).
    again = simulate(gateway, dsn, "tcp", devices, 0, seconds)["rate"]
    alone_mean = (most + again) / 2
    return {
        "most_rps_alone": most,
        "most_rps_alone_after": again,
        "half_rps_target": round(most / 2, 1),
        "half_rps_with_flood": half["rate"],
        "flood_commands_per_s": round(len(window) / seconds, 1),
        "flood_commands_sent": len(sender.sent),
        "most_rps_with_commands": busy["rate"],
        "commands_per_s_background": ROUND_TRIP_RATE,
        "ingest_ratio_with_commands": round(busy["rate"] / alone_mean, 3) if alone_mean else None,
    }


def operator_token(dsn: str, data_dir: Path) -> str:
    out = subprocess.run(
        [str(BIN / "gatewayctl"), "token", "add", "bench", "--role", "operator", "--db", dsn, "--data-dir",
         str(data_dir)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000, help="connected devices in the round trip [1000]")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of each measured part [20]")
    parser.add_argument("--senders", type=int, default=8, help="connections POSTing commands in the flood [8]")
    parser.add_argument("--ingest-devices", type=int, default=100, help="TGP devices sending readings in part 2 [100]")
    parser.add_argument("--db", help="a PostgreSQL server DSN (default: an embedded one)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    raise_fd_limit()
    figures: dict = {}
    with workspace(args.db) as (tmp, server):
        figures["machine"] = machine(server)
        dsn = fresh_database(server, "gw_bench_commands")
        gateway = Gateway(dsn, tmp / "data")
        try:
            token = operator_token(dsn, gateway.data_dir)
            for protocol in ("mqtt", "tcp"):
                figures[f"round_trip_{protocol}"] = rt = round_trip(
                    gateway, dsn, token, protocol, args.devices, args.duration
                )
                print(
                    f"round trip over {protocol}, {rt['devices']} devices connected, {ROUND_TRIP_RATE:g} commands/s:"
                    f" p50 {rt['p50_ms']} ms, p99 {rt['p99_ms']} ms ({rt['succeeded']} of {rt['sent']})"
                )
            figures["ingest"] = ing = ingest_with_commands(
                gateway, dsn, token, args.duration, args.senders, args.ingest_devices
            )
            print(
                f"ingest alone {ing['most_rps_alone']:,.0f} readings/s; at half that, commands as fast as they "
                f"go: {ing['flood_commands_per_s']:,.1f} commands/s finished, ingest {ing['half_rps_with_flood']:,.0f}"
                f" readings/s; the most with {ROUND_TRIP_RATE:g} commands/s: {ing['most_rps_with_commands']:,.0f}"
                f" readings/s ({ing['ingest_ratio_with_commands']} of alone)"
            )
        finally:
            gateway.stop()
            drop_database(server, "gw_bench_commands")
    figures.update(
        {
            "round_trip_mqtt_p50_ms": figures["round_trip_mqtt"]["p50_ms"],
            "round_trip_mqtt_p99_ms": figures["round_trip_mqtt"]["p99_ms"],
            "round_trip_tcp_p50_ms": figures["round_trip_tcp"]["p50_ms"],
            "round_trip_tcp_p99_ms": figures["round_trip_tcp"]["p99_ms"],
            "flood_commands_per_s": figures["ingest"]["flood_commands_per_s"],
            "ingest_ratio_with_commands": figures["ingest"]["ingest_ratio_with_commands"],
        }
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
