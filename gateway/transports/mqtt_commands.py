"""
Commands over the MQTT listener: the device's side of the topic tree.

A device subscribes to ``devices/<device>/commands/#`` (or ``/+``; only its
own: any other filter is refused). From then on it is the device's downlink:
each command is published at QoS 1 to ``devices/<device>/commands/<id>``
with ``{"id", "name", "params", "expires"}`` (v5 adds Response Topic,
Correlation Data, Message Expiry and the content type), its PUBACK makes the
command ``delivered`` (a v5 PUBACK with a failure reason code makes it
``failed`` with that reason), and the device publishes the result to
``devices/<device>/commands/<id>/result`` as ``{"status": "succeeded" |
"failed", "result": {...}}``, acknowledged once recorded. A kept session
(3.1.1 clean session 0, v5 Session Expiry) keeps the subscription: the
device gets its commands when it reconnects without subscribing again.

Desired configuration: a device subscribed to ``devices/<device>/desired``
gets each delta there as ``{"id", "version", "delta", "expires"}`` (else as
the command ``desired`` on its command topic), and publishes what it runs to
``devices/<device>/reported`` (a JSON object, merged into its reported
document); when that matches the desired document the delta is done.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from gateway.commands.desired import NAME as DESIRED, check_document
from gateway.commands.model import Command, CommandError, parse_result
from gateway.commands.service import IDownlink
from gateway.readings import InvalidInput, WriteResult
from protocols import mqtt

log = Logger()

P = mqtt.Property
WINDOW = 10  # commands in flight (published, not yet PUBACKed) to one device
FILTERS = ("commands/#", "commands/+", "desired")  # after devices/<device>/
RESULT = "result"
REPORTED = ""  # what result_of gives for devices/<device>/reported


def command_filter(device: str, topic_filter: str) -> bool:
    """Whether a SUBSCRIBE filter is this device's command (or desired configuration) topic."""
    return topic_filter in (f"devices/{device}/{f}" for f in FILTERS)


def result_of(device: str, topic: str) -> str | None:
    """The command id a PUBLISH's topic reports the result of (devices/<device>/commands/<id>/result), REPORTED
    for devices/<device>/reported, or None."""
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == "devices" and parts[1] == device and parts[2] == "reported":
        return REPORTED
    if len(parts) == 5 and parts[0] == "devices" and parts[1] == device and parts[2] == "commands":
        return parts[3] if parts[4] == RESULT and parts[3] else None
    return None


@implementer(IDownlink)
class MqttDownlink:
    """One MQTT session's way to its device: publishes commands, maps PUBACKs back to them."""

    transport = "mqtt"

    def __init__(self, protocol: Any, device: str, commands: Any) -> None:
        self.protocol = protocol
        self.device = device
        self.commands = commands
        self.in_flight: dict[int, str] = {}  # packet id -> command id
        self._last_id = 0
        self.filters: set[str] = set()  # what the device subscribed to (of FILTERS)

    def room(self) -> int:
        return max(0, min(WINDOW, self.protocol.conn.peer_receive_maximum) - len(self.in_flight))

    def _packet_id(self) -> int:
        while True:
            self._last_id = self._last_id % 65535 + 1
            if self._last_id not in self.in_flight:
                return self._last_id

    def deliver(self, command: Command) -> None:
        topic = f"devices/{self.device}/commands/{command.id}"
        body = command.wire()
        if command.name == DESIRED and f"devices/{self.device}/desired" in self.filters:
            topic = f"devices/{self.device}/desired"
            body = {"id": command.id, **command.params, "expires": body["expires"]}
        payload = json.dumps(body, separators=(",", ":")).encode()
        properties: mqtt.Properties = ()
        if self.protocol.conn.version == mqtt.V5:
            left = max(1, int(command.expires - self.protocol.factory.clock.seconds()))
            properties = (
                (P.PAYLOAD_FORMAT_INDICATOR, 1),
                (P.CONTENT_TYPE, "application/json"),
                (P.MESSAGE_EXPIRY_INTERVAL, left),
                (P.RESPONSE_TOPIC, f"devices/{self.device}/commands/{command.id}/{RESULT}"),
                (P.CORRELATION_DATA, command.id.encode()),
            )
        packet_id = self._packet_id()
        self.in_flight[packet_id] = command.id
        if not self.protocol.send_command(mqtt.Publish(topic, payload, 1, packet_id, properties=properties)):
            del self.in_flight[packet_id]
            log.warn(
                "command {id} not sent to {device} over MQTT: larger than the device's Maximum Packet Size",
                id=command.id,
                device=self.device,
            )

    def acked(self, ack: mqtt.PubAck) -> Deferred | None:
        """The device's PUBACK of a command: delivered, or (v5, a failure reason code) refused."""
        id_ = self.in_flight.pop(ack.packet_id, None)
        if id_ is None:
            return None
        if ack.reason >= 0x80:
            why = mqtt.prop(ack.properties, P.REASON_STRING, None)
            result = {"mqtt_reason_code": ack.reason, "reason": why or mqtt.reason_text(ack.reason)}
            return Deferred.fromCoroutine(self.commands.finished(self.device, id_, "failed", result, "mqtt"))
        return Deferred.fromCoroutine(self.commands.delivered(self.device, id_))

    def result(self, id_: str, payload: bytes) -> Deferred:
        """A result the device published (or, for REPORTED, what it runs); fires when recorded (InvalidInput
        when it cannot be read)."""
        if id_ == REPORTED:
            try:
                return self.commands.twin.report(self.device, check_document(json.loads(payload), "reported"))
            except (ValueError, CommandError) as e:
                message = e.message if isinstance(e, CommandError) else f"not JSON: {e}"
                raise InvalidInput(f"devices/{self.device}/reported: {message}") from None
        try:
            status, result = parse_result(json.loads(payload))
        except (ValueError, CommandError) as e:
            message = e.message if isinstance(e, CommandError) else f"not JSON: {e}"
            raise InvalidInput(f"the result of command {id_}: {message}") from None
        return Deferred.fromCoroutine(self.commands.finished(self.device, id_, status, result, "mqtt"))


