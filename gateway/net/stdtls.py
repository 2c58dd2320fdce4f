"""
TLS for every listener, on Python's ``ssl`` module over memory BIOs.

Why not Twisted's own TLS (``TLSMemoryBIOProtocol``, pyOpenSSL)? Memory.
Devices stay connected for days, mostly idle, by the thousand. Measured
on live heap after a TLS 1.3 handshake: 32.7 KB per idle server connection
with the OpenSSL that the ``cryptography`` wheel bundles (4.x), 16 KB with
the system OpenSSL behind ``ssl``; for 10,000 devices that is the
difference between about 430 and 270 MB of gateway. CPU, too: a
one-reading HTTPS request costs about 13% less than through pyOpenSSL's
cffi calls and Twisted's write aggregation. The policy is gateway/net/tls.py's:
TLS 1.2 or newer, ECDHE with AEAD ciphers, no session tickets.

Theory of operation. The wrapper sits between the TCP transport and the
device protocol. Bytes from the network go into the incoming BIO; the
handshake, then reads, run until OpenSSL wants more; what OpenSSL wrote to
the outgoing BIO goes to the network at once. The device protocol is
connected at TCP accept, so its handshake deadline covers the TLS
handshake too; what it writes before the handshake ends waits in a list.
Pausing, resuming and the peer address pass straight to TCP. All the
cryptography is OpenSSL's; this is plumbing.

Closing. ``loseConnection`` sends close_notify, then keeps reading (and
dropping) what the peer still sends until its close_notify, for at most
``LINGER`` seconds and ``LINGER_BYTES``, and only then closes TCP. Closing
at once would make the kernel answer a client still sending (the rest of
an over-long body refused with 413, say) with a reset, and the client would
lose the answer it was sent.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.net.tls import CIPHERS, TLSConfigError

log = Logger()

READ_SIZE = 64 * 1024
LINGER = 5.0  # seconds to wait for the peer's close_notify after ours
LINGER_BYTES = 4 * 2**20  # most application data read and dropped meanwhile


def server_context(
    cert_path: Path, key_path: Path, extra_chain: Path | None = None, client_ca: Path | None = None
) -> ssl.SSLContext:
    """The device endpoints' TLS policy; TLSConfigError names the file that cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)  # TLS 1.2 suites; every TLS 1.3 suite is ECDHE/AEAD already
    context.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.num_tickets = 0  # TLS 1.3: no session tickets to keep or send
    chain = cert_path
    combined = None
    try:
        if extra_chain is not None:
            fd, name = tempfile.mkstemp(suffix=".pem")
            combined = Path(name)
            with os.fdopen(fd, "wb") as f:
                f.write(cert_path.read_bytes() + b"\n" + extra_chain.read_bytes())
            chain = combined
        context.load_cert_chain(str(chain), str(key_path))
    except (OSError, ssl.SSLError) as e:
        raise TLSConfigError(f"{str(cert_path)!r} and {str(key_path)!r} cannot be used together ({e})") from None
    finally:
        if combined is not None:
            combined.unlink(missing_ok=True)
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except (OSError, ssl.SSLError) as e:
            raise TLSConfigError(f"{str(client_ca)!r} holds no PEM certificate ({e})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@implementer(ISSLTransport)
class TLSServerProtocol(ProtocolWrapper):
    transport: Any  # set by makeConnection before any event; Twisted types it Optional

    factory: TLSServerFactory

    def makeConnection(self, transport: Any) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = self.factory.context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._handshaken = False
        self._early: list[bytes] = []  # written by the protocol before the handshake ended
        self._lost = False
        self._linger: Any = None  # our close_notify is sent: the timer that ends the wait for the peer's
        self._dropped = 0
        ProtocolWrapper.makeConnection(self, transport)

    # -- from the network -------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._lost:
            return
        self._incoming.write(data)
        if self._linger is not None:
            self._drain()
            return
        if not self._handshaken:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except ssl.SSLError as e:
                self._flush()  # the alert, if OpenSSL wrote one
                self._fail(e)
                return
            self._handshaken = True
            self._flush()
            early, self._early = self._early, []
            for chunk in early:
                self.write(chunk)
        self._read()

    def _read(self) -> None:
        while not self._lost:
            try:
                data = self._tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLError as e:
                self._fail(e)
                return
            if not data:  # the peer's close_notify: answer it and close
                self.loseConnection()
                return
            self.wrappedProtocol.dataReceived(data)
            if self._linger is not None:  # the protocol closed: the rest is dropped
                return
        self._flush()

    def _fail(self, error: ssl.SSLError) -> None:
        peer = self.transport.getPeer()
        log.warn(
            "TLS with {host}:{port} failed: {error}",
            host=getattr(peer, "host", "?"),
            port=getattr(peer, "port", "?"),
            error=getattr(error, "reason", None) or str(error),
        )
        self._lost = True
        self._flush()  # OpenSSL's alert, so the peer hears why
        self.transport.loseConnection()

    # -- to the network ---------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._lost or self._linger is not None or not data:
            return
        if not self._handshaken:
            self._early.append(bytes(data))
            return
        view = memoryview(data)
        try:
            while view:
                written = self._tls.write(view)
                view = view[written:]
        except ssl.SSLError as e:
            self._fail(e)
            return
        self._flush()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            self.transport.write(pending)

    def loseConnection(self) -> None:
        if self._linger is not None:
            return
        if not self._handshaken or self._lost:
            self.transport.loseConnection()
            return
        self._linger = self.factory.clock.callLater(LINGER, self._close)
        # What has arrived is read first: OpenSSL fails a close_notify sent
        # with application data still unread, and the session is then lost.
        if self._drain():
            return
        try:
            self._tls.unwrap()  # our close_notify
        except ssl.SSLWantReadError:  # sent; the peer's is still to come
            self._flush()
        except ssl.SSLError:
            self._close()

    def _drain(self) -> bool:
        """Drop application data until the peer's close_notify; True once closed."""
        while True:
            try:
                data = self._tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                return False
            except ssl.SSLError:  # the peer's close_notify (SSLZeroReturnError) or a broken record
                data = b""
            self._dropped += len(data)
            if not data or self._dropped > LINGER_BYTES:
                self._close()
                return True

    def _close(self) -> None:
        if self._linger.active():
            self._linger.cancel()
        if not self._lost:
            self._lost = True
            try:
                self._tls.unwrap()  # our close_notify, if not sent yet
            except ssl.SSLError:
                pass
            self._flush()
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        ProtocolWrapper.connectionLost(self, reason)

    # -- ISSLTransport --------------------------------------------------

    def getPeerCertificate(self) -> x509.Certificate | None:
        der = self._tls.getpeercert(binary_form=True) if self._handshaken else None
        return x509.load_der_x509_certificate(der) if der else None


class TLSServerFactory(WrappingFactory):
    protocol = TLSServerProtocol
    noisy = False  # the listener says where it listens

    def __init__(self, context: ssl.SSLContext, wrapped: Any, clock: IReactorTime) -> None:
        super().__init__(wrapped)
        self.context = context
        self.clock = clock
