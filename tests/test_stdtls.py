"""Device-endpoint TLS on the ssl module: policy, data both ways, clean and unclean ends."""

from __future__ import annotations

import socket
import ssl

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.error import ConnectionDone
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.threads import deferToThread

from gateway.net.stdtls import TLSServerFactory, server_context
from gateway.net.tls import TLSConfigError
from tests.certs import make_self_signed


def within(d: Deferred, seconds: float = 30.0) -> Deferred:
    """d, or a TimeoutError after ``seconds``: a close that never comes fails the test instead of hanging it."""
    return d.addTimeout(seconds, reactor)


class Echo(Protocol):
    """Answers every chunk with its upper-case copy; closes on b'bye'."""

    def dataReceived(self, data: bytes) -> None:
        if data == b"bye":
            self.transport.loseConnection()
        else:
            self.transport.write(data.upper())


class Client(Protocol):
    def __init__(self) -> None:
        self.received: DeferredQueue = DeferredQueue()
        self.closed: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received.put(data)

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(reason.value if reason is not None else None)


@pytest_twisted.async_yield_fixture
async def server(tmp_path):
    made = make_self_signed(tmp_path / "tls")
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        TLSServerFactory(server_context(made.cert_path, made.key_path), Factory.forProtocol(Echo), reactor)
    )
    yield port.getHost().port, made.cert_path
    await port.stopListening()


async def connect(port: int, cert_path) -> Client:
    trust = Certificate.loadPEM(cert_path.read_bytes())
    endpoint = wrapClientTLS(optionsForClientTLS("localhost", trust), TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    return await endpoint.connect(Factory.forProtocol(Client))


@pytest_twisted.ensureDeferred
async def test_data_both_ways_then_the_client_closes_cleanly(server):
    client = await connect(*server)
    client.transport.write(b"hello")
    assert await within(client.received.get()) == b"HELLO"
    big = b"x" * 200_000  # many TLS records
    client.transport.write(big)
    got = b""
    while len(got) < len(big):
        got += await within(client.received.get())
    assert got == big.upper()
    client.transport.loseConnection()
    await within(client.closed)  # the server answered close_notify and closed: no lingering


@pytest_twisted.ensureDeferred
async def test_the_server_closes_cleanly(server):
    client = await connect(*server)
    client.transport.write(b"bye")
    assert isinstance(await within(client.closed), ConnectionDone)  # a clean close, not a reset


def _handshake(port: int, cafile: str, **settings) -> str:
    ctx = ssl.create_default_context(cafile=cafile)
    for key, value in settings.items():
        ctx.set_ciphers(value) if key == "ciphers" else setattr(ctx, key, value)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return f"{tls.version()} {tls.cipher()[0]}"


@pytest_twisted.ensureDeferred
async def test_policy_matches_the_https_listener(server):
    port, cert = server
    assert (await deferToThread(_handshake, port, str(cert))).startswith("TLSv1.3")
    tls12 = await deferToThread(_handshake, port, str(cert), maximum_version=ssl.TLSVersion.TLSv1_2)
    assert tls12.startswith("TLSv1.2 ECDHE-") and ("GCM" in tls12 or "CHACHA20" in tls12)
    with pytest.raises(ssl.SSLError):
        await deferToThread(
            _handshake, port, str(cert), maximum_version=ssl.TLSVersion.TLSv1_2,
            ciphers="ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA",
        )  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_garbage_instead_of_a_handshake_is_cut_off(server):
    port, _ = server
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(Client))
    client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    await within(client.closed)


def test_mismatched_key_is_named(tmp_path):
    a, b = make_self_signed(tmp_path / "a"), make_self_signed(tmp_path / "b")
    with pytest.raises(TLSConfigError, match="cannot be used together"):
        server_context(a.cert_path, b.key_path)


class Refuser(Protocol):
    """Answers the first bytes with b'NO' and closes, as a 413 does mid-body."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"NO")
        self.transport.loseConnection()


async def refuser(tmp_path, clock=reactor):
    made = make_self_signed(tmp_path / "tls")
    factory = TLSServerFactory(server_context(made.cert_path, made.key_path), Factory.forProtocol(Refuser), clock)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    return port, made.cert_path


def _send_on_after_refusal(port: int, cafile: str) -> bytes:
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"x" * 3_000_000)  # the server refused after the first record
            got = b""
            while chunk := tls.recv(4096):
                got += chunk
            return got


@pytest_twisted.ensureDeferred
async def test_a_client_still_sending_gets_the_answer_sent_before_the_close(tmp_path):
    port, cert = await refuser(tmp_path)
    try:
        # Closing TCP at once would reset the connection under the client's
        # sendall and lose b'NO'; the server drains until the client's close_notify.
        assert await deferToThread(_send_on_after_refusal, port.getHost().port, str(cert)) == b"NO"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_peer_that_never_answers_close_notify_is_cut_after_the_linger(tmp_path):
    from twisted.internet.task import Clock

    from gateway.net.stdtls import LINGER

    clock = Clock()
    port, cert = await refuser(tmp_path, clock)
    try:
        client = await connect(port.getHost().port, cert)
        client.transport.write(b"hello")
        assert await within(client.received.get()) == b"NO"
        assert not client.closed.called  # Twisted's client end waits for its own close, not answering ours
        clock.advance(LINGER)
        await within(client.closed)
    finally:
        await port.stopListening()
