"""
The uploader: every stored reading reaches every sink, in batches, at
least once, with no reading skipped. The ledger (``outbound.ledger``)
says how batches are cut and claimed so that this holds across restarts
and gateways; ``outbound.sender`` sends one batch and judges the answer.

Each sink has its own cursor and its own loop (SinkUploader): a dead sink
waits, with its lag growing, and holds back no other.
"""

from __future__ import annotations

import random
import socket
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredLock, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.reactor import Reactor
from gateway.families import counter, gauge
from gateway.outbound.ledger import HOLD_OWNER_LOCK, Batch, Ledger, Wait
from gateway.storage.sinkstatus import LIVE_FIELDS, LIVE_STATUS
from gateway.outbound.amqp_sender import AMQPSender
from gateway.outbound.kinesis_sender import KinesisSender
from gateway.outbound.mqtt_sender import MQTTSender
from gateway.outbound.sender import HTTPSender, Reply, judge
from gateway.outbound.sinks import Sink
from gateway.storage.pool import PeriodicWork, PgPool, first_line

log = Logger()

MONITOR_INTERVAL = 5.0
OWNER_LOCK_INTERVAL = 10.0  # how soon the owner lock is taken again after the database connection was lost


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
                    error=first_line(e),
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
            c.last_error = ""  # /healthz says how the sink is now; the database keeps the last error and its time
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


def warn_unconfigured(names: list[str]) -> None:
    """Say which sinks the database knows that this gateway does not send to."""
    for name in names:
        log.warn(
            "sink {sink} is in the database but not configured here: its unsent readings are kept "
            "(retention waits for it); `gatewayctl upload remove {sink}` forgets it",
            sink=name,
        )


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


class OwnerLock(PeriodicWork):
    """
    The owner lock of this gateway (ledger.OWNER_LOCK), held on a connection of its own while the uploader
    runs, so that the batches it cut are claimed by other gateways as soon as it is gone rather than when
    their lease runs out. Taken again every ``OWNER_LOCK_INTERVAL`` seconds if the connection was lost.
    """

    def __init__(self, reactor: Reactor, owner: str) -> None:
        super().__init__(reactor, OWNER_LOCK_INTERVAL, now=False)
        self.owner = owner
        self._refused = False

    def tick(self) -> Deferred:
        return Deferred.fromCoroutine(self.hold())

    async def hold(self) -> bool:
        """Hold the lock (take it if this session lacks it); never raises. Whether it is held."""
        try:
            [(held,)] = await self.pool.run(lambda c: c.runQuery(HOLD_OWNER_LOCK, {"owner": self.owner}))
        except Exception as e:
            log.debug("owner lock not taken: {error}", error=first_line(e))
            return False
        if not held and not self._refused:
            log.warn(
                "another database session holds the owner lock of {owner} (a second gateway with this "
                "DATA_DIR/gateway-id, or a pooler in transaction mode): batches this gateway leaves behind "
                "wait for their lease before another gateway sends them",
                owner=self.owner,
            )
        self._refused = not held
        return bool(held)


