"""
Closing the sessions of revoked and rotated devices, on every gateway that
shares the database.

``gatewayctl device add/set/revoke/rotate`` sends ``NOTIFY gateway_devices`` with
the device's name in the transaction that changes it, so the notice arrives
when the change is visible. Each gateway LISTENs on a connection of its
own; on a notice it reads the device's row and ends every TGP session of
that device whose key is no longer the stored one (or whose device is
revoked or gone) with BYE AUTH_FAILED. HTTPS needs no session to close:
each request is authenticated, and the token cache is cleared at once; so
is what the broker sources and the Modbus poller remember of the device's
name (a device added after its readings were refused is taken at once).

A notice sent while the LISTEN connection was down is lost, so after every
(re)connection the watcher checks all online sessions against the database.
A heartbeat query every few seconds notices a dead connection (an idle
connection is otherwise not told).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.reactor import Reactor
from gateway.storage.pool import PgPool
from gateway.storage.pool import first_line

log = Logger()

CHANNEL = "gateway_devices"
HEARTBEAT = 5.0
DEVICE_KEYS = "SELECT name, token_hash, revoked_at IS NOT NULL FROM devices WHERE name = ANY(%s)"


class DeviceWatch:
    """LISTENs for device changes; ``sessions()`` gives {name: [session, …]} of the devices online here."""

    def __init__(
        self,
        reactor: Reactor,
        sessions: Callable[[], dict[str, list[Any]]],
        close: Callable[[Any, str], None],
        changed: Callable[[list[str] | None], None] = lambda names: None,
    ) -> None:
        self.reactor = reactor
        self.pool = PgPool(reactor, 1)
        self.pool.on_connect = self._listen
        self.sessions = sessions
        self.close = close  # close(session, reason)
        self.changed = changed  # these devices (None: any) changed: forget what is remembered of them
        self.closed = 0
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = reactor

    def start(self, dsn: str) -> Deferred:
        self._heartbeat.start(HEARTBEAT, now=False)
        return self.pool.start(dsn)

    def stop(self) -> Deferred:
        if self._heartbeat.running:
            self._heartbeat.stop()
        return self.pool.close()

    def _listen(self, conn: Any) -> Deferred:
        conn.addNotifyObserver(self._notified)
        d = conn.runOperation(f"LISTEN {CHANNEL}")
        # Notices sent while no connection listened are lost: check everyone online now.
        d.addCallback(lambda _: self.reactor.callLater(0, self.check, None))
        return d

    def _beat(self) -> None:
        self.pool.run(lambda c: c.runQuery("SELECT 1")).addErrback(lambda _: None)

    def _notified(self, notify: Any) -> Deferred:
        return self.check([notify.payload])

    def check(self, names: list[str] | None) -> Deferred:
        """Close sessions whose credentials changed: of ``names``, or of every device online (None)."""
        self.changed(names)
        online = self.sessions()
        wanted = sorted(online) if names is None else [n for n in names if n in online]
        if not wanted:
            return succeed(0)

        def compare(rows: list[tuple]) -> int:
            current = {name: (bytes(key), revoked) for name, key, revoked in rows}
            count = 0
            online = self.sessions()
            for name in wanted:
                state = current.get(name)
                for session in online.get(name, []):
                    if state is None:
                        reason = "the device was removed"
                    elif state[1]:
                        reason = "the device was revoked"
                    elif session.stored_key != state[0]:
                        reason = "the device's token was replaced"
                    else:
                        continue
                    self.close(session, reason)
                    count += 1
            self.closed += count
            return count

        def failed(f: Failure) -> int:
            log.warn("device changes not checked yet: {error}", error=first_line(f.value))
            return 0

        d = self.pool.run(lambda c: c.runQuery(DEVICE_KEYS, (wanted,)))
        return d.addCallbacks(compare, failed)
