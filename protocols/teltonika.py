"""
Teltonika's tracker protocol (FMB/FMC/FMM families) as pure code: bytes
in, events out; no Twisted, no I/O, no clock. The layouts are those of
Teltonika's published "Codec" pages (Codec 8, 8 Extended, 16 and 12, over
TCP and UDP).

Theory of operation, TCP. A tracker opens a connection and sends its IMEI
(a u16 length, then ASCII digits); the server answers ``01`` (accepted) or
``00`` (refused, and closes). Then it sends AVL packets: four zero bytes, a
u32 data length, the data (codec id, record count, records, record count
again) and a u32 holding the CRC-16/IBM of the data. The server answers each
with the u32 count of records it accepted; a tracker keeps its records until
that answer comes and sends them again otherwise, so the server answers only
once they are stored. ``ServerConnection`` gives ``Imei``, ``AvlData``,
``BadPacket`` (a packet whose CRC, counts or codec are wrong: it is not
answered, so the tracker sends it again) and ``CommandResponse`` (Codec 12's
answer to a command); what cannot be framed at all (a preamble that is not
zero, a length past the limit, an IMEI that is not digits) raises
``ProtocolError``: the stream cannot be trusted, close it.

UDP. Each datagram carries a header (u16 length, u16 packet id, a byte
"not usable" (0x01), u8 AVL packet id, the IMEI as u16 length and digits)
and the data as over TCP, with no preamble and no CRC; the answer is
``u16 5, u16 packet id, 0x01, u8 AVL packet id, u8 records accepted``.

Codec 12 carries a text command to the tracker (type 5) and its text
answer back (type 6), framed like an AVL packet.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

from protocols.sentinels import Sentinel
from protocols.stream import Stream

CODEC_8, CODEC_8E, CODEC_16, CODEC_12 = 0x08, 0x8E, 0x10, 0x0C
AVL_CODECS = (CODEC_8, CODEC_8E, CODEC_16)
COMMAND, RESPONSE = 0x05, 0x06  # Codec 12 message types
DEFAULT_MAX_PACKET = 64 * 1024  # bytes of an AVL packet's data (a tracker sends at most a few kilobytes)
_IMEI = re.compile(rb"[0-9]{15}\Z")

_HEAD = struct.Struct(">II")  # preamble, data length
_CRC = struct.Struct(">I")
_GPS = struct.Struct(">qBiihHBH")  # timestamp ms, priority, longitude, latitude, altitude, angle, satellites, speed
_UDP_HEAD = struct.Struct(">HHBBH")  # length, packet id, not usable, AVL packet id, IMEI length
_UDP_ACK = struct.Struct(">HHBBB")  # length (5), packet id, not usable, AVL packet id, records accepted


class ProtocolError(Exception):
    """The peer sent what cannot be framed: close the connection."""


def crc16_ibm(data: bytes) -> int:
    """CRC-16/IBM (ARC): polynomial 0x8005 reflected, initial value 0, as Teltonika computes it."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


# -- events ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Gps:
    longitude: float  # degrees, east positive
    latitude: float
    altitude: int  # metres
    angle: int  # degrees from north
    satellites: int
    speed: int  # km/h

    @property
    def fixed(self) -> bool:
        """A position worth storing: satellites in view and not the 0°N 0°E a tracker without a fix sends."""
        return self.satellites > 0 and not (self.longitude == 0 and self.latitude == 0)


@dataclass(frozen=True, slots=True)
class Record:
    timestamp_ms: int  # UTC, milliseconds since 1970
    priority: int  # 0 low, 1 high, 2 panic
    gps: Gps
    event_io: int  # the IO element that triggered the record (0: periodic)
    io: tuple[tuple[int, int | bytes], ...]  # (IO id, value): an unsigned integer, or bytes (8 Extended's NX)
    generation: int | None = None  # Codec 16's generation type


@dataclass(frozen=True, slots=True)
class Imei:
    imei: str


@dataclass(frozen=True, slots=True)
class AvlData:
    codec: int
    records: tuple[Record, ...]
    raw: bytes  # the packet as it came, for the rejected-input table


