"""
The fault soak: the gateway as users run it (``twistd -n gateway``, its
embedded PostgreSQL, an upload sink), under steady load from HTTPS and TGP
devices, with a fault injected at the start of every period:

1. ``gateway``     kill -9 of the gateway, started again at once (as systemd's
                   ``Restart=always`` would); its embedded PostgreSQL stays up
2. ``postmaster``  kill -9 of the embedded postmaster (the gateway restarts it)
3. ``pg-stop``     a fast shutdown of PostgreSQL, as ``pg_ctl stop -m fast`` does
                   (the gateway starts it again)
4. ``receiver``    the upload receiver killed, and started again after a while

The devices behave as SPEC.rst and the documentation tell firmware to: they measure
at a steady rate whatever happens, keep every reading until it is
acknowledged and send again what was not. Every acknowledgement is recorded.
At the end, after the load stops and the gateway has caught up, the record
is checked: every acknowledged reading is stored exactly once with the value
sent, nothing is stored that was never sent, and every acknowledged reading
reached the receiver at least once. The gateway's RSS and open file
descriptors are sampled at the end of every period.

    python benchmarks/faults.py [--minutes 30] [--every 60] [--rate N] [--json FILE]

The rate: first the TGP devices send as fast as they can for ``--calibrate``
seconds; the soak then runs at half of the rate they reached (``--rate``
sets it instead). The load clients share the machine with the gateway and
PostgreSQL. Exit status 0 means every check passed.
"""

from __future__ import annotations

import argparse
import collections
import collections.abc
import datetime
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.gatewayproc import GatewayProcess, gatewayctl, postmaster  # noqa: E402
from tests.loadclients import BASE_US, HTTPSDevice, TGPDevice  # noqa: E402

FAULTS = ("gateway", "postmaster", "pg-stop", "receiver")
LINE = re.compile(rb'^\{"device":"([^"]*)",.*?"ts":"([^"]*)"', re.M)  # the sink's NDJSON line, as the gateway writes it
STEP_US = 1000  # a device's readings are 1 ms apart: reading k has ts BASE_US + k * STEP_US
MAX_BACKLOG = 2_000_000  # readings a device keeps before it stops measuring (never reached in a sane run)


# -- devices that keep a compact record --------------------------------------


class Bitmap:
    """A growable set of small integers, one bit each."""

    def __init__(self) -> None:
        self.bits = bytearray()
        self.count = 0

    def add(self, k: int) -> bool:
        byte, bit = divmod(k, 8)
        if byte >= len(self.bits):
            self.bits.extend(bytes(max(byte + 1 - len(self.bits), len(self.bits))))
        if self.bits[byte] >> bit & 1:
            return False
        self.bits[byte] |= 1 << bit
        self.count += 1
        return True

    def __contains__(self, k: int) -> bool:
        byte, bit = divmod(k, 8)
        return byte < len(self.bits) and bool(self.bits[byte] >> bit & 1)

    def __iter__(self):
        for byte, value in enumerate(self.bits):
            if value:
                for bit in range(8):
                    if value >> bit & 1:
                        yield byte * 8 + bit


