"""
The batch ledger: the sinks' cursors, batches and counters in PostgreSQL.
The uploader: every stored reading reaches every sink, in batches, at
least once, with no reading skipped.

Order and completeness. Readings are uploaded in the order ``(tx, id)``:
the transaction that stored them, then their id. A batch only takes
readings whose transaction is below ``pg_snapshot_xmin`` — older than
every transaction still running — so everything before its end has
already committed or aborted. A reading whose transaction commits late
therefore still sorts after the sink's cursor: the cursor never passes a
reading that could yet appear. (Ordering by id alone would skip it: ids are
handed out before COMMIT, in a different order.)

Claims. Cutting a batch is one short transaction that locks the sink's
row (``FOR UPDATE``), reads the readings after the cursor, records
the batch — its range, its size and a random Idempotency-Key — and moves
the cursor past it; the body is made afterwards from the range, with no
lock held, so the bodies of the next batches are made while one is sent.
The batch row then belongs to one gateway for a lease; on 2xx it is
deleted. A batch whose lease ran out, or whose gateway holds no owner lock
(see OwnerLock: it died or stopped), is claimed by whichever gateway asks
first (``SKIP LOCKED`` again), and a restarted gateway reclaims its own at
once. Since a batch is a fixed range
of readings that retention leaves alone until it is sent, a retried batch
has the same key and the same contents. Two gateways on one database thus
send disjoint batches that together cover every reading; a crash between
a send and its record costs one duplicate, with the same key.

Each sink has its own cursor and its own loop (SinkUploader): a dead sink
waits, with its lag growing, and holds back no other.
"""

from __future__ import annotations

import gzip
import uuid
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Collection

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gateway.storage.pool import PgPool
from gateway.outbound.reduce import Row, State, reduce_rows
from gateway.outbound.sinks import Sink
from gateway.outbound.sender import RESPONSE_KEEP, Verdict

log = Logger()

LEASE = 60.0  # seconds a batch stays with its gateway beyond the request timeout

_TS = "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
# One uploaded line, made by the server: the same text as reduce.raw_line.
LINE = (
    '\'{"device":\' || to_json(d.name) || \',"metric":\' || to_json(k.name) || \',"ts":"\' || '
    + _TS.format("r.ts")
    + ' || \'","value":\' || r.value || \',"received_at":"\' || '
    + _TS.format("r.received_at")
    + " || '\"}'"
)
AFTER = "(r.tx, r.id) > (%(after_tx)s::xid8, %(after_id)s)"
SETTLED = "r.tx < pg_snapshot_xmin(pg_current_snapshot())"
IN_RANGE = f"{AFTER} AND (r.tx, r.id) <= (%(last_tx)s::xid8, %(last_id)s)"

# The body of a batch: its range of readings, as lines. The LIMIT (the
# batch's size) keeps the planner on the upload-order index (on tx; the
# readings of one transaction are sorted by id) whatever it guesses of the
# range.
RANGE_RAW = f"""
SELECT count(*), coalesce(string_agg(p.line, E'\\n' ORDER BY p.tx, p.id), '')
FROM (SELECT r.tx, r.id, {LINE} AS line
      FROM readings r JOIN devices d ON d.id = r.device_id JOIN metrics k ON k.id = r.metric_id
      WHERE {IN_RANGE} ORDER BY r.tx, r.id LIMIT %(n)s) p
"""

BOUNDARY = f"""
SELECT count(*), max(p.tx)::text, (array_agg(p.id ORDER BY p.tx DESC, p.id DESC))[1],
       coalesce(extract(epoch FROM now() - min(p.received_at)), 0)::float8
FROM (SELECT r.tx, r.id, r.received_at FROM readings r
      WHERE {AFTER} AND {SETTLED} ORDER BY r.tx, r.id LIMIT %(n)s) p
"""
NTH_IN_RANGE = f"SELECT r.tx::text, r.id FROM readings r WHERE {IN_RANGE} ORDER BY r.tx, r.id OFFSET %(n)s - 1 LIMIT 1"
SHRINK = "UPDATE upload_batches SET last_tx = %s::xid8, last_id = %s, readings = %s WHERE id = %s"

