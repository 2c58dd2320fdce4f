"""
The embedded PostgreSQL, supervised: a postmaster that dies (killed, out of
memory, a crash) is started again, so the gateway heals itself.

Theory of operation. Every ``interval`` seconds a look in a thread (the
postmaster's pid file and the process table) says whether the postmaster
lives. When it does not, and the gateway is not stopping, the supervisor
starts it again in a thread; PostgreSQL runs crash recovery, so everything
committed before the crash is there. Meanwhile the store acknowledges
into the journal (with one) and its pool reconnects by itself once the
server answers; then the journal replays. A restart that fails is tried
again after a backoff that doubles up to ``backoff_cap``; after
``FAILING_AFTER`` failures in a row /healthz names the error. Each restart
is logged and counted (``gateway_database_restarts_total``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gateway.backoff import backoff_delay
from gateway.families import counter, gauge
from gateway.storage.embedded import EmbeddedPostgres
from gateway.storage.pool import first_line

log = Logger()

FAILING_AFTER = 3  # restarts failed in a row before /healthz says why


class DatabaseSupervisor(Service):
    def __init__(
        self,
        embedded: EmbeddedPostgres,
        clock: IReactorTime,
        in_thread: Callable[..., Deferred],
        interval: float = 2.0,
        backoff_cap: float = 30.0,
    ) -> None:
        self.embedded = embedded
        self.clock = clock
        self.in_thread = in_thread
        self.interval = interval
        self.backoff_cap = backoff_cap
        self.restarts = 0  # restarts that succeeded
        self.failures = 0  # restarts failed in a row
        self.last_error: str | None = None
        self.down_since: float | None = None
        self._busy = False
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock
        self._retry: Any = None

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False).addErrback(lambda f: log.failure("database supervision stopped", f))

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()

    def check(self) -> Deferred | None:
        """Look whether the postmaster lives; restart it when it does not."""
        if self._busy or not self.running or (self._retry is not None and self._retry.active()):
            return None  # a look or a restart is under way, or a retry waits out its backoff
        self._busy = True
        d = self.in_thread(self.embedded.postmaster)

        def looked(pid: int | None) -> Deferred | None:
            self._busy = False
            if pid is None and self.running:
                return self._restart()
            return None

        def failed(f: Any) -> None:
            self._busy = False
            log.warn("could not look at the embedded PostgreSQL: {error}", error=first_line(f.value))

        return d.addCallbacks(looked, failed)

    def _restart(self) -> Deferred:
        now = self.clock.seconds()
        if self.down_since is None:
            self.down_since = now
            log.error(
                "the embedded PostgreSQL in {pg_dir} is not running; starting it again (acknowledged writes "
                "go to the journal meanwhile)",
                pg_dir=str(self.embedded.pg_dir),
            )
        self._busy = True
        d = self.in_thread(self.embedded.restart)

        def restarted(_: str) -> None:
            self._busy = False
            self.restarts += 1
            log.info(
                "embedded PostgreSQL running again after {seconds:.1f}s (restart {count}); crash recovery done",
                seconds=self.clock.seconds() - (self.down_since or now),
                count=self.restarts,
            )
            self.failures, self.last_error, self.down_since = 0, None, None

        def failed(f: Any) -> None:
            self._busy = False
            self.failures += 1
            self.last_error = first_line(f.value)
            # The first retry comes soon: a restart right after a crash can fail only because the dead
            # postmaster's backends still hold its shared memory, and they are gone within a second or two.
            delay = backoff_delay(self.interval, self.backoff_cap, self.failures - 1)
            log.error(
                "embedded PostgreSQL did not start again ({count} in a row): {error}; next try in {delay:g}s",
                count=self.failures,
                error=self.last_error,
                delay=delay,
            )
            if self.running:
                self._retry = self.clock.callLater(delay, self._restart)

        return d.addCallbacks(restarted, failed)

    def status(self) -> dict[str, Any]:
        """For /healthz: restarts so far, and while it is down, since when and why."""
        doc: dict[str, Any] = {"restarts": self.restarts, "ok": self.failures < FAILING_AFTER}
        if self.down_since is not None:
            doc["down_seconds"] = round(self.clock.seconds() - self.down_since, 1)
        if self.last_error is not None:
            doc["failed_restarts"] = self.failures
            doc["last_error"] = self.last_error
        return doc

    def live_metrics(self) -> Iterator[Any]:
        yield counter(
            "gateway_database_restarts", "Restarts of the embedded PostgreSQL after it died.", [], self.restarts
        )
        yield gauge("gateway_database_restart_failures", "Failed restarts in a row (0 when running).", self.failures)
