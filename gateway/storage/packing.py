"""
Packing closed partitions: their indexes rebuilt once their readings stop coming.

Readings arrive in time order across many devices, so the natural key
(device, metric, ts) grows at one place per device and metric: each page
that fills is split in two halves, and the left half never takes another
entry. A partition's indexes are thus left about two-thirds full while it
takes readings. Once its range is ``--pack-after`` in the past (an hour by
default), its indexes are set to fillfactor 100 (a lock that blocks no
insert) and rebuilt with ``REINDEX TABLE CONCURRENTLY``, pages full; its
BRIN index on tx is rebuilt over every page with them, so its btree on tx
(partitions.upload_index) goes: 8 to 30 bytes less a reading
(``benchmarks/storage.py``: 104 to 89), for as long as the partition stays
hot (until ``--compress-after`` folds it into the cold tier, or for good
when that is off).

The rebuild reads the partition and writes its indexes anew (WAL as large as
they are) without blocking inserts, reads or uploads; a late reading for the
range is stored while it runs. One partition a pass, the newest first (it
stays hot longest), every ``PACK_INTERVAL`` seconds, by whichever gateway
takes the advisory lock. Packed partitions are kept in ``readings_packed``
(by their start) with their index bytes before and after. A rebuild cut short
(the gateway or the database stopped) leaves an invalid copy of an index
behind, which the next pass drops before anything else, unless another
session holds the partition's SHARE UPDATE EXCLUSIVE lock then (a rebuild
under way, VACUUM, ANALYZE): such copies wait for a later pass.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gateway.reactor import Reactor
from gateway.storage.partitions import BOUNDS
from gateway.storage.pool import PeriodicWork, first_line

log = Logger()

PACK_INTERVAL = 600.0
PACK_LOCK = 0x7467_7761_7902  # shared by every gateway on the database
LOCK_TIMEOUT = "10s"  # for the table lock REINDEX takes; retention or compression holding it wins

# The newest closed partition not packed yet, nor folded into the cold tier (a folded one is empty).
PACKABLE = f"""
SELECT p.name, p.lo FROM ({BOUNDS}) p(name, lo, hi)
WHERE p.hi <= now() - make_interval(secs => %s)
  AND NOT EXISTS (SELECT 1 FROM readings_packed k WHERE k.lo = p.lo)
  AND NOT EXISTS (SELECT 1 FROM readings_cold_ranges r WHERE r.lo = p.lo)
ORDER BY p.lo DESC LIMIT 1
"""
# Copies of indexes that a rebuild cut short left behind on a partition of readings: invalid, still updated.
# A rebuild under way (an administrator's REINDEX CONCURRENTLY) has one too, invalid until it ends, and holds
# a SHARE UPDATE EXCLUSIVE lock on the table while it runs: a table locked so by another session (a rebuild, or
# VACUUM or ANALYZE) keeps its copies until a later pass.
LEFT_BEHIND = """
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT i.indisvalid AND c.relname ~ '_ccnew[0-9]*$'
  AND i.indrelid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'readings'::regclass)
  AND i.indrelid NOT IN (SELECT l.relation FROM pg_locks l WHERE l.mode = 'ShareUpdateExclusiveLock'
                         AND l.relation IS NOT NULL AND l.pid <> pg_backend_pid())
"""
# A partition's indexes, to be rebuilt with their pages full: a closed partition takes few inserts, so the room
# PostgreSQL leaves by default (a tenth of each page) would stay empty. A late reading splits the page it lands on.
INDEXES_OF = """
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_am m ON m.oid = c.relam
WHERE i.indrelid = %s::regclass AND i.indisvalid AND m.amname = 'btree'
"""
DROP_UPLOAD_INDEX = 'DROP INDEX CONCURRENTLY IF EXISTS "{name}_upload_tx"'  # see partitions.upload_index
# A partition's index bytes and (PostgreSQL's estimate, which the rebuild refreshes) its readings: no scan.
INDEX_BYTES = (
    "SELECT pg_indexes_size(c.oid), greatest(c.reltuples, 0)::bigint FROM pg_class c WHERE c.oid = %s::regclass"
)
RECORD = """
INSERT INTO readings_packed (lo, bytes_before, bytes_after) VALUES (%s, %s, %s)
ON CONFLICT (lo) DO UPDATE SET packed_at = now(), bytes_before = EXCLUDED.bytes_before,
                               bytes_after = EXCLUDED.bytes_after
