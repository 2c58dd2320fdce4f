"""
The storage subsystem as the assembler builds it: the embedded PostgreSQL
and its supervisor (or an external server), the journal, the store, the
devices known from the last run, and the upkeep of the tables (time
partitions, the cold tier, packing).

``open`` runs in the privileged start (the journal's files); ``database``
waits for the server (starting the embedded one, migrating) with backoff,
and calls ``unreachable`` once ``--db-wait`` has passed without an answer, so
that the ports open anyway; ``connect`` opens the store on it; ``upkeep``
starts the periodic work; ``close`` lets go of the journal and the server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import IServiceCollection
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from gateway.reactor import Reactor
from gateway.backoff import Backoff
from gateway.errors import StartError
from gateway.readings import counted
from gateway.storage import embedded
from gateway.storage.cold import Compressor
from gateway.storage.database import DatabaseAway, describe_dsn, prepare_database
from gateway.storage.journal import Journal, JournalError
from gateway.storage.known import KnownDevices
from gateway.storage.packing import Packer
from gateway.storage.partitions import PartitionKeeper
from gateway.storage.store import PostgresStore
from gateway.storage.supervisor import DatabaseSupervisor

log = Logger()


class Storage:
    def __init__(self, config: Any, reactor: Reactor, in_thread: Callable[..., Deferred]) -> None:
        self.config = config
        self.reactor = reactor
        self.in_thread = in_thread
        self.embedded = None if config.db else embedded.EmbeddedPostgres(config.pg_dir)
        self.supervisor = DatabaseSupervisor(self.embedded, reactor, in_thread) if self.embedded else None
        self.journal = (
            Journal(config.journal_dir, config.journal_max_bytes, in_thread=in_thread)
            if config.journal_max_bytes
            else None
        )
        self.store = PostgresStore(
            reactor,
            pool_size=config.pool_size,
            max_batch=config.max_batch,
            commit_delay=config.commit_delay,
            max_queue=config.max_queue,
            journal=self.journal,
        )
        # Devices known from the last run answer while the database is away (only a journal can take their writes).
        self.known = (
            KnownDevices(config.known_devices_file, self.store.credentials, self.store.query, reactor, in_thread)
            if self.journal is not None
            else None
        )
        self.partitions: PartitionKeeper | None = None
        self.compressor: Compressor | None = None
        self.packer: Packer | None = None

    def open(self) -> None:
        """The journal's files (StartError, one line, when they cannot be had)."""
        if self.journal is None:
            return
        try:
            self.journal.open()
        except JournalError as e:
            raise StartError(f"--data-dir: journal: {e}") from None
        if self.journal.size:
            log.info(
                "journal: {bytes} bytes in {segments} segments from an earlier run; replayed once the database answers",
                bytes=self.journal.size,
                segments=self.journal.segments,
            )

    async def database(self, stopping: Callable[[], bool], unreachable: Callable[[], None]) -> str:
        """
        Start the embedded server / reach the external one and migrate; while it
        does not answer, try again with backoff, and after ``--db-wait`` seconds
        call ``unreachable`` (the ports open anyway: known devices are then
        acknowledged into the journal). Fires with the DSN.
        """
        config = self.config
        if self.known is not None:
            await self.known.load()
        where = (
            f"embedded PostgreSQL in {config.pg_dir}" if self.embedded else f"PostgreSQL at {describe_dsn(config.db)}"
        )
        log.info("database: {where}", where=where)
        backoff, opener = Backoff(first=1.0, cap=10.0), None
        try:
            while True:
                try:
                    dsn: str = await self.in_thread(prepare_database, config.db, self.embedded)
                except (DatabaseAway, embedded.EmbeddedDatabaseError) as e:
                    if stopping():
                        raise
                    if opener is None:
                        log.warn(
                            "the database does not answer: {error}; trying again, and opening the ports in "
                            "{wait:g}s anyway",
                            error=str(e),
                            wait=config.db_wait,
                        )
                        opener = self.reactor.callLater(config.db_wait, self._unreachable, unreachable)
                    await deferLater(self.reactor, backoff.failed(), lambda: None)
                    if stopping():
                        raise StartError("the gateway stopped before the database answered") from None
                    continue
                if stopping():
                    # Stopped while the database was being started: stopping has already let go of it.
                    if self.embedded is not None:
                        await self.in_thread(self.embedded.stop)
                    raise StartError("the gateway stopped before the database answered")
                return dsn
        finally:
            if opener is not None and opener.active():
                opener.cancel()

    def _unreachable(self, then: Callable[[], None]) -> None:
        if self.journal is None:
            log.warn("serving without the database: without a journal every write gets 503 until it answers")
        else:
            known = self.store.known_devices()
            log.warn(
                "serving without the database: {devices} known from the last run are acknowledged into "
                "the journal; others get 503 until it answers",
                devices=counted(known, "device"),
                known=known,
            )
        then()

    async def connect(self, dsn: str, parent: IServiceCollection) -> int:
        """Open the store's connections; its services (and the supervisor's) under ``parent``. Fires with
        how many connections are up."""
        up = await self.store.connect(dsn)
        if up == 0:
            raise StartError(f"database: no connection could be opened: {self.store.last_error()}")
        self.store.setServiceParent(parent)
        if self.known is not None:
            self.known.setServiceParent(parent)
        if self.supervisor is not None:
            self.supervisor.setServiceParent(parent)
        return up

    async def upkeep(self, dsn: str, parent: IServiceCollection) -> None:
        """The periodic work on the tables: partitions ahead, the cold tier, packing."""
        config = self.config
        self.partitions = PartitionKeeper(self.reactor, config.partition)
        await self.partitions.start(dsn)
        self.partitions.setServiceParent(parent)
        if config.compress_after is not None:
            self.compressor = Compressor(self.reactor, config.compress_after)
            await self.compressor.connect(dsn)
            self.compressor.setServiceParent(parent)
        if config.pack_after is not None:
            self.packer = Packer(self.reactor, config.pack_after)
            await self.packer.connect(dsn)
            self.packer.setServiceParent(parent)

    def live_metrics(self) -> Any:
        yield from self.store.live_metrics()
        if self.supervisor is not None and self.supervisor.running:
            yield from self.supervisor.live_metrics()

    def forget(self, names: list[str] | None) -> None:
        """Devices changed in the database: their cached credentials go."""
        self.store.forget_credentials(names)
        if self.known is not None:
            self.known.changed()

    async def close(self) -> None:
        if self.journal is not None:
            await self.journal.close()
        if self.embedded is not None:
            await self.in_thread(self.embedded.stop)

    def cut(self, timeout: float) -> Deferred:
        """Past the shutdown timeout: say what is left, and stop the embedded server whatever is under way."""
        log.warn(
            "stopping took over {timeout:g}s; closing what is left (unanswered writes are not acknowledged: "
            "devices send them again): {batches} transactions under way, {queued} readings queued",
            timeout=timeout,
            batches=self.store.batches_in_flight,
            queued=self.store.queue_depth,
        )
        if self.embedded is None:
            d: Deferred = Deferred()
            d.callback(None)
            return d
        result: Deferred = self.in_thread(self.embedded.stop)
        return result
