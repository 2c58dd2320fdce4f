"""
Commands to devices that sit on a broker the gateway consumes from: with
``command-topic`` in the ``[[mqtt_source]]`` table (``devices/{device}/
commands/{id}``), a device the source has heard from is reachable through
it. Each command is published there at QoS 1, ``{"id", "name", "params",
"expires"}`` (v5 adds Response Topic and Correlation Data); the broker's
PUBACK makes it ``delivered`` (the broker has it: it hands it to the device as
the device's own session allows); the device publishes its result to the same
topic with ``/result`` added, which the source subscribes to (in its shared
group, so one gateway takes each result) and acknowledges once recorded.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from gateway.commands.model import Command, CommandError, parse_result
from gateway.commands.service import IDownlink
from gateway.readings import InvalidInput
from protocols import mqtt

log = Logger()

P = mqtt.Property
WINDOW = 10  # commands published and not yet PUBACKed, per device
FIRST_ID = 2  # packet id 1 is the source's SUBSCRIBE


def result_of(template: str, topic: str) -> tuple[str, str] | None:
    """(device, command id) of a result published to ``template``/result, or None."""
    levels, parts = [*template.split("/"), "result"], topic.split("/")
    if len(levels) != len(parts):
        return None
    found: dict[str, str] = {}
    for level, part in zip(levels, parts):
        if level in ("{device}", "{id}"):
            if not part:
                return None
            found[level] = part
        elif level != part:
            return None
    return found["{device}"], found["{id}"]


def parsed_result(id_: str, payload: bytes) -> tuple[str, Any]:
    try:
        return parse_result(json.loads(payload))
    except (ValueError, CommandError) as e:
        message = e.message if isinstance(e, CommandError) else f"not JSON: {e}"
        raise InvalidInput(f"the result of command {id_}: {message}") from None


@implementer(IDownlink)
class BrokerDownlink:
    """A device on the broker of one source: commands go out over the source's connection."""

    transport = "mqtt_source"

    def __init__(self, source: Any, device: str, commands: Any) -> None:
        self.source = source  # a mqtt_source.BrokerSource
        self.device = device
        self.commands = commands
        self.in_flight: dict[int, str] = {}  # packet id -> command id, on the current connection
        self.client: Any = None  # the connection in_flight belongs to

    def _connection(self) -> Any:
        client = self.source.client
        if client is None or client.closing or not self.source.subscribed_now:
            return None
        if client is not self.client:  # a new connection: what the last one had in flight is sent again later
            self.client, self.in_flight = client, {}
        return client

    def room(self) -> int:
        return max(0, WINDOW - len(self.in_flight)) if self._connection() is not None else 0

    def deliver(self, command: Command) -> None:
        client = self._connection()
        if client is None:
            return  # the connection went meanwhile: sent again after --command-resend
        topic = self.source.settings.command_topic.replace("{device}", self.device).replace("{id}", command.id)
        properties: mqtt.Properties = ()
        if client.conn.version == mqtt.V5:
            properties = (
                (P.PAYLOAD_FORMAT_INDICATOR, 1),
                (P.CONTENT_TYPE, "application/json"),
                (P.MESSAGE_EXPIRY_INTERVAL, max(1, int(command.expires - self.source.clock.seconds()))),
                (P.RESPONSE_TOPIC, f"{topic}/result"),
                (P.CORRELATION_DATA, command.id.encode()),
            )
        packet_id = self.source.command_packet_id()
        payload = json.dumps(command.wire(), separators=(",", ":")).encode()
        self.in_flight[packet_id] = command.id
        self.source.command_ids[packet_id] = self
        client.send_command(mqtt.Publish(topic, payload, 1, packet_id, properties=properties))

    def acked(self, ack: mqtt.PubAck) -> Deferred | None:
        id_ = self.in_flight.pop(ack.packet_id, None)
        if id_ is None:
            return None
        if ack.reason >= 0x80:  # the broker refused it (not authorized, quota): the command failed
            why = mqtt.prop(ack.properties, P.REASON_STRING, None) or mqtt.reason_text(ack.reason)
            result = {"error": f"the broker refused the command: {why}", "mqtt_reason_code": ack.reason}
            return Deferred.fromCoroutine(self.commands.finished(self.device, id_, "failed", result, self.transport))
        d = Deferred.fromCoroutine(self.commands.delivered(self.device, id_))
        return d.addErrback(lambda f: log.warn("command {id} not marked delivered: {e}", id=id_, e=f.value))
