"""
The built-in device transports as plugins on the transport interface
(``gateway/transport.py``): HTTPS ingest, TGP, the MQTT listener, MQTT
broker sources and Modbus polling. ``twisted/plugins/gateway_transports.py``
registers them; a protocol of another package registers itself the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from gateway.ops.reports import StatusReport
from gateway.settings import Setting, duration, off_or, server_endpoint, text
from gateway.transport import IDeviceTransport, Port, Transport, TransportContext
from gateway.net.brokers import SourceError, SourceSettings, check_unique, source_from_table, source_from_url
from gateway.transports.devices import SessionListeners
from gateway.transports.http import ReadingsResource
from gateway.transports.modbus_map import ModbusConfigError, ModbusDevice, device_from_table
from gateway.transports.modbus_poll import ModbusPoller
from gateway.transports.mqtt_adapter import MQTTFactory
from gateway.transports.mqtt_source import BrokerSources
from gateway.transports.tgp_adapter import DeviceFactory

log = Logger()


# -- HTTPS ingest: POST /v1/readings on the gateway's HTTPS site ----------


class HttpsIngest(Transport):
    name = "https"

    def __init__(self, context: TransportContext) -> None:
        super().__init__()
        self.readings = ReadingsResource(context.ingest, context.commands)

    def resources(self) -> dict[bytes, Any]:
        return {b"readings": self.readings}


@implementer(IPlugin, IDeviceTransport)
class HttpsPlugin:
    name = "https"
    order = 0
    settings: tuple[Setting, ...] = ()  # the site's own: --https, --max-body, --request-timeout

    def build(self, config: Any, context: TransportContext) -> Transport:
        return HttpsIngest(context)


# -- TGP: the binary protocol (protocols/SPEC.rst) -------------------------


@implementer(IPlugin, IDeviceTransport)
class TgpPlugin:
    name = "tgp"
    order = 10
    settings = (
        Setting(
            "device",
            ("tcp:9000",),
            server_endpoint(("ssl", "tcp")),
            "Endpoint for devices speaking the binary protocol (TGP); repeat for several. "
            "ssl: endpoints use the same certificate as --https.",
            multiple=True,
        ),
    )

    def build(self, config: Any, context: TransportContext) -> Transport | None:
        if not config.device:
            return None
        return SessionListeners("tgp", DeviceFactory, config.device, "device", "TGP", config, context)


# -- MQTT 3.1.1 and 5.0: devices connect to the gateway ---------------------


class MqttListeners(SessionListeners):
    def ports(self) -> list[Port]:
        for spec in self.specs:
            if not spec.tls:
                log.warn(
                    "--mqtt {spec} is plain TCP: device tokens (MQTT passwords) cross the network in clear", spec=spec
                )
        return super().ports()


@implementer(IPlugin, IDeviceTransport)
class MqttPlugin:
    name = "mqtt"
    order = 20
    settings = (
        Setting(
            "mqtt",
            ("ssl:8883",),
            off_or(server_endpoint(("ssl", "tcp"))),
            "Endpoint for devices speaking MQTT 3.1.1 or 5.0 (user name: the device's name; password: its token); "
            "repeat for several, or 'off'. ssl: endpoints use the same certificate as --https; a tcp: endpoint "
            "carries device tokens in clear.",
            multiple=True,
        ),
    )

    def build(self, config: Any, context: TransportContext) -> Transport | None:
        if not config.mqtt:
            return None
        return MqttListeners("mqtt", MQTTFactory, config.mqtt, "mqtt", "MQTT", config, context)


# -- MQTT broker sources: the gateway consumes from brokers -----------------


def _source(value: Any) -> SourceSettings:
    """A broker to consume from: a URL (the command line) or an [[mqtt_source]] table (the config file)."""
    try:
        if isinstance(value, dict):
            return source_from_table(value, duration=lambda v: duration(v, 0.01))
        return source_from_url(text(value))
    except SourceError as e:
        raise ValueError(str(e)) from None


def _unique_sources(sources: tuple[SourceSettings, ...]) -> None:
    try:
        check_unique(list(sources))
    except SourceError as e:
        raise ValueError(str(e)) from None


class Brokers(Transport):
    name = "mqtt_source"

    def __init__(self, config: Any, context: TransportContext) -> None:
        super().__init__()
        self.config = config
        self.context = context
        self.sources: BrokerSources | None = None

    async def prepare(self) -> None:
        if self.config.mqtt_source or await self._reported_before():
            # Also with none configured now: sessions of sources this gateway had are retired or named as gone.
            self._start(self.config.mqtt_source)

    async def _reported_before(self) -> bool:
        """Did this gateway report MQTT sources before (so that some may need retiring)?"""
        sql = "SELECT EXISTS (SELECT 1 FROM mqtt_sources WHERE gateway = %s)"
        try:
            rows = await self.context.run(lambda c: c.runQuery(sql, (self.context.gateway_id,)))
        except Exception as e:
            log.warn("MQTT sources reported before not looked up: {error}", error=str(e))
            return False
        return bool(rows[0][0])

    def _start(self, sources: tuple[SourceSettings, ...]) -> None:
        c = self.context
        self.sources = BrokerSources(sources, c.ingest, c.reactor, c.gateway_id, c.run, c.commands)
        self.sources.setServiceParent(self)

    def live_metrics(self) -> Any:
        return self.sources.live_metrics() if self.sources is not None else iter(())

    def health(self) -> dict[str, tuple[Any, bool | None]]:
        doc = self.sources.health() if self.sources is not None else {}
        return {"mqtt_sources": (doc, all(s["ok"] for s in doc.values()))} if doc else {}

    def report(self) -> dict[str, Mapping[str, Mapping[str, Any]]]:
        status = self.sources.status() if self.sources is not None else {}
        return {
            "mqtt_sources": {
                name: {
                    "state": s["state"],
                    "in_flight": s["in_flight"],
                    "messages": s["messages"],
                    "rejected": s["rejected"],
                    "last_error": s["last_error"] or None,
                }
                for name, s in status.items()
            }
        }

    def forget(self, names: list[str] | None) -> None:
        if self.sources is not None:
            self.sources.forget(names)

    async def reconfigure(self, config: Any) -> list[str]:
        new, old = config.mqtt_source, self.config.mqtt_source
        self.config = config
        if new == old:
            return []
        if self.sources is not None:
            return await self.sources.reconfigure(new)
        if new:
            self._start(new)
        return [f"MQTT source {s.name} added" for s in new]


@implementer(IPlugin, IDeviceTransport)
class BrokerPlugin:
    name = "mqtt_source"
    order = 30
    settings = (
        Setting(
            "mqtt-source",
            (),
            _source,
            "An MQTT broker to consume readings from (mqtts://host:port, or mqtt:// to loopback): topics "
            "devices/+/+ in the shared subscription group txgateway, QoS 1, acknowledged after COMMIT; repeat "
            "for several. [[mqtt_source]] tables in the config file give credentials, topics and the rest.",
            multiple=True,
            live=True,
            check=_unique_sources,
        ),
    )

    def build(self, config: Any, context: TransportContext) -> Transport:
        return Brokers(config, context)


# -- Modbus/TCP polling ---------------------------------------------------


def _modbus(tables: Any) -> tuple[ModbusDevice, ...]:
    if not isinstance(tables, (list, tuple)):
        raise ValueError("[[modbus]]: give each polled device as a [[modbus]] table")
    try:
        devices = tuple(device_from_table(t, i, lambda v: duration(v, 0.0)) for i, t in enumerate(tables))
    except ModbusConfigError as e:
        raise ValueError(str(e)) from None
    seen: set[str] = set()
    for device in devices:
        if device.device in seen:
            raise ValueError(f"[[modbus]] {device.device!r}: two tables poll this device; give each one table")
        seen.add(device.device)
    return devices


class Modbus(Transport):
    name = "modbus"

    def __init__(self, config: Any, context: TransportContext) -> None:
        super().__init__()
        self.config = config
        self.context = context
        self.poller: ModbusPoller | None = None

    async def prepare(self) -> None:
        if self.config.modbus:
            self._start(self.config.modbus)

    def _start(self, devices: tuple[ModbusDevice, ...]) -> None:
        c = self.context
        self.poller = ModbusPoller(devices, c.ingest, c.reactor, commands=c.commands)
        self.poller.reporter = StatusReport("modbus_devices", c.gateway_id, self.poller.status, c.run, c.reactor)
        self.poller.setServiceParent(self)

    def live_metrics(self) -> Any:
        return self.poller.live_metrics() if self.poller is not None else iter(())

    def health(self) -> dict[str, tuple[Any, bool | None]]:
        # Named, not failing the check: a dead field device is not a sick gateway (a load balancer
        # would take a healthy gateway out for it); alert on gateway_modbus_gaps_total instead.
        return {"modbus": (self.poller.health(), None)} if self.poller is not None else {}

    def _status(self) -> dict[str, Any]:
        return self.poller.status() if self.poller is not None else {}

    def report(self) -> dict[str, Mapping[str, Mapping[str, Any]]]:
        return {
            "modbus": {
                name: {
                    "state": s["state"],
                    "host": f"{s['host']} unit {s['unit']}",
                    "polls": s["polls"],
                    "complete": s["complete_polls"],
                    "gaps": s["gaps"],
                    "last_error": s["last_error"] or None,
                }
                for name, s in self._status().items()
            }
        }

    def devices(self) -> Iterable[Mapping[str, Any]]:
        for name, s in self._status().items():
            yield {
                "device": name,
                "transport": f"modbus ({s['state']})",
                "address": f"{s['host']} unit {s['unit']}",
                "since": None if s["last_read_seconds"] is None else f"read {s['last_read_seconds']:.0f}s ago",
                "readings": s["readings"],
                "last_error": s["last_error"] or None,
            }

    def forget(self, names: list[str] | None) -> None:
        if self.poller is not None:
            self.poller.forget(names)

    async def reconfigure(self, config: Any) -> list[str]:
        new, old = config.modbus, self.config.modbus
        self.config = config
        if new == old:
            return []
        if self.poller is not None:
            return self.poller.configure(new)
        if new:
            self._start(new)
        return [f"Modbus device {d.device} added" for d in new]


@implementer(IPlugin, IDeviceTransport)
class ModbusPlugin:
    name = "modbus"
    order = 40
    settings = (
        Setting(
            "modbus",
            (),
            _modbus,
            "Modbus/TCP devices to poll: [[modbus]] tables in the config file (device, host, registers, interval).",
            live=True,
            option=False,
        ),
    )

    def build(self, config: Any, context: TransportContext) -> Transport:
        return Modbus(config, context)
