"""
The gateway as a consumer of RabbitMQ queues (AMQP 0-9-1): ``[[amqp_source]]``
tables in the config file.

Many IoT cores put RabbitMQ between the device-facing edge and ingest so that
messages have a safe place to live until they are saved: a durable queue,
persistent messages, and a consumer that acknowledges only once a message is
stored. That is what this source does.

Theory of operation. Each source is an ``AmqpSource`` service: a
``ClientService`` keeps one connection (pika's ``TwistedProtocolConnection``,
on the reactor), reconnecting with exponential backoff and jitter. On each
connection it opens a channel, sets ``basic.qos`` to ``prefetch``, declares
the queue (and its bindings) when asked to, and consumes with manual
acknowledgements.

A message's device is named by a header (``device-header``), a level of its
routing key (``device-routing-level``) or a field of its JSON body
(``device-field``). With ``format = "json"`` the body is the HTTPS JSON body
(or one reading, or the device type's vendor JSON); with ``format =
"number"`` it is a bare number, and the routing key's last word names the
metric. The device must be registered (``gatewayctl device add``): the
broker has authenticated the publisher.

Acknowledgement. Messages are settled in the order they arrived, and a
message is acknowledged only once its readings are committed (or journaled):
the acknowledgement is ``basic.ack`` with ``multiple`` up to the last
message of a settled run, so one frame answers many. A message that can
never be stored (a body that cannot be read, an unknown device, a rate
limit, a refusal of the database) is kept in rejected_input with its reason
and ``basic.reject``-ed without requeue, so RabbitMQ dead-letters it where
the queue has a dead-letter exchange. With the database away and the journal
full nothing more is acknowledged and the connection closes: RabbitMQ
delivers the unacknowledged messages again (flagged ``redelivered``) on the
next connection, to this gateway or another consuming the same queue, and a
message stored before stores nothing new (the readings' natural key).

Backpressure. At most ``prefetch`` messages are unacknowledged: RabbitMQ
sends no more until some are. While the store's queue is full the source
takes no message from the ones delivered, so nothing is buffered without
bound.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.families import counter, gauge
from gateway.ingest.core import Ingest
from gateway.reactor import Reactor
from gateway.readings import (
    Device,
    DeviceTypeUnknown,
    InvalidInput,
    RateLimited,
    Reading,
    Source,
    StoreOverloaded,
    StoreRejected,
    StoreUnavailable,
    WriteResult,
)
from gateway.settings import Setting
from gateway.transport import IDeviceTransport, Transport, TransportContext
from gateway.net import amqp
from gateway.ops.reports import StatusReport
from gateway.transports.amqp_settings import AmqpSourceError, AmqpSourceSettings, source_from_table
from gateway.transports.devices import DeviceNames, source_health
from gateway.transports.mqtt_adapter import bare_number
from gateway.transports.session import DeviceSession, Ticket

log = Logger()

CONNECT_TIMEOUT = 30.0
MAX_BODY = 16 * 1024 * 1024  # a message's body; past it, kept and dead-lettered

# -- the consumer -----------------------------------------------------------------


@dataclass
class AmqpCounters:
    state: str = "stopped"
    since: float = 0.0
    last_error: str = ""
    connections: int = 0
    consumed: int = 0
    redelivered: int = 0
    acked: int = 0
    rejected: int = 0
    readings: int = 0
    duplicates: int = 0
    in_flight: int = 0
    last_message_at: float | None = None


class _Unavailable(Exception):
    """The store cannot take messages now: nothing more is acknowledged; the connection closes."""


@dataclass(frozen=True)
class _Kept:
    reason: str  # kept in rejected_input: rejected without requeue (dead-lettered)


class AmqpConsumer:
    """One connection's consumer: takes messages in order, stores them, acknowledges after COMMIT."""

    def __init__(self, source: AmqpSource, connection: Any) -> None:
        self.source = source
        self.settings = source.settings
        self.connection = connection
        self.channel: Any = None
        self.session: DeviceSession[Any] = DeviceSession(min(self.settings.prefetch, 10_000))
        self._tags: dict[int, int] = {}  # ticket seq -> delivery tag
        self._seq = 0
        self._acked_upto = 0  # the last delivery tag acknowledged (or rejected)
        self._to_ack = 0  # the last delivery tag settled as stored, not yet acknowledged
        self.closing = False

    async def run(self) -> None:
        """Open the channel and consume until the connection ends."""
        s = self.settings
        self.channel = await self.connection.channel()
        await self.channel.basic_qos(prefetch_count=s.prefetch)
        if s.declare:
            arguments = None
            if s.dead_letter_exchange:
                # Where rejected messages go: the exchange, and a durable queue <queue>.dead that keeps them.
                arguments = {"x-dead-letter-exchange": s.dead_letter_exchange}
                await self.channel.exchange_declare(
                    exchange=s.dead_letter_exchange, exchange_type="fanout", durable=True
                )
                await self.channel.queue_declare(queue=f"{s.queue}.dead", durable=True)
                await self.channel.queue_bind(queue=f"{s.queue}.dead", exchange=s.dead_letter_exchange)
            await self.channel.queue_declare(queue=s.queue, durable=True, arguments=arguments)
            for key in s.routing_keys:
                await self.channel.queue_bind(queue=s.queue, exchange=s.exchange, routing_key=key)
        queue, _tag = await self.channel.basic_consume(queue=s.queue, auto_ack=False)
        self.source.set_state("consuming", "")
        while not self.closing:
            message = await queue.get()
            await self._take(message)

    async def _take(self, message: Any) -> None:
        c = self.source.counters
        c.consumed += 1
        c.last_message_at = self.source.clock.seconds()
        if message.method.redelivered:
            c.redelivered += 1
        self._seq += 1
        ticket = self.session.arrived(self._seq, self.source.clock.seconds())
        self._tags[self._seq] = message.method.delivery_tag
        c.in_flight = self.session.unanswered
        body: bytes = message.body or b""
        s = self.settings
        headers = getattr(message.properties, "headers", None)
        name = s.device_of(message.method.routing_key, headers, body)
        if len(body) > MAX_BODY:
            self._keep(ticket, None, body[:1024], "too_large", f"a body of {len(body)} bytes; {MAX_BODY} at most")
            return
        if name is None:
            how = (
                f"routing key word {s.device_routing_level}" if s.device_routing_level is not None
                else f"field {s.device_field!r}" if s.device_field is not None
                else f"header {s.device_header!r}"
            )  # fmt: skip
            self._keep(ticket, None, body, "no_device", f"the message names no device ({how})")
            return
        known, device = self.source.devices.get(name)
        if not known:
            try:
                device = await self.source.devices.look_up(name)
            except Exception as e:  # the store is away: not acknowledged, delivered again
                self._settle(ticket, _Unavailable(f"device {name!r} cannot be looked up: {e}"))
                return
        if device is None:
            message_ = f"device {name!r} is not registered on this gateway (gatewayctl device add {name})"
            self._keep(ticket, None, body, "unknown_device", message_)
            return
        try:
            readings = self._readings(message, device, body)
        except InvalidInput as e:
            self._keep(ticket, device, body, "invalid_payload", e.message)
            return
        except DeviceTypeUnknown as e:
            self._settle(ticket, _Unavailable(e.message))
            return
        ingest = self.source.ingest
        while not ingest.admits(len(readings)) and not self.closing:
            await ingest.wait_for_room()  # take nothing more until the store has room: prefetch holds the rest
        d = ingest.store_readings(device, readings, self.source.origin, lambda: body)
        d.addCallback(self._stored, readings)
        d.addErrback(self._not_stored, device, body)
        d.addBoth(self._settle_with, ticket)

    def _readings(self, message: Any, device: Device, body: bytes) -> list[Reading]:
        if self.settings.format == "number":
            metric = message.method.routing_key.rsplit(".", 1)[-1]
            stamp = getattr(message.properties, "timestamp", None)  # AMQP's timestamp: seconds
            return [bare_number(metric, body, float(stamp) if stamp else self.source.clock.seconds())]
        return self.source.ingest.read_body(device, body, one=True)

    def _stored(self, result: WriteResult, readings: list[Reading]) -> WriteResult:
        c = self.source.counters
        c.readings += result.accepted
        c.duplicates += result.duplicates
        return result

    def _not_stored(self, f: Failure, device: Device, body: bytes) -> Any:
        error = f.value
        if isinstance(error, StoreRejected):  # kept in rejected_input by the ingest path
            return _Kept(error.message)
        if isinstance(error, RateLimited):
            kept = self.source.ingest.refuse(
                self.source.origin, error.code, error.message, device=device.name, raw=body
            )
            return kept.addCallback(lambda _: _Kept(error.message))
        if isinstance(error, (StoreUnavailable, StoreOverloaded, DeviceTypeUnknown)):
            return _Unavailable(error.message)
        return f

    def _keep(self, ticket: Ticket[Any], device: Device | None, body: bytes, code: str, message: str) -> None:
        """A message that can never be stored: kept in rejected_input, then rejected (dead-lettered)."""
        name = device.name if device else None
        kept = self.source.ingest.refuse(self.source.origin, code, message, device=name, raw=body)
        kept.addCallback(lambda _: _Kept(message)).addBoth(self._settle_with, ticket)

    def _settle_with(self, outcome: Any, ticket: Ticket[Any]) -> None:
        self._settle(ticket, outcome)

    def _settle(self, ticket: Ticket[Any], outcome: Any) -> None:
        c = self.source.counters
        for ready in self.session.settle(ticket, outcome):
            tag = self._tags.pop(ready.seq)
            if self.closing:
                continue
            result = ready.outcome
            if isinstance(result, WriteResult):
                self._to_ack = tag
                c.acked += 1
            elif isinstance(result, _Kept):
                self._flush()  # what is stored before it, acknowledged first: a multiple ack must not cover it
                self.channel.basic_reject(delivery_tag=tag, requeue=False)
                self._acked_upto = tag
                c.rejected += 1
            else:
                self._flush()
                why = str(result.value if isinstance(result, Failure) else result)
                if not isinstance(result, _Unavailable):
                    log.failure("AMQP source {source}: storing a message failed", result, source=self.settings.name)
                self.fail(f"storage cannot take messages now ({why}); RabbitMQ delivers them again")
                return
        self._flush()
        c.in_flight = self.session.unanswered

    def _flush(self) -> None:
        if self._to_ack > self._acked_upto and not self.closing:
            self.channel.basic_ack(delivery_tag=self._to_ack, multiple=True)
            self._acked_upto = self._to_ack

    def fail(self, why: str) -> None:
        self.source.set_state("reconnecting", why)
        self.close()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.connection.is_open:
            self.connection.close()


