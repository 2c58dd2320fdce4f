"""
The operations side as the assembler builds it: the connections gauge, and
a stop bounded by ``--shutdown-timeout``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.reactor import Clock
from gateway.families import gauge

log = Logger()


def connection_metrics(connections: Callable[[], Mapping[str, int]]) -> Callable[[], Iterator[Any]]:
    """/metrics' gateway_connections from a function that counts them by transport."""

    def families() -> Iterator[Any]:
        conns = gauge("gateway_connections", "Open connections, by transport.", labels=["transport"])
        for transport, count in sorted(connections().items()):
            conns.add_metric([transport], count)
        yield conns

    return families


def stop_within(stopping: Deferred, timeout: float, clock: Clock, cut: Callable[[], Deferred]) -> Deferred:
    """
    Fires when ``stopping`` does, or ``timeout`` seconds from now once ``cut`` (close what is left) has
    finished, whichever comes first; never errbacks (a failure to stop is logged).
    """
    out: Deferred = Deferred()

    def done(_: Any = None) -> None:
        if not out.called:
            out.callback(None)

    def finished(result: Any) -> None:
        if timer.active():
            timer.cancel()
        done()
        if isinstance(result, Failure):
            log.failure("stopping the gateway failed", result)

    timer = clock.callLater(timeout, lambda: cut().addBoth(done))
    stopping.addBoth(finished)
    return out
