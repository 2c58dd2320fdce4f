"""
Readings per second per device.

``DeviceRates`` is a token bucket per device: ``rate`` readings per
second, holding up to ten seconds' worth for bursts (a device back from an
outage empties its buffer quickly, then settles). A write bigger than the
whole bucket is let through when the bucket is full and leaves it in debt,
so no write is refused for ever. A refusal says how long to wait.
"""

from __future__ import annotations

import math

from twisted.internet.interfaces import IReactorTime

BURST_SECONDS = 10.0
MAX_TRACKED = 100_000  # devices remembered at once


class OverLimit(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


class DeviceRates:
    """A token bucket per device name; ``rate`` 0 means no limit."""

    def __init__(self, rate: float, clock: IReactorTime) -> None:
        self.rate = rate
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name → (tokens, at)
        self.refused = 0  # takes refused, for tests and the console

    def take(self, name: str, count: int) -> None:
        """Spend ``count`` readings of the device's allowance, or raise OverLimit."""
        rate = self.rate
        if rate <= 0:
            return
        now = self.clock.seconds()
        burst = rate * BURST_SECONDS
        tokens, at = self._buckets.pop(name, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens >= count or tokens >= burst:
            tokens -= count
        else:
            self.refused += 1
            self._keep(name, tokens, now)
            raise OverLimit(max(1, math.ceil((min(count, burst) - tokens) / rate)))
        self._keep(name, tokens, now)

    def _keep(self, name: str, tokens: float, now: float) -> None:
        if len(self._buckets) >= MAX_TRACKED:
            self._buckets.pop(next(iter(self._buckets)))  # the least recently heard from: forgetting it only helps it
        self._buckets[name] = (tokens, now)
