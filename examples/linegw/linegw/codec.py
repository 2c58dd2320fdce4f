"""
The line protocol as pure code: bytes in, events out; no Twisted, no I/O.

A device sends ASCII lines ending in ``\\n``::

    AUTH <token>                  first, once: the device's token
    <metric> <value> <ts_ms>      then a reading a line (ts: milliseconds since 1970, UTC)

Each line is answered in order: ``OK`` to AUTH, ``ACK <n>`` once the n-th
reading is stored (or was stored before: a retransmitted line is not stored
twice), ``ERR <n> <code> <message>`` when it is refused. A line longer than
``max_line`` bytes, or a line that is neither, ends the connection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Auth:
    token: str


@dataclass(frozen=True)
class Value:
    metric: str
    value: float
    ts_ms: int


@dataclass(frozen=True)
class Bad:
    """A line that cannot be understood; the connection ends after the answer."""

    reason: str


Event = Auth | Value | Bad


class LineCodec:
    def __init__(self, max_line: int = 256) -> None:
        self.max_line = max_line
        self._buffer = b""
        self.broken = False  # a Bad was given: nothing more is read

    def receive(self, data: bytes) -> list[Event]:
        """The events that ``data`` completes (after those of earlier calls)."""
        if self.broken:
            return []
        self._buffer += data
        events: list[Event] = []
        while not self.broken:
            line, found, rest = self._buffer.partition(b"\n")
            if not found:
                if len(self._buffer) > self.max_line:
                    events.append(self._bad(f"a line is longer than {self.max_line} bytes"))
                break
            self._buffer = rest
            if len(line) > self.max_line:
                events.append(self._bad(f"a line is longer than {self.max_line} bytes"))
                break
            event = self._parse(line.rstrip(b"\r"))
            events.append(event)
            if isinstance(event, Bad):
                self.broken = True
        return events

    def _bad(self, reason: str) -> Bad:
        self.broken = True
        self._buffer = b""
        return Bad(reason)

    def _parse(self, line: bytes) -> Event:
        try:
            words = line.decode("ascii").split()
        except UnicodeDecodeError:
            return Bad("a line is not ASCII")
        if len(words) == 2 and words[0] == "AUTH":
            return Auth(words[1])
        if len(words) != 3:
            return Bad("a line is 'AUTH <token>' or '<metric> <value> <ts_ms>'")
        metric, value_text, ts_text = words
        try:
            value = float(value_text)
            ts_ms = int(ts_text)
        except ValueError:
            return Bad(f"{value_text!r} {ts_text!r}: the value is a number and ts_ms a whole number")
        if not math.isfinite(value):
            return Bad(f"{value_text!r}: the value must be finite")
        return Value(metric, value, ts_ms)


def ack(n: int) -> bytes:
    return b"ACK %d\n" % n


def error(n: int, code: str, message: str) -> bytes:
    return f"ERR {n} {code} {' '.join(message.split())}\n".encode("ascii", "replace")
