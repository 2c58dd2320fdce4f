"""
The batch ledger: the sinks' cursors, batches and counters in PostgreSQL.
The uploader: every stored reading reaches every sink, in batches, at
least once, with no reading skipped.

Order and completeness. Readings are uploaded in the order ``(tx,
device_id, metric_id, ts)``: the transaction that stored them, then their
natural key. A batch only takes readings whose transaction is below
``pg_snapshot_xmin`` — older than every transaction still running — so
everything before its end has already committed or aborted. A reading whose
transaction commits late therefore still sorts after the sink's cursor: the
cursor never passes a reading that could yet appear.

How far a batch reaches is read from ``readings_arrivals`` (one row per
transaction that stored readings, with their count and arrival time, kept
by a trigger on ``readings``); the readings of those transactions are then
read by ``tx`` (a btree while their partition fills, its BRIN index once it
is packed: see partitions.upload_index) and sorted, a few thousand at a time.

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
from gateway.storage.positions import PLACE, at, params, position
from gateway.outbound.reduce import Row, State, reduce_rows
from gateway.outbound.sinks import Sink
from gateway.outbound.sender import RESPONSE_KEEP, Verdict

log = Logger()

LEASE = 60.0  # seconds a batch stays with its gateway beyond the request timeout

# A reading's place in the upload order: its transaction, then its natural key. A position is a tuple
# (tx, device_id, metric_id, ts as text). (tx, 0, 0, '-infinity') sorts before every reading of tx, and
# (tx, 2147483647, 2147483647, 'infinity') after: START, and the positions schema 16 gave some cursors.
ORDER = "r.tx, r.device_id, r.metric_id, r.ts"


# tx bounds too, which an index on tx alone can use (BRIN cannot use a row comparison at all).
AFTER = f"r.tx >= %(after_tx)s AND {PLACE} > {at('after')}"
IN_RANGE = f"{AFTER} AND r.tx <= %(last_tx)s AND {PLACE} <= {at('last')}"
XMIN = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"

# How far a batch of n readings after the cursor reaches: the last of the transactions after the cursor's, older
# than every transaction still running (so all before it have committed or aborted), that holds the nth reading
# (not counting what is left of the cursor's own). No row: nothing new has settled.
SPAN = f"""
SELECT max(w.tx) FROM (
    SELECT a.tx, sum(a.readings) OVER (ORDER BY a.tx) - a.readings AS before
    FROM (SELECT tx, readings FROM readings_arrivals WHERE tx > %(after_tx)s AND tx < {XMIN}
          ORDER BY tx LIMIT %(n)s) a
) w WHERE w.before < %(n)s
"""
# Where a cut of at most n readings after the cursor and up to transaction %(hi)s ends, its size, and how long
# its oldest reading has waited.
BOUNDARY = f"""
SELECT p.tx, p.device_id, p.metric_id, p.ts::text, p.n,
       coalesce(extract(epoch FROM now() - (SELECT min(a.received_at) FROM readings_arrivals a
                                            WHERE a.tx >= p.first AND a.tx <= p.tx)), 0)::float8
FROM (SELECT q.*, count(*) OVER () AS n, min(q.tx) OVER () AS first
      FROM (SELECT r.tx, r.device_id, r.metric_id, r.ts FROM readings r
            WHERE {AFTER} AND r.tx <= %(hi)s ORDER BY {ORDER} LIMIT %(n)s) q) p
ORDER BY p.tx DESC, p.device_id DESC, p.metric_id DESC, p.ts DESC LIMIT 1
"""
# A reading's arrival (its transaction's): a reading always has one; its own time stands in should it not.
ARRIVAL = "LEFT JOIN readings_arrivals a ON a.tx = r.tx"
RECEIVED = "coalesce(a.received_at, r.ts)"

_TS = "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
# One uploaded line, made by the server: the same text as reduce.raw_line.
LINE = (
    '\'{"device":\' || to_json(d.name) || \',"metric":\' || to_json(k.name) || \',"ts":"\' || '
    + _TS.format("r.ts")
    + ' || \'","value":\' || r.value || \',"received_at":"\' || '
    + _TS.format(RECEIVED)
    + " || '\"}'"
)

# The body of a batch: its range of readings, as lines.
RANGE_RAW = f"""
SELECT count(*), coalesce(string_agg(p.line, E'\\n' ORDER BY p.tx, p.device_id, p.metric_id, p.ts), '')
FROM (SELECT r.tx, r.device_id, r.metric_id, r.ts, {LINE} AS line
      FROM readings r JOIN devices d ON d.id = r.device_id JOIN metrics k ON k.id = r.metric_id {ARRIVAL}
      WHERE {IN_RANGE} ORDER BY {ORDER} LIMIT %(n)s) p
"""

NTH_IN_RANGE = (
    f"SELECT r.tx, r.device_id, r.metric_id, r.ts::text FROM readings r WHERE {IN_RANGE} ORDER BY {ORDER}"
    " OFFSET %(n)s - 1 LIMIT 1"
)
SHRINK = """
UPDATE upload_batches SET last_tx = %(last_tx)s, last_device = %(last_device)s, last_metric = %(last_metric)s,
       last_ts = %(last_ts)s, readings = %(readings)s
WHERE id = %(id)s
"""

ROWS = f"""
SELECT r.tx, r.device_id, r.metric_id, r.ts::text, d.name, k.name, (extract(epoch FROM r.ts) * 1000000)::bigint,
       r.value, (extract(epoch FROM {RECEIVED}) * 1000000)::bigint, extract(epoch FROM now() - {RECEIVED})::float8
