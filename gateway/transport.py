"""
The transport interface: what a device protocol gives the gateway, and what
the gateway gives it.

A protocol is a plugin: an object providing ``IDeviceTransport`` in a module
of the ``twisted.plugins`` package (Twisted's own plugin discovery, as twistd
finds the ``gateway`` plugin), so it may live in a package of its own. The
built-in ones (HTTPS ingest, TGP, the MQTT listener, MQTT broker sources,
Modbus polling) are registered the same way, in
``twisted/plugins/gateway_transports.py``.

The plugin names its settings (options and config-file tables; the shared
parsers in ``gateway/settings.py`` check them, so a bad value stops the
start with one line) and builds a ``Transport`` for one gateway from the
configuration and a ``TransportContext``. The ``Transport`` says which ports
it listens on, which resources it adds to the HTTPS site, what it starts
once the database answers, its device sessions, its /metrics, its /healthz
and console sections, and how a SIGHUP's new configuration reaches it. The
gateway wraps its ports (TLS, connection limits) and holds them until it can
answer; the transport never touches the store: it goes through ``Ingest``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.plugin import IPlugin, getPlugins
from zope.interface import Attribute, Interface

from gateway.reactor import Reactor
from gateway.errors import StartError
from gateway.ingest.core import Ingest
from gateway.net.listeners import Port
from gateway.readings import CloseReason
from gateway.settings import Setting

log = Logger()


class IDeviceTransport(Interface):
    """A device protocol, found by ``twisted.plugin`` in the ``twisted.plugins`` package."""

    name = Attribute("Short unique name ('tgp', 'mqtt', …): the log, /healthz and gatewayctl use it.")
    order = Attribute("Where it comes among the transports (ports, /healthz); the built-in ones use 0..99.")
    settings = Attribute(
        "Tuple of gateway.settings.Setting: the options (and config-file keys and tables) it reads; "
        "their values are the configuration's attributes by Setting.key."
    )

    def build(config: Any, context: TransportContext) -> Transport | None:
        """This gateway's transport for ``config``; None when it has nothing to do (and none can be added
        by a SIGHUP)."""


class DeviceRegistry:
    """Devices online on this gateway; a new session of a device replaces the old one, whatever the transport."""

    def __init__(self) -> None:
        self.sessions: dict[str, Any] = {}

    def register(self, name: str, session: Any) -> None:
        old = self.sessions.get(name)
        self.sessions[name] = session
        if old is not None and old is not session:
            old.end(CloseReason.REPLACED, "a newer connection of this device replaced this one")

    def unregister(self, name: str, session: Any) -> None:
        if self.sessions.get(name) is session:
            del self.sessions[name]


class TransportContext:
    """What the gateway gives every transport it builds."""

    def __init__(
        self,
        ingest: Ingest,
        reactor: Reactor,
        registry: DeviceRegistry,
        identity: Callable[[], str],
        run: Callable[[Callable[[Any], Deferred]], Deferred],
        commands: Any = None,
    ) -> None:
        self.ingest = ingest  # the one way in: authenticate, admit, store, refuse
        self.reactor = reactor
        self.registry = registry  # one session per device across the session transports
        self._identity = identity
        self.run = run  # a read-pool connection: run(lambda c: c.runQuery(sql, params))
        # The gateway's commands service (gateway.commands.service.Commands): a transport that can reach a
        # device attaches the device's downlink to it and reports what the device answers.
        self.commands = commands

    @property
    def gateway_id(self) -> str:
        """This gateway's stable identity (kept in the data directory), for its rows of shared tables.
        Known once the gateway starts: ask for it in ``prepare`` or later, not in ``build``."""
        return self._identity()


class Transport(MultiService):
    """
    A transport as built for one gateway. Every method has a default that
    does nothing, so a transport overrides only what it has. As a service it
    is started after the database answers (``prepare`` first) and stopped
    with the gateway; its ports close before that.
    """

    name = ""

    def ports(self) -> Sequence[Port]:
        """The ports to listen on (bound at start, before the database is up)."""
        return ()

    def resources(self) -> Mapping[bytes, Any]:
        """Children of the HTTPS site's /v1/ (``twisted.web`` resources) by path segment."""
        return {}

    async def prepare(self) -> None:
        """Once the database answers, before this service starts: look up what it needs."""

    def sessions(self) -> Iterable[Any]:
        """Device sessions open now. Each has ``device`` (None until authenticated), ``source``, ``since``,
        ``readings``, ``last_error``, ``transport`` (its transport), ``stop_reading()`` and
        ``end(CloseReason, reason)``."""
        return ()

    def connections(self) -> Mapping[str, int]:
        """Open connections by transport label ("tgp+tls"), for /metrics and the console."""
        return {}

    def live_metrics(self) -> Iterator[Any]:
        """prometheus_client metric families for /metrics."""
        return iter(())

    def health(self) -> Mapping[str, tuple[Any, bool | None]]:
        """/healthz sections: key → (document, ok). A False ok makes the gateway unhealthy; None names the
        section without judging (a dead field device is not a sick gateway)."""
        return {}

    def report(self) -> Mapping[str, Mapping[str, Mapping[str, Any]]]:
        """The console's status() sections: key → name → fields."""
        return {}

    def devices(self) -> Iterable[Mapping[str, Any]]:
        """The console's devices() rows it adds (device, transport, address, since, readings, last_error)."""
        return ()

    def forget(self, names: list[str] | None) -> None:
        """Devices added, changed or revoked (None: any): drop what is cached of them."""

    async def reconfigure(self, config: Any) -> list[str]:
        """A SIGHUP's configuration (live settings applied); returns what changed, as the log says it."""
        return []


