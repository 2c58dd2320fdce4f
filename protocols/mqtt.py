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
import enum
import struct
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

from protocols.sentinels import CONNECTION_CLOSED, NEED_DATA, Sentinel

V311, V5 = 4, 5  # protocol levels
VERSIONS = (V311, V5)
MAX_REMAINING = 268_435_455  # the largest Remaining Length four bytes can say
DEFAULT_MAX_PACKET = 256 * 1024


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


CLIENT, SERVER = Role.CLIENT, Role.SERVER


class PacketType(enum.IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


class Reason(enum.IntEnum):
    """MQTT 5.0 reason codes (the ones below 0x80 say success)."""

    SUCCESS = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    REAUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


# The 3.1.1 CONNACK return code nearest each v5 refusal (3.1.1 section 3.2.2.3).
_V311_CONNACK: dict[int, int] = {
    Reason.UNSUPPORTED_PROTOCOL_VERSION: 1,
    Reason.CLIENT_IDENTIFIER_NOT_VALID: 2,
    Reason.SERVER_UNAVAILABLE: 3,
    Reason.SERVER_BUSY: 3,
    Reason.SERVER_SHUTTING_DOWN: 3,
    Reason.BAD_USER_NAME_OR_PASSWORD: 4,
    Reason.NOT_AUTHORIZED: 5,
    Reason.BANNED: 5,
}
_V311_CONNACK_BACK = {1: 0x84, 2: 0x85, 3: 0x88, 4: 0x86, 5: 0x87}


class Property(enum.IntEnum):
    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


WILL = "will"  # the will properties in CONNECT's payload: a "packet" of their own for the table below
_P, _T = Property, PacketType
_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
# property -> (value type, the packets it may appear in), MQTT 5.0 section 2.2.2.2
_PROPERTIES: dict[int, tuple[int, frozenset[Any]]] = {
    _P.PAYLOAD_FORMAT_INDICATOR: (_BYTE, frozenset({_T.PUBLISH, WILL})),
    _P.MESSAGE_EXPIRY_INTERVAL: (_U32, frozenset({_T.PUBLISH, WILL})),
    _P.CONTENT_TYPE: (_STR, frozenset({_T.PUBLISH, WILL})),
    _P.RESPONSE_TOPIC: (_STR, frozenset({_T.PUBLISH, WILL})),
    _P.CORRELATION_DATA: (_BIN, frozenset({_T.PUBLISH, WILL})),
    _P.SUBSCRIPTION_IDENTIFIER: (_VARINT, frozenset({_T.PUBLISH, _T.SUBSCRIBE})),
    _P.SESSION_EXPIRY_INTERVAL: (_U32, frozenset({_T.CONNECT, _T.CONNACK, _T.DISCONNECT})),
    _P.ASSIGNED_CLIENT_IDENTIFIER: (_STR, frozenset({_T.CONNACK})),
    _P.SERVER_KEEP_ALIVE: (_U16, frozenset({_T.CONNACK})),
    _P.AUTHENTICATION_METHOD: (_STR, frozenset({_T.CONNECT, _T.CONNACK, _T.AUTH})),
    _P.AUTHENTICATION_DATA: (_BIN, frozenset({_T.CONNECT, _T.CONNACK, _T.AUTH})),
    _P.REQUEST_PROBLEM_INFORMATION: (_BYTE, frozenset({_T.CONNECT})),
    _P.WILL_DELAY_INTERVAL: (_U32, frozenset({WILL})),
    _P.REQUEST_RESPONSE_INFORMATION: (_BYTE, frozenset({_T.CONNECT})),
    _P.RESPONSE_INFORMATION: (_STR, frozenset({_T.CONNACK})),
    _P.SERVER_REFERENCE: (_STR, frozenset({_T.CONNACK, _T.DISCONNECT})),
    _P.REASON_STRING: (
        _STR,
        frozenset(
            {_T.CONNACK, _T.PUBACK, _T.PUBREC, _T.PUBREL, _T.PUBCOMP, _T.SUBACK, _T.UNSUBACK, _T.DISCONNECT, _T.AUTH}
        ),
    ),
    _P.RECEIVE_MAXIMUM: (_U16, frozenset({_T.CONNECT, _T.CONNACK})),
    _P.TOPIC_ALIAS_MAXIMUM: (_U16, frozenset({_T.CONNECT, _T.CONNACK})),
    _P.TOPIC_ALIAS: (_U16, frozenset({_T.PUBLISH})),
    _P.MAXIMUM_QOS: (_BYTE, frozenset({_T.CONNACK})),
    _P.RETAIN_AVAILABLE: (_BYTE, frozenset({_T.CONNACK})),
    _P.USER_PROPERTY: (_PAIR, frozenset(set(_T) | {WILL})),
    _P.MAXIMUM_PACKET_SIZE: (_U32, frozenset({_T.CONNECT, _T.CONNACK})),
    _P.WILDCARD_SUBSCRIPTION_AVAILABLE: (_BYTE, frozenset({_T.CONNACK})),
    _P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: (_BYTE, frozenset({_T.CONNACK})),
    _P.SHARED_SUBSCRIPTION_AVAILABLE: (_BYTE, frozenset({_T.CONNACK})),
}
_REPEATABLE = frozenset({_P.USER_PROPERTY, _P.SUBSCRIPTION_IDENTIFIER})

Properties = tuple[tuple[int, Any], ...]  # (property, value) pairs in order; repeats only where allowed


def prop(properties: Properties, which: Property, default: Any = None) -> Any:
    """The value of a property, or ``default``."""
    for key, value in properties:
        if key == which:
            return value
    return default


def reason_text(code: int, properties: Properties = ()) -> str:
    """A reason code in words, with its number and the peer's reason string: 'not authorized (0x87): ...'."""
    try:
        text = Reason(code).name.lower().replace("_", " ")
    except ValueError:
        text = "reason"
    why = prop(properties, Property.REASON_STRING)
    return f"{text} ({code:#04x})" + (f": {why}" if why else "")


class ProtocolError(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: send ``reason`` (CONNACK before CONNECT was answered, else DISCONNECT) and close."""


class LocalProtocolError(ProtocolError):
    """Our caller tried to send something the protocol forbids here."""


# -- events --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    version: int = V5
    clean_start: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class ConnAck:
    reason: int = Reason.SUCCESS
    session_present: bool = False
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    packet_id: int | None = None
    retain: bool = False
    dup: bool = False
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class _Answer:
    """The shape of the four packets of QoS 1 and 2 exchanges."""

    packet_id: int
    reason: int = Reason.SUCCESS
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class PubAck(_Answer):
    """QoS 1: the PUBLISH is taken."""


@dataclass(frozen=True, slots=True)
class PubRec(_Answer):
    """QoS 2, step 2: the PUBLISH is taken; the sender releases it with PUBREL."""


@dataclass(frozen=True, slots=True)
class PubRel(_Answer):
    """QoS 2, step 3."""


@dataclass(frozen=True, slots=True)
class PubComp(_Answer):
    """QoS 2, step 4: the exchange is complete."""


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    subscriptions: tuple[tuple[str, int], ...]  # (topic filter, options: QoS in bits 0-1, v5 flags above)
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class SubAck:
    packet_id: int
    reasons: tuple[int, ...]
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    filters: tuple[str, ...]
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class UnsubAck:
    packet_id: int
    reasons: tuple[int, ...] = ()  # v5 only
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class PingReq:
    pass


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason: int = Reason.SUCCESS
    properties: Properties = ()


@dataclass(frozen=True, slots=True)
class Auth:
    reason: int = Reason.SUCCESS
    properties: Properties = ()


Event = (
    Connect | ConnAck | Publish | PubAck | PubRec | PubRel | PubComp | Subscribe | SubAck | Unsubscribe | UnsubAck
) | (PingReq | PingResp | Disconnect | Auth)

_TYPE_OF: dict[type, PacketType] = {
    Connect: _T.CONNECT,
    ConnAck: _T.CONNACK,
    Publish: _T.PUBLISH,
    PubAck: _T.PUBACK,
    PubRec: _T.PUBREC,
    PubRel: _T.PUBREL,
    PubComp: _T.PUBCOMP,
    Subscribe: _T.SUBSCRIBE,
    SubAck: _T.SUBACK,
    Unsubscribe: _T.UNSUBSCRIBE,
    UnsubAck: _T.UNSUBACK,
    PingReq: _T.PINGREQ,
    PingResp: _T.PINGRESP,
    Disconnect: _T.DISCONNECT,
    Auth: _T.AUTH,
}

# Who may send what once connected (CONNECT and CONNACK are handled apart).
_SENDS = {
    CLIENT: frozenset(
        {_T.PUBLISH, _T.PUBACK, _T.PUBREC, _T.PUBREL, _T.PUBCOMP, _T.SUBSCRIBE, _T.UNSUBSCRIBE, _T.PINGREQ}
        | {_T.DISCONNECT, _T.AUTH}
    ),
    SERVER: frozenset(
        {_T.PUBLISH, _T.PUBACK, _T.PUBREC, _T.PUBREL, _T.PUBCOMP, _T.SUBACK, _T.UNSUBACK, _T.PINGRESP}
        | {_T.DISCONNECT, _T.AUTH}
    ),
}
# The fixed header's flag bits every packet but PUBLISH must carry.
_FLAGS = {_T.PUBREL: 2, _T.SUBSCRIBE: 2, _T.UNSUBSCRIBE: 2}
# Packets whose Reason String and User Properties are left out when the peer must not get them (v5).
_TRIMMABLE = frozenset(
    {_T.CONNACK, _T.PUBACK, _T.PUBREC, _T.PUBREL, _T.PUBCOMP, _T.SUBACK, _T.UNSUBACK, _T.DISCONNECT, _T.AUTH}
)
_KINDS: tuple[Any, ...] = (None, *(PacketType(n) for n in range(1, 16)))  # by the fixed header's high nibble
_PLAIN_PUBACK = bytes([PacketType.PUBACK << 4, 2])

START, CONNECTING, CONNECTED, CLOSED = "START", "CONNECTING", "CONNECTED", "CLOSED"

# The state of an exchange, by packet identifier. PUBLISH QoS 1 sent, PUBACK owed: _QOS1. PUBLISH QoS 2 sent or
# received, PUBREC owed: _QOS2. PUBREC sent or received, PUBREL owed, then PUBCOMP owed: _RELEASED. PUBREL
# received, PUBCOMP owed by us: _PUBREL. SUBSCRIBE or UNSUBSCRIBE, their answer owed: _OTHER.
_QOS1, _QOS2, _RELEASED, _PUBREL, _OTHER = 1, 2, 3, 4, 5

_U16S = struct.Struct(">H")
_U32S = struct.Struct(">I")


# -- encoding helpers ----------------------------------------------------


def encode_varint(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING:
        raise ValueError(f"{n} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _check_text(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")  # a lone surrogate raises here
    if len(raw) > 0xFFFF:
        raise ValueError(f"{what} is longer than 65535 bytes")
    if "\x00" in text:
        raise ValueError(f"{what} contains U+0000")
    return raw


def _str(text: str, what: str = "string") -> bytes:
    raw = _check_text(text, what)
    return _U16S.pack(len(raw)) + raw


def _bin(data: bytes, what: str = "binary data") -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"{what} is longer than 65535 bytes")
    return _U16S.pack(len(data)) + bytes(data)


def _encode_properties(properties: Properties, packet: Any) -> bytes:
    out = bytearray()
    seen: set[int] = set()
    for key, value in properties:
        spec = _PROPERTIES.get(key)
        if spec is None or packet not in spec[1]:
            raise LocalProtocolError(Reason.PROTOCOL_ERROR, f"property {key:#04x} does not belong in {packet}")
        if key in seen and key not in _REPEATABLE:
            raise LocalProtocolError(Reason.PROTOCOL_ERROR, f"property {key:#04x} given twice")
        seen.add(key)
        out.append(key)
        kind = spec[0]
        if kind == _BYTE:
            out += struct.pack(">B", value)
        elif kind == _U16:
            out += _U16S.pack(value)
        elif kind == _U32:
            out += _U32S.pack(value)
        elif kind == _VARINT:
            out += encode_varint(value)
        elif kind == _STR:
            out += _str(value, "a property")
        elif kind == _BIN:
            out += _bin(value)
        else:
            name, text = value
            out += _str(name, "a user property") + _str(text, "a user property")
    return encode_varint(len(out)) + bytes(out)


class _Reader:
    """Reads the fields of one packet; running past its end is a malformed packet."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def fail(self, message: str, reason: Reason = Reason.MALFORMED_PACKET) -> RemoteProtocolError:
        return RemoteProtocolError(reason, f"{self.what}: {message}")

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise self.fail("the packet ends early")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail("the packet ends early")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def u16(self) -> int:
        value: int = _U16S.unpack(self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = _U32S.unpack(self.take(4))[0]
        return value

    def varint(self) -> int:
        result = 0
        for shift in (0, 7, 14, 21):
            byte = self.byte()
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
        raise self.fail("a variable byte integer longer than four bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self, what: str = "a string") -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None
        if "\x00" in text:
            raise self.fail(f"{what} contains U+0000")
        return text

    def properties(self, packet: Any) -> Properties:
        length = self.varint()
        end = self.pos + length
        if end > len(self.data):
            raise self.fail("the properties run past the packet")
        out: list[tuple[int, Any]] = []
        seen: set[int] = set()
        while self.pos < end:
            key = self.varint()
            spec = _PROPERTIES.get(key)
            if spec is None:
                raise self.fail(f"unknown property {key:#04x}")
            if packet not in spec[1]:
                raise self.fail(f"property {Property(key).name} does not belong here", Reason.PROTOCOL_ERROR)
            if key in seen and key not in _REPEATABLE:
                raise self.fail(f"property {Property(key).name} given twice", Reason.PROTOCOL_ERROR)
            seen.add(key)
            kind = spec[0]
            value: Any
            if kind == _BYTE:
                value = self.byte()
            elif kind == _U16:
                value = self.u16()
            elif kind == _U32:
                value = self.u32()
            elif kind == _VARINT:
                value = self.varint()
            elif kind == _STR:
                value = self.text("a property")
            elif kind == _BIN:
                value = self.binary()
            else:
                value = (self.text("a user property"), self.text("a user property"))
            out.append((key, value))
        if self.pos != end:
            raise self.fail("a property runs past the property length")
        return tuple(out)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{len(self.data) - self.pos} bytes after the last field")


def _topic_name(topic: str, fail: Any) -> None:
    if "+" in topic or "#" in topic:
        raise fail("a topic name may not hold the wildcards + or #", Reason.TOPIC_NAME_INVALID)


# -- the connection ------------------------------------------------------


def _answer_body(kind: PacketType, e: Any, v5: bool) -> bytes:
    """
    The variable header and payload of CONNACK, an acknowledgement, SUBACK/UNSUBACK, DISCONNECT or AUTH: a
    pure function, so the size a packet would have can be known before sending it changes any state.
    """
    if kind is _T.CONNACK:
        success = e.reason < 0x80
        flags = 0x01 if e.session_present and success else 0
        if v5:
            return bytes([flags, e.reason]) + _encode_properties(e.properties, _T.CONNACK)
        return bytes([flags, 0 if success else _V311_CONNACK.get(e.reason, 3)])
    if kind in (_T.SUBACK, _T.UNSUBACK):
        reasons = e.reasons
        if kind is _T.SUBACK and not v5:
            reasons = tuple(r if r < 0x80 else 0x80 for r in reasons)
        if kind is _T.UNSUBACK and not v5:
            reasons = ()
        return _U16S.pack(e.packet_id) + (_encode_properties(e.properties, kind) if v5 else b"") + bytes(reasons)
    head = _U16S.pack(e.packet_id) if kind in (_T.PUBACK, _T.PUBREC, _T.PUBREL, _T.PUBCOMP) else b""
    if not v5 or (e.reason == 0 and not e.properties):
        return head
    return head + bytes([e.reason]) + (_encode_properties(e.properties, kind) if e.properties else b"")


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
