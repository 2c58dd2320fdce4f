"""
Sending upload batches to an MQTT broker (a ``[[sink]]`` with an
``mqtt://`` or ``mqtts://`` URL): cloud IoT hubs (AWS IoT Core, Azure IoT
Hub's MQTT endpoint, HiveMQ Cloud) and plant brokers.

A batch becomes either one message per reading (``format = "reading"``, the
topic made from the template with the reading's ``{device}`` and
``{metric}``, the payload its JSON line) or one message holding the batch's
JSON lines (``format = "batch"``). Every message is QoS 1; ``send`` fires with
a 2xx ``Reply`` only once the broker has acknowledged every message of the
batch, so the uploader moves the sink's cursor only then. A lost connection
or a timeout fails the attempt (the uploader retries the whole batch after
its backoff: at least once). A 5.0 broker that refuses a message for good
(not authorized, bad topic, bad payload, too large) gets the batch parked,
with the reason; one that is busy or over quota gets it retried. 5.0 messages
carry the batch's key (and the line's number) as user properties, so a
receiver can drop what it has seen.

One connection per sink, kept open between batches, with clean start (the
sender keeps its own state: the batch is sent again whole after a failure).
"""

from __future__ import annotations

import gzip
import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.reactor import Reactor
from gateway.outbound.sender import Payload, Reply
from gateway.outbound.sinks import Sink
from gateway.net.brokers import endpoint
from gateway.net.mqttclient import MQTTClientProtocol
from protocols import mqtt

log = Logger()

R = mqtt.Reason
P = mqtt.Property

# Refusals the same message will always get: park the batch. Others (quota, busy, unspecified) are retried.
FOR_GOOD = {
    R.NOT_AUTHORIZED,
    R.TOPIC_NAME_INVALID,
    R.PAYLOAD_FORMAT_INVALID,
    R.PACKET_TOO_LARGE,
    R.IMPLEMENTATION_SPECIFIC_ERROR,
}
CLOSE_TIMEOUT = 5.0  # seconds a closing connection may take before it is cut
WINDOW = 100  # messages in flight at most (less when a 5.0 broker's Receive Maximum says so)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    line: int  # its line in the batch (0 for a whole batch)


def messages(sink: Sink, body: bytes) -> list[Message]:
    """The messages of a batch body (gzip-compressed JSON lines). CPU work: run it in a thread."""
    text = gzip.decompress(body)
    assert sink.mqtt is not None
    if sink.mqtt.format == "batch":
        return [Message(sink.mqtt.topic, text, 0)] if text else []
    out = []
    for i, line in enumerate(text.splitlines()):
        reading = json.loads(line)
        topic = sink.mqtt.topic.format(device=reading["device"], metric=reading["metric"])
        out.append(Message(topic, line, i))
    return out


