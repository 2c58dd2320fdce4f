"""
Vendor JSON: devices that post their own file format, read through a
``[device_types.NAME]`` table of the config file.

A mapping says where the readings' time is and how it is written, which
fields are metrics (dotted paths; ``*`` stands for every key of an object
or every item of a list), what each metric is called and how its value is
scaled into the unit the gateway stores. Reading a body is pure: a
document in, readings out, or ``Unmappable`` naming the path that failed.

    [device_types.acme-oil]
    device = "SerialNo"                        # optional: must equal the device's name
    records = "Samples"                        # optional: a list, each item one record
    timestamp = "Time"                         # in each record
    timestamp_format = "%d/%m/%Y %H:%M:%S"     # rfc3339, epoch_s, epoch_ms or a strptime pattern
    timezone = "Australia/Perth"               # for a pattern without %z
    expected_interval = "10m"                  # silent after this long without a reading
    metrics = [
      { path = "Sensors.OilTemp.Value", name = "oil_temp", scale = 0.5555556, offset = -17.7777778 },
      { path = "Sensors.*.Value", name = "sensor_{1}" },
    ]
"""

from __future__ import annotations

import datetime
import json
import math
import re
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Iterator

from gateway.readings import (
    EPOCH,
    MAX_TS_US,
    MIN_TS_US,
    NAME_RULE,
    ONE_US,
    InvalidInput,
    Reading,
    is_name,
    parse_rfc3339,
)
from gateway.tables import known_keys, table_number

FORMATS = ("rfc3339", "epoch_s", "epoch_ms")
_PLACEHOLDER = re.compile(r"\{(\d+)\}")


class Unmappable(InvalidInput):
    """The body does not fit the device type's mapping; the message names the path."""

    code = "unmappable"


class DeviceTypeError(Exception):
    """A [device_types.NAME] table is wrong; the message says where and how."""


@dataclass(frozen=True)
class MetricMap:
    path: tuple[str, ...]
    name: str  # "{1}" is the key the first "*" matched, "{2}" the second's
    scale: float = 1.0
    offset: float = 0.0
    optional: bool = False  # a path that matches nothing is skipped instead of refused


@dataclass(frozen=True)
class DeviceType:
    name: str
    timestamp: tuple[str, ...]
    timestamp_format: str
    metrics: tuple[MetricMap, ...]
    timezone: str | None = None
    records: tuple[str, ...] | None = None
    device: tuple[str, ...] | None = None
    expected_interval: float | None = None

    def read(self, body: bytes, device_name: str) -> list[Reading]:
        """A vendor body → readings, or Unmappable / InvalidInput."""
        try:
            doc = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput("the body is not UTF-8", code="invalid_json") from None
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
            raise InvalidInput(f"the body is not valid JSON: {e}", code="invalid_json") from None
        return self.map(doc, device_name)

    def map(self, doc: Any, device_name: str) -> list[Reading]:
        if self.device is not None:
            named = _at(doc, self.device, "")
            if str(named) != device_name:
                raise Unmappable(
                    f"{_show(self.device)}: names device {named!r}, but the token is device {device_name!r}"
                )
        if self.records is None:
            records: list[tuple[str, Any]] = [("", doc)]
        else:
            items = _at(doc, self.records, "")
            if not isinstance(items, list):
                raise Unmappable(f"{_show(self.records)}: must be a list of records")
            where = _show(self.records)
            records = [(f"{where}[{i}]", item) for i, item in enumerate(items)]
        readings: list[Reading] = []
        for where, record in records:
            ts = self._timestamp(record, where)
            for metric in self.metrics:
                readings += self._values(record, where, metric, ts)
        return readings

    def _timestamp(self, record: Any, where: str) -> int:
        raw = _at(record, self.timestamp, where)
        path = _join(where, _show(self.timestamp))
        try:
            ts = parse_time(raw, self.timestamp_format, self.timezone)
        except ValueError as e:
            raise Unmappable(f"{path}: {raw!r} {e}") from None
        if not MIN_TS_US <= ts <= MAX_TS_US:
            raise Unmappable(f"{path}: is outside years 0001..9999")
        return ts

    def _values(self, record: Any, where: str, metric: MetricMap, ts: int) -> Iterator[Reading]:
        found = list(_walk(record, metric.path, (), where))
        if not found and not metric.optional:
            raise Unmappable(f"{_join(where, _show(metric.path))}: matches nothing")
        for path, keys, raw in found:
            if raw is None and metric.optional:
                continue
            name = _PLACEHOLDER.sub(_filler(keys), metric.name)
            if not is_name(name):
                raise Unmappable(f"{path}: metric name {name!r} {NAME_RULE}")
            try:
                value = _number(raw) * metric.scale + metric.offset
            except ValueError as e:
                raise Unmappable(f"{path}: {e}") from None
            if not math.isfinite(value):
                raise Unmappable(f"{path}: is out of range once scaled")
            yield Reading(name, ts, value)


