"""
Retention: readings older than ``--retention`` that every sink has sent
are deleted, a chunk at a time, on a connection of its own. Readings not
yet sent to a sink (or held in a batch, parked ones included) are kept,
however old.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gateway.storage.pool import PgPool, first_line

log = Logger()

RETENTION_INTERVAL = 60.0
RETENTION_CHUNK = 5000
RETENTION_CHUNKS_PER_RUN = 200

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


class Retention(Service):
    """Deletes old readings that every sink has sent, a chunk at a time, on its own connection."""

    def __init__(self, reactor: Any, age: float) -> None:
        self.pool = PgPool(reactor, 1)
        self.age = age
        self.loop = LoopingCall(self.sweep)
        self.loop.clock = reactor
        self.deleted = 0

    def connect(self, dsn: str) -> Deferred:
        return self.pool.start(dsn)

    def sinks(self) -> Deferred:
        """Fires with the names of the sinks the database knows: retention waits for each of them."""
        d = self.pool.run(lambda c: c.runQuery("SELECT name FROM upload_sinks ORDER BY name"))
        return d.addCallback(lambda rows: [row[0] for row in rows])

    def startService(self) -> None:
        super().startService()
        self.loop.start(RETENTION_INTERVAL, now=True).addErrback(lambda f: log.failure("retention stopped", f))

    async def _stop(self) -> None:
        if self.loop.running:
            self.loop.stop()
        super().stopService()
        await self.pool.close()

    def stopService(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())

    def sweep_chunk(self) -> Deferred:
        """Delete one chunk of readings older than ``age`` seconds that every sink has sent; fires with the count."""

        async def work(cur: Any) -> int:
            await cur.execute(UPLOADED_FRONTIER)
            frontier = cur.fetchone()
            bound = ""
            params: dict[str, Any] = {"age": self.age, "chunk": RETENTION_CHUNK}
            if frontier is not None:
                bound = "AND (r.tx, r.id) <= (%(tx)s::xid8, %(id)s)"
                params.update(tx=frontier[0], id=frontier[1])
            await cur.execute(RETENTION_DELETE.format(bound=bound), params)
            return int(cur.rowcount)

        return self.pool.run(lambda conn: conn.runInteraction(lambda cur: Deferred.fromCoroutine(work(cur))))

    async def _sweep(self) -> None:
        total = 0
        try:
            for _ in range(RETENTION_CHUNKS_PER_RUN):
                count = await self.sweep_chunk()
                total += count
                if count < RETENTION_CHUNK or not self.running:
                    break
        except Exception as e:
            log.warn("retention: old readings not deleted yet: {error}", error=first_line(e))
        if total:
            self.deleted += total
            log.info("retention: deleted {count} readings already uploaded", count=total)

    def sweep(self) -> Deferred:
        return Deferred.fromCoroutine(self._sweep())
