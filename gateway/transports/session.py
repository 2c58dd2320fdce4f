"""
A device session's answer order and flow control, as a pure state machine:
no Twisted, no I/O, no clock. Stateful transports (TGP today) drive it; the
Twisted protocol around it only moves bytes, runs timers and pauses or
resumes its transport as the session says.

Theory of operation. Every numbered message a device sends is answered, and
answers go out strictly in arrival order, so an ACK always means "this
message and every one before it are settled" (a device may then drop all of
them from its buffer). ``arrived`` registers a message and returns its
ticket; when the message's outcome is known (it committed, or it was
refused), ``settle`` records it and returns the answers that may go out
now: the head of the queue and every settled ticket behind it, in order.

Flow control. The transport stops reading while any of these holds:

- the window is full: ``window`` messages are unanswered. It reopens only
  once half of them are answered, so a device at the limit does not make
  the transport pause and resume on every answer;
- a message is held, waiting for room in the store's write queue;
- the session is busy on a database lookup of the device (the handshake):
  what a peer sends meanwhile stays in the kernel's buffers, not in ours;
- the gateway is stopping.

``flow(window)`` says what the transport must do now: ``PAUSE``, ``RESUME``
or nothing, and remembers it, so each change is asked for once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Generic, TypeVar

OutcomeT = TypeVar("OutcomeT")


WINDOW_MAX = 10_000  # the largest window a session takes


class Flow(enum.Enum):
    PAUSE = "pause"
    RESUME = "resume"


@dataclass(eq=False, slots=True)
class Ticket(Generic[OutcomeT]):
    """One message awaiting its answer."""

    seq: int
    arrived: float  # when it arrived, for the ack latency
    settled: bool = False
    outcome: OutcomeT | None = None


class DeviceSession(Generic[OutcomeT]):
    # One per connected device: slots keep an idle device's cost down (10,000 of them is the norm).
    __slots__ = ("window", "_waiting", "_window_full", "held", "busy", "stopped", "paused")

    def __init__(self, window: int) -> None:
        if not 1 <= window <= WINDOW_MAX:
            raise ValueError(f"window must be 1..{WINDOW_MAX}, not {window}")
        self.window = window
        # A list, not a deque: an empty deque costs 600 bytes, an empty list 56, and 10,000 idle devices each
        # hold one. Settled tickets leave from the front a few at a time, from a window of at most WINDOW_MAX.
        self._waiting: list[Ticket[OutcomeT]] = []
        self._window_full = False
        self.held = False  # a message waits for room in the store
        self.busy = False  # the handshake waits on the database
        self.stopped = False  # the gateway is stopping: take nothing more
        self.paused = False  # what the transport was last told

    # -- answers, in order -------------------------------------------------

    def arrived(self, seq: int, at: float) -> Ticket[OutcomeT]:
        ticket: Ticket[OutcomeT] = Ticket(seq, at)
        self._waiting.append(ticket)
        self._update_window()
        return ticket

    def settle(self, ticket: Ticket[OutcomeT], outcome: OutcomeT) -> list[Ticket[OutcomeT]]:
        """Record a ticket's outcome; the tickets whose answers may go out now, in arrival order."""
        if ticket.settled:
            raise ValueError(f"message {ticket.seq} was settled already")
        ticket.settled, ticket.outcome = True, outcome
        waiting = self._waiting
        n = 0
        while n < len(waiting) and waiting[n].settled:
            n += 1
        ready = waiting[:n]
        del waiting[:n]
        self._update_window()
        return ready

    @property
    def unanswered(self) -> int:
        return len(self._waiting)

    @property
    def oldest_arrival(self) -> float | None:
        """When the oldest unanswered message arrived; None when all are answered."""
        return self._waiting[0].arrived if self._waiting else None

    # -- flow control ------------------------------------------------------

    def _update_window(self) -> None:
        waiting = len(self._waiting)
        if self._window_full and waiting <= self.window // 2:
            self._window_full = False
        elif not self._window_full and waiting >= self.window:
            self._window_full = True

    @property
    def may_read(self) -> bool:
        """May the transport take the next message now?"""
        return not (self._window_full or self.held or self.busy or self.stopped)

    def flow(self) -> Flow | None:
        """What the transport must do now to match ``may_read``."""
        stop = self._window_full or self.held or self.busy or self.stopped
        if stop and not self.paused:
            self.paused = True
            return Flow.PAUSE
        if not stop and self.paused:
            self.paused = False
            return Flow.RESUME
        return None

    def set_window(self, window: int) -> None:
        """A new window (SIGHUP): it applies from the next message or answer."""
        if not 1 <= window <= WINDOW_MAX:
            raise ValueError(f"window must be 1..{WINDOW_MAX}, not {window}")
        self.window = window
        self._update_window()
