"""
When and whence each device was last heard: kept in memory as writes
commit, and written to ``devices.last_seen`` / ``last_source`` a few seconds
late, in one statement for every device heard meanwhile, so the hot path
pays for a dictionary store, not for an UPDATE per request. A write that
fails (the database is away) keeps the figures for the next try; the
database keeps the latest time whatever the order (GREATEST). The same
statement adds the readings stored since to the device's count for the day
(UTC), which the fleet page shows.
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
                        last_source = coalesce(u.source, d.last_source),
                        readings_today = CASE WHEN d.readings_day = (now() AT TIME ZONE 'UTC')::date
                                              THEN d.readings_today + u.n ELSE u.n END,
                        readings_day = (now() AT TIME ZONE 'UTC')::date
FROM unnest(%s::integer[], %s::float8[], %s::text[], %s::bigint[]) AS u(id, at, source, n)
WHERE d.id = u.id
"""


class LastSeen:
    def __init__(self, run: Callable[[str, tuple[Any, ...]], Deferred], clock: IReactorTime) -> None:
        self._run = run  # (sql, params) → Deferred, on the store's pool
        self._clock = clock
        self._seen: dict[int, float] = {}
        self._sources: dict[int, str] = {}  # device id → where its last write came from
        self._counts: dict[int, int] = {}  # device id → readings stored since the last write
        self._loop = LoopingCall(self.flush)
        self._loop.clock = clock

    def heard(self, device_id: int, source: str = "", stored: int = 0) -> None:
        self._seen[device_id] = self._clock.seconds()
        if stored:
            self._counts[device_id] = self._counts.get(device_id, 0) + stored
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
        counts = [self._counts.pop(i, 0) for i in ids]
        d = self._run(UPDATE_LAST_SEEN, (ids, [seen[i] for i in ids], sources, counts))

        def failed(f: Failure) -> None:
            for device_id, at in seen.items():
                self._seen[device_id] = max(at, self._seen.get(device_id, 0.0))
            for device_id, source, count in zip(ids, sources, counts):
                if source is not None:
                    self._sources.setdefault(device_id, source)
                if count:
                    self._counts[device_id] = self._counts.get(device_id, 0) + count
            log.warn("last-seen times not written yet: {error}", error=first_line(f.value))

        return d.addErrback(failed)
