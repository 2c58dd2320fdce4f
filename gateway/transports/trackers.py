"""
What a tracker's records become: positions and IO elements as readings.

Each record's GPS element becomes the readings ``lat``, ``lon`` (degrees),
``alt`` (m), ``speed`` (km/h), ``heading`` (degrees) and ``satellites``,
timed with the record's own time, when the tracker had a fix (satellites in
view and not 0°N 0°E: a tracker without a fix sends that, and it is never
stored as a position). IO elements become readings by the tracker's model:
``[tracker_types.NAME]`` tables map an IO id to a metric, with scale and
offset, as ``[device_types]`` map vendor JSON::

    [tracker_types.fmb920]
    66 = { metric = "external_voltage", scale = 0.001 }   # mV -> V
    16 = "odometer_m"

An IO id with no mapping is stored as ``io_<id>``, so nothing is lost; a
variable-length IO value (Codec 8 Extended's NX) is stored as an unsigned
number when it is at most 8 bytes, and otherwise left in the raw packet
(counted as not stored). A device gets its model with ``gatewayctl device
add NAME --imei IMEI --type fmb920``.

The built-in tables (``BUILT_IN``) are from Teltonika's published "AVL ID"
lists for the FMB920 and the FMC130 (Teltonika Wiki, "FMB920 Teltonika
Data Sending Parameters ID" and "FMC130 Teltonika Data Sending Parameters
ID"), the IO elements those models send unless configured otherwise; a
config-file table of the same name replaces a built-in one.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.readings import NAME_RULE, Quarantined, Reading, check_reading, format_ts, is_name

POSITION_METRICS = ("lat", "lon", "alt", "speed", "heading", "satellites")


@dataclass(frozen=True)
class IoMetric:
    metric: str
    scale: float = 1.0
    offset: float = 0.0


TrackerType = Mapping[int, IoMetric]

# IO ids both models send by default, and those of the FMC130's extra inputs.
_COMMON: dict[int, IoMetric] = {
    239: IoMetric("ignition"),
    240: IoMetric("movement"),
    80: IoMetric("data_mode"),
    21: IoMetric("gsm_signal"),
    200: IoMetric("sleep_mode"),
    69: IoMetric("gnss_status"),
    181: IoMetric("gnss_pdop", 0.1),
    182: IoMetric("gnss_hdop", 0.1),
    66: IoMetric("external_voltage", 0.001),  # mV -> V
    24: IoMetric("speed_io"),  # km/h, the GNSS speed as an IO element
    205: IoMetric("gsm_cell_id"),
    206: IoMetric("gsm_area_code"),
    67: IoMetric("battery_voltage", 0.001),  # mV -> V
    68: IoMetric("battery_current", 0.001),  # mA -> A
    241: IoMetric("active_gsm_operator"),
    199: IoMetric("trip_odometer_m"),
    16: IoMetric("odometer_m"),
    1: IoMetric("digital_input_1"),
    179: IoMetric("digital_output_1"),
    12: IoMetric("fuel_used_gps", 0.001),  # ml -> l
    13: IoMetric("fuel_rate_gps", 0.01),  # l/100 km
    17: IoMetric("axis_x_mg"),
    18: IoMetric("axis_y_mg"),
    19: IoMetric("axis_z_mg"),
    113: IoMetric("battery_level_percent"),
    78: IoMetric("ibutton"),
}
BUILT_IN: dict[str, TrackerType] = {
    "fmb920": dict(_COMMON),
    "fmc130": {
        **_COMMON,
        2: IoMetric("digital_input_2"),
        3: IoMetric("digital_input_3"),
        9: IoMetric("analog_input_1", 0.001),  # mV -> V
        6: IoMetric("analog_input_2", 0.001),
        180: IoMetric("digital_output_2"),
        72: IoMetric("dallas_temperature_1", 0.1),  # 0.1 °C
    },
}


def tracker_types_from_tables(tables: Any) -> dict[str, TrackerType]:
    """``[tracker_types.NAME]`` tables over the built-in ones; ValueError naming the table and the id."""
    if tables is None:
        return dict(BUILT_IN)
    if not isinstance(tables, dict):
        raise ValueError("give each model as a [tracker_types.NAME] table")
    out = dict(BUILT_IN)
    for name, table in tables.items():
        where = f"[tracker_types.{name}]"
        if not is_name(name):
            raise ValueError(f"{where}: the name {NAME_RULE}")
        if not isinstance(table, dict):
            raise ValueError(f'{where}: give IO ids as keys: 66 = {{ metric = "external_voltage", scale = 0.001 }}')
        mapping: dict[int, IoMetric] = {}
        for key, value in table.items():
            if not str(key).isdigit() or not 0 <= int(key) <= 0xFFFF:
                raise ValueError(f"{where}: {key!r} is not an IO id (0..65535)")
            if isinstance(value, str):
                value = {"metric": value}
            if not isinstance(value, dict) or not set(value) <= {"metric", "scale", "offset"}:
                raise ValueError(f"{where}.{key}: give a metric name, or {{ metric, scale, offset }}")
            metric = value.get("metric")
            if not is_name(metric):
                raise ValueError(f"{where}.{key}.metric: {NAME_RULE}")
            numbers = {}
            for k in ("scale", "offset"):
                if k in value:
                    if isinstance(value[k], bool) or not isinstance(value[k], (int, float)):
                        raise ValueError(f"{where}.{key}.{k}: {value[k]!r} is not a number")
                    numbers[k] = float(value[k])
            mapping[int(key)] = IoMetric(metric, **numbers)
        out[name] = mapping
    return out


def record_readings(
    timestamp_ms: int,
    gps: Any,
    io: tuple[tuple[int, int | bytes], ...],
    model: TrackerType | None,
    jump: Any = lambda ts_us, lat, lon: None,
) -> tuple[list[Reading], list[tuple[Reading, str]], int]:
    """A record's readings; its position's readings held back by ``jump`` (which names the rule they failed,
    or None), each with the rule; and how many of its IO values could not be stored (too long to be a
    number)."""
    ts_us = timestamp_ms * 1000
    out: list[Reading] = []
    held: list[tuple[Reading, str]] = []
    if gps.fixed:
        position = [
            check_reading(metric, ts_us, float(value), metric)
            for metric, value in zip(
                POSITION_METRICS, (gps.latitude, gps.longitude, gps.altitude, gps.speed, gps.angle, gps.satellites)
            )
        ]
        rule = jump(ts_us, gps.latitude, gps.longitude)
        if rule:
            held += [(r, rule) for r in position]
        else:
            out += position
    skipped = 0
    for io_id, raw in io:
        if isinstance(raw, bytes):
            if len(raw) > 8:
                skipped += 1
                continue
            raw = int.from_bytes(raw, "big")
        mapped = model.get(io_id) if model is not None else None
        if mapped is None:
            out.append(Reading(f"io_{io_id}", ts_us, float(raw)))
        else:
            out.append(Reading(mapped.metric, ts_us, raw * mapped.scale + mapped.offset))
    return out, held, skipped


def outside_networks(device: Any, imei: str) -> str:
    """Why a tracker from outside its device's ranges (gatewayctl device set --allow) is refused."""
    ranges = ", ".join(str(n) for n in device.networks)
    return f"IMEI {imei} is {device.name}'s, which may connect only from {ranges} (gatewayctl device set --allow)"


