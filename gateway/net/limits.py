"""
Connection limits that keep a crowd from taking the gateway down: open
connections in all and per IP address (readings per second per device are
``ingest.rates``).

Connections. Every listening port's factory is wrapped in a
``LimitedFactory`` sharing one ``ConnectionLimits``. A connection over a
limit is closed as soon as it is accepted (``buildProtocol`` returns None),
before any TLS handshake or buffer is spent on it; the refusal is counted
and logged (rate-limited). Twisted's ``LimitConnectionsByPeer`` keys on
``addr[0]``, which today's address objects do not support, hence our own.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure


class ConnectionLimits:
    def __init__(self, max_total: int, max_per_address: int, refused: Any = None) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self.by_address: dict[str, int] = {}
        # told (address, why) for each connection refused
        self.refused = refused or (lambda address, why: None)

    def refusal(self, address: str, why: str) -> tuple[str, str]:
        """The code and message of a refusal ``admit`` reported as ``why`` ("total" or "address")."""
        limit = self.max_total if why == "total" else self.max_per_address
        count = self.total if why == "total" else self.by_address.get(address, 0)
        scope = "in all" if why == "total" else "from this address"
        return f"connection_limit_{why}", f"{count} open connections {scope} (limit {limit})"

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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.factory.limits.release(self.address)


class LimitedFactory(WrappingFactory):
    """Wraps a server factory; refuses connections over the shared limits."""

    protocol: Any = _Counted
    noisy = False  # the listener says where it listens

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
