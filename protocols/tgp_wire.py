"""
TGP on the wire (SPEC.rst): constants, message types, error and value codes, the
events, the session's state machine, and the encoding helpers and frame reader.
tgp.py is the connection on top of it and re-exports all of this.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any


MAGIC = b"TG"
VERSIONS = (1, 2, 3)  # protocol versions this codec speaks; 2 adds conflicts to ACK, 3 commands
HEADER = struct.Struct(">2sBBI")  # magic, type, flags, payload length
TRAILER = struct.Struct(">I")  # CRC-32 of header and payload
OVERHEAD = HEADER.size + TRAILER.size
NONCE_SIZE = 32
PROOF_SIZE = 32

DEFAULT_MAX_FRAME = 64 * 1024
DEFAULT_MAX_METRICS = 1024
MAX_SEQ = 0xFFFFFFFF


class Role(enum.Enum):
    GATEWAY = "gateway"
    DEVICE = "device"


GATEWAY, DEVICE = Role.GATEWAY, Role.DEVICE


class MessageType(enum.IntEnum):
    HELLO = 0x01
    CHALLENGE = 0x02
    AUTH = 0x03
    WELCOME = 0x04
    REJECT = 0x05
    DECLARE = 0x10
    DATA = 0x11
    ACK = 0x12
    NACK = 0x13
    RESULT = 0x14
    PING = 0x20
    PONG = 0x21
    BYE = 0x30
    COMMAND = 0x40
    RECEIVED = 0x41


class ErrorCode(enum.IntEnum):
    # Fatal: the sender closes the connection after the NACK, REJECT or BYE.
    BAD_FRAME = 1
    BAD_CRC = 2
    FRAME_TOO_LARGE = 3
    UNKNOWN_TYPE = 4
    UNEXPECTED_MESSAGE = 5
    BAD_SEQUENCE = 6
    TIMEOUT = 7
    UNSUPPORTED_VERSION = 10
    AUTH_FAILED = 11
    REPLACED = 12
    SHUTTING_DOWN = 13
    RETRY_LATER = 14
    NORMAL = 15
    INTERNAL_ERROR = 16
    # Not fatal: only the frame named is refused; the session goes on.
    UNKNOWN_METRIC = 20
    BAD_DECLARATION = 21
    INVALID_READING = 22
    REJECTED_BY_DATABASE = 23
    RATE_LIMITED = 24
    UNKNOWN_COMMAND = 25


class ValueType(enum.IntEnum):
    F32 = 1
    F64 = 2
    I32 = 3
    I64 = 4


_VALUE_STRUCTS = {
    ValueType.F32: struct.Struct(">f"),
    ValueType.F64: struct.Struct(">d"),
    ValueType.I32: struct.Struct(">i"),
    ValueType.I64: struct.Struct(">q"),
}

# Timestamps in a DATA frame count units of 1 µs, 1 ms or 1 s.
UNIT_US = {0: 1, 1: 1_000, 2: 1_000_000}


class ProtocolError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; answer with ``code`` and close."""


class LocalProtocolError(ProtocolError):
    """Our caller tried to send something the protocol forbids here."""


# -- events --------------------------------------------------------------


def _check_text(value: str, field_name: str, limit: int) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{field_name} must be str")
    if len(value.encode("utf-8")) > limit:
        raise ValueError(f"{field_name} is longer than {limit} bytes")


