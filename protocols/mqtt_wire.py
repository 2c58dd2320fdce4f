"""
MQTT 3.1.1 and 5.0 on the wire: versions, packet types, reason codes, properties,
the events, and the encoding and decoding of packet fields. mqtt.py is the
connection (the state machine) on top of it and re-exports all of this.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any


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
