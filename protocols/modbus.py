"""
Modbus/TCP as pure code: bytes in, events out; no Twisted, no I/O, no clock.

The gateway polls field equipment, so its end is the client's: it sends
read requests (coils, discrete inputs, holding and input registers) and
write requests (a coil, a register, several coils, several registers:
functions 5, 6, 15 and 16) and takes their responses. ``ClientConnection`` keeps the transactions in flight
and matches each response to its request by transaction id; a response that
comes after its request was given up (timed out) is a ``Late`` event, not an
error. ``ServerConnection`` is the other end, for the simulator and tests.

Framing (MODBUS Messaging on TCP/IP Implementation Guide V1.0b, 3.1.3): a
7-byte MBAP header — transaction id (u16), protocol id (u16, 0), length
(u16: the unit id and the PDU that follow), unit id (u8) — then the PDU: a
function code and its data (MODBUS Application Protocol Specification
V1.1b3, 6.1–6.4), at most 253 bytes. A response whose function code has the
high bit set is an exception response carrying one exception code (7).

What the peer sends that is not Modbus/TCP raises ``ProtocolError``: the
stream cannot be trusted any more and the connection is to be closed. What
the caller asks that Modbus cannot carry raises ``ValueError``.

Values: ``decode`` turns registers into a number of a given type, with the
byte order inside each register and the order of the registers (word order)
as the device uses them; ``encode`` does the reverse.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from protocols.sentinels import NEED_DATA, Sentinel

MBAP = struct.Struct(">HHHB")  # transaction, protocol, length, unit
MAX_PDU = 253
MAX_ADU = MBAP.size + MAX_PDU


class Kind(enum.IntEnum):
    """What is read, by its function code."""

    COIL = 0x01
    DISCRETE = 0x02
    HOLDING = 0x03
    INPUT = 0x04

    @property
    def bits(self) -> bool:
        return self in (Kind.COIL, Kind.DISCRETE)


# The kinds by the names a configuration or a command line gives them.
KINDS = {"holding": Kind.HOLDING, "input": Kind.INPUT, "coil": Kind.COIL, "discrete": Kind.DISCRETE}


# Most items one request may read (6.1–6.4): bits and registers both fill a 253-byte PDU.
MAX_COUNT = {Kind.COIL: 2000, Kind.DISCRETE: 2000, Kind.HOLDING: 125, Kind.INPUT: 125}


class ExceptionCode(enum.IntEnum):
    ILLEGAL_FUNCTION = 0x01
    ILLEGAL_DATA_ADDRESS = 0x02
    ILLEGAL_DATA_VALUE = 0x03
    SERVER_DEVICE_FAILURE = 0x04
    ACKNOWLEDGE = 0x05
    SERVER_DEVICE_BUSY = 0x06
    MEMORY_PARITY_ERROR = 0x08
    GATEWAY_PATH_UNAVAILABLE = 0x0A
    GATEWAY_TARGET_FAILED = 0x0B


def exception_name(code: int) -> str:
    try:
        return ExceptionCode(code).name.lower()
    except ValueError:
        return f"exception_{code:#04x}"


class ProtocolError(Exception):
    """The peer sent bytes that are not Modbus/TCP; close the connection."""


# Functions that write (6.5, 6.6, 6.11, 6.12), and most items one request may write.
WRITE_COIL, WRITE_REGISTER, WRITE_COILS, WRITE_REGISTERS = 0x05, 0x06, 0x0F, 0x10
MAX_WRITE = {WRITE_COILS: 1968, WRITE_REGISTERS: 123}


# -- events ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadRequest:
    transaction: int
    unit: int
    kind: Kind
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class ReadResponse:
    transaction: int
    unit: int
    kind: Kind
    values: tuple[int, ...]  # registers (0..65535) or bits (0 or 1), from the request's address on


@dataclass(frozen=True, slots=True)
class WriteRequest:
    transaction: int
    unit: int
    function: int  # WRITE_COIL, WRITE_REGISTER, WRITE_COILS or WRITE_REGISTERS
    address: int
    values: tuple[int, ...]  # registers (0..65535) or bits (0 or 1); one for the single-item functions


@dataclass(frozen=True, slots=True)
class WriteResponse:
    """The device's echo of a write: it took it (what it holds now is for a read to say)."""

    transaction: int
    unit: int
    function: int
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class ExceptionResponse:
    transaction: int
    unit: int
    function: int
    code: int  # an ExceptionCode, or a code the device made up

    @property
    def name(self) -> str:
        return exception_name(self.code)


