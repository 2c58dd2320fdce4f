"""
How long to wait before trying again, for everything in the gateway that
retries: the database at start and each pooled connection, the embedded
PostgreSQL's restarts, Modbus hosts, upload sinks, the simulator's devices.

The policy is pure: the delay before retry ``attempt`` (0 for the first
retry) is ``first`` doubled ``attempt`` times, at most ``cap``, then spread
by jitter drawn from an injected ``rand`` (a seeded ``random.Random`` in
tests), so that many clients that failed together do not retry together:

- ``"none"``: exactly that;
- ``"equal"``: uniform in [half of it, all of it] (never sooner than half);
- ``"full"``: uniform in [0, all of it) (AWS's "full jitter", for many
  senders sharing one receiver).

``Backoff`` keeps the count of failures in a row for a caller that has state.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Jitter = Literal["none", "equal", "full"]


def backoff_delay(
    first: float,
    cap: float,
    attempt: int,
    jitter: Jitter = "none",
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry ``attempt`` (0-based); ``rand()`` is uniform in [0, 1)."""
    delay: float = min(cap, first * (1 << min(max(attempt, 0), 60)))
    if jitter == "equal":
        return delay * (0.5 + 0.5 * rand())
    if jitter == "full":
        return delay * rand()
    return delay


@dataclass
class Backoff:
    """Failures in a row and the delay each calls for: ``failed()`` counts one and says how long to wait."""

    first: float
    cap: float
    jitter: Jitter = "none"
    rand: Callable[[], float] = field(default=random.random, repr=False)
    failures: int = 0

    def failed(self) -> float:
        delay = backoff_delay(self.first, self.cap, self.failures, self.jitter, self.rand)
        self.failures += 1
        return delay

    def succeeded(self) -> None:
        self.failures = 0
