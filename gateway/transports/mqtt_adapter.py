"""
The gateway as an MQTT server for devices: a thin Twisted protocol around
``protocols.mqtt`` (the codec) and ``transports.session`` (answer order and
flow control), feeding the same ingest path as HTTPS and TGP.

Theory of operation. CONNECT carries the device's name as user name and its
token as password; while the token is looked up the session is busy and no
further packet is taken. Once connected, a PUBLISH to
``devices/<device>/readings`` carries the HTTPS JSON body (or one reading
object, or the device type's vendor JSON); one to ``devices/<device>/<metric>``
carries a bare number, timed when it arrives. A QoS 1 or 2 PUBLISH gets a
ticket in the session, and its PUBACK or PUBREC goes out only after its
readings are committed (or journaled), in the order the PUBLISHes arrived,
as MQTT requires. PUBREL is answered at once: the store is idempotent, so a
QoS 2 message sent again is stored once however the exchange ends.

Backpressure. v5 devices are told a Receive Maximum (``--device-window``);
for both versions the session pauses the transport when that many messages
are unanswered or the store's write queue has no room.

Failures. A payload that cannot be read, a topic naming another device, a
rate limit: a v5 device gets a PUBACK with the reason code and a reason
string; 3.1.1 has no negative PUBACK, so a bad payload is acknowledged (and
kept in rejected_input), and the rest close the connection without an
acknowledgement. With the database away and the journal full, or no room,
nothing is acknowledged and the connection closes (v5: DISCONNECT 0x89), so
the device sends again later.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.readings import (
    CloseReason,
    Device,
    DeviceTypeUnknown,
    InvalidInput,
    RateLimited,
    Reading,
    StoreOverloaded,
    StoreRejected,
    StoreUnavailable,
    Unauthorized,
    WriteResult,
    check_reading,
    is_name,
)
from gateway.transports.mqtt_commands import (
    MqttDownlink,
    command_result,
    result_of,
    subscribe,
    take_commands,
    unsubscribe,
)
from gateway.transports.session import Ticket
from gateway.transports.devices import DeviceConnection, DeviceListenerFactory
from protocols import mqtt

log = Logger()

R = mqtt.Reason
P = mqtt.Property

WRONG_CREDENTIALS = "unknown device, revoked device or wrong token"
TOPIC_ALIASES = 16  # topic aliases a v5 device may set up
MAX_NUMBER = 64  # bytes of a bare-number payload
# The longest an MQTT session is kept after its connection ends: v5 devices asking for longer are told
# this in CONNACK; a 3.1.1 device's kept session (clean session 0) lasts this long too.
MAX_SESSION_EXPIRY = 30 * 24 * 3600

# Why a session ends (the vocabulary all device transports share) → the v5 DISCONNECT reason.
_ENDINGS = {
    CloseReason.REPLACED: R.SESSION_TAKEN_OVER,
    CloseReason.SHUTTING_DOWN: R.SERVER_SHUTTING_DOWN,
    CloseReason.NOT_AUTHORIZED: R.NOT_AUTHORIZED,
    CloseReason.TIMEOUT: R.KEEP_ALIVE_TIMEOUT,
    CloseReason.NORMAL: R.ADMINISTRATIVE_ACTION,
}


@dataclass(frozen=True)
class _Refusal:
    """A message refused for good: a v5 device is told why; the input is kept."""

    reason: mqtt.Reason
    message: str


class MQTTProtocol(DeviceConnection):
    __slots__ = ("conn", "keepalive", "_seq", "_packets", "_pending", "_pending_size", "_kept_session", "downlink")

    def __init__(self, factory: MQTTFactory) -> None:
        super().__init__(factory)
        settings = factory.settings
        self.conn = mqtt.Connection(
            mqtt.SERVER,
            max_packet=settings.max_frame,
            receive_maximum=settings.window,
            topic_alias_maximum=TOPIC_ALIASES,
        )
        self.keepalive = 0.0  # seconds of silence the session is allowed, once connected
        self._seq = 0
        self._packets: dict[int, tuple[int, int]] = {}  # ticket seq -> (packet id, QoS) of the message
        # Messages taken from what one read brought, stored together once it is all taken: (PUBLISH, its
        # readings, its ticket or None at QoS 0). None when there are none (most of the time, for most devices).
        self._pending: list[tuple[mqtt.Publish, list[Reading], Ticket[Any] | None]] | None = None
        self._pending_size = 0  # their readings
        self._kept_session: tuple[Device, str] | None = None  # (device, client id) of a session kept after this
        self.downlink: MqttDownlink | None = None  # once subscribed to its command topic (mqtt_commands.py)

    # -- connection ------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.conn.receive_data(data)
        if self.conn.state == mqtt.CONNECTED:
            self._touch(self.keepalive)
        self._process()

    def _process(self) -> None:
        try:
            while not self._closing and self.session.may_read:
                try:
                    event = self.conn.next_event()
                except mqtt.RemoteProtocolError as e:
                    self._protocol_error(e)
                    return
                if event is mqtt.NEED_DATA:
                    return
                if event is mqtt.CONNECTION_CLOSED:
                    self._close()
                    return
                self._handle(event)
        finally:
            self._store_pending()

    def _handle(self, event: object) -> None:
        if isinstance(event, mqtt.Publish):
            self._publish(event)
        elif isinstance(event, mqtt.PubRel):
            # The readings were stored before PUBREC went out (in this connection or an earlier one, whose
            # PUBREL this may be): nothing is left to do but say so.
            self._send(mqtt.PubComp(event.packet_id))
        elif isinstance(event, mqtt.PingReq):
            self._send(mqtt.PingResp())
        elif isinstance(event, mqtt.Connect):
            self._connect(event)
        elif isinstance(event, mqtt.Disconnect):
            self._close()
        elif isinstance(event, mqtt.Subscribe):
            subscribe(self, event)
        elif isinstance(event, mqtt.Unsubscribe):
            unsubscribe(self, event)
        elif isinstance(event, mqtt.PubAck) and self.downlink is not None:
            self.downlink.acked(event)
        elif isinstance(event, mqtt.Auth):
            self._disconnect(R.BAD_AUTHENTICATION_METHOD, "enhanced authentication is not supported")
        # PUBREC and PUBCOMP answer QoS 2 messages the gateway never sends: the codec refuses them.

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self.downlink is not None:
            self.factory.commands.detach(self.downlink.device, self.downlink)
        if self._kept_session is not None:
            kept, self._kept_session = self._kept_session, None
            # The kept session's expiry counts from now. Not recorded (the database away), the session just
            # lasts until the device's next connection looks at it.
            self.factory.ingest.session_ends(*kept).addErrback(
                lambda f: log.warn("MQTT session end not recorded: {error}", error=getattr(f.value, "message", f.value))
            )

    # -- CONNECT ---------------------------------------------------------

    def _connect(self, connect: mqtt.Connect) -> None:
        v5 = connect.version == mqtt.V5
        claimed = connect.username
        if v5 and mqtt.prop(connect.properties, P.AUTHENTICATION_METHOD) is not None:
            self._refuse_connect(R.BAD_AUTHENTICATION_METHOD, "enhanced authentication is not supported", claimed)
            return
        if connect.will is not None and connect.will.retain and v5:
            self._refuse_connect(R.RETAIN_NOT_SUPPORTED, "retained messages are not supported", claimed)
            return
        if not connect.client_id and not connect.clean_start and not v5:
            self._refuse_connect(R.CLIENT_IDENTIFIER_NOT_VALID, "an empty client id needs a clean session", claimed)
            return
        if (
            connect.password is None
            and claimed is not None
            and is_name(claimed)
            and self.factory.require_client_cert
            and self.factory.certificate_allows(self.transport, claimed)
        ):
            self._sign_in_by_certificate(connect, claimed)
            return
        if not claimed or connect.password is None or not is_name(claimed):
            self._refuse_connect(
                R.BAD_USER_NAME_OR_PASSWORD,
                "the user name must be the device's name and the password its token",
                claimed,
            )
            return
        try:
            token = connect.password.decode("ascii")
        except UnicodeDecodeError:
            self._refuse_connect(R.BAD_USER_NAME_OR_PASSWORD, WRONG_CREDENTIALS, claimed)
            return
        self._looking_up(True)

        def found(device: Device) -> None:
            if self._closing:
                return
            if device.name != claimed:
                self._refuse_connect(R.BAD_USER_NAME_OR_PASSWORD, WRONG_CREDENTIALS, claimed)
                return
            if not self.factory.certificate_allows(self.transport, device.name):
                self._refuse_connect(R.NOT_AUTHORIZED, "the client certificate does not name this device", claimed)
                return
            self._begin_session(connect, device)

        lookup = Deferred.fromCoroutine(self.factory.ingest.authenticate(token, self.source))
        lookup.addCallbacks(found, self._lookup_failed, errbackArgs=(claimed,))

    def _sign_in_by_certificate(self, connect: mqtt.Connect, name: str) -> None:
        """With --device-ca, a client certificate naming the device stands for its token (no password given)."""
        self._looking_up(True)

        def found(result: tuple[Device, bytes] | None) -> None:
            if self._closing:
                return
            if result is None:  # unknown or revoked
                self._refuse_connect(R.NOT_AUTHORIZED, "unknown or revoked device", name)
                return
            self._begin_session(connect, result[0])

        self.factory.ingest.device_key(name).addCallbacks(found, self._lookup_failed, errbackArgs=(name,))

    def _lookup_failed(self, f: Failure, claimed: str) -> None:
        """The device could not be looked up: say why in CONNACK and close."""
        self.session.busy = False
        if self._closing:
            return
        if f.check(Unauthorized):  # refused and logged by the ingest path already
            self._send(mqtt.ConnAck(R.BAD_USER_NAME_OR_PASSWORD, properties=self._why(WRONG_CREDENTIALS)))
            self._close()
        elif isinstance(f.value, (StoreUnavailable, StoreOverloaded)):
            message = f"the gateway cannot check credentials now: {f.value.message}"
            self._refuse_connect(R.SERVER_UNAVAILABLE, message, claimed)
        else:
            log.failure("device lookup failed", f)
            self._refuse_connect(R.UNSPECIFIED_ERROR, "the gateway failed; retry later", claimed)

    def _begin_session(self, connect: mqtt.Connect, device: Device) -> None:
        """
        Session Present is 1 only when this device kept a session under this client id that is still there
        [MQTT-3.2.2-2, 3.2.2-3]: the gateway's part of a session is that everything acknowledged is stored,
        so a kept session is a row saying it was kept, and for how long. A client id the gateway assigns is
        new, so never has one. When the database cannot say, a device that asked to keep its session is told
        it has one, as a device told "no session" would drop the messages it holds unacknowledged.
        """
        v5 = connect.version == mqtt.V5
        client_id = connect.client_id or f"{device.name}-{uuid.uuid4().hex[:8]}"
        if v5:
            expiry = min(mqtt.prop(connect.properties, P.SESSION_EXPIRY_INTERVAL, 0), MAX_SESSION_EXPIRY)
        else:
            expiry = 0 if connect.clean_start else MAX_SESSION_EXPIRY
        clean = connect.clean_start or not connect.client_id
        d = self.factory.ingest.session_begins(device, client_id, clean, expiry)
        if clean and expiry == 0:
            # Nothing can be present and nothing is kept: a session kept before is discarded meanwhile, and the
            # CONNACK need not wait for the database (the usual device: 3.1.1 clean session, 5.0 expiry 0).
            d.addErrback(
                lambda f: log.warn("MQTT session of {device} not discarded: {e}", device=device.name, e=f.value)
            )
            d = succeed(False)

        def answered(present: Any) -> None:
            if isinstance(present, Failure):
                log.warn(
                    "MQTT session of {device} not looked up: {error}",
                    device=device.name,
                    error=getattr(present.value, "message", present.value),
                )
                present = not clean
            if self._closing:
                return
            if expiry > 0:
                self._kept_session = (device, client_id)
            self._connected(connect, device, bool(present), client_id)
            self._looking_up(False)

        d.addBoth(answered)

    def _connected(self, connect: mqtt.Connect, device: Device, present: bool, client_id: str) -> None:
        settings = self.factory.settings
        self.device = device
        v5 = connect.version == mqtt.V5
        # Keepalive: the device's, enforced at 1.5 times. Without one (0), or above the idle timeout, a v5
        # device is told the idle timeout instead; a 3.1.1 device cannot be told, so 0 means the idle timeout.
        keepalive = float(connect.keepalive)
        properties: list[tuple[int, Any]] = []
        if v5:
            if not 0 < keepalive <= settings.idle_timeout:
                keepalive = float(int(settings.idle_timeout))
                properties.append((P.SERVER_KEEP_ALIVE, int(keepalive)))
            properties += [
                (P.RECEIVE_MAXIMUM, settings.window),
                (P.MAXIMUM_PACKET_SIZE, settings.max_frame),
                (P.TOPIC_ALIAS_MAXIMUM, TOPIC_ALIASES),
                (P.RETAIN_AVAILABLE, 0),
                (P.WILDCARD_SUBSCRIPTION_AVAILABLE, int(self.factory.commands is not None)),
                (P.SUBSCRIPTION_IDENTIFIER_AVAILABLE, 0),
                (P.SHARED_SUBSCRIPTION_AVAILABLE, 0),
            ]
            if not connect.client_id:
                properties.append((P.ASSIGNED_CLIENT_IDENTIFIER, client_id))
            if mqtt.prop(connect.properties, P.SESSION_EXPIRY_INTERVAL, 0) > MAX_SESSION_EXPIRY:
                properties.append((P.SESSION_EXPIRY_INTERVAL, MAX_SESSION_EXPIRY))
        elif keepalive == 0:
            keepalive = settings.idle_timeout
        self.keepalive = keepalive * 1.5
        self.factory.registry.register(device.name, self)
        self._send(mqtt.ConnAck(R.SUCCESS, present, tuple(properties)))
        if self._closing:  # the CONNACK could not be sent
            return
        self._set_timer(self.keepalive, self.idle_too_long)
        if present and self.factory.commands is not None:
            kept = self.factory.commands.ledger.kept_subscription(device.name, client_id)
            kept.addCallbacks(lambda on: take_commands(self) if on else None, lambda f: log.warn("{e}", e=f.value))
        log.info(
            "device {device} connected from {source} (MQTT {version}, client id {client_id!r})",
            device=device.name,
            source=self.source,
            version="5.0" if v5 else "3.1.1",
            client_id=connect.client_id,
        )

    # -- PUBLISH ---------------------------------------------------------

    def _publish(self, publish: mqtt.Publish) -> None:
        assert self.device is not None
        if publish.retain and self.conn.version == mqtt.V5:
            self._disconnect(R.RETAIN_NOT_SUPPORTED, "retained messages are not supported (CONNACK said so)")
            return
        command = result_of(self.device.name, publish.topic) if self.factory.commands is not None else None
        if command is not None:
            command_result(self, publish, command)
            return
        try:
            readings = self._readings(publish)
        except _Misdirected as e:
            self._refuse_message(publish, e.reason, e.message, close_v311=True)
            return
        except InvalidInput as e:
            self._refuse_message(publish, R.PAYLOAD_FORMAT_INVALID, e.message)
            return
        except DeviceTypeUnknown as e:
            self._unavailable(e.message)
            return
        if not self.factory.ingest.admits(self._pending_size + len(readings)):
            self._store_pending()
            if not self.factory.ingest.admits(len(readings)):
                self._hold(publish, self._publish)
                return
        ticket = self._ticket(publish) if publish.qos else None
        if self._pending is None:
            self._pending = []
        self._pending.append((publish, readings, ticket))
        self._pending_size += len(readings)

    def _store_pending(self) -> None:
        """Store the messages taken so far: one write for all (a device's window of small messages)."""
        pending = self._pending
        if pending is None:
            return
        self._pending, self._pending_size = None, 0
        assert self.device is not None
        ingest = self.factory.ingest
        if len(pending) == 1:
            publish, readings, ticket = pending[0]
            d = ingest.store_readings(self.device, readings, self.source, lambda: publish.payload)
            if ticket is None:
                d.addCallbacks(self._count, self._qos0_failed)
            else:
                d.addBoth(self._answer_ready, ticket)
            return
        messages = [(readings, partial(_payload, publish)) for publish, readings, _ in pending]
        ingest.store_messages(self.device, messages, self.source).addBoth(
            self._answers_ready, [ticket for _, _, ticket in pending]
        )

    def _readings(self, publish: mqtt.Publish) -> list[Reading]:
        """The message's readings; raises _Misdirected (topic) or InvalidInput (payload)."""
        assert self.device is not None
        parts = publish.topic.split("/")
        if len(parts) != 3 or parts[0] != "devices":
            raise _Misdirected(
                R.TOPIC_NAME_INVALID,
                f"topic {publish.topic!r}: publish to devices/<device>/readings or devices/<device>/<metric>",
            )
        if parts[1] != self.device.name:
            raise _Misdirected(
                R.NOT_AUTHORIZED, f"topic {publish.topic!r} names another device than {self.device.name}"
            )
        if parts[2] == "readings":
            return self.factory.ingest.read_body(self.device, publish.payload, one=True)
        metric = parts[2]
        if not is_name(metric):
            raise _Misdirected(R.TOPIC_NAME_INVALID, f"topic {publish.topic!r}: {metric!r} is not a metric name")
        return [bare_number(metric, publish.payload, self.factory.clock.seconds())]

    def send_command(self, publish: mqtt.Publish) -> bool:
        """Publish a command; False when it cannot go (larger than the device takes)."""
        try:
            self.transport.write(self.conn.send(publish))
        except mqtt.LocalProtocolError:
            return False
        return True

    def _count(self, result: WriteResult) -> None:
        self.readings += result.accepted

    def _qos0_failed(self, f: Failure) -> None:
        # At most once: the device asked for no acknowledgement, so it is not told; the log and metrics say it.
        error = f.value
        self.last_error = f"{type(error).__name__}: {getattr(error, 'message', error)}"
        if isinstance(error, (StoreUnavailable, StoreOverloaded, RateLimited, StoreRejected)):
            return  # counted and logged by the ingest path
        log.failure("storing a QoS 0 message failed", f)

    # -- answers, in order -----------------------------------------------

    def _ticket(self, publish: mqtt.Publish) -> Ticket[Any]:
        """A QoS 1 or 2 message's place in the order of answers."""
        self._seq += 1
        ticket: Ticket[Any] = self.session.arrived(self._seq, self.factory.clock.seconds())
        assert publish.packet_id is not None
        self._packets[self._seq] = (publish.packet_id, publish.qos)
        self.flow()
        return ticket

    def _queue_answer(self, publish: mqtt.Publish, d: Deferred) -> None:
        d.addBoth(self._answer_ready, self._ticket(publish))

    def _answer_ready(self, outcome: Any, ticket: Ticket[Any]) -> None:
        self._settle(ticket, outcome)
        self.flow()

    def _answers_ready(self, outcomes: Any, tickets: list[Ticket[Any] | None]) -> None:
        """The outcomes of messages stored together (or the one failure of all), answered in order."""
        if isinstance(outcomes, Failure):
            outcomes = [outcomes] * len(tickets)
        for ticket, outcome in zip(tickets, outcomes):
            if ticket is not None:
                self._settle(ticket, outcome)
            elif isinstance(outcome, WriteResult):
                self._count(outcome)
            else:
                self._qos0_failed(outcome if isinstance(outcome, Failure) else Failure(outcome))
        self.flow()

    def _settle(self, ticket: Ticket[Any], outcome: Any) -> None:
        for ready in self.session.settle(ticket, outcome):
            packet_id, qos = self._packets.pop(ready.seq)
            if not self._closing:
                self._send_answer(packet_id, qos, ready.outcome, ready.arrived)

    def _send_answer(self, packet_id: int, qos: int, outcome: Any, arrived: float) -> None:
        ack = mqtt.PubAck if qos == 1 else mqtt.PubRec
        v5 = self.conn.version == mqtt.V5
        if isinstance(outcome, WriteResult):
            counts: mqtt.Properties = ()
            if v5 and (outcome.duplicates or outcome.conflicts or outcome.quarantined):
                counts = tuple(
                    (P.USER_PROPERTY, (name, str(n)))
                    for name, n in (
                        ("accepted", outcome.accepted + len(outcome.quarantined)),
                        ("duplicates", outcome.duplicates),
                        ("conflicts", outcome.conflicts),
                        ("quarantined", len(outcome.quarantined)),
                    )
                )
            self._send(ack(packet_id, R.SUCCESS, counts))
            self.factory.metrics.acked(self.source, self.factory.clock.seconds() - arrived)
            self.readings += outcome.accepted
            return
        if isinstance(outcome, _Refusal):
            self.last_error = f"{outcome.reason.name}: {outcome.message}"
            # 3.1.1 has no negative acknowledgement: the input is kept in rejected_input, and acknowledged.
            self._send(ack(packet_id, outcome.reason, self._why(outcome.message)))
            return
        error = outcome.value if isinstance(outcome, Failure) else outcome
        self.last_error = f"{type(error).__name__}: {getattr(error, 'message', error)}"
        if isinstance(error, StoreRejected):
            self._send(ack(packet_id, R.UNSPECIFIED_ERROR, self._why(error.message)))
        elif isinstance(error, RateLimited):
            if v5:
                self._send(ack(packet_id, R.QUOTA_EXCEEDED, self._why(error.message)))
            else:
                self._close()  # no acknowledgement: the device sends it again after reconnecting
        elif isinstance(error, (StoreUnavailable, StoreOverloaded, DeviceTypeUnknown)):
            self._unavailable(error.message)
        else:
            log.failure("storing a message failed", outcome if isinstance(outcome, Failure) else None)
            self._disconnect(R.UNSPECIFIED_ERROR, "the gateway failed; retry later")

    def _why(self, message: str) -> mqtt.Properties:
        """A reason string for a v5 device (3.1.1 has nowhere to put one)."""
        if self.conn.version != mqtt.V5:
            return ()
        return ((P.REASON_STRING, message[:1000]),)

    # -- refusals and endings --------------------------------------------

    def _refuse_message(
        self, publish: mqtt.Publish, reason: mqtt.Reason, message: str, close_v311: bool = False
    ) -> None:
        name = self.device.name if self.device else None
        kept = self.factory.ingest.refuse(self.source, reason.name.lower(), message, device=name, raw=publish.payload)
        if close_v311 and self.conn.version != mqtt.V5:
            self._close()  # 3.1.1 cannot refuse a message: the connection is the only answer
        elif publish.qos:
            # The answer waits until the input is kept: to a 3.1.1 device it is a plain PUBACK, after which the
            # device forgets the message.
            self._queue_answer(publish, kept.addCallback(lambda _: _Refusal(reason, message)))

    def _refuse_connect(self, reason: mqtt.Reason, message: str, claimed: str | None) -> None:
        self.factory.ingest.refuse(self.source, reason.name.lower(), f"{message} (device {claimed})")
        self._send(mqtt.ConnAck(reason, properties=self._why(message)))
        self._close()

    def _protocol_error(self, e: mqtt.RemoteProtocolError) -> None:
        device = self.device.name if self.device else None
        self.factory.ingest.refuse(self.source, e.reason.name.lower(), e.message, device=device, closing=True)
        if self.conn.state == mqtt.CONNECTING and (
            self.conn.version == mqtt.V5 or e.reason == R.UNSUPPORTED_PROTOCOL_VERSION
        ):
            # A 3.1.1 CONNECT that breaks the protocol (a reserved flag, will QoS 3, a password without a user
            # name) is answered by closing [MQTT-3.1.4-1]: 3.1.1 has no return code for it, and "server
            # unavailable" would have the device retry the same CONNECT for ever.
            self._send(mqtt.ConnAck(e.reason, properties=self._why(e.message)))
        elif self.conn.state == mqtt.CONNECTED and self.conn.version == mqtt.V5:
            self._send(mqtt.Disconnect(e.reason, self._why(e.message)))
        self._close()

    def _unavailable(self, message: str) -> None:
        """Storage cannot take the message now: no acknowledgement, so the device sends it again."""
        self.last_error = f"unavailable: {message}"
        self._disconnect(R.SERVER_BUSY, f"{message}; send again later")

    def _disconnect(self, reason: mqtt.Reason, message: str) -> None:
        if self.conn.state == mqtt.CONNECTED and self.conn.version == mqtt.V5:
            self._send(mqtt.Disconnect(reason, self._why(message)))
        self._close()

    def end(self, code: CloseReason, reason: str) -> None:
        """Close the session (replaced, revoked, kicked, shutting down); a v5 device is told why."""
        if self._closing:
            return
        self._disconnect(_ENDINGS.get(code, R.ADMINISTRATIVE_ACTION), reason)

    def _send(self, event: mqtt.Event) -> None:
        try:
            data = self.conn.send(event)
        except mqtt.LocalProtocolError as e:
            if e.reason == R.PACKET_TOO_LARGE:
                # Even without its reason string and user properties the packet exceeds the device's Maximum
                # Packet Size (a CONNACK, say): the session cannot go on, so it ends now, not at the keepalive.
                device = self.device.name if self.device else None
                self.factory.ingest.refuse(self.source, "packet_too_large", e.message, device=device, closing=True)
                self._close()
                return
            log.debug("not sent to {source}: {error}", source=self.source, error=e.message)
            return
        self.transport.write(data)

    # -- timers ----------------------------------------------------------

    def handshake_too_slow(self) -> None:
        self._timer = None
        if self.conn.state == mqtt.CONNECTED or self._closing:
            return
        seconds = self.factory.settings.handshake_timeout
        self.factory.ingest.refuse(self.source, "timeout", f"no CONNECT within {seconds:g} seconds", closing=True)
        self._close()

    def idle_too_long(self) -> None:
        self._timer = None
        if self._not_reading(self.keepalive):
            return
        self.end(CloseReason.TIMEOUT, f"nothing received for {self.keepalive:g} seconds (1.5 times the keepalive)")


def _payload(publish: mqtt.Publish) -> bytes:
    return publish.payload


def bare_number(metric: str, payload: bytes, now: float) -> Reading:
    """A message to devices/<device>/<metric>: its payload is a bare number, timed ``now`` (when it arrived)."""
    if len(payload) > MAX_NUMBER:
        raise InvalidInput(f"{metric}: the payload must be a number, not {len(payload)} bytes")
    try:
        value = float(payload.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput(f"{metric}: the payload {payload[:20]!r} is not a number") from None
    return check_reading(metric, int(now * 1_000_000), value, metric)


class _Misdirected(Exception):
    def __init__(self, reason: mqtt.Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class MQTTFactory(DeviceListenerFactory):
    protocol = MQTTProtocol
    transport_name = "mqtt"