class AmqpSource(ClientService):
    """One [[amqp_source]]: a reconnecting consumer feeding the ingest path."""

    def __init__(self, settings: AmqpSourceSettings, ingest: Ingest, reactor: Reactor) -> None:
        self.settings = settings
        self.ingest = ingest
        self.clock = reactor
        self.counters = AmqpCounters(since=reactor.seconds())
        self.consumer: AmqpConsumer | None = None
        self._lost_reason: Failure | None = None  # why the last connection ended
        self.devices = DeviceNames(ingest, reactor)
        broker = settings.broker
        self.origin = Source("amqps" if broker.tls else "amqp", broker.host, broker.port, broker.tls)
        policy = backoffPolicy(initialDelay=settings.backoff, maxDelay=settings.backoff_cap, factor=2.0)
        super().__init__(
            amqp.endpoint(reactor, broker, CONNECT_TIMEOUT),
            amqp.connection_factory(broker, settings.name, self._lost),
            retryPolicy=policy,
            clock=reactor,
            prepareConnection=self._ready,
        )

    def _ready(self, connection: Any) -> Deferred:
        """The AMQP handshake done (the connection is then handed to ClientService): start consuming. A peer that
        does not finish the handshake within CONNECT_TIMEOUT is cut off (heartbeats only start after it)."""
        silent = []

        def too_slow() -> None:
            silent.append(True)
            connection.transport.abortConnection()

        timer = self.clock.callLater(CONNECT_TIMEOUT, too_slow)

        def settled(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        def consume(_: Any) -> None:
            self._lost_reason = None
            self.counters.connections += 1
            consumer = self.consumer = AmqpConsumer(self, connection)
            d = Deferred.fromCoroutine(consumer.run())
            d.addErrback(self._consumer_ended, consumer)

        def refused(f: Failure) -> Failure:  # TLS or sign-in refused, or the broker gone: ClientService retries
            why = self._lost_reason if self._lost_reason is not None else f  # pika's own error says little
            error = why.getErrorMessage()[:300] or type(why.value).__name__
            if silent:
                error = f"the broker did not finish the AMQP handshake within {CONNECT_TIMEOUT:g} seconds"
            elif "certificate verify failed" in error:
                error = f"TLS: the broker's certificate is not trusted (see ca): {error}"
            self.set_state("reconnecting", error)
            log.warn("AMQP source {source}: {error}", source=self.settings.name, error=error)
            return f

        return connection.ready.addBoth(settled).addCallbacks(consume, refused)

    def _consumer_ended(self, f: Failure, consumer: AmqpConsumer) -> None:
        if consumer.closing:
            return
        self.set_state("reconnecting", f.getErrorMessage()[:300] or type(f.value).__name__)
        log.warn("AMQP source {source}: {error}", source=self.settings.name, error=self.counters.last_error)
        consumer.close()

    def _lost(self, connection: Any, reason: Failure) -> None:
        self._lost_reason = reason
        consumer = self.consumer
        if consumer is not None and consumer.connection is connection:
            consumer.closing = True
            self.consumer = None
            self.counters.in_flight = 0
        if self.running and self.counters.state == "consuming":
            self.set_state("reconnecting", reason.getErrorMessage()[:300])

    def set_state(self, state: str, error: str) -> None:
        c = self.counters
        if state != c.state:
            c.state, c.since = state, self.clock.seconds()
        if error:
            c.last_error = error

    def startService(self) -> None:
        self.set_state("connecting", "")
        log.info(
            "AMQP source {source}: consuming queue {queue} on {url}",
            source=self.settings.name,
            queue=self.settings.queue,
            url=self.settings.broker.url,
        )
        super().startService()

    def stopService(self) -> Deferred:
        consumer = self.consumer
        if consumer is not None:
            consumer.close()
        self.set_state("stopped", "")
        return super().stopService()

    def status(self) -> dict[str, Any]:
        c = self.counters
        now = self.clock.seconds()
        return {
            "url": self.settings.broker.url,
            "queue": self.settings.queue,
            "state": c.state,
            "state_seconds": now - c.since,
            "last_error": c.last_error,
            "connections": c.connections,
            "consumed": c.consumed,
            "redelivered": c.redelivered,
            "acked": c.acked,
            "rejected": c.rejected,
            "readings": c.readings,
            "duplicates": c.duplicates,
            "in_flight": c.in_flight,
            "last_message_seconds": None if c.last_message_at is None else now - c.last_message_at,
        }


class AmqpSources(MultiService):
    """Every [[amqp_source]], their health and their /metrics."""

    def __init__(
        self, sources: tuple[AmqpSourceSettings, ...], ingest: Ingest, reactor: Reactor, owner: str, run: Any
    ) -> None:
        super().__init__()
        self.ingest = ingest
        self.reactor = reactor
        self.sources: dict[str, AmqpSource] = {}
        for settings in sources:
            self._add(settings)
        self.reporter = StatusReport("amqp_sources", owner, self.status, run, reactor)

    def startService(self) -> None:
        super().startService()
        self.reporter.start()

    def stopService(self) -> Deferred:
        return super().stopService().addCallback(lambda _: self.reporter.stop())

    def _add(self, settings: AmqpSourceSettings) -> None:
        source = self.sources[settings.name] = AmqpSource(settings, self.ingest, self.reactor)
        source.setServiceParent(self)

    async def reconfigure(self, sources: tuple[AmqpSourceSettings, ...]) -> list[str]:
        new = {s.name: s for s in sources}
        old = set(self.sources)
        changes = []
        for name in sorted(self.sources):
            if new.get(name) != self.sources[name].settings:
                await self.sources.pop(name).disownServiceParent()
                if name not in new:
                    changes.append(f"AMQP source {name} removed")
        for name, settings in new.items():
            if name not in self.sources:
                changes.append(f"AMQP source {name} {'changed' if name in old else 'added'}")
                self._add(settings)
        return changes

    def forget(self, names: list[str] | None = None) -> None:
        for source in self.sources.values():
            source.devices.forget(names)

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: source.status() for name, source in sorted(self.sources.items())}

    def health(self) -> dict[str, dict[str, Any]]:
        return {
            name: source_health(s.status(), "consuming", s.settings.stall) for name, s in sorted(self.sources.items())
        }

    def live_metrics(self) -> Iterator[Any]:
        families = {
            "consuming": gauge(
                "gateway_amqp_source_consuming", "1 while the source consumes its queue.", labels=["source"]
            ),
            "in_flight": gauge(
                "gateway_amqp_source_in_flight", "Messages delivered and not yet acknowledged.", labels=["source"]
            ),
            "consumed": counter("gateway_amqp_source_messages", "Messages delivered by RabbitMQ.", ["source"]),
            "redelivered": counter(
                "gateway_amqp_source_redelivered", "Messages delivered again (not acknowledged before).", ["source"]
            ),
            "acked": counter("gateway_amqp_source_acked", "Messages acknowledged after COMMIT.", ["source"]),
            "rejected": counter(
                "gateway_amqp_source_rejected",
                "Messages kept in rejected_input and rejected (dead-lettered).",
                ["source"],
            ),
            "connections": counter("gateway_amqp_source_connections", "Connections opened to RabbitMQ.", ["source"]),
        }
        for name, s in self.status().items():
            families["consuming"].add_metric([name], 1 if s["state"] == "consuming" else 0)
            for key in ("in_flight", "consumed", "redelivered", "acked", "rejected", "connections"):
                families[key].add_metric([name], s[key])
        yield from families.values()


