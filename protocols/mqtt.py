"""
MQTT 3.1.1 and 5.0: a sans-IO codec for both ends, client and server.

Bytes in, events out; events in, bytes out, as in ``tgp.py``: nothing here
does I/O or imports Twisted. ``receive_data(bytes)`` buffers;
``next_event()`` parses one packet and returns an event, ``NEED_DATA`` or
``CONNECTION_CLOSED`` (after ``receive_data(b"")``); ``send(event)``
returns the bytes to write. The protocol version is the one CONNECT names
(protocol level 4 is 3.1.1, 5 is 5.0); a server learns it from the first
packet, a client from the CONNECT it sends.

The codec enforces what both ends must: the order of the session (CONNECT
first, once; CONNACK; then the rest), which side may send which packet, the
packet size limit, well-formed UTF-8 without U+0000, topic names without
wildcards, v5 properties in the packets they belong to, packet identifiers
of QoS 1 and 2 exchanges (an answer must name a packet in flight), v5's
Receive Maximum and Topic Alias Maximum. ``RemoteProtocolError`` means the
peer broke the protocol; its ``reason`` is the v5 reason code to put in a
CONNACK or DISCONNECT before closing. ``LocalProtocolError`` means our own
caller tried to send what the protocol forbids.

Reasons are v5 reason codes throughout; sending to a 3.1.1 peer, the codec
writes what that version can say: the CONNACK return code nearest the
reason, and a PUBACK, PUBREC, PUBREL or PUBCOMP with the packet identifier
alone (3.1.1 has no negative acknowledgement).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from protocols.sentinels import CONNECTION_CLOSED, NEED_DATA, Sentinel

# fmt: off
from protocols.mqtt_wire import (
    _Answer, _answer_body, _bin, _encode_properties, _FLAGS, _KINDS, _OTHER, _P, _PLAIN_PUBACK, _PUBREL, _QOS1,
    _QOS2, _Reader, _RELEASED, _SENDS, _str, _T, _topic_name, _TRIMMABLE, _TYPE_OF, _U16S, _V311_CONNACK_BACK,
    Auth, CLIENT, CLOSED, ConnAck, Connect, CONNECTED, CONNECTING, DEFAULT_MAX_PACKET, Disconnect,
    encode_varint, Event, LocalProtocolError, MAX_REMAINING, PacketType, PingReq, PingResp, prop, Properties,
    Property, ProtocolError, PubAck, PubComp, Publish, PubRec, PubRel, Reason, reason_text, RemoteProtocolError,
    Role, SERVER, START, SubAck, Subscribe, UnsubAck, Unsubscribe, V311, V5, VERSIONS, WILL, Will,
)
# fmt: on

# fmt: off
__all__ = [  # what this module gives, its own and the wire's
    "Connection", "CONNECTION_CLOSED", "NEED_DATA", "Auth", "CLIENT", "CLOSED", "CONNECTED", "CONNECTING",
    "ConnAck", "Connect", "DEFAULT_MAX_PACKET", "Disconnect", "Event", "LocalProtocolError", "MAX_REMAINING",
    "PacketType", "PingReq", "PingResp", "Properties", "Property", "ProtocolError", "PubAck", "PubComp",
    "PubRec", "PubRel", "Publish", "Reason", "RemoteProtocolError", "Role", "SERVER", "START", "SubAck",
    "Subscribe", "UnsubAck", "Unsubscribe", "V311", "V5", "VERSIONS", "WILL", "Will", "encode_varint", "prop",
    "reason_text",
]
# fmt: on


# -- the connection ------------------------------------------------------


class Connection:
    """
    One end of an MQTT connection.

    ``max_packet`` is the largest packet we accept (a v5 server says so in
    CONNACK; the caller puts it there). ``receive_maximum`` and
    ``topic_alias_maximum`` are what we allow the peer (v5: the caller
    states them in CONNECT or CONNACK; 3.1.1 has no receive maximum, so
    the caller applies backpressure instead).
    """

    # One per connected device: slots keep an idle device's cost down (10,000 of them is the norm).
    __slots__ = (
        "our_role",
        "their_role",
        "max_packet",
        "receive_maximum",
        "topic_alias_maximum",
        "version",
        "state",
        "peer_max_packet",
        "peer_receive_maximum",
        "peer_topic_alias_maximum",
        "peer_wants_problems",
        "_buffer",
        "_eof",
        "_aliases",
        "_qos1_in",
        "_qos1_count",
        "_in",
        "_out",
    )

    def __init__(
        self,
        our_role: Role,
        *,
        max_packet: int = DEFAULT_MAX_PACKET,
        receive_maximum: int = 65535,
        topic_alias_maximum: int = 0,
    ) -> None:
        self.our_role = our_role
        self.their_role = SERVER if our_role is CLIENT else CLIENT
        self.max_packet = max_packet
        self.receive_maximum = receive_maximum
        self.topic_alias_maximum = topic_alias_maximum
        self.version: int | None = None
        self.state = START
        self.peer_max_packet: int | None = None  # v5: what the peer accepts
        self.peer_receive_maximum = 65535
        self.peer_topic_alias_maximum = 0
        # v5 Request Problem Information: with 0, no Reason String or User Property goes out on any packet but
        # PUBLISH, CONNACK and DISCONNECT [MQTT-3.1.2-29].
        self.peer_wants_problems = True
        self._buffer = bytearray()
        self._eof = False
        self._aliases: dict[int, str] = {}
        # Packet identifiers in use, by direction: the state of each exchange. A QoS 1 PUBLISH may come again
        # before its PUBACK (each is answered), so those are counted apart.
        self._qos1_in: dict[int, int] = {}  # id -> QoS 1 PUBLISHes received and not yet PUBACKed
        self._qos1_count = 0  # the sum of _qos1_in's values, kept as they change
        self._in: dict[int, int] = {}  # id -> _QOS2 / _RELEASED / _PUBREL / _OTHER, for what the peer sent
        self._out: dict[int, int] = {}  # id -> _QOS1 / _QOS2 / _RELEASED / _OTHER, for what we sent

    # -- receiving -------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed."""
        if data:
            if self._eof:
                raise RuntimeError("data after end of stream")
            self._buffer += data
        else:
            self._eof = True

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def inbound_in_flight(self) -> int:
        """QoS 1 and 2 PUBLISHes received and not yet answered (v5's Receive Maximum counts these)."""
        if not self._in:
            return self._qos1_count
        return self._qos1_count + sum(1 for state in self._in.values() if state in (_QOS2, _RELEASED))

    def events(self) -> Iterator[Event]:
        """The buffered events, one at a time, until more data is needed or the peer closed; raises as next_event."""
        while True:
            event = self.next_event()
            if isinstance(event, Sentinel):  # NEED_DATA or CONNECTION_CLOSED
                return
            yield event

    def next_event(self) -> Event | Sentinel:
        """The next event, NEED_DATA, or CONNECTION_CLOSED; raises RemoteProtocolError."""
        buf = self._buffer
        if not buf:
            return CONNECTION_CLOSED if self._eof else NEED_DATA
        if self.state == START and self.our_role is SERVER and buf[0] != 0x10:
            # not MQTT at all (a TLS handshake on a plain port, an HTTP request): say so at once
            raise RemoteProtocolError(
                Reason.PROTOCOL_ERROR, f"the first packet must be CONNECT, not byte {buf[0]:#04x}"
            )
        # fixed header: type and flags, then the Remaining Length in one to four bytes
        remaining = shift = 0
        pos = 1
        while True:
            if pos >= len(buf):
                return self._short()
            byte = buf[pos]
            pos += 1
            remaining |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            if pos == 5:
                raise RemoteProtocolError(Reason.MALFORMED_PACKET, "a Remaining Length longer than four bytes")
            shift += 7
        total = pos + remaining
        if total > self.max_packet:
            raise RemoteProtocolError(
                Reason.PACKET_TOO_LARGE, f"a packet of {total} bytes; the limit is {self.max_packet}"
            )
        if len(buf) < total:
            return self._short()
        first = buf[0]
        body = bytes(buf[pos:total])
        del buf[:total]
        kind_value, flags = first >> 4, first & 0x0F
        if kind_value == 0:
            raise RemoteProtocolError(Reason.MALFORMED_PACKET, "packet type 0 is reserved")
        kind = _KINDS[kind_value]
        if kind is _T.PUBLISH and self.state == CONNECTED:
            # The packet that comes by the thousand: straight to its decoder (both roles may send it when
            # connected, so none of _receive's checks can refuse it).
            return self._decode_publish(_Reader(body, "PUBLISH"), flags)
        return self._receive(kind, flags, body)

    def _short(self) -> Sentinel:
        if self._eof:
            raise RemoteProtocolError(Reason.MALFORMED_PACKET, "the connection closed in the middle of a packet")
        return NEED_DATA

    def _receive(self, kind: PacketType, flags: int, body: bytes) -> Event:
        r = _Reader(body, kind.name)
        if kind is not _T.PUBLISH and flags != _FLAGS.get(kind, 0):
            raise r.fail(f"fixed header flags {flags:#x}")
        if self.state == START:
            if self.our_role is SERVER and kind is _T.CONNECT:
                return self._decode_connect(r)
            raise r.fail(f"{kind.name} before CONNECT", Reason.PROTOCOL_ERROR)
        if self.state == CONNECTING:
            if self.our_role is CLIENT and kind is _T.CONNACK:
                return self._decode_connack(r)
            if self.our_role is CLIENT:
                raise r.fail(f"{kind.name} before CONNACK", Reason.PROTOCOL_ERROR)
            raise r.fail(f"{kind.name} before the CONNECT was answered", Reason.PROTOCOL_ERROR)
        if self.state == CLOSED:
            raise r.fail(f"{kind.name} after the session ended", Reason.PROTOCOL_ERROR)
        if kind not in _SENDS[self.their_role] or (kind is _T.AUTH and self.version != V5):
            raise r.fail(f"a {self.their_role.value} may not send {kind.name}", Reason.PROTOCOL_ERROR)
        if kind is _T.DISCONNECT and self.our_role is CLIENT and self.version != V5:
            raise r.fail("a 3.1.1 server may not send DISCONNECT", Reason.PROTOCOL_ERROR)
        if kind is _T.PUBLISH:
            return self._decode_publish(r, flags)
        if kind in (_T.PUBACK, _T.PUBREC, _T.PUBREL, _T.PUBCOMP):
            return self._decode_ack(r, kind)
        if kind in (_T.SUBSCRIBE, _T.UNSUBSCRIBE):
            return self._decode_subscribe(r, kind)
        if kind in (_T.SUBACK, _T.UNSUBACK):
            packet_id = r.u16()
            if self._out.get(packet_id) != _OTHER:
                raise r.fail(f"packet identifier {packet_id} is not in flight", Reason.PROTOCOL_ERROR)
            answer_properties = r.properties(kind) if self.version == V5 else ()
            reasons = tuple(r.take(r.left())) if kind is _T.SUBACK or self.version == V5 else ()
            r.end()
            if kind is _T.SUBACK and not reasons:
                raise r.fail("no return codes")
            del self._out[packet_id]
            if kind is _T.SUBACK:
                return SubAck(packet_id, reasons, answer_properties)
            return UnsubAck(packet_id, reasons, answer_properties)
        if kind in (_T.PINGREQ, _T.PINGRESP):
            r.end()
            return PingReq() if kind is _T.PINGREQ else PingResp()
        reason, properties = self._reason_and_properties(r, kind)
        if kind is _T.DISCONNECT:
            self.state = CLOSED
            return Disconnect(reason, properties)
        return Auth(reason, properties)

    def _reason_and_properties(self, r: _Reader, kind: PacketType) -> tuple[int, Properties]:
        """The rest of an acknowledgement, DISCONNECT or AUTH: in v5 a reason code and properties, both optional."""
        reason: int = Reason.SUCCESS
        properties: Properties = ()
        if self.version == V5 and r.left():
            reason = r.byte()
            if r.left():
                properties = r.properties(kind)
        r.end()
        return reason, properties

    def _decode_connect(self, r: _Reader) -> Connect:
        name = r.text("the protocol name")
        level = r.byte()
        if name != "MQTT" or level not in VERSIONS:
            # answer in the version the client can read: 3.1.1's CONNACK is understood by 3.1 clients too
            self.version = V311 if level != V5 else V5
            self.state = CONNECTING
            raise r.fail(
                f"protocol {name!r} level {level}; this end speaks MQTT 3.1.1 and 5.0",
                Reason.UNSUPPORTED_PROTOCOL_VERSION,
            )
        self.version = level
        self.state = CONNECTING  # whatever happens next, a CONNACK may answer
        flags = r.byte()
        if flags & 0x01:
            raise r.fail("the reserved connect flag is set")
        keepalive = r.u16()
        properties = r.properties(_T.CONNECT) if level == V5 else ()
        client_id = r.text("the client identifier")
        will = None
        will_qos = (flags >> 3) & 0x03
        if flags & 0x04:
            if will_qos == 3:
                raise r.fail("will QoS 3")
            will_properties = r.properties(WILL) if level == V5 else ()
            topic = r.text("the will topic")
            _topic_name(topic, r.fail)
            will = Will(topic, r.binary(), will_qos, bool(flags & 0x20), will_properties)
        elif flags & 0x38:
            raise r.fail("will QoS or retain without a will")
        username = r.text("the user name") if flags & 0x80 else None
        password = r.binary() if flags & 0x40 else None
        if level == V311 and password is not None and username is None:
            raise r.fail("a password without a user name")
        r.end()
        if level == V5:
            self._peer_limits(properties, r)
            wants = prop(properties, _P.REQUEST_PROBLEM_INFORMATION, 1)
            if wants not in (0, 1):
                raise r.fail(f"Request Problem Information {wants}", Reason.PROTOCOL_ERROR)
            self.peer_wants_problems = wants == 1
        return Connect(client_id, level, bool(flags & 0x02), keepalive, username, password, will, properties)

    def _peer_limits(self, properties: Properties, r: _Reader) -> None:
        receive_maximum = prop(properties, _P.RECEIVE_MAXIMUM, 65535)
        max_packet = prop(properties, _P.MAXIMUM_PACKET_SIZE)
        if receive_maximum == 0 or max_packet == 0:
            raise r.fail("Receive Maximum or Maximum Packet Size 0", Reason.PROTOCOL_ERROR)
        self.peer_receive_maximum = receive_maximum
        self.peer_max_packet = max_packet
        self.peer_topic_alias_maximum = prop(properties, _P.TOPIC_ALIAS_MAXIMUM, 0)

    def _decode_connack(self, r: _Reader) -> ConnAck:
        flags = r.byte()
        if flags & 0xFE:
            raise r.fail("reserved CONNACK flags set")
        code = r.byte()
        properties: Properties = ()
        if self.version == V5:
            properties = r.properties(_T.CONNACK)
            reason = code
            if reason < 0x80:
                self._peer_limits(properties, r)
        else:
            reason = _V311_CONNACK_BACK.get(code, Reason.UNSPECIFIED_ERROR) if code else Reason.SUCCESS
        r.end()
        self.state = CONNECTED if reason < 0x80 else CLOSED
        return ConnAck(reason, bool(flags & 0x01), properties)

    def _decode_publish(self, r: _Reader, flags: int) -> Publish:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise r.fail("QoS 3")
        if qos == 0 and flags & 0x08:
            raise r.fail("DUP set on a QoS 0 PUBLISH")
        topic = r.text("the topic name")
        _topic_name(topic, r.fail)
        packet_id = None
        if qos:
            packet_id = r.u16()
            if packet_id == 0:
                raise r.fail("packet identifier 0")
        properties: Properties = ()
        if self.version == V5:
            properties = r.properties(_T.PUBLISH)
            alias = prop(properties, _P.TOPIC_ALIAS)
            if alias is not None:
                if not 1 <= alias <= self.topic_alias_maximum:
                    raise r.fail(
                        f"topic alias {alias}; the maximum is {self.topic_alias_maximum}", Reason.TOPIC_ALIAS_INVALID
                    )
                if topic:
                    self._aliases[alias] = topic
                elif alias in self._aliases:
                    topic = self._aliases[alias]
                else:
                    raise r.fail(f"topic alias {alias} was never set", Reason.PROTOCOL_ERROR)
        if not topic:
            # v5: a zero-length topic name with no Topic Alias is a Protocol Error (section 3.3.2.3.4)
            if self.version == V5:
                raise r.fail("an empty topic name and no topic alias", Reason.PROTOCOL_ERROR)
            raise r.fail("an empty topic name", Reason.TOPIC_NAME_INVALID)
        payload = r.data[r.pos :]
        if qos == 1:
            assert packet_id is not None
            self._qos1_in[packet_id] = self._qos1_in.get(packet_id, 0) + 1
            self._qos1_count += 1
        elif qos == 2:
            assert packet_id is not None
            self._in[packet_id] = _QOS2  # sent again before its PUBREL: answered with PUBREC again
        if self.version == V5 and self.inbound_in_flight > self.receive_maximum:
            raise r.fail(
                f"more than {self.receive_maximum} QoS 1 and 2 PUBLISHes unanswered", Reason.RECEIVE_MAXIMUM_EXCEEDED
            )
        return Publish(topic, payload, qos, packet_id, bool(flags & 0x01), bool(flags & 0x08), properties)

    def _decode_ack(self, r: _Reader, kind: PacketType) -> PubAck | PubRec | PubRel | PubComp:
        packet_id = r.u16()
        reason, properties = self._reason_and_properties(r, kind)
        missing = r.fail(f"packet identifier {packet_id} is not in flight", Reason.PROTOCOL_ERROR)
        if kind is _T.PUBREL:
            # a PUBREL for an id not known is answered PUBCOMP all the same (its exchange may be of an earlier
            # connection), so it is not fatal
            self._in[packet_id] = _PUBREL
            return PubRel(packet_id, reason, properties)
        state = self._out.get(packet_id)
        if kind is _T.PUBACK:
            if state != _QOS1:
                raise missing
            del self._out[packet_id]
            return PubAck(packet_id, reason, properties)
        if kind is _T.PUBREC:
            # A second PUBREC answers a PUBLISH sent again (DUP) before the first came: PUBREL answers it too.
            if state != _QOS2 and not (state == _RELEASED and reason < 0x80):
                raise missing
            if reason < 0x80:
                self._out[packet_id] = _RELEASED
            else:
                del self._out[packet_id]
            return PubRec(packet_id, reason, properties)
        if state != _RELEASED:
            raise missing
        del self._out[packet_id]
        return PubComp(packet_id, reason, properties)

    def _decode_subscribe(self, r: _Reader, kind: PacketType) -> Subscribe | Unsubscribe:
        packet_id = r.u16()
        if packet_id == 0:
            raise r.fail("packet identifier 0")
        properties = r.properties(kind) if self.version == V5 else ()
        entries: list[Any] = []
        while r.left():
            topic_filter = r.text("a topic filter")
            if kind is _T.SUBSCRIBE:
                options = r.byte()
                if (
                    options & 0x03 == 3
                    or (options >> 4) & 0x03 == 3
                    or options & (0xC0 if self.version == V5 else 0xFC)
                ):
                    raise r.fail(f"subscription options {options:#04x}")
                entries.append((topic_filter, options))
            else:
                entries.append(topic_filter)
        if not entries:
            raise r.fail("no topic filters", Reason.PROTOCOL_ERROR)
        self._in[packet_id] = _OTHER
        if kind is _T.SUBSCRIBE:
            return Subscribe(packet_id, tuple(entries), properties)
        return Unsubscribe(packet_id, tuple(entries), properties)

    # -- sending ---------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """The bytes that carry ``event``; raises LocalProtocolError if not allowed now."""
        if (
            type(event) is PubAck
            and self.state == CONNECTED
            and not (self.version == V5 and (event.reason or event.properties))
            and (self.peer_max_packet is None or self.peer_max_packet >= 4)
        ):
            # The packet that goes out by the thousand, in its one shape: type, length 2, packet identifier.
            self._sending_ack(_T.PUBACK, event.packet_id)
            return _PLAIN_PUBACK + _U16S.pack(event.packet_id)
        kind = _TYPE_OF[type(event)]
        if self.version == V5 and kind in _TRIMMABLE and getattr(event, "properties", None):
            event = self._trimmed(kind, event)
        flags, body = self._encode(kind, event)
        size = 1 + len(encode_varint(len(body))) + len(body)
        if self.peer_max_packet is not None and size > self.peer_max_packet:
            raise LocalProtocolError(
                Reason.PACKET_TOO_LARGE, f"a packet of {size} bytes; the peer takes at most {self.peer_max_packet}"
            )
        return bytes([kind << 4 | flags]) + encode_varint(len(body)) + body

    def _trimmed(self, kind: PacketType, e: Any) -> Any:
        """
        ``e`` without the Reason String and User Properties the peer must not get: all of them when it asked
        for no problem information (outside CONNACK and DISCONNECT), else as many as make the packet exceed
        its Maximum Packet Size, the Reason String first [MQTT-3.1.2-29, 3.4.2-2, 3.4.2-3]. The packet
        itself always goes: a device must learn the fate of every packet identifier.
        """
        properties: Properties = e.properties
        if not self.peer_wants_problems and kind not in (_T.CONNACK, _T.DISCONNECT):
            properties = tuple(p for p in properties if p[0] not in (_P.REASON_STRING, _P.USER_PROPERTY))
        if self.peer_max_packet is not None:
            for drop in ((), (_P.REASON_STRING,), (_P.REASON_STRING, _P.USER_PROPERTY)):
                properties = tuple(p for p in properties if p[0] not in drop)
                if self._size_of(kind, e, properties) <= self.peer_max_packet:
                    break
        return e if properties == e.properties else dataclasses.replace(e, properties=properties)

    @staticmethod
    def _size_of(kind: PacketType, e: Any, properties: Properties) -> int:
        """The size ``e`` would be sent at with ``properties`` (v5), without changing any state."""
        body = len(_answer_body(kind, dataclasses.replace(e, properties=properties), True))
        return 1 + len(encode_varint(body)) + body

    def _encode(self, kind: PacketType, e: Event) -> tuple[int, bytes]:
        if isinstance(e, Connect):
            if self.our_role is not CLIENT or self.state != START:
                raise LocalProtocolError(Reason.PROTOCOL_ERROR, "CONNECT is a client's first packet")
            body = self._encode_connect(e)
            self.version, self.state = e.version, CONNECTING
            return 0, body
        if isinstance(e, ConnAck):
            if self.our_role is not SERVER or self.state != CONNECTING:
                raise LocalProtocolError(Reason.PROTOCOL_ERROR, "CONNACK answers CONNECT, once")
            return 0, self._encode_connack(e)
        if self.state != CONNECTED:
            raise LocalProtocolError(Reason.PROTOCOL_ERROR, f"{kind.name} outside a connected session")
        if kind not in _SENDS[self.our_role] or (kind is _T.AUTH and self.version != V5):
            raise LocalProtocolError(Reason.PROTOCOL_ERROR, f"a {self.our_role.value} may not send {kind.name}")
        v5 = self.version == V5
        if isinstance(e, Publish):
            return self._encode_publish(e)
        if isinstance(e, _Answer):
            self._sending_ack(kind, e.packet_id)
            return _FLAGS.get(kind, 0), _answer_body(kind, e, v5)
        if isinstance(e, (Subscribe, Unsubscribe)):
            self._new_id(e.packet_id)
            parts = [_U16S.pack(e.packet_id)]
            if v5:
                parts.append(_encode_properties(e.properties, kind))
            if isinstance(e, Subscribe):
                if not e.subscriptions:
                    raise ValueError("SUBSCRIBE needs a topic filter")
                parts += [_str(f, "a topic filter") + bytes([options]) for f, options in e.subscriptions]
            else:
                if not e.filters:
                    raise ValueError("UNSUBSCRIBE needs a topic filter")
                parts += [_str(f, "a topic filter") for f in e.filters]
            self._out[e.packet_id] = _OTHER
            return _FLAGS[kind], b"".join(parts)
        if isinstance(e, (SubAck, UnsubAck)):
            if self._in.get(e.packet_id) != _OTHER:
                raise LocalProtocolError(Reason.PROTOCOL_ERROR, f"no SUBSCRIBE or UNSUBSCRIBE {e.packet_id} to answer")
            del self._in[e.packet_id]
            return 0, _answer_body(kind, e, v5)
        if isinstance(e, (PingReq, PingResp)):
            return 0, b""
        assert isinstance(e, (Disconnect, Auth))
        if isinstance(e, Disconnect):
            if not v5 and self.our_role is SERVER:
                raise LocalProtocolError(Reason.PROTOCOL_ERROR, "a 3.1.1 server closes without DISCONNECT")
            self.state = CLOSED
        return 0, _answer_body(kind, e, v5)

    def _encode_connect(self, e: Connect) -> bytes:
        if e.version not in VERSIONS:
            raise LocalProtocolError(Reason.UNSUPPORTED_PROTOCOL_VERSION, f"protocol level {e.version}")
        v5 = e.version == V5
        flags = (0x02 if e.clean_start else 0) | (0x80 if e.username is not None else 0)
        flags |= 0x40 if e.password is not None else 0
        payload = [_str(e.client_id, "the client identifier")]
        if e.will is not None:
            if e.will.qos not in (0, 1, 2):
                raise ValueError("will QoS must be 0, 1 or 2")
            flags |= 0x04 | e.will.qos << 3 | (0x20 if e.will.retain else 0)
            if v5:
                payload.append(_encode_properties(e.will.properties, WILL))
            payload += [_str(e.will.topic, "the will topic"), _bin(e.will.payload, "the will payload")]
        if e.username is not None:
            payload.append(_str(e.username, "the user name"))
        if e.password is not None:
            payload.append(_bin(e.password, "the password"))
        if not 0 <= e.keepalive <= 0xFFFF:
            raise ValueError("keepalive must fit 16 bits")
        head = _str("MQTT") + bytes([e.version, flags]) + _U16S.pack(e.keepalive)
        if v5:
            head += _encode_properties(e.properties, _T.CONNECT)
        return head + b"".join(payload)

    def _encode_connack(self, e: ConnAck) -> bytes:
        body = _answer_body(_T.CONNACK, e, self.version == V5)
        self.state = CONNECTED if e.reason < 0x80 else CLOSED
        return body

    def _encode_publish(self, e: Publish) -> tuple[int, bytes]:
        if e.qos not in (0, 1, 2):
            raise ValueError("QoS must be 0, 1 or 2")
        try:
            raw = _str(e.topic, "the topic name")
        except ValueError as error:
            raise LocalProtocolError(Reason.TOPIC_NAME_INVALID, str(error)) from None
        if "+" in e.topic or "#" in e.topic or (not e.topic and prop(e.properties, _P.TOPIC_ALIAS) is None):
            raise LocalProtocolError(Reason.TOPIC_NAME_INVALID, f"{e.topic!r} is not a topic name")
        parts = [raw]
        if e.qos:
            if e.packet_id is None:
                raise LocalProtocolError(Reason.PROTOCOL_ERROR, "a QoS 1 or 2 PUBLISH needs a packet identifier")
            if not e.dup:  # a new exchange (DUP resends one in flight)
                self._new_id(e.packet_id)
                in_flight = sum(1 for state in self._out.values() if state != _OTHER)
                if self.version == V5 and in_flight >= self.peer_receive_maximum:
                    raise LocalProtocolError(
                        Reason.RECEIVE_MAXIMUM_EXCEEDED,
                        f"the peer takes {self.peer_receive_maximum} unanswered at most",
                    )
            parts.append(_U16S.pack(e.packet_id))
            self._out[e.packet_id] = _QOS1 if e.qos == 1 else _QOS2
        elif e.packet_id is not None or e.dup:
            raise LocalProtocolError(Reason.PROTOCOL_ERROR, "a QoS 0 PUBLISH has no packet identifier and no DUP")
        if self.version == V5:
            parts.append(_encode_properties(e.properties, _T.PUBLISH))
        parts.append(bytes(e.payload))
        flags = (0x08 if e.dup else 0) | e.qos << 1 | (0x01 if e.retain else 0)
        return flags, b"".join(parts)

    def _new_id(self, packet_id: int) -> None:
        if not 1 <= packet_id <= 0xFFFF:
            raise LocalProtocolError(Reason.PROTOCOL_ERROR, f"packet identifier {packet_id} is not in 1..65535")
        if packet_id in self._out:
            raise LocalProtocolError(Reason.PACKET_IDENTIFIER_IN_USE, f"packet identifier {packet_id} is in use")

    def _sending_ack(self, kind: PacketType, packet_id: int) -> None:
        def missing() -> LocalProtocolError:
            return LocalProtocolError(Reason.PACKET_IDENTIFIER_NOT_FOUND, f"no {packet_id} to answer with {kind.name}")

        if kind is _T.PUBACK:
            count = self._qos1_in.get(packet_id, 0)
            if not count:
                raise missing()
            if count == 1:
                del self._qos1_in[packet_id]
            else:
                self._qos1_in[packet_id] = count - 1
            self._qos1_count -= 1
        elif kind is _T.PUBREC:
            # A QoS 2 PUBLISH sent again (DUP) before its PUBREL is answered with PUBREC again, however many
            # times it comes and whether or not the first PUBREC went out already.
            if self._in.get(packet_id) not in (_QOS2, _RELEASED):
                raise missing()
            self._in[packet_id] = _RELEASED
        elif kind is _T.PUBREL:
            if self._out.get(packet_id) != _RELEASED:
                raise missing()
        else:  # PUBCOMP
            if self._in.get(packet_id) != _PUBREL:
                raise missing()
            del self._in[packet_id]
