"""
The JSON lines of an upload batch, as the ledger writes them
(``{"device":…,"metric":…,"ts":…,…}``), read quickly: a line's device and
metric off its head, and a batch's lines grouped by device in order. Sinks
that route by device (Kinesis partition keys, AMQP routing keys) use them.
"""

from __future__ import annotations

import json

_DEVICE = b'{"device":"'
_METRIC = b',"metric":"'


def names(line: bytes) -> tuple[str, str]:
    """A line's device and metric: read off its head (the ledger writes them first), else parsed as JSON."""
    if line.startswith(_DEVICE):
        end = line.find(b'"', len(_DEVICE))
        if line.startswith(_METRIC, end + 1):
            start = end + 1 + len(_METRIC)
            stop = line.find(b'"', start)
            device, metric = line[len(_DEVICE) : end], line[start:stop]
            if stop > 0 and b"\\" not in device and b"\\" not in metric:  # no escapes: the text is the name
                return device.decode(), metric.decode()
    doc = json.loads(line)
    return doc["device"], doc["metric"]


def by_device(text: bytes) -> dict[str, list[bytes]]:
    """A batch's lines (without their newlines) by device, each device's in order, devices as they first come."""
    grouped: dict[bytes, list[bytes]] = {}
    for line in text.splitlines():
        # The device's name as the line's head writes it (the ledger puts it first; names have no escapes).
        end = line.find(b'"', len(_DEVICE)) if line.startswith(_DEVICE) else -1
        head = line[len(_DEVICE) : end] if end > 0 else b"\\"
        if b"\\" in head:
            head = names(line)[0].encode()
        lines = grouped.get(head)
        if lines is None:
            lines = grouped[head] = []
        lines.append(line)
    return {name.decode(): lines for name, lines in grouped.items()}
