"""
TGP end to end: the real service on 127.0.0.1, real TCP and real TLS, a
real PostgreSQL. A device drops its connection with frames in flight,
reconnects and sends again what was not acknowledged: every reading is
stored once and every ACK told the truth.
"""

from __future__ import annotations


import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.task import deferLater
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS

from gateway import tokens
from tests.certs import TestCA
from tests.conftest import start_service
from protocols import tgp
from tests.test_store import add_pg_device
from tests.tgp_helpers import drain


class DeviceClient(Protocol):
    def __init__(self) -> None:
        self.conn = tgp.Connection(tgp.DEVICE)
        self.events: DeferredQueue = DeferredQueue()
        self.closed: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.conn.receive_data(data)
        for event in drain(self.conn):
            self.events.put(event)

    def connectionLost(self, reason=None) -> None:
        self.events.put(None)
        self.closed.callback(None)

    def send(self, event) -> None:
        self.transport.write(self.conn.send(event))


async def open_session(endpoint, name: str, token: str) -> DeviceClient:
    device = await endpoint.connect(Factory.forProtocol(DeviceClient))
    device.send(tgp.Hello(name))
    challenge = await device.events.get()
    assert isinstance(challenge, tgp.Challenge), challenge
    device.send(tgp.Auth(tokens.auth_proof(token, challenge.nonce, name)))
    welcome = await device.events.get()
    assert isinstance(welcome, tgp.Welcome), welcome
    device.send(tgp.Declare(1, (tgp.Metric(1, tgp.ValueType.F64, "oil_temp"),)))
    assert await device.events.get() == tgp.Ack(1)
    return device


def frame_readings(frame: int, per_frame: int = 50) -> tuple:
    base = 1_795_341_600_000_000 + frame * per_frame * 1000
    return tuple(("oil_temp", base + i * 1000, frame + i / 100) for i in range(per_frame))


@pytest.fixture
def gateway(service):
    return service


def endpoints(service):
    tcp_port = service.device_ports[0].getHost().port
    tls_port = service.device_ports[1].getHost().port
    trust = Certificate.loadPEM((service.config.tls_dir / "ca.crt").read_bytes())
    return {
        "tcp": TCP4ClientEndpoint(reactor, "127.0.0.1", tcp_port),
        "tls": wrapClientTLS(
            optionsForClientTLS("localhost", trust), TCP4ClientEndpoint(reactor, "127.0.0.1", tls_port)
        ),
    }


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@pytest_twisted.ensureDeferred
async def test_drop_with_frames_in_flight_then_resend(gateway, sql, transport):
    token = add_pg_device(sql, "truck-17")
    endpoint = endpoints(gateway)[transport]
    frames = {n: frame_readings(n) for n in range(10)}

    first = await open_session(endpoint, "truck-17", token)
    for i, n in enumerate(frames):
        first.send(tgp.Data(2 + i, frames[n]))
    acked_first = []
    while len(acked_first) < 3:
        event = await first.events.get()
        assert isinstance(event, tgp.Ack)
        acked_first.append(event)
    first.transport.abortConnection()  # frames still in flight
    await first.closed
    while (event := first.events.pending and first.events.pending.pop(0)) not in (None, False):
        if isinstance(event, tgp.Ack):
            acked_first.append(event)
    acked_frames = {a.seq - 2 for a in acked_first}
    assert all(a.accepted == 50 and a.duplicates == 0 for a in acked_first)

    # Frames the gateway took before the abort still commit; their ACKs are lost.
    committer = gateway.store.committer
    while committer.in_flight or committer.queued:
        await deferLater(reactor, 0.01, lambda: None)
    stored_before = sql("SELECT count(*) FROM readings")[0][0]
    for a in acked_first:  # what was acknowledged is there
        readings = frames[a.seq - 2]
        assert (
            sql(
                "SELECT count(*) FROM readings WHERE ts >= to_timestamp(%s / 1e6) AND ts <= to_timestamp(%s / 1e6)",
                (readings[0][1], readings[-1][1]),
            )[0][0]
            == 50
        )

    resend = [n for n in frames if n not in acked_frames]
    second = await open_session(endpoint, "truck-17", token)
    for i, n in enumerate(resend):
        second.send(tgp.Data(2 + i, frames[n]))
    acks = [await second.events.get() for _ in resend]
    second.send(tgp.Bye())
    await second.closed
    assert [a.seq for a in acks] == list(range(2, 2 + len(resend)))  # in order
    for a in acks:
        assert a.accepted + a.duplicates == 50
    # honest: what the second session calls new is exactly what was missing
    assert sum(a.accepted for a in acks) == 500 - stored_before
    assert sum(a.duplicates for a in acks) == len(resend) * 50 - (500 - stored_before)
    assert sql("SELECT count(*), count(DISTINCT ts) FROM readings") == [(500, 500)]


