"""
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
deleted. A batch whose lease ran out (its gateway died) is
claimed by whichever gateway asks first (``SKIP LOCKED`` again), and a
restarted gateway reclaims its own at once. Since a batch is a fixed range
of readings that retention leaves alone until it is sent, a retried batch
has the same key and the same contents. Two gateways on one database thus
send disjoint batches that together cover every reading; a crash between
a send and its record costs one duplicate, with the same key.

Each sink has its own cursor and its own loop (SinkUploader): a dead sink
waits, with its lag growing, and holds back no other.
"""

from __future__ import annotations

import gzip
import random
import socket
import uuid
from collections import deque
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from io import BytesIO
from pathlib import Path
from typing import Any
from collections.abc import Callable, Collection

from twisted.application.service import MultiService, Service
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from gateway import __version__
from gateway.pool import PgPool
from gateway.reduce import Row, State, reduce_rows
from gateway.sinks import Sink, ca_certificates
from gateway.store import _first_line

log = Logger()

LEASE = 60.0  # seconds a batch stays with its gateway beyond the request timeout
RETRY_AFTER_CAP = 3600.0
RESPONSE_KEEP = 4096  # bytes of a refusal kept with the parked batch
RETENTION_INTERVAL = 60.0
RETENTION_CHUNK = 5000
RETENTION_CHUNKS_PER_RUN = 200

_TS = "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
# One uploaded line, made by the server: the same text as reduce.raw_line.
LINE = (
    '\'{"device":\' || to_json(d.name) || \',"metric":\' || to_json(r.metric) || \',"ts":"\' || '
    + _TS.format("r.ts")
    + ' || \'","value":\' || r.value || \',"received_at":"\' || '
    + _TS.format("r.received_at")
    + " || '\"}'"
)
AFTER = "(r.tx, r.id) > (%(after_tx)s::xid8, %(after_id)s)"
SETTLED = "r.tx < pg_snapshot_xmin(pg_current_snapshot())"
IN_RANGE = f"{AFTER} AND (r.tx, r.id) <= (%(last_tx)s::xid8, %(last_id)s)"

