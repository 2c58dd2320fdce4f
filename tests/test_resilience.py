"""
The gateway under the failures users meet, for real: ``twistd -n gateway``
in a subprocess with its embedded PostgreSQL, devices in threads over TCP,
TLS and HTTPS that keep a record of every acknowledgement they received.
The database is stopped and started mid-load, the gateway is killed with
SIGKILL mid-load, the journal is filled and damaged, sockets are left idle
by the thousand, headers are dripped, garbage is sent. Each test ends by
checking the record against the database: every acknowledged reading is
stored exactly once, and nothing is stored that was never sent.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import resource
import signal
import socket
import ssl
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from gateway.storage.journal import FILE_MAGIC, HEADER, scan
from tests.conftest import script
from tests.gatewayproc import GatewayProcess, gatewayctl
from tests.loadclients import HTTPSDevice, TGPDevice, check_nothing_lost
from tests.gatewayproc import postmaster
from tests.test_e2e import post


@pytest.fixture
def make_gateway(workdir):  # noqa: F811 (the fixture imported from test_e2e)
    made = []

    def make(*extra: str) -> GatewayProcess:
        gw = GatewayProcess(workdir / "gateway-data", "--device-rate", "0", *extra, cwd=workdir)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()


def add_devices(gw: GatewayProcess, names: list[str], db: str | None = None) -> dict[str, str]:
    where = ["--db", db] if db else []
    return {name: gatewayctl("device", "add", name, *where, data_dir=gw.data_dir).stdout.strip() for name in names}


def fleet(gw: GatewayProcess, tokens: dict[str, str]) -> list:
    """One device per transport (two on HTTPS), started; those with a token."""
    devices = [
        TGPDevice("tcp-1", tokens.get("tcp-1", ""), lambda: gw.tgp_port),
        TGPDevice("tls-1", tokens.get("tls-1", ""), lambda: gw.tgp_tls_port, cafile=gw.cert),
        HTTPSDevice("https-1", tokens.get("https-1", ""), lambda: gw.port, cafile=gw.cert),
        HTTPSDevice("https-2", tokens.get("https-2", ""), lambda: gw.port, cafile=gw.cert, per_send=1),
    ]
    devices = [d for d in devices if d.device in tokens]
    for d in devices:
        d.start()
    return devices


NAMES = ["tcp-1", "tls-1", "https-1", "https-2"]


def wait_until(what, timeout: float = 30.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def all_acking(devices, since: float) -> bool:
    return all(d.acked_between(since) > 0 for d in devices)


def health(gw: GatewayProcess) -> tuple[int, dict]:
    status, _, body = post(gw, None, None, "/healthz")
    return status, body


def drained(gw: GatewayProcess) -> bool:
    try:
        status, body = health(gw)
    except OSError:
        return False
    return status == 200 and body["journal"]["bytes"] == 0


def stop_database(gw: GatewayProcess) -> None:
    pm = postmaster(gw.data_dir)
    pm.send_signal(signal.SIGINT)  # fast shutdown: every connection is cut
    pm.wait(30)


def test_a_database_outage_under_load_loses_nothing_and_keeps_acknowledging(make_gateway, outage_db):
    gw = make_gateway("--db", outage_db.dsn).start()
    devices = fleet(gw, add_devices(gw, NAMES, outage_db.dsn))
    try:
        assert wait_until(lambda: all_acking(devices, 0), 20), [d.errors for d in devices]
        outage_db.stop()
        down = time.monotonic()
        # Sessions open before the outage go on; new ones are recognised from the last answer.
        assert wait_until(lambda: all_acking(devices, down + 0.5), 20), [d.errors for d in devices]
        assert wait_until(lambda: health(gw)[0] == 503 and health(gw)[1]["journal"]["bytes"] > 0, 20), health(gw)
        outage_db.start()
        up = time.monotonic()
        during = sum(d.acked_between(down, up) for d in devices)
        assert wait_until(lambda: drained(gw), 60), health(gw)
        assert wait_until(lambda: all_acking(devices, time.monotonic() - 0.5), 20)
    finally:
        for d in devices:
            d.stop()
    counts = check_nothing_lost(gw.data_dir, devices, outage_db.dsn)
    print(f"outage: {during} readings acknowledged while the database was down; {counts}")
    assert during > 0 and counts["acked"] > during
    assert re.search(r"journal: replayed \d+\.seg: \d+ readings stored", gw.log())
    assert gw.stop() == 0


def test_a_killed_postmaster_is_restarted_and_nothing_acknowledged_is_lost(make_gateway):
    """kill -9 of the embedded postmaster under load, twice: /healthz is 200 again within 30 s each time."""
    gw = make_gateway().start()
    devices = fleet(gw, add_devices(gw, NAMES))
    back_after = []
    try:
        assert wait_until(lambda: all_acking(devices, 0), 20), [d.errors for d in devices]
        for _ in range(2):
            pm = postmaster(gw.data_dir)
            killed = time.monotonic()
            pm.send_signal(signal.SIGKILL)
            pm.wait(10)
            restarted = wait_until(lambda pm=pm: (p := postmaster(gw.data_dir)) is not None and p.pid != pm.pid, 30)
            assert restarted, "".join(gw.lines[-30:])
            assert wait_until(lambda: drained(gw), 30), (health(gw), "".join(gw.lines[-30:]))
            back_after.append(time.monotonic() - killed)
            assert wait_until(lambda: all_acking(devices, time.monotonic() - 0.5), 20), [d.errors for d in devices]
        status, body = health(gw)
        assert status == 200 and body["embedded_database"] == {"restarts": 2, "ok": True}
        metrics = urllib.request.urlopen(
            f"https://127.0.0.1:{gw.port}/metrics", context=ssl.create_default_context(cafile=gw.cert), timeout=10
        ).read()
        assert b"gateway_database_restarts_total 2.0" in metrics
    finally:
        for d in devices:
            d.stop()
    counts = check_nothing_lost(gw.data_dir, devices)
    print(f"postmaster killed twice: healthy again after {[round(s, 1) for s in back_after]} s; {counts}")
    assert all(s < 30 for s in back_after)
    assert len(re.findall(r"embedded PostgreSQL running again after", gw.log())) == 2
    # The recovery is logged as what it is, one line per event: no traceback of an error nobody handled.
    assert "Unhandled Error" not in gw.log() and "Unhandled error in Deferred" not in gw.log(), gw.log()
    assert gw.stop() == 0


def test_a_gateway_restarted_during_a_database_outage_keeps_acknowledging_known_devices(make_gateway, outage_db):
    """Stop PostgreSQL, restart the gateway: known devices get 200/ACK from the journal; a revoked one stays out."""
    dsn = outage_db.dsn
    gw = make_gateway("--db", dsn, "--db-wait", "2").start()
    tokens = add_devices(gw, NAMES, dsn)
    revoked = add_devices(gw, ["old-1"], dsn)["old-1"]
    gatewayctl("device", "revoke", "old-1", "--db", dsn)
    known = gw.data_dir / "known-devices.json"

    def revoked_in_file() -> bool:  # the add and the revoke each rewrite it: wait for the revoke's
        return known.exists() and any(r[1] == "old-1" and r[5] for r in json.loads(known.read_bytes())["devices"])

    assert wait_until(revoked_in_file, 20)
    assert oct(known.stat().st_mode & 0o777) == "0o600" and tokens["tcp-1"].encode() not in known.read_bytes()
    devices = fleet(gw, tokens)
    try:
        assert wait_until(lambda: all_acking(devices, 0), 20), [d.errors for d in devices]
        assert gw.stop() == 0
        outage_db.stop()
        gw.start(until="serving without the database")
        down = time.monotonic()
        assert wait_until(lambda: all_acking(devices, down), 30), [d.errors for d in devices]
        assert post(gw, revoked)[0] == 401  # revoked before the outage: still refused
        assert post(gw, "0123456789abcdef." + "x" * 43)[2]["error"] == "database_unavailable"
        outage_db.start()
        assert gw.wait_for_line("gateway ready", 60)
        assert wait_until(lambda: drained(gw), 60), health(gw)
        during = sum(d.acked_between(down, time.monotonic()) for d in devices)
        assert wait_until(lambda: all_acking(devices, time.monotonic() - 0.5), 20)
    finally:
        for d in devices:
            d.stop()
    counts = check_nothing_lost(gw.data_dir, devices, dsn)
    print(f"restarted during an outage: {during} readings acknowledged from the journal; {counts}")
    assert during > 0
    assert "devices known from" in gw.log() and "serving without the database" in gw.log()
    assert gw.stop() == 0


@pytest.mark.slow
def test_kill_9_at_random_instants_under_load_loses_nothing(make_gateway):
    gw = make_gateway().start()
    devices = fleet(gw, add_devices(gw, NAMES))
    rounds = 0
    rng = random.Random(6)
    try:
        for i in range(6):
            since = time.monotonic()
            assert wait_until(lambda since=since: all_acking(devices, since), 30), [d.errors for d in devices]
            time.sleep(rng.uniform(0.1, 1.0))
            if i == 3:  # once with the database away, so the journal holds acknowledged readings
                stop_database(gw)
                assert gw.wait_for_line("journal|database connection")
            gw.kill()
            rounds += 1
            gw.start()
        since = time.monotonic()
        assert wait_until(lambda: all_acking(devices, since), 30)
        assert wait_until(lambda: drained(gw), 60), health(gw)
    finally:
        for d in devices:
            d.stop()
    counts = check_nothing_lost(gw.data_dir, devices)
    print(f"kill -9: {rounds} rounds under load; {counts}")
    assert rounds == 6


def test_a_full_journal_refuses_with_retry_advice_then_replays(make_gateway, outage_db):
    gw = make_gateway("--journal-max-bytes", "64K", "--db", outage_db.dsn).start()
    devices = fleet(gw, add_devices(gw, NAMES, outage_db.dsn))
    try:
        assert wait_until(lambda: all_acking(devices, 0), 20)
        outage_db.stop()
        full = wait_until(lambda: all(d.errors.get("503 journal_full") for d in devices[2:]), 30)
        assert full, [d.errors for d in devices]
        assert wait_until(lambda: all(d.errors.get("RETRY_LATER") for d in devices[:2]), 30), [
            d.errors for d in devices
        ]
        status, body = health(gw)
        assert status == 503 and body["journal"]["ok"] is False
        assert body["journal"]["bytes"] <= 64 * 1024
        outage_db.start()
        assert wait_until(lambda: drained(gw), 60), health(gw)
        since = time.monotonic()
        assert wait_until(lambda: all_acking(devices, since), 20)
    finally:
        for d in devices:
            d.stop()
    check_nothing_lost(gw.data_dir, devices, outage_db.dsn)


def test_a_damaged_journal_record_is_moved_aside_and_the_rest_replayed(make_gateway, outage_db):
    gw = make_gateway("--db", outage_db.dsn).start()
    token = add_devices(gw, ["truck-9"], outage_db.dsn)["truck-9"]
    assert post(gw, token)[0] == 200  # the device is known before the outage
    outage_db.stop()
    bodies = [
        f'{{"readings": [{{"metric": "oil_temp", "ts": "2026-11-22T11:00:0{i}Z", "value": {i}}}]}}' for i in range(5)
    ]
    for body in bodies:
        assert post(gw, token, body)[2] == {"accepted": 1, "duplicates": 0}
    gw.kill()
    # Usually one segment; a replay attempted while the database went away seals it and starts another.
    segments = sorted((gw.data_dir / "journal").glob("*.seg"))
    found = [(segment, scan(segment.read_bytes(), last_write=True).records) for segment in segments]
    assert sum(len(records) for _, records in found) == 5
    segment, records = next((segment, records) for segment, records in found if len(records) >= 1)
    data = bytearray(segment.read_bytes())
    victim = min(2, len(records) - 1)  # the third record, or the last of a shorter first segment
    third = len(FILE_MAGIC) + sum(HEADER.size + len(r.payload) for r in records[:victim])
    data[third + HEADER.size + 5] ^= 0x20  # one flipped bit inside that record
    segment.write_bytes(bytes(data))

    outage_db.start()
    gw.start()
    assert wait_until(lambda: drained(gw), 60), health(gw)
    line = gw.wait_for_line("damaged bytes")
    assert f"at offset {third}" in line and "moved to" in line
    exported = gatewayctl("export", "--db", outage_db.dsn).stdout
    kept = sorted(re.findall(r"11:00:0(\d)Z", exported))
    # The damaged record's reading is set aside, not replayed; the readings were journaled in order.
    assert kept == [str(i) for i in range(5) if i != victim]
    [aside] = (gw.data_dir / "journal" / "damaged").iterdir()
    assert b'"2026' not in aside.read_bytes() and b"oil_temp" in aside.read_bytes()
    ctx = ssl.create_default_context(cafile=gw.cert)
    ctx.check_hostname = False
    metrics = urllib.request.urlopen(f"https://127.0.0.1:{gw.port}/metrics", context=ctx, timeout=10).read().decode()
    assert "gateway_journal_damaged_records_total 1.0" in metrics


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        pytest.fail(f"this test needs {wanted} file descriptors; the hard limit is {hard} (raise it: ulimit -Hn)")


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Did the gateway close the connection within ``within`` seconds (after any last words, as TGP's BYE)?"""
    deadline = time.monotonic() + within
    try:
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            if sock.recv(4096) == b"":
                return True
    except ConnectionResetError:
        return True
    except (TimeoutError, ssl.SSLError):
        return False