@dataclass(frozen=True, slots=True)
class BadPacket:
    """A packet framed right whose contents are wrong: not answered (the tracker sends it again), kept."""

    reason: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class CommandResponse:
    text: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """The server's answer to the IMEI (device side)."""

    accepted: bool


@dataclass(frozen=True, slots=True)
class Acked:
    """The server's answer to an AVL packet (device side): records accepted."""

    count: int


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """A Codec 12 command the server sent (device side)."""

    text: str


@dataclass(frozen=True, slots=True)
class UdpPacket:
    packet_id: int
    avl_packet_id: int
    imei: str
    codec: int
    records: tuple[Record, ...]


# -- records -------------------------------------------------------------------


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ValueError("the data ends inside a record")
        chunk, self.pos = self.data[self.pos : end], end
        return chunk

    def unpack(self, s: struct.Struct) -> tuple[Any, ...]:
        return s.unpack(self.take(s.size))

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")


def _decode_record(r: _Reader, codec: int) -> Record:
    stamp, priority, lon, lat, alt, angle, sats, speed = r.unpack(_GPS)
    gps = Gps(lon / 1e7, lat / 1e7, alt, angle, sats, speed)
    wide = codec == CODEC_8E  # 2-byte ids and counts
    id_size = 1 if codec == CODEC_8 else 2
    event_io = r.uint(id_size)
    generation = r.uint(1) if codec == CODEC_16 else None
    count_size = 2 if wide else 1
    total = r.uint(count_size)
    io: list[tuple[int, int | bytes]] = []
    for size in (1, 2, 4, 8):
        for _ in range(r.uint(count_size)):
            io.append((r.uint(id_size), r.uint(size)))
    if wide:
        for _ in range(r.uint(2)):
            io_id, length = r.uint(2), r.uint(2)
            io.append((io_id, r.take(length)))
    if len(io) != total:
        raise ValueError(f"a record counts {total} IO elements and holds {len(io)}")
    return Record(stamp, priority, gps, event_io, tuple(io), generation)


def decode_records(data: bytes) -> tuple[int, tuple[Record, ...]]:
    """An AVL data field (codec id … count again): (codec, records); ValueError when it is not well formed."""
    if len(data) < 3:
        raise ValueError("the data is too short for a codec id and two counts")
    codec, count = data[0], data[1]
    if codec not in AVL_CODECS:
        raise ValueError(f"codec {codec:#04x} is not one of 8, 8 Extended (0x8e) or 16 (0x10)")
    r = _Reader(data, 2)
    records = tuple(_decode_record(r, codec) for _ in range(count))
    if r.pos > len(data) - 1:
        raise ValueError("the data ends inside a record")
    if r.pos != len(data) - 1:
        raise ValueError(f"{len(data) - 1 - r.pos} bytes left after {count} records")
    if data[-1] != count:
        raise ValueError(f"the record counts differ: {count} first, {data[-1]} last")
    return codec, records


def _encode_record(record: Record, codec: int) -> bytes:
    g = record.gps
    lon, lat = round(g.longitude * 1e7), round(g.latitude * 1e7)
    out = [_GPS.pack(record.timestamp_ms, record.priority, lon, lat, g.altitude, g.angle, g.satellites, g.speed)]
    id_size = 1 if codec == CODEC_8 else 2
    count_size = 2 if codec == CODEC_8E else 1
    out.append(record.event_io.to_bytes(id_size, "big"))
    if codec == CODEC_16:
        out.append((record.generation or 0).to_bytes(1, "big"))
    out.append(len(record.io).to_bytes(count_size, "big"))
    for size in (1, 2, 4, 8):
        group = [(i, v) for i, v in record.io if isinstance(v, int) and _size_of(v) == size]
        out.append(len(group).to_bytes(count_size, "big"))
        out += [i.to_bytes(id_size, "big") + v.to_bytes(size, "big") for i, v in group]
    if codec == CODEC_8E:
        variable = [(i, v) for i, v in record.io if isinstance(v, bytes)]
        out.append(len(variable).to_bytes(2, "big"))
        out += [i.to_bytes(2, "big") + len(v).to_bytes(2, "big") + v for i, v in variable]
    elif any(isinstance(v, bytes) for _, v in record.io):
        raise ValueError("only Codec 8 Extended carries variable-length IO elements")
    return b"".join(out)