class _Publisher(MQTTClientProtocol):
    """One connection: CONNECT, then batches of QoS 1 PUBLISHes, each answered by PUBACK."""

    close_timeout = CLOSE_TIMEOUT

    def __init__(self, sender: MQTTSender) -> None:
        broker = sender.broker
        super().__init__(sender.reactor, mqtt.Connection(mqtt.CLIENT, max_packet=broker.max_packet), broker.keepalive)
        self.sender = sender
        self.ready = False  # CONNACK accepted the connection
        self._waiters: list[Deferred] = []
        self.window = WINDOW
        self._next_id = 0
        self._queue: deque[Message] = deque()
        self._in_flight: dict[int, Message] = {}
        self._done: Deferred | None = None
        self._key = ""
        self._refused: tuple[int, str] | None = None
        self.lost = False
        self.closed: Deferred = Deferred()  # fires when the connection is gone

    def connect_packet(self) -> mqtt.Connect:
        broker = self.sender.broker
        password = broker.password.encode() if broker.password is not None else None
        return mqtt.Connect(broker.client_id, broker.version, True, broker.keepalive, broker.username, password)

    def accepted(self, connack: mqtt.ConnAck) -> None:
        self.deadline_met()
        self.window = min(WINDOW, mqtt.prop(connack.properties, P.RECEIVE_MAXIMUM, WINDOW))
        self.ready = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self)

    def handle(self, event: object) -> None:
        if isinstance(event, mqtt.PubAck):
            self._acked(event)

    def failed(self, why: str) -> None:
        self.sender.last_error = why

    def when_ready(self) -> Deferred:
        """Fires with this publisher once the broker accepted the connection; errbacks if it is lost first."""
        if self.ready:
            return succeed(self)
        d: Deferred = Deferred()
        self._waiters.append(d)
        return d

    # -- a batch ---------------------------------------------------------

    def publish(self, key: str, batch: list[Message]) -> Deferred:
        """Publish every message; fires with None once all are acknowledged, or (reason, text) if refused."""
        self._queue = deque(batch)
        self._key = key
        self._refused = None
        self._done = Deferred()
        done = self._done
        self._pump()
        return done

    def _pump(self) -> None:
        v5 = self.conn.version == mqtt.V5
        while self._queue and len(self._in_flight) < self.window and not self.lost:
            message = self._queue.popleft()
            packet_id = self._packet_id()
            properties: mqtt.Properties = ()
            if v5:
                properties = ((P.USER_PROPERTY, ("batch", self._key)), (P.USER_PROPERTY, ("line", str(message.line))))
            self._in_flight[packet_id] = message
            try:
                self.send(mqtt.Publish(message.topic, message.payload, 1, packet_id, properties=properties))
            except mqtt.LocalProtocolError as e:  # too large for the broker, most likely
                self._in_flight.pop(packet_id)
                self._finish((e.reason, f"{message.topic}: {e.message}"))
                return
        if not self._queue and not self._in_flight:
            self._finish(None)

    def _packet_id(self) -> int:
        while True:
            self._next_id = self._next_id % 0xFFFF + 1
            if self._next_id not in self._in_flight:
                return self._next_id

    def _acked(self, ack: mqtt.PubAck) -> None:
        message = self._in_flight.pop(ack.packet_id, None)
        if message is None:
            return
        if ack.reason >= 0x80 and self._refused is None:
            self._refused = (ack.reason, f"{message.topic}: {mqtt.reason_text(ack.reason, ack.properties)}")
        if self._refused is not None:
            self._queue.clear()  # the batch is refused: stop sending it
        self._pump()

    def _finish(self, refused: tuple[int, str] | None) -> None:
        done, self._done = self._done, None
        self._queue.clear()
        if done is not None:
            done.callback(refused or self._refused)

    def ended(self, reason: Failure) -> None:
        self.lost = True
        why = self.sender.last_error or f"the connection was lost: {reason.getErrorMessage()}"
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(ConnectionError(why))
        done, self._done = self._done, None
        if done is not None:
            done.errback(ConnectionError(why))
        if self.sender.publisher is self:
            self.sender.publisher = None
        self.closed.callback(None)


class _Factory(protocol.Factory):
    noisy = False

    def __init__(self, sender: MQTTSender) -> None:
        self.sender = sender

    def buildProtocol(self, addr: Any) -> _Publisher:
        return _Publisher(self.sender)


class MQTTSender:
    """Sends a sink's batches to an MQTT broker; the same interface as HTTPSender."""

    def __init__(self, reactor: Reactor, sink: Sink, in_thread: Any, owner: str) -> None:
        assert sink.mqtt is not None
        self.reactor = reactor
        self.sink = sink
        self.broker = sink.mqtt.broker.with_client_id(owner, f"sink-{sink.name}")  # owner: this gateway's id
        self.in_thread = in_thread
        self.endpoint = endpoint(reactor, self.broker, timeout=sink.timeout)
        self.publisher: _Publisher | None = None
        self.last_error = ""

    def _connect(self) -> Deferred:
        if self.publisher is not None and not self.publisher.lost:
            return self.publisher.when_ready()
        self.last_error = ""
        d = self.endpoint.connect(_Factory(self))

        def made(publisher: _Publisher) -> Deferred:
            self.publisher = publisher
            return publisher.when_ready()

        return d.addCallback(made)

    def send(self, batch: Payload) -> Deferred:
        if batch.body is None:
            return fail(ValueError("a batch is sent once its body is made"))

        async def run() -> Reply:
            made = await self.in_thread(messages, self.sink, batch.body)
            publisher = await self._connect()
            refused = await publisher.publish(batch.key, made)
            if refused is None:
                return Reply(200)
            reason, text = refused
            error = f"MQTT {text}"
            if reason in FOR_GOOD:
                return Reply(400, body=text, error=error)
            return Reply(503, body=text, error=error)

        d = Deferred.fromCoroutine(run())
        d.addTimeout(self.sink.timeout, self.reactor, onTimeoutCancel=self._timed_out)
        return d

    def _timed_out(self, result: Any, timeout: float) -> Any:
        # Some acknowledgements did not come: this connection is not to be trusted with the next attempt.
        if self.publisher is not None:
            self.publisher.transport.abortConnection()
        return result

    def close(self) -> Deferred:
        publisher, self.publisher = self.publisher, None
        if publisher is None or publisher.lost:
            return succeed(None)
        if publisher.ready:
            publisher.send(mqtt.Disconnect())
        publisher.close()  # a broker that never lets go is cut off after CLOSE_TIMEOUT
        return publisher.closed