def _check_uint(value: int, field_name: str, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise ValueError(f"{field_name} must be an integer in 0..{(1 << bits) - 1}")


@dataclass(frozen=True, slots=True)
class Hello:
    device: str
    versions: tuple[int, ...] = VERSIONS
    firmware: str = ""

    def __post_init__(self) -> None:
        _check_text(self.device, "device", 255)
        _check_text(self.firmware, "firmware", 255)
        if not 1 <= len(self.versions) <= 255:
            raise ValueError("versions must list 1..255 versions")
        for v in self.versions:
            _check_uint(v, "version", 8)


@dataclass(frozen=True, slots=True)
class Challenge:
    version: int
    nonce: bytes

    def __post_init__(self) -> None:
        _check_uint(self.version, "version", 8)
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")


@dataclass(frozen=True, slots=True)
class Auth:
    proof: bytes

    def __post_init__(self) -> None:
        if len(self.proof) != PROOF_SIZE:
            raise ValueError(f"proof must be {PROOF_SIZE} bytes")


@dataclass(frozen=True, slots=True)
class Welcome:
    version: int
    server_time_us: int  # the gateway's clock, µs since 1970-01-01T00:00:00Z
    max_frame: int  # largest payload the gateway accepts
    window: int  # DATA/DECLARE frames a device may have unanswered
    heartbeat_s: int  # send PING after this many idle seconds
    idle_timeout_s: int  # the gateway closes a session silent this long

    def __post_init__(self) -> None:
        _check_uint(self.version, "version", 8)
        if not -(1 << 63) <= self.server_time_us < (1 << 63):
            raise ValueError("server_time_us must fit in a signed 64-bit integer")
        _check_uint(self.max_frame, "max_frame", 32)
        for name in ("window", "heartbeat_s", "idle_timeout_s"):
            _check_uint(getattr(self, name), name, 16)


@dataclass(frozen=True, slots=True)
class Reject:
    code: ErrorCode | int
    reason: str = ""

    def __post_init__(self) -> None:
        _check_uint(int(self.code), "code", 16)
        _check_text(self.reason, "reason", 0xFFFF)


@dataclass(frozen=True, slots=True)
class Metric:
    id: int
    type: ValueType
    name: str

    def __post_init__(self) -> None:
        _check_uint(self.id, "metric id", 16)
        ValueType(self.type)
        _check_text(self.name, "metric name", 255)


@dataclass(frozen=True, slots=True)
class Declare:
    seq: int
    metrics: tuple[Metric, ...]

    def __post_init__(self) -> None:
        _check_uint(self.seq, "seq", 32)
        if len(self.metrics) > 0xFFFF:
            raise ValueError("at most 65535 metrics per DECLARE")


@dataclass(frozen=True, slots=True)
class Data:
    """Readings as (metric name, µs since the epoch, value)."""

    seq: int
    readings: tuple[tuple[str, int, float], ...]

    def __post_init__(self) -> None:
        _check_uint(self.seq, "seq", 32)
        if len(self.readings) > 0xFFFF:
            raise ValueError("at most 65535 readings per DATA")


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    accepted: int = 0  # readings newly stored
    duplicates: int = 0  # readings stored before with the same value (a retransmission)
    conflicts: int = 0  # readings stored before with another value (version 2; version 1 adds them to duplicates)

    def __post_init__(self) -> None:
        _check_uint(self.seq, "seq", 32)
        _check_uint(self.accepted, "accepted", 16)
        _check_uint(self.duplicates, "duplicates", 16)
        _check_uint(self.conflicts, "conflicts", 16)


@dataclass(frozen=True, slots=True)
class Nack:
    seq: int  # the frame refused, or 0 when no numbered frame is meant
    code: ErrorCode | int
    text: str = ""
    retry_after_s: int = 0

    def __post_init__(self) -> None:
        _check_uint(self.seq, "seq", 32)
        _check_uint(int(self.code), "code", 16)
        _check_uint(self.retry_after_s, "retry_after_s", 16)
        _check_text(self.text, "text", 0xFFFF)

    @property
    def fatal(self) -> bool:
        return self.code < 20


@dataclass(frozen=True, slots=True)
class Ping:
    payload: int = 0

    def __post_init__(self) -> None:
        _check_uint(self.payload, "payload", 64)


@dataclass(frozen=True, slots=True)
class Pong:
    payload: int = 0

    def __post_init__(self) -> None:
        _check_uint(self.payload, "payload", 64)


@dataclass(frozen=True, slots=True)
class Bye:
    code: ErrorCode | int = ErrorCode.NORMAL
    reason: str = ""

    def __post_init__(self) -> None:
        _check_uint(int(self.code), "code", 16)
        _check_text(self.reason, "reason", 0xFFFF)


class CommandStatus(enum.IntEnum):
    SUCCEEDED = 0
    FAILED = 1


@dataclass(frozen=True, slots=True)
class Command:
    """Version 3: something for the device to do. ``params`` is a JSON object's text."""

    id: str
    expires_us: int  # the device must not run it after this time, µs since the epoch
    name: str
    params: str = "{}"

    def __post_init__(self) -> None:
        _check_text(self.id, "id", 255)
        if not -(1 << 63) <= self.expires_us < (1 << 63):
            raise ValueError("expires_us must fit in a signed 64-bit integer")
        _check_text(self.name, "name", 255)
        _check_text(self.params, "params", 0xFFFF)


@dataclass(frozen=True, slots=True)
class Received:
    """Version 3: the device has the command ``id`` (it runs it once, whatever is sent again)."""

    id: str

    def __post_init__(self) -> None:
        _check_text(self.id, "id", 255)


@dataclass(frozen=True, slots=True)
class Result:
    """Version 3: how a command went; numbered like DATA, answered by ACK once recorded. ``result`` is JSON text."""

    seq: int
    id: str
    status: CommandStatus
    result: str = "{}"

    def __post_init__(self) -> None:
        _check_uint(self.seq, "seq", 32)
        _check_text(self.id, "id", 255)
        CommandStatus(self.status)
        _check_text(self.result, "result", 0xFFFF)


@dataclass(frozen=True, slots=True)
class InvalidFrame:
    """A numbered frame that parsed but cannot be used: NACK it, go on."""

    seq: int
    code: ErrorCode
    message: str
    raw: bytes = field(repr=False, default=b"")


Event = (
    Hello
    | Challenge
    | Auth
    | Welcome
    | Reject
    | Declare
    | Data
    | Ack
    | Nack
    | Ping
    | Pong
    | Bye
    | Command
    | Received
    | Result
)

_TYPE_OF = {
    Hello: MessageType.HELLO,
    Challenge: MessageType.CHALLENGE,
    Auth: MessageType.AUTH,
    Welcome: MessageType.WELCOME,
    Reject: MessageType.REJECT,
    Declare: MessageType.DECLARE,
    Data: MessageType.DATA,
    Ack: MessageType.ACK,
    Nack: MessageType.NACK,
    Ping: MessageType.PING,
    Pong: MessageType.PONG,
    Bye: MessageType.BYE,
    Command: MessageType.COMMAND,
    Received: MessageType.RECEIVED,
    Result: MessageType.RESULT,
}
SINCE_VERSION_3 = frozenset({MessageType.COMMAND, MessageType.RECEIVED, MessageType.RESULT})

# -- the state machine ---------------------------------------------------
#
# (state, who sends, message type) -> next state. Anything not listed is
# refused: LocalProtocolError when we try to send it, RemoteProtocolError
# (UNEXPECTED_MESSAGE) when the peer does.

START, HELLO_SENT, CHALLENGED, AUTH_SENT, READY, CLOSED = (
    "START",
    "HELLO_SENT",
    "CHALLENGED",
    "AUTH_SENT",
    "READY",
    "CLOSED",
)

_T = MessageType
_TRANSITIONS: dict[tuple[str, Role, MessageType], str] = {
    (START, DEVICE, _T.HELLO): HELLO_SENT,
    (HELLO_SENT, GATEWAY, _T.CHALLENGE): CHALLENGED,
    (HELLO_SENT, GATEWAY, _T.REJECT): CLOSED,
    (CHALLENGED, DEVICE, _T.AUTH): AUTH_SENT,
    (AUTH_SENT, GATEWAY, _T.WELCOME): READY,
    (AUTH_SENT, GATEWAY, _T.REJECT): CLOSED,
    (READY, DEVICE, _T.DECLARE): READY,
    (READY, DEVICE, _T.DATA): READY,
    (READY, GATEWAY, _T.ACK): READY,
    (READY, GATEWAY, _T.NACK): READY,
    (READY, DEVICE, _T.PING): READY,
    (READY, GATEWAY, _T.PING): READY,
    (READY, DEVICE, _T.PONG): READY,
    (READY, GATEWAY, _T.PONG): READY,
    (READY, DEVICE, _T.BYE): CLOSED,
    (READY, GATEWAY, _T.BYE): CLOSED,
    (READY, GATEWAY, _T.COMMAND): READY,
    (READY, DEVICE, _T.RECEIVED): READY,
    (READY, DEVICE, _T.RESULT): READY,
}
# A fatal NACK may come at any point of the handshake too (a bad frame
# before READY); it ends the session like a REJECT.
for _state in (START, HELLO_SENT, CHALLENGED, AUTH_SENT):
    _TRANSITIONS[(_state, GATEWAY, _T.NACK)] = CLOSED
    _TRANSITIONS[(_state, GATEWAY, _T.BYE)] = CLOSED
    _TRANSITIONS[(_state, DEVICE, _T.BYE)] = CLOSED


# -- encoding helpers ----------------------------------------------------

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_WELCOME = struct.Struct(">BqIHHH")
_ACK_V1 = struct.Struct(">IHH")
_ACK = struct.Struct(">IHHH")  # version 2 on
_NACK_HEAD = struct.Struct(">IHH")
_DATA_HEAD = struct.Struct(">IBqH")
_DECLARE_HEAD = struct.Struct(">IH")
_METRIC_HEAD = struct.Struct(">HB")
_CODE = struct.Struct(">H")
_I64 = struct.Struct(">q")


def _str8(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _U8.pack(len(raw)) + raw


def _str16(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _U16.pack(len(raw)) + raw


def _zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class _Reader:
    """Reads fields from one payload; any overrun is a BAD_FRAME."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def fail(self, message: str) -> RemoteProtocolError:
        return RemoteProtocolError(ErrorCode.BAD_FRAME, f"{self.what}: {message}")

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise self.fail("payload ends early")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, s: struct.Struct) -> tuple[Any, ...]:
        if self.pos + s.size > len(self.data):
            raise self.fail("payload ends early")
        values = s.unpack_from(self.data, self.pos)
        self.pos += s.size
        return values

    def text(self, length_struct: struct.Struct) -> str:
        (n,) = self.unpack(length_struct)
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("text is not UTF-8") from None

    def varint(self) -> int:
        result = shift = 0
        data, pos = self.data, self.pos
        while True:
            if pos >= len(data):
                raise self.fail("payload ends inside a varint")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 63:
                raise self.fail("varint longer than 10 bytes")
        self.pos = pos
        return result

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{len(self.data) - self.pos} bytes after the last field")
