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
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.outbound.sender import Payload, Reply
from gateway.outbound.sinks import Sink
from gateway.net.brokers import endpoint
from gateway.net.tcp import no_delay
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


class _Publisher(protocol.Protocol):
    """One connection: CONNECT, then batches of QoS 1 PUBLISHes, each answered by PUBACK."""

    transport: Any

    def __init__(self, sender: MQTTSender) -> None:
        self.sender = sender
        broker = sender.broker
        self.conn = mqtt.Connection(mqtt.CLIENT, max_packet=broker.max_packet)
        self.ready = False  # CONNACK accepted the connection
        self._waiters: list[Deferred] = []
        self.window = WINDOW
        self._next_id = 0
        self._queue: deque[Message] = deque()
        self._in_flight: dict[int, Message] = {}
        self._done: Deferred | None = None
        self._key = ""
        self._refused: tuple[int, str] | None = None
        self._pinger: Any = None
        self.lost = False
        self.closed: Deferred = Deferred()  # fires when the connection is gone

    def connectionMade(self) -> None:
        no_delay(self.transport)
        broker = self.sender.broker
        password = broker.password.encode() if broker.password is not None else None
        connect = mqtt.Connect(broker.client_id, broker.version, True, broker.keepalive, broker.username, password)
        self.transport.write(self.conn.send(connect))

    def dataReceived(self, data: bytes) -> None:
        self.conn.receive_data(data)
        try:
            for event in self.conn.events():
                self._handle(event)
        except mqtt.RemoteProtocolError as e:
            self._lose(f"the broker broke the protocol: {e.message}")

    def _handle(self, event: object) -> None:
        if isinstance(event, mqtt.PubAck):
            self._acked(event)
        elif isinstance(event, mqtt.ConnAck):
            if event.reason >= 0x80:
                self._lose(f"the broker refused the connection: {mqtt.reason_text(event.reason, event.properties)}")
                return
            self.window = min(WINDOW, mqtt.prop(event.properties, P.RECEIVE_MAXIMUM, WINDOW))
            keepalive = mqtt.prop(event.properties, P.SERVER_KEEP_ALIVE, self.sender.broker.keepalive)
            if keepalive:
                self._pinger = LoopingCall(lambda: self._write(mqtt.PingReq()))
                self._pinger.clock = self.sender.reactor
                self._pinger.start(keepalive / 2, now=False)
            self.ready = True
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(self)
        elif isinstance(event, mqtt.Disconnect):
            self._lose(f"the broker disconnected: {mqtt.reason_text(event.reason, event.properties)}")

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
                self._write(mqtt.Publish(message.topic, message.payload, 1, packet_id, properties=properties))
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

    def _write(self, event: mqtt.Event) -> None:
        self.transport.write(self.conn.send(event))

    def _lose(self, why: str) -> None:
        self.sender.last_error = why
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
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

    def __init__(self, reactor: Any, sink: Sink, in_thread: Any, owner: str) -> None:
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
            publisher._write(mqtt.Disconnect())
        publisher.transport.loseConnection()
        # A TLS close waits for the broker's close_notify; a broker that never sends it is cut off.
        cut = self.reactor.callLater(CLOSE_TIMEOUT, publisher.transport.abortConnection)
        return publisher.closed.addBoth(lambda result: cut.cancel() if cut.active() else None)