class Measuring:
    """
    Mixed into the test suite's load clients: readings are made at ``rate`` a
    second from the moment ``measure`` is called (or on demand before that),
    acknowledgements go into a bitmap rather than a set, and nothing grows
    with the length of the run but the bitmaps.
    """

    def measuring_init(self) -> None:
        self.backlog: collections.deque[int] = collections.deque()  # type: ignore[assignment]
        self.acked_bits = Bitmap()
        self.acked_total = 0  # readings acknowledged, counting a reading acknowledged twice twice
        self.made = 0  # readings k = 0 .. made-1 exist
        self.rate: float | None = None
        self.since = 0.0
        self.made_at_since = 0
        self.lost_to_full_buffer = 0

    def measure(self, rate: float) -> None:
        self.since, self.made_at_since, self.rate = time.monotonic(), self.made, rate

    def _make(self, n: int) -> None:
        room = MAX_BACKLOG - len(self.backlog)
        self.backlog.extend(range(self.made, self.made + min(n, room)))
        self.lost_to_full_buffer += max(0, n - room)
        self.made += n

    def take(self) -> list[int]:
        if self.rate is None:  # as fast as the gateway takes them
            self._make(max(0, self.per_send - len(self.backlog)))
        else:
            while True:
                due = self.made_at_since + int((time.monotonic() - self.since) * self.rate) - self.made
                self._make(due)
                if len(self.backlog) >= self.per_send or self.stopping.is_set():
                    break
                time.sleep(min(0.2, (self.per_send - len(self.backlog)) / self.rate))
            if not self.backlog:
                self._make(1)  # stopping: one more reading so that the caller has something to send
        n = min(self.per_send, len(self.backlog))
        return [BASE_US + self.backlog.popleft() * STEP_US for _ in range(n)]

    def give_back(self, batch: list[int]) -> None:
        self.backlog.extendleft((ts - BASE_US) // STEP_US for ts in reversed(batch))

    def got_ack(self, batch: list[int]) -> None:
        for ts in batch:
            self.acked_bits.add((ts - BASE_US) // STEP_US)
        self.acked_total += len(batch)
        self.ack_events += 1


class SoakTGP(Measuring, TGPDevice):
    window = 8

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.measuring_init()


class SoakHTTPS(Measuring, HTTPSDevice):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.measuring_init()


# -- the upload receiver, a process of its own ----------------------------------


def serve(where: Path) -> None:
    """Append each accepted batch (its Idempotency-Key and gzip body) to where/received; answer 200 after."""
    from twisted.internet import reactor, ssl
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    pem = (where / "server.pem").read_bytes()
    port = int((where / "port").read_text()) if (where / "port").exists() else 0
    out = (where / "received").open("ab")

    class Sink(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            body = request.content.read()
            key = (request.getHeader("idempotency-key") or "-").strip()
            out.write(f"{key} {len(body)}\n".encode() + body)
            out.flush()  # before the 200: a killed receiver has answered only what it wrote
            return b"{}"

    cert = ssl.PrivateCertificate.loadPEM(pem)
    options = ssl.CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original)
    site = Site(Sink())
    site.log = lambda request: None  # type: ignore[method-assign]
    listening = reactor.listenSSL(port, site, options, interface="127.0.0.1")
    if not port:
        (where / "port.tmp").write_text(str(listening.getHost().port))
        (where / "port.tmp").replace(where / "port")
    (where / "pid").write_text(str(os.getpid()))
    reactor.run()


class Receiver:
    """The receiver process: the same port and certificate at every start."""

    def __init__(self, where: Path) -> None:
        from tests.certs import TestCA

        where.mkdir(parents=True, exist_ok=True)
        self.where = where
        ca = TestCA()
        ca.write(where / "ca.pem")
        (where / "server.pem").write_bytes(ca.issue("localhost", ("localhost", "127.0.0.1")))
        self.proc: subprocess.Popen | None = None
        self.start()
        self.url = f"https://localhost:{(where / 'port').read_text()}/in"

    def start(self) -> None:
        (self.where / "pid").unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(self.where)], cwd=ROOT)
        deadline = time.monotonic() + 30
        while not (self.where / "pid").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the upload receiver did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def batches(self) -> collections.abc.Iterator[tuple[str, bytes]]:
        """Every batch written in full: (key, gzip body)."""
        with (self.where / "received").open("rb") as f:
            while True:
                head = f.readline()
                if not head.endswith(b"\n"):
                    return
                key, size = head.decode().split()
                body = f.read(int(size))
                if len(body) < int(size):
                    return  # cut short by a kill: never answered 200
                yield key, body


# -- the soak -----------------------------------------------------------------


