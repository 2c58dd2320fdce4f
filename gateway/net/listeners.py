"""
Listening endpoints as services, and the TLS they wear.

``Listener`` is a ``StreamServerEndpointService`` that binds in
``privilegedStartService`` (so a port in use, or one below 1024 for a user
that may not bind it, stops the start with one line naming the option)
and says where it listens. A *held* listener is bound but accepts nothing
until ``open()``: the devices' and HTTPS ports are held until the gateway
can answer (the database connected, the schema checked, the journal open),
so a device reconnecting after a restart or a load balancer's first probe
waits in the kernel's queue for an answer instead of getting 503. ``Listeners`` holds them; stopping it twice (the
assembler stops listening first, then everything) does no harm.

``TLSWrapper`` puts the ssl module's TLS (``net.stdtls``) around a
factory: with the endpoint's own certificate, else ``--tls-cert``, else the
data directory's (a local CA and a server certificate it signs, made on
first start, renewed before expiry and logged with their SHA-256
fingerprints).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.reactor import Reactor
from gateway.errors import StartError
from gateway.net.endpoints import EndpointSpec
from gateway.net.limits import ConnectionLimits, LimitedFactory
from gateway.net.stdtls import TLSServerFactory, server_context
from gateway.net.tls import ServerCredentials, TLSConfigError, local_credentials

log = Logger()


class Listener(StreamServerEndpointService):
    _raiseSynchronously = True

    def __init__(
        self, reactor: Reactor, spec: EndpointSpec, factory: Any, option: str, what: str, held: bool = False
    ) -> None:
        super().__init__(serverFromString(reactor, spec.tcp_description()), factory)
        self.spec = spec
        self.option = option
        self.what = what
        self.held = held  # bound, but accepting nothing until open() (the kernel queues the connections)
        self.port: Any = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            raise StartError(f"--{self.option}: cannot listen on {self.spec}: {e}") from None
        assert self._waitingForPort is not None
        self._waitingForPort.addCallback(self._bound)  # TCP binds synchronously: this runs now

    def _bound(self, port: Any) -> Any:
        self.port = port
        if self.held:
            port.stopReading()
        else:
            self._announce()
        return port

    def open(self) -> None:
        """Start accepting the connections a held listener has been queueing."""
        if self.held and self.port is not None:
            self.held = False
            self.port.startReading()
            self._announce()

    def _announce(self) -> None:
        host = self.port.getHost()
        log.info("listening for {what} on {host}:{port}", what=self.what, host=host.host, port=host.port)


@dataclass(frozen=True)
class Port:
    """A port a transport listens on; the gateway adds TLS and the connection limits."""

    spec: EndpointSpec
    factory: Any
    option: str  # the option that asked for it (log lines, errors)
    what: str  # what it serves, as the log says it ("TGP over TLS")
    client_ca: Any = None  # PEM file: require client certificates signed by it (TLS only)
    devices: bool = True  # takes readings: counted against the connection limits, opened once the gateway answers


class Listeners(MultiService):
    """Every port of the gateway: bound in the privileged start, opened once the gateway can answer."""

    def __init__(self, reactor: Reactor, tls: TLSWrapper, limits: ConnectionLimits) -> None:
        super().__init__()
        self.reactor = reactor
        self.tls = tls
        self.limits = limits

    def add(self, port: Port) -> None:
        """A listener for the port: TLS for ssl: endpoints; the connection limits for the ports devices use."""
        factory = port.factory
        if port.spec.tls:
            factory = self.tls.wrap(port.spec, factory, port.option, port.client_ca)
        if port.devices:  # outside TLS: a connection over the limits costs no handshake
            factory = LimitedFactory(factory, self.limits)
        # The ports that take readings open only once the gateway can answer.
        Listener(self.reactor, port.spec, factory, port.option, port.what, held=port.devices).setServiceParent(self)

    def open(self) -> None:
        for listener in self:
            listener.open()

    def ports(self, option: str) -> list[Any]:
        """The bound ports of that option (``port.getHost()`` says where)."""
        return [s.port for s in self if s.option == option]

    def stopService(self) -> Deferred:
        if not self.running:
            return succeed(None)
        return super().stopService() or succeed(None)


class TLSWrapper:
    """
    TLS for the listeners: the endpoint's own certificate, ``--tls-cert``, or the data directory's (a local
    CA and a server certificate it signs), which ``renew`` makes anew before it expires and hands to every
    listener using it without a restart: connections made after it get the new one.
    """

    def __init__(self, reactor: IReactorTime, tls_dir: Path, cert: Path | None, key: Path | None) -> None:
        self.reactor = reactor
        self.tls_dir = tls_dir
        self.cert = cert
        self.key = key
        self.local: ServerCredentials | None = None  # the data directory's, once a listener uses it
        self._using_local: list[tuple[TLSServerFactory, EndpointSpec, Path | None]] = []

    def _local(self) -> ServerCredentials:
        if self.local is None:
            try:
                self.local = local_credentials(self.tls_dir)
            except TLSConfigError as e:
                raise StartError(f"--data-dir: {e}") from None
            _announce(self.local)
        return self.local

    def _credentials(self, spec: EndpointSpec, option: str) -> tuple[Any, Any, str]:
        """(certificate, key, the option they come from) for a TLS endpoint."""
        if spec.private_key is not None:
            return spec.cert_key, spec.private_key, option
        if self.cert is not None:
            return self.cert, self.key, "tls-cert"
        made = self._local()
        return made.cert_path, made.key_path, "tls-cert"

    def renewal(self, every: float) -> Any:
        """A service that looks every ``every`` seconds whether the data directory's certificate is due
        (None when the listeners use certificates of their own)."""
        if self.local is None:
            return None
        service = TimerService(every, self.renew)
        service.clock = self.reactor
        return service

    def renew(self, now: Any = None) -> bool:
        """
        Renew the data directory's certificate if it is due (or was moved to the new layout by gatewayctl),
        and give it to the listeners using it; True when it changed. Never raises: a failure is logged and
        the certificate in use stays.
        """
        if self.local is None:
            return False
        try:
            fresh = local_credentials(self.tls_dir, now=now)
            if fresh.fingerprint == self.local.fingerprint:
                return False
            for factory, spec, client_ca in self._using_local:
                factory.context = server_context(fresh.cert_path, fresh.key_path, spec.extra_cert_chain, client_ca)
        except (TLSConfigError, OSError) as e:
            log.error("TLS certificate not renewed, the one in use stays: {error}", error=str(e))
            return False
        self.local = fresh
        _announce(fresh, renewed=True)
        return True

    def wrap(self, spec: EndpointSpec, factory: Any, option: str, client_ca: Path | None = None) -> Any:
        cert, key, source = self._credentials(spec, option)
        try:
            # The ssl module's TLS: half the memory of pyOpenSSL's for idle devices,
            # and a small HTTPS request costs 13% less CPU (net/stdtls.py).
            wrapped = TLSServerFactory(
                server_context(cert, key, spec.extra_cert_chain, client_ca), factory, self.reactor
            )
            if self.local is not None and cert == self.local.cert_path:
                self._using_local.append((wrapped, spec, client_ca))
            return wrapped
        except TLSConfigError as e:
            if client_ca is not None and str(client_ca) in str(e):
                source = "device-ca"
            raise StartError(f"--{source}: {e}") from None


def _announce(made: ServerCredentials, renewed: bool = False) -> None:
    if made.legacy:
        log.warn(
            "using the self-signed TLS certificate {path} (SHA-256 fingerprint {fingerprint}) of a data directory "
            "made before the local CA: strict verifiers refuse a CA certificate as a server's. Move it on with "
            "'gatewayctl tls new-layout' (devices then trust {ca})",
            path=str(made.cert_path),
            fingerprint=made.fingerprint,
            ca=str(made.cert_path.with_name("ca.crt")),
        )
        return
    log.info(
        "{what} TLS certificate {path} (SHA-256 fingerprint {fingerprint}, until {until}), signed by the local CA "
        "{ca} that devices trust (SHA-256 fingerprint {ca_fingerprint})",
        what="renewed" if renewed else "made" if made.created else "using",
        path=str(made.cert_path),
        fingerprint=made.fingerprint,
        until=made.not_after.date().isoformat() if made.not_after else "?",
        ca=str(made.ca_path),
        ca_fingerprint=made.ca_fingerprint,
    )
