"""
Group commit: the policy that turns many small writes into few transactions.

Theory of operation. Writers call ``submit(item, size)`` and get a Deferred
that fires after the transaction holding their item has committed. Items
wait in one FIFO queue. A batch leaves the queue when a commit slot is free
(there are as many slots as database connections) and either the queue holds
``max_batch`` readings, ``max_delay`` seconds have passed since the oldest
waiting item arrived, or a transaction has just finished (whatever arrived
while it was in flight has already waited one commit time). The queue is
bounded by ``max_queue`` readings: past it ``submit`` fails at once with
``Overloaded`` so the caller can tell its client to retry, instead of
holding memory without end. Writers that hold their clients back while the
queue is full (device sessions) wait for room in turn: ``admits`` refuses
newcomers while any wait, so no device is passed over for long.

Items may name ordering keys (``keys(item)``: the devices whose readings
they hold). An item never goes into a transaction while an earlier item
with one of its keys is still in flight or still waiting: a device that
pipelines two writes of one (metric, time) with different values gets them
committed in the order it sent them, so the first value is the one stored
and the later one is the conflict, even with several transactions under
way at once. Within one transaction items keep their arrival order. Items
held back this way leave the queue as soon as the transaction holding
their key finishes; others pass them meanwhile.

The policy knows nothing about SQL: ``commit(items)`` is injected and
returns a Deferred firing with one outcome per item, a result or an
Exception instance. Time comes from an injected ``IReactorTime``.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from collections.abc import Callable, Hashable, Iterable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")

log = Logger()


class Overloaded(Exception):
    """The commit queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Closed(Exception):
    """The store is shutting down and takes no more writes."""


@dataclass
class _Waiting(Generic[T]):
    item: T
    size: int
    arrived: float
    keys: tuple[Hashable, ...] = ()
    deferred: Deferred = field(default_factory=Deferred)


