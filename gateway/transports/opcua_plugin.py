"""OPC UA subscriptions as a plugin on the transport interface (``gateway/transport.py``): ``[[opcua]]`` tables."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from gateway.ops.reports import StatusReport
from gateway.settings import Setting, duration
from gateway.transport import IDeviceTransport, Transport, TransportContext
from gateway.transports.opcua_settings import OpcuaConfigError, OpcuaSource, source_from_table

if TYPE_CHECKING:
    from gateway.transports.opcua import OpcuaSources


def _opcua(tables: Any) -> tuple[OpcuaSource, ...]:
    if not isinstance(tables, (list, tuple)):
        raise ValueError("[[opcua]]: give each OPC UA server as an [[opcua]] table")
    try:
        sources = tuple(source_from_table(t, i, lambda v: duration(v, 0.0)) for i, t in enumerate(tables))
    except OpcuaConfigError as e:
        raise ValueError(str(e)) from None
    names: set[str] = set()
    metrics: set[tuple[str, str]] = set()
    for s in sources:
        if s.name in names:
            raise ValueError(f"[[opcua]] {s.name!r}: two tables have this name; give each its own name")
        names.add(s.name)
        for item in s.items:
            if (item.device, item.metric) in metrics:
                raise ValueError(f"[[opcua]] {s.name!r}: {item.device} {item.metric} comes from another table too")
            metrics.add((item.device, item.metric))
    return sources


class Opcua(Transport):
    name = "opcua"

    def __init__(self, config: Any, context: TransportContext) -> None:
        super().__init__()
        self.config = config
        self.context = context
        self.sources: OpcuaSources | None = None

    async def prepare(self) -> None:
        if self.config.opcua:
            self._start(self.config.opcua)

    def _start(self, sources: tuple[OpcuaSource, ...]) -> None:
        # asyncua (a quarter of a second to import) only where [[opcua]] tables are: not for every
        # gateway start and gatewayctl command.
        from gateway.transports.opcua import OpcuaSources

        c = self.context
        self.sources = OpcuaSources(sources, c.ingest, c.reactor, self.config.data_dir / "opcua", c.commands)
        self.sources.reporter = StatusReport("opcua_sources", c.gateway_id, self.sources.status, c.run, c.reactor)
        self.sources.setServiceParent(self)

    def live_metrics(self) -> Any:
        return self.sources.live_metrics() if self.sources is not None else iter(())

    def health(self) -> dict[str, tuple[Any, bool | None]]:
        # Named, not failing the check: a PLC that is down is not a sick gateway (as for Modbus).
        return {"opcua": (self.sources.health(), None)} if self.sources is not None else {}

    def _status(self) -> dict[str, Any]:
        return self.sources.status() if self.sources is not None else {}

    def report(self) -> dict[str, Mapping[str, Mapping[str, Any]]]:
        return {
            "opcua": {
                name: {
                    "state": s["state"],
                    "endpoint": s["endpoint"],
                    "monitored": s["monitored"],
                    "readings": s["readings"],
                    "gaps": s["gaps"],
                    "last_error": s["last_error"] or None,
                }
                for name, s in self._status().items()
            }
        }

    def devices(self) -> Iterable[Mapping[str, Any]]:
        if self.sources is None:
            return
        for name, s in self._status().items():
            for device in self.sources.sources[name].settings.devices:
                yield {
                    "device": device,
                    "transport": f"opcua ({s['state']})",
                    "address": s["endpoint"],
                    "since": None if s["last_value_seconds"] is None else f"value {s['last_value_seconds']:.0f}s ago",
                    "readings": s["readings"],
                    "last_error": s["last_error"] or None,
                }

    def forget(self, names: list[str] | None) -> None:
        if self.sources is not None:
            self.sources.forget(names)

    async def reconfigure(self, config: Any) -> list[str]:
        new, old = config.opcua, self.config.opcua
        self.config = config
        if new == old:
            return []
        if self.sources is not None:  # new sessions for the new tables: a few seconds without values, counted
            stopped = self.sources.disownServiceParent()
            self.sources = None
            if stopped is not None:
                await stopped
        if new:
            self._start(new)
        before, after = {s.name for s in old}, {s.name for s in new}
        return (
            [f"OPC UA server {n} added" for n in sorted(after - before)]
            + [f"OPC UA server {n} removed" for n in sorted(before - after)]
            + [f"OPC UA server {n} subscribed again" for n in sorted(after & before)]
        )


@implementer(IPlugin, IDeviceTransport)
class OpcuaPlugin:
    name = "opcua"
    order = 45
    settings = (
        Setting(
            "opcua",
            (),
            _opcua,
            "OPC UA servers to subscribe to: [[opcua]] tables in the config file (device, endpoint, security, "
            "[[opcua.node]] or [[opcua.browse]]).",
            live=True,
            option=False,
        ),
    )

    def build(self, config: Any, context: TransportContext) -> Transport:
        return Opcua(config, context)
