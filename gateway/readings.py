"""
The product's words as types: a Reading, a Device, the outcome of a write,
and the errors the ingest path answers with. Also the normalisation of
what devices send (timestamps, metric names, values) shared by every
transport.
"""

from __future__ import annotations

import datetime
import enum
import functools
import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeGuard

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
ONE_US = datetime.timedelta(microseconds=1)
_NAIVE_EPOCH = datetime.datetime(1970, 1, 1)
_ONE_S = datetime.timedelta(seconds=1)

# datetime's range: 0001-01-01 .. 9999-12-31, in microseconds from the epoch
MIN_TS_US = (datetime.datetime(1, 1, 1, tzinfo=datetime.timezone.utc) - EPOCH) // ONE_US
MAX_TS_US = (datetime.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=datetime.timezone.utc) - EPOCH) // ONE_US

NAME_PATTERN = r"[A-Za-z0-9_.:-]{1,64}"
NAME_RULE = "must be 1-64 characters of A-Z a-z 0-9 _ . : -"
_is_name = re.compile(NAME_PATTERN + r"\Z").match

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))\Z"
)


class CloseReason(enum.Enum):
    """Why the gateway ends a device's session; each transport says it in its own words (TGP's BYE code,
    MQTT 5's DISCONNECT reason)."""

    NORMAL = "normal"  # an administrator closed it
    REPLACED = "replaced"  # a newer connection of the same device
    SHUTTING_DOWN = "shutting_down"  # the gateway is stopping
    NOT_AUTHORIZED = "not_authorized"  # the device was revoked or its token changed
    TIMEOUT = "timeout"  # nothing heard for too long


class Reading(NamedTuple):
    metric: str
    ts_us: int  # microseconds since 1970-01-01T00:00:00Z
    value: float


@dataclass(frozen=True, slots=True)
class Device:
    id: int
    name: str
    type: str | None = None  # its [device_types.NAME] mapping, for vendor JSON
    # The address ranges a tracker bound to it may connect from (gatewayctl device set --allow); () any.
    networks: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Source:
    """
    Where input came from: the transport, the peer's address, and whether
    TLS carried it. ``str()`` gives the text kept with the data
    (``devices.last_source``, ``rejected_input.source``, the journal):
    'tgp+tls 10.0.0.5:40112'. A connection refused before any protocol
    ran is transport 'tcp'.
    """

    transport: str  # https, http, tgp, tgp+tls, tcp
    host: str
    port: int | None = None
    tls: bool = False

    @classmethod
    def of(cls, transport: str, peer: Any, tls: bool) -> Source:
        """From a Twisted address (IPv4Address, IPv6Address; others have no host and port)."""
        return cls(transport, str(getattr(peer, "host", "?")), getattr(peer, "port", None), tls)

    @classmethod
    def parse(cls, text: str | None) -> Source | None:
        """Back from the stored text; None for none. Only for what was stored, never for a live connection."""
        transport, _, address = (text or "").partition(" ")
        if not transport:
            return None
        host, _, port = address.rpartition(":")
        return cls(transport, host or address, int(port) if port.isdigit() else None, transport.endswith("s"))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port if self.port is not None else '?'}"

    def __str__(self) -> str:
        return f"{self.transport} {self.address}"


@dataclass(frozen=True)
class Quarantined:
    """A reading that parsed but failed a quality rule: kept aside in quarantine, with the rule."""

    index: int  # in the sender's readings
    reading: Reading
    rule: str


@dataclass(frozen=True)
class WriteResult:
    accepted: int  # newly stored
    duplicates: int  # already stored with the same value (a retransmission)
    quarantined: tuple[Quarantined, ...] = ()  # kept aside, each with the rule it failed
    conflicts: int = 0  # already stored with another value: the first value stays, this one is kept aside


class IngestError(Exception):
    """
    An answer to the sender that is not an ack: a code, a message, and for
    those worth retrying, how long to wait. Each transport maps the code to
    its own wire (an HTTP status, a TGP error code).
    """

    code = "bad_request"
    retry_after: int | None = None

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidInput(IngestError):
    code = "invalid_reading"


class Unauthorized(IngestError):
    code = "unauthorized"


class StoreUnavailable(IngestError):
    """The database cannot be reached; nothing was stored."""

    code = "database_unavailable"
    retry_after = 5


class StoreOverloaded(IngestError):
    code = "overloaded"
    retry_after = 1


class RateLimited(IngestError):
    """The device sends faster than --device-rate; nothing of this write was stored."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeviceTypeUnknown(IngestError):
    """The device is registered with a type this gateway's config file lacks; nothing was stored."""

    code = "device_type_unknown"
    retry_after = 60


class StoreRejected(IngestError):
    """The database refused a reading; the sender's other readings were stored."""

    code = "rejected_by_database"

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


def is_name(text: Any) -> TypeGuard[str]:
    if not isinstance(text, str):
        return False
    if text in NAMES_SEEN:  # metric and device names repeat in every message: a set lookup, not a regex
        return True
    if _is_name(text) is None:
        return False
    if len(NAMES_SEEN) >= NAMES_SEEN_MAX:
        NAMES_SEEN.clear()
    NAMES_SEEN.add(text)
    return True


