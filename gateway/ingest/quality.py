"""
Quality rules: which readings are believed. A reading that parses but
fails a rule is not stored as a reading, not shown in the twin and not
uploaded: it is kept in the quarantine table with the rule it failed,
until an admin releases it (``gatewayctl quarantine release``).

    [quality]
    max_future = "1h"      # time stamps further ahead of the gateway's clock [default: 1d]
    max_past = "30d"       # or further behind it, a clock reset to 2000-01-01 [default: 3650d]
    flag_failures = 10     # a device with this many failures...
    flag_window = "1h"     # ...within this window is flagged until it behaves

    [quality.latitude]
    min = -90
    max = 90

A failure is a quarantined reading or a refused input of the device; the
flag is worked out from the database, so every gateway sharing it agrees,
and it clears by itself once the window holds fewer failures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Sequence

from gateway.readings import MAX_TS_US, MIN_TS_US, NAME_RULE, Quarantined, Reading, format_ts, is_name
from gateway.tables import known_keys, table_number

_SETTINGS = ("max_future", "max_past", "flag_failures", "flag_window")


class QualityError(Exception):
    """The [quality] table is wrong; the message names the key."""


@dataclass(frozen=True)
class Range:
    metric: str
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class QualityRules:
    ranges: tuple[Range, ...] = ()
    # The defaults catch a clock reset (to 2000-01-01 or 1970) without refusing weeks of
    # readings a device buffered while out of coverage; tighten them for your fleet.
    max_future: float | None = 86400.0
    max_past: float | None = 3650 * 86400.0
    flag_failures: int = 10
    flag_window: float = 3600.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_metric", {r.metric: r for r in self.ranges})

    def failed(self, reading: Reading, now_us: int) -> str | None:
        """The rule a reading (metric, µs, value) fails, as shown to people, or None."""
        metric, ts_us, value = reading
        if self.max_future is not None and ts_us > now_us + self.max_future * 1_000_000:
            return f"max_future: {format_ts(ts_us)} is over {_age(self.max_future)} ahead of the gateway"
        if self.max_past is not None and ts_us < now_us - self.max_past * 1_000_000:
            return f"max_past: {format_ts(ts_us)} is over {_age(self.max_past)} old"
        bounds = self._by_metric.get(metric)  # type: ignore[attr-defined]
        if bounds is not None:
            if bounds.min is not None and value < bounds.min:
                return f"{metric}.min: {value:g} is below {bounds.min:g}"
            if bounds.max is not None and value > bounds.max:
                return f"{metric}.max: {value:g} is above {bounds.max:g}"
        return None

    def split(self, readings: Sequence[Reading], now: float) -> tuple[Sequence[Reading], list[Quarantined]]:
        """(readings that pass, those that fail with their rule); the input itself when all pass."""
        now_us = int(now * 1_000_000)
        # On the hot path: one cheap pass finds the readings worth a closer look.
        lo = now_us - int(self.max_past * 1_000_000) if self.max_past is not None else MIN_TS_US
        hi = now_us + int(self.max_future * 1_000_000) if self.max_future is not None else MAX_TS_US
        ranged = self._by_metric  # type: ignore[attr-defined]
        suspects = [i for i, r in enumerate(readings) if not lo <= r[1] <= hi or r[0] in ranged]
        bad = []
        for i in suspects:
            rule = self.failed(readings[i], now_us)
            if rule is not None:
                bad.append(Quarantined(i, Reading(*readings[i]), rule))
        if not bad:
            return readings, bad
        skip = {q.index for q in bad}
        return [r for i, r in enumerate(readings) if i not in skip], bad


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def rules_from_table(table: Any, parse_age: Callable[[Any], float]) -> QualityRules:
    """The [quality] table → QualityRules, or QualityError naming the key."""
    if not isinstance(table, dict):
        raise QualityError("[quality]: must be a table")
    values: dict[str, Any] = {}
    ranges = []
    for key, value in table.items():
        if isinstance(value, dict):
            where = f"[quality.{key}]"
            if not is_name(key):
                raise QualityError(f"{where}: the metric name {NAME_RULE}")
            try:
                known_keys(value, ("min", "max"))
            except ValueError as e:
                raise QualityError(f"{where}: {e}") from None
            low, high = table_number(value, "min", where, QualityError), table_number(value, "max", where, QualityError)
            if low is None and high is None:
                raise QualityError(f"{where}: give min, max or both")
            if low is not None and high is not None and low > high:
                raise QualityError(f"{where}: min {low:g} is above max {high:g}")
            ranges.append(Range(key, low, high))
        elif key in ("max_future", "max_past"):
            if value in ("off", False):
                values[key] = None
                continue
            try:
                values[key] = parse_age(value)
            except ValueError as e:
                raise QualityError(f'[quality].{key}: {e} (or "off")') from None
        elif key == "flag_window":
            try:
                values[key] = parse_age(value)
            except ValueError as e:
                raise QualityError(f"[quality].{key}: {e}") from None
        elif key == "flag_failures":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QualityError(f"[quality].flag_failures: {value!r} is not a whole number of at least 1")
            values[key] = value
        else:
            try:
                known_keys((key,), _SETTINGS, "; a metric's range is a table")
            except ValueError as e:
                raise QualityError(f"[quality]: {e}") from None
    return QualityRules(ranges=tuple(ranges), **values)
