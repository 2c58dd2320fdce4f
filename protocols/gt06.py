"""
The GT06 protocol of Concox (Jimi) trackers as pure code: bytes in, events
out; no Twisted, no I/O, no clock. Layouts from Concox's "GT06 GPS Tracker
Communication Protocol" (v1.8) and the GT06N additions (0x22, 0x26).

Theory of operation. Every packet is framed the same way: start bits
``78 78`` and a u8 length (or ``79 79`` and a u16 length), the protocol
number, its information, a u16 serial number, a u16 CRC-ITU (CRC-16/X-25)
of everything from the length to the serial, and stop bits ``0D 0A``. The
tracker logs in (0x01, its IMEI as 8 BCD bytes) and the server answers
with the protocol number and the serial; then it sends locations (0x12,
0x22), status as its heartbeat (0x13) and alarms (0x16, 0x26), each answered
the same way. The server's online command (0x80) carries a u32 "server flag"
the tracker repeats in its answer (0x15), so an answer names its command.

A packet whose CRC does not match, or whose information is too short for its
protocol number, is a ``BadPacket`` (not answered: the tracker sends it
again); what cannot be framed (start or stop bits wrong, a length past the
limit) raises ``ProtocolError``: close the connection.
"""

from __future__ import annotations

import calendar
import struct
import time
from dataclasses import dataclass

from protocols.sentinels import Sentinel
from protocols.stream import Stream

LOGIN, LOCATION, STATUS, STRING, ALARM, LOCATION_2, ALARM_2, COMMAND = 0x01, 0x12, 0x13, 0x15, 0x16, 0x22, 0x26, 0x80
LOCATIONS = (LOCATION, LOCATION_2)
ALARMS = (ALARM, ALARM_2)
SHORT, LONG, STOP = b"\x78\x78", b"\x79\x79", b"\x0d\x0a"
DEFAULT_MAX_PACKET = 1024


class ProtocolError(Exception):
    """The peer sent what cannot be framed: close the connection."""


def crc_itu(data: bytes) -> int:
    """CRC-16/X-25 ("CRC-ITU" in Concox's documents): polynomial 0x1021 reflected, initial 0xFFFF, final XOR."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc ^ 0xFFFF


# -- events --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Login:
    imei: str
    serial: int


@dataclass(frozen=True, slots=True)
class Position:
    """The GPS part of a location or an alarm."""

    time_s: int  # UTC, seconds since 1970
    latitude: float
    longitude: float
    speed: int  # km/h
    course: int  # degrees
    satellites: int
    fixed: bool  # the tracker says it is positioned


@dataclass(frozen=True, slots=True)
class TerminalStatus:
    """Status (0x13) and the status part of an alarm."""

    info: int  # bit 1 ACC (ignition) on, bit 2 charging, bits 3-5 alarm, bit 6 GPS tracking, bit 7 power cut
    voltage: int  # level 0 (no power) .. 6 (full)
    gsm: int  # signal 0 .. 4
    alarm: int  # the alarm code (high byte of alarm/language)


@dataclass(frozen=True, slots=True)
class Location:
    protocol: int  # LOCATION or LOCATION_2
    serial: int
    position: Position


@dataclass(frozen=True, slots=True)
class Status:
    serial: int
    status: TerminalStatus


@dataclass(frozen=True, slots=True)
class Alarm:
    protocol: int  # ALARM or ALARM_2
    serial: int
    position: Position
    status: TerminalStatus


@dataclass(frozen=True, slots=True)
class CommandAnswer:
    """The tracker's answer (0x15) to an online command, with the command's server flag."""

    serial: int
    server_flag: int
    text: str


@dataclass(frozen=True, slots=True)
class Other:
    """A packet of a protocol number this codec does not read (answered, so the tracker moves on)."""

    protocol: int
    serial: int


@dataclass(frozen=True, slots=True)
class BadPacket:
    reason: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class Answer:
    """The server's answer to a packet (device side)."""

    protocol: int
    serial: int


@dataclass(frozen=True, slots=True)
class CommandRequest:
    """An online command (device side)."""

    serial: int
    server_flag: int
    text: str


# -- information ------------------------------------------------------------------

_POSITION = struct.Struct(">6BBIIBH")  # date and time, GPS length/satellites, lat, lon, speed, course/status
_STATUS = struct.Struct(">BBBH")