ROWS = """
SELECT r.tx::text, r.id, r.device_id, d.name, k.name, (extract(epoch FROM r.ts) * 1000000)::bigint,
       r.value, (extract(epoch FROM r.received_at) * 1000000)::bigint,
       extract(epoch FROM now() - r.received_at)::float8
FROM readings r JOIN devices d ON d.id = r.device_id JOIN metrics k ON k.id = r.metric_id
WHERE {where} ORDER BY r.tx, r.id {limit}
"""

# Waits while another gateway cuts a batch of this sink (or records a send): both take milliseconds.
LOCK_SINK = "SELECT cursor_tx::text, cursor_id FROM upload_sinks WHERE name = %s FOR UPDATE"

INSERT_BATCH = """
INSERT INTO upload_batches (sink, key, after_tx, after_id, last_tx, last_id, readings, payload, owner, lease_until)
VALUES (%(sink)s, %(key)s, %(after_tx)s::xid8, %(after_id)s, %(last_tx)s::xid8, %(last_id)s, %(readings)s,
        %(payload)s, %(owner)s, now() + make_interval(secs => %(lease)s))
RETURNING id
"""
ADVANCE = "UPDATE upload_sinks SET cursor_tx = %s::xid8, cursor_id = %s WHERE name = %s"

# Each uploading gateway holds a session advisory lock named by its owner name, on a connection of its own, for
# as long as it runs (OwnerLock). A batch whose owner holds none has lost its gateway (killed, stopped, or cut off
# from the database): another gateway claims it at once instead of when its lease runs out.
OWNER_LOCK = 0x7467_7703  # the lock's first key; the second is hashtext(owner)


def owner_lock_held(owner: str, mine: bool = False) -> str:
    """SQL true while the owner lock of ``owner`` (an SQL expression) is held (``mine``: by this session)."""
    session = (
        "l.pid = pg_backend_pid()"
        if mine
        else "l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    return (
        f"EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND {session}"
        f" AND l.classid = {OWNER_LOCK} AND l.objid = hashtext({owner})::oid AND l.objsubid = 2)"
    )


# True once this session holds the owner lock of %(owner)s (taken now if it was not), false if another does.
HOLD_OWNER_LOCK = (
    f"SELECT {owner_lock_held('%(owner)s', mine=True)} OR pg_try_advisory_lock({OWNER_LOCK}, hashtext(%(owner)s))"
)

CLAIM = f"""
UPDATE upload_batches SET owner = %(owner)s, lease_until = now() + make_interval(secs => %(lease)s)
WHERE id = (SELECT id FROM upload_batches b
            WHERE sink = %(sink)s AND state = 'pending'
              AND (lease_until < now() OR owner = %(owner)s OR NOT {owner_lock_held("b.owner")})
              AND id <> ALL (%(holding)s::bigint[])
            ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, key::text, after_tx::text, after_id, last_tx::text, last_id, readings, payload, attempts
"""

SENT = """
WITH gone AS (DELETE FROM upload_batches WHERE id = %(id)s RETURNING readings)
UPDATE upload_sinks SET batches_sent = batches_sent + 1, readings_sent = readings_sent + gone.readings,
       last_sent_at = now()
FROM gone WHERE name = %(sink)s
"""
FAILED = """
WITH b AS (UPDATE upload_batches SET attempts = attempts + 1, status = %(status)s, response = %(response)s,
                  lease_until = now() + make_interval(secs => %(lease)s)
           WHERE id = %(id)s)
UPDATE upload_sinks SET failures = failures + 1, last_error = %(error)s, last_error_at = now()
WHERE name = %(sink)s
"""
PARKED = """
WITH b AS (UPDATE upload_batches SET state = 'parked', owner = NULL, attempts = attempts + 1,
                  status = %(status)s, response = %(response)s, parked_at = now()
           WHERE id = %(id)s)
UPDATE upload_sinks SET last_error = %(error)s, last_error_at = now() WHERE name = %(sink)s
"""

LOAD_DEADBAND = """
SELECT device_id, metric, value, (extract(epoch FROM ts) * 1000000)::bigint
FROM upload_deadband WHERE sink = %s AND (device_id, metric) IN (SELECT * FROM unnest(%s::integer[], %s::text[]))
"""
SAVE_DEADBAND = """
INSERT INTO upload_deadband (sink, device_id, metric, value, ts)
SELECT %s, u.d, u.m, u.v, timestamptz 'epoch' + u.t * interval '1 microsecond'
FROM unnest(%s::integer[], %s::text[], %s::float8[], %s::bigint[]) AS u(d, m, v, t)
ON CONFLICT (sink, device_id, metric) DO UPDATE SET value = EXCLUDED.value, ts = EXCLUDED.ts
"""

