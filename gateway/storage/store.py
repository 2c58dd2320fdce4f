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

import ipaddress
import time
from typing import Any
from collections.abc import Callable, Iterator, Sequence

import psycopg2
import psycopg2.errors
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.reactor import Reactor
from gateway.families import counter, gauge
from gateway.storage.credentials import Credentials
from gateway.storage.interface import IStore
from gateway.storage.groupcommit import Closed, GroupCommit, Overloaded
from gateway.storage.lastseen import LastSeen
from gateway.storage.journal import Journal, Scan, encode
from gateway.storage.pool import PgPool, first_line, is_connection_error
from gateway.storage.queries import ADD_METRICS
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
from gateway.storage.writes import (
    WRITE_BATCH,
    PREPARE_WRITE_BATCH,
    EXECUTE_WRITE_BATCH,
    NEW_IN_TRANSACTION,
    SESSION_KEEP,
    SESSION_DROP,
    SESSION_ENDS,
    INSERT_REJECTED,
    INSERT_QUARANTINE,
    CONFLICTS,
    Write,
    array_literals,
    _outcomes,
    _devices_of,
    _regroup,
    _first_failure,
    within,
)

log = Logger()

DEVICE_BY_IMEI = "SELECT id, name, device_type, allow::text[] FROM devices WHERE imei = %s AND revoked_at IS NULL"
DEADLOCK_RETRIES = 5
MAX_REJECTS_IN_FLIGHT = 64
CHECK_TIMEOUT = 2.0
REPLAY_INTERVAL = 1.0  # how often to look for journal segments to replay
MAX_METRICS_KNOWN = 100_000  # metric names remembered as in the dictionary


@implementer(IStore)
class PostgresStore(Service):
    def __init__(
        self,
        reactor: Reactor,
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

    def device_by_imei(self, imei: str) -> Deferred:
        def device(rows: list[tuple[Any, ...]]) -> Device | None:
            if not rows:
                return None
            id_, name, kind, allow = rows[0]
            return Device(int(id_), name, kind, tuple(ipaddress.ip_network(n) for n in allow or ()))

        return self.pool.run(lambda c: c.runQuery(DEVICE_BY_IMEI, (imei,))).addCallback(device)

    def session_begins(self, device_id: int, client_id: str, clean_start: bool, expiry: int) -> Deferred:
        statement = SESSION_KEEP if expiry > 0 else SESSION_DROP
        params = {"d": device_id, "c": client_id, "e": expiry, "clean": clean_start}
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
