"""
The store's writes as SQL and as data: the batch statement (prepared on each
connection), sessions, rejected input and quarantine, and how one transaction's
outcome is split back into each writer's WriteResult.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Sequence

from twisted.internet.defer import Deferred, FirstError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from gateway.storage.cold import HOUR_OF, already_cold, offset_of
from gateway.storage.queries import twin_upsert
from gateway.readings import (
    Quarantined,
    Reading,
    StoreRejected,
    WriteResult,
)


# The batch and the digital twin in one statement, so one transaction. The
# ordinal n makes both choices the same when a batch holds one key twice:
# the readings keep the first copy and the twin takes that copy too. The
# twin moves only forward in time, so a late reading never replaces a newer
# one, whichever gateway stores it.
def write_batch_sql(cold: bool = True) -> str:
    """The batch statement; ``cold``: skipping readings the cold tier holds (schema 10 on)."""
    kept = f"WHERE NOT {already_cold('u')} " if cold else ""
    return f"""
WITH u AS MATERIALIZED (
    SELECT d AS device_id, m AS metric, timestamptz 'epoch' + t * interval '1 microsecond' AS ts, v AS value, n
    FROM unnest(%s::integer[], %s::text[], %s::bigint[], %s::float8[]) WITH ORDINALITY AS u(d, m, t, v, n)
), new AS (
    INSERT INTO readings (device_id, metric_id, ts, value)
    SELECT u.device_id, k.id, u.ts, u.value FROM u LEFT JOIN metrics k ON k.name = u.metric
    {kept}ORDER BY u.device_id, k.id, u.ts, u.n
    ON CONFLICT (device_id, metric_id, ts) DO NOTHING
    RETURNING 1
), latest AS (
    {twin_upsert("u", order="n")}
)
SELECT count(*), pg_current_xact_id() FROM new
"""


WRITE_BATCH = write_batch_sql()


# The batch statement prepared once per connection: a batch then costs the database about a third less
# (no parsing or planning), most where batches are small. Behind a pooler that does not keep a session's
# prepared statements, the full statement is sent instead.
PREPARED_BATCH = "gateway_write_batch"


PREPARE_WRITE_BATCH = f"PREPARE {PREPARED_BATCH} (integer[], text[], bigint[], float8[]) AS " + WRITE_BATCH % (
    "$1",
    "$2",
    "$3",
    "$4",
)


EXECUTE_WRITE_BATCH = f"EXECUTE {PREPARED_BATCH} (%s, %s, %s, %s)"


# Which rows the batch's transaction stored is asked only when some were not
# new (a retransmission): a RETURNING clause naming every key cost the
# database 7% of its time per reading for an answer seldom needed.
NEW_IN_TRANSACTION = (
    "SELECT r.device_id, k.name, (extract(epoch FROM r.ts) * 1000000)::bigint"
    " FROM readings r JOIN metrics k ON k.id = r.metric_id WHERE r.tx = %s::xid8::text::bigint"
)


# An MQTT session: whether one kept before is still there, then what is kept from now on, in one statement.
# (The old row is read before the statement's own change: all its parts see one snapshot.)
_SESSION_LIVE = "(o.ended_at IS NULL OR o.ended_at + o.expiry_seconds * interval '1 second' > now())"


SESSION_KEEP = f"""
WITH o AS (
    SELECT ended_at, expiry_seconds FROM mqtt_sessions WHERE device_id = %(d)s AND client_id = %(c)s FOR UPDATE
), kept AS (
    INSERT INTO mqtt_sessions (device_id, client_id, expiry_seconds) VALUES (%(d)s, %(c)s, %(e)s)
    ON CONFLICT (device_id, client_id) DO UPDATE SET expiry_seconds = EXCLUDED.expiry_seconds, ended_at = NULL,
        -- A clean start, or a session expired meanwhile, drops the subscription to its command topic.
        commands = mqtt_sessions.commands AND NOT %(clean)s AND (mqtt_sessions.ended_at IS NULL
            OR mqtt_sessions.ended_at + mqtt_sessions.expiry_seconds * interval '1 second' > now())
), expired AS (
    DELETE FROM mqtt_sessions o WHERE o.device_id = %(d)s AND o.client_id <> %(c)s AND NOT {_SESSION_LIVE}
)
SELECT EXISTS (SELECT 1 FROM o WHERE {_SESSION_LIVE})
"""


SESSION_DROP = f"""
WITH o AS (
    DELETE FROM mqtt_sessions WHERE device_id = %(d)s AND client_id = %(c)s RETURNING ended_at, expiry_seconds
)
SELECT EXISTS (SELECT 1 FROM o WHERE {_SESSION_LIVE})
"""


SESSION_ENDS = "UPDATE mqtt_sessions SET ended_at = now() WHERE device_id = %s AND client_id = %s AND ended_at IS NULL"


INSERT_REJECTED = "INSERT INTO rejected_input (source, device, reason, raw) VALUES (%s, %s, %s, %s)"


# The batch's quarantined readings, every device's in one statement (once each: a retransmission is a no-op).
INSERT_QUARANTINE = """
INSERT INTO quarantine (device_id, metric, ts, value, rule, source)
SELECT d, m, timestamptz 'epoch' + t * interval '1 microsecond', v, r, s
FROM unnest(%s::integer[], %s::text[], %s::bigint[], %s::float8[], %s::text[], %s::text[]) AS u(d, m, t, v, r, s)
ORDER BY d, m, t
ON CONFLICT (device_id, metric, ts) DO NOTHING
"""


# Of readings whose key was already stored, those whose stored value differs: the first value
# stays, and each other value sent is kept once in conflicts. One statement, so committed when it returns.
CONFLICTS = f"""
WITH u AS MATERIALIZED (
    SELECT i, d, m, timestamptz 'epoch' + t * interval '1 microsecond' AS ts, v, s
    FROM unnest(%s::integer[], %s::integer[], %s::text[], %s::bigint[], %s::float8[], %s::text[]) AS u(i, d, m, t, v, s)
), c AS (
    SELECT u.i, u.d, u.m, u.ts, r.value AS stored, u.v AS sent, u.s
    FROM u JOIN metrics k ON k.name = u.m JOIN readings r ON r.device_id = u.d AND r.metric_id = k.id AND r.ts = u.ts
    WHERE r.value <> u.v
    UNION ALL
    SELECT u.i, u.d, u.m, u.ts, x.v, u.v, u.s
    FROM u JOIN readings_cold k ON k.device_id = u.d AND k.metric = u.m AND k.hour = {HOUR_OF.format(ts="u.ts")}
    CROSS JOIN LATERAL unnest(k.offsets, k.vals) AS x(o, v)
    WHERE x.o = {offset_of("u.ts")} AND x.v <> u.v
), kept AS (
    INSERT INTO conflicts (device_id, metric, ts, stored_value, sent_value, source)
    SELECT d, m, ts, stored, sent, s FROM c ORDER BY d, m, ts, sent
    ON CONFLICT (device_id, metric, ts, sent_value) DO NOTHING
)
SELECT i FROM c
"""


@dataclass(frozen=True, slots=True)
class Write:
    """One writer's part of a batch: its readings and the readings it holds in quarantine."""

    device_id: int
    readings: Sequence[Reading]
    quarantined: Sequence[Quarantined] = ()
    source: str = ""