class Transports(list[Transport]):
    """The transports of one gateway, as the assembler, /healthz, /metrics and the console ask of them all."""

    def named(self, name: str) -> Transport | None:
        return next((t for t in self if t.name == name), None)

    def ports(self) -> list[Port]:
        return [port for t in self for port in t.ports()]

    def resources(self) -> dict[bytes, Any]:
        return {name: resource for t in self for name, resource in t.resources().items()}

    def sessions(self) -> list[Any]:
        return [session for t in self for session in t.sessions()]

    def online(self) -> dict[str, list[Any]]:
        """Authenticated sessions by device name."""
        out: dict[str, list[Any]] = {}
        for session in self.sessions():
            if session.device is not None:
                out.setdefault(session.device.name, []).append(session)
        return out

    def close(self, name: str, reason: CloseReason, text: str) -> int:
        """End every session of a device; how many there were."""
        sessions = self.online().get(name, [])
        for session in sessions:
            session.end(reason, text)
        return len(sessions)

    def connections(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self:
            for label, count in t.connections().items():
                out[label] = out.get(label, 0) + count
        return out

    def live_metrics(self) -> Iterator[Any]:
        for t in self:
            yield from t.live_metrics()

    def forget(self, names: list[str] | None) -> None:
        for t in self:
            t.forget(names)

    async def start(self, parent: Any) -> None:
        for t in self:
            await t.prepare()
            t.setServiceParent(parent)

    async def reconfigure(self, config: Any) -> list[str]:
        applied: list[str] = []
        for t in self:
            applied += await t.reconfigure(config)
        return applied


def built(config: Any, context: TransportContext) -> Transports:
    """Every installed transport that has something to do with ``config``, built for one gateway."""
    return Transports(t for t in (plugin.build(config, context) for plugin in transports()) if t is not None)


def _discovered() -> list[Any]:
    import twisted.plugins

    found = [p for p in getPlugins(IDeviceTransport, twisted.plugins) if IPlugin.providedBy(p)]
    return sorted(found, key=lambda p: (getattr(p, "order", 100), p.name))


_found: list[Any] | None = None


def transports() -> list[Any]:
    """Every installed transport plugin, in order; StartError when two share a name or a setting."""
    global _found
    if _found is None:
        found = _discovered()
        names: dict[str, Any] = {}
        for plugin in found:
            if plugin.name in names:
                raise StartError(f"two device transport plugins are named {plugin.name!r}: remove one")
            names[plugin.name] = plugin
        _found = found
    return _found


def transport_settings(core: Iterable[Setting] = ()) -> tuple[Setting, ...]:
    """The transports' settings; StartError when one repeats a name of another or of ``core``."""
    seen = {s.name: "the gateway" for s in core}
    out = []
    for plugin in transports():
        for setting in plugin.settings:
            if setting.name in seen:
                raise StartError(
                    f"device transport {plugin.name!r} defines the setting {setting.name!r}, "
                    f"which {seen[setting.name]} defines already"
                )
            seen[setting.name] = f"transport {plugin.name!r}"
            out.append(setting)
    return tuple(out)
