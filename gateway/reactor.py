"""
The reactor as the gateway's components take it, as types. ``Clock`` is
what timing needs (``IReactorTime``: ``seconds``, ``callLater``; a
``task.Clock`` in the tests). ``Reactor`` is every reactor interface the
components use: time, threads (blocking work), TCP and name resolution
(endpoints), the core (shutdown triggers), as Twisted itself types its
global reactor. Only ``makeService`` (twistd's entry point) takes the global
reactor, and says once that it is one of these (``as_reactor``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from twisted.internet.interfaces import IReactorTime

Clock = IReactorTime

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IReactorCore,
        IReactorFromThreads,
        IReactorPluggableNameResolver,
        IReactorTCP,
        IReactorUDP,
        IReactorThreads,
    )

    class Reactor(
        IReactorCore,
        IReactorTime,
        IReactorThreads,
        IReactorFromThreads,
        IReactorTCP,
        IReactorUDP,
        IReactorPluggableNameResolver,
    ):
        """What the gateway's reactor provides (a make-believe interface, as Twisted's own ``_IReactorCommon``)."""

else:
    Reactor = Any


def as_reactor(reactor: Any) -> Reactor:
    """The global reactor (any of Twisted's: every one provides these interfaces)."""
    return cast("Reactor", reactor)
