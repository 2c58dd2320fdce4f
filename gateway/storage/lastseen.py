"""
When and whence each device was last heard: kept in memory as writes
commit, and written to ``devices.last_seen`` / ``last_source`` a few seconds
late, in one statement for every device heard meanwhile, so the hot path
pays for a dictionary store, not for an UPDATE per request. A write that
fails (the database is away) keeps the figures for the next try; the
database keeps the latest time whatever the order (GREATEST).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.storage.pool import first_line

log = Logger()

INTERVAL = 5.0

UPDATE_LAST_SEEN = """
UPDATE devices AS d SET last_seen = GREATEST(d.last_seen, to_timestamp(u.at)),
                        last_source = coalesce(u.source, d.last_source)
FROM unnest(%s::integer[], %s::float8[], %s::text[]) AS u(id, at, source)
WHERE d.id = u.id
"""


class LastSeen:
    def __init__(self, run: Callable[[str, tuple[Any, ...]], Deferred], clock: IReactorTime) -> None:
        self._run = run  # (sql, params) → Deferred, on the store's pool
        self._clock = clock
        self._seen: dict[int, float] = {}
        self._sources: dict[int, str] = {}  # device id → where its last write came from
        self._loop = LoopingCall(self.flush)
        self._loop.clock = clock

    def heard(self, device_id: int, source: str = "") -> None:
        self._seen[device_id] = self._clock.seconds()
        if source:
            self._sources[device_id] = source

    def start(self) -> None:
        self._loop.start(INTERVAL, now=False)

    def stop(self) -> Deferred:
        """Stop the timer and write what is left."""
        if self._loop.running:
            self._loop.stop()
        return self.flush()

    def flush(self) -> Deferred:
        """Write devices' last-seen times and sources; never errbacks."""
        if not self._seen:
            return succeed(None)
        seen, self._seen = self._seen, {}
        ids = sorted(seen)
        sources = [self._sources.pop(i, None) for i in ids]
        d = self._run(UPDATE_LAST_SEEN, (ids, [seen[i] for i in ids], sources))

        def failed(f: Failure) -> None:
            for device_id, at in seen.items():
                self._seen[device_id] = max(at, self._seen.get(device_id, 0.0))
            for device_id, source in zip(ids, sources):
                if source is not None:
                    self._sources.setdefault(device_id, source)
            log.warn("last-seen times not written yet: {error}", error=first_line(f.value))

        return d.addErrback(failed)
