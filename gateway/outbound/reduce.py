"""
Edge reduction: what a sink with ``[[sink.reduce]]`` rules sends instead
of every reading. Pure functions of the readings of one batch (in upload
order) and the deadband state left by the batches before it, so the
uploader can run them inside the transaction that cuts the batch and
store the state with it.

- deadband: a reading is sent when its value moved by more than the
  deadband from the last value sent for that device and metric, or when
  ``heartbeat`` seconds of device time have passed since then, or when it
  is the first one;
- aggregate: one line per device, metric and interval of ``aggregate``
  seconds (by the readings' own timestamps) with min, max, mean and count.
  Aggregates are made per batch: readings of one interval that arrive in
  two batches give two lines for that interval, which the receiver merges
  (count-weighted mean).

Metrics that match no rule are sent as they are.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass

from gateway.deadband import worth_keeping
from gateway.readings import EPOCH
from gateway.outbound.sinks import Sink

_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


@dataclass(frozen=True)
class Row:
    device_id: int
    device: str
    metric: str
    ts_us: int
    value: float
    received_us: int


# (device_id, metric) -> (value, ts_us) of the last reading sent
State = dict[tuple[int, str], tuple[float, int]]


def wire_ts(ts_us: int) -> str:
    """RFC 3339 in UTC with microseconds, as uploaded lines carry it."""
    dt = EPOCH + datetime.timedelta(microseconds=ts_us)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def raw_line(row: Row) -> str:
    return _ENCODE(
        {
            "device": row.device,
            "metric": row.metric,
            "ts": wire_ts(row.ts_us),
            "value": row.value,
            "received_at": wire_ts(row.received_us),
        }
    )


def reduce_rows(sink: Sink, rows: list[Row], state: State) -> tuple[list[str], State]:
    """The lines to send for ``rows`` and the deadband state after them."""
    state = dict(state)
    lines: list[str] = []
    groups: dict[tuple[str, str, int], list[Row]] = {}
    group_order: list[tuple[tuple[str, str, int], float]] = []
    for row in rows:
        rule = sink.rule_for(row.metric)
        if rule is None:
            lines.append(raw_line(row))
        elif rule.aggregate is not None:
            width = int(rule.aggregate * 1_000_000)
            key = (row.device, row.metric, row.ts_us // width)
            if key not in groups:
                groups[key] = []
                group_order.append((key, rule.aggregate))
            groups[key].append(row)
        else:
            assert rule.deadband is not None
            if worth_keeping(
                row.value, row.ts_us, state.get((row.device_id, row.metric)), rule.deadband, rule.heartbeat
            ):
                lines.append(raw_line(row))
                state[(row.device_id, row.metric)] = (row.value, row.ts_us)
    for key, interval in group_order:
        members = groups[key]
        values = [r.value for r in members]
        width = int(interval * 1_000_000)
        lines.append(
            _ENCODE(
                {
                    "device": key[0],
                    "metric": key[1],
                    "ts": wire_ts(key[2] * width),
                    "interval": interval,
                    "count": len(values),
                    "min": min(values),
                    "max": max(values),
                    "mean": sum(values) / len(values),
                    "received_at": wire_ts(max(r.received_us for r in members)),
                }
            )
        )
    return lines, state