def _show(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _join(where: str, path: str) -> str:
    return f"{where}.{path}" if where else path


def _at(doc: Any, path: tuple[str, ...], where: str) -> Any:
    """The value at a path without wildcards, or Unmappable naming the first missing step."""
    current = doc
    for i, key in enumerate(path):
        if isinstance(current, dict) and key in current:
            current = current[key]
        elif isinstance(current, list) and key.isdigit() and int(key) < len(current):
            current = current[int(key)]
        else:
            raise Unmappable(f"{_join(where, _show(path[: i + 1]))}: missing")
    return current


def _filler(keys: tuple[str, ...]) -> Callable[[re.Match[str]], str]:
    """Fills a metric name's {N} with the key the N-th wildcard matched."""
    return lambda m: keys[int(m.group(1)) - 1]


def _walk(
    doc: Any, path: tuple[str, ...], keys: tuple[str, ...], where: str
) -> Iterator[tuple[str, tuple[str, ...], Any]]:
    """(path shown, keys the wildcards matched, value) for every match of a path."""
    if not path:
        yield where, keys, doc
        return
    key, rest = path[0], path[1:]
    if key == "*":
        if isinstance(doc, dict):
            for k, v in doc.items():
                yield from _walk(v, rest, (*keys, str(k)), _join(where, str(k)))
        elif isinstance(doc, list):
            for i, v in enumerate(doc):
                yield from _walk(v, rest, (*keys, str(i)), f"{where}[{i}]")
        return
    if isinstance(doc, dict) and key in doc:
        yield from _walk(doc[key], rest, keys, _join(where, key))
    elif isinstance(doc, list) and key.isdigit() and int(key) < len(doc):
        yield from _walk(doc[int(key)], rest, keys, f"{where}[{key}]")


def _number(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError("must be a number, not true or false")
    if isinstance(raw, (int, float)):
        number = float(raw)
    elif isinstance(raw, str):
        try:
            number = float(raw.strip())
        except ValueError:
            raise ValueError(f"{raw[:40]!r} is not a number") from None
    else:
        raise ValueError(f"must be a number, not {type(raw).__name__ if raw is not None else 'null'}")
    if not math.isfinite(number):
        raise ValueError("must be finite")
    return number


def parse_time(raw: Any, fmt: str, zone: str | None) -> int:
    """A vendor's time → microseconds since the epoch; ValueError says what is wrong."""
    if fmt in ("epoch_s", "epoch_ms"):
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ValueError(f"is not a number of {'seconds' if fmt == 'epoch_s' else 'milliseconds'}")
        try:
            number = float(raw)
        except ValueError:
            raise ValueError("is not a number") from None
        if not math.isfinite(number) or abs(number) > 1e15:
            raise ValueError("is out of range")
        return round(number * (1_000_000 if fmt == "epoch_s" else 1000))
    if not isinstance(raw, str):
        raise ValueError("is not text")
    if fmt == "rfc3339":
        return parse_rfc3339(raw)
    try:
        parsed = datetime.datetime.strptime(raw.strip(), fmt)
    except ValueError:
        raise ValueError(f"does not match {fmt!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_zone(zone) if zone else datetime.timezone.utc)
    return (parsed - EPOCH) // ONE_US


def _zone(name: str) -> datetime.tzinfo:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"time zone {name!r} is not known") from None


# -- the config file --------------------------------------------------------


def _path(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, str) or not value or any(not part for part in value.split(".")):
        raise DeviceTypeError(f"{where}: {value!r} is not a dotted path like Sensors.OilTemp.Value")
    return tuple(value.split("."))


def device_type_from_table(name: str, table: Any, parse_age: Any) -> DeviceType:
    """One [device_types.NAME] table → DeviceType, or DeviceTypeError naming the key."""
    where = f"[device_types.{name}]"
    if not is_name(name):
        raise DeviceTypeError(f"{where}: the name {NAME_RULE}")
    if not isinstance(table, dict):
        raise DeviceTypeError(f"{where}: must be a table")
    known = {"device", "records", "timestamp", "timestamp_format", "timezone", "expected_interval", "metrics"}
    try:
        known_keys(table, known)
    except ValueError as e:
        raise DeviceTypeError(f"{where}: {e}") from None
    if "timestamp" not in table:
        raise DeviceTypeError(f"{where}: timestamp is missing (the path of each record's time)")
    fmt = table.get("timestamp_format", "rfc3339")
    if not isinstance(fmt, str) or not fmt:
        raise DeviceTypeError(f"{where}.timestamp_format: {fmt!r} is not a format")
    zone = table.get("timezone")
    if zone is not None:
        if not isinstance(zone, str):
            raise DeviceTypeError(f"{where}.timezone: {zone!r} is not a time zone name")
        try:
            _zone(zone)
        except ValueError as e:
            raise DeviceTypeError(f"{where}.timezone: {e}") from None
    if fmt not in FORMATS:
        if "%" not in fmt:
            raise DeviceTypeError(
                f"{where}.timestamp_format: {fmt!r} is none of {', '.join(FORMATS)} and not a strptime pattern"
            )
        if "%z" not in fmt and zone is None:
            raise DeviceTypeError(f"{where}.timezone: needed, because {fmt!r} has no %z")
    metrics = table.get("metrics")
    if not isinstance(metrics, list) or not metrics:
        raise DeviceTypeError(f"{where}.metrics: give a list of {{ path = ..., name = ... }} tables")
    maps = []
    for i, item in enumerate(metrics):
        at = f"{where}.metrics[{i}]"
        if not isinstance(item, dict):
            raise DeviceTypeError(f'{at}: must be a table like {{ path = "Sensors.OilTemp", name = "oil_temp" }}')
        try:
            known_keys(item, ("path", "name", "scale", "offset", "optional"))
        except ValueError as e:
            raise DeviceTypeError(f"{at}: {e}") from None
        path = _path(item.get("path"), f"{at}.path")
        stars = path.count("*")
        default = "_".join(f"{{{n + 1}}}" for n in range(stars)) if stars else path[-1]
        metric_name = item.get("name", default)
        if not isinstance(metric_name, str):
            raise DeviceTypeError(f"{at}.name: {metric_name!r} is not text")
        for number in _PLACEHOLDER.findall(metric_name):
            if not 1 <= int(number) <= stars:
                raise DeviceTypeError(f"{at}.name: {{{number}}} names no '*' of the path ({stars} in it)")
        if not stars and not is_name(metric_name):
            raise DeviceTypeError(f"{at}.name: {metric_name!r} {NAME_RULE}")
        optional = item.get("optional", False)
        if not isinstance(optional, bool):
            raise DeviceTypeError(f"{at}.optional: {optional!r} is not true or false")
        maps.append(
            MetricMap(
                path,
                metric_name,
                table_number(item, "scale", at, DeviceTypeError, 1.0) or 0.0,
                table_number(item, "offset", at, DeviceTypeError, 0.0) or 0.0,
                optional,
            )
        )
    interval = table.get("expected_interval")
    if interval is not None:
        try:
            interval = parse_age(interval)
        except ValueError as e:
            raise DeviceTypeError(f"{where}.expected_interval: {e}") from None
    return DeviceType(
        name=name,
        timestamp=_path(table["timestamp"], f"{where}.timestamp"),
        timestamp_format=fmt,
        metrics=tuple(maps),
        timezone=zone,
        records=_path(table["records"], f"{where}.records") if "records" in table else None,
        device=_path(table["device"], f"{where}.device") if "device" in table else None,
        expected_interval=interval,
    )