REGISTER = """
INSERT INTO upload_sinks (name, url) VALUES (%s, %s)
ON CONFLICT (name) DO UPDATE SET url = EXCLUDED.url
"""


_LAG = """extract(epoch FROM now() - (
           SELECT min(f.at) FROM (
               SELECT (SELECT r.received_at FROM readings r WHERE (r.tx, r.id) > (s.cursor_tx, s.cursor_id)
                       ORDER BY r.tx, r.id LIMIT 1) AS at
               UNION ALL
               SELECT (SELECT r.received_at FROM readings r WHERE (r.tx, r.id) > (b.after_tx, b.after_id)
                       ORDER BY r.tx, r.id LIMIT 1)
               FROM upload_batches b WHERE b.sink = s.name AND b.state = 'pending'
           ) f))::float8"""

_BATCHES = """(SELECT count(*) FROM upload_batches b WHERE b.sink = s.name AND b.state = '{state}')"""


def status_sql(count_at_most: int | None = None) -> str:
    """
    Every sink's cursor, batches and lag (STATUS_FIELDS). ``count_at_most`` bounds the count of readings
    not yet in a batch, for a caller that asks every few seconds (a backlog of millions is counted once).
    """
    unsent = "SELECT 1 FROM readings r WHERE (r.tx, r.id) > (s.cursor_tx, s.cursor_id)"
    if count_at_most is not None:
        unsent += f" LIMIT {int(count_at_most)}"
    return f"""
SELECT s.name, s.url, s.cursor_tx::text, s.cursor_id, s.batches_sent, s.readings_sent, s.failures,
       s.last_sent_at, s.last_error, s.last_error_at,
       {_BATCHES.format(state="pending")},
       (SELECT coalesce(sum(b.readings), 0) FROM upload_batches b WHERE b.sink = s.name AND b.state = 'pending'),
       {_BATCHES.format(state="parked")},
       (SELECT coalesce(sum(b.readings), 0) FROM upload_batches b WHERE b.sink = s.name AND b.state = 'parked'),
       (SELECT count(*) FROM ({unsent}) AS unsent),
       {_LAG}
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
MONITOR_INTERVAL = 5.0

STATUS_FIELDS = (
    "name",
    "url",
    "cursor_tx",
    "cursor_id",
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
)


def sink_doc(status: dict[str, Any]) -> dict[str, Any]:
    """A sink's STATUS_FIELDS as JSON shows them (``gatewayctl upload status --json``, ``GET /v1/sinks``)."""
    doc = dict(status)
    for key in ("last_sent_at", "last_error_at"):
        doc[key] = doc[key].isoformat() if doc[key] is not None else None
    doc["lag_readings"] = doc["unbatched_readings"] + doc["pending_readings"]
    return doc


RETRY_DEAD = """
UPDATE upload_batches SET state = 'pending', owner = NULL, lease_until = now(), attempts = 0, parked_at = NULL
WHERE sink = %s AND state = 'parked'
"""


def gzip_body(text: str, level: int) -> bytes:
    """The batch body; mtime 0 so the same lines always give the same bytes."""
    return gzip.compress(text.encode("utf-8") + b"\n" if text else b"", compresslevel=level, mtime=0)


@dataclass
class Batch:
    id: int
    key: str
    after: tuple[str, int]
    last: tuple[str, int]
    readings: int
    body: bytes | None  # None until made (Ledger.fill)
    attempts: int = 0
    verdict: Verdict | None = None  # decided but not yet recorded in the database


@dataclass(frozen=True)
class Wait:
    """No batch is due: look again in ``seconds``."""

    seconds: float


