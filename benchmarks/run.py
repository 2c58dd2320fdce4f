"""
txgateway side by side with the database's own limit and with the servers
users would otherwise write, in one run on one machine.

    pip install '.[bench]'            # and wrk, mosquitto (Debian: apt-get install wrk mosquitto)
    python benchmarks/run.py [--quick] [--json FILE] [--db DSN]

1. Database ceiling: the same rows inserted into the same schema with the
   gateway's own statement, 5,000 per statement, no network, no protocol,
   on 1, 2, 4 and 8 parallel connections: the best is the ceiling. COPY of
   the same rows on one connection is shown as a reference.
2. Baselines, written as a competent user would:
   a thread-pool TGP server committing each reading with psycopg2 before its
   ack (naive_tcp.py, driven by ``gatewayctl simulate`` like the gateway), and
   a Flask app under gunicorn's sync workers committing each request
   (naive_flask.py, plain HTTP: its TLS is not even counted), driven by
   ``wrk`` like the gateway's HTTPS.
   Mosquitto, the MQTT broker, driven by the same simulated MQTT devices
   as the gateway (one reading a message, QoS 1): its PUBACK comes from
   memory, the gateway's after COMMIT.
3. The gateway (``twistd -n gateway``): TGP over TCP and TLS (``gatewayctl
   simulate``, many devices, 100 readings a frame), HTTPS with 1 and with
   100 readings a request (``wrk``, 64 keep-alive connections), MQTT 5.0 at
   QoS 1 with 100 and with 1 reading a message (``gatewayctl simulate``),
   each at the most it acknowledges and then at about half of that:
   readings/s, ack latency p50/p99, gateway CPU seconds per million
   readings, RSS.
4. Connections: the gateway's RSS with 10,000 idle authenticated devices.
   Modbus: 1,000 slaves polled every second (modbus_poll.py): the share of
   the scheduled readings stored, gaps, poll time, CPU.
5. Uploader: readings/s delivered to a local HTTPS receiver from a backlog,
   and the catch-up time after the receiver was down for 60 s under steady
   ingest.

The load generators share the two cores with the gateway and PostgreSQL.
``--quick`` (under three minutes) runs shorter, with a shorter outage; the
full run takes under thirty. Without ``--db`` PostgreSQL is embedded, in a
temporary directory; with it, the server's role must be able to create
databases. ``--json`` writes every figure, flat keys first (``ceiling_rps``,
``tcp_rps``, ...), for comparison across commits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import psutil

from common import (
    idle,
    stop,
    BIN,
    CpuSplit,
    ROOT,
    Gateway,
    ceiling,
    drop_database,
    fresh_database,
    machine,
    raise_fd_limit,
    simulate,
    workspace,
)
import modbus_poll
from http_load import need_wrk, provision, wrk
from upload_load import Receiver, drain_rate, outage, stored

HERE = Path(__file__).resolve().parent
CONNECTIONS = 64  # HTTP keep-alive connections, for the gateway and for Flask alike
NAIVE_THREADS = 64  # the thread pool, one device each (PostgreSQL allows 100 connections)

TARGETS = {  # name: (figure, at least)
    "TCP >= 50% of the database ceiling": ("tcp_x_ceiling", 0.5),
    "TCP >= 20x the thread-pool server": ("tcp_x_naive", 20.0),
    "HTTPS 100/request >= 30% of the ceiling": ("https100_x_ceiling", 0.3),
    "HTTPS 1/request >= 3x Flask": ("https1_x_flask", 3.0),
    "MQTT 100/message >= 80% of TGP": ("mqtt100_x_tcp", 0.8),
    "MQTT 1/message >= 50% of Mosquitto's messages/s": ("mqtt1_x_mosquitto", 0.5),
}


def port_from(path: Path, proc: subprocess.Popen, what: str) -> int:
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.05)
    return int(path.read_text())


# -- baselines -----------------------------------------------------------------


def naive_tcp(tmp: Path, server_dsn: str, duration: float, devices: int) -> dict:
    dsn = fresh_database(server_dsn, "bench_naive")
    port_file = tmp / "naive.port"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "naive_tcp.py"), "--db", dsn, "--threads", str(devices),
         "--port-file", str(port_file)],
    )  # fmt: skip
    try:
        target = SimpleNamespace(data_dir=tmp / "naive", ports={"tcp": port_from(port_file, proc, "naive_tcp.py")})
        result = simulate(target, dsn, "tcp", devices, 0, duration, 100)
    finally:
        stop(proc)
    result["stored"] = stored(dsn)
    drop_database(server_dsn, "bench_naive")
    return result


def flask(tmp: Path, server_dsn: str, duration: float) -> dict:
    dsn = fresh_database(server_dsn, "bench_flask")
    tokens_file = tmp / "flask-tokens.txt"
    provision(dsn, CONNECTIONS, tokens_file)
    workers = 2 * (os.cpu_count() or 1) + 1  # gunicorn's own advice
    with socket.socket() as s:  # gunicorn takes a port number; let the kernel choose one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(BIN / "gunicorn"), "--workers", str(workers), "--worker-class", "sync", "--bind", f"127.0.0.1:{port}",
         "--backlog", "2048", "--chdir", str(HERE), "--log-level", "warning", "naive_flask:app"],
        env=dict(os.environ, GATEWAY_BENCH_DSN=dsn),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # up when it answers (405: the route exists, GET is not allowed)
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/readings", timeout=1)
            except urllib.error.HTTPError:
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("gunicorn did not start") from None
                time.sleep(0.1)
        result = wrk(f"http://127.0.0.1:{port}/v1/readings", tokens_file, 1, CONNECTIONS, duration, run=0)
    finally:
        stop(proc)
    result["workers"] = workers
    result["stored"] = stored(dsn)
    drop_database(server_dsn, "bench_flask")
    return result


@contextlib.contextmanager
def running_mosquitto(tmp: Path, settings: str = "") -> Iterator[int]:
    """Mosquitto on a loopback port (its config in ``tmp``, with ``settings`` added); yields the port."""
    for _attempt in range(5):  # a port the kernel had free a moment ago may be taken again: try another
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        conf = tmp / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 32\n"
            "max_queued_messages 100000\nlog_type error\n" + settings
        )
        proc = subprocess.Popen([need_mosquitto(), "-c", str(conf)], stderr=subprocess.DEVNULL)
        if _listening(port, proc):
            break
        stop(proc)
    else:
        raise SystemExit("mosquitto did not start")
    try:
        yield port
    finally:
        stop(proc)


def mosquitto(tmp: Path, server_dsn: str, duration: float, devices: int, batch: int) -> dict:
    """Mosquitto on this machine (its PUBACK is in memory), driven by the same simulated MQTT devices."""
    dsn = fresh_database(server_dsn, "bench_mosquitto")  # the simulator makes its device names there
    try:
        with running_mosquitto(tmp) as port:
            target = SimpleNamespace(data_dir=tmp / "mosquitto", ports={"mqtt": port})
            result = simulate(target, dsn, "mqtt", devices, 0, duration, batch)
    finally:
        drop_database(server_dsn, "bench_mosquitto")
    result["messages_per_s"] = result["rate"] / batch
    return result


def mqtt_source(tmp: Path, server_dsn: str, duration: float, devices: int, rate: float) -> dict:
    """
    The gateway consuming from Mosquitto ([[mqtt_source]], shared subscription, QoS 1, PUBACK after
    COMMIT): simulated devices publish 100 readings a message to the broker at ``rate`` readings/s for
    ``duration`` s; the figure is what the gateway stored per second from the first message until it had
    stored every reading the broker acknowledged to the simulator (and more: those of messages still
    unacknowledged when the simulator stopped reach the gateway too), and how long it needed past the
    load's end.
    """

    def load(port: int, dsn: str) -> tuple[dict, int]:
        target = SimpleNamespace(data_dir=tmp / "source-sim", ports={"mqtt": port})
        result = simulate(target, dsn, "mqtt", devices, rate, duration, 100)
        return {"offered_rps": result["rate"], "published": result["acked"]}, result["acked"]

    return through_broker(tmp, server_dsn, "source", lambda port: ["--mqtt-source", f"mqtt://127.0.0.1:{port}"], load)


def through_broker(
    tmp: Path,
    server_dsn: str,
    name: str,
    options: Callable[[int], list[str]],
    load: Callable[[int, str], tuple[dict, int]],
) -> dict:
    """
    A gateway (``options(port)``: how it consumes from the broker) taking what ``load(port, dsn)`` publishes
    to Mosquitto; ``load`` gives its figures and the readings to wait for. The rate is what the gateway
    stored per second from the load's start until it had them all; with the CPU of the gateway, PostgreSQL,
    Mosquitto and the load per million readings.
    """
    dsn = fresh_database(server_dsn, f"bench_{name}")
    try:
        with running_mosquitto(tmp, "max_queued_messages 0\n") as port:
            gateway = Gateway(dsn, tmp / f"gw-{name}", *options(port))
            process = psutil.Process(gateway.proc.pid)
            try:
                time.sleep(1)  # subscribed: a loopback broker answers in milliseconds
                cpu_before = sum(process.cpu_times()[:2])
                split = CpuSplit()
                started = time.monotonic()
                figures, expected = load(port, dsn)
                ended = time.monotonic()
                deadline = ended + max(60.0, 10 * (ended - started))
                while (count := stored(dsn)) < expected and time.monotonic() < deadline:
                    time.sleep(0.1)
                drained = time.monotonic()
                cpu = sum(process.cpu_times()[:2]) - cpu_before
                others = split.spent()
            finally:
                gateway.stop()
    finally:
        drop_database(server_dsn, f"bench_{name}")
    return {
        **figures,
        "stored": count,
        "readings_per_s": count / (drained - started),
        "catch_up_s": drained - ended,
        "gateway_cpu_s_per_million": cpu / max(1, count) * 1e6,
        **{f"{k}_cpu_s_per_million": v / max(1, count) * 1e6 for k, v in others.items()},
    }


def need_mosquitto() -> str:
    found = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
    if found is None:
        raise SystemExit("the MQTT anchor needs mosquitto (Debian: apt-get install mosquitto)")
    return found


def _listening(port: int, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


# -- the gateway ---------------------------------------------------------------


class Measured:
    """A gateway process's CPU seconds across a run, and its RSS after it."""

    def __init__(self, gateway: Gateway) -> None:
        self.process = psutil.Process(gateway.proc.pid)

    def __call__(self, run, *args, **kw) -> dict:
        before = sum(self.process.cpu_times()[:2])
        result = run(*args, **kw)
        cpu = sum(self.process.cpu_times()[:2]) - before
        result["gateway_cpu_s_per_million"] = cpu / max(1, result["acked"]) * 1e6
        result["gateway_rss_mb"] = self.process.memory_info().rss / 2**20
        if "rate" in result:  # gatewayctl simulate's summary
            result["readings_per_s"] = result["rate"]
        return result


