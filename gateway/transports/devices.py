"""
What the device transports with sessions of their own (TGP, MQTT) share:
their settings, the registry of devices online, and the Twisted side of a
session — bookkeeping in the factory, flow control as the pure session
(``session.py``) says, holding one message while the store has no room, one
timer, and the close. Each protocol's adapter adds its codec and its answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from twisted.internet import protocol
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from twisted.internet.defer import Deferred

from gateway.ingest.core import Ingest
from gateway.net.endpoints import EndpointSpec
from gateway.net.tcp import no_delay
from gateway.readings import CloseReason, Device, Source
from gateway.transport import DeviceRegistry, Port, Transport, TransportContext
from gateway.transports.flow import SessionFlow
from gateway.transports.session import DeviceSession


@dataclass(frozen=True)
class DeviceSettings:
    max_frame: int = 64 * 1024  # TGP: largest frame payload; MQTT: largest packet
    max_metrics: int = 1024
    window: int = 32  # messages a device may have unanswered (MQTT 5.0: Receive Maximum)
    handshake_timeout: float = 10.0  # from accept (TLS handshake included) to WELCOME or CONNACK
    max_heartbeat: int = 30  # the device pings after at most this many idle seconds
    idle_timeout: float = 120.0  # silence after which the gateway closes

    @property
    def heartbeat(self) -> int:
        """WELCOME's heartbeat_s: at most a third of the idle timeout, so a device that follows it is never idle."""
        return max(1, min(self.max_heartbeat, int(self.idle_timeout // 3)))


def source_health(status: dict[str, Any], working: str, stall: float) -> dict[str, Any]:
    """A broker source's /healthz entry: its status, ``ok``, and the problem in words once it has not been
    ``working`` (its state while it takes messages) for longer than ``stall`` seconds."""
    doc = {**status, "ok": True}
    if doc["state"] != working and doc["state_seconds"] > stall:
        doc.update(
            ok=False,
            problem=f"not {working} for {doc['state_seconds']:.0f}s"
            + (f": {doc['last_error']}" if doc["last_error"] else ""),
        )
    return doc


class DeviceNames:
    """
    Devices looked up by name, for transports where a device does not sign in
    (a broker's stream, a polled Modbus device): each is trusted for
    ``seconds`` (a revocation takes effect within it, or at once when the
    device watch reports the change through ``forget``).
    """

    SECONDS = 30.0
    SIZE = 100_000

    def __init__(self, ingest: Ingest, clock: IReactorTime) -> None:
        self.ingest = ingest
        self.clock = clock
        self._devices: dict[str, tuple[Device | None, float]] = {}

    def get(self, name: str) -> tuple[bool, Device | None]:
        """(looked up lately, the device of that name or None when it is unknown or revoked)."""
        entry = self._devices.get(name)
        if entry is None or entry[1] < self.clock.seconds():
            return False, None
        return True, entry[0]

    def look_up(self, name: str) -> Deferred:
        """Look a device up by name (fires with Device or None) and remember it for a while."""

        def found(result: tuple[Device, bytes] | None) -> Device | None:
            device = result[0] if result else None
            if len(self._devices) >= self.SIZE:
                self._devices.clear()
            self._devices[name] = (device, self.clock.seconds() + self.SECONDS)
            return device

        d: Deferred = self.ingest.device_key(name)
        return d.addCallback(found)

    def forget(self, names: list[str] | None = None) -> None:
        """Devices changed (added, revoked): look them up again."""
        if names is None:
            self._devices.clear()
        for name in names or ():
            self._devices.pop(name, None)


class DeviceConnection(SessionFlow, protocol.Protocol):
    """
    One device connection. Subclasses set ``handshake_too_slow`` and
    ``idle_too_long`` (timer callbacks), implement ``_process`` (take the
    events the codec has while the session may read) and ``end`` (close with
    a reason, the shared vocabulary being TGP's error codes).
    """

    transport: Any  # set by makeConnection before any event; Twisted types it Optional

    # One per connected device: slots keep an idle device's cost down (10,000 of them is the norm).
    __slots__ = (
        "factory",
        "session",
        "device",
        "source",
        "since",
        "readings",
        "last_error",
        "_closing",
        "_timer",
    )

    def __init__(self, factory: DeviceListenerFactory) -> None:
        self.factory = factory
        self.session: DeviceSession[Any] = DeviceSession(factory.settings.window)
        self.device: Device | None = None
        self.source = Source(factory.transport, "?", None, factory.tls)
        self.since = factory.clock.seconds()
        self.readings = 0  # readings stored new
        self.last_error = ""
        self._closing = False
        self._timer: Any = None

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.source = Source.of(self.factory.transport, self.transport.getPeer(), self.factory.tls)
        self.factory.connections.add(self)
        self._set_timer(self.factory.settings.handshake_timeout, self.handshake_too_slow)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._closing = True
        self._cancel_timer()
        self.factory.connections.discard(self)
        if self.device is not None:
            self.factory.registry.unregister(self.device.name, self)

    def _process(self) -> None:
        raise NotImplementedError

    def end(self, code: CloseReason, reason: str) -> None:
        raise NotImplementedError

    def handshake_too_slow(self) -> None:
        raise NotImplementedError

    def idle_too_long(self) -> None:
        raise NotImplementedError

    # -- backpressure ----------------------------------------------------

    def _looking_up(self, busy: bool) -> None:
        """A lookup of the device starts (read nothing meanwhile) or ends (read again, take what waits)."""
        self.session.busy = busy
        self.flow()
        if not busy:
            self._process()

    def flow_ended(self) -> bool:
        return self._closing

    def take(self) -> None:
        self._process()

    def _hold(self, message: Any, again: Callable[[Any], None]) -> None:
        """Keep one message until the store has room (then ``again(message)``); take nothing more meanwhile."""
        self.hold(self.factory.ingest, lambda: again(message))

    def stop_reading(self) -> None:
        """Take no more messages (shutdown); answers for those taken still go out."""
        self.session.stopped = True
        self.flow()

    def _close(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self.session.paused:
            self.transport.resumeProducing()  # TLS closes once it reads the peer's close_notify
        self.transport.loseConnection()

    # -- the one timer: the handshake's, then the idle one ------------------

    def _set_timer(self, seconds: float, what: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self.factory.clock.callLater(seconds, what)

    def _touch(self, idle_after: float) -> None:
        """Restart the idle timer; once connected it is the only timer, so reset it in place."""
        if self._timer is not None and self._timer.active():
            self._timer.reset(idle_after)
        elif idle_after:
            self._set_timer(idle_after, self.idle_too_long)

    def _not_reading(self, idle_after: float) -> bool:
        """
        Paused for backpressure, the gateway reads nothing, so the device's pings wait unread: that is not
        silence. Start the idle timer again and say so (True); False when the device really is silent.
        """
        if not self.session.paused or self._closing:
            return False
        self._set_timer(idle_after, self.idle_too_long)
        return True

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class DeviceListenerFactory(protocol.Factory):
    """The factory of one device endpoint: settings, the registry, the open connections."""

    noisy = False  # the listener says where it listens
    transport_name = ""  # "tgp" or "mqtt"; "+tls" is added on TLS endpoints

    def __init__(
        self,
        ingest: Ingest,
        registry: DeviceRegistry,
        *,
        clock: IReactorTime,
        settings: DeviceSettings,
        tls: bool = False,
        require_client_cert: bool = False,
        commands: Any = None,
    ) -> None:
        self.ingest = ingest
        self.commands = commands  # the gateway's commands service; None: this endpoint carries no commands
        self.metrics = ingest.metrics
        self.registry = registry
        self.clock = clock
        self.settings = settings
        self.tls = tls
        self.require_client_cert = require_client_cert
        self.transport = f"{self.transport_name}+tls" if tls else self.transport_name  # its connections' label
        self.connections: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        make: Any = self.protocol
        return make(self)

    def reconfigure(self, settings: DeviceSettings) -> None:
        """New settings (SIGHUP): new sessions take them all, open ones their window."""
        self.settings = settings
        for connection in self.connections:
            connection.session.set_window(settings.window)

    def certificate_allows(self, transport: Any, name: str) -> bool:
        """With client certificates required, the certificate must name the device (CN or SAN)."""
        return not self.require_client_cert or certificate_names(transport, name)


def device_settings(config: Any) -> DeviceSettings:
    """The session settings of the configuration (--device-window and the timeouts)."""
    return DeviceSettings(
        window=config.device_window,
        idle_timeout=config.device_idle_timeout,
        handshake_timeout=config.device_handshake_timeout,
    )


class SessionListeners(Transport):
    """A session transport's endpoints (TGP's --device, MQTT's --mqtt): a factory each, and their sessions."""

    def __init__(
        self,
        name: str,
        kind: type[DeviceListenerFactory],
        specs: tuple[EndpointSpec, ...],
        option: str,
        what: str,
        config: Any,
        context: TransportContext,
    ) -> None:
        super().__init__()
        self.name = name
        self.option = option
        self.what = what
        self.specs = specs
        self.client_ca = config.device_ca
        self.factories = [
            kind(
                context.ingest,
                context.registry,
                clock=context.reactor,
                settings=device_settings(config),
                tls=spec.tls,
                require_client_cert=spec.tls and config.device_ca is not None,
                commands=context.commands,
            )
            for spec in specs
        ]

    def ports(self) -> list[Port]:
        return [
            Port(
                spec,
                factory,
                self.option,
                f"{self.what} over TLS" if spec.tls else self.what,
                self.client_ca if spec.tls else None,
            )
            for spec, factory in zip(self.specs, self.factories)
        ]

    def sessions(self) -> list[Any]:
        return [session for factory in self.factories for session in factory.connections]

    def connections(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for factory in self.factories:
            out[factory.transport] = out.get(factory.transport, 0) + len(factory.connections)
        return out

    async def reconfigure(self, config: Any) -> list[str]:
        for factory in self.factories:
            factory.reconfigure(device_settings(config))
        return []


def certificate_names(transport: Any, name: str) -> bool:
    """Whether the TLS peer's certificate names the device (subject CN or a DNS subjectAltName)."""
    cert = transport.getPeerCertificate() if hasattr(transport, "getPeerCertificate") else None
    if cert is None:
        return False
    # The listeners' TLS is gateway.net.stdtls: a cryptography certificate.
    names = {a.value for a in cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names |= set(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    return name in names