# -- the session's side: what MQTTProtocol (mqtt_adapter.py) calls ----------


def subscribe(session: Any, event: mqtt.Subscribe) -> None:
    """Only the device's own command topic may be subscribed to, at QoS 0 or 1 (granted 1 at most)."""
    commands, device = session.factory.commands, session.device
    mine = [
        device is not None and commands is not None and command_filter(device.name, f) for f, _ in event.subscriptions
    ]
    reasons = tuple(
        min(options & 3, 1) if ok else mqtt.Reason.NOT_AUTHORIZED for ok, (_, options) in zip(mine, event.subscriptions)
    )
    why = () if all(mine) else session._why("only devices/<device>/commands/# may be subscribed to")
    session._send(mqtt.SubAck(event.packet_id, reasons, why))
    if any(mine):
        take_commands(session, keep=True, filters=[f for ok, (f, _) in zip(mine, event.subscriptions) if ok])


def take_commands(session: Any, keep: bool = False, filters: Any = None) -> None:
    """The session is its device's downlink from now on (``keep``: and its kept session remembers it)."""
    commands, device = session.factory.commands, session.device
    if session.downlink is None:
        session.downlink = MqttDownlink(session, device.name, commands)
    # A kept session remembers that it subscribed, not to which of the filters: its commands topic then.
    session.downlink.filters.update(filters or [f"devices/{device.name}/commands/#"])
    kept = session._kept_session
    if keep and kept is not None:
        d = commands.ledger.keep_subscription(device.name, kept[1], True)
        d.addErrback(lambda f: log.warn("MQTT subscription not kept: {e}", e=getattr(f.value, "message", f.value)))
    commands.attach(device.name, session.downlink)


def unsubscribe(session: Any, event: mqtt.Unsubscribe) -> None:
    commands, device, downlink = session.factory.commands, session.device, session.downlink
    mine = [device is not None and commands is not None and command_filter(device.name, f) for f in event.filters]
    if downlink is not None:
        downlink.filters.difference_update(event.filters)
    if any(mine) and downlink is not None and not downlink.filters:
        commands.detach(downlink.device, downlink)
        if session._kept_session is not None:
            d = commands.ledger.keep_subscription(downlink.device, session._kept_session[1], False)
            d.addErrback(lambda f: log.warn("MQTT subscription not dropped: {e}", e=f.value))
        session.downlink = None
    reasons = tuple(mqtt.Reason.SUCCESS if ok else mqtt.Reason.NO_SUBSCRIPTION_EXISTED for ok in mine)
    session._send(mqtt.UnsubAck(event.packet_id, reasons))


def command_result(session: Any, publish: mqtt.Publish, id_: str) -> None:
    """A result published by the device: acknowledged once recorded (one for an unknown command too: there is
    nothing the device could send again that would change it)."""
    try:
        d = MqttDownlink(session, session.device.name, session.factory.commands).result(id_, publish.payload)
    except InvalidInput as e:
        session._refuse_message(publish, mqtt.Reason.PAYLOAD_FORMAT_INVALID, e.message)
        return
    if publish.qos:
        session._queue_answer(publish, d.addCallback(lambda _: WriteResult(0, 0)))
    else:
        d.addErrback(lambda f: log.warn("QoS 0 command result not recorded: {e}", e=f.value))
