"""
The real service tree in-process: HTTPS on 127.0.0.1 port 0 with the data
directory's self-signed certificate, a real PostgreSQL behind it, clients
that verify the certificate.
"""

from __future__ import annotations

import json
import random
import socket
import ssl
import stat

import pytest
import pytest_twisted
import treq
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.ssl import Certificate
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from gateway.service import GatewayService
from tests.conftest import start_service
from tests.test_store import add_pg_device


class Gateway:
    def __init__(self, service: GatewayService) -> None:
        self.service = service
        self.port = service.https_port.getHost().port
        self.url = f"https://127.0.0.1:{self.port}"
        self.cert_path = service.config.tls_dir / "ca.crt"
        cert = Certificate.loadPEM(self.cert_path.read_bytes())
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 64
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=cert), pool=self.pool)
        self.http = treq.client.HTTPClient(agent)

    async def post(self, token: str, readings: list[dict]) -> tuple[int, dict]:
        response = await self.http.post(
            self.url + "/v1/readings",
            data=json.dumps({"readings": readings}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        return response.code, json.loads(await response.content())


@pytest_twisted.async_yield_fixture
async def gateway(service):
    gw = Gateway(service)
    yield gw
    await gw.pool.closeCachedConnections()


def reading(i: int, metric: str = "oil_temp") -> dict:
    return {"metric": metric, "ts": 1763805600000 + i, "value": i / 2}


@pytest_twisted.ensureDeferred
async def test_post_over_tls_then_retransmit(gateway, sql):
    token = add_pg_device(sql, "truck-17")
    assert await gateway.post(token, [reading(i) for i in range(3)]) == (200, {"accepted": 3, "duplicates": 0})
    assert await gateway.post(token, [reading(i) for i in range(4)]) == (200, {"accepted": 1, "duplicates": 3})
    assert sql("SELECT count(*) FROM readings")[0][0] == 4


@pytest_twisted.ensureDeferred
async def test_fifty_concurrent_clients_overlapping(gateway, sql):
    """Every reading stored once; every client told the truth about new and duplicate."""
    tokens = [add_pg_device(sql, f"truck-{i}") for i in range(5)]
    rng = random.Random(11)
    requests = []
    for c in range(50):
        start = rng.randrange(0, 100)
        requests.append((c % 5, [reading(i) for i in range(start, start + rng.randrange(1, 40))]))
    answers = await gatherResults([Deferred.fromCoroutine(gateway.post(tokens[dev], rs)) for dev, rs in requests])
    assert all(code == 200 for code, _ in answers)
    distinct = {(dev, r["ts"]) for dev, rs in requests for r in rs}
    assert sum(body["accepted"] for _, body in answers) == len(distinct)
    for (_, rs), (_, body) in zip(requests, answers):
        assert body["accepted"] + body["duplicates"] == len(rs)
    assert sql("SELECT count(*) FROM readings")[0][0] == len(distinct)


@pytest_twisted.ensureDeferred
async def test_revoked_token_is_refused_within_a_second(gateway, sql):
    token = add_pg_device(sql, "truck-9")
    assert (await gateway.post(token, [reading(1)]))[0] == 200
    sql("UPDATE devices SET revoked_at = now() WHERE name = 'truck-9'")  # behind the gateway's back: no NOTIFY
    from gateway.storage.credentials import AUTH_CACHE_TTL

    credentials = gateway.service.store.credentials
    until = max(expires for expires, _ in [*credentials._proven.values(), *credentials._rows.values()])
    assert until - reactor.seconds() <= AUTH_CACHE_TTL  # what was looked up is kept at most a second
    while reactor.seconds() <= until:  # until the gateway's own clock has passed that
        await deferLater(reactor, until - reactor.seconds() + 0.01, lambda: None)
    code, body = await gateway.post(token, [reading(2)])
    assert (code, body["error"]) == (401, "unauthorized")


@pytest_twisted.ensureDeferred
async def test_healthz(gateway):
    response = await gateway.http.get(gateway.url + "/healthz")
    assert response.code == 200
    assert (await response.json())["database"] == "ok"


def test_certificate_is_made_private(gateway):
    tls_dir = gateway.service.config.tls_dir
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((tls_dir / "gateway.key").stat().st_mode) == 0o600


def _handshake(port: int, cafile: str, **settings) -> str:
    ctx = ssl.create_default_context(cafile=cafile)
    for key, value in settings.items():
        if key == "ciphers":
            ctx.set_ciphers(value)
        else:
            setattr(ctx, key, value)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return f"{tls.version()} {tls.cipher()[0]}"


@pytest_twisted.ensureDeferred
async def test_tls_policy(gateway):
    cafile = str(gateway.cert_path)
    modern = await deferToThread(_handshake, gateway.port, cafile)
    assert modern.startswith("TLSv1.3")
    tls12 = await deferToThread(_handshake, gateway.port, cafile, maximum_version=ssl.TLSVersion.TLSv1_2)
    assert tls12.startswith("TLSv1.2 ECDHE-") and ("GCM" in tls12 or "CHACHA20" in tls12)
    # OpenSSL's own default would accept CBC suites; the gateway must not.
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        await deferToThread(
            _handshake,
            gateway.port,
            cafile,
            maximum_version=ssl.TLSVersion.TLSv1_2,
            ciphers="ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA",
        )


@pytest_twisted.ensureDeferred
async def test_own_certificate_is_served(tmp_path, db_dsn, sql):
    from tests.certs import make_self_signed

    own = make_self_signed(tmp_path / "own", hostname="gw.plant.example")
    service = await start_service(tmp_path, db_dsn, tls_cert=str(own.cert_path), tls_key=str(own.key_path))
    try:
        port = service.https_port.getHost().port
        answer = await deferToThread(_handshake, port, str(own.cert_path))
        assert answer.startswith("TLSv1.3")
        assert not (tmp_path / "data" / "tls").exists()  # no certificate made when one is given
    finally:
        await service.stopService()


def test_session_settings_keep_commits_durable(db_dsn, sql):
    from gateway.storage.pool import session_dsn
    import psycopg2

    conn = psycopg2.connect(session_dsn(db_dsn + " options='-c synchronous_commit=off'"))
    with conn.cursor() as cur:
        cur.execute("SHOW synchronous_commit")
        assert cur.fetchone()[0] == "on"
        cur.execute("SHOW statement_timeout")
        assert cur.fetchone()[0] == "30s"
    conn.close()


@pytest_twisted.ensureDeferred
async def test_a_running_service_leaves_the_process_alone(tmp_path, db_dsn):
    """build() gives the service tree only: no signal handlers, no GC tuning (those are GatewayProcess's)."""
    import gc
    import signal

    before = ({s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}, gc.get_threshold())
    service = await start_service(tmp_path, db_dsn)
    await service.stopService()
    after = ({s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}, gc.get_threshold())
    assert after == before


@pytest_twisted.ensureDeferred
async def test_a_port_in_use_stops_the_start_with_one_line(tmp_path, db_dsn):
    """privilegedStartService raises StartError naming the option; nothing is left listening."""
    from gateway.config import build_config
    from gateway.errors import StartError
    from gateway.service import build

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        values = {
            "data-dir": str(tmp_path / "data"),
            "db": db_dsn,
            "https": "ssl:0:interface=127.0.0.1",
            "device": [f"tcp:{port}:interface=127.0.0.1"],
            "mqtt": "off",
        }
        service = build(build_config(values), reactor)
        with pytest.raises(StartError, match=rf"^--device: cannot listen on tcp:{port}:interface=127.0.0.1: "):
            service.privilegedStartService()
        assert service.failure is not None and service.https_port is not None
        await service.listeners.stopService()
    finally:
        taken.close()


@pytest_twisted.ensureDeferred
async def test_a_request_made_before_the_gateway_is_ready_waits_and_is_answered(tmp_path, db_dsn, sql):
    """The ports are bound at once but accept only when ready: an early client gets 200, never 503."""
    from gateway.config import build_config
    from gateway.service import build

    token = add_pg_device(sql, "truck-1")
    values = {
        "data-dir": str(tmp_path / "data"),
        "db": db_dsn,
        "https": "ssl:0:interface=127.0.0.1",
        "device": ["tcp:0:interface=127.0.0.1"],
        "mqtt": "off",
    }
    service = build(build_config(values), reactor)
    service.privilegedStartService()
    gw = Gateway(service)
    try:
        early = Deferred.fromCoroutine(gw.post(token, [reading(1)]))  # connects before startService
        await deferLater(reactor, 0.2, lambda: None)
        assert not early.called  # queued by the kernel, not refused and not answered 503
        service.startService()
        await service.ready
        assert await early == (200, {"accepted": 1, "duplicates": 0})
    finally:
        await gw.pool.closeCachedConnections()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_gateway_stopped_while_waiting_for_its_database_stops_cleanly(tmp_path):
    """The database never answers; the gateway is stopped meanwhile: no start is finished after the stop."""
    from gateway.config import build_config
    from gateway.service import build

    values = {
        "data-dir": str(tmp_path / "data"),
        "db": "host=127.0.0.1 port=1 dbname=x user=x connect_timeout=2",
        "https": "ssl:0:interface=127.0.0.1",
        "device": ["tcp:0:interface=127.0.0.1"],
        "mqtt": "off",
        "db-wait": "1",
    }
    service = build(build_config(values), reactor)
    service.privilegedStartService()
    service.startService()
    await service.listening.addTimeout(60, reactor)  # after --db-wait: the ports open without a database
    assert not service.ready.called
    await service.stopService()
    await service.starting.addTimeout(60, reactor)  # the waiting retry gives up instead of connecting
    assert not service.ready.called and service.store.pool.up == 0 and service.failure is None


@pytest_twisted.ensureDeferred
async def test_the_certificate_is_renewed_before_it_expires_and_served_without_a_restart(gateway):
    import datetime

    from cryptography import x509

    tls = gateway.service.tls
    first = tls.local
    assert first is not None and first.not_after is not None
    served = await deferToThread(_served, gateway.port, str(first.ca_path))
    assert x509.load_der_x509_certificate(served).not_valid_after_utc == first.not_after
    assert tls.renew() is False  # not due
    # The certificate on disk is one issued 380 days ago (17 days left), as a long-running gateway has it.
    from cryptography.hazmat.primitives import serialization

    from gateway.net.tls import _issue_server

    ca = x509.load_pem_x509_certificate(first.ca_path.read_bytes())
    ca_key = serialization.load_pem_private_key((first.ca_path.parent / "ca.key").read_bytes(), None)
    long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=380)
    _issue_server(first.ca_path.parent, ca_key, ca, "localhost", long_ago)
    assert tls.renew() is True
    assert tls.local.fingerprint != first.fingerprint and tls.local.not_after >= first.not_after
    renewed = await deferToThread(_served, gateway.port, str(first.ca_path))  # the same CA trusts it
    assert renewed != served and x509.load_der_x509_certificate(renewed).not_valid_after_utc == tls.local.not_after


def _served(port: int, cafile: str) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ssl.create_default_context(cafile=cafile).wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def test_the_embedded_database_leaves_the_data_directory_closed_to_others(tmp_path):
    """Started as root, pgserver opens the directories above pg/ to everyone; only traversal is kept."""
    import os

    from gateway.storage.embedded import EmbeddedPostgres

    outer = tmp_path / "home"
    outer.mkdir(mode=0o700)
    data = outer / "gateway-data"
    data.mkdir(mode=0o700)
    pg = EmbeddedPostgres(data / "pg")
    pg.start()
    try:
        expected = 0o711 if os.geteuid() == 0 else 0o700  # as root, pgserver's own user must pass through
        assert stat.S_IMODE(data.stat().st_mode) == expected
        assert stat.S_IMODE(outer.stat().st_mode) == expected
    finally:
        pg.stop()


class _Starting(MultiService):
    """What GatewayProcess needs of the gateway: its ready and listening Deferreds, and reload."""

    def __init__(self) -> None:
        super().__init__()
        self.ready: Deferred = Deferred()
        self.listening: Deferred = Deferred()
        self.stopping = False
        self.reloads = 0

    def reload(self) -> None:
        self.reloads += 1


@pytest_twisted.ensureDeferred
async def test_a_sighup_while_starting_is_applied_once_ready_and_never_ends_the_process():
    import gc
    import os
    import signal

    from gateway.ops.process import GatewayProcess

    kept = ({s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}, gc.get_threshold())
    gateway = _Starting()
    process = GatewayProcess(gateway, reactor, environ={})
    try:
        process.startService()
        for _ in range(2):  # two while starting: one re-read once ready
            os.kill(os.getpid(), signal.SIGHUP)
            await deferLater(reactor, 0.05, lambda: None)
        assert gateway.reloads == 0
        gateway.ready.callback(gateway)
        assert gateway.reloads == 1
        os.kill(os.getpid(), signal.SIGHUP)  # once ready: at once
        await deferLater(reactor, 0.05, lambda: None)
        assert gateway.reloads == 2
    finally:
        await process.stopService()
        for s, handler in kept[0].items():
            signal.signal(s, handler)
        gc.set_threshold(*kept[1])


def test_a_postmaster_left_a_zombie_is_restarted_past_the_lock_files_naming_it(tmp_path):
    """
    A postmaster killed with SIGKILL leaves its lock files (of the data directory and of the socket); while
    its zombie is not reaped its pid still exists, and PostgreSQL refuses to start over a lock of a live pid.
    """
    import os
    import signal
    import subprocess
    import time

    import psutil

    from gateway.storage.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(tmp_path / "pg")
    pg.start()
    # Exited and not reaped until the end: its pid exists, as a zombie's does; of PostgreSQL's own user, as
    # the postmaster is, else PostgreSQL may not signal it and takes its lock for a stale one.
    owner = (tmp_path / "pg").stat().st_uid
    zombie = subprocess.Popen(["true"], user=owner if os.geteuid() == 0 else None)
    try:
        killed = psutil.Process(pg.postmaster())
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # it has exited, and stays a zombie
        locks = [pg.pg_dir / "postmaster.pid", *pg.pg_dir.glob(".s.PGSQL.*.lock")]
        assert len(locks) == 2, locks
        for lock in locks:  # as though the killed postmaster's own zombie were still there
            first, rest = lock.read_text().split("\n", 1)
            lock.write_text(f"{zombie.pid}\n{rest}")
        assert pg.postmaster() is None  # a zombie is not a running postmaster
        deadline, error = time.monotonic() + 30, None
        while time.monotonic() < deadline:  # the killed postmaster's backends may hold its memory a moment
            try:
                pg.restart()
                break
            except Exception as e:  # noqa: BLE001 - tried again, as the supervisor does
                error = e
                time.sleep(0.5)
        assert pg.postmaster() is not None, error
    finally:
        zombie.wait()
        pg.stop()
