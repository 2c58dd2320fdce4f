"""
Uploader throughput and recovery, against the TGP/TCP ingest rate of the
same machine in the same run.

1. TGP/TCP ingest, as fast as acknowledged (``gatewayctl simulate``): the
   rate the uploader must beat by 2x, and a backlog of stored readings.
2. A gateway started on that database with ``--upload-url`` to a local HTTPS
   receiver (another process: decompresses and counts): readings/s from
   start until the backlog is delivered.
3. Steady ingest at half the TCP rate while the receiver answers 503 for
   OUTAGE seconds: seconds from the end of the outage until every reading
   stored before it ended has been delivered, and until the lag is back
   under two flush intervals.

    python benchmarks/upload_load.py [--quick] [--json FILE] [--db DSN]
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg2

from common import BIN, Gateway, drop_database, fresh_database, machine, simulate, simulate_argv, workspace

FLUSH = 5.0


# -- the receiver (run as a subprocess: python upload_load.py --serve DIR) ----


def serve(where: Path) -> None:
    from twisted.internet import reactor, ssl
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from tests.certs import TestCA

    class Counter(Resource):
        isLeaf = True
        readings = batches = refused = 0
        keys: set[str] = set()

        def render_GET(self, request):
            return json.dumps({"readings": self.readings, "batches": self.batches, "refused": self.refused}).encode()

        def render_POST(self, request):
            if (where / "down").exists():
                self.refused += 1
                request.setResponseCode(503)
                return b"down for maintenance"
            key = request.getHeader("idempotency-key")
            lines = gzip.decompress(request.content.read()).count(b"\n")
            if key not in self.keys:  # what a receiver that honours Idempotency-Key counts
                self.keys.add(key)
                Counter.readings += lines
                Counter.batches += 1
            return b"{}"

    ca = TestCA()
    ca.write(where / "ca.pem")
    cert = ssl.PrivateCertificate.loadPEM(ca.issue("localhost", ("localhost", "127.0.0.1")))
    options = ssl.CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original)
    site = Site(Counter())
    site.log = lambda request: None
    port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
    (where / "port.tmp").write_text(str(port.getHost().port))
    (where / "port.tmp").replace(where / "port")
    reactor.run()


class Receiver:
    def __init__(self, where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.where = where
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(where)])
        while not (where / "port").exists():
            if self.proc.poll() is not None:
                raise SystemExit("the receiver did not start")
            time.sleep(0.05)
        self.port = int((where / "port").read_text())
        self.url = f"https://localhost:{self.port}/in"

    def stats(self) -> dict:
        with urllib.request.urlopen(self._request(), context=self._context(), timeout=10) as response:
            return json.loads(response.read())

    def _request(self) -> str:
        return f"https://localhost:{self.port}/stats"

    def _context(self):
        import ssl

        return ssl.create_default_context(cafile=str(self.where / "ca.pem"))

    def down(self, down: bool) -> None:
        flag = self.where / "down"
        flag.touch() if down else flag.unlink(missing_ok=True)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def stored(dsn: str) -> int:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM readings")
            return cur.fetchone()[0]
    finally:
        conn.close()


def lag_seconds(dsn: str) -> float:
    from gateway.uploader import STATUS, STATUS_FIELDS

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(STATUS)
            row = dict(zip(STATUS_FIELDS, cur.fetchone()))
            return row["lag_seconds"] or 0.0
    finally:
        conn.close()


def upload_args(receiver: Receiver) -> list[str]:
    return ["--upload-url", receiver.url, "--upload-ca", str(receiver.where / "ca.pem")]


def drain_rate(tmp: Path, dsn: str, receiver: Receiver, backlog: int) -> dict:
    """Start a gateway on a database holding ``backlog`` readings; time until all have arrived."""
    started = time.perf_counter()
    gateway = Gateway(dsn, tmp / "gw-upload", *upload_args(receiver))
    ready = time.perf_counter()
    try:
        first = 0
        while first == 0:  # the uploader starts at a random phase within its jitter
            first = receiver.stats()["readings"]
            time.sleep(0.01)
        began = time.perf_counter()
        while receiver.stats()["readings"] < backlog:
            time.sleep(0.05)
        done = time.perf_counter()
    finally:
        gateway.stop()
    return {
        "readings": backlog,
        "seconds": done - began,
        "rate": (backlog - first) / (done - began),
        "first_batch_s": began - ready,
        "start_s": ready - started,
    }


def outage(tmp: Path, dsn: str, receiver: Receiver, rate: float, seconds: float, devices: int, steady: float) -> dict:
    """Steady ingest; the receiver refuses everything for ``seconds``; time to catch up."""
    gateway = Gateway(dsn, tmp / "gw-outage", *upload_args(receiver))
    total = steady + seconds + 240  # long enough to catch up while ingest goes on
    sim = subprocess.Popen(simulate_argv(gateway, dsn, "tcp", devices, rate, total, 100), stdout=subprocess.DEVNULL)
    try:
        time.sleep(steady)
        receiver.down(True)
        time.sleep(seconds)
        owed = stored(dsn)  # everything stored before the outage ended
        receiver.down(False)
        ended = time.perf_counter()
        backlog_s = lag_ok_s = None
        while backlog_s is None or lag_ok_s is None:
            if time.perf_counter() - ended > total - steady - seconds:
                break
            now = time.perf_counter() - ended
            if backlog_s is None and receiver.stats()["readings"] >= owed:
                backlog_s = now
            if lag_ok_s is None and lag_seconds(dsn) < 2 * FLUSH:
                lag_ok_s = now
            time.sleep(0.25)
        refused = receiver.stats()["refused"]
    finally:
        sim.kill()
        sim.wait(30)
        gateway.stop()
    return {
        "ingest_rate": rate,
        "outage_s": seconds,
        "owed_readings": owed,
        "refused_requests": refused,
        "backlog_delivered_s": backlog_s,
        "lag_under_2_flush_s": lag_ok_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (5 s ingest, 10 s outage)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of TCP ingest at the most")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the receiver refuses")
    parser.add_argument("--steady", type=float, default=10.0, help="seconds of ingest before the outage")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--db", help="PostgreSQL server DSN (default: embedded, in a temporary directory)")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve))
        return
    if args.quick:
        args.duration, args.outage = 5.0, 10.0
    if not (BIN / "twistd").exists():
        raise SystemExit("install the project first: pip install -e '.[bench]'")

    with workspace(args.db) as (tmp, server_dsn):
        figures: dict = {"machine": machine(server_dsn)}
        dsn = fresh_database(server_dsn, "bench_upload")
        gateway = Gateway(dsn, tmp / "gw")
        try:
            figures["tcp_max"] = simulate(gateway, dsn, "tcp", args.devices, 0, args.duration)
        finally:
            gateway.stop()
        receiver = Receiver(tmp / "receiver")
        try:
            figures["upload"] = drain_rate(tmp, dsn, receiver, stored(dsn))
        finally:
            receiver.stop()
        drop_database(server_dsn, "bench_upload")
        dsn = fresh_database(server_dsn, "bench_outage")
        receiver = Receiver(tmp / "receiver-outage")
        try:
            half = figures["tcp_max"]["rate"] / 2
            figures["outage"] = outage(tmp, dsn, receiver, half, args.outage, args.devices, args.steady)
        finally:
            receiver.stop()

    tcp, up, out = figures["tcp_max"], figures["upload"], figures["outage"]
    print(f"machine: {figures['machine']}")
    print(f"TGP/TCP ingest, most acknowledged:   {tcp['rate']:>10,.0f} readings/s  (baseline, 1.00)")
    print(
        f"uploader, backlog of {up['readings']:,} readings: {up['rate']:>10,.0f} readings/s  "
        f"({up['rate'] / tcp['rate']:.2f}x the ingest rate)"
    )
    print(
        f"{out['outage_s']:.0f} s receiver outage under {out['ingest_rate']:,.0f} readings/s of ingest: "
        f"backlog of {out['owed_readings']:,} delivered {out['backlog_delivered_s']} s after it ended; "
        f"lag under {2 * FLUSH:.0f} s after {out['lag_under_2_flush_s']} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