def test_idle_sockets_dripped_headers_and_connection_caps(make_gateway):
    idle = 2000
    _raise_fd_limit(2 * idle + 512)  # the gateway inherits it
    gw = make_gateway(
        "--request-timeout", "6", "--device-handshake-timeout", "8", "--max-connections-per-address", str(idle + 40)
    ).start()
    proc = psutil.Process(gw.proc.pid)
    rss_before = proc.memory_info().rss
    devices = fleet(gw, add_devices(gw, NAMES[:1]))
    sockets = []
    ctx = ssl.create_default_context(cafile=gw.cert)
    ctx.check_hostname = False
    try:
        assert wait_until(lambda: devices[0].acked_between(0) > 0, 10)
        opened_at = time.monotonic()
        for i in range(idle):
            sockets.append(socket.create_connection(("127.0.0.1", gw.tgp_port if i % 2 else gw.port)))
        assert wait_until(lambda: open_connections(gw, ctx) >= idle, 10)
        # Over the per-address cap (the device holds one more), new connections are closed at once.
        extra = [socket.create_connection(("127.0.0.1", gw.tgp_port)) for _ in range(60)]
        assert wait_until(lambda: _closed_by_peer(extra[-1], 0.05), 10)  # the last is surely over the cap
        refused = sum(_closed_by_peer(s, 0.05) for s in extra)
        for s in extra:
            s.close()
        assert 20 <= refused <= 60
        assert sum(_closed_by_peer(s, 0.01) for s in sockets[-100:]) == 0  # those within the cap stay open
        held_for = time.monotonic() - opened_at
        rss_with = proc.memory_info().rss
        since = time.monotonic()
        assert wait_until(lambda: devices[0].acked_between(since) > 0, 10)  # still served
        # Dripping a request one byte at a time does not hold a connection past the deadlines
        # (the first line within 6 s of connecting, the rest within 6 s of the first line).
        drip = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.port)))
        started = time.monotonic()
        answer = None
        drip.sendall(b"POST /v1/readings HTTP/1.1\r\n")  # the first line at once: the request deadline runs
        for byte in b"Host: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
            try:
                drip.sendall(bytes([byte]))
                drip.settimeout(0.2)
                answer = drip.recv(4096)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError as e:
                answer = repr(e)
            break
        dripped_for = time.monotonic() - started
        assert answer is not None and dripped_for < 2 * 6 + 2, (answer, dripped_for)
        assert b" 408 " in answer and b"request_timeout" in answer, answer
        # Idle sockets that never speak are closed by the deadlines (6 s HTTP, 8 s TGP handshake).
        sample = sockets[:50] + sockets[-50:]
        assert sum(_closed_by_peer(s, 10.0) for s in sample) == len(sample)
        # Refusals are counted, and logged at most 5 a minute per address.
        log = gw.log()
        assert "Timing out client" not in log
        assert len(re.findall(r"closing (https?|tgp) 127\.0\.0\.1:\d+: ", log)) <= 5
        metrics = urllib.request.urlopen(f"https://127.0.0.1:{gw.port}/metrics", context=ctx, timeout=10).read()
        counted = re.search(
            rb'gateway_inputs_rejected_total\{reason="connection_limit_address",transport="tcp"\} (\d+)', metrics
        )
        assert counted and int(counted.group(1)) == refused
    finally:
        for s in sockets:
            s.close()
        for d in devices:
            d.stop()
    print(
        f"drip: cut after {dripped_for:.1f}s with {answer[:12]!r}; "
        f"idle: {idle} sockets held {held_for:.1f}s; gateway RSS {rss_before / 2**20:.0f} MB before, "
        f"{rss_with / 2**20:.0f} MB with them; {refused}/60 over the cap refused at once"
    )
    check_nothing_lost(gw.data_dir, devices)
    assert rss_with - rss_before < 200 * 2**20


