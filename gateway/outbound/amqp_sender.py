"""
Sending upload batches to a RabbitMQ exchange (a ``[[sink]]`` with ``kind =
"amqp"`` or an ``amqp://``/``amqps://`` URL), with pika on the reactor.

A batch becomes one message per device (``format = "device"``, the default:
the device's JSON lines of the batch, the routing key made from the template
with its ``{device}``), one message per reading (``format = "reading"``: the
routing key made with the reading's ``{device}`` and ``{metric}``, the body
its JSON line) or one message holding the batch's JSON lines (``format =
"batch"``). Every message is persistent (delivery mode 2) and
``mandatory``, on a channel in publisher-confirm mode; ``send`` fires with a
2xx ``Reply`` only once the broker has confirmed every message of the batch,
so the uploader moves the sink's cursor only then. A message no queue is
bound for (``basic.return``) parks the batch with the reason: it would be
returned again until a binding is made (then ``gatewayctl upload
retry-dead``). A ``basic.nack``, a lost connection or a timeout fails the
attempt, and the whole batch is sent again after the backoff: at least
once. Each message carries the batch's key and its line as ``message_id``
(``KEY/LINE``) and headers, for receivers that drop what they have seen.

One connection and channel per sink, kept open between batches.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger

from gateway.net import amqp
from gateway.outbound.lines import by_device, names
from gateway.outbound.sender import Payload, Reply
from gateway.outbound.sinks import AmqpSink, Sink
from gateway.reactor import Reactor

log = Logger()


@dataclass(frozen=True)
class Message:
    routing_key: str
    body: bytes
    line: int  # its line in the batch (0 for a whole batch)


def messages(sink: AmqpSink, body: bytes) -> list[Message]:
    """The messages of a batch body (gzip-compressed JSON lines). CPU work: run it in a thread."""
    text = gzip.decompress(body)
    if sink.format == "batch":
        return [Message(sink.routing_key, text, 0)] if text else []
    if sink.format == "device":  # numbered by device: the device's place in the batch
        return [
            Message(sink.routing_key.format(device=device), b"\n".join(lines) + b"\n", i)
            for i, (device, lines) in enumerate(by_device(text).items())
        ]
    out = []
    for i, line in enumerate(text.splitlines()):
        device, metric = names(line)
        out.append(Message(sink.routing_key.format(device=device, metric=metric), line, i))
    return out


class AMQPSender:
    """Sends a sink's batches to a RabbitMQ exchange; the same interface as HTTPSender."""

    def __init__(self, reactor: Reactor, sink: Sink, in_thread: Any) -> None:
        assert sink.amqp is not None
        self.reactor = reactor
        self.sink = sink
        self.target = sink.amqp
        self.in_thread = in_thread
        self.endpoint = amqp.endpoint(reactor, self.target.broker, sink.timeout)
        self.factory = amqp.connection_factory(self.target.broker, f"sink {sink.name}", self._lost)
        self.connection: Any = None
        self.channel: Any = None
        self.last_error = ""

    def _lost(self, connection: Any, reason: Any) -> None:
        if connection is self.connection:
            self.connection = self.channel = None
            self.last_error = reason.getErrorMessage()

    async def _open(self) -> Any:
        if self.channel is not None and self.channel.is_open:
            return self.channel
        if self.connection is not None:
            self.connection.close()
        connection = await self.endpoint.connect(self.factory)
        self.connection = connection
        await connection.ready
        channel = await connection.channel()
        await channel.confirm_delivery()
        self.channel = channel
        return channel

    def send(self, batch: Payload) -> Deferred:
        if batch.body is None:
            return fail(ValueError("a batch is sent once its body is made"))
        body = batch.body

        async def run() -> Reply:
            import pika
            from pika.exceptions import NackError, UnroutableError

            made = await self.in_thread(messages, self.target, body)
            channel = await self._open()
            content = "application/json" if self.target.format == "reading" else "application/x-ndjson"
            confirmed = [
                channel.basic_publish(
                    self.target.exchange,
                    m.routing_key,
                    m.body,
                    pika.BasicProperties(
                        delivery_mode=2,
                        content_type=content,
                        message_id=f"{batch.key}/{m.line}",
                        headers={"batch": batch.key, "line": m.line},
                    ),
                    mandatory=True,
                )
                for m in made
            ]
            results = await DeferredList(confirmed, consumeErrors=True)
            for ok, outcome in results:
                if ok:
                    continue
                error = outcome.value
                if isinstance(error, UnroutableError):
                    key = error.messages[0].method.routing_key if error.messages else "?"
                    why = f"AMQP: no queue is bound on exchange {self.target.exchange!r} for routing key {key!r}"
                    return Reply(404, error=why)  # the same message is returned again: parked
                if isinstance(error, NackError):
                    return Reply(503, error="AMQP: the broker could not take a message (basic.nack)")
                raise error
            return Reply(200)

        d = Deferred.fromCoroutine(run())
        d.addTimeout(self.sink.timeout, self.reactor, onTimeoutCancel=self._timed_out)
        return d

    def _timed_out(self, result: Any, timeout: float) -> Any:
        # Some confirms did not come: this connection is not to be trusted with the next attempt.
        if self.connection is not None:
            self.connection.close()
            self.connection = self.channel = None
        return result

    def close(self) -> Deferred:
        connection, self.connection, self.channel = self.connection, None, None
        if connection is None or not connection.is_open:
            return succeed(None)
        closed = connection.close()
        return closed if closed is not None else succeed(None)
