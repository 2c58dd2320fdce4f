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

import zlib
from collections.abc import Callable

from protocols.sentinels import CONNECTION_CLOSED, NEED_DATA, Sentinel

# fmt: off
from protocols.tgp_wire import (
    _ACK, _ACK_V1, _CODE, _DATA_HEAD, _DECLARE_HEAD, _I64, _METRIC_HEAD, _NACK_HEAD, _Reader, _str16, _str8,
    _TRANSITIONS, _TYPE_OF, _U16, _U32, _U64, _U8, _VALUE_STRUCTS, _varint, _WELCOME, _zigzag, Ack, Auth, AUTH_SENT,
    Bye, Challenge, CHALLENGED, CLOSED, Command, CommandStatus, Data, Declare, DEFAULT_MAX_FRAME,
    DEFAULT_MAX_METRICS, DEVICE, ErrorCode, Event, GATEWAY, HEADER, Hello, HELLO_SENT, InvalidFrame,
    LocalProtocolError, MAGIC, MAX_SEQ, MessageType, Metric, Nack, NONCE_SIZE, OVERHEAD, Ping, Pong, PROOF_SIZE,
    ProtocolError, READY, Reject, Received, RemoteProtocolError, Result, Role, SINCE_VERSION_3, START, TRAILER,
    UNIT_US, ValueType, VERSIONS, Welcome,
)
# fmt: on

# fmt: off
__all__ = [  # what this module gives, its own and the wire's
    "Connection", "choose_version", "is_fatal", "AUTH_SENT", "Ack", "Auth", "Bye", "CHALLENGED", "CLOSED",
    "Challenge", "Command", "CommandStatus", "Received", "Result", "SINCE_VERSION_3", "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_METRICS", "DEVICE", "Data", "Declare", "ErrorCode", "Event", "GATEWAY", "HEADER", "HELLO_SENT",
    "Hello", "InvalidFrame", "LocalProtocolError", "MAGIC", "MAX_SEQ", "MessageType", "Metric", "NONCE_SIZE",
    "Nack", "OVERHEAD", "PROOF_SIZE", "Ping", "Pong", "ProtocolError", "READY", "Reject", "RemoteProtocolError",
    "Role", "START", "TRAILER", "UNIT_US", "VERSIONS", "ValueType", "Welcome",
]
# fmt: on


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
        if nxt is not None and kind in SINCE_VERSION_3 and (self.version or 0) < 3:
            nxt = None  # a message of a version this session did not choose
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
        if kind is MessageType.COMMAND:
            id_ = r.text(_U8)
            (expires_us,) = r.unpack(_I64)
            name = r.text(_U8)
            params = r.text(_U16)
            r.end()
            return Command(id_, expires_us, name, params)
        if kind is MessageType.RECEIVED:
            id_ = r.text(_U8)
            r.end()
            return Received(id_)
        if kind is MessageType.RESULT:
            (seq,) = r.unpack(_U32)
            self._check_seq(seq)
            id_ = r.text(_U8)
            (status,) = r.unpack(_U8)
            result = r.text(_U16)
            r.end()
            if status not in (0, 1):
                raise r.fail(f"status {status} is neither 0 (succeeded) nor 1 (failed)")
            return Result(seq, id_, CommandStatus(status), result)
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
        if isinstance(e, Command):
            return _str8(e.id) + _I64.pack(e.expires_us) + _str8(e.name) + _str16(e.params)
        if isinstance(e, Received):
            return _str8(e.id)
        if isinstance(e, Result):
            self._next_seq(e.seq)
            self.last_seq_sent = e.seq
            return _U32.pack(e.seq) + _str8(e.id) + _U8.pack(e.status) + _str16(e.result)
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
