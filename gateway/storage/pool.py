"""
A small pool of asynchronous PostgreSQL connections (txpostgres) that
notices a dead database and reconnects by itself.

Theory of operation. Each slot holds one connection and runs one piece of
work at a time. ``run(work)`` lends an idle connection to ``work`` (a
function returning a Deferred); when none is idle the caller waits in a
bounded FIFO. A connection that comes back closed, or an OperationalError /
InterfaceError, marks the slot down: its work fails with StoreUnavailable
(the caller answers 503 + Retry-After) and the slot reconnects with
exponential backoff and jitter. When no slot is up or connecting, ``run``
fails at once rather than queueing callers behind a database that is gone.

libpq keepalives and TCP_USER_TIMEOUT make a silent network partition show
up as an error within about half a minute; a server-side statement timeout
bounds any one statement.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any
from collections.abc import Callable

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres

from gateway.reactor import Reactor
from gateway.backoff import Backoff
from gateway.readings import StoreOverloaded, StoreUnavailable

log = Logger()

CONNECT_TIMEOUT = 10.0
BACKOFF_FIRST = 0.2
BACKOFF_CAP = 5.0

_SESSION = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "20000",
    "application_name": "txgateway",
}


def session_dsn(dsn: str, statement_timeout_ms: int = 30_000) -> str:
    """The user's DSN plus our session settings, where the user set none."""
    given = psycopg2.extensions.parse_dsn(dsn)
    extra = {k: v for k, v in _SESSION.items() if k not in given}
    if "," in given.get("host", "") + given.get("hostaddr", "") and "target_session_attrs" not in given:
        # Several servers (a cluster with failover): write to whichever is the primary now.
        extra["target_session_attrs"] = "read-write"
    options = given.get("options", "")
    if "statement_timeout" not in options:
        options += f" -c statement_timeout={statement_timeout_ms}"
    # An ack promises durability: whatever the server's default, our
    # commits wait for the WAL flush.
    options += " -c synchronous_commit=on"
    extra["options"] = options.strip()
    return psycopg2.extensions.make_dsn(dsn, **extra)


def is_connection_error(error: BaseException | None) -> bool:
    if isinstance(error, psycopg2.extensions.QueryCanceledError):
        return False  # statement timeout: the connection itself is fine
    # A server that turned read-only (a primary demoted by a failover) is as good as gone for writes:
    # the connection is made again, and libpq finds the new primary among the DSN's hosts.
    return isinstance(
        error, (psycopg2.OperationalError, psycopg2.InterfaceError, psycopg2.errors.ReadOnlySqlTransaction)
    )


class Connection(txpostgres.Connection):
    """
    txpostgres's connection, quiet when the server goes away while it is idle: libpq's read then raises
    in the reactor's read callback, which logged "Unhandled Error" and a traceback per connection, though
    the connection is only lost (and the pool opens it again). The error becomes the reason it was lost.
    """

    def doRead(self) -> Any:
        try:
            super().doRead()
        except psycopg2.OperationalError as e:
            log.debug("database connection lost while idle: {error}", error=first_line(e))
            return e  # the reactor then disconnects it with this reason, without a traceback
        return None


class _Slot:
    def __init__(self, index: int, rand: Callable[[], float]) -> None:
        self.index = index
        self.conn: txpostgres.Connection | None = None
        self.state = "down"  # down | connecting | idle | busy
        self.backoff = Backoff(BACKOFF_FIRST, BACKOFF_CAP, "equal", rand)
        self.retry: IDelayedCall | None = None
        self.released: Deferred | None = None  # fires when the current work ends


