"""
Logging: a JSON-lines observer for log shippers, a level filter that can
change while the gateway runs, and a rate limit for messages a misbehaving
client could otherwise repeat thousands of times a second.

Secrets never reach a log event: tokens and Authorization headers are not
passed to the logger anywhere, sinks' headers are kept out of their repr,
and DSNs are logged through ``describe_dsn`` (no password).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warn", "error", "critical")


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def json_line(event: dict[str, Any]) -> str:
    """One event as one JSON object and a newline: time, level, namespace, message and its fields."""
    level = event.get("log_level")
    doc: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(timespec="milliseconds"),
        "level": level.name if isinstance(level, type(LogLevel.info)) else "info",
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in doc and not key.startswith("_"):
            doc[key] = _plain(value)
    failure = event.get("log_failure")
    if failure is not None:
        doc["traceback"] = failure.getTraceback()
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n"


def json_observer(out: IO[str]) -> FileLogObserver:
    return FileLogObserver(out, json_line)


class LevelFilter:
    """The minimum level shown; SIGHUP changes it through ``set``."""

    def __init__(self, level: str = "info") -> None:
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))

    def set(self, level: str) -> None:
        self.predicate.setLogLevelForNamespace("", LogLevel.levelWithName(level))

    def wrap(self, observer: ILogObserver) -> ILogObserver:
        return FilteringLogObserver(observer, [self.predicate])


def twistd_log_file(twistd_options: Any) -> IO[str]:
    """Where twistd would write its log: stdout with -n and no --logfile, else the log file."""
    logfile = twistd_options.get("logfile") if twistd_options is not None else None
    nodaemon = bool(twistd_options.get("nodaemon")) if twistd_options is not None else True
    if logfile == "-" or (not logfile and nodaemon):
        return sys.stdout
    return LogFile.fromFullPath(logfile or "twistd.log")


def make_observer(fmt: str, out: IO[str], levels: LevelFilter) -> ILogObserver:
    base = json_observer(out) if fmt == "json" else textFileLogObserver(out)
    return levels.wrap(base)


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