class Gateway(GatewayProcess):
    """The gateway process; its output kept in a file across restarts."""

    def __init__(self, *args: Any, log: Path, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.log_path = log

    def start(self, *args: Any, **kw: Any) -> Gateway:
        self.save_log()
        super().start(*args, **kw)
        return self

    def save_log(self) -> None:
        if self.lines:
            with self.log_path.open("a") as f:
                f.writelines(self.lines)
            self.lines = []


def healthz(gw: GatewayProcess) -> tuple[int, dict]:
    import http.client
    import ssl

    context = ssl.create_default_context(cafile=gw.cert)
    context.check_hostname = False
    conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=context, timeout=10)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def wait_until(what, timeout: float, every: float = 0.25) -> float | None:
    """Seconds until ``what()`` was true, or None when it was not within ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if what():
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(every)
    return None


def healthy(gw: GatewayProcess) -> bool:
    return healthz(gw)[0] == 200


class Soak:
    def __init__(self, args: argparse.Namespace, where: Path) -> None:
        self.args = args
        self.where = where
        self.report: dict[str, Any] = {"minutes": args.minutes, "every_s": args.every, "faults": [], "samples": []}
        self.receiver = Receiver(where / "receiver")
        self.gw = Gateway(
            where / "gateway-data",
            "--device-rate",
            "0",
            "--upload-url",
            self.receiver.url,
            "--upload-ca",
            str(self.receiver.where / "ca.pem"),
            "--upload-flush",
            "1",
            # The receiver's outage is a third of a period at most: with the default cap (60 s) the first retry
            # after it could come past the period's end, so the catch-up it measures would be chance.
            "--upload-backoff-cap",
            str(max(1.0, args.every / 10)),
            cwd=where,
            log=where / "gateway.log",
        )
        self.devices: list[Measuring] = []
        self.db = None

    # -- setup and teardown --

    def start(self) -> None:
        gw = self.gw.start()
        names = ["tcp-1", "tcp-2", "tcp-3", "tls-1", "https-1", "https-2"]
        tokens = {n: gatewayctl("device", "add", n, data_dir=gw.data_dir).stdout.strip() for n in names}
        self.devices = [
            SoakTGP("tcp-1", tokens["tcp-1"], lambda: gw.tgp_port, per_send=500),
            SoakTGP("tcp-2", tokens["tcp-2"], lambda: gw.tgp_port, per_send=500),
            SoakTGP("tcp-3", tokens["tcp-3"], lambda: gw.tgp_port, per_send=500),
            SoakTGP("tls-1", tokens["tls-1"], lambda: gw.tgp_tls_port, cafile=gw.cert, per_send=500),
            SoakHTTPS("https-1", tokens["https-1"], lambda: gw.port, cafile=gw.cert, per_send=250),
            SoakHTTPS("https-2", tokens["https-2"], lambda: gw.port, cafile=gw.cert, per_send=250),
        ]

    def close(self) -> None:
        for d in self.devices:
            d.stop()
        try:
            self.gw.close()
        finally:
            self.gw.save_log()
            self.receiver.kill()

    # -- the run --

    def calibrate(self) -> float:
        """Readings/s the TGP devices reach sending as fast as they can."""
        tgp = [d for d in self.devices if isinstance(d, SoakTGP)]
        for d in tgp:
            d.start()
        time.sleep(3)  # sessions open, the first frames settle
        before, t0 = sum(d.acked_total for d in tgp), time.monotonic()
        time.sleep(self.args.calibrate)
        rate = (sum(d.acked_total for d in tgp) - before) / (time.monotonic() - t0)
        self.report["calibration"] = {"tgp_devices": len(tgp), "seconds": self.args.calibrate, "rate": round(rate)}
        return rate

    def run(self) -> None:
        rate = self.args.rate
        if rate is None:
            rate = self.calibrate() / 2
        per_device = rate / len(self.devices)
        for d in self.devices:
            d.measure(per_device)
            if not d.is_alive():
                d.start()
        self.report["rate"] = round(rate)
        print(f"soak: {len(self.devices)} devices at {rate:,.0f} readings/s in all", flush=True)
        started = time.monotonic()
        periods = max(1, round(self.args.minutes * 60 / self.args.every))
        last = (started, self.acked())
        self.sample(0, last, last)
        at = started
        for i in range(periods):
            time.sleep(max(0.0, at - time.monotonic()))
            fault = FAULTS[i % len(FAULTS)]
            self.inject(i, fault, end=at + self.args.every)
            # The next fault comes a period after this one, or --settle seconds after this one is survived.
            after = at + self.args.every
            if self.args.settle is not None:
                after = min(after, time.monotonic() + self.args.settle)
            time.sleep(max(0.0, after - time.monotonic()))
            at = after
            now = (time.monotonic(), self.acked())
            self.sample(i + 1, last, now)
            last = now

    def acked(self) -> int:
        return sum(d.acked_total for d in self.devices)

    def sample(self, period: int, last: tuple[float, int], now: tuple[float, int]) -> None:
        proc = psutil.Process(self.gw.proc.pid)
        sample = {
            "period": period,
            "gateway_pid": proc.pid,
            "rss_mb": round(proc.memory_info().rss / 2**20, 1),
            "fds": proc.num_fds(),
            "acked_per_s": round((now[1] - last[1]) / (now[0] - last[0])) if now[0] > last[0] else None,
        }
        try:
            sample["journal_bytes"] = healthz(self.gw)[1].get("journal", {}).get("bytes")
        except OSError:
            sample["journal_bytes"] = None
        self.report["samples"].append(sample)
        print("soak:", json.dumps(sample), flush=True)

    def inject(self, period: int, fault: str, end: float) -> None:
        """Inject ``fault`` and measure the recovery, waiting no longer than ``end`` (the period's end)."""
        gw = self.gw
        record: dict[str, Any] = {"period": period, "fault": fault}
        t0 = time.monotonic()

        def waited(ok: float | None, since: float = t0) -> float | None:
            return round(time.monotonic() - since, 2) if ok is not None else None

        if fault == "gateway":
            gw.kill()
            gw.start()
            record["ready_s"] = waited(0.0)
        elif fault in ("postmaster", "pg-stop"):
            pm = postmaster(gw.data_dir)
            if pm is None:
                record["error"] = "no postmaster running"
            else:
                pm.send_signal(signal.SIGKILL if fault == "postmaster" else signal.SIGINT)
                pm.wait(60)
                # the gateway notices, starts PostgreSQL again, reconnects and replays its journal
                ok = wait_until(
                    lambda: (p := postmaster(gw.data_dir)) is not None and p.pid != pm.pid and healthy(gw),
                    timeout=end - time.monotonic(),
                )
                record["healthz_200_s"] = waited(ok)
        else:
            self.receiver.kill()
        # every device is acknowledged again (with the receiver down, they never stopped)
        since = {d.device: d.acked_total for d in self.devices}
        ok = wait_until(lambda: all(d.acked_total > since[d.device] for d in self.devices), end - time.monotonic())
        record["all_acking_s"] = waited(ok)
        if fault == "receiver":
            down = min(20.0, self.args.every / 3)
            time.sleep(max(0.0, t0 + down - time.monotonic()))
            self.receiver.start()
            record["down_s"] = down
            # the backlog reaches the receiver: every sink's oldest unsent reading is recent again
            restarted = time.monotonic()
            ok = wait_until(lambda: self.upload_lag_s() < 5, timeout=end - time.monotonic())
            record["uploads_caught_up_s"] = waited(ok, restarted)
            if ok is None:
                record["upload_lag_s_at_period_end"] = round(self.upload_lag_s(), 1)
        self.report["faults"].append(record)
        print("soak:", json.dumps(record), flush=True)

    # -- the end --

    def finish(self) -> None:
        """Stop the load, let the gateway catch up, check the record against the database and the receiver."""
        for d in self.devices:
            d.stopping.set()
        for d in self.devices:
            d.join(60)
        gw = self.gw
        drained = wait_until(lambda: (s := healthz(gw))[0] == 200 and s[1].get("journal", {}).get("bytes", 0) == 0, 300)
        uploaded = wait_until(lambda: self.upload_lag() == 0, 600, every=1.0)
        self.report["drain"] = {"journal_s": drained, "uploads_s": uploaded}
        self.report["database"] = self.check_database()
        self.report["receiver"] = self.check_receiver()
        self.report["gateway_exit"] = gw.stop(60)
        self.gw.save_log()

    def upload_lag_s(self) -> float:
        """The age of the oldest reading not yet sent, over the sinks, as /healthz gives it."""
        sinks = healthz(self.gw)[1].get("sinks", {})
        return max((s.get("lag_seconds") or 0.0 for s in sinks.values()), default=0.0)

    def upload_lag(self) -> int:
        out = json.loads(gatewayctl("upload", "status", "--json", data_dir=self.gw.data_dir).stdout)
        return sum(s["lag_readings"] for s in out)

    def check_database(self) -> dict[str, Any]:
        from gateway.storage import embedded

        pg = embedded.EmbeddedPostgres(self.gw.data_dir / "pg")
        conn = embedded.connect(pg.start())
        problems: list[str] = []
        stored = 0
        try:
            for d in self.devices:
                with conn.cursor(name="soak") as cur:  # a server-side cursor: rows stream
                    cur.itersize = 100_000
                    cur.execute(
                        """
                        SELECT (extract(epoch FROM r.ts) * 1000000)::bigint, r.value
                        FROM readings r JOIN devices dv ON dv.id = r.device_id JOIN metrics k ON k.id = r.metric_id
                        WHERE dv.name = %s AND k.name = 'oil_temp'
                        """,
                        (d.device,),
                    )
                    seen = Bitmap()
                    rows = bad_value = never_sent = 0
                    for ts, value in cur:
                        rows += 1
                        k, off = divmod(ts - BASE_US, STEP_US)
                        if off or not 0 <= k < d.made:
                            never_sent += 1
                            continue
                        seen.add(k)
                        if value != float(ts % 997):
                            bad_value += 1
                conn.commit()
                stored += rows
                missing = sum(1 for k in d.acked_bits if k not in seen)
                for what, n in (
                    ("acknowledged readings missing", missing),
                    ("readings stored twice", rows - seen.count - never_sent),
                    ("readings stored that were never sent", never_sent),
                    ("readings stored with another value than sent", bad_value),
                ):
                    if n:
                        problems.append(f"{d.device}: {n} {what}")
        finally:
            conn.close()
            pg.stop()
        acked = sum(d.acked_bits.count for d in self.devices)
        return {"acked": acked, "stored": stored, "problems": problems}

    def check_receiver(self) -> dict[str, Any]:
        got = {d.device: Bitmap() for d in self.devices}
        lines = batches = 0
        keys: set[str] = set()
        base = datetime.datetime.fromtimestamp(BASE_US / 1e6, datetime.timezone.utc)
        step = datetime.timedelta(microseconds=STEP_US)
        for key, body in self.receiver.batches():
            batches += 1
            keys.add(key)
            for device, ts in LINE.findall(gzip.decompress(body)):
                lines += 1
                if device.decode() in got:
                    got[device.decode()].add((datetime.datetime.fromisoformat(ts.decode()) - base) // step)
        problems = []
        for d in self.devices:
            missing = sum(1 for k in d.acked_bits if k not in got[d.device])
            if missing:
                problems.append(f"{d.device}: {missing} acknowledged readings never reached the receiver")
        return {
            "batches": batches,
            "distinct_batches": len(keys),
            "lines": lines,
            "distinct_readings": sum(b.count for b in got.values()),
            "problems": problems,
        }


def survived(fault: dict[str, Any]) -> bool:
    """Every device acknowledged again within the period, and /healthz 200 again after a database fault."""
    if "error" in fault or fault.get("all_acking_s") is None:
        return False
    return fault["fault"] not in ("postmaster", "pg-stop") or fault.get("healthz_200_s") is not None


def summary(report: dict[str, Any]) -> dict[str, Any]:
    samples = report["samples"]
    faults = report["faults"]
    out = {
        "faults_injected": len(faults),
        "faults_survived": sum(1 for f in faults if survived(f)),
        "acked": report["database"]["acked"],
        "stored": report["database"]["stored"],
        "rss_mb_first_last": [samples[0]["rss_mb"], samples[-1]["rss_mb"]],
        "fds_first_last": [samples[0]["fds"], samples[-1]["fds"]],
        "postmaster_restart_to_200_s": [f["healthz_200_s"] for f in faults if f["fault"] == "postmaster"],
        "pg_stop_to_200_s": [f["healthz_200_s"] for f in faults if f["fault"] == "pg-stop"],
        "gateway_restart_ready_s": [f["ready_s"] for f in faults if f["fault"] == "gateway"],
        "receiver_restart_to_caught_up_s": [f["uploads_caught_up_s"] for f in faults if f["fault"] == "receiver"],
        "acked_per_s_first_last": [samples[1]["acked_per_s"], samples[-1]["acked_per_s"]] if len(samples) > 1 else [],
        "problems": report["database"]["problems"] + report["receiver"]["problems"],
    }
    if report["gateway_exit"] != 0:
        out["problems"].append(f"the gateway exited with status {report['gateway_exit']}")
    if out["faults_survived"] < out["faults_injected"]:
        out["problems"].append("some faults were not survived: see faults")
    if any(d.get("lost_to_full_buffer") for d in report.get("devices", [])):
        out["problems"].append("a device's buffer overflowed")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run after calibration [30]")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between faults [60]")
    parser.add_argument(
        "--settle",
        type=float,
        help="inject the next fault this many seconds after the last is survived, not waiting for the period's "
        "end (the period stays each fault's deadline)",
    )
    parser.add_argument("--rate", type=float, help="readings/s in all (default: half what calibration reaches)")
    parser.add_argument("--calibrate", type=float, default=20.0, help="seconds of calibration [20]")
    parser.add_argument("--json", help="write the report to this file")
    parser.add_argument("--workdir", help="directory for the run (default: a new temporary one, removed after)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve))
        return 0
    where = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gw-soak-"))
    where.mkdir(parents=True, exist_ok=True)
    os.chmod(where, 0o755)
    soak = Soak(args, where)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop what was started, as after an error
    try:
        soak.start()
        soak.run()
        soak.finish()
    finally:
        soak.close()
    report = soak.report
    report["devices"] = [
        {"name": d.device, "acked": d.acked_bits.count, "made": d.made, "lost_to_full_buffer": d.lost_to_full_buffer}
        for d in soak.devices
    ]
    report["summary"] = summary(report)
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(json.dumps(report["summary"], indent=2))
    if not args.workdir:
        import shutil

        shutil.rmtree(where, ignore_errors=True)
    return 1 if report["summary"]["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
