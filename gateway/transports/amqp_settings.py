"""
The settings of a RabbitMQ source: an ``[[amqp_source]]`` table of the config
file, checked at start (and at SIGHUP) so that a mistake stops the start with
one line naming the source and the key. See ``amqp_source.py``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.net.amqp import BROKER_KEYS, AmqpBroker, broker_from_table
from gateway.tables import checked_number, config_table

KEYS = BROKER_KEYS | {
    "name", "queue", "declare", "exchange", "routing-keys", "dead-letter-exchange", "prefetch", "format",
    "device-header", "device-routing-level", "device-field", "backoff", "backoff-cap", "stall",
}  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


class AmqpSourceError(ValueError):
    """An [[amqp_source]] table is wrong; the message says which key and how."""


@dataclass(frozen=True)
class AmqpSourceSettings:
    name: str
    broker: AmqpBroker
    queue: str
    declare: bool = False
    exchange: str | None = None
    routing_keys: tuple[str, ...] = ()
    dead_letter_exchange: str | None = None
    prefetch: int = 200
    format: str = "json"  # "json" | "number"
    device_header: str | None = "device"
    device_routing_level: int | None = None
    device_field: str | None = None
    backoff: float = 1.0
    backoff_cap: float = 60.0
    stall: float = 300.0

    def device_of(self, routing_key: str, headers: Mapping[str, Any] | None, body: bytes) -> str | None:
        """The message's device name, as this source names it; None when the message names none."""
        if self.device_routing_level is not None:
            words = routing_key.split(".")
            level = self.device_routing_level
            return words[level] if -len(words) <= level < len(words) and words[level] else None
        if self.device_field is not None:
            try:
                doc = json.loads(body)
            except ValueError:
                return None
            value = doc.get(self.device_field) if isinstance(doc, dict) else None
            return value if isinstance(value, str) and value else None
        value = (headers or {}).get(self.device_header or "")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return value if isinstance(value, str) and value else None


def source_from_table(table: Any, environ: Mapping[str, str] | None = None) -> AmqpSourceSettings:
    """An [[amqp_source]] table; AmqpSourceError names the source and the key."""
    environ = os.environ if environ is None else environ
    if not isinstance(table, dict):
        raise AmqpSourceError("[[amqp_source]]: not a table")
    label = f"[[amqp_source]] {table.get('name') or table.get('queue') or '?'!r}"
    try:
        table = config_table(table, KEYS, "; an AMQP source")
        broker = broker_from_table(table, environ)
        queue = table.get("queue")
        if not isinstance(queue, str) or not queue or len(queue.encode()) > 255:
            raise ValueError("queue: give the name of the queue to consume")
        name = table.get("name", queue)
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"name: {name!r}: letters, digits and _ . : - (64 at most)")
        fmt = table.get("format", "json")
        if fmt not in ("json", "number"):
            raise ValueError(f"format: {fmt!r} is not json (the gateway's body) or number (a bare number)")
        naming = [k for k in ("device-header", "device-routing-level", "device-field") if k in table]
        if len(naming) > 1:
            raise ValueError(f"{' and '.join(naming)}: the device is named one way; give one of them")
        header = table.get("device-header", "device" if not naming else None)
        level = table.get("device-routing-level")
        if level is not None and (not isinstance(level, int) or isinstance(level, bool) or not -32 <= level < 32):
            raise ValueError(f"device-routing-level: {level!r} is not a word's index in the routing key (0, 1, -1)")
        field_name = table.get("device-field")
        if field_name is not None and fmt == "number":
            raise ValueError("device-field: a bare number has no fields; name the device by a header or routing key")
        for key, value in (("device-header", header), ("device-field", field_name)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{key}: give a name")
        keys = table.get("routing-keys", [])
        if isinstance(keys, str):
            keys = [keys]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError("routing-keys: give a list of routing keys (patterns for a topic exchange)")
        exchange = table.get("exchange")
        declare = table.get("declare", False)
        if not isinstance(declare, bool):
            raise ValueError("declare: true or false")
        if (exchange is None) != (not keys) and declare:
            raise ValueError("exchange and routing-keys go together: the queue is bound to the exchange by each key")

        def number(key: str, lo: float, hi: float, default: float) -> Any:
            return checked_number(table.get(key, default), key, lo, hi)

        return AmqpSourceSettings(
            name=name,
            broker=broker,
            queue=queue,
            declare=declare,
            exchange=exchange,
            routing_keys=tuple(keys),
            dead_letter_exchange=table.get("dead-letter-exchange"),
            prefetch=int(number("prefetch", 1, 65535, 200)),
            format=fmt,
            device_header=header,
            device_routing_level=level,
            device_field=field_name,
            backoff=float(number("backoff", 0.01, 3600, 1.0)),
            backoff_cap=float(number("backoff-cap", 0.01, 86400, 60.0)),
            stall=float(number("stall", 1, 86400, 300.0)),
        )
    except ValueError as e:
        raise AmqpSourceError(f"{label}: {e}") from None
