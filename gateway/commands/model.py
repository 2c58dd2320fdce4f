"""A command as the ledger keeps it, and the checks of a request to send one."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from gateway.readings import format_ts, is_name
from gateway.settings import Setting, duration

STATES = ("queued", "sent", "delivered", "succeeded", "failed", "expired", "canceled")
WAITING = ("queued", "sent", "delivered")  # not finished
UNACKNOWLEDGED = ("queued", "sent")  # sent again until the device acknowledges
FINAL = ("succeeded", "failed", "expired", "canceled")
RESULTS = ("succeeded", "failed")  # what a device may report

DEFAULT_TTL = 600.0
MAX_TTL = 30 * 86400.0
MAX_PARAMS = 16 * 1024  # bytes of a command's parameters, as JSON
MAX_RESULT = 16 * 1024  # bytes of a device's result, as JSON
COMMAND_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,64}\Z")
COMMAND_NAME_RULE = "must be 1-64 characters of A-Z a-z 0-9 _ . : / -"


COMMAND_SETTINGS = (
    Setting(
        "command-retention",
        30 * 86400.0,
        lambda value: duration(value, lo=3600),
        "Keep finished commands (succeeded, failed, expired, canceled) and their history this long (12h, 30d).",
        live=True,
    ),
    Setting(
        "command-resend",
        30.0,
        lambda value: duration(value, lo=1, hi=3600),
        "Send a command again (same id) when the device has not acknowledged it after this many seconds "
        "(it is sent again at once when the device reconnects).",
        live=True,
    ),
)


class CommandError(Exception):
    """A request about a command that is refused: a code (the API picks the status) and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Command:
    id: str
    device: str
    name: str
    params: dict[str, Any]
    sender: str
    created: float  # epoch seconds
    expires: float
    state: str = "queued"
    attempts: int = 0
    result: Any = None
    transport: str | None = None
    events: tuple[dict[str, Any], ...] = field(default=())

    @property
    def finished(self) -> bool:
        return self.state in FINAL

    def doc(self) -> dict[str, Any]:
        """The command as the API shows it."""
        out: dict[str, Any] = {
            "id": self.id,
            "device": self.device,
            "name": self.name,
            "params": self.params,
            "sender": self.sender,
            "state": self.state,
            "created": format_ts(round(self.created * 1e6)),
            "expires": format_ts(round(self.expires * 1e6)),
            "attempts": self.attempts,
            "transport": self.transport,
            "result": self.result,
        }
        if self.events:
            out["history"] = list(self.events)
        return out

    def wire(self) -> dict[str, Any]:
        """What a device is sent (MQTT payload, HTTPS answer): id, name, params, expires."""
        return {
            "id": self.id,
            "name": self.name,
            "params": self.params,
            "expires": format_ts(round(self.expires * 1e6)),
        }


def new_id() -> str:
    return "c-" + secrets.token_hex(10)


@dataclass(frozen=True)
class Request:
    """A request to send a command, checked."""

    id: str
    name: str
    params: dict[str, Any]
    ttl: float


def parse_request(doc: Any) -> Request:
    """``{"name": …, "params": {…}, "ttl": "10m", "id": optional}``; CommandError invalid_command otherwise."""
    if not isinstance(doc, dict):
        raise CommandError("invalid_command", 'give a JSON object: {"name": ..., "params": {...}}')
    unknown = sorted(set(doc) - {"name", "params", "ttl", "id"})
    if unknown:
        raise CommandError("invalid_command", f"{unknown[0]}: unknown field (known: name, params, ttl, id)")
    name = doc.get("name")
    if not isinstance(name, str) or not COMMAND_NAME.match(name):
        raise CommandError("invalid_command", f"name: {COMMAND_NAME_RULE}")
    params = doc.get("params", {})
    if not isinstance(params, dict):
        raise CommandError("invalid_command", "params: give a JSON object")
    size = len(json.dumps(params, separators=(",", ":")))
    if size > MAX_PARAMS:
        raise CommandError("invalid_command", f"params: {size} bytes as JSON; the limit is {MAX_PARAMS}")
    ttl = parse_ttl(doc.get("ttl"))
    id_ = doc.get("id")
    if id_ is None:
        id_ = new_id()
    elif not is_name(id_):
        raise CommandError("invalid_command", "id: must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    return Request(id_, name, params, ttl)


def parse_ttl(value: Any) -> float:
    if value is None:
        return DEFAULT_TTL
    try:
        return duration(value, lo=1.0, hi=MAX_TTL)
    except ValueError as e:
        raise CommandError("invalid_command", f"ttl: {e} (at most 30d)") from None


def parse_result(doc: Any) -> tuple[str, Any]:
    """A device's result: ``{"status": "succeeded"|"failed", "result": …}``; CommandError invalid_result."""
    if not isinstance(doc, dict) or doc.get("status") not in RESULTS:
        raise CommandError("invalid_result", 'give {"status": "succeeded" or "failed", "result": {...}}')
    unknown = sorted(set(doc) - {"status", "result", "id"})
    if unknown:
        raise CommandError("invalid_result", f"{unknown[0]}: unknown field (known: status, result)")
    result = doc.get("result")
    size = len(json.dumps(result, separators=(",", ":")))
    if size > MAX_RESULT:
        raise CommandError("invalid_result", f"result: {size} bytes as JSON; the limit is {MAX_RESULT}")
    return doc["status"], result
