"""
TGP, the txgateway device protocol: a sans-IO codec for both ends.

Bytes in, events out; events in, bytes out. Nothing here does I/O or
imports Twisted, so a device-side script can use it as is and the tests
need no reactor. ``protocols/SPEC.rst`` is the byte-level specification.

Theory of operation. A ``Connection`` plays one role, ``GATEWAY`` or
``DEVICE``. ``receive_data(bytes)`` only buffers; ``next_event()`` parses
one frame and returns an event, ``NEED_DATA`` or ``CONNECTION_CLOSED``
(after ``receive_data(b"")``). ``send(event)`` returns the bytes to write.
Every frame, sent or received, moves one state machine shared by both
ends (``_TRANSITIONS`` below): HELLO → CHALLENGE → AUTH → WELCOME opens a
session; REJECT or BYE ends it. In the READY state the device sends
DECLARE and DATA frames numbered 1, 2, 3, … (one sequence for both), and
the gateway answers each, in order, with one ACK or NACK.

Errors. ``RemoteProtocolError`` means the peer broke the protocol: it
carries the ``ErrorCode`` to put in the NACK, and the connection cannot
continue. ``LocalProtocolError`` means our own caller tried to send
something the protocol forbids. A DATA or DECLARE frame that is well-formed
but cannot be used (an undeclared metric id, a conflicting declaration) is
not fatal: ``next_event`` returns ``InvalidFrame`` and the session goes on.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

from protocols.sentinels import CONNECTION_CLOSED, NEED_DATA, Sentinel

MAGIC = b"TG"
VERSIONS = (1, 2)  # protocol versions this codec speaks; 2 adds conflicts to ACK
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
    PING = 0x20
    PONG = 0x21
    BYE = 0x30


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


@dataclass(frozen=True, slots=True)
class InvalidFrame:
    """A numbered frame that parsed but cannot be used: NACK it, go on."""

    seq: int
    code: ErrorCode
    message: str
    raw: bytes = field(repr=False, default=b"")


Event = Hello | Challenge | Auth | Welcome | Reject | Declare | Data | Ack | Nack | Ping | Pong | Bye

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
}

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


# -- the connection ------------------------------------------------------


class Connection:
    """One end of a TGP connection."""

    def __init__(
        self,
        our_role: Role,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_metrics: int = DEFAULT_MAX_METRICS,
        valid_name: Callable[[str], bool] | None = None,
    ) -> None:
        self.our_role = our_role
        # the receiver's rule for metric names; a DECLARE breaking it is refused
        self.valid_name = valid_name
        self.their_role = DEVICE if our_role is GATEWAY else GATEWAY
        self.max_frame = max_frame  # largest payload we accept
        self.max_metrics = max_metrics
        self.state = START
        self.version: int | None = None  # chosen by CHALLENGE
        self._offered: tuple[int, ...] = ()  # the versions HELLO listed
        self._buffer = bytearray()
        self._eof = False
        # sequence numbers of DECLARE/DATA frames
        self.last_seq_sent = 0
        self.last_seq_received = 0
        self.last_answered = 0  # highest seq answered by ACK/NACK (either direction)
        # metric tables: what we declared (name -> (id, type)), what the peer declared
        self._ours: dict[str, tuple[int, ValueType]] = {}
        self._ours_by_id: dict[int, str] = {}
        self._theirs: dict[int, tuple[str, ValueType]] = {}

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

    def next_event(self) -> Event | InvalidFrame | Sentinel:
        """The next event, NEED_DATA, or CONNECTION_CLOSED; raises RemoteProtocolError."""
        buf = self._buffer
        if len(buf) < HEADER.size:
            return self._short(len(buf) > 0 and buf[0:1] != MAGIC[0:1])
        magic, mtype, flags, length = HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
        if length > self.max_frame:
            raise RemoteProtocolError(
                ErrorCode.FRAME_TOO_LARGE, f"frame payload of {length} bytes; the limit is {self.max_frame}"
            )
        total = HEADER.size + length + TRAILER.size
        if len(buf) < total:
            return self._short(False)
        frame = bytes(buf[:total])
        del buf[:total]
        (crc,) = TRAILER.unpack_from(frame, total - TRAILER.size)
        if zlib.crc32(frame[: total - TRAILER.size]) != crc:
            raise RemoteProtocolError(ErrorCode.BAD_CRC, "CRC-32 does not match the frame")
        if flags != 0:
            raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"flags must be 0, got {flags:#04x}")
        try:
            kind = MessageType(mtype)
        except ValueError:
            raise RemoteProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {mtype:#04x}") from None
        payload = frame[HEADER.size : total - TRAILER.size]
        self._advance(self.their_role, kind, remote=True)
        return self._decode(kind, payload)

    def _short(self, garbage: bool) -> Sentinel:
        if garbage:
            raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"bad magic, expected {MAGIC!r}")
        if self._eof:
            if self._buffer:
                raise RemoteProtocolError(ErrorCode.BAD_FRAME, "connection closed in the middle of a frame")
            return CONNECTION_CLOSED
        return NEED_DATA

    def _advance(self, sender: Role, kind: MessageType, remote: bool) -> None:
        nxt = _TRANSITIONS.get((self.state, sender, kind))
        if nxt is None:
            message = f"{sender.value} may not send {kind.name} in state {self.state}"
            if remote:
                raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, message)
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, message)
        self.state = nxt

    def _decode(self, kind: MessageType, payload: bytes) -> Event | InvalidFrame:
        r = _Reader(payload, kind.name)
        if kind is MessageType.DATA:
            return self._decode_data(r)
        if kind is MessageType.DECLARE:
            return self._decode_declare(r)
        if kind is MessageType.ACK:
            if self.version == 1:
                seq, accepted, duplicates = r.unpack(_ACK_V1)
                conflicts = 0
            else:
                seq, accepted, duplicates, conflicts = r.unpack(_ACK)
            r.end()
            self._answered(seq)
            return Ack(seq, accepted, duplicates, conflicts)
        if kind is MessageType.NACK:
            seq, code, retry = r.unpack(_NACK_HEAD)
            text = r.text(_U16)
            r.end()
            if seq:
                self._answered(seq)
            return Nack(seq, _code(code), text, retry)
        if kind is MessageType.HELLO:
            (n,) = r.unpack(_U8)
            if n == 0:
                raise r.fail("no versions")
            versions = tuple(r.take(n))
            device = r.text(_U8)
            firmware = r.text(_U8)
            r.end()
            self._offered = versions
            return Hello(device, versions, firmware)
        if kind is MessageType.CHALLENGE:
            (version,) = r.unpack(_U8)
            nonce = r.take(NONCE_SIZE)
            r.end()
            if version not in VERSIONS or version not in self._offered:
                raise RemoteProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"the gateway chose version {version}")
            self.version = version
            return Challenge(version, nonce)
        if kind is MessageType.AUTH:
            proof = r.take(PROOF_SIZE)
            r.end()
            return Auth(proof)
        if kind is MessageType.WELCOME:
            fields = r.unpack(_WELCOME)
            r.end()
            if fields[0] != self.version:
                raise r.fail(f"version {fields[0]}, but CHALLENGE chose {self.version}")
            return Welcome(*fields)
        if kind in (MessageType.PING, MessageType.PONG):
            (payload_value,) = r.unpack(_U64)
            r.end()
            return (Ping if kind is MessageType.PING else Pong)(payload_value)
        # REJECT and BYE share a layout
        (code,) = r.unpack(_CODE)
        reason = r.text(_U16)
        r.end()
        return (Reject if kind is MessageType.REJECT else Bye)(_code(code), reason)

    def _check_seq(self, seq: int) -> None:
        if seq != self.last_seq_received + 1:
            raise RemoteProtocolError(
                ErrorCode.BAD_SEQUENCE, f"frame number {seq}, expected {self.last_seq_received + 1}"
            )
        self.last_seq_received = seq

    def _answered(self, seq: int) -> None:
        if seq != self.last_answered + 1 or seq > self.last_seq_sent:
            raise RemoteProtocolError(
                ErrorCode.BAD_SEQUENCE,
                f"answer for frame {seq}, expected {self.last_answered + 1} (sent up to {self.last_seq_sent})",
            )
        self.last_answered = seq

    def _decode_declare(self, r: _Reader) -> Declare | InvalidFrame:
        seq, count = r.unpack(_DECLARE_HEAD)
        self._check_seq(seq)
        metrics = []
        for _ in range(count):
            metric_id, type_code = r.unpack(_METRIC_HEAD)
            name = r.text(_U8)
            metrics.append((metric_id, type_code, name))
        r.end()
        problems = []
        new: dict[int, tuple[str, ValueType]] = {}
        for metric_id, type_code, name in metrics:
            try:
                vtype = ValueType(type_code)
            except ValueError:
                problems.append(f"metric {metric_id}: unknown value type {type_code}")
                continue
            if self.valid_name is not None and not self.valid_name(name):
                problems.append(f"metric {metric_id}: name {name!r} is not allowed")
                continue
            known = self._theirs.get(metric_id) or new.get(metric_id)
            if known is not None and known != (name, vtype):
                problems.append(f"metric {metric_id} is declared already as {known[0]!r}")
                continue
            new[metric_id] = (name, vtype)
        if not problems and len(self._theirs.keys() | new.keys()) > self.max_metrics:
            problems.append(f"more than {self.max_metrics} metrics in one session")
        if problems:
            return InvalidFrame(seq, ErrorCode.BAD_DECLARATION, "; ".join(problems), r.data)
        self._theirs.update(new)
        return Declare(seq, tuple(Metric(i, t, n) for i, (n, t) in sorted(new.items())))

    def _decode_data(self, r: _Reader) -> Data | InvalidFrame:
        seq, unit, base, count = r.unpack(_DATA_HEAD)
        self._check_seq(seq)
        scale = UNIT_US.get(unit)
        if scale is None:
            raise r.fail(f"unknown time unit {unit}")
        theirs = self._theirs
        data = r.data
        readings = []
        unknown: set[int] = set()
        pos = r.pos
        end = len(data)
        for _ in range(count):
            if pos + 2 > end:
                raise r.fail("payload ends early")
            metric_id = (data[pos] << 8) | data[pos + 1]
            pos += 2
            # zigzag varint: the reading's time minus the frame's base time
            delta = shift = 0
            while True:
                if pos >= end:
                    raise r.fail("payload ends inside a varint")
                byte = data[pos]
                pos += 1
                delta |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
                if shift > 63:
                    raise r.fail("varint longer than 10 bytes")
            delta = (delta >> 1) ^ -(delta & 1)
            entry = theirs.get(metric_id)
            if entry is None:
                unknown.add(metric_id)
                # the value's size is unknown: nothing after this can be read
                break
            name, vtype = entry
            s = _VALUE_STRUCTS[vtype]
            if pos + s.size > end:
                raise r.fail("payload ends early")
            (value,) = s.unpack_from(data, pos)
            pos += s.size
            readings.append((name, (base + delta) * scale, float(value)))
        if unknown:
            return InvalidFrame(
                seq, ErrorCode.UNKNOWN_METRIC, f"metric id {min(unknown)} was not declared in this session", data
            )
        r.pos = pos
        r.end()
        return Data(seq, tuple(readings))

    # -- sending ---------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """The bytes that carry ``event``; raises LocalProtocolError if not allowed now."""
        kind = _TYPE_OF[type(event)]
        state = self.state
        self._advance(self.our_role, kind, remote=False)
        try:
            payload = self._encode(event)
        except Exception:
            self.state = state
            raise
        header = HEADER.pack(MAGIC, kind, 0, len(payload))
        return header + payload + TRAILER.pack(zlib.crc32(payload, zlib.crc32(header)))

    def _next_seq(self, seq: int) -> None:
        if seq != self.last_seq_sent + 1:
            raise LocalProtocolError(ErrorCode.BAD_SEQUENCE, f"frame number {seq}, expected {self.last_seq_sent + 1}")

    def _encode(self, e: Event) -> bytes:
        if isinstance(e, Data):
            return self._encode_data(e)
        if isinstance(e, Declare):
            self._next_seq(e.seq)
            parts = [_DECLARE_HEAD.pack(e.seq, len(e.metrics))]
            new = {}
            for m in e.metrics:
                known = self._ours.get(m.name)
                if (known is not None and known != (m.id, m.type)) or (
                    m.id in self._ours_by_id and self._ours_by_id[m.id] != m.name
                ):
                    raise LocalProtocolError(ErrorCode.BAD_DECLARATION, f"metric {m.name!r} / id {m.id} conflicts")
                new[m.name] = (m.id, ValueType(m.type))
                parts.append(_METRIC_HEAD.pack(m.id, m.type) + _str8(m.name))
            self._ours.update(new)
            self._ours_by_id.update({i: n for n, (i, _) in new.items()})
            self.last_seq_sent = e.seq
            return b"".join(parts)
        if isinstance(e, Ack):
            self._answer(e.seq)
            if self.version == 1:  # no field for conflicts: they were stored before, like duplicates
                return _ACK_V1.pack(e.seq, e.accepted, min(e.duplicates + e.conflicts, 0xFFFF))
            return _ACK.pack(e.seq, e.accepted, e.duplicates, e.conflicts)
        if isinstance(e, Nack):
            if e.seq:
                self._answer(e.seq)
            return _NACK_HEAD.pack(e.seq, e.code, e.retry_after_s) + _str16(e.text)
        if isinstance(e, Hello):
            self._offered = e.versions
            return _U8.pack(len(e.versions)) + bytes(e.versions) + _str8(e.device) + _str8(e.firmware)
        if isinstance(e, Challenge):
            if e.version not in VERSIONS or e.version not in self._offered:
                raise LocalProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"version {e.version}: not both ends speak it")
            self.version = e.version
            return _U8.pack(e.version) + e.nonce
        if isinstance(e, Auth):
            return e.proof
        if isinstance(e, Welcome):
            if e.version != self.version:
                raise LocalProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"CHALLENGE chose version {self.version}")
            return _WELCOME.pack(e.version, e.server_time_us, e.max_frame, e.window, e.heartbeat_s, e.idle_timeout_s)
        if isinstance(e, (Ping, Pong)):
            return _U64.pack(e.payload)
        assert isinstance(e, (Reject, Bye))
        return _CODE.pack(e.code) + _str16(e.reason)

    def _answer(self, seq: int) -> None:
        if seq != self.last_answered + 1 or seq > self.last_seq_received:
            raise LocalProtocolError(
                ErrorCode.BAD_SEQUENCE,
                f"answer for frame {seq}, expected {self.last_answered + 1} (received up to {self.last_seq_received})",
            )
        self.last_answered = seq

    def _encode_data(self, e: Data) -> bytes:
        self._next_seq(e.seq)
        readings = e.readings
        ours = self._ours
        if readings:
            stamps = [ts for _, ts, _ in readings]
            base_us = min(stamps)
            unit = 2 if all(ts % 1_000_000 == 0 for ts in stamps) else 1 if all(ts % 1000 == 0 for ts in stamps) else 0
        else:
            base_us, unit = 0, 0
        scale = UNIT_US[unit]
        base = base_us // scale
        if not -(1 << 63) <= base < 1 << 63:
            raise ValueError("timestamps must fit a signed 64-bit count of microseconds")
        parts = [_DATA_HEAD.pack(e.seq, unit, base, len(readings))]
        append = parts.append
        for name, ts, value in readings:
            entry = ours.get(name)
            if entry is None:
                raise LocalProtocolError(ErrorCode.UNKNOWN_METRIC, f"metric {name!r} was not declared")
            metric_id, vtype = entry
            if vtype in (ValueType.I32, ValueType.I64):
                if not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
                    raise ValueError(f"metric {name!r} is declared integer; {value!r} is not")
                value = int(value)
            delta = ts // scale - base
            if delta >= 1 << 63:
                raise ValueError("the readings of one DATA frame must lie within 2**63 time units of each other")
            append(_U16.pack(metric_id) + _varint(_zigzag(delta)) + _VALUE_STRUCTS[vtype].pack(value))
        payload = b"".join(parts)
        self.last_seq_sent = e.seq
        return payload


def _code(value: int) -> ErrorCode | int:
    """Known codes as ErrorCode; a newer peer's unknown code stays a number."""
    try:
        return ErrorCode(value)
    except ValueError:
        return value


def is_fatal(code: int) -> bool:
    """Codes below 20 end the session, whether or not this version knows them."""
    return code < 20


def choose_version(hello: Hello) -> int | None:
    """The highest version both ends speak, or None."""
    common = set(hello.versions) & set(VERSIONS)
    return max(common) if common else None
