"""
Settings: one row per option, with its default, the parser that checks its
value, its help text and whether a SIGHUP applies it while running. The
gateway's own rows are in ``gateway/config.py``; a transport plugin brings
its own (``gateway/transport.py``). The parsers here are the one place a
value from the command line or the config file is checked, so every error
names the option and what was wrong in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.net.endpoints import EndpointSpec, parse_endpoint


def positive_int(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a whole number")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a whole number") from None
        if not lo <= number <= hi:
            raise ValueError(f"{number} is outside {lo}..{hi}")
        return number

    return parse


def number(lo: float, hi: float, unit: str) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number of {unit}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number of {unit}") from None
        if not lo <= number <= hi:
            raise ValueError(f"{number:g} is outside {lo:g}..{hi:g} {unit}")
        return number

    return parse


def seconds(lo: float, hi: float) -> Callable[[Any], float]:
    return number(lo, hi, "seconds")


rate = number(0, 10_000_000, "readings per second")  # 0: no limit


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a non-empty string")
    return value


def readable_file(value: Any) -> Path:
    path = Path(text(value)).expanduser()
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a readable file")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise ValueError(f"{str(path)!r} cannot be read: {e.strerror}") from None
    return path


def directory(value: Any) -> Path:
    path = Path(text(value)).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} exists and is not a directory")
    return path


def dsn(value: Any) -> str:
    from psycopg2.extensions import parse_dsn

    given = text(value)
    try:
        parse_dsn(given)
    except Exception as e:  # psycopg2.ProgrammingError, with libpq's words
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "unparsable"
        raise ValueError(f"not a valid PostgreSQL connection string: {reason}") from None
    return given


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value: Any, lo: float = 1.0, hi: float = 100 * 365 * 86400) -> float:
    """A duration: seconds, or a number with ms, s, m, h or d ('500ms', '30d'); ValueError otherwise."""
    text = str(value).strip() if not isinstance(value, bool) else ""
    unit: float | None
    if text.endswith("ms"):
        text, unit = text[:-2], 0.001
    else:
        unit = _UNITS.get(text[-1:], None) if text else None
        text = text[:-1] if unit else text
    try:
        seconds = float(text) * (unit or 1)
    except ValueError:
        raise ValueError(f"{value!r} is not a duration such as 3600, 90m, 12h or 30d") from None
    if not lo <= seconds <= hi:
        raise ValueError(f"{value!r} is outside {lo:g}s..{hi / 86400 / 365:g} years")
    return seconds


def age(value: Any) -> float:
    return duration(value, lo=60)


def local_endpoint(value: Any) -> EndpointSpec:
    """A tcp: endpoint; a bare port number listens on 127.0.0.1 only."""
    given = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else text(value)
    if given.isdigit():
        given = f"tcp:{given}:interface=127.0.0.1"
    return parse_endpoint(given, ("tcp",))


def choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    return parse


def off_or(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``off`` (None: leave the feature out), or what ``parse`` makes of the value."""

    def parse_or_off(value: Any) -> Any:
        return None if value == "off" else parse(value)

    return parse_or_off


def server_endpoint(kinds: tuple[str, ...]) -> Callable[[Any], EndpointSpec]:
    def parse(value: Any) -> EndpointSpec:
        return parse_endpoint(text(value), kinds)

    return parse


@dataclass(frozen=True)
class Setting:
    name: str  # the long option, and the config file's key ("-" or "_")
    default: Any
    parse: Callable[[Any], Any]
    help: str
    multiple: bool = False  # may be given more than once (a list in TOML; an array of tables too)
    live: bool = False  # a SIGHUP applies a new value while running; otherwise it waits for a restart
    option: bool = True  # a command-line option too; False: a config-file key or table only
    check: Callable[[Any], None] | None = None  # a check of the whole value (ValueError), after each part's

    @property
    def key(self) -> str:
        """The name as a Python identifier: the field of the gateway's configuration."""
        return self.name.replace("-", "_")


def parse_setting(setting: Setting, raw: Any) -> Any:
    """``raw`` (None: not given) through the setting's parser; ValueError or TypeError names what was wrong."""
    if raw is None:
        raw = setting.default
    if raw is None:
        return () if setting.multiple else None
    if setting.multiple:
        items = [raw] if isinstance(raw, (str, dict)) else list(raw)
        value: Any = tuple(v for v in (setting.parse(item) for item in items) if v is not None)
    else:
        value = setting.parse(raw)
    if setting.check is not None:
        setting.check(value)
    return value