# The body of a batch: its range of readings, as lines. The LIMIT (the
# batch's size) keeps the planner on the (tx, id) index whatever it
# guesses of the range.
RANGE_RAW = f"""
SELECT count(*), coalesce(string_agg(p.line, E'\\n' ORDER BY p.tx, p.id), '')
FROM (SELECT r.tx, r.id, {LINE} AS line
      FROM readings r JOIN devices d ON d.id = r.device_id
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
SELECT r.tx::text, r.id, r.device_id, d.name, r.metric, (extract(epoch FROM r.ts) * 1000000)::bigint,
       r.value, (extract(epoch FROM r.received_at) * 1000000)::bigint,
       extract(epoch FROM now() - r.received_at)::float8
FROM readings r JOIN devices d ON d.id = r.device_id
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

CLAIM = """
UPDATE upload_batches SET owner = %(owner)s, lease_until = now() + make_interval(secs => %(lease)s)
WHERE id = (SELECT id FROM upload_batches
            WHERE sink = %(sink)s AND state = 'pending' AND (lease_until < now() OR owner = %(owner)s)
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

# Readings up to here have been sent to every sink (or no sink exists).
UPLOADED_FRONTIER = """
SELECT tx::text, id FROM (
    SELECT cursor_tx AS tx, cursor_id AS id FROM upload_sinks
    UNION ALL SELECT after_tx, after_id FROM upload_batches
) f ORDER BY tx, id LIMIT 1
"""
RETENTION_DELETE = """
DELETE FROM readings WHERE id IN (
    SELECT r.id FROM readings r
    WHERE r.received_at < now() - make_interval(secs => %(age)s) {bound}
    ORDER BY r.tx, r.id LIMIT %(chunk)s)
"""

# Seconds the oldest reading not yet sent to sink s has waited (NULL: none waits); uses (tx, id).
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

STATUS = f"""
SELECT s.name, s.url, s.cursor_tx::text, s.cursor_id, s.batches_sent, s.readings_sent, s.failures,
       s.last_sent_at, s.last_error, s.last_error_at,
       {_BATCHES.format(state="pending")},
       (SELECT coalesce(sum(b.readings), 0) FROM upload_batches b WHERE b.sink = s.name AND b.state = 'pending'),
       {_BATCHES.format(state="parked")},
       (SELECT coalesce(sum(b.readings), 0) FROM upload_batches b WHERE b.sink = s.name AND b.state = 'parked'),
       (SELECT count(*) FROM readings r WHERE (r.tx, r.id) > (s.cursor_tx, s.cursor_id)),
       {_LAG}
FROM upload_sinks s ORDER BY s.name
"""

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

RETRY_DEAD = """
UPDATE upload_batches SET state = 'pending', owner = NULL, lease_until = now(), attempts = 0, parked_at = NULL
WHERE sink = %s AND state = 'parked'
"""


def gzip_body(text: str, level: int) -> bytes:
    """The batch body; mtime 0 so the same lines always give the same bytes."""
    return gzip.compress(text.encode("utf-8") + b"\n" if text else b"", compresslevel=level, mtime=0)


# -- batches and verdicts ---------------------------------------------------


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


@dataclass(frozen=True)
class Reply:
    status: int
    retry_after: str | None = None
    body: str = ""


@dataclass(frozen=True)
class Verdict:
    kind: str  # "sent" | "retry" | "park"
    status: int | None = None
    error: str = ""
    response: str = ""
    delay: float = 0.0


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Retry-After as delay-seconds or an HTTP-date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def backoff(sink: Sink, attempt: int, rand: Callable[[], float]) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt))."""
    return rand() * min(sink.backoff_cap, sink.backoff * 2 ** min(attempt, 60))


def judge(sink: Sink, outcome: Reply | Failure, attempt: int, now: float, rand: Callable[[], float]) -> Verdict:
    """What to do after one attempt to send a batch."""
    if isinstance(outcome, Failure):
        text = describe_failure(outcome)
        return Verdict("retry", error=text, delay=backoff(sink, attempt, rand))
    status = outcome.status
    if 200 <= status < 300:
        return Verdict("sent", status)
    error = f"HTTP {status}" + (f": {outcome.body.strip().splitlines()[0][:200]}" if outcome.body.strip() else "")
    if status in (408, 429, 503):
        after = retry_after_seconds(outcome.retry_after, now)
        if after is not None:
            return Verdict("retry", status, error, outcome.body, min(after, RETRY_AFTER_CAP))
    if 400 <= status < 500 and status not in (408, 429):
        return Verdict("park", status, error, outcome.body)
    if 300 <= status < 400:
        error += " (redirects are not followed: give the final URL)"
    return Verdict("retry", status, error, outcome.body, backoff(sink, attempt, rand))


def describe_failure(f: Failure) -> str:
    """One line for a failed request, digging out the TLS or socket error underneath."""
    value = f.value
    if isinstance(value, CancelledError) or type(value).__name__ == "TimeoutError":
        return "no answer in time"
    reasons = getattr(value, "reasons", None)
    if reasons:
        return describe_failure(reasons[0])
    text = str(value).strip()
    if "certificate verify failed" in text or "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS: the server's certificate is not trusted (see --upload-ca)"
    if type(value).__name__ == "VerificationError":
        return f"TLS: the certificate does not name the host: {text}"
    return f"{type(value).__name__}: {text}"[:300] if text else type(value).__name__


# -- the database side --------------------------------------------------------


class Ledger:
    """Batches, cursors and counters of the sinks, in PostgreSQL."""

    def __init__(self, pool: PgPool, owner: str) -> None:
        self.pool = pool
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
            body = await deferToThread(gzip_body, text, sink.gzip_level)
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
        body = await deferToThread(gzip_body, text, sink.gzip_level)
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
        lines, after = reduce_rows(sink, rows, before)
        changed = {k: v for k, v in after.items() if before.get(k) != v}
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

    def sweep(self, age: float) -> Deferred:
        """Delete one chunk of readings older than ``age`` seconds that every sink has sent; fires with the count."""

        async def work(cur: Any) -> int:
            await cur.execute(UPLOADED_FRONTIER)
            frontier = cur.fetchone()
            bound = ""
            params: dict[str, Any] = {"age": age, "chunk": RETENTION_CHUNK}
            if frontier is not None:
                bound = "AND (r.tx, r.id) <= (%(tx)s::xid8, %(id)s)"
                params.update(tx=frontier[0], id=frontier[1])
            await cur.execute(RETENTION_DELETE.format(bound=bound), params)
            return int(cur.rowcount)

        return self._interaction(work)


# -- the HTTP side ----------------------------------------------------------


def trust_root(ca: Path | None) -> Any:
    """The CA certificates of a PEM file as a trust root; the platform's when None."""
    if ca is None:
        return None  # optionsForClientTLS then uses the platform's trust store
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(block) for block in ca_certificates(ca)])


