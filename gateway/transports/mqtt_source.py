"""
The gateway as a consumer of an MQTT broker's stream: how a fleet too large
for one gateway is served. A broker cluster (EMQX, HiveMQ, Mosquitto, AWS
IoT Core) holds the devices' connections; N gateways subscribe to the same
topics in one shared subscription group (``$share/<group>/<filter>``) and
the broker splits the stream between them.

Theory of operation. Each ``[[mqtt_source]]`` is a ``BrokerSource``
service: a ``ClientService`` keeps one connection to the broker, reconnecting
with exponential backoff and jitter. The session is persistent (3.1.1: clean
session off; 5.0: clean start off and a session expiry), under a client id
that stays the same across restarts, so what the broker delivered and the
gateway did not acknowledge is delivered again after a crash or restart.

A message's device is named by one level of its topic (``device-level``).
With ``payload = "auto"`` a topic ending in ``readings`` carries the HTTPS
JSON body (or one reading, or the device type's vendor JSON), and any other
last level is a metric whose payload is a bare number, timed when it
arrives; with ``payload = "json"`` every message is a JSON body. The device
must be registered (``gatewayctl device add``); the broker has already
authenticated the sender, so no token is asked for.

Acknowledgement. The gateway sends PUBACK (QoS 1) or PUBREC (QoS 2) to the
broker only after the message's readings are committed (or journaled), in
the order the messages arrived, as MQTT requires. A message that can never
be stored (unknown device, a payload that cannot be read, a rate limit, a
refusal of the database) is kept in rejected_input with its reason first,
then acknowledged: nothing is dropped without a trace, and a poison message
does not block the stream. With the database away and the journal full,
nothing is acknowledged and the connection closes; the broker keeps the
messages in the session and delivers them again on the next connection.

Sessions no longer used. A source removed or renamed (or given another
client id) leaves its persistent session on the broker, still a member of
the shared group: the broker would go on queueing its share of the stream
there, for nobody. So the gateway retires it: it connects once more under
the old client id, takes and stores what the session holds (acknowledged
after COMMIT, as always), unsubscribes, and when nothing more comes for a
moment ends the session (5.0: DISCONNECT with Session Expiry Interval 0;
3.1.1: one more connection with clean session). It does so on SIGHUP with
the settings it had, and at start for every source it reported before in
``mqtt_sources`` whose broker is still configured (a rename, or a move from
``--mqtt-source`` to a table). A source seen before whose broker is no longer
configured cannot be reached: ``/healthz`` names it until ``gatewayctl mqtt
forget NAME`` says it was dealt with.

Backpressure. At most ``window`` messages are unacknowledged (5.0: the
Receive Maximum told to the broker); at that bound, or while the store's
queue is full, the gateway stops reading the socket and the broker holds
the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.ingest.core import Ingest
from gateway.families import counter, gauge
from gateway.ops.reports import StatusReport
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
    is_name,
)
from gateway.net.brokers import SourceSettings, endpoint
from gateway.transports.devices import DeviceNames
from gateway.net.mqttclient import MQTTClientProtocol
from gateway.transports.mqtt_adapter import bare_number
from gateway.transports.session import DeviceSession, Flow, Ticket
from protocols import mqtt

log = Logger()

R = mqtt.Reason
P = mqtt.Property

CONNACK_TIMEOUT = 30.0
RETIRE_QUIET = 2.0  # a retiring session ends once unsubscribed, answered, and silent this long
GONE_CHECK = 30.0  # seconds between looks for sources this gateway reported before and no longer has
CLOSE_TIMEOUT = 5.0  # a connection not closed this long after asking is cut

# -- the state a source reports ----------------------------------------------


@dataclass
class SourceCounters:
    state: str = "starting"  # connecting, subscribed, disconnected, refused, stopped
    since: float = 0.0
    last_error: str = ""
    connections: int = 0
    messages: int = 0  # messages taken from the broker
    readings: int = 0  # readings stored new
    duplicates: int = 0
    rejected: int = 0  # messages kept in rejected_input
    acked: int = 0
    last_message_at: float | None = None
    delay: float | None = None  # seconds from the newest reading's time to its commit, for the last message
    in_flight: int = 0
    oldest_unacked: float | None = None


class _Unavailable(Exception):
    """Storage cannot take the message now: do not acknowledge; reconnect later."""


@dataclass(frozen=True)
class _Kept:
    """A message that can never be stored: kept in rejected_input, then acknowledged."""

    reason: mqtt.Reason
    message: str


class BrokerClient(MQTTClientProtocol):
    """One connection to the broker: CONNECT, SUBSCRIBE, then messages in and acknowledgements out."""

    connack_timeout = CONNACK_TIMEOUT
    close_timeout = CLOSE_TIMEOUT
    too_slow = "no CONNACK or SUBACK within {seconds:g} seconds"

    def __init__(self, source: BrokerSource) -> None:
        settings = source.settings
        broker = settings.broker
        conn = mqtt.Connection(mqtt.CLIENT, max_packet=broker.max_packet, receive_maximum=settings.window)
        super().__init__(source.clock, conn, broker.keepalive)
        self.source = source
        self.settings = settings
        self.session: DeviceSession[Any] = DeviceSession(self.settings.window)
        self.subscribed: Deferred = Deferred()  # fires once the subscription is granted; errbacks if refused
        self._seq = 0
        self._packets: dict[int, tuple[int, int]] = {}  # ticket seq -> (packet id, QoS)
        self._drained: Deferred | None = None  # stopping: fires once every message taken is answered
        self._unsubscribed = False  # retiring: the broker confirmed the UNSUBSCRIBE
        self._quiet: Any = None  # retiring: the timer that ends the session once nothing more comes

    # -- connection ----------------------------------------------------

    def connect_packet(self) -> mqtt.Connect:
        settings, broker = self.settings, self.settings.broker
        properties: tuple[tuple[int, Any], ...] = ()
        if broker.version == mqtt.V5:
            properties = (
                (P.SESSION_EXPIRY_INTERVAL, settings.session_expiry),
                (P.RECEIVE_MAXIMUM, settings.window),
                (P.MAXIMUM_PACKET_SIZE, broker.max_packet),
            )
        password = broker.password.encode() if broker.password is not None else None
        clean = self.source.clean_pass  # retiring a 3.1.1 session: the connection that discards it
        if clean:
            properties = ()
        return mqtt.Connect(
            broker.client_id, broker.version, clean, broker.keepalive, broker.username, password, None, properties
        )

    def may_read(self) -> bool:
        return self.session.may_read

    def handle(self, event: object) -> None:
        if isinstance(event, mqtt.Publish):
            self._message(event)
        elif isinstance(event, mqtt.PubRel):
            self._send(mqtt.PubComp(event.packet_id))  # stored before PUBREC went out
        elif isinstance(event, mqtt.SubAck):
            self._suback(event)
        elif isinstance(event, mqtt.UnsubAck):
            self._unsubscribed = True
            self._retire_when_quiet()

    def accepted(self, event: mqtt.ConnAck) -> None:
        # The deadline holds until the SUBACK (or, retiring, is met now).
        self.source.counters.connections += 1
        if self.source.retiring:
            self._retiring(event)
            return
        self.source.set_state("connecting", "")
        maximum = mqtt.prop(event.properties, P.MAXIMUM_QOS, 2)
        qos = min(self.settings.qos, maximum)
        subscribe = mqtt.Subscribe(1, tuple((f, qos) for f in self.settings.filters))
        self._send(subscribe)
        log.info(
            "MQTT source {source}: connected to {broker} as {client_id} (session {present})",
            source=self.settings.name,
            broker=self.settings.broker.address,
            client_id=self.settings.broker.client_id,
            present="resumed" if event.session_present else "new",
        )

    def _suback(self, event: mqtt.SubAck) -> None:
        refused = [f for f, code in zip(self.settings.filters, event.reasons) if code >= 0x80]
        if refused:
            codes = ", ".join(mqtt.reason_text(c, ()) for c in event.reasons if c >= 0x80)
            self.fail(f"the broker refused the subscription to {', '.join(refused)}: {codes}")
            return
        self.deadline_met()
        self.source.set_state("subscribed", "")
        log.info(
            "MQTT source {source}: subscribed to {filters} at QoS {qos}",
            source=self.settings.name,
            filters=", ".join(self.settings.filters),
            qos=max(event.reasons),
        )
        if not self.subscribed.called:
            self.subscribed.callback(None)

    # -- retiring a session no longer used ------------------------------

    def _retiring(self, event: mqtt.ConnAck) -> None:
        self.deadline_met()
        self.source.set_state("retiring", "")
        if not self.subscribed.called:
            self.subscribed.callback(None)
        if self.source.clean_pass or not event.session_present:
            self._end_session()  # nothing is held under this client id (any more)
            return
        log.info(
            "MQTT source {source}: retiring the session {client_id} on {broker}: taking what it holds, then ending it",
            source=self.settings.name,
            client_id=self.settings.broker.client_id,
            broker=self.settings.broker.address,
        )
        self._send(mqtt.Unsubscribe(1, tuple(self.source.retire_filters or ())))
        self._retire_when_quiet()

    def _retire_when_quiet(self) -> None:
        if not self.source.retiring or self.closing:
            return
        if self._quiet is not None and self._quiet.active():
            self._quiet.cancel()
        self._quiet = None
        last = self.source.counters.last_message_at or 0.0
        left = RETIRE_QUIET - (self.clock.seconds() - last)
        if self._unsubscribed and not self.session.unanswered and left <= 0:
            self._end_session()
        else:
            self._quiet = self.clock.callLater(max(left, RETIRE_QUIET / 4), self._retire_when_quiet)

    def _end_session(self) -> None:
        """Ask the broker to forget the session (5.0 at once; 3.1.1 with one more connection, clean)."""
        done = self.conn.version == mqtt.V5 or self.source.clean_pass
        if self.conn.version == mqtt.V5:
            self._send(mqtt.Disconnect(R.SUCCESS, ((P.SESSION_EXPIRY_INTERVAL, 0),)))
        else:
            self._send(mqtt.Disconnect())
        self.close()
        if done:
            self.source.retired_now()
        else:
            self.source.clean_pass = True  # the service connects again: that connection discards the session

    # -- messages ------------------------------------------------------

    def _message(self, publish: mqtt.Publish) -> None:
        counters = self.source.counters
        counters.messages += 1
        counters.last_message_at = self.clock.seconds()
        if self.source.retiring:
            self._retire_when_quiet()
        ticket = self._ticket(publish) if publish.qos else None
        name = _device_name(publish.topic, self.settings.device_level)
        if name is None:
            self._keep(ticket, publish, None, R.TOPIC_NAME_INVALID, f"topic {publish.topic!r} names no device")
            return
        known, device = self.source.device(name)
        if known:
            self._store(ticket, publish, device)
            return
        # Not known yet: look it up, and take no further message meanwhile (they keep their order).
        self.session.busy = True
        self._flow()

        def found(device: Device | None) -> None:
            self.session.busy = False
            if not self.closing:
                self._store(ticket, publish, device)
                self._flow()
                self.process()

        def failed(f: Failure) -> None:
            # The store is away: not acknowledged (the connection closes, the broker sends it again), or for
            # QoS 0, at most once as the publisher chose.
            self.session.busy = False
            self._settle(ticket, f)
            self._flow()
            self.process()

        self.source.look_up(name).addCallbacks(found, failed)

    def _store(self, ticket: Ticket[Any] | None, publish: mqtt.Publish, device: Device | None) -> None:
        if device is None:
            name = _device_name(publish.topic, self.settings.device_level)
            message = f"device {name!r} is not registered on this gateway (gatewayctl device add {name})"
            self._keep(ticket, publish, None, R.NOT_AUTHORIZED, message)
            return
        try:
            readings = self._readings(publish, device)
        except InvalidInput as e:
            self._keep(ticket, publish, device, R.PAYLOAD_FORMAT_INVALID, e.message)
            return
        except DeviceTypeUnknown as e:
            self._settle(ticket, _Unavailable(e.message))
            return
        ingest = self.source.ingest
        if not ingest.admits(len(readings)):
            self._hold(ticket, publish, device)
            return
        d = ingest.store_readings(device, readings, self.source.origin, lambda: publish.payload)
        d.addCallback(self._stored, readings)
        d.addErrback(self._not_stored, ticket, publish, device)
        if ticket is not None:
            d.addBoth(self._settle_with, ticket)
        else:
            d.addErrback(lambda f: None)  # QoS 0 from the broker: nothing to answer; counted and logged

    def _readings(self, publish: mqtt.Publish, device: Device) -> list[Reading]:
        last = publish.topic.rsplit("/", 1)[-1]
        ingest = self.source.ingest
        if self.settings.payload == "json" or last == "readings":
            return ingest.read_body(device, publish.payload, one=True)
        return [bare_number(last, publish.payload, self.clock.seconds())]

    def _stored(self, result: WriteResult, readings: list[Reading]) -> WriteResult:
        counters = self.source.counters
        counters.readings += result.accepted
        counters.duplicates += result.duplicates
        if readings:
            counters.delay = self.clock.seconds() - max(r.ts_us for r in readings) / 1e6
        return result

    def _not_stored(self, f: Failure, ticket: Any, publish: mqtt.Publish, device: Device) -> Any:
        """A write that failed: refused for good → kept and acknowledged; unavailable → not acknowledged."""
        error = f.value
        if isinstance(error, StoreRejected):  # kept in rejected_input by the ingest path already
            self.source.counters.rejected += 1
            return _Kept(R.UNSPECIFIED_ERROR, error.message)
        if isinstance(error, RateLimited):
            # A broker cannot be asked to send one device's message later: keep it, with the reason.
            self.source.counters.rejected += 1
            return self.source.ingest.refuse(
                self.source.origin, error.code, error.message, device=device.name, raw=publish.payload
            ).addCallback(lambda _: _Kept(R.QUOTA_EXCEEDED, error.message))
        if isinstance(error, (StoreUnavailable, StoreOverloaded, DeviceTypeUnknown)):
            return _Unavailable(error.message)
        return f

    def _keep(
        self, ticket: Any, publish: mqtt.Publish, device: Device | None, reason: mqtt.Reason, message: str
    ) -> None:
        """Keep a message that can never be stored, then acknowledge it."""
        self.source.counters.rejected += 1
        name = device.name if device else None
        raw = publish.payload
        kept = self.source.ingest.refuse(self.source.origin, reason.name.lower(), message, device=name, raw=raw)
        if ticket is not None:
            kept.addCallback(lambda _: _Kept(reason, message)).addBoth(self._settle_with, ticket)

    def _hold(self, ticket: Any, publish: mqtt.Publish, device: Device) -> None:
        """No room in the store: keep this message, read nothing more until there is room."""
        self.session.held = True
        self._flow()

        def room(_: Any) -> None:
            self.session.held = False
            if self.closing:
                return
            self._store(ticket, publish, device)
            self._flow()
            self.process()

        self.source.ingest.wait_for_room().addCallback(room)

    # -- acknowledgements, in order ---------------------------------------

    def _ticket(self, publish: mqtt.Publish) -> Ticket[Any]:
        self._seq += 1
        ticket = self.session.arrived(self._seq, self.clock.seconds())
        assert publish.packet_id is not None
        self._packets[self._seq] = (publish.packet_id, publish.qos)
        self._flow()
        return ticket

    def _settle_with(self, outcome: Any, ticket: Ticket[Any]) -> None:
        self._settle(ticket, outcome)

    def _settle(self, ticket: Ticket[Any] | None, outcome: Any) -> None:
        if ticket is None:
            return
        for ready in self.session.settle(ticket, outcome):
            packet_id, qos = self._packets.pop(ready.seq)
            if not self.closing:
                self._answer(packet_id, qos, ready.outcome)
        self._flow()
        if self._drained is not None and not self.session.unanswered:
            self._disconnect()
        if self.source.retiring and not self.session.unanswered:
            self._retire_when_quiet()

    def _answer(self, packet_id: int, qos: int, outcome: Any) -> None:
        ack = mqtt.PubAck if qos == 1 else mqtt.PubRec
        v5 = self.conn.version == mqtt.V5
        if isinstance(outcome, WriteResult):
            self._send(ack(packet_id))
            self.source.counters.acked += 1
            return
        if isinstance(outcome, _Kept):
            self._send(ack(packet_id, outcome.reason if v5 else R.SUCCESS))
            self.source.counters.acked += 1
            return
        if isinstance(outcome, _Unavailable):
            self.fail(f"storage cannot take messages now ({outcome}); the broker keeps them")
            return
        f = outcome if isinstance(outcome, Failure) else Failure(outcome)
        if f.check(StoreUnavailable, StoreOverloaded):
            self.fail(f"the device could not be looked up ({f.getErrorMessage()}); the broker keeps the messages")
            return
        log.failure("MQTT source {source}: storing a message failed", f, source=self.settings.name)
        self.fail("the gateway failed to store a message; the broker keeps it")

    # -- flow, sending, closing ------------------------------------------

    def _flow(self) -> None:
        if self.closing:
            return
        self.source.counters.in_flight = self.session.unanswered
        action = self.session.flow()
        if action is Flow.PAUSE:
            self.paused = True
            self.transport.pauseProducing()
        elif action is Flow.RESUME:
            self.paused = False
            self.transport.resumeProducing()
            self.process()

    def _send(self, event: mqtt.Event) -> None:
        try:
            self.send(event)
        except mqtt.LocalProtocolError as e:
            log.debug("MQTT source {source}: not sent: {error}", source=self.settings.name, error=e.message)

    def failed(self, why: str) -> None:
        """This connection is left (the service connects again after a backoff)."""
        log.warn("MQTT source {source}: {why}", source=self.settings.name, why=why)
        self.source.set_state("disconnected", why)
        self.session.stopped = True
        if not self.subscribed.called:
            self.subscribed.errback(ConnectionError(why))

    def stop(self, timeout: float = 10.0) -> Deferred:
        """
        The gateway is stopping: take no more messages, let those taken commit and be acknowledged (for at
        most ``timeout`` seconds), then DISCONNECT; the session stays with the broker.
        """
        done: Deferred = Deferred()
        if self.closing:
            done.callback(None)
            return done
        self.session.stopped = True
        self._flow()
        self._drained = done
        timer = self.clock.callLater(timeout, self._disconnect)
        done.addBoth(lambda r: timer.cancel() if timer.active() else None)
        if not self.session.unanswered:
            self._disconnect()
        return done

    def _disconnect(self) -> None:
        if not self.closing:
            if self.conn.state == mqtt.CONNECTED:
                self._send(mqtt.Disconnect())
            self.close()
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.callback(None)

    def close(self) -> None:
        self.session.stopped = True
        if self._quiet is not None and self._quiet.active():
            self._quiet.cancel()
        self._quiet = None
        super().close()

    def ended(self, reason: Failure) -> None:
        if not self.closing:
            self.source.set_state("disconnected", f"the connection was lost: {reason.getErrorMessage()}")
        if self._quiet is not None and self._quiet.active():
            self._quiet.cancel()
        self.source.counters.in_flight = 0
        if self.source.client is self:
            self.source.client = None
        if not self.subscribed.called:
            self.subscribed.errback(ConnectionError(self.source.counters.last_error or "connection lost"))


def _device_name(topic: str, level: int) -> str | None:
    levels = topic.split("/")
    if level >= len(levels) or not is_name(levels[level]):
        return None
    return levels[level]


class _ClientFactory(protocol.Factory):
    noisy = False

    def __init__(self, source: BrokerSource) -> None:
        self.source = source

    def buildProtocol(self, addr: Any) -> BrokerClient:
        client = BrokerClient(self.source)
        self.source.client = client
        return client


class BrokerSource(ClientService):
    """One [[mqtt_source]]: a persistent, reconnecting subscription feeding the ingest path."""

    def __init__(
        self,
        settings: SourceSettings,
        ingest: Ingest,
        reactor: Any,
        clock: Any = None,
        retire: tuple[str, ...] | None = None,
    ) -> None:
        self.settings = settings
        self.ingest = ingest
        self.clock = clock or reactor
        # Retiring a session no longer used: the filters it was subscribed to (to unsubscribe), else None.
        self.retire_filters = retire
        self.clean_pass = False
        self.retired: Deferred = Deferred()  # fires once the retired session has been ended
        self.counters = SourceCounters(since=self.clock.seconds())
        self.client: BrokerClient | None = None
        broker = settings.broker
        self.origin = Source("broker+tls" if broker.tls else "broker", broker.host, broker.port, broker.tls)
        self.devices = DeviceNames(ingest, self.clock)
        policy = backoffPolicy(initialDelay=settings.backoff, maxDelay=settings.backoff_cap, factor=2.0)
        super().__init__(
            endpoint(reactor, broker, timeout=CONNACK_TIMEOUT),
            _ClientFactory(self),
            retryPolicy=policy,
            clock=self.clock,
            prepareConnection=lambda p: p.subscribed,  # type: ignore[attr-defined]
        )

    @property
    def retiring(self) -> bool:
        return self.retire_filters is not None

    def retired_now(self) -> None:
        log.info(
            "MQTT source {source}: the session {client_id} on {broker} is ended ({messages} messages it held were "
            "taken)",
            source=self.settings.name,
            client_id=self.settings.broker.client_id,
            broker=self.settings.broker.address,
            messages=self.counters.messages,
        )
        if not self.retired.called:
            self.retired.callback(self.counters.messages)

    def set_state(self, state: str, error: str) -> None:
        c = self.counters
        if state != c.state:
            c.state, c.since = state, self.clock.seconds()
        if error:
            c.last_error = error

    def device(self, name: str) -> tuple[bool, Device | None]:
        return self.devices.get(name)

    def look_up(self, name: str) -> Deferred:
        return self.devices.look_up(name)

    def forget(self, names: list[str] | None = None) -> None:
        self.devices.forget(names)

    def startService(self) -> None:
        self.set_state("connecting", "")
        if self.retiring:
            ClientService.startService(self)
            return
        log.info(
            "MQTT source {source}: consuming {filters} from {url}",
            source=self.settings.name,
            filters=", ".join(self.settings.filters),
            url=self.settings.broker.url,
        )
        if not self.settings.broker.tls:
            log.warn(
                "MQTT source {source}: {url} is not TLS: credentials and readings cross the network in clear",
                source=self.settings.name,
                url=self.settings.broker.url,
            )
        super().startService()

    def stopService(self) -> Deferred:
        client = self.client
        drained = client.stop() if client is not None else succeed(None)
        self.set_state("stopped", "")
        return drained.addCallback(lambda _: super(BrokerSource, self).stopService())

    def status(self) -> dict[str, Any]:
        c = self.counters
        now = self.clock.seconds()
        client = self.client
        oldest = client.session.oldest_arrival if client is not None else None
        return {
            "url": self.settings.broker.url,
            "client_id": self.settings.broker.client_id,
            "filters": list(self.settings.filters),
            "state": c.state,
            "state_seconds": now - c.since,
            "last_error": c.last_error,
            "connections": c.connections,
            "messages": c.messages,
            "readings": c.readings,
            "duplicates": c.duplicates,
            "rejected": c.rejected,
            "acked": c.acked,
            "in_flight": c.in_flight,
            "oldest_unacked_seconds": None if oldest is None else now - oldest,
            "last_message_seconds": None if c.last_message_at is None else now - c.last_message_at,
            "delay_seconds": c.delay,
        }


class BrokerSources(MultiService):
    """Every [[mqtt_source]], their health, their /metrics and their state in the database."""

    def __init__(
        self, sources: tuple[SourceSettings, ...], ingest: Ingest, reactor: Any, owner: str, run: Callable[..., Any]
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.ingest = ingest
        self.owner = owner  # this gateway's id, the row's key in mqtt_sources
        self.run = run
        self.sources: dict[str, BrokerSource] = {}
        self.retiring: dict[tuple[str, str], BrokerSource] = {}  # (name, client id) -> its last connection
        # Sources this gateway reported before that it can no longer reach: name -> (client id, URL).
        self.gone: dict[str, tuple[str, str]] = {}
        for settings in self._own(sources).values():
            self._add(settings)
        self.reporter = StatusReport("mqtt_sources", owner, self.status, run, reactor)
        self._gone_check = LoopingCall(self.look_for_retired)
        self._gone_check.clock = reactor

    def _own(self, sources: tuple[SourceSettings, ...]) -> dict[str, SourceSettings]:
        """The settings by name, each with this gateway's client id unless the table gives one."""
        return {s.name: dataclasses.replace(s, broker=s.broker.with_client_id(self.owner, s.name)) for s in sources}

    def _add(self, settings: SourceSettings) -> None:
        source = self.sources[settings.name] = BrokerSource(settings, self.ingest, self.reactor)
        source.setServiceParent(self)  # started at once when this service runs

    async def reconfigure(self, sources: tuple[SourceSettings, ...]) -> list[str]:
        """
        New [[mqtt_source]] tables (SIGHUP): stop removed and changed ones, start new and changed ones; the
        session of one removed, or now under another client id, is retired.
        """
        new = self._own(sources)
        old = set(self.sources)
        changes = []
        for name in sorted(self.sources):
            if new.get(name) != self.sources[name].settings:
                stopped = self.sources.pop(name)
                await stopped.disownServiceParent()
                kept = new.get(name)
                if kept is None or kept.broker.client_id != stopped.settings.broker.client_id:
                    self._retire(stopped.settings, stopped.settings.filters)
                if name not in new:
                    changes.append(f"MQTT source {name} removed")
        for name, settings in new.items():
            if name not in self.sources:
                changes.append(f"MQTT source {name} {'changed' if name in old else 'added'}")
                self._add(settings)
        return changes

    def _retire(self, settings: SourceSettings, filters: tuple[str, ...]) -> None:
        """End a session no longer used, after taking what it holds (see the module's docstring)."""
        key = (settings.name, settings.broker.client_id)
        if key in self.retiring:
            return
        source = self.retiring[key] = BrokerSource(settings, self.ingest, self.reactor, retire=filters)
        source.setServiceParent(self)

        def ended(messages: Any) -> Deferred:
            self.retiring.pop(key, None)
            d = self.run(
                lambda c: c.runOperation(
                    "DELETE FROM mqtt_sources WHERE gateway = %s AND source = %s AND status->>'client_id' = %s",
                    (self.owner, settings.name, settings.broker.client_id),
                )
            )
            d.addErrback(lambda f: log.warn("MQTT source {source}: its old row stays: {e}", source=key[0], e=f.value))
            d.addBoth(lambda _: source.disownServiceParent())
            return d

        source.retired.addCallback(ended)

    def look_for_retired(self) -> Deferred:
        """
        Sources this gateway reported before and no longer has (renamed, removed while it was down, another
        client id): retired when their broker is still configured, else named as gone. Never errbacks.
        """
        sql = (
            "SELECT source, status->>'client_id', status->>'url', status->'filters' FROM mqtt_sources "
            "WHERE gateway = %s"
        )
        d = self.run(lambda c: c.runQuery(sql, (self.owner,)))

        def found(rows: list[tuple]) -> None:
            gone = {}
            current = {(s.settings.name, s.settings.broker.client_id) for s in self.sources.values()}
            for name, client_id, url, filters in rows:
                if (name, client_id) in current or (name, client_id) in self.retiring or not client_id:
                    continue
                same_broker = [s.settings for s in self.sources.values() if s.settings.broker.url == url]
                if same_broker:
                    base = next((s for s in same_broker if s.name == name), same_broker[0])
                    settings = dataclasses.replace(
                        base, name=name, broker=dataclasses.replace(base.broker, client_id=client_id)
                    )
                    self._retire(settings, tuple(filters or base.filters))
                else:
                    gone[name] = (client_id, url)
            for name, (client_id, url) in gone.items():
                if name not in self.gone:
                    log.warn(
                        "MQTT source {source} (client id {client_id} on {url}) is configured no more, and no source "
                        "names that broker: its session there may still take a share of the group's messages. "
                        "Configure that broker again for a moment (the gateway then ends the session), or end it on "
                        "the broker, then run 'gatewayctl mqtt forget {source}'",
                        source=name,
                        client_id=client_id,
                        url=url,
                    )
            self.gone = gone

        return d.addCallbacks(found, lambda f: log.debug("MQTT sources not checked: {e}", e=f.getErrorMessage()))

    def startService(self) -> None:
        super().startService()
        self.reporter.start()
        self._gone_check.start(GONE_CHECK, now=True)

    def stopService(self) -> Deferred:
        if self._gone_check.running:
            self._gone_check.stop()
        d = super().stopService()
        return d.addCallback(lambda _: self.reporter.stop())

    def forget(self, names: list[str] | None = None) -> None:
        for source in self.sources.values():
            source.forget(names)

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: source.status() for name, source in sorted(self.sources.items())}

    def health(self) -> dict[str, dict[str, Any]]:
        """Each source's status, ``ok`` and, when not ok, the problem in words."""
        out = {}
        for name, (client_id, url) in sorted(self.gone.items()):
            out[name] = {
                "state": "gone",
                "client_id": client_id,
                "url": url,
                "ok": False,
                "problem": f"configured no more, and its session {client_id} on {url} may still take messages; "
                f"end it, then run gatewayctl mqtt forget {name}",
            }
        for name, source in sorted(self.sources.items()):
            doc = {**source.status(), "ok": True}
            if doc["state"] != "subscribed" and doc["state_seconds"] > source.settings.stall:
                doc.update(
                    ok=False,
                    problem=f"not subscribed for {doc['state_seconds']:.0f}s"
                    + (f": {doc['last_error']}" if doc["last_error"] else ""),
                )
            out[name] = doc
        return out

    def live_metrics(self) -> Iterator[Any]:
        families = {
            "subscribed": gauge(
                "gateway_mqtt_source_subscribed", "1 while the source's subscription is up.", labels=["source"]
            ),
            "in_flight": gauge(
                "gateway_mqtt_source_in_flight",
                "Messages taken from the broker and not yet acknowledged.",
                labels=["source"],
            ),
            "oldest": gauge(
                "gateway_mqtt_source_oldest_unacked_seconds",
                "Age of the oldest message not yet acknowledged to the broker.",
                labels=["source"],
            ),
            "delay": gauge(
                "gateway_mqtt_source_delay_seconds",
                "From the newest reading's time to its commit, for the last message (grows while a backlog drains).",
                labels=["source"],
            ),
            "messages": counter("gateway_mqtt_source_messages", "Messages taken from the broker.", ["source"]),
            "rejected": counter(
                "gateway_mqtt_source_rejected", "Messages kept in rejected_input, then acknowledged.", ["source"]
            ),
            "connections": counter(
                "gateway_mqtt_source_connections", "Connections accepted by the broker.", ["source"]
            ),
        }
        for name, s in self.status().items():
            families["subscribed"].add_metric([name], 1 if s["state"] == "subscribed" else 0)
            families["in_flight"].add_metric([name], s["in_flight"])
            families["oldest"].add_metric([name], s["oldest_unacked_seconds"] or 0.0)
            families["delay"].add_metric([name], s["delay_seconds"] or 0.0)
            families["messages"].add_metric([name], s["messages"])
            families["rejected"].add_metric([name], s["rejected"])
            families["connections"].add_metric([name], s["connections"])
        yield from families.values()