@pytest_twisted.ensureDeferred
async def test_pipelined_frames_of_one_key_keep_the_first_value_and_each_ack_says_its_own_fate(gateway, sql):
    """
    Forty sessions each pipeline two DATA frames holding the same (metric, time) with different values, all
    at once: in every one the first value is stored and acknowledged as new, the second as a conflict.
    """
    sessions = []
    for n in range(40):
        token = add_pg_device(sql, f"pipe-{n}")
        sessions.append(await open_session(endpoints(gateway)["tcp"], f"pipe-{n}", token))
    ts = 1_795_341_600_000_000
    for device in sessions:
        device.send(tgp.Data(2, (("oil_temp", ts, 1.0),)))
        device.send(tgp.Data(3, (("oil_temp", ts, 2.0),)))
    for device in sessions:
        first, second = await device.events.get(), await device.events.get()
        assert (first, second) == (tgp.Ack(2, 1, 0, 0), tgp.Ack(3, 0, 0, 1))
        device.transport.loseConnection()
        await device.closed
    assert sql("SELECT DISTINCT value FROM readings") == [(1.0,)]
    assert sql("SELECT count(*) FROM readings") == [(40,)]
    assert sql("SELECT DISTINCT sent_value FROM conflicts") == [(2.0,)]


@pytest_twisted.ensureDeferred
async def test_frames_are_stored_through_the_shared_ingest_path(gateway, sql):
    """A refused reading is kept in rejected_input like an HTTPS one."""
    token = add_pg_device(sql, "truck-18")
    device = await open_session(endpoints(gateway)["tcp"], "truck-18", token)
    device.send(tgp.Data(2, (("oil_temp", 0, float("inf")),)))
    nack = await device.events.get()
    assert (nack.code, nack.fatal) == (tgp.ErrorCode.INVALID_READING, False)
    device.send(tgp.Data(3, frame_readings(1, 5)))
    assert await device.events.get() == tgp.Ack(3, 5, 0)
    device.transport.loseConnection()
    await device.closed
    rows = sql("SELECT source, device, reason FROM rejected_input")
    assert len(rows) == 1 and rows[0][0].startswith("tgp 127.0.0.1:") and rows[0][1] == "truck-18"
    assert rows[0][2] == "invalid_reading: readings[0].value: must be finite"


# -- client certificates -----------------------------------------------------


def _ca_and_client(tmp_path, cn: str):
    ca = TestCA("plant CA")
    return ca.write(tmp_path / "ca.pem"), PrivateCertificate.loadPEM(ca.issue(cn))


@pytest_twisted.ensureDeferred
async def test_client_certificate_must_name_the_device(tmp_path, db_dsn, sql):
    ca_path, truck17_cert = _ca_and_client(tmp_path, "truck-17")
    service = await start_service(tmp_path, db_dsn, device="ssl:0:interface=127.0.0.1", device_ca=str(ca_path))
    config = service.config
    try:
        port = service.device_ports[0].getHost().port
        trust = Certificate.loadPEM((config.tls_dir / "ca.crt").read_bytes())

        def endpoint(client_cert=None):
            options = optionsForClientTLS("localhost", trust, client_cert)
            return wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))

        token17, token18 = add_pg_device(sql, "truck-17"), add_pg_device(sql, "truck-18")
        device = await open_session(endpoint(truck17_cert), "truck-17", token17)
        device.transport.loseConnection()
        await device.closed

        # a certificate naming truck-17 does not let truck-18's token in
        other = await endpoint(truck17_cert).connect(Factory.forProtocol(DeviceClient))
        other.send(tgp.Hello("truck-18"))
        challenge = await other.events.get()
        other.send(tgp.Auth(tokens.auth_proof(token18, challenge.nonce, "truck-18")))
        reject = await other.events.get()
        assert reject.code == tgp.ErrorCode.AUTH_FAILED and "certificate" in reject.reason
        await other.closed

        # no certificate at all: the TLS handshake fails, nothing is read
        bare = await endpoint().connect(Factory.forProtocol(DeviceClient))
        bare.send(tgp.Hello("truck-17"))
        assert await bare.events.get() is None
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_full_store_queue_slows_devices_down_instead_of_refusing_them(tmp_path, db_dsn, sql):
    """Five devices pipelining into a queue of 300 readings: paused, never refused, all stored once."""
    service = await start_service(tmp_path, db_dsn, max_queue=300, pool_size=1, device="tcp:0:interface=127.0.0.1")
    waits = []
    wait_for_room = service.store.wait_for_room
    service.store.wait_for_room = lambda: waits.append(1) or wait_for_room()
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", service.device_ports[0].getHost().port)
        devices = []
        for i in range(5):
            name = f"truck-{i}"
            devices.append(await open_session(endpoint, name, add_pg_device(sql, name)))
        for device in devices:
            for n in range(20):
                device.send(tgp.Data(2 + n, frame_readings(n)))
        for device in devices:
            answers = [await device.events.get() for _ in range(20)]
            assert answers == [tgp.Ack(2 + n, 50, 0) for n in range(20)]
            device.transport.loseConnection()
            await device.closed
        assert sql("SELECT count(*) FROM readings") == [(5 * 20 * 50,)]
        assert waits  # the queue did fill: frames were held, not refused
    finally:
        await service.stopService()
