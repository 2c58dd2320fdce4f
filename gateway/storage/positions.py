"""
Positions in the upload order (transaction, device, metric, time) as SQL and
parameters, and how far every sink has sent: what the uploader's ledger and
retention use, and the cold tier, which folds only what every sink has.
"""

from __future__ import annotations

from typing import Any

PLACE = "(r.tx, r.device_id, r.metric_id, r.ts)"


def at(name: str) -> str:
    """The position held in the parameters ``{name}_tx``, ``_device``, ``_metric`` and ``_ts``, as SQL."""
    return (
        f"(%({name}_tx)s::bigint, %({name}_device)s::integer, %({name}_metric)s::integer, %({name}_ts)s::timestamptz)"
    )


def params(name: str, position: tuple[Any, Any, Any, Any]) -> dict[str, Any]:
    """A position as the parameters that ``at(name)`` reads."""
    return dict(zip((f"{name}_tx", f"{name}_device", f"{name}_metric", f"{name}_ts"), position))


def position(row: tuple) -> tuple[int, int, int, str]:
    """A position from four columns (tx, device_id, metric_id, ts::text)."""
    return (int(row[0]), int(row[1]), int(row[2]), row[3])


# The first position any sink has yet to send from: its cursor, or the start of a batch still in flight.
UPLOADED_FRONTIER = """
SELECT tx, device_id, metric_id, ts::text FROM (
    SELECT cursor_tx AS tx, cursor_device AS device_id, cursor_metric AS metric_id, cursor_ts AS ts FROM upload_sinks
    UNION ALL SELECT after_tx, after_device, after_metric, after_ts FROM upload_batches
) f ORDER BY tx, device_id, metric_id, ts LIMIT 1
"""
UNSENT_IN = f"EXISTS (SELECT 1 FROM {{name}} r WHERE r.tx >= %(sent_tx)s AND {PLACE} > {at('sent')})"
