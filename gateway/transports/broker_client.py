"""
One connection of a broker source (see mqtt_source.py): CONNECT and SUBSCRIBE on the
MQTT client core, messages in, stored through the ingest core, and acknowledged (PUBACK,
PUBREC) only after COMMIT, in the order they came; retiring a session no longer used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.readings import (
    Device,
    DeviceTypeUnknown,
    InvalidInput,
    RateLimited,
    Reading,
    StoreOverloaded,
    StoreRejected,
    StoreUnavailable,
    WriteResult,
    is_name,
)
from gateway.net.mqttclient import MQTTClientProtocol
from gateway.transports.broker_commands import parsed_result, result_of
from gateway.transports.mqtt_adapter import bare_number
from gateway.transports.flow import SessionFlow
from gateway.transports.session import DeviceSession, Ticket
from gateway.transports.sparkplug_link import state_online, state_payload, will
from protocols import mqtt

if TYPE_CHECKING:
    from gateway.transports.mqtt_source import BrokerSource

log = Logger()


R = mqtt.Reason


P = mqtt.Property


CONNACK_TIMEOUT = 30.0


RETIRE_QUIET = 2.0  # a retiring session ends once unsubscribed, answered, and silent this long


CLOSE_TIMEOUT = 5.0  # a connection not closed this long after asking is cut


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


class BrokerClient(SessionFlow, MQTTClientProtocol):
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
        last_will = None
        if self.source.sparkplug is not None:  # offline, retained, should this connection end unasked
            self.source.state_ts = int(self.clock.seconds() * 1000)
            last_will = will(settings, self.source.state_ts)
        return mqtt.Connect(
            broker.client_id, broker.version, clean, broker.keepalive, broker.username, password, last_will, properties
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
        elif isinstance(event, mqtt.PubAck):
            self.source.command_acked(event)  # a command this gateway published

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
        if self.source.sparkplug is not None:  # the host application is online (the Will has this timestamp)
            online = state_payload(True, self.source.state_ts)
            packet_id = self.source.command_packet_id()
            self._send(mqtt.Publish(self.settings.state_topic, online, 1, packet_id, retain=True))
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
        if self.source.sparkplug is not None:
            self._sparkplug(ticket, publish)
            return
        if self.source.commands is not None:
            result = result_of(self.settings.command_topic, publish.topic)
            if result is not None:
                self._result(ticket, publish, *result)
                return
        name = _device_name(publish.topic, self.settings.device_level)
        if name is None:
            self._keep(ticket, publish, None, R.TOPIC_NAME_INVALID, f"topic {publish.topic!r} names no device")
            return
        self._for_device(ticket, publish, name, lambda device: self._store(ticket, publish, device))

    def _for_device(self, ticket: Ticket[Any] | None, publish: mqtt.Publish, name: str, then: Any) -> None:
        """``then(device)`` with the device of that name (None: unknown), looked up if need be, in order."""
        known, device = self.source.device(name)
        if known:
            then(device)
            return
        # Not known yet: look it up, and take no further message meanwhile (they keep their order).
        self.session.busy = True
        self._flow()

        def found(device: Device | None) -> None:
            self.session.busy = False
            if not self.closing:
                then(device)
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

    def _result(self, ticket: Ticket[Any] | None, publish: mqtt.Publish, device: str, id_: str) -> None:
        """A device's result to a command: recorded once, then acknowledged."""
        try:
            status, result = parsed_result(id_, publish.payload)
        except InvalidInput as e:
            self._keep(ticket, publish, None, R.PAYLOAD_FORMAT_INVALID, e.message)
            return
        commands: Any = self.source.commands
        d = Deferred.fromCoroutine(commands.finished(device, id_, status, result, "mqtt_source"))
        d.addCallback(lambda _: WriteResult(0, 0))
        if ticket is not None:
            d.addBoth(self._settle_with, ticket)
        else:
            d.addErrback(lambda f: log.warn("a QoS 0 command result was not recorded: {e}", e=f.value))

    def send_command(self, publish: mqtt.Publish) -> None:
        self._send(publish)

    # -- Sparkplug B (sparkplug.py) ----------------------------------------

    def _sparkplug(self, ticket: Ticket[Any] | None, publish: mqtt.Publish) -> None:
        ready = self.source.births_ready
        if ready is not None and not ready.called:  # births of before a restart: read them first
            self.session.busy = True
            self._flow()

            def go(_: Any) -> None:
                self.session.busy = False
                if not self.closing:
                    self._sparkplug(ticket, publish)
                    self._flow()
                    self.process()

            ready.addCallback(go)
            return
        host = self.source.sparkplug
        assert host is not None
        now = self.clock.seconds()
        out = host.message(publish.topic, publish.payload, now)
        if out.kind == "state" and publish.topic == self.settings.state_topic and not self.session.stopped:
            self._state_again(publish.payload)
        if out.rebirth is not None:
            topic, payload = host.rebirth_message(*out.rebirth, now)
            self._send(mqtt.Publish(topic, payload, qos=0))
            log.info("Sparkplug: asked {group}/{node} for a rebirth", group=out.rebirth[0], node=out.rebirth[1])
        if out.kind in ("NDEATH", "DDEATH"):
            self.source.sparkplug_offline()
        if out.keep is not None:
            reason, message = out.keep
            self._keep(ticket, publish, None, R.PAYLOAD_FORMAT_INVALID, message, code=f"sparkplug_{reason}")
            return
        birth = out.birth
        keep_birth = (lambda: self.source.save_birth(*birth, publish.payload)) if birth is not None else None
        if out.device is None or not out.readings:
            if ticket is not None:
                done = keep_birth() if keep_birth is not None else succeed(None)
                done.addCallback(lambda _: WriteResult(0, 0)).addBoth(self._settle_with, ticket)
            return
        name, readings = out.device, out.readings

        def store(device: Device | None) -> None:
            self._store(ticket, publish, device, readings, keep_birth, name)

        self._for_device(ticket, publish, name, store)

    def _state_again(self, payload: bytes) -> None:
        """
        This host's own STATE said offline while it is online (an earlier session's Will come late, or a
        client publishing it): the online message again at once, with this session's timestamp, so that
        edge nodes waiting for their primary host do not take it for gone (Sparkplug 3.0, host session).
        """
        if state_online(payload) is not False:
            return
        online = state_payload(True, self.source.state_ts)
        self._send(mqtt.Publish(self.settings.state_topic, online, 1, self.source.command_packet_id(), retain=True))
        log.info("MQTT source {source}: STATE offline seen while online; online again", source=self.settings.name)

    def _store(
        self,
        ticket: Ticket[Any] | None,
        publish: mqtt.Publish,
        device: Device | None,
        given: list[Reading] | None = None,
        then: Any = None,
        name: str | None = None,
    ) -> None:
        """Store the message's readings (``given``, else read from its payload); ``then()`` before the answer."""
        if device is None:
            name = name or _device_name(publish.topic, self.settings.device_level)
            message = f"device {name!r} is not registered on this gateway (gatewayctl device add {name})"
            self._keep(ticket, publish, None, R.NOT_AUTHORIZED, message)
            return
        try:
            readings = given if given is not None else self._readings(publish, device)
        except InvalidInput as e:
            self._keep(ticket, publish, device, R.PAYLOAD_FORMAT_INVALID, e.message)
            return
        except DeviceTypeUnknown as e:
            self._settle(ticket, _Unavailable(e.message))
            return
        ingest = self.source.ingest
        if not ingest.admits(len(readings)):
            self._hold(ticket, publish, device, given, then)
            return
        self.source.reachable(device.name)
        d = ingest.store_readings(device, readings, self.source.origin, lambda: publish.payload)
        d.addCallback(self._stored, readings)
        downlink = self.source.downlinks.get(device.name)
        if given is not None and downlink is not None and hasattr(downlink, "reported"):
            d.addCallback(lambda r: (downlink.reported(readings), r)[1])
        if then is not None:
            d.addCallback(lambda r: then().addCallback(lambda _: r))
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
        self,
        ticket: Any,
        publish: mqtt.Publish,
        device: Device | None,
        reason: mqtt.Reason,
        message: str,
        code: str | None = None,
    ) -> None:
        """Keep a message that can never be stored, then acknowledge it."""
        self.source.counters.rejected += 1
        name = device.name if device else None
        raw = publish.payload
        kept = self.source.ingest.refuse(self.source.origin, code or reason.name.lower(), message, device=name, raw=raw)
        if ticket is not None:
            kept.addCallback(lambda _: _Kept(reason, message)).addBoth(self._settle_with, ticket)

    def _hold(self, ticket: Any, publish: mqtt.Publish, device: Device, given: Any = None, then: Any = None) -> None:
        """No room in the store: keep this message, read nothing more until there is room."""
        self.hold(self.source.ingest, lambda: self._store(ticket, publish, device, given, then))

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

    def flow_ended(self) -> bool:
        return self.closing

    def take(self) -> None:
        self.process()

    def flowed(self, paused: bool) -> None:
        self.paused = paused

    def _flow(self) -> None:
        if not self.closing:
            self.source.counters.in_flight = self.session.unanswered
        self.flow()

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
                if self.source.sparkplug is not None:  # offline, said before a DISCONNECT (which sends no Will)
                    offline = state_payload(False, self.source.state_ts)
                    self._send(mqtt.Publish(self.settings.state_topic, offline, 0, None, retain=True))
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
            self.source.connection_ended()
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