EARTH_KM = 6371.0088  # the mean radius


def speed_kmh(a: tuple[int, float, float], b: tuple[int, float, float]) -> float:
    """The speed between two fixes (µs, lat, lon): great-circle distance over the time between them."""
    (t1, lat1, lon1), (t2, lat2, lon2) = a, b
    p1, p2 = math.radians(lat1), math.radians(lat2)
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    km = 2 * EARTH_KM * math.asin(min(1.0, math.sqrt(h)))
    hours = abs(t2 - t1) / 3.6e9
    if hours == 0:
        return 0.0 if km < 0.001 else math.inf
    return km / hours


def max_speed(value: Any) -> float | None:
    """--tracker-max-speed: km/h, or off."""
    if str(value).strip().lower() == "off":
        return None
    try:
        kmh = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a speed in km/h (or off)") from None
    if not 1 <= kmh <= 100_000:
        raise ValueError(f"{kmh:g} km/h is outside 1..100000")
    return kmh


class Jumps:
    """
    The impossible-jump rule: a fix that implies a speed above ``max_kmh`` from the device's last believed
    one is held in quarantine (GPS multipath, a fix from another continent). Two held fixes in a row that
    agree with each other are believed (the vehicle was moved: a ferry, a tow). Per gateway, in memory, for
    the devices seen lately.
    """

    SIZE = 100_000

    def __init__(self, max_kmh: float | None) -> None:
        self.max_kmh = max_kmh
        self._last: OrderedDict[str, tuple[int, float, float]] = OrderedDict()
        self._doubt: dict[str, tuple[int, float, float]] = {}

    def check(self, device: str, ts_us: int, lat: float, lon: float) -> str | None:
        """The rule's name when this fix is held, else None."""
        if self.max_kmh is None:
            return None
        here = (ts_us, lat, lon)
        last = self._last.get(device)
        if last is None or speed_kmh(last, here) <= self.max_kmh:
            self._believe(device, here)
            return None
        doubt = self._doubt.get(device)
        if doubt is not None and speed_kmh(doubt, here) <= self.max_kmh:
            self._believe(device, here)
            return None
        if len(self._doubt) >= self.SIZE:
            self._doubt.clear()
        self._doubt[device] = here
        kmh = speed_kmh(last, here)
        return f"jump: {kmh:.0f} km/h from the fix of {format_ts(last[0])} (more than {self.max_kmh:g})"

    def _believe(self, device: str, fix: tuple[int, float, float]) -> None:
        self._doubt.pop(device, None)
        self._last[device] = fix
        self._last.move_to_end(device)
        if len(self._last) > self.SIZE:
            self._last.popitem(last=False)


def held_back(held: Sequence[tuple[Reading, str]], first: int) -> list[Quarantined]:
    """Readings a tracker rule failed, as quarantine entries (indexes after the stored readings')."""
    return [Quarantined(first + i, r, rule) for i, (r, rule) in enumerate(held)]