# -- the plugin ----------------------------------------------------------------------


def _source(value: Any) -> AmqpSourceSettings:
    try:
        return source_from_table(value)
    except AmqpSourceError as e:
        raise ValueError(str(e)) from None


def _unique(sources: tuple[AmqpSourceSettings, ...]) -> None:
    seen: set[str] = set()
    for s in sources:
        if s.name in seen:
            raise ValueError(f"two [[amqp_source]] tables are named {s.name!r}; give each a distinct name")
        seen.add(s.name)


class AmqpTransport(Transport):
    name = "amqp_source"

    def __init__(self, config: Any, context: TransportContext) -> None:
        super().__init__()
        self.config = config
        self.context = context
        self.sources: AmqpSources | None = None

    async def prepare(self) -> None:
        if self.config.amqp_source:
            self._start(self.config.amqp_source)

    def _start(self, sources: tuple[AmqpSourceSettings, ...]) -> None:
        c = self.context
        self.sources = AmqpSources(sources, c.ingest, c.reactor, c.gateway_id, c.run)
        self.sources.setServiceParent(self)

    def live_metrics(self) -> Any:
        return self.sources.live_metrics() if self.sources is not None else iter(())

    def health(self) -> dict[str, tuple[Any, bool | None]]:
        doc = self.sources.health() if self.sources is not None else {}
        return {"amqp_sources": (doc, all(s["ok"] for s in doc.values()))} if doc else {}

    def report(self) -> dict[str, Mapping[str, Mapping[str, Any]]]:
        status = self.sources.status() if self.sources is not None else {}
        return {"amqp_sources": status} if status else {}

    def forget(self, names: list[str] | None) -> None:
        if self.sources is not None:
            self.sources.forget(names)

    async def reconfigure(self, config: Any) -> list[str]:
        new, old = config.amqp_source, self.config.amqp_source
        self.config = config
        if new == old:
            return []
        if self.sources is not None:
            return await self.sources.reconfigure(new)
        self._start(new)
        return [f"AMQP source {s.name} added" for s in new]


@implementer(IPlugin, IDeviceTransport)
class AmqpPlugin:
    name = "amqp_source"
    order = 35
    settings = (
        Setting(
            "amqp-source",
            (),
            _source,
            "[[amqp_source]] tables: RabbitMQ queues to consume readings from, each message acknowledged after "
            "COMMIT (see docs/transports/amqp.rst).",
            multiple=True,
            live=True,
            option=False,
            check=_unique,
        ),
    )

    def build(self, config: Any, context: TransportContext) -> Transport:
        return AmqpTransport(config, context)