def _position(info: bytes) -> Position:
    y, mo, d, h, mi, s, gps, lat, lon, speed, flags = _POSITION.unpack_from(info)
    if not (1 <= mo <= 12 and 1 <= d <= 31 and h < 24 and mi < 60 and s < 60):
        raise ValueError(f"the date {2000 + y}-{mo:02d}-{d:02d} {h:02d}:{mi:02d}:{s:02d} is not one")
    when = calendar.timegm((2000 + y, mo, d, h, mi, s, 0, 0, 0))
    latitude = lat / 1_800_000 * (1 if flags & 0x0400 else -1)  # bit 10: north
    longitude = lon / 1_800_000 * (-1 if flags & 0x0800 else 1)  # bit 11: west
    return Position(when, latitude, longitude, speed, flags & 0x03FF, gps & 0x0F, bool(flags & 0x1000))


def _encode_position(p: Position) -> bytes:
    t = time.gmtime(p.time_s)
    flags = (p.course & 0x03FF) | (0x1000 if p.fixed else 0) | (0x0400 if p.latitude >= 0 else 0)
    flags |= 0x0800 if p.longitude < 0 else 0
    lat, lon = round(abs(p.latitude) * 1_800_000), round(abs(p.longitude) * 1_800_000)
    return _POSITION.pack(
        t.tm_year - 2000, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, 0xC0 | (p.satellites & 0x0F), lat, lon,
        p.speed, flags,
    )  # fmt: skip


def _status(info: bytes) -> TerminalStatus:
    terminal, voltage, gsm, alarm = _STATUS.unpack_from(info)
    return TerminalStatus(terminal, voltage, gsm, alarm >> 8)


def _encode_status(s: TerminalStatus) -> bytes:
    return _STATUS.pack(s.info, s.voltage, s.gsm, (s.alarm << 8) | 0x02)


_LBS = 8  # MCC 2, MNC 1, LAC 2, cell id 3


def _decode(protocol: int, info: bytes, serial: int) -> Login | Location | Status | Alarm | CommandAnswer | Other:
    if protocol == LOGIN:
        if len(info) < 8:
            raise ValueError(f"a login of {len(info)} bytes; the IMEI takes 8")
        digits = info[:8].hex()
        if not digits.isdigit() or digits[0] != "0":
            raise ValueError(f"the terminal id {digits} is not an IMEI in BCD")
        return Login(digits[1:], serial)
    if protocol in LOCATIONS:
        if len(info) < _POSITION.size:
            raise ValueError(f"a location of {len(info)} bytes is too short")
        return Location(protocol, serial, _position(info))
    if protocol == STATUS:
        if len(info) < _STATUS.size:
            raise ValueError(f"a status of {len(info)} bytes is too short")
        return Status(serial, _status(info))
    if protocol in ALARMS:
        # 0x16: the position, an LBS length byte and the LBS; 0x26 (GT06N): the LBS with no length byte.
        lbs = 1 + _LBS if protocol == ALARM else _LBS
        if len(info) < _POSITION.size + lbs + _STATUS.size:
            raise ValueError(f"an alarm of {len(info)} bytes is too short")
        return Alarm(protocol, serial, _position(info), _status(info[_POSITION.size + lbs :]))
    if protocol == STRING:
        if len(info) < 5 or info[0] < 4 or len(info) < 1 + info[0]:
            raise ValueError("a command answer shorter than its length says")
        (flag,) = struct.unpack_from(">I", info, 1)
        return CommandAnswer(serial, flag, info[5 : 1 + info[0]].decode("ascii", "replace"))
    return Other(protocol, serial)


def packet(protocol: int, info: bytes, serial: int) -> bytes:
    """A whole packet: start bits, length, protocol, information, serial, CRC, stop bits."""
    body_length = 1 + len(info) + 2 + 2
    if body_length <= 0xFF:
        head = SHORT + bytes([body_length])
    else:
        head = LONG + body_length.to_bytes(2, "big")
    framed = head[2:] + bytes([protocol]) + info + serial.to_bytes(2, "big")
    return head[:2] + framed + crc_itu(framed).to_bytes(2, "big") + STOP


# -- the connections ------------------------------------------------------------------


