"""
The MQTT device of ``gatewayctl simulate --protocol mqtt`` (or ``mqtts``):
it connects with its name and token, publishes ``--batch`` readings a
message to ``devices/<name>/readings`` at ``--qos``, keeps up to the
gateway's Receive Maximum (v5; 3.1.1: ``--window``) messages in flight,
and sends again, after a reconnect, whatever was not acknowledged.
QoS 0 messages are counted when written: nothing confirms them.
"""

from __future__ import annotations


import json

from twisted.python.failure import Failure

from gateway.cli.simulator import BACKOFF_CAP, SimDevice, readings_body
from gateway.net.mqttclient import MQTTClientProtocol
from protocols import mqtt

R = mqtt.Reason
KEEPALIVE = 60  # seconds: a PINGREQ every 30 while nothing else is sent


class MQTTClient(MQTTClientProtocol):
    def __init__(self, device: SimDevice) -> None:
        super().__init__(device.sim.clock, mqtt.Connection(mqtt.CLIENT), KEEPALIVE)
        self.device = device
        self.sim = device.sim
        self.version = mqtt.V5 if self.sim.args.mqtt_version == "5" else mqtt.V311
        self.qos = self.sim.args.qos
        self.in_flight: dict[int, tuple[list[tuple[str, int, float]], float]] = {}
        self.releasing: set[int] = set()  # QoS 2: PUBREC came, PUBCOMP not yet
        self.window = self.sim.args.window
        self.ready = False
        self.retry_after: float | None = None
        self._next_id = 0
        self._quiet_until = 0.0
        self.topic = f"devices/{device.name}/readings"
        self.results: set[int] = set()  # packet ids of command results not yet acknowledged

    def connect_packet(self) -> mqtt.Connect:
        token = self.device.token.encode("ascii")
        return mqtt.Connect(self.device.name, self.version, True, KEEPALIVE, self.device.name, token)

    def connectionMade(self) -> None:
        self.device.client = self
        super().connectionMade()

    def failed(self, why: str) -> None:
        self.sim.stats.errors[why.split(":")[0]] += 1

    def refused(self, connack: mqtt.ConnAck) -> None:
        self.sim.stats.errors[f"CONNACK {_name(connack.reason)}"] += 1
        self.retry_after = BACKOFF_CAP if connack.reason in (R.BAD_USER_NAME_OR_PASSWORD, R.NOT_AUTHORIZED) else None
        self.close()

    def disconnected(self, event: mqtt.Disconnect) -> None:
        self.sim.stats.errors[f"DISCONNECT {_name(event.reason)}"] += 1
        if event.reason in (R.SERVER_BUSY, R.SERVER_SHUTTING_DOWN):
            self.retry_after = 1.0
        self.close()

    def accepted(self, connack: mqtt.ConnAck) -> None:
        self.deadline_met()
        self.window = mqtt.prop(connack.properties, mqtt.Property.RECEIVE_MAXIMUM, self.window)
        self.ready = True
        self.sim.stats.connected += 1
        # Its commands: a subscription like any device that takes them (its id holds a place in the window).
        packet_id = self._packet_id()
        self.in_flight[packet_id] = ([], self.sim.clock.seconds())
        self.send(mqtt.Subscribe(packet_id, ((f"devices/{self.device.name}/commands/#", 1),)))
        self.device.report_waiting()
        self.pump()

    def handle(self, event: object) -> None:
        stats = self.sim.stats
        if isinstance(event, (mqtt.PubAck, mqtt.PubRec)):
            readings, sent_at = self.in_flight.pop(event.packet_id, ([], 0.0))
            if event.packet_id in self.results:
                self.results.discard(event.packet_id)
                self.sim.commands.counts["recorded"] += 1
            if isinstance(event, mqtt.PubRec):
                self.releasing.add(event.packet_id)
                self.send(mqtt.PubRel(event.packet_id))
            if event.reason < 0x80:
                stats.acked += len(readings)
                counts = dict(v for k, v in event.properties if k == mqtt.Property.USER_PROPERTY)
                stats.duplicates += int(counts.get("duplicates", 0))
                stats.conflicts += int(counts.get("conflicts", 0))
                now = self.sim.clock.seconds()
                stats.latency(now - sent_at, now)
                self.device.backoff.succeeded()
            elif event.reason == R.QUOTA_EXCEEDED:  # rate limited: the same readings again, a second later
                stats.errors[_name(event.reason)] += 1
                self.device.give_back(readings)
                self._quiet_until = self.sim.clock.seconds() + 1
                self.sim.clock.callLater(1, self.pump)
            else:  # refused for good
                stats.errors[_name(event.reason)] += len(readings) or 1
            self.pump()
        elif isinstance(event, mqtt.PubComp):
            self.releasing.discard(event.packet_id)
            self.pump()
        elif isinstance(event, mqtt.SubAck):
            self.in_flight.pop(event.packet_id, None)
            self.pump()
        elif isinstance(event, mqtt.Publish):
            self._command(event)

    def _command(self, publish: mqtt.Publish) -> None:
        """A command: PUBACK at once (the device has it), its result later on .../result."""
        if publish.qos and publish.packet_id is not None:
            self.send(mqtt.PubAck(publish.packet_id))
        try:
            command = json.loads(publish.payload)
            id_, name, params = command["id"], command["name"], command.get("params", {})
        except (ValueError, KeyError, TypeError):
            self.sim.stats.errors["unreadable command"] += 1
            return
        report = lambda status, result: self.device.report(id_, status, result)  # noqa: E731
        self.sim.commands.receive(self.device.name, id_, name, params, report)

    def send_result(self, id_: str, status: str, result: object) -> None:
        packet_id = self._packet_id()
        self.in_flight[packet_id] = ([], self.sim.clock.seconds())
        self.results.add(packet_id)
        body = json.dumps({"status": status, "result": result}).encode()
        self.send(mqtt.Publish(f"devices/{self.device.name}/commands/{id_}/result", body, 1, packet_id))

    def _packet_id(self) -> int:
        while True:
            self._next_id = self._next_id % 0xFFFF + 1
            if self._next_id not in self.in_flight and self._next_id not in self.releasing:
                return self._next_id

    def pump(self) -> None:
        """Publish while the window has room and readings wait."""
        if not self.ready or self.sim.clock.seconds() < self._quiet_until:
            return
        while len(self.in_flight) + len(self.releasing) < self.window:
            if self.sim.stopping:
                return
            readings = self.device.take(self.sim.batch)
            if not readings:
                return
            body = readings_body(readings)
            self.sim.stats.sent += len(readings)
            if self.qos == 0:
                self.send(mqtt.Publish(self.topic, body))
                self.sim.stats.acked += len(readings)  # at most once: counted when written
                continue
            packet_id = self._packet_id()
            self.in_flight[packet_id] = (readings, self.sim.clock.seconds())
            self.send(mqtt.Publish(self.topic, body, self.qos, packet_id))

    def ended(self, reason: Failure) -> None:
        if self.ready:
            self.sim.stats.connected -= 1
        self.ready = False
        self.device.client = None
        for packet_id in sorted(self.in_flight, reverse=True):
            self.device.give_back(self.in_flight[packet_id][0])
        self.in_flight.clear()
        self.device.retry(self.retry_after)


def _name(reason: int) -> str:
    try:
        return mqtt.Reason(reason).name
    except ValueError:
        return f"{reason:#04x}"