@dataclass(frozen=True, slots=True)
class Late:
    """A response to a transaction no longer waited for (it timed out, or was never sent)."""

    transaction: int
    unit: int


# -- PDUs ------------------------------------------------------------------


def check_read(kind: Kind, address: int, count: int, unit: int = 0) -> None:
    """ValueError unless Modbus can carry this read."""
    if not 0 <= unit <= 255:
        raise ValueError(f"unit {unit} is outside 0..255")
    if not 1 <= count <= MAX_COUNT[kind]:
        raise ValueError(f"{kind.name.lower()}: a read is of 1 to {MAX_COUNT[kind]} items, not {count}")
    if not 0 <= address <= 0xFFFF or address + count > 0x10000:
        raise ValueError(f"{kind.name.lower()}: addresses {address}..{address + count - 1} are outside 0..65535")


def check_write(function: int, address: int, values: Sequence[int], unit: int = 0) -> None:
    """ValueError unless Modbus can carry this write."""
    if not 0 <= unit <= 255:
        raise ValueError(f"unit {unit} is outside 0..255")
    single = function in (WRITE_COIL, WRITE_REGISTER)
    if function not in (WRITE_COIL, WRITE_REGISTER, WRITE_COILS, WRITE_REGISTERS):
        raise ValueError(f"function {function:#04x} does not write")
    most = 1 if single else MAX_WRITE[function]
    if not 1 <= len(values) <= most:
        raise ValueError(f"function {function}: a write is of 1 to {most} items, not {len(values)}")
    if not 0 <= address <= 0xFFFF or address + len(values) > 0x10000:
        raise ValueError(f"addresses {address}..{address + len(values) - 1} are outside 0..65535")
    bits = function in (WRITE_COIL, WRITE_COILS)
    for v in values:
        if not (v in (0, 1) if bits else 0 <= v <= 0xFFFF):
            raise ValueError(f"{v!r} is not a {'bit (0 or 1)' if bits else 'register value (0..65535)'}")