def _size_of(value: int) -> int:
    for size in (1, 2, 4, 8):
        if 0 <= value < 1 << (8 * size):
            return size
    raise ValueError(f"IO value {value} does not fit 8 bytes")


def encode_records(codec: int, records: tuple[Record, ...] | list[Record]) -> bytes:
    """The AVL data field for ``records`` (an IO value goes in the smallest of 1, 2, 4, 8 bytes it fits)."""
    if codec not in AVL_CODECS:
        raise ValueError(f"codec {codec:#04x} carries no records")
    if not 1 <= len(records) <= 255:
        raise ValueError("a packet carries 1 to 255 records")
    body = b"".join(_encode_record(r, codec) for r in records)
    return bytes([codec, len(records)]) + body + bytes([len(records)])


def _framed(data: bytes) -> bytes:
    return _HEAD.pack(0, len(data)) + data + _CRC.pack(crc16_ibm(data))


def avl_packet(codec: int, records: tuple[Record, ...] | list[Record]) -> bytes:
    """A whole TCP AVL packet (preamble, length, data, CRC), as a tracker sends it."""
    return _framed(encode_records(codec, records))


def codec12(kind: int, text: str) -> bytes:
    """A Codec 12 packet: a command (``COMMAND``, server to tracker) or its answer (``RESPONSE``)."""
    body = text.encode("utf-8")
    return _framed(bytes([CODEC_12, 1, kind]) + len(body).to_bytes(4, "big") + body + b"\x01")


def imei_packet(imei: str) -> bytes:
    raw = imei.encode("ascii")
    return len(raw).to_bytes(2, "big") + raw


# -- the connections -------------------------------------------------------------


class _Stream(Stream):
    __slots__ = ()

    def _short(self) -> Sentinel:  # type: ignore[override]
        return super()._short(ProtocolError)

    def _packet(self) -> tuple[bytes, bytes] | Sentinel | BadPacket:
        """The next framed packet: (data, the whole packet), a sentinel, or a BadPacket for a wrong CRC."""
        buf = self._buffer
        if len(buf) < _HEAD.size:
            return self._short()
        preamble, length = _HEAD.unpack_from(buf)
        if preamble != 0:
            raise ProtocolError(f"a packet must start with four zero bytes, not {bytes(buf[:4]).hex()}")
        if length > self.max_packet:
            raise ProtocolError(f"a packet of {length} bytes; the limit is {self.max_packet}")
        total = _HEAD.size + length + _CRC.size
        if len(buf) < total:
            return self._short()
        raw = bytes(buf[:total])
        del buf[:total]
        data = raw[_HEAD.size : -_CRC.size]
        (crc,) = _CRC.unpack_from(raw, total - _CRC.size)
        if crc != crc16_ibm(data):
            return BadPacket(f"CRC {crc:#06x} does not match the data's {crc16_ibm(data):#06x}", raw)
        return data, raw


def _codec12_text(data: bytes, kind: int) -> str | None:
    """The text of a Codec 12 packet of ``kind``, or None when the data is not one."""
    if len(data) < 8 or data[0] != CODEC_12 or data[2] != kind:
        return None
    size = int.from_bytes(data[3:7], "big")
    if len(data) != 7 + size + 1 or data[1] != 1 or data[-1] != 1:
        return None
    return data[7 : 7 + size].decode("utf-8", "replace")


