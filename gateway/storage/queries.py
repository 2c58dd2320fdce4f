"""
SQL that more than one part of the gateway writes: the store's batch
statement and ``gatewayctl quarantine release`` both move the twin; the
read API and ``gatewayctl quarantine list`` both show quarantined readings.
One text each, so they cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from gateway.readings import format_ts
from gateway.storage.cold import already_cold


def twin_upsert(rows: str, order: str = "") -> str:
    """
    The twin's newer-only upsert from ``rows`` (a CTE with device_id, metric,
    ts, value): the latest of each (device, metric) replaces the stored one
    only when it is newer, so a late reading never moves the twin back,
    whichever gateway stores it. ``order`` breaks ties between equal times.
    """
    tie = f", {order}" if order else ""
    return f"""INSERT INTO twin AS t (device_id, metric, ts, value)
    SELECT DISTINCT ON (device_id, metric) device_id, metric, ts, value FROM {rows}
    ORDER BY device_id, metric, ts DESC{tie}
    ON CONFLICT (device_id, metric) DO UPDATE SET ts = EXCLUDED.ts, value = EXCLUDED.value, updated_at = now()
    WHERE t.ts < EXCLUDED.ts"""


def add_metrics(names: str) -> str:
    """
    Add to the metric dictionary the names of ``names`` (SQL giving one text
    column) it does not hold yet: committed before the readings that name
    them are stored, in name order, so that gateways adding the same new
    names at once never deadlock.
    """
    return f"""INSERT INTO metrics (name)
SELECT DISTINCT s.n FROM ({names}) AS s(n) WHERE NOT EXISTS (SELECT 1 FROM metrics k WHERE k.name = s.n)
ORDER BY s.n
ON CONFLICT (name) DO NOTHING"""


ADD_METRICS = add_metrics("SELECT unnest(%s::text[])")


# A quarantined reading as the API and the command line show it (quarantined_doc).
QUARANTINE_COLUMNS = """q.id, d.name, q.metric, (extract(epoch FROM q.ts) * 1000000)::bigint, q.value, q.rule,
       q.source, (extract(epoch FROM q.received_at) * 1000000)::bigint"""

QUARANTINE_WHERE = """
FROM quarantine q JOIN devices d ON d.id = q.device_id
WHERE (%(ids)s::bigint[] IS NULL OR q.id = ANY(%(ids)s))
  AND (%(device)s::text IS NULL OR d.name = %(device)s)
  AND (%(rule)s::text IS NULL OR q.rule LIKE %(rule)s || '%%')
"""

# Released readings go where they would have gone: into readings (once each),
# into the twin if newer, and so to the sinks, in one transaction with their removal.
# At most RELEASE_CHUNK of them a transaction (the lowest ids first), so that no
# transaction stores more readings than a group commit does: the uploader sorts
# the readings of the transaction its cursor is in.
RELEASE_CHUNK = 5000
# Run before each RELEASE, with the same parameters: the released readings' metric names in the dictionary.
RELEASE_METRICS = add_metrics(f"SELECT q.metric {QUARANTINE_WHERE}")
RELEASE = f"""
WITH moved AS (
    DELETE FROM quarantine q USING devices d
    WHERE d.id = q.device_id AND q.id IN (SELECT q.id {QUARANTINE_WHERE} ORDER BY q.id LIMIT {RELEASE_CHUNK})
    RETURNING q.device_id, q.metric, q.ts, q.value
), stored AS (
    INSERT INTO readings (device_id, metric_id, ts, value)
    SELECT moved.device_id, k.id, moved.ts, moved.value FROM moved LEFT JOIN metrics k ON k.name = moved.metric
    WHERE NOT {already_cold("moved")} ORDER BY moved.device_id, k.id, moved.ts
    ON CONFLICT (device_id, metric_id, ts) DO NOTHING
    RETURNING 1
), latest AS (
    {twin_upsert("moved")}
)
SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM stored)
"""


def quarantined_doc(row: tuple) -> dict[str, Any]:
    """A row of QUARANTINE_COLUMNS as the API and ``gatewayctl quarantine list --json`` show it."""
    id_, device, metric, ts, value, rule, source, received = row
    return {
        "id": id_,
        "device": device,
        "metric": metric,
        "ts": format_ts(ts),
        "value": value,
        "rule": rule,
        "source": source,
        "received_at": format_ts(received),
    }
