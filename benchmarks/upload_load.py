"""
The uploader under load: a local HTTPS receiver (a subprocess, ``python
upload_load.py --serve DIR``: decompresses, counts, honours Idempotency-Key,
answers 503 while DIR/down exists), the rate at which a backlog reaches it,
and the time to catch up after it was down.
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

import psutil
import psycopg2

from common import Gateway, simulate, simulate_argv

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
    from gateway.storage.sinkstatus import STATUS, STATUS_FIELDS

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


# -- a sink's drain of a stored backlog (benchmarks/kinesis.py, benchmarks/amqp.py) ----------


def sent(dsn: str, sink: str) -> int:
    """Readings the sink's ledger counts as sent."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT readings_sent FROM upload_sinks WHERE name = %s", (sink,))
            row = cur.fetchone()
            return row[0] if row else 0
    finally:
        conn.close()


def drain(gateway: Gateway, dsn: str, sink: str, backlog: int, count) -> dict:
    """Time from the first reading sent to the whole backlog, and the gateway's CPU for it."""
    process = psutil.Process(gateway.proc.pid)
    before = process.cpu_times()
    try:
        first = 0
        while first == 0:
            first = count()
            time.sleep(0.01)
        began = time.perf_counter()
        while count() < backlog:
            time.sleep(0.05)
        done = time.perf_counter()
        after = process.cpu_times()
    finally:
        gateway.stop()
    cpu = (after.user + after.system) - (before.user + before.system)
    return {
        "readings": backlog,
        "seconds": round(done - began, 3),
        "rate": round((backlog - first) / (done - began), 1),
        "gateway_cpu_s_per_million": round(cpu / backlog * 1e6, 3),
        "ledger_sent": sent(dsn, sink),
    }


def tgp_backlog(tmp: Path, dsn: str, devices: int, seconds: float) -> int:
    """Readings stored by TGP devices at the most the gateway takes for ``seconds``: a sink's backlog."""
    loader = Gateway(dsn, tmp / "gw-load")
    try:
        simulate(loader, dsn, "tcp", devices, 0, seconds, 100)
    finally:
        loader.stop()
    return stored(dsn)


def https_drain(tmp: Path, dsn: str, backlog: int) -> dict:
    """The backlog delivered by a gateway with the HTTPS sink to a local receiver (``drain``'s figures)."""
    receiver = Receiver(tmp / "receiver")
    try:
        gateway = Gateway(dsn, tmp / "gw-https", *upload_args(receiver))
        name = receiver.url.split("//")[1].split("/")[0]  # the sink's name from its URL: localhost:PORT
        return drain(gateway, dsn, name, backlog, lambda: receiver.stats()["readings"])
    finally:
        receiver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", required=True, help="serve, writing the port and CA into this directory")
    serve(Path(parser.parse_args().serve))


if __name__ == "__main__":
    main()