class ServerConnection(_Stream):
    """The gateway's end of one tracker's TCP connection."""

    __slots__ = ("imei",)

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        super().__init__(max_packet)
        self.imei: str | None = None

    def next_event(self) -> Imei | AvlData | BadPacket | CommandResponse | Sentinel:
        if self.imei is None:
            return self._imei()
        packet = self._packet()
        if not isinstance(packet, tuple):
            return packet
        data, raw = packet
        if data[:1] == bytes([CODEC_12]):
            text = _codec12_text(data, RESPONSE)
            return CommandResponse(text) if text is not None else BadPacket("a Codec 12 packet that is no answer", raw)
        try:
            codec, records = decode_records(data)
        except ValueError as e:
            return BadPacket(str(e), raw)
        return AvlData(codec, records, raw)

    def _imei(self) -> Imei | Sentinel:
        buf = self._buffer
        if len(buf) < 2:
            return self._short()
        length = int.from_bytes(buf[:2], "big")
        if length != 15:
            raise ProtocolError(f"an IMEI of {length} characters; an IMEI is 15 digits")
        if len(buf) < 2 + length:
            return self._short()
        raw = bytes(buf[2 : 2 + length])
        if not _IMEI.match(raw):
            raise ProtocolError(f"the IMEI {raw[:20]!r} is not 15 digits")
        del buf[: 2 + length]
        self.imei = raw.decode("ascii")
        return Imei(self.imei)

    @staticmethod
    def accept(accepted: bool) -> bytes:
        return b"\x01" if accepted else b"\x00"

    @staticmethod
    def ack(count: int) -> bytes:
        return count.to_bytes(4, "big")

    @staticmethod
    def command(text: str) -> bytes:
        return codec12(COMMAND, text)


class DeviceConnection(_Stream):
    """The tracker's end (the simulator, tests): what the server answers."""

    __slots__ = ("accepted",)

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        super().__init__(max_packet)
        self.accepted: bool | None = None

    def next_event(self) -> Accepted | Acked | CommandRequest | BadPacket | Sentinel:
        buf = self._buffer
        if self.accepted is None:
            if not buf:
                return self._short()
            self.accepted = buf[0] == 1
            del buf[:1]
            return Accepted(self.accepted)
        if len(buf) >= 4 and int.from_bytes(buf[:4], "big") == 0:  # a preamble: a Codec 12 command
            packet = self._packet()
            if not isinstance(packet, tuple):
                return packet
            data, raw = packet
            text = _codec12_text(data, COMMAND)
            return CommandRequest(text) if text is not None else BadPacket("not a command", raw)
        if len(buf) < 4:
            return self._short()
        count = int.from_bytes(buf[:4], "big")
        del buf[:4]
        return Acked(count)


# -- UDP -----------------------------------------------------------------------------


def decode_datagram(data: bytes) -> UdpPacket:
    """A UDP datagram; ProtocolError when its header is wrong, ValueError when its records are."""
    if len(data) < _UDP_HEAD.size:
        raise ProtocolError(f"a datagram of {len(data)} bytes is shorter than its header")
    length, packet_id, _, avl_packet_id, imei_length = _UDP_HEAD.unpack_from(data)
    if length != len(data) - 2:
        raise ProtocolError(f"the datagram says {length} bytes follow its length; {len(data) - 2} do")
    imei = data[_UDP_HEAD.size : _UDP_HEAD.size + imei_length]
    if imei_length != 15 or not _IMEI.match(imei):
        raise ProtocolError(f"the IMEI {imei[:20]!r} is not 15 digits")
    codec, records = decode_records(data[_UDP_HEAD.size + imei_length :])
    return UdpPacket(packet_id, avl_packet_id, imei.decode("ascii"), codec, records)


def udp_ack(packet_id: int, avl_packet_id: int, accepted: int) -> bytes:
    return _UDP_ACK.pack(5, packet_id, 1, avl_packet_id, accepted)


def decode_udp_ack(data: bytes) -> tuple[int, int, int]:
    """The tracker's end: a server's UDP answer as (packet id, AVL packet id, records accepted)."""
    if len(data) != _UDP_ACK.size:
        raise ProtocolError(f"an answer of {len(data)} bytes; a UDP answer has {_UDP_ACK.size}")
    length, packet_id, _, avl_packet_id, accepted = _UDP_ACK.unpack(data)
    if length != _UDP_ACK.size - 2:
        raise ProtocolError(f"the answer says {length} bytes follow its length; {_UDP_ACK.size - 2} do")
    return packet_id, avl_packet_id, accepted


def encode_datagram(packet_id: int, avl_packet_id: int, imei: str, codec: int, records: list[Record]) -> bytes:
    body = imei_packet(imei) + encode_records(codec, records)
    return struct.pack(">HHBB", 4 + len(body), packet_id, 1, avl_packet_id) + body
