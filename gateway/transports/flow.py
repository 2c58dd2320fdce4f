"""
The Twisted side of a ``DeviceSession``'s flow control (``session.py``), as
every transport whose peer sends a stream of messages applies it (TGP, the
MQTT listener, the broker sources): pause and resume the transport as the
session says, take the messages that arrived before a pause took effect,
and hold one message while the store has no room, reading nothing more
until the ingest core says there is room again (in turn with the others).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.ingest.core import Ingest
from gateway.transports.session import DeviceSession, Flow


class SessionFlow:
    """A mixin: the transport gives ``session``, ``transport``, ``flow_ended`` and ``take``."""

    __slots__ = ()
    session: DeviceSession[Any]
    transport: Any

    def flow_ended(self) -> bool:
        """Whether the connection is closing (nothing more is paused, resumed or taken)."""
        raise NotImplementedError

    def take(self) -> None:
        """Take the messages that have arrived, as far as the session lets it."""
        raise NotImplementedError

    def flowed(self, paused: bool) -> None:
        """The transport was paused or resumed."""

    def flow(self) -> None:
        """Pause or resume the transport as the session says; take messages that arrived before a pause."""
        if self.flow_ended():
            return
        action = self.session.flow()
        if action is Flow.PAUSE:
            self.transport.pauseProducing()
            self.flowed(True)
        elif action is Flow.RESUME:
            self.transport.resumeProducing()
            self.flowed(False)
            self.take()  # messages that arrived before the pause took effect

    def hold(self, ingest: Ingest, again: Callable[[], None]) -> None:
        """Keep one message until the store has room (then ``again()``, which may hold it again if another
        connection took the room); take nothing more meanwhile."""
        self.session.held = True
        self.flow()

        def room(_: Any) -> None:
            self.session.held = False
            if self.flow_ended():
                return
            again()
            self.flow()
            self.take()

        ingest.wait_for_room().addCallback(room)