def open_connections(gw: GatewayProcess, ctx) -> int:
    metrics = urllib.request.urlopen(f"https://127.0.0.1:{gw.port}/metrics", context=ctx, timeout=10).read()
    return sum(int(float(n)) for n in re.findall(rb"^gateway_connections\{[^}]*\} (\S+)", metrics, re.M))


def test_garbage_on_every_port_is_refused_and_devices_are_unharmed(make_gateway):
    gw = make_gateway("--request-timeout", "2", "--device-handshake-timeout", "2").start()
    devices = fleet(gw, add_devices(gw, NAMES))
    rng = random.Random(42)
    ctx = ssl.create_default_context(cafile=gw.cert)
    ctx.check_hostname = False
    tried = 0
    try:
        assert wait_until(lambda: all_acking(devices, 0), 20)
        for _ in range(4):  # 4 waves of 60 connections, all at once
            wave = []
            for i in range(60):
                kind = ("tgp", "tgp+tls", "https-raw", "https", "mqtt+tls")[i % 5]
                port = {"tgp": gw.tgp_port, "tgp+tls": gw.tgp_tls_port, "mqtt+tls": gw.mqtt_tls_port}.get(kind, gw.port)
                garbage = rng.randbytes(rng.choice((1, 7, 64, 500, 4000)))
                if i % 10 < 5:  # a valid-looking start, then garbage
                    garbage = VALID_START[kind] + garbage
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                try:
                    if kind in ("tgp+tls", "https", "mqtt+tls"):
                        s = ctx.wrap_socket(s)
                    s.sendall(garbage)
                except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                    pass  # refused while sending
                wave.append(s)
                tried += 1
            # Each is answered with an error or cut within the 2 s deadlines.
            assert sum(_answered_or_closed(s, 5.0) for s in wave) == len(wave)
            for s in wave:
                s.close()
        since = time.monotonic()
        assert wait_until(lambda: all_acking(devices, since), 20)
        assert health(gw)[0] == 200
    finally:
        for d in devices:
            d.stop()
    counts = check_nothing_lost(gw.data_dir, devices)
    print(f"garbage: {tried} inputs tried; {counts}")
    assert "Traceback" not in gw.log()
    assert gw.stop() == 0


