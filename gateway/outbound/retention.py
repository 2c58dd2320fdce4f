"""
Retention: readings older than ``--retention`` (both their time and their
arrival) that every sink has sent are removed, on a connection of its own.
Readings not yet sent to a sink (or held in a batch, parked ones included)
are kept, however old.

A time partition of ``readings`` (see ``gateway/storage/partitions.py``)
whose whole range is past retention goes in one statement: locked against
late inserts, checked (no reading in it is past the sinks' frontier or
arrived after the limit: two probes by transaction, through its index on
tx), dropped. That costs the same for
a partition of a thousand readings as of a billion, and leaves no dead rows
for VACUUM. What is left past retention (the partition that straddles the
limit, one held back by a late reading still unsent, the default partition)
is deleted a chunk at a time. The arrival times of transactions past the
limit whose readings are all gone are forgotten in the same pass.

Quarantined readings (never uploaded) go by the same rule without the sinks:
a ``quarantine`` partition wholly past the limit whose rows all arrived
before it is dropped; quarantined readings left past the limit are deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gateway.reactor import Reactor
from gateway.outbound.ledger import XMIN
from gateway.storage.positions import PLACE, UNSENT_IN, UPLOADED_FRONTIER, at, params, position
from gateway.storage.partitions import BOUNDS, TABLES
from gateway.storage.pool import PeriodicWork, first_line

log = Logger()

RETENTION_INTERVAL = 60.0
RETENTION_CHUNK = 5000
RETENTION_CHUNKS_PER_RUN = 200

# The readings up to the frontier (UPLOADED_FRONTIER, as params("sent", frontier)): sent to every sink, or no
# sink exists. tx bounds them too, for the BRIN index on tx.
SENT = f"r.tx <= %(sent_tx)s AND {PLACE} <= {at('sent')}"
LIMIT = "now() - make_interval(secs => %(age)s)"
# A reading's transaction arrived before the limit (one with no arrival recorded counts as old).
ARRIVED_BEFORE = f"NOT EXISTS (SELECT 1 FROM readings_arrivals a WHERE a.tx = r.tx AND a.received_at >= {LIMIT})"
# Rows, not partitions: only partitions whose time reaches past the limit are looked at (ts < limit).
RETENTION_DELETE = f"""
DELETE FROM readings d USING (
    SELECT r.device_id, r.metric_id, r.ts FROM readings r
    WHERE r.ts < {LIMIT} AND {ARRIVED_BEFORE} {{bound}}
    LIMIT %(chunk)s) old
WHERE d.device_id = old.device_id AND d.metric_id = old.metric_id AND d.ts = old.ts
"""
# Cold hours wholly past the limit, folded before it (the cold tier holds only readings every sink has sent);
# and the folded ranges past it.
RETENTION_COLD = """
WITH gone AS (
    DELETE FROM readings_cold WHERE hour < now() - make_interval(secs => %(age)s) - interval '1 hour'
      AND folded_at < now() - make_interval(secs => %(age)s)
    RETURNING readings AS n
), ranges AS (
    DELETE FROM readings_cold_ranges WHERE hi <= now() - make_interval(secs => %(age)s)
      AND hi < (SELECT max(hi) FROM readings_cold_ranges)
)
SELECT coalesce(sum(n), 0)::bigint FROM gone
"""
# Quarantined readings past the limit (their time and their arrival), a chunk at a time.
RETENTION_DELETE_QUARANTINE = """
DELETE FROM quarantine q USING (
    SELECT id, ts FROM quarantine
    WHERE ts < now() - make_interval(secs => %(age)s) AND received_at < now() - make_interval(secs => %(age)s)
    LIMIT %(chunk)s) old