FROM readings r JOIN devices d ON d.id = r.device_id JOIN metrics k ON k.id = r.metric_id {ARRIVAL}
WHERE {{where}} ORDER BY {ORDER} {{limit}}
"""

# Waits while another gateway cuts a batch of this sink (or records a send): both take milliseconds.
LOCK_SINK = (
    "SELECT cursor_tx, cursor_device, cursor_metric, cursor_ts::text FROM upload_sinks WHERE name = %s FOR UPDATE"
)

INSERT_BATCH = """
INSERT INTO upload_batches (sink, key, after_tx, after_device, after_metric, after_ts,
                            last_tx, last_device, last_metric, last_ts, readings, payload, owner, lease_until)
VALUES (%(sink)s, %(key)s, %(after_tx)s, %(after_device)s, %(after_metric)s, %(after_ts)s,
        %(last_tx)s, %(last_device)s, %(last_metric)s, %(last_ts)s, %(readings)s,
        %(payload)s, %(owner)s, now() + make_interval(secs => %(lease)s))
RETURNING id
"""
ADVANCE = """
UPDATE upload_sinks SET cursor_tx = %(last_tx)s, cursor_device = %(last_device)s, cursor_metric = %(last_metric)s,
       cursor_ts = %(last_ts)s
WHERE name = %(sink)s
"""

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
RETURNING id, key::text, after_tx, after_device, after_metric, after_ts::text,
          last_tx, last_device, last_metric, last_ts::text, readings, payload, attempts
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


MONITOR_INTERVAL = 5.0


def gzip_body(text: str, level: int) -> bytes:
    """The batch body; mtime 0 so the same lines always give the same bytes."""
    return gzip.compress(text.encode("utf-8") + b"\n" if text else b"", compresslevel=level, mtime=0)


Position = tuple[int, int, int, str]  # see at(): tx, device_id, metric_id, ts
START: Position = (0, 0, 0, "-infinity")  # before every reading: a new sink's cursor


@dataclass
class Batch:
    id: int
    key: str
    after: Position  # the batch holds the readings after this position, up to and including last
    last: Position
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
            batch_id, key, after, last, (readings, payload, attempts) = row[0], row[1], row[2:6], row[6:10], row[10:]
            body = bytes(payload) if payload is not None else None
            return Batch(batch_id, key, position(after), position(last), readings, body, attempts)

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
            after = position(row)
            hi = await self._span(cur, after, sink.batch)
            await cur.execute(BOUNDARY, {**params("after", after), "hi": hi, "n": sink.batch})
            found = cur.fetchone()
            if found is None:
                return Wait(sink.flush)
            count, age = found[4], found[5]
            if count < sink.batch and age < sink.flush and not force:
                return Wait(sink.flush - age)
            return await self._record_cut(cur, sink, after, position(found), count, None)

        return self._interaction(work)

    @staticmethod
    async def _span(cur: Any, after: Position, n: int) -> int:
        """The last transaction a cut of ``n`` readings after ``after`` needs to read (see SPAN)."""
        await cur.execute(SPAN, {"after_tx": after[0], "n": n})
        hi = cur.fetchone()[0]
        return after[0] if hi is None else int(hi)

    async def _record_cut(
        self, cur: Any, sink: Sink, after: Position, last: Position, count: int, body: bytes | None
    ) -> Batch:
        batch = await self._insert_batch(cur, sink, after, last, count, body)
        await cur.execute(ADVANCE, {**params("last", last), "sink": sink.name})
        return batch

    async def _insert_batch(
        self, cur: Any, sink: Sink, after: Position, last: Position, count: int, body: bytes | None
    ) -> Batch:
        key = str(uuid.uuid4())
        await cur.execute(
            INSERT_BATCH,
            {
                **params("after", after),
                **params("last", last),
                "sink": sink.name,
                "key": key,
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
        after = position(row)
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
        args = {**params("after", batch.after), **params("last", batch.last), "n": batch.readings}
        rows = await self.pool.run(lambda conn: conn.runQuery(RANGE_RAW, args))
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
        await cur.execute(NTH_IN_RANGE, {**params("after", batch.after), **params("last", batch.last), "n": first})
        mid = position(cur.fetchone())
        await cur.execute(SHRINK, {**params("last", mid), "readings": first, "id": batch.id})
        head = Batch(batch.id, batch.key, batch.after, mid, first, None, batch.attempts)
        tail = await self._insert_batch(cur, sink, mid, batch.last, batch.readings - first, None)
        return head, tail

    async def _reduced(
        self, cur: Any, sink: Sink, after: Position, limit: int
    ) -> tuple[int, Position, float, str, State]:
        args = {**params("after", after), "hi": await self._span(cur, after, limit), "n": limit}
        await cur.execute(ROWS.format(where=f"{AFTER} AND r.tx <= %(hi)s", limit="LIMIT %(n)s"), args)
        fetched = cur.fetchall()
        if not fetched:
            return 0, after, 0.0, "", {}
        rows = [Row(f[1], f[4], f[5], f[6], f[7], f[8]) for f in fetched]
        pairs = sorted({(r.device_id, r.metric) for r in rows})
        await cur.execute(LOAD_DEADBAND, (sink.name, [p[0] for p in pairs], [p[1] for p in pairs]))
        before: State = {(d, m): (v, t) for d, m, v, t in cur.fetchall()}
        lines, state = reduce_rows(sink, rows, before)
        changed = {k: v for k, v in state.items() if before.get(k) != v}
        age = max(f[9] for f in fetched)
        return len(rows), position(fetched[-1]), age, "\n".join(lines), changed

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
