"""Log lines that a flood of bad input could multiply, kept to a few a minute per source: for every layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class RateLimitedLog:
    """
    At most ``burst`` messages per key (a device or a peer address) per
    ``window`` seconds; the rest are counted and summed up in one line when
    the key next logs after its window ends.
    """

    MAX_KEYS = 10_000

    def __init__(self, logger: Logger, clock: IReactorTime, burst: int = 5, window: float = 60.0) -> None:
        self.logger = logger
        self.clock = clock
        self.burst = burst
        self.window = window
        self._keys: dict[str, list[float]] = {}  # key → [window start, logged, suppressed]

    def warn(self, key: str, fmt: str, **fields: Any) -> None:
        self._emit(self.logger.warn, key, fmt, fields)

    def _emit(self, method: Callable[..., None], key: str, fmt: str, fields: dict[str, Any]) -> None:
        now = self.clock.seconds()
        state = self._keys.get(key)
        if state is None or now - state[0] >= self.window:
            if state is not None and state[2]:
                self.logger.warn(
                    "{suppressed} more messages about {key} were not logged in {window:g}s",
                    suppressed=int(state[2]),
                    key=key,
                    window=self.window,
                )
            if state is None and len(self._keys) >= self.MAX_KEYS:
                self._forget(now)
            state = self._keys[key] = [now, 0, 0]
        if state[1] < self.burst:
            state[1] += 1
            method(fmt, **fields)
        else:
            state[2] += 1

    def _forget(self, now: float) -> None:
        for key in [k for k, s in self._keys.items() if now - s[0] >= self.window] or list(self._keys)[:1000]:
            del self._keys[key]
