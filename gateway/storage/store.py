"""
The store on PostgreSQL: IStore (``storage.interface``) with group
commit, the outage journal and remembered credentials.

Durability argument (PostgresStore). ``write`` hands the device's readings
to the group commit queue; its Deferred fires only after the statement
holding them has committed. Each batch is one statement outside an
explicit transaction, so its successful return *is* the COMMIT (with fsync
and synchronous_commit on): ``INSERT … SELECT … FROM unnest(…) ON CONFLICT
DO NOTHING`` for the readings, the digital twin's newer-only upsert of the
latest value per (device, metric), and a count of the rows inserted. Rows
are sorted by the natural key before insertion, and twin rows by (device,
metric), so two batches that overlap take their locks in the same order
and cannot deadlock each other; a deadlock or serialisation failure from
elsewhere is retried. The natural key (device, metric, ts) makes a
retransmission a no-op: when fewer rows were inserted than sent, the rows
carrying the batch's transaction id (the ``tx`` column) are the new ones,
the rest are duplicates.

Readings hold their metric's id in the metric dictionary (``metrics``):
names this process has not seen there yet are added by a statement of
their own, committed before the batch (a batch that then fails leaves
only names behind), and the batch statement maps names to ids. A name
missing from the dictionary is refused by the database (``metric_id`` is
NOT NULL), never dropped or counted as a duplicate.

When the server refuses a batch for its data (a constraint, a value out
of range, an encoding error), the batch is split in halves and retried
until the refused readings stand alone: everything else commits, and only
the writers whose readings were refused get an error, naming the reading.
A lost connection fails the batch as StoreUnavailable: nothing is
acknowledged, and the devices send again.

Readings that failed a quality rule travel with the readings: the same
group commit (their own statement in the batch, committed before the
readings' statement returns, so before any answer) and, during an outage,
the same journal record.

With a journal (``storage.journal``), a write that the database cannot take
now (no connection is up, the batch's connection was lost, or the queue is
full) is appended to the journal instead and acknowledged once the journal
is fsync'd. Whether the lost batch committed or not does not matter: the
journal's copy is replayed through the same idempotent INSERT, in order,
once a connection is up again, and each segment is deleted only after all
of its readings have committed. Devices that authenticated before the
outage keep being recognised from the last answer the database gave
(``storage.credentials``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Iterator, Sequence

import psycopg2
import psycopg2.errors
from twisted.application.service import Service
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.families import counter, gauge
from gateway.storage.cold import HOUR_OF, already_cold, offset_of
from gateway.storage.credentials import Credentials
from gateway.storage.interface import IStore
from gateway.storage.groupcommit import Closed, GroupCommit, Overloaded
from gateway.storage.lastseen import LastSeen
from gateway.storage.journal import Journal, Scan, encode
from gateway.storage.pool import PgPool, first_line, is_connection_error
from gateway.storage.queries import ADD_METRICS, twin_upsert
from gateway.readings import (
    Device,
    Quarantined,
    Reading,
    Source,
    StoreOverloaded,
    StoreRejected,
    StoreUnavailable,
    WriteResult,
)

log = Logger()

DEADLOCK_RETRIES = 5
MAX_REJECTS_IN_FLIGHT = 64
CHECK_TIMEOUT = 2.0
REPLAY_INTERVAL = 1.0  # how often to look for journal segments to replay
MAX_METRICS_KNOWN = 100_000  # metric names remembered as in the dictionary


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
    ON CONFLICT (device_id, client_id) DO UPDATE SET expiry_seconds = EXCLUDED.expiry_seconds, ended_at = NULL
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


@implementer(IStore)
class PostgresStore(Service):
    def __init__(
        self,
        reactor: Any,
        *,
        clock: IReactorTime | None = None,
        pool_size: int = 4,
        max_batch: int = 5000,
        commit_delay: float = 0.0,
        max_queue: int = 100_000,
        journal: Journal | None = None,
    ) -> None:
        self._clock = clock or reactor
        self.pool = PgPool(reactor, pool_size)
        self.pool.on_connect = self._prepare
        self.committer: GroupCommit[Write | tuple[Write, ...]] = GroupCommit(
            self._clock,
            self._commit,
            slots=pool_size,
            max_batch=max_batch,
            max_delay=commit_delay,
            max_queue=max_queue,
            keys=_devices_of,
        )
        self.credentials = Credentials(
            lambda sql, params: self.pool.run(lambda c: c.runQuery(sql, params)), self._clock, journal is not None
        )
        self.journal = journal
        self._replay_loop = LoopingCall(self._replay_due)
        self._replay_loop.clock = self._clock
        self._replaying: Deferred | None = None
        self.journaled_readings = 0  # acknowledged from the journal
        self.replayed_readings = 0  # committed from the journal (new or found stored)
        self.last_seen = LastSeen(lambda sql, params: self.pool.run(lambda c: c.runOperation(sql, params)), self._clock)
        self._rejects_in_flight = 0
        self.batches = 0
        self.commit_seconds = 0.0
        self.listeners: list[Callable[[int], None]] = []  # told how many new readings each batch committed
        self.metrics_known: set[str] = set()  # names the metric dictionary is known to hold (MAX_METRICS_KNOWN)
        self.batch_observers: list[Callable[[int, float], None]] = []  # told each batch's size and duration

    # -- lifecycle -----------------------------------------------------

    def connect(self, dsn: str) -> Deferred:
        """Open the pool; fires with the number of connections up."""
        return self.pool.start(dsn)

    def startService(self) -> None:
        super().startService()
        self.last_seen.start()
        if self.journal is not None:
            self._replay_loop.start(REPLAY_INTERVAL, now=True)

    async def _stop(self) -> None:
        if self._replay_loop.running:
            self._replay_loop.stop()
        await self.committer.close()
        if self._replaying is not None:
            await self._replaying
        await self.last_seen.stop()
        await self.pool.close()

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    # -- IStore --------------------------------------------------------

    def write(
        self,
        device: Device,
        readings: Sequence[Reading],
        source: Source | None = None,
        quarantined: Sequence[Quarantined] = (),
    ) -> Deferred:
        if not readings and not quarantined:
            return succeed(WriteResult(0, 0))
        text = str(source) if source is not None else ""
        write = Write(device.id, readings, quarantined, text)
        size = len(readings) + len(quarantined)
        return self._submit(device, write, size)

    def write_many(
        self,
        device: Device,
        parts: Sequence[tuple[Sequence[Reading], Sequence[Quarantined]]],
        source: Source | None = None,
    ) -> Deferred:
        text = str(source) if source is not None else ""
        writes = tuple(Write(device.id, readings, quarantined, text) for readings, quarantined in parts)
        return self._submit(device, writes, sum(len(w.readings) + len(w.quarantined) for w in writes))

    def _submit(self, device: Device, item: Write | tuple[Write, ...], size: int) -> Deferred:
        """Queue a write (or several as one item: one answer, a list) for the next batch, or journal it."""
        journal = self.journal
        if journal is not None and (self.pool.up == 0 or not self.committer.has_room(size)):
            return self._to_journal(device, item)
        d = self.committer.submit(item, size)
        if journal is not None:
            d.addErrback(self._journal_instead, device, item)
        return d.addErrback(self._translate)

    def _journal_instead(self, f: Failure, device: Device, item: Write | tuple[Write, ...]) -> Any:
        """The database could not take the write (it went away, or the queue is full): journal it."""
        if f.check(Overloaded, StoreUnavailable) and not self.committer.closed:
            return self._to_journal(device, item)
        return f

    def _to_journal(self, device: Device, write: Write | tuple[Write, ...]) -> Deferred:
        if isinstance(write, tuple):
            each = gatherResults([self._to_journal(device, w) for w in write], consumeErrors=True)
            return each.addErrback(_first_failure)
        assert self.journal is not None
        size = len(write.readings)

        def synced(_: Any) -> WriteResult:
            self.journaled_readings += size
            return WriteResult(size, 0)

        record = encode(device.id, device.name, write.source, write.readings, write.quarantined)
        return self.journal.append(record).addCallback(synced)

    @staticmethod
    def _translate(f: Failure) -> Failure:
        if f.check(Overloaded):
            return Failure(StoreOverloaded(str(f.value)))
        if f.check(Closed):
            return Failure(StoreUnavailable(str(f.value)))
        return f

    def authenticate(self, token: str) -> Deferred:
        return self.credentials.authenticate(token)

    def device_key(self, name: str) -> Deferred:
        return self.credentials.device_key(name)

    def session_begins(self, device_id: int, client_id: str, clean_start: bool, expiry: int) -> Deferred:
        statement = SESSION_KEEP if expiry > 0 else SESSION_DROP
        params = {"d": device_id, "c": client_id, "e": expiry}
        d = self.pool.run(lambda c: c.runQuery(statement, params))
        return d.addCallback(lambda rows: bool(rows[0][0]) and not clean_start)

    def session_ends(self, device_id: int, client_id: str) -> Deferred:
        return self.pool.run(lambda c: c.runOperation(SESSION_ENDS, (device_id, client_id)))

    def query(self, sql: str, params: Any = None) -> Deferred:
        """One query on a writer connection (rows); for the store's own helpers, not for the hot path."""
        return self.pool.run(lambda c: c.runQuery(sql, params))

    def known_devices(self) -> int:
        """How many devices' credentials are held (known from the last run or seen since)."""
        return int(self.credentials.known)

    def last_error(self) -> str:
        """Why the last connection attempt failed, as one line."""
        return str(self.pool.last_error)

    def forget_credentials(self, names: list[str] | None = None) -> None:
        """Devices changed (revoked, rotated): look every token up again; forget the named for outages."""
        self.credentials.forget(names)

    def _insert_rejected(self, source: str, reason: str, raw: bytes, device: str | None = None) -> Deferred:
        """Insert into rejected_input; errbacks if it could not be kept."""
        return self.pool.run(lambda c: c.runOperation(INSERT_REJECTED, (source, device, reason, psycopg2.Binary(raw))))

    def keep_rejected_input(self, source: Source, reason: str, raw: bytes, device: str | None = None) -> Deferred:
        if self._rejects_in_flight >= MAX_REJECTS_IN_FLIGHT:
            log.warn("rejected input from {source} not kept: too many being written", source=source)
            return succeed(None)
        self._rejects_in_flight += 1
        d = self._insert_rejected(str(source), reason, raw, device)

        def done(result: Any) -> None:
            self._rejects_in_flight -= 1
            if isinstance(result, Failure):
                log.warn(
                    "rejected input from {source} not kept: {error}",
                    source=source,
                    error=first_line(result.value),
                )

        return d.addBoth(done)

    def check(self) -> Deferred:
        answer = self.pool.run(lambda c: c.runQuery("SELECT 1")).addCallback(lambda _: None)
        return within(answer, CHECK_TIMEOUT, self._clock, StoreUnavailable(f"no answer in {CHECK_TIMEOUT:g}s"))

    @property
    def batches_in_flight(self) -> int:
        return self.committer.in_flight

    @property
    def queue_depth(self) -> int:
        return self.committer.queued

    def journal_status(self) -> dict[str, Any] | None:
        """The journal's figures for /healthz and the console; None without a journal."""
        journal = self.journal
        if journal is None:
            return None
        return {
            "bytes": journal.size,
            "limit": journal.max_bytes,
            "segments": journal.segments,
            "ok": not journal.full,
            "replaying": self._replaying is not None,
        }

    def has_room(self, size: int) -> bool:
        return self.committer.has_room(size)

    def admits(self, size: int) -> bool:
        return self.committer.admits(size)

    def wait_for_room(self) -> Deferred:
        return self.committer.wait_for_room()

    def reconfigure(self, max_queue: int) -> None:
        """Settings a SIGHUP changes: the readings that may wait before writers get 503."""
        self.committer.set_max_queue(max_queue)

    def live_metrics(self) -> Iterator[Any]:
        """The store's figures for /metrics, read at scrape time."""
        yield gauge("gateway_store_queue_readings", "Readings waiting for COMMIT.", self.queue_depth)
        yield gauge(
            "gateway_store_queue_limit", "Readings that may wait before writers get 503.", self.committer.max_queue
        )
        yield gauge("gateway_database_connections", "Open connections of the store's pool.", self.pool.up)
        journal = self.journal
        if journal is None:
            return
        for name, text, value in (
            ("bytes", "Bytes in the outage journal (on disk and being written).", journal.size),
            ("limit_bytes", "--journal-max-bytes.", journal.max_bytes),
            ("segments", "Segment files in the outage journal.", journal.segments),
        ):
            yield gauge(f"gateway_journal_{name}", text, value)
        for name, text, value in (
            ("readings_written", "Readings acknowledged from the journal.", self.journaled_readings),
            ("readings_replayed", "Journal readings committed (new or found stored).", self.replayed_readings),
            ("fsyncs", "Journal group fsyncs.", journal.fsyncs),
            ("damaged_records", "Damaged journal regions moved aside to journal/damaged/.", journal.damaged_regions),
            ("torn_bytes", "Bytes of torn last writes dropped after a crash.", journal.torn_bytes),
        ):
            yield counter(f"gateway_journal_{name}", text, [], value)

    # -- the batch -----------------------------------------------------

    def _commit(self, items: list[Write | tuple[Write, ...]]) -> Deferred:
        writes: list[Write] = []
        grouped = False
        for item in items:
            if isinstance(item, tuple):
                writes += item
                grouped = True
            else:
                writes.append(item)
        d = self.pool.run(lambda conn: Deferred.fromCoroutine(self._write_batch(conn, writes)))
        return d.addCallback(_regroup, items) if grouped else d

    async def _write_batch(self, conn: Any, items: list[Write]) -> list[Any]:
        started = time.perf_counter()
        held = await self._quarantine(conn, items) if any(w.quarantined for w in items) else {}
        rows = [
            (w.device_id, metric, ts_us, value, i, j)
            for i, w in enumerate(items)
            for j, (metric, ts_us, value) in enumerate(w.readings)
        ]
        inserted, refused = await self._insert_isolating(conn, rows) if rows else (None, {})
        if inserted is None:
            # Every row is new: the usual case, with no need to say which.
            outcomes: list[Any] = [WriteResult(len(w.readings), 0) for w in items]
            added = len(rows)
        else:
            outcomes, added, stored_before = _outcomes(len(items), rows, inserted, refused)
            if stored_before:
                # Only readings stored before are looked at again: a retransmission's cost, not every write's.
                for i, count in (await self._conflicts(conn, stored_before, items)).items():
                    if isinstance(outcomes[i], WriteResult):
                        w = outcomes[i]
                        outcomes[i] = WriteResult(w.accepted, w.duplicates - count, w.quarantined, count)
        for i, error in held.items():
            if not isinstance(outcomes[i], StoreRejected):
                outcomes[i] = error
        for w, outcome in zip(items, outcomes):
            self.last_seen.heard(w.device_id, w.source, outcome.accepted if isinstance(outcome, WriteResult) else 0)
        elapsed = time.perf_counter() - started
        self.batches += 1
        self.commit_seconds += elapsed
        for observe in self.batch_observers:
            observe(len(rows), elapsed)
        if added:
            for listener in self.listeners:
                listener(added)
        return outcomes

    async def _conflicts(self, conn: Any, rows: list[tuple], items: list[Write]) -> dict[int, int]:
        """Of rows whose key was stored before, those stored with another value: kept aside, counted per writer."""
        columns = (
            [r[4] for r in rows],
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            [items[r[4]].source for r in rows],
        )
        found = await conn.runQuery(CONFLICTS, columns)
        counts: dict[int, int] = {}
        for (i,) in found:
            counts[i] = counts.get(i, 0) + 1
        return counts

    async def _quarantine(self, conn: Any, items: list[Write]) -> dict[int, StoreRejected]:
        """
        Keep the batch's quarantined readings, committed before the readings'
        statement returns (so before any answer). A statement the database
        refuses for its data is tried again writer by writer: only the
        writers whose quarantined readings were refused get an error.
        """
        refused: dict[int, StoreRejected] = {}
        groups = [[(i, w) for i, w in enumerate(items) if w.quarantined]]
        while groups:
            group = groups.pop()
            columns: tuple[list[Any], ...] = ([], [], [], [], [], [])
            for _, w in group:
                for q in w.quarantined:
                    for column, value in zip(columns, (w.device_id, *q.reading, q.rule, w.source)):
                        column.append(value)
            try:
                await conn.runOperation(INSERT_QUARANTINE, columns)
            except (psycopg2.DataError, psycopg2.IntegrityError) as e:
                if len(group) > 1:
                    groups += [[pair] for pair in group]
                    continue
                i, w = group[0]
                log.warn(
                    "the database refused a quarantined reading of device {device_id}: {error}",
                    device_id=w.device_id,
                    error=first_line(e),
                )
                refused[i] = StoreRejected(
                    f"quarantine[{w.quarantined[0].index}]: the database refused it: {first_line(e)}",
                    w.quarantined[0].index,
                )
        return refused

    async def _insert(self, conn: Any, rows: list[tuple]) -> list[tuple[int, str, int]] | None:
        """
        Insert in one transaction (one statement, committed when it returns, after the rows' new metric
        names are added): None when every row was new, else the keys (device, metric, µs) of the new ones.
        """
        await self._add_metrics(conn, rows)
        columns = array_literals(rows)
        for attempt in range(DEADLOCK_RETRIES):
            statement = EXECUTE_WRITE_BATCH if getattr(conn, "batch_prepared", False) else WRITE_BATCH
            try:
                ((inserted, tx),) = await conn.runQuery(statement, columns)
                return None if inserted == len(rows) else await conn.runQuery(NEW_IN_TRANSACTION, (tx,))
            except (psycopg2.errors.DeadlockDetected, psycopg2.errors.SerializationFailure) as e:
                if attempt == DEADLOCK_RETRIES - 1:
                    raise StoreUnavailable(f"the database kept aborting the batch: {first_line(e)}") from e
            except psycopg2.errors.InvalidSqlStatementName:
                # Prepared on a server connection that this session no longer has (a pooler in between).
                conn.batch_prepared = False
                log.warn("the batch statement's preparation was lost: the full statement is sent from now on")
                return await self._insert(conn, rows)
        raise AssertionError("unreachable")

    async def _add_metrics(self, conn: Any, rows: list[tuple]) -> None:
        """The names of rows' metrics that the dictionary may lack, added (committed) before the rows."""
        names = {r[1] for r in rows}
        names.difference_update(self.metrics_known)
        if not names:
            return
        await conn.runOperation(ADD_METRICS, (sorted(names),))
        if len(self.metrics_known) + len(names) > MAX_METRICS_KNOWN:
            self.metrics_known.clear()  # a fleet of more names: some are added again, a no-op each
        if len(names) <= MAX_METRICS_KNOWN:
            self.metrics_known.update(names)

    def _prepare(self, conn: Any) -> Deferred:
        """A new connection: prepare the batch statement on it (without, the full one is sent each time)."""

        def done(result: Any) -> Any:
            conn.batch_prepared = not isinstance(result, Failure)
            if isinstance(result, Failure):
                if is_connection_error(result.value):
                    return result  # the connection is dropped and made again
                log.warn(
                    "the batch statement is not prepared: {error}; the full statement is sent each time",
                    error=first_line(result.value),
                )
            return None

        return conn.runOperation(PREPARE_WRITE_BATCH).addBoth(done)

    async def _insert_isolating(
        self, conn: Any, rows: list[tuple]
    ) -> tuple[list[tuple[int, str, int]] | None, dict[int, tuple[tuple, str]]]:
        """Insert rows; on a data error, bisect until the refused rows stand alone. None: every row was new."""
        try:
            return await self._insert(conn, rows), {}
        except (psycopg2.DataError, psycopg2.IntegrityError) as e:
            if len(rows) == 1:
                log.warn(
                    "the database refused a reading of device {device_id}, metric {metric}: {error}",
                    device_id=rows[0][0],
                    metric=rows[0][1],
                    error=first_line(e),
                )
                return [], {id(rows[0]): (rows[0], first_line(e))}
        half = len(rows) // 2
        parts = [rows[:half], rows[half:]]
        inserted: list[tuple[int, str, int]] = []
        refused: dict[int, tuple[tuple, str]] = {}
        for part in parts:
            new, part_refused = await self._insert_isolating(conn, part)
            inserted += [(r[0], r[1], r[2]) for r in part] if new is None else new
            refused.update(part_refused)
        return inserted, refused

    # -- journal replay --------------------------------------------------

    def _replay_due(self) -> None:
        journal = self.journal
        if journal is None or self._replaying is not None or self.committer.closed or self.pool.up == 0:
            return
        if not journal.size:
            return
        journal.seal()
        if not journal.sealed():
            return

        def done(result: Any) -> None:
            self._replaying = None
            if isinstance(result, Failure):
                if result.check(StoreUnavailable, StoreOverloaded, Closed, Overloaded):
                    log.info("journal replay paused: {error}", error=first_line(result.value))
                else:
                    log.failure("journal replay failed", result)

        self._replaying = Deferred.fromCoroutine(self.replay())
        self._replaying.addBoth(done)

    async def replay(self) -> int:
        """Commit every sealed journal segment, oldest first, deleting each once done; return readings."""
        assert self.journal is not None
        total = 0
        for path in self.journal.sealed():
            result: Scan = await self.journal.read(path)
            self._report_damage(path, result)
            new = duplicates = 0
            pending: list[tuple[Any, Deferred]] = []
            for record in result.records:
                if not self.committer.has_room(len(record.readings) + len(record.quarantined)):
                    new, duplicates = await self._replayed(pending, new, duplicates)
                    pending = []
                    await self.committer.wait_for_room()
                write = Write(record.device_id, record.readings, record.quarantined, record.source)
                size = len(record.readings) + len(record.quarantined)
                submitted = self.committer.submit(write, size)
                pending.append((record, submitted))
            new, duplicates = await self._replayed(pending, new, duplicates)
            await self.journal.remove(path)
            self.replayed_readings += new + duplicates
            total += new + duplicates
            log.info(
                "journal: replayed {segment}: {new} readings stored, {duplicates} were stored already",
                segment=path.name,
                new=new,
                duplicates=duplicates,
            )
        return total

    async def _replayed(self, pending: list[tuple[Any, Deferred]], new: int, duplicates: int) -> tuple[int, int]:
        """Wait for submitted journal records; keep those the database refuses; raise if it went away."""
        from twisted.internet.defer import DeferredList

        outcomes = await DeferredList([d for _, d in pending], consumeErrors=True)
        error: Failure | None = None
        for (record, _), (ok, outcome) in zip(pending, outcomes):
            if ok:
                new += outcome.accepted
                duplicates += outcome.duplicates
            elif outcome.check(StoreRejected):
                # Acknowledged to the device long ago: it must not vanish. The other readings committed.
                await self._insert_rejected(
                    record.source,
                    f"rejected_by_database: {outcome.value.message} (replayed from the journal)",
                    record.payload,
                    record.device,
                )
            elif error is None:
                error = outcome
        if error is not None:
            error.raiseException()
        return new, duplicates

    def _report_damage(self, path: Any, result: Scan) -> None:
        assert self.journal is not None
        self.journal.counted(result)
        if result.torn:
            log.info(
                "journal: dropped {bytes} bytes at the end of {segment}: a write cut short by a crash, "
                "never acknowledged",
                bytes=result.torn,
                segment=path.name,
            )
        for offset, region in result.damaged:
            log.warn(
                "journal: {bytes} damaged bytes at offset {offset} of {segment} moved to {aside}; "
                "the records around them are replayed",
                bytes=len(region),
                offset=offset,
                segment=path.name,
                aside=str(self.journal.damaged_dir / f"{path.stem}-{offset}.bad"),
            )