def _pack_bits(values: Sequence[int]) -> bytes:
    data = bytearray((len(values) + 7) // 8)
    for i, bit in enumerate(values):
        if bit:
            data[i // 8] |= 1 << (i % 8)
    return bytes(data)


def encode_write(request: WriteRequest) -> bytes:
    check_write(request.function, request.address, request.values, request.unit)
    f, address, values = request.function, request.address, request.values
    if f == WRITE_COIL:
        pdu = struct.pack(">BHH", f, address, 0xFF00 if values[0] else 0x0000)
    elif f == WRITE_REGISTER:
        pdu = struct.pack(">BHH", f, address, values[0])
    else:
        data = _pack_bits(values) if f == WRITE_COILS else struct.pack(f">{len(values)}H", *values)
        pdu = struct.pack(">BHHB", f, address, len(values), len(data)) + data
    return _adu(request.transaction, request.unit, pdu)


def _adu(transaction: int, unit: int, pdu: bytes) -> bytes:
    return MBAP.pack(transaction, 0, len(pdu) + 1, unit) + pdu


def encode_request(request: ReadRequest) -> bytes:
    check_read(request.kind, request.address, request.count, request.unit)
    pdu = struct.pack(">BHH", request.kind, request.address, request.count)
    return _adu(request.transaction, request.unit, pdu)


def encode_response(response: ReadResponse | ExceptionResponse) -> bytes:
    if isinstance(response, ExceptionResponse):
        return _adu(response.transaction, response.unit, bytes([response.function | 0x80, response.code]))
    values = response.values
    data = _pack_bits(values) if response.kind.bits else struct.pack(f">{len(values)}H", *values)
    if len(data) > MAX_PDU - 2:
        raise ValueError(f"{len(values)} values do not fit one response")
    return _adu(response.transaction, response.unit, bytes([response.kind, len(data)]) + bytes(data))


class _Framer:
    """Cuts the stream into (transaction, unit, PDU)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _frame(self) -> tuple[int, int, bytes] | None:
        buf = self._buffer
        if len(buf) < MBAP.size:
            return None
        transaction, protocol, length, unit = MBAP.unpack_from(buf)
        if protocol != 0:
            raise ProtocolError(f"protocol id {protocol} (Modbus is 0): not a Modbus/TCP peer")
        if not 2 <= length <= MAX_PDU + 1:
            raise ProtocolError(f"an MBAP length of {length} (2..{MAX_PDU + 1})")
        total = MBAP.size - 1 + length
        if len(buf) < total:
            return None
        pdu = bytes(buf[MBAP.size : total])
        del buf[:total]
        return transaction, unit, pdu


class ClientConnection(_Framer):
    """The polling end: ``request`` makes the bytes of a read, ``next_event`` gives what came back."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting: dict[int, ReadRequest | WriteRequest] = {}
        self._next = 0

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def request(self, unit: int, kind: Kind, address: int, count: int) -> tuple[ReadRequest, bytes]:
        """A new read with a free transaction id, and its bytes; ValueError if Modbus cannot carry it."""
        check_read(kind, address, count, unit)
        request = ReadRequest(self._transaction(), unit, kind, address, count)
        self._waiting[request.transaction] = request
        return request, encode_request(request)

    def write(self, unit: int, function: int, address: int, values: Sequence[int]) -> tuple[WriteRequest, bytes]:
        """A new write with a free transaction id, and its bytes; ValueError if Modbus cannot carry it."""
        check_write(function, address, values, unit)
        request = WriteRequest(self._transaction(), unit, function, address, tuple(values))
        self._waiting[request.transaction] = request
        return request, encode_write(request)

    def _transaction(self) -> int:
        if len(self._waiting) >= 0xFFFF:
            raise ValueError("65,535 requests are in flight already")
        while True:
            self._next = (self._next + 1) & 0xFFFF
            if self._next not in self._waiting:
                return self._next

    def forget(self, transaction: int) -> None:
        """Stop waiting for a transaction (it timed out); its response, if it comes, is Late."""
        self._waiting.pop(transaction, None)

    def next_event(self) -> ReadResponse | WriteResponse | ExceptionResponse | Late | Sentinel:
        frame = self._frame()
        if frame is None:
            return NEED_DATA
        transaction, unit, pdu = frame
        request = self._waiting.pop(transaction, None)
        if request is None:
            return Late(transaction, unit)
        if isinstance(request, WriteRequest):
            return _write_response(request, transaction, unit, pdu)
        refused = _exception_or_mismatch(request.kind, request.unit, transaction, unit, pdu)
        if refused is not None:
            return refused
        size = (request.count + 7) // 8 if request.kind.bits else 2 * request.count
        if len(pdu) < 2 or pdu[1] != size or len(pdu) != 2 + size:
            raise ProtocolError(
                f"transaction {transaction}: {len(pdu) - 2} data bytes (byte count {pdu[1] if len(pdu) > 1 else '-'})"
                f" for {request.count} {request.kind.name.lower()} items; expected {size}"
            )
        data = pdu[2:]
        if request.kind.bits:
            values = tuple((data[i // 8] >> (i % 8)) & 1 for i in range(request.count))
        else:
            values = struct.unpack(f">{request.count}H", data)
        return ReadResponse(transaction, unit, request.kind, values)


def _exception_or_mismatch(
    function: int, asked: int, transaction: int, unit: int, pdu: bytes
) -> ExceptionResponse | None:
    """The device's exception response to a request of ``function`` to unit ``asked``, or None for a normal
    answer; ProtocolError when the answer is of another function or from another unit."""
    if pdu[0] == function | 0x80:
        if len(pdu) != 2:
            raise ProtocolError(f"transaction {transaction}: an exception response of {len(pdu)} bytes")
        return ExceptionResponse(transaction, unit, function, pdu[1])
    if pdu[0] != function:
        raise ProtocolError(f"transaction {transaction}: function {pdu[0]:#04x} answers {function:#04x}")
    if unit != asked:
        raise ProtocolError(f"transaction {transaction}: unit {unit} answers a request to unit {asked}")
    return None


def _write_response(
    request: WriteRequest, transaction: int, unit: int, pdu: bytes
) -> WriteResponse | ExceptionResponse:
    """A write's answer: an exception, or the echo of the address and what was written (6.5, 6.6) or how many
    (6.11, 6.12); anything else breaks the protocol."""
    refused = _exception_or_mismatch(request.function, request.unit, transaction, unit, pdu)
    if refused is not None:
        return refused
    function = pdu[0]
    if len(pdu) != 5:
        raise ProtocolError(f"transaction {transaction}: a write response of {len(pdu)} bytes (5)")
    address, second = struct.unpack_from(">HH", pdu, 1)
    if function == WRITE_COIL:
        expected = 0xFF00 if request.values[0] else 0x0000
    elif function == WRITE_REGISTER:
        expected = request.values[0]
    else:
        expected = len(request.values)
    if address != request.address or second != expected:
        raise ProtocolError(
            f"transaction {transaction}: the echo ({address}, {second}) is not of the write ({request.address}, "
            f"{expected})"
        )
    return WriteResponse(transaction, unit, function, address, len(request.values))


class ServerConnection(_Framer):
    """The polled end (the simulator, tests): ``next_event`` gives requests; a bad one is an exception event."""

    def next_event(self) -> ReadRequest | ExceptionResponse | Sentinel:
        """A read request, or the exception response it deserves (unknown function, bad quantity)."""
        frame = self._frame()
        if frame is None:
            return NEED_DATA
        transaction, unit, pdu = frame
        function = pdu[0]
        if function not in (1, 2, 3, 4):
            return ExceptionResponse(transaction, unit, function & 0x7F, ExceptionCode.ILLEGAL_FUNCTION)
        if len(pdu) != 5:
            raise ProtocolError(f"transaction {transaction}: a read request of {len(pdu)} bytes (5)")
        kind = Kind(function)
        address, count = struct.unpack_from(">HH", pdu, 1)
        if not 1 <= count <= MAX_COUNT[kind]:
            return ExceptionResponse(transaction, unit, function, ExceptionCode.ILLEGAL_DATA_VALUE)
        if address + count > 0x10000:
            return ExceptionResponse(transaction, unit, function, ExceptionCode.ILLEGAL_DATA_ADDRESS)
        return ReadRequest(transaction, unit, kind, address, count)


# -- values ----------------------------------------------------------------

# type -> (registers, struct format)
TYPES = {
    "int16": (1, "h"),
    "uint16": (1, "H"),
    "int32": (2, "i"),
    "uint32": (2, "I"),
    "int64": (4, "q"),
    "uint64": (4, "Q"),
    "float32": (2, "f"),
    "float64": (4, "d"),
}
ORDERS = ("big", "little")


def registers_of(type_name: str) -> int:
    """How many registers a value of this type takes (a bool or a bit of a register: one)."""
    return TYPES[type_name][0] if type_name in TYPES else 1


def decode(registers: Sequence[int], type_name: str, byte_order: str = "big", word_order: str = "big") -> float:
    """
    The value the registers hold. ``word_order``: "big" when the most significant register comes first,
    "little" when the device swaps them (CDAB); ``byte_order``: "big" when each register holds its high
    byte first, as Modbus sends it, "little" when the device swaps them too (BADC, DCBA).
    """
    size, code = TYPES[type_name]
    if len(registers) != size:
        raise ValueError(f"{type_name} takes {size} registers, not {len(registers)}")
    if any(not 0 <= r <= 0xFFFF for r in registers):
        raise ValueError(f"registers hold 0..65535, not {list(registers)}")
    words = registers if word_order == "big" else registers[::-1]
    raw = struct.pack(f">{size}H", *words)
    if byte_order != "big":
        raw = _swap_pairs(raw)
    value: float = struct.unpack(f">{code}", raw)[0]
    return value


def encode(value: float, type_name: str, byte_order: str = "big", word_order: str = "big") -> tuple[int, ...]:
    """The registers that hold ``value`` as ``decode`` reads them back."""
    size, code = TYPES[type_name]
    raw = struct.pack(f">{code}", value)
    if byte_order != "big":
        raw = _swap_pairs(raw)
    words = struct.unpack(f">{size}H", raw)
    return tuple(words if word_order == "big" else words[::-1])


def _swap_pairs(raw: bytes) -> bytes:
    """The two bytes of every register swapped (AB CD -> BA DC)."""
    out = bytearray(raw)
    out[0::2], out[1::2] = raw[1::2], raw[0::2]
    return bytes(out)


def bit(register: int, index: int) -> int:
    """Bit ``index`` (0: least significant) of a register."""
    if not 0 <= index <= 15:
        raise ValueError(f"bit {index} is outside 0..15")
    return (register >> index) & 1