class _Stream(Stream):
    __slots__ = ()

    def _short(self) -> Sentinel:  # type: ignore[override]
        return super()._short(ProtocolError)

    def _frame(self) -> tuple[int, bytes, int] | BadPacket | Sentinel:
        """The next packet: (protocol, information, serial), a BadPacket, or a sentinel."""
        buf = self._buffer
        if len(buf) < 3:
            return self._short()
        start = bytes(buf[:2])
        if start == SHORT:
            length, head = buf[2], 3
        elif start == LONG:
            if len(buf) < 4:
                return self._short()
            length, head = int.from_bytes(buf[2:4], "big"), 4
        else:
            raise ProtocolError(f"a packet must start with 78 78 or 79 79, not {start.hex(' ')}")
        if length > self.max_packet:
            raise ProtocolError(f"a packet of {length} bytes; the limit is {self.max_packet}")
        if length < 5:
            raise ProtocolError(f"a packet length of {length}: it holds at least a protocol, a serial and a CRC")
        total = head + length + 2
        if len(buf) < total:
            return self._short()
        raw = bytes(buf[:total])
        del buf[:total]
        if raw[-2:] != STOP:
            raise ProtocolError(f"a packet must end with 0d 0a, not {raw[-2:].hex(' ')}")
        framed = raw[2:-4]
        crc = int.from_bytes(raw[-4:-2], "big")
        if crc != crc_itu(framed):
            return BadPacket(f"CRC {crc:#06x} does not match the packet's {crc_itu(framed):#06x}", raw)
        body = raw[head:-4]
        return body[0], body[1:-2], int.from_bytes(body[-2:], "big")


class ServerConnection(_Stream):
    """The gateway's end of one tracker's connection."""

    __slots__ = ()

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        super().__init__(max_packet)

    def next_event(self) -> Login | Location | Status | Alarm | CommandAnswer | Other | BadPacket | Sentinel:
        frame = self._frame()
        if not isinstance(frame, tuple):
            return frame
        protocol, info, serial = frame
        try:
            return _decode(protocol, info, serial)
        except ValueError as e:
            return BadPacket(str(e), packet(protocol, info, serial))

    @staticmethod
    def answer(protocol: int, serial: int) -> bytes:
        """The answer to a login, location, status or alarm: its protocol number and its serial."""
        return packet(protocol, b"", serial)

    @staticmethod
    def command(text: str, server_flag: int, serial: int) -> bytes:
        body = text.encode("ascii")
        if 4 + len(body) > 0xFF:
            raise ValueError("an online command holds at most 251 characters")
        return packet(COMMAND, bytes([4 + len(body)]) + server_flag.to_bytes(4, "big") + body + b"\x00\x02", serial)


class DeviceConnection(_Stream):
    """The tracker's end (the simulator, tests)."""

    __slots__ = ()

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        super().__init__(max_packet)

    def next_event(self) -> Answer | CommandRequest | BadPacket | Sentinel:
        frame = self._frame()
        if not isinstance(frame, tuple):
            return frame
        protocol, info, serial = frame
        if protocol == COMMAND and len(info) >= 5 and len(info) >= 1 + info[0]:
            (flag,) = struct.unpack_from(">I", info, 1)
            return CommandRequest(serial, flag, info[5 : 1 + info[0]].decode("ascii", "replace"))
        return Answer(protocol, serial)

    @staticmethod
    def login(imei: str, serial: int) -> bytes:
        return packet(LOGIN, bytes.fromhex("0" + imei), serial)

    @staticmethod
    def location(position: Position, serial: int) -> bytes:
        return packet(LOCATION, _encode_position(position) + bytes(_LBS), serial)

    @staticmethod
    def status(status: TerminalStatus, serial: int) -> bytes:
        return packet(STATUS, _encode_status(status), serial)

    @staticmethod
    def alarm(position: Position, status: TerminalStatus, serial: int) -> bytes:
        return packet(
            ALARM, _encode_position(position) + bytes([_LBS + 1]) + bytes(_LBS) + _encode_status(status), serial
        )

    @staticmethod
    def command_answer(server_flag: int, text: str, serial: int) -> bytes:
        body = text.encode("ascii")
        return packet(STRING, bytes([4 + len(body)]) + server_flag.to_bytes(4, "big") + body + b"\x00\x02", serial)
