"""
What the upload tables say of each sink, as SQL: its cursor, batches and lag
(the uploader watches it; the read API and ``gatewayctl upload`` show it), and the
retry of parked batches. Storage's, so that what shows the sinks needs no uploader.
"""

from __future__ import annotations

from typing import Any


from gateway.readings import epoch_us, format_ts
from gateway.storage.positions import PLACE


# How long the oldest reading not yet sent to the sink (after its cursor or in a batch in flight) has waited.
def first_unsent(tx: str, device: str, metric: str, ts: str) -> str:
    """SQL: the transaction of the first reading after a position (given as four SQL expressions), if any."""
    return f"""CASE WHEN EXISTS (SELECT 1 FROM readings r
                             WHERE r.tx = {tx} AND {PLACE} > ({tx}, {device}, {metric}, {ts}))
                THEN {tx} ELSE (SELECT min(a.tx) FROM readings_arrivals a WHERE a.tx > {tx}) END"""


_LAG = f"""coalesce(extract(epoch FROM now() - (
           SELECT min(a.received_at) FROM (
               SELECT {first_unsent("s.cursor_tx", "s.cursor_device", "s.cursor_metric", "s.cursor_ts")} AS tx
               UNION ALL
               SELECT {first_unsent("b.after_tx", "b.after_device", "b.after_metric", "b.after_ts")}
               FROM upload_batches b WHERE b.sink = s.name AND b.state = 'pending'
           ) f JOIN readings_arrivals a ON a.tx = f.tx))::float8, 0)"""


_BATCHES = """(SELECT count(*) FROM upload_batches b WHERE b.sink = s.name AND b.state = '{state}')"""


def status_sql(count_at_most: int | None = None) -> str:
    """
    Every sink's cursor, batches and lag (STATUS_FIELDS). ``count_at_most`` bounds the count of readings
    not yet in a batch, for a caller that asks every few seconds (a backlog of millions is counted once).
    """
    # What is left of the cursor's transaction, and the count of every transaction after it.
    bound = f" LIMIT {int(count_at_most)}" if count_at_most is not None else ""
    unsent = f"""(SELECT count(*) FROM readings r
        WHERE r.tx = s.cursor_tx AND {PLACE} > (s.cursor_tx, s.cursor_device, s.cursor_metric, s.cursor_ts))
      + (SELECT coalesce(sum(u.readings), 0) FROM (
            SELECT a.readings FROM readings_arrivals a WHERE a.tx > s.cursor_tx ORDER BY a.tx{bound}) u)"""
    if count_at_most is not None:
        unsent = f"least({unsent}, {int(count_at_most)})"
    return f"""
SELECT s.name, s.url, s.cursor_tx::text, s.cursor_device || '/' || s.cursor_metric || '/' || s.cursor_ts,
       s.batches_sent, s.readings_sent, s.failures,
       s.last_sent_at, s.last_error, s.last_error_at,
       {_BATCHES.format(state="pending")},
       (SELECT coalesce(sum(b.readings), 0) FROM upload_batches b WHERE b.sink = s.name AND b.state = 'pending'),
       {_BATCHES.format(state="parked")},
       (SELECT coalesce(sum(b.readings), 0) FROM upload_batches b WHERE b.sink = s.name AND b.state = 'parked'),
       ({unsent})::bigint,
       {_LAG},
       CASE WHEN isfinite(s.cursor_ts) THEN (extract(epoch FROM s.cursor_ts) * 1000000)::bigint END
FROM upload_sinks s ORDER BY s.name
"""


STATUS = status_sql()


# What the running gateway watches (every few seconds): only index lookups, no counting of readings.
LIVE_STATUS = f"""
SELECT s.name, {_LAG}, extract(epoch FROM now() - s.last_sent_at)::float8,
       {_BATCHES.format(state="pending")}, {_BATCHES.format(state="parked")},
       s.batches_sent, s.readings_sent, s.failures
FROM upload_sinks s WHERE s.name = ANY(%s)
"""


LIVE_FIELDS = (
    "lag_seconds",
    "idle_seconds",
    "pending_batches",
    "parked_batches",
    "batches_sent_all",
    "readings_sent_all",
    "failures_all",
)


STATUS_FIELDS = (
    "name",
    "url",
    "cursor_tx",
    "cursor_key",
    "batches_sent",
    "readings_sent",
    "failures",
    "last_sent_at",
    "last_error",
    "last_error_at",
    "pending_batches",
    "pending_readings",
    "parked_batches",
    "parked_readings",
    "unbatched_readings",
    "lag_seconds",
    "cursor_time",
)


def sink_doc(status: dict[str, Any]) -> dict[str, Any]:
    """A sink's STATUS_FIELDS as JSON shows them (``gatewayctl upload status --json``, ``GET /v1/sinks``)."""
    doc = dict(status)
    for key in ("last_sent_at", "last_error_at"):
        doc[key] = format_ts(epoch_us(doc[key])) if doc[key] is not None else None
    # The time of the last reading sent, RFC 3339 in UTC; None before the first (and past the last of a sink
    # that starts at the end).
    doc["cursor_time"] = format_ts(doc["cursor_time"]) if doc["cursor_time"] is not None else None
    doc["lag_readings"] = doc["unbatched_readings"] + doc["pending_readings"]
    return doc


RETRY_DEAD = """
UPDATE upload_batches SET state = 'pending', owner = NULL, lease_until = now(), attempts = 0, parked_at = NULL
WHERE sink = %s AND state = 'parked'
"""