WHERE q.id = old.id AND q.ts = old.ts
"""
# Partitions whose whole range is past the limit, oldest first.
EXPIRED_PARTITIONS = f"""
SELECT name FROM ({BOUNDS}) p(name, lo, hi) WHERE hi <= now() - make_interval(secs => %s) ORDER BY lo
"""
# In the partition's own transaction, after locking it: whether every reading in it was sent to every sink,
# and whether every one arrived before the limit. Both read only the BRIN ranges of recent transactions: those
# past the frontier, and those from the first transaction that arrived after the limit on.
# The first transaction (in tx order) that arrived within the limit: found after reading those that came before.
FIRST_RECENT = f"(SELECT x.tx FROM readings_arrivals x WHERE x.received_at >= {LIMIT} ORDER BY x.tx LIMIT 1)"
ARRIVED_IN = f"""EXISTS (SELECT 1 FROM {{name}} r JOIN readings_arrivals a ON a.tx = r.tx
    WHERE r.tx >= {FIRST_RECENT} AND a.received_at >= {LIMIT})"""
PARTITION_DONE = f"SELECT %(sent_tx)s IS NULL OR NOT {UNSENT_IN}, NOT {ARRIVED_IN}"
# Arrivals of transactions past the limit, sent to every sink, whose readings are all gone (dropped, deleted,
# folded into the cold tier), oldest first, a chunk at a time: the chunk's transactions, then those of them
# that still have readings (read through the BRIN index on tx).
ARRIVALS_CHUNK = 1000
OLD_ARRIVALS = f"""
SELECT tx FROM readings_arrivals
WHERE tx > %(after)s AND tx < least(%(sent_tx)s, {XMIN}, {FIRST_RECENT}) ORDER BY tx LIMIT %(n)s
"""
STILL_HELD = "SELECT DISTINCT r.tx FROM readings r WHERE r.tx BETWEEN %s AND %s"
FORGET_ARRIVALS = "DELETE FROM readings_arrivals WHERE tx = ANY(%s::bigint[])"
# The same for a quarantine partition: whether every row in it arrived before the limit.
QUARANTINE_ARRIVED = "SELECT coalesce(max(received_at) < now() - make_interval(secs => %(age)s), true) FROM {name}"


class Retention(PeriodicWork):
    """Drops old partitions and deletes old readings that every sink has sent, on its own connection."""

    def __init__(self, reactor: Reactor, age: float) -> None:
        super().__init__(reactor, RETENTION_INTERVAL, now=True)
        self.age = age
        self.deleted = 0  # readings deleted row by row
        self.deleted_quarantined = 0  # quarantined readings deleted row by row
        self.dropped: list[str] = []  # partitions dropped whole
        self.held: dict[str, str] = {}  # partitions past retention kept, and why

    def connect(self, dsn: str) -> Deferred:
        return self.pool.start(dsn)

    def sinks(self) -> Deferred:
        """Fires with the names of the sinks the database knows: retention waits for each of them."""
        d = self.pool.run(lambda c: c.runQuery("SELECT name FROM upload_sinks ORDER BY name"))
        return d.addCallback(lambda rows: [row[0] for row in rows])

    def tick(self) -> Deferred:
        return self.sweep()

    def sweep_chunk(self) -> Deferred:
        """Delete one chunk of readings older than ``age`` seconds that every sink has sent; fires with the count."""

        async def work(cur: Any) -> int:
            await cur.execute(UPLOADED_FRONTIER)
            frontier = cur.fetchone()
            bound = ""
            args: dict[str, Any] = {"age": self.age, "chunk": RETENTION_CHUNK}
            if frontier is not None:
                bound = f"AND {SENT}"
                args.update(params("sent", position(frontier)))
            await cur.execute(RETENTION_DELETE.format(bound=bound), args)
            return int(cur.rowcount)

        return self.pool.run(lambda conn: conn.runInteraction(lambda cur: Deferred.fromCoroutine(work(cur))))

    def forget_arrivals(self) -> Deferred:
        """
        Delete the arrivals of transactions past the limit and sent whose readings are all gone (the readings
        of the others need their arrival time); fires with the count.
        """

        async def work(cur: Any) -> int:
            await cur.execute(UPLOADED_FRONTIER)
            frontier = cur.fetchone()
            sent = frontier[0] if frontier is not None else None
            total, after = 0, -1
            for _ in range(RETENTION_CHUNKS_PER_RUN):
                args = {"after": after, "sent_tx": sent, "age": self.age, "n": ARRIVALS_CHUNK}
                await cur.execute(OLD_ARRIVALS, args)
                chunk = [row[0] for row in cur.fetchall()]
                if not chunk:
                    break
                await cur.execute(STILL_HELD, (chunk[0], chunk[-1]))
                held = {row[0] for row in cur.fetchall()}
                gone = [tx for tx in chunk if tx not in held]
                if gone:
                    await cur.execute(FORGET_ARRIVALS, (gone,))
                total += len(gone)
                after = chunk[-1]
            return total

        return self.pool.run(lambda conn: conn.runInteraction(lambda cur: Deferred.fromCoroutine(work(cur))))

    def sweep_quarantine_chunk(self) -> Deferred:
        """Delete one chunk of quarantined readings older than ``age`` seconds; fires with the count."""

        async def work(cur: Any) -> int:
            await cur.execute(RETENTION_DELETE_QUARANTINE, {"age": self.age, "chunk": RETENTION_CHUNK})
            return int(cur.rowcount)

        return self.pool.run(lambda conn: conn.runInteraction(lambda cur: Deferred.fromCoroutine(work(cur))))

    def drop_partition(self, name: str, table: str = "readings") -> Deferred:
        """Drop one expired partition if every reading in it was sent (quarantine: none is) and arrived before
        the limit; fires with None when dropped, else the reason it is kept."""

        async def work(cur: Any) -> str | None:
            # While this waits for the lock, queries of the whole table (the uploader's) queue behind it: wait
            # briefly, and try again at the next sweep. Late inserts into this partition wait until it is gone.
            await cur.execute("SET LOCAL lock_timeout = '1s'")
            await cur.execute(f'LOCK TABLE "{name}" IN ACCESS EXCLUSIVE MODE')
            if table == "quarantine":
                await cur.execute(QUARANTINE_ARRIVED.format(name=f'"{name}"'), {"age": self.age})
                if not cur.fetchone()[0]:
                    return "holds readings that arrived within the retention period"
                await cur.execute(f'DROP TABLE "{name}"')
                return None
            await cur.execute(UPLOADED_FRONTIER)
            frontier = cur.fetchone() or (None, None, None, None)
            await cur.execute(PARTITION_DONE.format(name=f'"{name}"'), {**params("sent", frontier), "age": self.age})
            sent, arrived = cur.fetchone()
            if not sent:
                return "not yet sent to every sink"
            if not arrived:
                return "holds readings that arrived within the retention period"
            await cur.execute(f'DROP TABLE "{name}"')
            return None

        return self.pool.run(lambda conn: conn.runInteraction(lambda cur: Deferred.fromCoroutine(work(cur))))

    async def _drop_partitions(self) -> list[str]:
        dropped = []
        held = {}
        for table in TABLES:
            rows = await self.pool.run(partial(_run_query, EXPIRED_PARTITIONS, (table, self.age)))
            for (name,) in rows:
                why = await self.drop_partition(name, table)
                if why is None:
                    dropped.append(name)
                else:
                    held[name] = why
        self.held = held
        self.dropped += dropped
        return dropped

    async def _sweep(self) -> None:
        try:
            dropped = await self._drop_partitions()
        except Exception as e:
            dropped = []
            log.warn("retention: old partitions not dropped yet: {error}", error=first_line(e))
        if dropped:
            log.info("retention: dropped partitions {names}, already uploaded", names=", ".join(dropped))
        total = 0
        try:
            rows = await self.pool.run(lambda c: c.runQuery(RETENTION_COLD, {"age": self.age}))
            total += int(rows[0][0])
        except Exception as e:
            log.warn("retention: old readings of the cold tier not deleted yet: {error}", error=first_line(e))
        total += await self._in_chunks(self.sweep_chunk, "readings")
        if total:
            self.deleted += total
            log.info("retention: deleted {count} readings already uploaded", count=total)
        try:
            await self.forget_arrivals()
        except Exception as e:
            log.warn("retention: arrivals of deleted readings not forgotten yet: {error}", error=first_line(e))
        held = await self._in_chunks(self.sweep_quarantine_chunk, "quarantined readings")
        if held:
            self.deleted_quarantined += held
            log.info("retention: deleted {count} quarantined readings", count=held)

    async def _in_chunks(self, sweep: Callable[[], Deferred], what: str) -> int:
        """Delete with ``sweep`` (a chunk a call, fires with the count) until less than a chunk is left."""
        total = 0
        try:
            for _ in range(RETENTION_CHUNKS_PER_RUN):
                count = await sweep()
                total += count
                if count < RETENTION_CHUNK or not self.running:
                    break
        except Exception as e:
            log.warn("retention: old {what} not deleted yet: {error}", what=what, error=first_line(e))
        return total

    def status(self) -> dict[str, Any]:
        """For /healthz: partitions dropped by this process, and those past retention that are kept, with why."""
        return {
            "dropped_partitions": len(self.dropped),
            "deleted_readings": self.deleted,
            "deleted_quarantined": self.deleted_quarantined,
            "held": dict(self.held),
        }

    def sweep(self) -> Deferred:
        return Deferred.fromCoroutine(self._sweep())


def _run_query(sql: str, params: Any, conn: Any) -> Deferred:
    return conn.runQuery(sql, params)