@implementer(IPolicyForHTTPS)
class VerifyingPolicy:
    """Verify the certificate chain and the host name of every upload; TLS 1.2 or newer."""

    def __init__(self, root: Any = None) -> None:
        self._root = root

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self._root,
            extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
        )


class _Snippet(Protocol):
    """Reads a response body, keeping its first bytes."""

    def __init__(self, done: Deferred, limit: int) -> None:
        self.done = done
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.size < self.limit:
            self.parts.append(data[: self.limit - self.size])
        self.size += len(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(b"".join(self.parts))


class HTTPSender:
    """POSTs batches to one sink over a persistent, verified connection."""

    def __init__(
        self, reactor: Any, sink: Sink, content_type: bytes = b"application/x-ndjson", encoding: bytes | None = b"gzip"
    ) -> None:
        self.reactor = reactor
        self.sink = sink
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 2
        policy = VerifyingPolicy(trust_root(sink.ca))
        self.agent = Agent(reactor, contextFactory=policy, connectTimeout=sink.timeout, pool=self.pool)
        self._headers = [
            (b"Content-Type", content_type),
            *([(b"Content-Encoding", encoding)] if encoding else []),
            (b"User-Agent", f"txgateway/{__version__}".encode()),
            *[(name.encode("latin-1"), value.encode("latin-1")) for name, value in sink.headers],
        ]

    def send(self, batch: Batch) -> Deferred:
        headers = Headers()
        for name, value in self._headers:
            headers.addRawHeader(name, value)
        headers.addRawHeader(b"Idempotency-Key", batch.key.encode("ascii"))
        d = self.agent.request(b"POST", self.sink.url.encode("ascii"), headers, FileBodyProducer(BytesIO(batch.body)))

        def read(response: Any) -> Deferred:
            done: Deferred = Deferred()
            response.deliverBody(_Snippet(done, RESPONSE_KEEP))
            retry_after = response.headers.getRawHeaders(b"retry-after", [None])[0]
            return done.addCallback(
                lambda body: Reply(
                    response.code,
                    retry_after.decode("latin-1") if retry_after else None,
                    body.decode("utf-8", "replace"),
                )
            )

        d.addCallback(read)
        d.addTimeout(self.sink.timeout, self.reactor)
        return d

    def close(self) -> Deferred:
        return self.pool.closeCachedConnections()


# -- one sink's loop ----------------------------------------------------------


@dataclass
class SinkCounters:
    batches_sent: int = 0
    readings_sent: int = 0
    failures: int = 0
    parked: int = 0
    last_error: str = ""
    last_sent_at: float | None = None


class SinkUploader:
    """
    Sends one sink's batches, one at a time and in order: a batch is cut
    when a full one is ready (the store says so as it commits) or when its
    oldest reading has waited ``flush`` seconds (plus jitter, so a fleet of
    gateways does not flush in step). A failed batch is retried until it is
    sent or refused for good; the next one waits in PostgreSQL meanwhile.
    """

    JITTER = 0.2
    AHEAD = 2  # batches made ready while one is being sent

    def __init__(
        self,
        sink: Sink,
        ledger: Any,
        sender: Any,
        clock: IReactorTime,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.sink = sink
        self.ledger = ledger
        self.sender = sender
        self.clock = clock
        self.rand = rand
        self.counters = SinkCounters()
        self.paused = False
        self._batch: Batch | None = None
        self._ready: deque[Batch] = deque()  # made, to be sent in this order
        self._ahead: deque[Deferred] = deque()  # being made: each fires with list[Batch] or Wait
        self._cutting = DeferredLock()  # cuts one at a time, so batches queue in cursor order
        self.holding: set[int] = set()  # ids of the batches in memory
        self._fresh = 0
        self._force = False
        self._timer: Any = None
        self._wake_at: float | None = None
        self._cycle: Deferred | None = None
        self._request: Deferred | None = None
        self._db_failures = 0
        self._stopping = False

    # -- control -------------------------------------------------------

    def start(self) -> None:
        self._schedule(self.sink.flush * self.JITTER * self.rand())

    def stop(self) -> Deferred:
        """Stop; an unfinished batch stays with this gateway and is sent after a restart."""
        self._stopping = True
        self._cancel_timer()
        if self._request is not None:
            self._request.cancel()
        pending = [self._cycle] if self._cycle is not None else []
        for ahead in self._ahead:
            ahead.addErrback(lambda _: None)  # the batch stays in the database, with this gateway
            pending.append(ahead)
        return gatherResults(pending).addCallback(lambda _: None)

    def committed(self, count: int) -> None:
        """The store committed ``count`` new readings: wake early once a full batch is waiting."""
        self._fresh += count
        if self._fresh >= self.sink.batch and self._batch is None and self._timer is not None:
            self._schedule(0)

    def flush(self) -> None:
        """Send what is waiting now, full batch or not."""
        self._force = True
        if self._cycle is None:
            self._schedule(0)

    def pause(self) -> None:
        self.paused = True
        self._cancel_timer()

    def resume(self) -> None:
        self.paused = False
        if self._cycle is None:
            self._schedule(0)

    @property
    def next_wake(self) -> float | None:
        return self._wake_at if self._timer is not None else None

    # -- the loop ------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay: float) -> None:
        self._cancel_timer()
        if self._stopping or self.paused:
            return
        self._wake_at = self.clock.seconds() + delay
        self._timer = self.clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        if self._cycle is not None or self._stopping or self.paused:
            return
        self._cycle = Deferred.fromCoroutine(self._run())
        self._cycle.addErrback(self._crashed).addBoth(self._ended)

    def _ended(self, _: Any) -> None:
        self._cycle = None

    def _crashed(self, f: Failure) -> None:
        log.failure("uploader of sink {sink} failed; retrying", f, sink=self.sink.name)
        self._schedule(self._db_delay())

    def _db_delay(self) -> float:
        self._db_failures += 1
        return (0.5 + 0.5 * self.rand()) * min(30.0, 0.5 * 2 ** min(self._db_failures, 10))

    async def _run(self) -> None:
        while not self._stopping and not self.paused:
            try:
                delay = await self._step()
            except Exception as e:
                if self._stopping:
                    return
                log.warn(
                    "uploader of sink {sink}: the database is unavailable: {error}",
                    sink=self.sink.name,
                    error=_first_line(e),
                )
                self._schedule(self._db_delay())
                return
            self._db_failures = 0
            if delay is not None:
                self._schedule(delay)
                return

    async def _prepare(self) -> list[Batch] | Wait:
        """The next batch (one left behind first, else a new one) with its body; or Wait."""
        async with self._cutting:
            batch = await self.ledger.claim(self.sink, self.holding)
            if batch is None:
                batch = await self.ledger.cut(self.sink, force=self._force)
                if isinstance(batch, Wait):
                    return batch
            self.holding.add(batch.id)
        try:
            batches = await self.ledger.fill(self.sink, batch)
        except Exception:
            self.holding.discard(batch.id)  # claimed again (by this gateway) on the next try
            raise
        self.holding.update(b.id for b in batches)
        return batches

    async def _next(self) -> float | None:
        """Take the next batch to send, or a delay to wait for one."""
        if not self._ready:
            made = await (self._ahead.popleft() if self._ahead else self._prepare())
            if isinstance(made, Wait):
                self._fresh = 0
                self._force = False
                return made.seconds + self.sink.flush * self.JITTER * self.rand()
            self._ready.extend(made)
        self._batch = self._ready.popleft()
        while len(self._ahead) < self.AHEAD and not self._stopping:
            self._ahead.append(Deferred.fromCoroutine(self._prepare()))
        return None

    async def _step(self) -> float | None:
        """One move; returns a delay to sleep for, or None to go on at once."""
        if self._batch is None:
            delay = await self._next()
            if delay is not None:
                return delay
        batch = self._batch
        assert batch is not None
        if batch.verdict is None:
            self._request = self.sender.send(batch)
            try:
                outcome: Reply | Failure = await self._request
            except Exception:
                outcome = Failure()
            finally:
                self._request = None
            if self._stopping:
                return None
            batch.verdict = judge(self.sink, outcome, batch.attempts, self.clock.seconds(), self.rand)
            self._note(batch)
        await self.ledger.record(self.sink, batch)
        verdict = batch.verdict
        if verdict.kind == "retry":
            batch.attempts += 1
            batch.verdict = None
            return verdict.delay
        self._batch = None
        self.holding.discard(batch.id)
        return None

    def _note(self, batch: Batch) -> None:
        verdict = batch.verdict
        assert verdict is not None
        c = self.counters
        if verdict.kind == "sent":
            c.batches_sent += 1
            c.readings_sent += batch.readings
            c.last_sent_at = self.clock.seconds()
            if batch.attempts:
                log.info(
                    "sink {sink}: batch {key} sent after {attempts} retries",
                    sink=self.sink.name,
                    key=batch.key,
                    attempts=batch.attempts,
                )
            return
        c.last_error = verdict.error
        if verdict.kind == "park":
            c.parked += 1
            log.error(
                "sink {sink} refused batch {key} ({readings} readings) with {error}; it is parked "
                "(gatewayctl upload retry-dead {sink} sends it again)",
                sink=self.sink.name,
                key=batch.key,
                readings=batch.readings,
                error=verdict.error,
                status=verdict.status,
            )
        else:
            c.failures += 1
            log_at = log.warn if batch.attempts == 0 or batch.attempts % 10 == 0 else log.debug
            log_at(
                "sink {sink}: batch {key} not sent ({error}); retry {attempt} in {delay:.1f}s",
                sink=self.sink.name,
                key=batch.key,
                error=verdict.error,
                attempt=batch.attempts + 1,
                delay=verdict.delay,
                status=verdict.status,
            )


# -- the service -----------------------------------------------------------


def gateway_id(data_dir: Path) -> str:
    """This gateway's name in batch claims, kept in DATA_DIR/gateway-id across restarts."""
    path = data_dir / "gateway-id"
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    text = f"{socket.gethostname()}/{uuid.uuid4()}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return text


class Retention(Service):
    """Deletes old readings that every sink has sent, a chunk at a time."""

    name = "retention"

    def __init__(self, ledger: Ledger, age: float, clock: IReactorTime) -> None:
        self.ledger = ledger
        self.age = age
        self.loop = LoopingCall(self.sweep)
        self.loop.clock = clock
        self.deleted = 0

    def startService(self) -> None:
        super().startService()
        self.loop.start(RETENTION_INTERVAL, now=True).addErrback(lambda f: log.failure("retention stopped", f))

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self.loop.running:
            self.loop.stop()
        return None

    async def _sweep(self) -> None:
        total = 0
        try:
            for _ in range(RETENTION_CHUNKS_PER_RUN):
                count = await self.ledger.sweep(self.age)
                total += count
                if count < RETENTION_CHUNK or not self.running:
                    break
        except Exception as e:
            log.warn("retention: old readings not deleted yet: {error}", error=str(e).splitlines()[0] if str(e) else e)
        if total:
            self.deleted += total
            log.info("retention: deleted {count} readings already uploaded", count=total)

    def sweep(self) -> Deferred:
        return Deferred.fromCoroutine(self._sweep())


class Uploader(MultiService):
    """Every sink's loop, the batch ledger on its own database connections, and retention."""

    name = "uploader"

    def __init__(
        self, reactor: Any, sinks: tuple[Sink, ...], owner: str, retention: float | None = None, pool_size: int = 3
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.sinks = sinks
        self.pool = PgPool(reactor, pool_size)
        self.ledger = Ledger(self.pool, owner)
        self.loops = {sink.name: self._loop(sink) for sink in sinks}
        self.retention: Retention | None = None
        if retention is not None:
            self.retention = Retention(self.ledger, retention, reactor)
            self.retention.setServiceParent(self)
        # The sinks' state in the database (lag, batches), read every few seconds for /healthz and /metrics.
        self._live: dict[str, dict[str, Any]] = {}
        self._monitor = LoopingCall(self.look)
        self._monitor.clock = reactor

    def _loop(self, sink: Sink) -> SinkUploader:
        return SinkUploader(sink, self.ledger, HTTPSender(self.reactor, sink), self.reactor)

    async def connect(self, dsn: str) -> None:
        """Open the connections and register the sinks; errbacks when the database cannot be reached."""
        up = await self.pool.start(dsn)
        if up == 0:
            raise ConnectionError(f"no connection for the uploader: {self.pool.last_error}")
        known = await self.ledger.register(list(self.sinks))
        self._warn_unconfigured(known)

    def _warn_unconfigured(self, known: list[str]) -> None:
        for name in sorted(set(known) - set(self.loops)):
            log.warn(
                "sink {sink} is in the database but not configured here: its unsent readings are kept "
                "(retention waits for it); `gatewayctl upload remove {sink}` forgets it",
                sink=name,
            )

    def committed(self, count: int) -> None:
        for loop in self.loops.values():
            loop.committed(count)

    def startService(self) -> None:
        super().startService()
        for loop in self.loops.values():
            self._start_loop(loop)
        self._monitor.start(MONITOR_INTERVAL, now=True)

    @staticmethod
    def _start_loop(loop: SinkUploader) -> None:
        loop.start()
        log.info("uploading to sink {sink} at {url}", sink=loop.sink.name, url=loop.sink.url)

    # -- watching ------------------------------------------------------

    def look(self) -> Deferred:
        """Read every sink's lag and batches from the database (never errbacks)."""
        names = sorted(self.loops)

        def got(rows: list[tuple]) -> None:
            now = self.reactor.seconds()
            self._live = {row[0]: {**dict(zip(LIVE_FIELDS, row[1:])), "checked_at": now} for row in rows}

        def failed(f: Failure) -> None:
            log.debug("sink status not read: {error}", error=_first_line(f.value))

        d = self.pool.run(lambda c: c.runQuery(LIVE_STATUS, (names,)))
        return d.addCallbacks(got, failed)

    def sink_status(self) -> dict[str, dict[str, Any]]:
        """Per configured sink: the database's figures (as last read) and this process's counters."""
        out = {}
        for name, loop in sorted(self.loops.items()):
            live = self._live.get(name, {"checked_at": None})
            c = loop.counters
            out[name] = {
                **live,
                "paused": loop.paused,
                "batches_sent": c.batches_sent,
                "readings_sent": c.readings_sent,
                "failures": c.failures,
                "parked": c.parked,
                "last_error": c.last_error,
            }
        return out

    # -- changing sinks while running (SIGHUP) ------------------------------

    async def reconfigure(self, sinks: tuple[Sink, ...]) -> list[str]:
        """Take a new list of sinks: stop removed and changed ones, start new and changed ones. Says what changed."""
        old = {loop.sink.name: loop.sink for loop in self.loops.values()}
        new = {sink.name: sink for sink in sinks}
        changes = []
        for name in sorted(old):
            if new.get(name) != old[name]:
                loop = self.loops.pop(name)
                await loop.stop()
                await loop.sender.close()
                if name not in new:
                    changes.append(f"sink {name} removed")
        added = [sink for name, sink in new.items() if old.get(name) != sink]
        if added:
            self._warn_unconfigured(await self.ledger.register(added))
        for sink in added:
            loop = self.loops[sink.name] = self._loop(sink)
            changes.append(f"sink {sink.name} {'changed' if sink.name in old else 'added'}")
            if self.running:
                self._start_loop(loop)
        self.sinks = sinks
        if changes and self.running:
            self.look()
        return changes

    async def _stop(self) -> None:
        if self._monitor.running:
            self._monitor.stop()
        for loop in self.loops.values():
            await loop.stop()
        await super().stopService()
        for loop in self.loops.values():
            await loop.sender.close()
        await self.pool.close()

    def stopService(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())
