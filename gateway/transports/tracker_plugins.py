"""
The tracker transports as plugins (gateway/transport.py): Teltonika's
protocol on ``--teltonika`` endpoints, with the trackers' models in
``[tracker_types.NAME]`` tables (``trackers.py``), and GT06 on ``--gt06``.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from gateway.settings import Setting, server_endpoint
from gateway.transport import IDeviceTransport, Transport, TransportContext
from gateway.transports.devices import SessionListeners
from gateway.net.endpoints import EndpointSpec
from gateway.transports.gt06_adapter import Gt06Factory
from gateway.transports.teltonika_adapter import TeltonikaFactory, TeltonikaUdp
from gateway.net.ranges import network
from gateway.transports.trackers import Jumps, max_speed, tracker_types_from_tables

log = Logger()

TRACKER_TYPES = Setting(
    "tracker-types",
    {},
    tracker_types_from_tables,
    'Trackers\' models: [tracker_types.NAME] tables map IO ids to metrics (66 = { metric = "external_voltage", '
    "scale = 0.001 }); fmb920 and fmc130 are built in. A device's model is its --type.",
    live=True,
    option=False,
)


TRACKER_ALLOW = Setting(
    "tracker-allow",
    (),
    network,
    "An address range trackers may connect from (10.64.0.0/10: the carrier's private APN); repeat for several. "
    "Without it any address may; a tracker from elsewhere is refused before its IMEI is read.",
    multiple=True,
    live=True,
)


TRACKER_MAX_SPEED = Setting(
    "tracker-max-speed",
    300.0,
    max_speed,
    "The impossible-jump rule: a tracker's fix that implies more than this many km/h from its last believed "
    "one is kept in quarantine, not stored as its position; 'off' believes every fix.",
    live=True,
)


class TrackerListeners(SessionListeners):
    """
    A tracker protocol's endpoints: TCP and TLS ones as every session transport's, and UDP ones, bound once
    the database answers (a datagram is answered only after its records are stored). Each knows the
    trackers' models; a SIGHUP gives new ones.
    """

    def __init__(self, name: str, factory: type, specs: tuple[EndpointSpec, ...], *args: Any, **kw: Any) -> None:
        self.types = kw.pop("types")
        self.allow = kw.pop("allow")
        self.jumps = Jumps(kw.pop("max_speed"))
        self.udp_specs = tuple(s for s in specs if s.kind == "udp")
        self.udp_kind = kw.pop("udp")
        super().__init__(name, factory, tuple(s for s in specs if s.kind != "udp"), *args)
        self.context = args[-1]
        self.udp: list[Any] = []  # (protocol, listening port)
        self._types(self.types)

    def _types(self, types: dict[str, Any]) -> None:
        for factory in self.factories:
            setattr(factory, "tracker_types", types)  # noqa: B010 - a TeltonikaFactory's, not the base class's
            setattr(factory, "allow", self.allow)  # noqa: B010
            setattr(factory, "jumps", self.jumps)  # noqa: B010
        for udp, _ in self.udp:
            udp.tracker_types, udp.allow, udp.jumps = types, self.allow, self.jumps

    def startService(self) -> None:
        super().startService()
        c = self.context
        for spec in self.udp_specs:
            udp = self.udp_kind(c.ingest, c.reactor, self.types)
            udp.allow, udp.jumps = self.allow, self.jumps
            port = c.reactor.listenUDP(spec.port, udp, interface=spec.interface)
            self.udp.append((udp, port))
            host = port.getHost()
            log.info("listening for {what} over UDP on {host}:{port}", what=self.what, host=host.host, port=host.port)

    def stopService(self) -> Any:
        for _, port in self.udp:
            port.stopListening()
        self.udp = []
        return super().stopService()

    def udp_ports(self) -> list[Any]:
        return [port for _, port in self.udp]

    def forget(self, names: list[str] | None) -> None:
        super().forget(names)
        for udp, _ in self.udp:
            udp.forget()

    async def reconfigure(self, config: Any) -> list[str]:
        applied = await super().reconfigure(config)
        self.types, self.allow = config.tracker_types, config.tracker_allow
        self.jumps.max_kmh = config.tracker_max_speed
        self._types(self.types)
        return applied


@implementer(IPlugin, IDeviceTransport)
class TeltonikaPlugin:
    name = "teltonika"
    order = 50
    settings = (
        Setting(
            "teltonika",
            (),
            server_endpoint(("ssl", "tcp", "udp")),
            "Endpoint for Teltonika trackers (FMB/FMC/FMM; Codec 8, 8 Extended, 16, and 12 for commands): tcp:5027, "
            "ssl:5028 or udp:5027; repeat for several. Trackers sign in by IMEI (gatewayctl device add NAME "
            "--imei IMEI).",
            multiple=True,
        ),
        TRACKER_TYPES,
        TRACKER_ALLOW,
        TRACKER_MAX_SPEED,
    )

    def build(self, config: Any, context: TransportContext) -> Transport | None:
        if not config.teltonika:
            return None
        return TrackerListeners(
            "teltonika", TeltonikaFactory, config.teltonika, "teltonika", "Teltonika", config, context,
            types=config.tracker_types, udp=TeltonikaUdp, allow=config.tracker_allow,
            max_speed=config.tracker_max_speed,
        )  # fmt: skip


@implementer(IPlugin, IDeviceTransport)
class Gt06Plugin:
    name = "gt06"
    order = 51
    settings = (
        Setting(
            "gt06",
            (),
            server_endpoint(("ssl", "tcp")),
            "Endpoint for GT06 trackers (Concox/Jimi: login, locations, status, alarms, online commands), such as "
            "tcp:5023; repeat for several. Trackers sign in by IMEI (gatewayctl device add NAME --imei IMEI).",
            multiple=True,
        ),
    )

    def build(self, config: Any, context: TransportContext) -> Transport | None:
        if not config.gt06:
            return None
        return TrackerListeners(
            "gt06", Gt06Factory, config.gt06, "gt06", "GT06", config, context,
            types=config.tracker_types, udp=None, allow=config.tracker_allow, max_speed=config.tracker_max_speed,
        )  # fmt: skip