class Ledger:
    """Batches, cursors and counters of the sinks, in PostgreSQL."""

    def __init__(self, pool: PgPool, owner: str, in_thread: Callable[..., Deferred]) -> None:
        self.pool = pool
        self.in_thread = in_thread  # gzip of a large body is CPU work for a thread
        self.owner = owner

    def _interaction(self, work: Callable[[Any], Any]) -> Deferred:
        return self.pool.run(lambda conn: conn.runInteraction(lambda cur: Deferred.fromCoroutine(work(cur))))

    def _run(self, sql: str, params: Any) -> Deferred:
        return self.pool.run(lambda conn: conn.runOperation(sql, params))

    def register(self, sinks: list[Sink]) -> Deferred:
        async def work(cur: Any) -> list[str]:
            for sink in sinks:
                await cur.execute(REGISTER, (sink.name, sink.url))
            await cur.execute("SELECT name FROM upload_sinks")
            return [row[0] for row in cur.fetchall()]

        return self._interaction(work)

    def claim(self, sink: Sink, holding: Collection[int] = ()) -> Deferred:
        """
        An unsent batch whose gateway is gone (or is this one, restarted and
        not ``holding`` it), or None. Its body is made by ``fill``.
        """

        async def work(cur: Any) -> Batch | None:
            params = {"owner": self.owner, "lease": LEASE + sink.timeout, "sink": sink.name, "holding": list(holding)}
            await cur.execute(CLAIM, params)
            row = cur.fetchone()
            if row is None:
                return None
            batch_id, key, after_tx, after_id, last_tx, last_id, readings, payload, attempts = row
            body = bytes(payload) if payload is not None else None
            return Batch(batch_id, key, (after_tx, after_id), (last_tx, last_id), readings, body, attempts)

        return self._interaction(work)

    def cut(self, sink: Sink, force: bool = False) -> Deferred:
        """
        A new batch of the readings after the sink's cursor, or Wait if none
        is due yet. The sink's row stays locked only while the batch's range
        is decided; ``fill`` then makes its body with no lock held, so bodies
        of consecutive batches can be made side by side.
        """
        if sink.reduced:
            return self._interaction(lambda cur: self._cut_reduced(cur, sink, force))

        async def work(cur: Any) -> Batch | Wait:
            await cur.execute(LOCK_SINK, (sink.name,))
            row = cur.fetchone()
            if row is None:  # removed with gatewayctl upload remove
                return Wait(sink.flush)
            after = (row[0], row[1])
            await cur.execute(BOUNDARY, {"after_tx": after[0], "after_id": after[1], "n": sink.batch})
            count, last_tx, last_id, age = cur.fetchone()
            if count == 0:
                return Wait(sink.flush)
            if count < sink.batch and age < sink.flush and not force:
                return Wait(sink.flush - age)
            return await self._record_cut(cur, sink, after, (last_tx, last_id), count, None)

        return self._interaction(work)

    async def _record_cut(
        self, cur: Any, sink: Sink, after: tuple[str, int], last: tuple[str, int], count: int, body: bytes | None
    ) -> Batch:
        batch = await self._insert_batch(cur, sink, after, last, count, body)
        await cur.execute(ADVANCE, (last[0], last[1], sink.name))
        return batch

    async def _insert_batch(
        self, cur: Any, sink: Sink, after: tuple[str, int], last: tuple[str, int], count: int, body: bytes | None
    ) -> Batch:
        key = str(uuid.uuid4())
        await cur.execute(
            INSERT_BATCH,
            {
                "sink": sink.name,
                "key": key,
                "after_tx": after[0],
                "after_id": after[1],
                "last_tx": last[0],
                "last_id": last[1],
                "readings": count,
                "payload": body,
                "owner": self.owner,
                "lease": LEASE + sink.timeout,
            },
        )
        return Batch(cur.fetchone()[0], key, after, last, count, body)

    async def _cut_reduced(self, cur: Any, sink: Sink, force: bool) -> Batch | Wait:
        """Reduced sinks: the body depends on what was sent before, so it is made and kept with the cut."""
        await cur.execute(LOCK_SINK, (sink.name,))
        row = cur.fetchone()
        if row is None:
            return Wait(sink.flush)
        after = (row[0], row[1])
        limit = sink.batch
        while True:
            count, last, age, text, state = await self._reduced(cur, sink, after, limit)
            if count == 0:
                return Wait(sink.flush)
            if count < sink.batch and age < sink.flush and not force:
                return Wait(sink.flush - age)
            body = await self.in_thread(gzip_body, text, sink.gzip_level)
            if len(body) <= sink.batch_bytes or count == 1:
                break
            limit = max(1, min(count - 1, count * sink.batch_bytes * 9 // (len(body) * 10)))
        batch = await self._record_cut(cur, sink, after, last, count, body)
        if state:
            ids, metrics = zip(*state)
            values, stamps = zip(*state.values())
            await cur.execute(SAVE_DEADBAND, (sink.name, list(ids), list(metrics), list(values), list(stamps)))
        return batch

    def fill(self, sink: Sink, batch: Batch) -> Deferred:
        """
        Make the batch's body from its range (fires with a list of batches).
        A body over the sink's byte limit splits the batch, in the database,
        into two that are sent one after the other.
        """
        return Deferred.fromCoroutine(self._fill(sink, batch))

    async def _fill(self, sink: Sink, batch: Batch) -> list[Batch]:
        if batch.body is not None:
            return [batch]
        params = {"after_tx": batch.after[0], "after_id": batch.after[1], "last_tx": batch.last[0]}
        params.update(last_id=batch.last[1], n=batch.readings)
        rows = await self.pool.run(lambda conn: conn.runQuery(RANGE_RAW, params))
        count, text = rows[0]
        if count != batch.readings:
            log.warn(
                "batch {key} of sink {sink} held {readings} readings, {count} are left; sending those",
                key=batch.key,
                sink=sink.name,
                readings=batch.readings,
                count=count,
            )
        body = await self.in_thread(gzip_body, text, sink.gzip_level)
        if len(body) <= sink.batch_bytes or batch.readings < 2 or count != batch.readings:
            batch.body = body
            return [batch]
        first = max(1, min(batch.readings - 1, batch.readings * sink.batch_bytes * 9 // (len(body) * 10)))
        head, tail = await self._interaction(lambda cur: self._split(cur, sink, batch, first))
        return [*await self._fill(sink, head), *await self._fill(sink, tail)]

    async def _split(self, cur: Any, sink: Sink, batch: Batch, first: int) -> tuple[Batch, Batch]:
        params = {"after_tx": batch.after[0], "after_id": batch.after[1], "last_tx": batch.last[0]}
        params.update(last_id=batch.last[1], n=first)
        await cur.execute(NTH_IN_RANGE, params)
        mid_tx, mid_id = cur.fetchone()
        await cur.execute(SHRINK, (mid_tx, mid_id, first, batch.id))
        head = Batch(batch.id, batch.key, batch.after, (mid_tx, mid_id), first, None, batch.attempts)
        tail = await self._insert_batch(cur, sink, (mid_tx, mid_id), batch.last, batch.readings - first, None)
        return head, tail

    async def _reduced(
        self, cur: Any, sink: Sink, after: tuple[str, int], limit: int
    ) -> tuple[int, tuple[str, int], float, str, State]:
        params = {"after_tx": after[0], "after_id": after[1], "n": limit}
        await cur.execute(ROWS.format(where=f"{AFTER} AND {SETTLED}", limit="LIMIT %(n)s"), params)
        fetched = cur.fetchall()
        if not fetched:
            return 0, ("0", 0), 0.0, "", {}
        rows = [Row(f[2], f[3], f[4], f[5], f[6], f[7]) for f in fetched]
        pairs = sorted({(r.device_id, r.metric) for r in rows})
        await cur.execute(LOAD_DEADBAND, (sink.name, [p[0] for p in pairs], [p[1] for p in pairs]))
        before: State = {(d, m): (v, t) for d, m, v, t in cur.fetchall()}
        lines, state = reduce_rows(sink, rows, before)
        changed = {k: v for k, v in state.items() if before.get(k) != v}
        age = max(f[8] for f in fetched)
        return len(rows), (fetched[-1][0], fetched[-1][1]), age, "\n".join(lines), changed

    def record(self, sink: Sink, batch: Batch) -> Deferred:
        """Write the batch's verdict: delete it (sent), park it, or count the failure."""
        verdict = batch.verdict
        assert verdict is not None
        params = {
            "id": batch.id,
            "sink": sink.name,
            "status": verdict.status,
            "error": verdict.error,
            "response": verdict.response[:RESPONSE_KEEP],
            "lease": LEASE + sink.timeout + verdict.delay,
        }
        sql = {"sent": SENT, "park": PARKED, "retry": FAILED}[verdict.kind]
        return self._run(sql, params)