class Uploader(MultiService):
    """Every sink's loop, and the batch ledger on its own database connections."""

    def __init__(
        self,
        reactor: Reactor,
        sinks: tuple[Sink, ...],
        owner: str,
        in_thread: Callable[..., Deferred],
        pool_size: int = 3,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.sinks = sinks
        self.pool = PgPool(reactor, pool_size)
        self.owner = owner
        self.in_thread = in_thread
        self.ledger = Ledger(self.pool, owner, in_thread)
        self.owner_lock = OwnerLock(reactor, owner)
        self.owner_lock.setServiceParent(self)
        self.loops = {sink.name: self._loop(sink) for sink in sinks}
        # The sinks' state in the database (lag, batches), read every few seconds for /healthz and /metrics.
        self._live: dict[str, dict[str, Any]] = {}
        self._monitor = LoopingCall(self.look)
        self._monitor.clock = reactor

    def _loop(self, sink: Sink) -> SinkUploader:
        sender: HTTPSender | MQTTSender | KinesisSender | AMQPSender
        if sink.mqtt is not None:
            sender = MQTTSender(self.reactor, sink, self.in_thread, self.owner)
        elif sink.amqp is not None:
            sender = AMQPSender(self.reactor, sink, self.in_thread)
        elif sink.kinesis is not None:
            sender = KinesisSender(self.reactor, sink, self.in_thread)
        else:
            sender = HTTPSender(self.reactor, sink)
        return SinkUploader(sink, self.ledger, sender, self.reactor)

    async def connect(self, dsn: str) -> None:
        """Open the connections and register the sinks; errbacks when the database cannot be reached."""
        up = await self.pool.start(dsn)
        if up == 0:
            raise ConnectionError(f"no connection for the uploader: {self.pool.last_error}")
        await self.owner_lock.pool.start(dsn)
        await self.owner_lock.hold()  # before any batch is cut
        known = await self.ledger.register(list(self.sinks))
        self._warn_unconfigured(known)

    def _warn_unconfigured(self, known: list[str]) -> None:
        warn_unconfigured(sorted(set(known) - set(self.loops)))

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
            log.debug("sink status not read: {error}", error=first_line(f.value))

        d = self.pool.run(lambda c: c.runQuery(LIVE_STATUS, (names,)))
        return d.addCallbacks(got, failed)

    def sink_status(self) -> dict[str, dict[str, Any]]:
        """Per configured sink: the database's figures (as last read) and this process's counters."""
        out = {}
        for name, loop in sorted(self.loops.items()):
            live = self._live.get(name, {"checked_at": None})
            c = loop.counters
            checked = live.get("checked_at")
            out[name] = {
                # parked_batches and lag_seconds are the database's: batches sent again (gatewayctl upload
                # retry-dead) leave the count there, whichever gateway parked them.
                **live,
                "checked_seconds_ago": round(self.reactor.seconds() - checked, 1) if checked is not None else None,
                "paused": loop.paused,
                "batches_sent": c.batches_sent,
                "readings_sent": c.readings_sent,
                "failures": c.failures,
                "last_error": c.last_error or None,
                **(loop.sender.status() if isinstance(loop.sender, KinesisSender) else {}),
            }
        return out

    def live_metrics(self) -> Iterator[Any]:
        """Each sink's figures for /metrics: the database's (as last read) and this process's counters."""
        families = {
            "lag": gauge(
                "gateway_upload_lag_seconds", "Age of the oldest reading not yet sent to the sink.", labels=["sink"]
            ),
            "pending": gauge("gateway_upload_pending_batches", "Batches cut and not yet sent.", labels=["sink"]),
            "parked": gauge(
                "gateway_upload_parked_batches", "Batches the sink refused for good (dead letters).", labels=["sink"]
            ),
            "paused": gauge("gateway_upload_paused", "1 while the sink is paused from the console.", labels=["sink"]),
            "batches": counter("gateway_upload_batches_sent", "Batches this process sent.", ["sink"]),
            "readings": counter("gateway_upload_readings_sent", "Readings this process sent.", ["sink"]),
            "failures": counter("gateway_upload_failures", "Failed attempts (to be retried).", ["sink"]),
            "records_sent": counter("gateway_upload_records_sent", "Kinesis records the stream accepted.", ["sink"]),
            "records_failed": counter(
                "gateway_upload_records_failed",
                "Kinesis records a partial answer did not accept (sent again).",
                ["sink"],
            ),
            "throttles": counter("gateway_upload_throttles", "Kinesis calls throttled, whole or in part.", ["sink"]),
        }
        for name, s in self.sink_status().items():
            families["lag"].add_metric([name], s.get("lag_seconds") or 0.0)
            families["pending"].add_metric([name], s.get("pending_batches") or 0)
            families["parked"].add_metric([name], s.get("parked_batches") or 0)
            families["paused"].add_metric([name], 1 if s["paused"] else 0)
            families["batches"].add_metric([name], s["batches_sent"])
            families["readings"].add_metric([name], s["readings_sent"])
            families["failures"].add_metric([name], s["failures"])
            for key in ("records_sent", "records_failed", "throttles"):
                if key in s:
                    families[key].add_metric([name], s[key])
        yield from families.values()

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