"""
# The packed partitions that no longer exist (dropped by retention).
FORGET = f"DELETE FROM readings_packed k WHERE NOT EXISTS (SELECT 1 FROM ({BOUNDS}) p(name, lo, hi) WHERE p.lo = k.lo)"


class Packer(PeriodicWork):
    """Rebuilds the indexes of partitions closed ``after`` seconds ago, one a pass; on its own connection."""

    def __init__(self, reactor: Reactor, after: float) -> None:
        super().__init__(reactor, PACK_INTERVAL, now=False)
        self.after = after
        self.packed = 0  # partitions this process packed
        self.last: dict[str, Any] | None = None  # the latest of them
        self.last_error = ""

    def connect(self, dsn: str) -> Deferred:
        return self.pool.start(dsn)

    def tick(self) -> Deferred:
        return Deferred.fromCoroutine(self.run_pass())

    async def run_pass(self) -> dict[str, Any] | None:
        """One pass: fires with what was packed ({partition, bytes_before, bytes_after, readings}) or None."""
        try:
            done = await self.pool.run(lambda conn: Deferred.fromCoroutine(self._pass(conn)))
        except Exception as e:
            self.last_error = first_line(e)
            log.warn("packing: partitions not packed: {error}", error=self.last_error)
            return None
        self.last_error = ""
        if done is not None:
            self.packed += 1
            self.last = done
            log.info(
                "packing: the indexes of {partition} rebuilt full, {bytes_before} → {bytes_after} bytes "
                "(about {readings} readings)",
                **done,
            )
        return done

    async def _pass(self, conn: Any) -> dict[str, Any] | None:
        # Outside a transaction: REINDEX CONCURRENTLY runs in none. The session lock keeps one gateway at it.
        [(locked,)] = await conn.runQuery("SELECT pg_try_advisory_lock(%s)", (PACK_LOCK,))
        if not locked:
            return None
        try:
            await conn.runOperation(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
            for (index,) in await conn.runQuery(LEFT_BEHIND):
                log.info("packing: dropping {index}, left invalid by a rebuild cut short", index=index)
                await conn.runOperation(f"DROP INDEX CONCURRENTLY IF EXISTS {index}")
            await conn.runOperation(FORGET, ("readings",))
            rows = await conn.runQuery(PACKABLE, ("readings", self.after))
            if not rows:
                return None
            name, lo = rows[0]
            [(before, _)] = await conn.runQuery(INDEX_BYTES, (f'"{name}"',))
            for (index,) in await conn.runQuery(INDEXES_OF, (f'"{name}"',)):
                await conn.runOperation(f"ALTER INDEX {index} SET (fillfactor = 100)")
            await conn.runOperation(f'REINDEX TABLE CONCURRENTLY "{name}"')
            # Its BRIN index on tx now summarizes every page: the btree the uploader read it by goes, and the
            # statistics that make the planner take the BRIN index (tx follows the pages' order) are made sure of.
            await conn.runOperation(DROP_UPLOAD_INDEX.format(name=name))
            await conn.runOperation(f'ANALYZE "{name}"')
            [(after, readings)] = await conn.runQuery(INDEX_BYTES, (f'"{name}"',))
            await conn.runOperation(RECORD, (lo, before, after))
            return {"partition": name, "bytes_before": before, "bytes_after": after, "readings": readings}
        finally:
            await conn.runOperation("RESET lock_timeout")
            await conn.runQuery("SELECT pg_advisory_unlock(%s)", (PACK_LOCK,))

    def status(self) -> dict[str, Any]:
        """For /healthz: the partitions this process packed, the last one, and the last error."""
        return {
            "packed_partitions": self.packed,
            "last": self.last,
            "last_error": self.last_error,
        }