def metric_name(text: str) -> str:
    """Another system's name for a value ('Motor/RPM', 'Node Control/Rebirth') as a metric name: '/' as '.',
    any other character a name cannot hold as '_', at most 64 characters."""
    out = "".join(c if c.isascii() and (c.isalnum() or c in "_.:-") else "." if c == "/" else "_" for c in text)
    return out[:64] or "_"


NAMES_SEEN_MAX = 10_000
NAMES_SEEN: set[str] = set()


def parse_rfc3339(text: str) -> int:
    """RFC 3339 with a zone → microseconds since the epoch (finer digits are cut)."""
    # The usual form, 2026-11-22T10:00:00.250Z: its second comes from a cache keyed by the first 19 characters
    # (a batch's readings share seconds, and a fleet's readings the last few), so only the fraction is read.
    n = len(text)
    if text[-1:] == "Z" and (n == 20 or (22 <= n <= 30 and text[19] == ".")):
        frac = text[20:-1]
        if not frac or (frac.isascii() and frac.isdigit()):
            second_us = SECONDS_US.get(text[:19])
            if second_us is None:
                second_us = _utc_second(text[:19]) * 1_000_000
                if len(SECONDS_US) >= SECONDS_SEEN_MAX:
                    SECONDS_US.clear()
                SECONDS_US[text[:19]] = second_us
            return second_us + int(frac[:6]) * FRACTION_SCALE[min(len(frac), 6)] if frac else second_us
    m = _RFC3339.match(text)
    if m is None:
        raise ValueError("is not an RFC 3339 time with a zone (like 2026-11-22T10:00:00.250Z)")
    year, month, day, hour, minute, second, frac, z, sign, oh, om = m.groups()
    micro = int(frac[:6].ljust(6, "0")) if frac else 0
    offset_s = 0
    if not z:
        if int(oh) > 23 or int(om) > 59:
            raise ValueError("has an offset out of range")
        offset_s = (int(oh) * 60 + int(om)) * 60 * (1 if sign == "+" else -1)
    return (_epoch_second(year, month, day, hour, minute, second) - offset_s) * 1_000_000 + micro


FRACTION_SCALE = (0, 100_000, 10_000, 1_000, 100, 10, 1)  # by digits: to microseconds
SECONDS_SEEN_MAX = 4096
SECONDS_US: dict[str, int] = {}  # 'YYYY-MM-DDTHH:MM:SS' (UTC, checked) -> microseconds since the epoch
_SECOND = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})\Z")


def _utc_second(text: str) -> int:
    """Seconds since the epoch of 'YYYY-MM-DDTHH:MM:SS' in UTC; ValueError as parse_rfc3339 says it."""
    m = _SECOND.match(text)
    if m is None:
        raise ValueError("is not an RFC 3339 time with a zone (like 2026-11-22T10:00:00.250Z)")
    return _epoch_second(*m.groups())


@functools.lru_cache(maxsize=4096)
def _epoch_second(year: str, month: str, day: str, hour: str, minute: str, second: str) -> int:
    """Seconds since the epoch of a UTC wall-clock time, checked; cached, since a batch's readings share seconds."""
    try:
        dt = datetime.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
    except ValueError as e:
        raise ValueError(f"is not a valid date and time ({e})") from None
    return (dt - _NAIVE_EPOCH) // _ONE_S


def parse_ts(value: Any) -> int:
    """A device timestamp: RFC 3339 text, or whole epoch milliseconds."""
    if isinstance(value, str):
        ts = parse_rfc3339(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        ts = value * 1000
    else:
        raise ValueError("must be an RFC 3339 string or whole epoch milliseconds")
    if not MIN_TS_US <= ts <= MAX_TS_US:
        raise ValueError("is outside years 0001..9999")
    return ts


def parse_value(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError("is too large for a 64-bit float") from None
    if not math.isfinite(number):
        raise ValueError("must be finite")
    return number


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """'1 device', '2 devices': a count with its noun, for what people read."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def epoch_us(ts: datetime.datetime) -> int:
    """A timestamptz from the database as microseconds since the epoch."""
    delta = ts - EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def format_ts(ts_us: int) -> str:
    """Microseconds since the epoch → RFC 3339 in UTC, with as many digits as needed."""
    seconds, micro = divmod(ts_us, 1_000_000)
    text = _second_text(seconds)
    if micro:
        frac = f"{micro:06d}"
        if frac.endswith("000"):
            frac = frac[:3]
        text += "." + frac
    return text + "Z"


@functools.lru_cache(maxsize=4096)
def _second_text(seconds: int) -> str:
    dt = _NAIVE_EPOCH + datetime.timedelta(seconds=seconds)
    return f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"


def check_reading(metric: str, ts_us: int, value: float, where: str) -> Reading:
    """A decoded reading checked against the same rules as JSON input."""
    if not is_name(metric):
        raise InvalidInput(f"{where}.metric: {NAME_RULE}")
    if not MIN_TS_US <= ts_us <= MAX_TS_US:
        raise InvalidInput(f"{where}.ts: is outside years 0001..9999")
    if not math.isfinite(value):
        raise InvalidInput(f"{where}.value: must be finite")
    return Reading(metric, ts_us, value)
