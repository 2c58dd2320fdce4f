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

``TLSWrapper`` puts the ssl module's TLS (``transports.stdtls``) around a
factory: with the endpoint's own certificate, else ``--tls-cert``, else the
self-signed certificate it makes once in the data directory (and logs with
its SHA-256 fingerprint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.config import StartError
from gateway.transports.endpoints import EndpointSpec
from gateway.transports.stdtls import TLSServerFactory, server_context
from gateway.transports.tls import TLSConfigError, make_self_signed

log = Logger()


class Listener(StreamServerEndpointService):
    _raiseSynchronously = True

    def __init__(
        self, reactor: Any, spec: EndpointSpec, factory: Any, option: str, what: str, held: bool = False
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


class Listeners(MultiService):
    def stopService(self) -> Deferred:
        if not self.running:
            return succeed(None)
        return super().stopService() or succeed(None)


class TLSWrapper:
    def __init__(self, reactor: IReactorTime, tls_dir: Path, cert: Path | None, key: Path | None) -> None:
        self.reactor = reactor
        self.tls_dir = tls_dir
        self.cert = cert
        self.key = key
        self._announced = False

    def _credentials(self, spec: EndpointSpec, option: str) -> tuple[Any, Any, str]:
        """(certificate, key, the option they come from) for a TLS endpoint."""
        if spec.private_key is not None:
            return spec.cert_key, spec.private_key, option
        if self.cert is not None:
            return self.cert, self.key, "tls-cert"
        made = make_self_signed(self.tls_dir)
        if made.created or not self._announced:
            self._announced = True
            log.info(
                "{what} self-signed TLS certificate {path}, SHA-256 fingerprint {fingerprint}",
                what="made" if made.created else "using",
                path=str(made.cert_path),
                fingerprint=made.fingerprint,
            )
        return made.cert_path, made.key_path, "tls-cert"

    def wrap(self, spec: EndpointSpec, factory: Any, option: str, client_ca: Path | None = None) -> Any:
        cert, key, source = self._credentials(spec, option)
        try:
            # The ssl module's TLS: half the memory of pyOpenSSL's for idle devices,
            # and a small HTTPS request costs 13% less CPU (transports/stdtls.py).
            return TLSServerFactory(server_context(cert, key, spec.extra_cert_chain, client_ca), factory, self.reactor)
        except TLSConfigError as e:
            if client_ca is not None and str(client_ca) in str(e):
                source = "device-ca"
            raise StartError(f"--{source}: {e}") from None
