"""
The tracker transports as plugins (gateway/transport.py): Teltonika's
protocol on ``--teltonika`` endpoints, with the trackers' models in
``[tracker_types.NAME]`` tables (``trackers.py``).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from gateway.settings import Setting, server_endpoint
from gateway.transport import IDeviceTransport, Transport, TransportContext
from gateway.transports.devices import SessionListeners
from gateway.transports.teltonika_adapter import TeltonikaFactory
from gateway.transports.trackers import tracker_types_from_tables

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


class TrackerListeners(SessionListeners):
    """A tracker protocol's endpoints; each factory knows the models (a SIGHUP gives new ones)."""

    def __init__(self, *args: Any, types: dict[str, Any]) -> None:
        super().__init__(*args)
        self._types(types)

    def _types(self, types: dict[str, Any]) -> None:
        for factory in self.factories:
            setattr(factory, "tracker_types", types)  # noqa: B010 - a TeltonikaFactory's, not the base class's

    async def reconfigure(self, config: Any) -> list[str]:
        applied = await super().reconfigure(config)
        self._types(config.tracker_types)
        return applied


@implementer(IPlugin, IDeviceTransport)
class TeltonikaPlugin:
    name = "teltonika"
    order = 50
    settings = (
        Setting(
            "teltonika",
            (),
            server_endpoint(("ssl", "tcp")),
            "Endpoint for Teltonika trackers (FMB/FMC/FMM; Codec 8, 8 Extended, 16, and 12 for commands), such as "
            "tcp:5027; repeat for several. Trackers sign in by IMEI (gatewayctl device add NAME --imei IMEI).",
            multiple=True,
        ),
        TRACKER_TYPES,
    )

    def build(self, config: Any, context: TransportContext) -> Transport | None:
        if not config.teltonika:
            return None
        return TrackerListeners(
            "teltonika", TeltonikaFactory, config.teltonika, "teltonika", "Teltonika", config, context,
            types=config.tracker_types,
        )  # fmt: skip