class PgPool:
    def __init__(
        self, reactor: Reactor, size: int, max_waiters: int = 1000, rand: Callable[[], float] = random.random
    ) -> None:
        self._reactor = reactor
        self._dsn = ""
        self._slots = [_Slot(i, rand) for i in range(size)]  # rand: the reconnection jitter's (seeded in tests)
        self._waiters: deque[tuple[Callable[[Any], Deferred], Deferred]] = deque()
        self.max_waiters = max_waiters
        self.last_error = "not connected yet"
        self._closing = False
        # Run on every new connection (LISTEN, say) before it takes work; a failure drops the connection.
        self.on_connect: Callable[[Any], Deferred] | None = None

    # -- state ---------------------------------------------------------

    @property
    def up(self) -> int:
        return sum(1 for s in self._slots if s.state in ("idle", "busy"))

    def _hopeful(self) -> bool:
        return any(s.state != "down" for s in self._slots)

    # -- connecting ----------------------------------------------------

    def start(self, dsn: str) -> Deferred:
        """Connect every slot; fires with how many are up once all have tried."""
        from twisted.internet.defer import DeferredList

        self._dsn = session_dsn(dsn)
        return DeferredList([self._connect(s) for s in self._slots]).addCallback(lambda _: self.up)

    def _connect(self, slot: _Slot) -> Deferred:
        slot.retry = None
        if self._closing:
            return succeed(None)
        slot.state = "connecting"
        conn = Connection(reactor=self._reactor)
        slot.conn = conn
        timer = self._reactor.callLater(CONNECT_TIMEOUT, self._connect_timeout, conn)
        d = conn.connect(self._dsn)
        if self.on_connect is not None:
            d.addCallback(lambda _: self.on_connect(conn))

        def connected(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if self._closing:
                conn.close()
                slot.state = "down"
                return
            if slot.backoff.failures:
                log.info("database connection {slot} is back", slot=slot.index)
            slot.state = "idle"
            slot.backoff.succeeded()
            self._serve(slot)

        def failed(f: Failure) -> None:
            if timer.active():
                timer.cancel()
            self._slot_down(slot, f.value)

        d.addCallbacks(connected, failed)
        return d

    def _connect_timeout(self, conn: txpostgres.Connection) -> None:
        # libpq's connect_timeout only applies to blocking connects.
        self.last_error = f"connecting took longer than {CONNECT_TIMEOUT:g}s"
        conn.close()

    def _slot_down(self, slot: _Slot, error: BaseException | None) -> None:
        was = slot.state
        slot.state = "down"
        if slot.conn is not None:
            try:
                slot.conn.close()
            except Exception:
                pass
            slot.conn = None
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self.last_error = text
        if self._closing:
            return
        if was != "connecting" or not slot.backoff.failures:
            log.warn("database connection {slot} lost: {error}", slot=slot.index, error=text)
        delay = slot.backoff.failed()
        slot.retry = self._reactor.callLater(delay, self._connect, slot)
        if not self._hopeful():
            self._fail_waiters()

    def _fail_waiters(self) -> None:
        waiters, self._waiters = self._waiters, deque()
        for _, d in waiters:
            d.errback(Failure(StoreUnavailable(f"database unavailable: {self.last_error}")))

    # -- lending -------------------------------------------------------

    def run(self, work: Callable[[Any], Deferred]) -> Deferred:
        """Run ``work(connection)`` on a free connection; fires with its result."""
        if self._closing:
            return fail(StoreUnavailable("the gateway is shutting down"))
        for slot in self._slots:
            if slot.state == "idle":
                return self._lend(slot, work)
        if not self._hopeful():
            return fail(StoreUnavailable(f"database unavailable: {self.last_error}"))
        if len(self._waiters) >= self.max_waiters:
            return fail(StoreOverloaded(f"{len(self._waiters)} requests are waiting for a database connection"))
        d: Deferred = Deferred()
        self._waiters.append((work, d))
        return d

    def _lend(self, slot: _Slot, work: Callable[[Any], Deferred]) -> Deferred:
        slot.state = "busy"
        released: Deferred = Deferred()
        slot.released = released
        conn = slot.conn
        assert conn is not None, "an idle slot has a connection"
        try:
            d = work(conn)
        except Exception:
            d = fail()

        def done(result: Any) -> Any:
            slot.released = None
            self._reactor.callLater(0, released.callback, None)
            if (isinstance(result, Failure) and is_connection_error(result.value)) or conn.closed:
                error = result.value if isinstance(result, Failure) else Exception("connection closed")
                self._slot_down(slot, error)
                if isinstance(result, Failure) and not isinstance(result.value, StoreUnavailable):
                    return Failure(StoreUnavailable(f"database unavailable: {self.last_error}"))
                return result
            if isinstance(result, Failure) and isinstance(result.value, psycopg2.extensions.QueryCanceledError):
                result = Failure(StoreUnavailable("the database did not answer in time"))
            slot.state = "idle"
            self._serve(slot)
            return result

        return d.addBoth(done)

    def _serve(self, slot: _Slot) -> None:
        if slot.state == "idle" and self._waiters:
            work, d = self._waiters.popleft()
            self._lend(slot, work).chainDeferred(d)

    def close(self) -> Deferred:
        """Close every connection once its current work is done."""
        self._closing = True
        self._fail_waiters()
        pending = []
        for slot in self._slots:
            if slot.retry is not None and slot.retry.active():
                slot.retry.cancel()
            if slot.released is not None:
                pending.append(slot.released)
        from twisted.internet.defer import gatherResults

        def close_all(_: Any) -> None:
            for slot in self._slots:
                if slot.conn is not None:
                    slot.conn.close()
                    slot.conn = None
                slot.state = "down"

        return gatherResults(pending).addCallback(close_all)


def first_line(error: BaseException | None) -> str:
    """A database error as one line for the log: the server's message without its ERROR: prefix."""
    text = getattr(error, "pgerror", None) or str(error)
    text = text.strip()
    if text.startswith("ERROR:"):
        text = text[6:].strip()
    return text.splitlines()[0] if text else type(error).__name__


class PeriodicWork(Service):
    """Work on a database connection of its own, every ``interval`` seconds while the service runs."""

    def __init__(self, reactor: Reactor, interval: float, now: bool) -> None:
        self.pool = PgPool(reactor, 1)
        self.interval = interval
        self.now = now  # run once as the service starts, too
        self.loop = LoopingCall(self.tick)
        self.loop.clock = reactor

    def tick(self) -> Deferred:
        raise NotImplementedError

    def startService(self) -> None:
        super().startService()
        done = self.loop.start(self.interval, now=self.now)
        done.addErrback(lambda f: log.failure("{what} stopped", f, what=type(self).__name__))

    async def _stop(self) -> None:
        if self.loop.running:
            self.loop.stop()
        super().stopService()
        await self.pool.close()

    def stopService(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())