class GroupCommit(Generic[T]):
    def __init__(
        self,
        clock: IReactorTime,
        commit: Callable[[list[T]], Deferred],
        *,
        slots: int,
        max_batch: int,
        max_delay: float,
        max_queue: int,
        keys: Callable[[T], Iterable[Hashable]] | None = None,
    ) -> None:
        self._clock = clock
        self._commit = commit
        self._keys = keys
        self._busy: Counter[Hashable] = Counter()  # ordering keys of the items in transactions under way
        # After a look at the queue found every item held: the keys that held them. Until a transaction ends,
        # a newcomer with one of those keys is held too, and the queue is not looked at again for it (which
        # would cost a pass over the whole queue per write while one device floods it).
        self._stuck: set[Hashable] | None = None
        self.slots = slots
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_queue = max_queue
        self._queue: deque[_Waiting[T]] = deque()
        self.queued = 0  # readings waiting, not yet in a transaction
        self.in_flight = 0  # transactions under way
        self._timer: IDelayedCall | None = None
        self._closed = False
        self._idle: list[Deferred] = []
        self._room: list[Deferred] = []

    @property
    def closed(self) -> bool:
        return self._closed

    def set_max_queue(self, max_queue: int) -> None:
        """A new bound (SIGHUP); writers waiting for room are let in if the new one has it."""
        self.max_queue = max_queue
        self._wake_room()

    def has_room(self, size: int) -> bool:
        return self.queued + size <= self.max_queue or self.queued == 0

    def admits(self, size: int) -> bool:
        """Room for ``size`` readings, and nobody waiting for room before this writer."""
        return not self._room and self.has_room(size)

    def wait_for_room(self) -> Deferred:
        """Fires once the queue has drained to half its limit, after the writers already waiting (backpressure)."""
        if not self._room and self.queued <= self.max_queue // 2:
            return succeed(None)
        d: Deferred = Deferred()
        self._room.append(d)
        return d

    def submit(self, item: T, size: int) -> Deferred:
        if self._closed:
            return fail(Closed("the store is shutting down"))
        if self.queued + size > self.max_queue and self.queued > 0:
            return fail(Overloaded(f"{self.queued} readings are waiting for the database (limit {self.max_queue})"))
        keys = tuple(self._keys(item)) if self._keys is not None else ()
        waiting = _Waiting(item, size, self._clock.seconds(), keys)
        self._queue.append(waiting)
        self.queued += size
        if self._stuck is not None:
            if not self._stuck.isdisjoint(keys):
                self._stuck.update(keys)
                return waiting.deferred
            self._stuck = None  # this one may go: look again
        self._pump(just_finished=False)
        return waiting.deferred

    def _take_batch(self) -> list[_Waiting[T]]:
        """The next batch in arrival order, passing over items whose keys an earlier item holds."""
        batch: list[_Waiting[T]] = []
        total = 0
        if not self._busy:
            # Nothing under way: the front of the queue, as it stands (the usual case, and the cheap one).
            while self._queue and (not batch or total + self._queue[0].size <= self.max_batch):
                waiting = self._queue.popleft()
                batch.append(waiting)
                total += waiting.size
            self._taken(batch, total)
            return batch
        held: set[Hashable] = set(self._busy)  # keys of transactions under way, then of items passed over
        kept: deque[_Waiting[T]] = deque()
        while self._queue:
            waiting = self._queue[0]
            if held.isdisjoint(waiting.keys):
                if batch and total + waiting.size > self.max_batch:
                    break  # the batch is full
                batch.append(self._queue.popleft())
                total += waiting.size
            else:
                held.update(waiting.keys)
                kept.append(self._queue.popleft())
        kept.extend(self._queue)
        self._queue = kept
        if not batch:
            self._stuck = held
        self._taken(batch, total)
        return batch

    def _taken(self, batch: list[_Waiting[T]], total: int) -> None:
        self.queued -= total
        for waiting in batch:
            self._busy.update(waiting.keys)

    def _pump(self, just_finished: bool) -> None:
        while self._queue and self.in_flight < self.slots:
            due = (
                just_finished
                or self._closed
                or self.max_delay <= 0
                or self.queued >= self.max_batch
                or self._clock.seconds() >= self._queue[0].arrived + self.max_delay
            )
            if not due:
                self._arm_timer()
                return
            batch = self._take_batch()
            if not batch:
                break  # every waiting item is held behind a transaction under way: its end pumps again
            self._start(batch)
            just_finished = False
        self._maybe_idle()
        self._wake_room()

    def _arm_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            return
        delay = max(0.0, self._queue[0].arrived + self.max_delay - self._clock.seconds())
        self._timer = self._clock.callLater(delay, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._pump(just_finished=False)

    def _start(self, batch: list[_Waiting[T]]) -> None:
        self.in_flight += 1
        try:
            d = self._commit([w.item for w in batch])
        except Exception:
            d = fail()
        d.addBoth(self._finished, batch)

    def _finished(self, outcomes: Any, batch: list[_Waiting[T]]) -> None:
        self.in_flight -= 1
        self._stuck = None
        for waiting in batch:
            self._busy.subtract(waiting.keys)
            for key in waiting.keys:
                if self._busy[key] <= 0:
                    self._busy.pop(key, None)
        if isinstance(outcomes, Failure):
            outcomes = [outcomes.value] * len(batch)
        for waiting, outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                waiting.deferred.errback(Failure(outcome))
            else:
                waiting.deferred.callback(outcome)
        self._pump(just_finished=True)

    def _wake_room(self) -> None:
        if self._room and self.queued <= self.max_queue // 2:
            waiting, self._room = self._room, []
            for d in waiting:
                d.callback(None)

    def _maybe_idle(self) -> None:
        if not self._queue and self.in_flight == 0:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def close(self) -> Deferred:
        """Refuse new writes; fire when everything queued has committed."""
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._queue and self.in_flight == 0:
            return succeed(None)
        d: Deferred = Deferred()
        self._idle.append(d)
        self._pump(just_finished=False)
        return d