_QUOTED: dict[str, str] = {}


def _quoted(name: str) -> str:
    quoted = _QUOTED.get(name)
    if quoted is None:
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if len(_QUOTED) < 100_000:
            _QUOTED[name] = quoted
    return quoted


def array_literals(rows: list[tuple]) -> tuple[str, str, str, str]:
    """
    The batch's four columns as PostgreSQL array literals ('{1,2,3}').
    Handing psycopg2 Python lists makes it adapt every element into an
    ARRAY[...] expression on the reactor thread, which cost a third of the
    gateway's CPU; joining the text here costs a fraction of that. Values are
    finite floats (checked on ingest), so repr() is exact and never 'nan'.
    """
    return (
        "{" + ",".join([str(r[0]) for r in rows]) + "}",
        "{" + ",".join([_quoted(r[1]) for r in rows]) + "}",
        "{" + ",".join([str(r[2]) for r in rows]) + "}",
        "{" + ",".join([repr(r[3]) for r in rows]) + "}",
    )


def _outcomes(
    count: int, rows: list[tuple], inserted: list[tuple[int, str, int]], refused: dict[int, tuple[tuple, str]]
) -> tuple[list[Any], int, list[tuple]]:
    """
    Each write's result when not every row was new: a row whose key came back
    was stored now (the first of equal rows in the batch); any other row not
    refused was stored before, a duplicate (or, with another value, a
    conflict: those rows are returned to be told apart).
    """
    new_keys = set(inserted)
    new = [0] * count
    duplicates = [0] * count
    stored_before = []
    for row in rows:
        key = (row[0], row[1], row[2])
        if key in new_keys:
            new_keys.discard(key)  # the same reading again later in this batch is a duplicate
            new[row[4]] += 1
        elif id(row) not in refused:
            duplicates[row[4]] += 1
            stored_before.append(row)
    outcomes: list[Any] = [WriteResult(new[i], duplicates[i]) for i in range(count)]
    for row, reason in refused.values():
        i, j = row[4], row[5]
        current = outcomes[i]
        if not isinstance(current, StoreRejected) or j < current.index:
            outcomes[i] = StoreRejected(f"readings[{j}]: the database refused it: {reason}", j)
    return outcomes, sum(new), stored_before


def _devices_of(item: Write | tuple[Write, ...]) -> tuple[int, ...]:
    """Group commit's ordering keys: a device's writes commit in the order it sent them."""
    if isinstance(item, tuple):
        return tuple({w.device_id for w in item})
    return (item.device_id,)


def _regroup(outcomes: list[Any], items: list[Write | tuple[Write, ...]]) -> list[Any]:
    """Outcomes per write back to one per queued item: a list for an item of several writes."""
    grouped: list[Any] = []
    k = 0
    for item in items:
        if isinstance(item, tuple):
            grouped.append(outcomes[k : k + len(item)])
            k += len(item)
        else:
            grouped.append(outcomes[k])
            k += 1
    return grouped


def _first_failure(f: Failure) -> Failure:
    return f.value.subFailure if isinstance(f.value, FirstError) else f


def within(d: Deferred, seconds: float, clock: IReactorTime, error: Exception) -> Deferred:
    """
    A Deferred with d's result, or failing with ``error`` after ``seconds``.
    d itself is left to finish: cancelling a query half-way would leave its
    connection in an unknown state.
    """
    out: Deferred = Deferred()

    def expire() -> None:
        if not out.called:
            out.errback(Failure(error))

    timer = clock.callLater(seconds, expire)

    def passthrough(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if not out.called:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)

    d.addBoth(passthrough)
    return out