VALID_START = {
    "tgp": b"TG",
    "tgp+tls": b"TG",
    "https-raw": b"POST /v1/readings HTTP/1.1\r\n",
    "https": b"POST /v1/readings HTTP/1.1\r\n",
    "mqtt+tls": b"\x10\x20\x00\x04MQTT\x05",  # the start of an MQTT 5.0 CONNECT
}


def _answered_or_closed(sock: socket.socket, within: float) -> bool:
    """Read until the gateway closes; True once it has (answers before that are fine)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True
        except TimeoutError:
            return False
    return False


def test_sigterm_under_load_answers_what_it_took_and_exits_0(make_gateway):
    gw = make_gateway("--shutdown-timeout", "20").start()
    devices = fleet(gw, add_devices(gw, NAMES))
    try:
        assert wait_until(lambda: all_acking(devices, 0), 20)
        started = time.monotonic()
        assert gw.stop(timeout=30) == 0
        took = time.monotonic() - started
        assert took < 20
        assert wait_until(lambda: any("SHUTTING_DOWN" in d.told for d in devices[:2]), 5), [
            (d.told, d.errors) for d in devices[:2]
        ]
    finally:
        for d in devices:
            d.stop()
    assert "SIGTERM: stopping" in gw.log() and "Traceback" not in gw.log()
    assert postmaster(gw.data_dir) is None
    check_nothing_lost(gw.data_dir, devices)


class SmallDisk:
    """
    A 4 MiB tmpfs for the gateway's data directory. As root it is mounted here; otherwise (or with
    GATEWAY_TEST_USERNS=1) the gateway runs in a user and mount namespace of its own (``unshare -rm``, no
    privilege needed) that mounts it, and the test fills and frees it from inside that namespace (nsenter).
    """

    def __init__(self, data: Path) -> None:
        self.data = data
        self.pid: int | None = None  # the gateway's, when it runs in a namespace of its own
        self.namespaced = os.geteuid() != 0 or os.environ.get("GATEWAY_TEST_USERNS") == "1"
        if not self.namespaced:
            mounted = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(data)], capture_output=True
            )
            assert mounted.returncode == 0, f"mount -t tmpfs failed as root: {mounted.stderr.decode().strip()}"
            return
        probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
        assert probe.returncode == 0, (
            "this test needs root or user namespaces (unshare -rm) to give the gateway a small disk: "
            + probe.stderr.decode().strip()
        )

    def twistd(self, workdir: Path) -> str | None:
        """A twistd that mounts the small disk in a namespace of its own first (None: the real one)."""
        if not self.namespaced:
            return None
        wrapper = workdir / "twistd-on-a-small-disk"
        wrapper.write_text(
            "#!/bin/sh\n"
            "exec unshare --user --map-root-user --mount sh -c "
            '\'mount -t tmpfs -o size=4m,mode=0700 tmpfs "$0" && exec "$@"\' '
            f'"{self.data}" "{script("twistd")}" "$@"\n'
        )
        wrapper.chmod(0o755)
        return str(wrapper)

    def run(self, code: str) -> None:
        """Python ``code`` run where the small disk is mounted."""
        argv = [sys.executable, "-c", code]
        if self.namespaced:
            assert self.pid is not None
            argv = ["nsenter", "-t", str(self.pid), "-U", "-m", "--preserve-credentials", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    def fill(self) -> None:
        """Write a file until the disk takes not one byte more."""
        self.run(
            "import errno, os\n"
            f"fd = os.open({str(self.data / 'filler')!r}, os.O_WRONLY | os.O_CREAT)\n"
            "for chunk in (65536, 4096, 512, 64, 1):\n"
            "    try:\n"
            "        while True:\n"
            "            os.write(fd, b'\\0' * chunk)\n"
            "    except OSError as e:\n"
            "        assert e.errno == errno.ENOSPC, e\n"
            "os.close(fd)\n"
        )

    def free(self) -> None:
        self.run(f"import os; os.unlink({str(self.data / 'filler')!r})")

    def close(self) -> None:
        if not self.namespaced:
            subprocess.run(["umount", "-l", str(self.data)], capture_output=True)


def test_a_full_disk_refuses_with_journal_full_and_recovers_by_itself(outage_db, workdir):
    """The data directory on a small tmpfs: a full disk gets 503 journal_full, never a false ack; freed, it goes on."""
    data = workdir / "gateway-data"
    data.mkdir(mode=0o700)
    disk = SmallDisk(data)
    gw = GatewayProcess(data, "--device-rate", "0", "--db", outage_db.dsn, cwd=workdir, twistd=disk.twistd(workdir))
    try:
        gw.start()
        disk.pid = gw.proc.pid
        if disk.namespaced:  # the data directory is the gateway's own mount: copy out the CA to trust
            gw.trusted = workdir / "ca.crt"
            disk.run(f"import shutil; shutil.copy({str(data / 'tls' / 'ca.crt')!r}, {str(gw.trusted)!r})")
        token = add_devices(gw, ["truck-7"], outage_db.dsn)["truck-7"]
        acked = []

        def send(i: int) -> tuple[int, dict]:
            body = f'{{"readings": [{{"metric": "oil_temp", "ts": {1_795_341_600_000 + i}, "value": {i}}}]}}'
            status, headers, answer = post(gw, token, body)
            if status == 200:
                acked.append(i)
            return status, headers, answer

        assert send(0)[0] == 200
        outage_db.stop()
        assert send(1)[0] == 200  # journaled
        disk.fill()  # to the last byte
        # The last page of the open segment may still take a few records; then the disk is full.
        n = 2
        while send(n)[0] == 200 and n < 200:
            n += 1
        for i in range(n, n + 4):
            status, headers, answer = send(i)
            retry_after = {k.lower(): v for k, v in headers.items()}.get("retry-after")
            assert (status, answer["error"], retry_after) == (503, "journal_full", "30"), answer
        status, body = health(gw)
        assert status == 503 and body["journal"]["ok"] is False
        disk.free()
        assert send(1000)[0] == 200  # room again: no restart, no operator
        outage_db.start()
        assert wait_until(lambda: drained(gw), 60), health(gw)
        exported = gatewayctl("export", "--db", outage_db.dsn).stdout
        stored = sorted(int(json.loads(line)["value"]) for line in exported.splitlines())
        assert stored == acked and acked[-1] == 1000 and len(acked) >= 3
    finally:
        gw.close()
        disk.close()
