"""
Limits that keep one client, or a crowd, from taking the gateway down:
open connections (in all, and per IP address) and readings per second per
device.

Connections. Every listening port's factory is wrapped in a
``LimitedFactory`` sharing one ``ConnectionLimits``. A connection over a
limit is closed as soon as it is accepted (``buildProtocol`` returns None),
before any TLS handshake or buffer is spent on it; the refusal is counted
and logged (rate-limited). Twisted's ``LimitConnectionsByPeer`` keys on
``addr[0]``, which today's address objects do not support, hence our own.

Rates. ``DeviceRates`` is a token bucket per device: ``rate`` readings per
second, holding up to ten seconds' worth for bursts (a device back from an
outage empties its buffer quickly, then settles). A write bigger than the
whole bucket is let through when the bucket is full and leaves it in debt,
so no write is refused for ever. A refusal says how long to wait.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

BURST_SECONDS = 10.0
MAX_TRACKED = 100_000  # devices (or addresses) remembered at once


class ConnectionLimits:
    def __init__(self, max_total: int, max_per_address: int, refused: Any = None) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self.by_address: dict[str, int] = {}
        # told (address, why) for each connection refused
        self.refused = refused or (lambda address, why: None)

    def admit(self, address: str) -> bool:
        if self.total >= self.max_total:
            self.refused(address, "total")
            return False
        count = self.by_address.get(address, 0)
        if count >= self.max_per_address:
            self.refused(address, "address")
            return False
        self.total += 1
        self.by_address[address] = count + 1
        return True

    def release(self, address: str) -> None:
        self.total -= 1
        count = self.by_address.get(address, 1) - 1
        if count > 0:
            self.by_address[address] = count
        else:
            self.by_address.pop(address, None)


class _Counted(ProtocolWrapper):
    address = ""

    def connectionLost(self, reason: Any) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.factory.limits.release(self.address)


class LimitedFactory(WrappingFactory):
    """Wraps a server factory; refuses connections over the shared limits."""

    protocol = _Counted

    def __init__(self, wrapped: Any, limits: ConnectionLimits) -> None:
        super().__init__(wrapped)
        self.limits = limits

    def buildProtocol(self, addr: Any) -> Any:
        address = str(getattr(addr, "host", "?"))
        if not self.limits.admit(address):
            return None
        try:
            wrapped = self.wrappedFactory.buildProtocol(addr)
        except BaseException:
            self.limits.release(address)
            raise
        if wrapped is None:
            self.limits.release(address)
            return None
        built = self.protocol(self, wrapped)
        built.address = address
        return built


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
        self.refusals = 0

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
            self.refusals += 1
            self._keep(name, tokens, now)
            raise OverLimit(max(1, math.ceil((min(count, burst) - tokens) / rate)))
        self._keep(name, tokens, now)

    def _keep(self, name: str, tokens: float, now: float) -> None:
        if len(self._buckets) >= MAX_TRACKED:
            self._buckets.pop(next(iter(self._buckets)))  # the least recently heard from: forgetting it only helps it
        self._buckets[name] = (tokens, now)