def settle(server_dsn: str) -> None:
    """Checkpoint between runs, so that no run pays for the WAL of the one before (needs superuser)."""
    import psycopg2

    try:
        conn = psycopg2.connect(server_dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CHECKPOINT")
        conn.close()
    except psycopg2.Error:
        pass


def on_fresh_gateway(tmp: Path, server_dsn: str, name: str, run, keep: bool = False) -> tuple[dict, str]:
    """``run(gateway, dsn, tokens_file, measured)`` on a new database and gateway; (its result, the database)."""
    dsn = fresh_database(server_dsn, f"bench_{name}")
    tokens_file = tmp / f"{name}-tokens.txt"
    provision(dsn, CONNECTIONS, tokens_file)
    settle(server_dsn)
    gateway = Gateway(dsn, tmp / f"gw-{name}")
    try:
        result = run(gateway, dsn, tokens_file, Measured(gateway))
    finally:
        gateway.stop()
    if not keep:
        drop_database(server_dsn, f"bench_{name}")
    return result, dsn


def gateway_runs(tmp: Path, server_dsn: str, args: argparse.Namespace, figures: dict) -> str:
    """
    Each transport at the most the gateway acknowledges, then at about half
    of it; each run on a new database and gateway, so that none is slowed by
    the vacuuming or the WAL of millions of rows from the one before. Returns
    the database of the TCP run, kept as the uploader's backlog.
    """

    def tgp(protocol: str, rate: float, batch: int = 100):
        return lambda gateway, dsn, _, measured: measured(
            simulate, gateway, dsn, protocol, args.devices, rate, args.duration, batch
        )

    def https(per_request: int, run: int, half_of: float | None = None):
        def go(gateway, dsn, tokens_file, measured):
            url = f"https://127.0.0.1:{gateway.ports['https']}/v1/readings"
            delay_ms = 0
            if half_of is not None:
                # Each connection waits after each answer; a 2 s probe tells how long answers
                # take at about that rate, and the wait is shortened by that much.
                cycle_ms = CONNECTIONS / (half_of / 2) * 1000
                probe = wrk(url, tokens_file, per_request, CONNECTIONS, 2, run + 10, round(cycle_ms))
                answer_ms = CONNECTIONS / max(1.0, probe["requests_per_s"]) * 1000 - round(cycle_ms)
                delay_ms = max(1, round(cycle_ms - max(0.0, answer_ms)))
            return measured(wrk, url, tokens_file, per_request, CONNECTIONS, args.duration, run, delay_ms)

        return go

    def pair(name: str, at_most, at_half, keep: bool = False) -> str:
        """``name`` at its most, then at about half of that (``at_half(result)`` makes that run): each on a
        new gateway; with --quick (a check that every figure comes out), both on one."""
        if args.quick:

            def both(gateway, dsn, tokens_file, measured):
                first = at_most(gateway, dsn, tokens_file, measured)
                return first, at_half(first)(gateway, dsn, tokens_file, measured)

            (figures[f"{name}_max"], figures[f"{name}_half"]), dsn = on_fresh_gateway(
                tmp, server_dsn, f"{name}_max", both, keep=keep
            )
            return dsn
        figures[f"{name}_max"], dsn = on_fresh_gateway(tmp, server_dsn, f"{name}_max", at_most, keep=keep)
        figures[f"{name}_half"], _ = on_fresh_gateway(tmp, server_dsn, f"{name}_half", at_half(figures[f"{name}_max"]))
        return dsn

    backlog = pair("tcp", tgp("tcp", 0), lambda most: tgp("tcp", most["rate"] / 2), keep=True)
    pair("tls", tgp("tls", 0), lambda most: tgp("tls", most["rate"] / 2))
    for run, n in enumerate((1, 100)):
        pair(f"https{n}", https(n, run), lambda most, n=n, run=run: https(n, run + 2, most["requests_per_s"]))
    for n in (100, 1):  # MQTT 5.0 at QoS 1 over TCP, as Mosquitto is driven below
        pair(f"mqtt{n}", tgp("mqtt", 0, n), lambda most, n=n: tgp("mqtt", most["rate"] / 2, n))
    return backlog


def uploader(tmp: Path, server_dsn: str, dsn: str, args: argparse.Namespace, figures: dict) -> None:
    receiver = Receiver(tmp / "receiver")
    try:
        figures["upload"] = drain_rate(tmp, dsn, receiver, stored(dsn))
    finally:
        receiver.stop()
    drop_database(server_dsn, "bench_tcp_max")
    settle(server_dsn)
    dsn = fresh_database(server_dsn, "bench_outage")
    receiver = Receiver(tmp / "receiver-outage")
    try:
        half = figures["tcp_max"]["rate"] / 2
        figures["outage"] = outage(tmp, dsn, receiver, half, args.outage, args.devices, args.steady)
    finally:
        receiver.stop()
    drop_database(server_dsn, "bench_outage")


# -- report --------------------------------------------------------------------


def flat(figures: dict) -> dict:
    """The figures compared across commits, as flat keys."""
    ceiling_rps = figures["ceiling"]["readings_per_s"]
    idle_tcp = next(i for i in figures["idle"] if i["protocol"] == "tcp")
    idle_mqtt = next(i for i in figures["idle"] if i["protocol"] == "mqtt")
    out = {
        "ceiling_rps": ceiling_rps,
        "ceiling_1_rps": figures["ceiling"]["by_connections"]["1"],
        "copy_rps": figures["ceiling"]["copy_readings_per_s"],
        "naive_tcp_rps": figures["naive_tcp"]["rate"],
        "flask_rps": figures["flask"]["readings_per_s"],
        "tcp_rps": figures["tcp_max"]["rate"],
        "tls_rps": figures["tls_max"]["rate"],
        "https1_rps": figures["https1_max"]["readings_per_s"],
        "https100_rps": figures["https100_max"]["readings_per_s"],
        "tcp_p50_ms": figures["tcp_half"]["p50_ms"],
        "tcp_p99_ms": figures["tcp_half"]["p99_ms"],
        "tcp_half_rps": figures["tcp_half"]["rate"],
        "tcp_cpu_s_per_million": figures["tcp_max"]["gateway_cpu_s_per_million"],
        "idle_conns": idle_tcp["connected"],
        "idle_rss_mb": idle_tcp["rss_mb"],
        "idle_mqtt_conns": idle_mqtt["connected"],
        "idle_mqtt_rss_mb": idle_mqtt["rss_mb"],
        "uploader_rps": figures["upload"]["rate"],
        "mqtt100_rps": figures["mqtt100_max"]["rate"],
        "mqtt1_rps": figures["mqtt1_max"]["rate"],
        "mqtt_p99_ms": figures["mqtt100_half"]["p99_ms"],
        "mosquitto1_rps": figures["mosquitto1"]["rate"],
        "mqtt_source_rps": figures["mqtt_source"]["readings_per_s"],
        "mqtt_source_catch_up_s": figures["mqtt_source"]["catch_up_s"],
        "modbus_completeness": figures["modbus"]["completeness"],
        "modbus_poll_p99_ms": figures["modbus"]["poll_p99_ms"],
        "outage_s": figures["outage"]["outage_s"],
        "catch_up_s": figures["outage"]["backlog_delivered_s"],
    }
    out["tcp_x_ceiling"] = out["tcp_rps"] / ceiling_rps
    out["tcp_x_naive"] = out["tcp_rps"] / out["naive_tcp_rps"]
    out["https100_x_ceiling"] = out["https100_rps"] / ceiling_rps
    out["https1_x_flask"] = out["https1_rps"] / out["flask_rps"]
    out["mqtt100_x_tcp"] = out["mqtt100_rps"] / out["tcp_rps"]
    out["mqtt1_x_mosquitto"] = out["mqtt1_rps"] / out["mosquitto1_rps"]
    return out


def targets(summary: dict, figures: dict) -> dict[str, bool]:
    met = {name: summary[key] >= least for name, (key, least) in TARGETS.items()}
    met["TCP ack p99 < 50 ms at half rate"] = summary["tcp_p99_ms"] < 50
    met["MQTT PUBACK p99 < 25 ms at half rate (100/message)"] = summary["mqtt_p99_ms"] < 25
    met["Modbus slaves polled every second: >= 99% of the scheduled readings"] = summary["modbus_completeness"] >= 0.99
    met["10,000 idle devices < 400 MB RSS"] = summary["idle_conns"] >= 10_000 and summary["idle_rss_mb"] < 400
    met["10,000 idle MQTT devices < 120 MB RSS"] = (
        summary["idle_mqtt_conns"] >= 10_000 and summary["idle_mqtt_rss_mb"] < 120
    )
    return met


def report(figures: dict, summary: dict) -> str:
    ceiling_rps = summary["ceiling_rps"]
    lines = [f"machine: {json.dumps(figures['machine'])}", ""]
    head = f"{'run':<40}{'readings/s':>12}{'x ceiling':>10}{'p50 ms':>8}{'p99 ms':>8}{'CPU s/M':>9}{'RSS MB':>8}"
    lines += [head + f"{'errors':>8}", "-" * (len(head) + 8)]

    def row(label: str, f: dict, errors: int | None = None) -> None:
        rps = f["readings_per_s"] if "readings_per_s" in f else f["rate"]
        cpu = f"{f['gateway_cpu_s_per_million']:>9.1f}" if "gateway_cpu_s_per_million" in f else f"{'':>9}"
        rss = f"{f['gateway_rss_mb']:>8.0f}" if "gateway_rss_mb" in f else f"{'':>8}"
        if errors is None:
            errors = sum(f["errors"].values()) if isinstance(f["errors"], dict) else f["errors"] + f["socket_errors"]
        lines.append(
            f"{label:<40}{rps:>12,.0f}{rps / ceiling_rps:>10.2f}{f['p50_ms']:>8.1f}{f['p99_ms']:>8.1f}{cpu}{rss}"
            f"{errors:>8}"
        )

    c = figures["ceiling"]
    for n, rps in c["by_connections"].items():
        label = f"database alone, {n} connection{'s' if n != '1' else ''}" + (
            " (ceiling)" if int(n) == c["connections"] else ""
        )
        lines.append(f"{label:<40}{rps:>12,.0f}{rps / ceiling_rps:>10.2f}")
    lines.append(
        f"{'reference: COPY, 1 connection':<40}{c['copy_readings_per_s']:>12,.0f}"
        f"{c['copy_readings_per_s'] / ceiling_rps:>10.2f}"
    )
    row(f"baseline: thread pool, TCP ({figures['naive_tcp']['devices']} dev)", figures["naive_tcp"])
    row(f"baseline: Flask+gunicorn, HTTP ({figures['flask']['workers']} w)", figures["flask"])
    row(f"anchor: Mosquitto, MQTT 1/message ({figures['devices']} dev)", figures["mosquitto1"])
    for key, label in (
        ("tcp", f"txgateway TGP/TCP ({figures['devices']} dev)"),
        ("tls", f"txgateway TGP/TLS ({figures['devices']} dev)"),
        ("https1", f"txgateway HTTPS, 1/request ({CONNECTIONS} conn)"),
        ("https100", f"txgateway HTTPS, 100/request ({CONNECTIONS} conn)"),
        ("mqtt100", f"txgateway MQTT, 100/message ({figures['devices']} dev)"),
        ("mqtt1", f"txgateway MQTT, 1/message ({figures['devices']} dev)"),
    ):
        row(label + " most", figures[f"{key}_max"])
        row(label + " half", figures[f"{key}_half"])
    lines.append("")
    lines.append(
        f"TCP: {summary['tcp_x_ceiling']:.2f}x the ceiling, {summary['tcp_x_naive']:.1f}x the thread-pool server; "
        f"HTTPS 100/request: {summary['https100_x_ceiling']:.2f}x the ceiling; "
        f"HTTPS 1/request: {summary['https1_x_flask']:.1f}x Flask"
    )
    lines.append(
        f"MQTT 100/message: {summary['mqtt100_x_tcp']:.2f}x TGP/TCP; MQTT 1/message: "
        f"{summary['mqtt1_x_mosquitto']:.2f}x Mosquitto's rate (its PUBACK in memory, ours after COMMIT)"
    )
    src = figures["mqtt_source"]
    lines.append(
        f"MQTT source (consuming from Mosquitto): {src['readings_per_s']:,.0f} readings/s stored of "
        f"{src['offered_rps']:,.0f} offered ({src['stored']:,} of {src['published']:,}; all stored "
        f"{src['catch_up_s']:.1f} s after the load ended; {src['gateway_cpu_s_per_million']:.1f} CPU s/M)"
    )
    mb = figures["modbus"]
    lines.append(
        f"Modbus polling: {mb['devices']:,} slaves every {mb['interval_s']:g} s: {mb['completeness']:.3f} of the "
        f"scheduled readings stored ({mb['readings_per_s']:,.0f}/s), gaps {mb['gaps'] or 'none'}, poll p50/p99 "
        f"{mb['poll_p50_ms']:.1f}/{mb['poll_p99_ms']:.1f} ms, gateway {mb['gateway_cpu_share']:.0%} of a core "
        f"({mb['gateway_cpu_s_per_thousand_polls']:.2f} CPU s per 1,000 polls), RSS {mb['rss_mb']:.0f} MB"
    )
    for i in figures["idle"]:
        lines.append(
            f"{i['connected']:,} idle {i['protocol'].upper()} devices (connected in {i['connect_s']:.0f} s): "
            f"gateway RSS {i['rss_mb']:.0f} MB ({i['kb_per_device']:.1f} KB each over {i['rss_before_mb']:.0f} MB)"
        )
    up, out = figures["upload"], figures["outage"]
    lines.append(
        f"uploader: {up['rate']:,.0f} readings/s from a backlog of {up['readings']:,} "
        f"({up['rate'] / summary['tcp_rps']:.2f}x the TCP ingest rate)"
    )
    lines.append(
        f"receiver down {out['outage_s']:.0f} s under {out['ingest_rate']:,.0f} readings/s of ingest: the "
        f"{out['owed_readings']:,} readings owed delivered {_seconds(out['backlog_delivered_s'])} after it came back; "
        f"lag under 10 s after {_seconds(out['lag_under_2_flush_s'])}"
    )
    lines.append("")
    for name, ok in figures["targets"].items():
        lines.append(f"{'met   ' if ok else 'MISSED'} {name}")
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs: under three minutes")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--db", help="PostgreSQL server DSN (default: embedded, in a temporary directory)")
    parser.add_argument("--duration", type=float, help="seconds per load run [full: 20, quick: 4]")
    parser.add_argument("--devices", type=int, default=100, help="simulated TGP devices [100]")
    parser.add_argument("--idle", type=int, default=10_000, help="idle devices held [10000]")
    parser.add_argument("--modbus", type=int, default=1000, help="Modbus slaves polled every second [1000]")
    parser.add_argument("--outage", type=float, help="seconds the upload receiver is down [full: 60, quick: 10]")
    parser.add_argument("--steady", type=float, help="seconds of ingest before the outage [full: 10, quick: 3]")
    args = parser.parse_args()
    defaults = (4.0, 10.0, 3.0) if args.quick else (20.0, 60.0, 10.0)
    for name, value in zip(("duration", "outage", "steady"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    need_wrk()
    need_mosquitto()
    if not (BIN / "twistd").exists() or not (BIN / "gunicorn").exists():
        raise SystemExit(f"install the benchmarks' needs first: pip install '{ROOT}[bench]'")
    fd_limit = raise_fd_limit()
    if fd_limit < max(args.idle, 2 * args.modbus) + 1000:
        raise SystemExit(
            f"--idle {args.idle}, --modbus {args.modbus}: the file-descriptor limit is {fd_limit}; raise the hard limit"
        )

    started = time.monotonic()
    with workspace(args.db) as (tmp, server_dsn):
        figures: dict = {
            "machine": {**machine(server_dsn), "fd_limit": fd_limit},
            "quick": args.quick,
            "duration_s": args.duration,
            "devices": args.devices,
        }
        figures["ceiling"] = ceiling(fresh_database(server_dsn, "bench_ceiling"), args.duration)
        drop_database(server_dsn, "bench_ceiling")
        settle(server_dsn)
        # One thread and one database connection per device, up to NAIVE_THREADS.
        figures["naive_tcp"] = naive_tcp(tmp, server_dsn, args.duration, min(NAIVE_THREADS, args.devices))
        settle(server_dsn)
        figures["flask"] = flask(tmp, server_dsn, args.duration)
        settle(server_dsn)
        figures["mosquitto1"] = mosquitto(tmp, server_dsn, args.duration, args.devices, 1)
        dsn = gateway_runs(tmp, server_dsn, args, figures)
        settle(server_dsn)
        # Offered at 80% of what the gateway's own MQTT listener took: a rate it should keep up with.
        offered = 0.8 * figures["mqtt100_max"]["rate"]
        figures["mqtt_source"] = mqtt_source(tmp, server_dsn, args.duration, args.devices, offered)
        settle(server_dsn)
        uploader(tmp, server_dsn, dsn, args, figures)
        settle(server_dsn)
        figures["modbus"] = modbus_poll.run(tmp, server_dsn, args.modbus, 1.0, args.duration)
        settle(server_dsn)
        dsn = fresh_database(server_dsn, "bench_idle")
        figures["idle"] = [
            idle(tmp, dsn, protocol, args.idle)
            for protocol in (("tcp", "mqtt") if args.quick else ("tcp", "tls", "mqtt"))
        ]
    figures["seconds"] = time.monotonic() - started
    summary = flat(figures)
    figures["targets"] = targets(summary, figures)
    print(report(figures, summary))
    print(f"\n({figures['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "machine": figures["machine"], **figures}, indent=2))


if __name__ == "__main__":
    main()
