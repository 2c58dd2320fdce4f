"""
The read API on the HTTPS port: devices and their status, the digital
twin, stored readings, alerts and (for admins) the quarantine.

Callers present an API token (``gatewayctl token add NAME --role
reader|admin``), never a device token: a device proves who sends, and
reading the fleet's data is another right. Every answer is JSON; errors
are ``{"error": code, "message": text}``. Routing is a table (``ROUTES``)
that the OpenAPI document at ``/v1/openapi.json`` is checked against.

Readings are paged by keyset, not offset: ``next_cursor`` holds the
(time, metric) of the last reading sent, and the next page starts after
it, so readings stored meanwhile neither shift nor repeat a page.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.ingest import tokens
from gateway.readings import NAME_RULE, format_ts, is_name, parse_ts
from gateway.ops.status import StatusPolicy
from gateway.storage.queries import QUARANTINE_COLUMNS, quarantined_doc

log = Logger()

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100

FIND_API_TOKEN = "SELECT role, token_hash, revoked_at IS NOT NULL FROM api_tokens WHERE token_id = %s"
FIND_DEVICE_TOKEN = "SELECT token_hash FROM devices WHERE token_id = %s AND revoked_at IS NULL"
DEVICE_ID = "SELECT id FROM devices WHERE name = %s"
LATEST = (
    "SELECT metric, (extract(epoch FROM ts) * 1000000)::bigint, value, "
    "(extract(epoch FROM updated_at) * 1000000)::bigint FROM twin WHERE device_id = %s ORDER BY metric"
)
READINGS = """
SELECT metric, (extract(epoch FROM ts) * 1000000)::bigint, value FROM readings
WHERE device_id = %(device)s
  AND (%(metric)s::text IS NULL OR metric = %(metric)s)
  AND (%(since)s::bigint IS NULL OR ts >= timestamptz 'epoch' + %(since)s * interval '1 microsecond')
  AND (%(until)s::bigint IS NULL OR ts < timestamptz 'epoch' + %(until)s * interval '1 microsecond')
  AND (%(after_ts)s::bigint IS NULL
       OR (ts, metric) > (timestamptz 'epoch' + %(after_ts)s * interval '1 microsecond', %(after_metric)s::text))
ORDER BY ts, metric
LIMIT %(limit)s
"""
ALERTS = """
SELECT a.id, a.rule, d.name, a.metric, a.message,
       (extract(epoch FROM a.fired_at) * 1000000)::bigint, (extract(epoch FROM a.fired_ts) * 1000000)::bigint,
       a.fired_value, (extract(epoch FROM a.cleared_at) * 1000000)::bigint,
       (extract(epoch FROM a.cleared_ts) * 1000000)::bigint, a.cleared_value
FROM alerts a JOIN devices d ON d.id = a.device_id
WHERE (%(state)s = 'all' OR (%(state)s = 'open') = (a.cleared_at IS NULL))
  AND (%(device)s::text IS NULL OR d.name = %(device)s)
ORDER BY a.fired_at DESC, a.id DESC
LIMIT %(limit)s
"""
QUARANTINE = f"""
SELECT {QUARANTINE_COLUMNS}
FROM quarantine q JOIN devices d ON d.id = q.device_id
WHERE (%(device)s::text IS NULL OR d.name = %(device)s) AND q.id > %(after)s
ORDER BY q.id
LIMIT %(limit)s
"""


class ApiError(Exception):
    """A request the read API does not answer with data: a code and a message (the resource picks the status)."""

    def __init__(self, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # as in the OpenAPI document: /v1/devices/{name}
    role: str | None  # "reader", "admin", or None: no token needed
    handler: str  # ReadApi method
    params: tuple[str, ...] = ()  # query parameters allowed

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{[a-z]+\}", "([^/]+)", self.template) + "$")


ROUTES = (
    Route("GET", "/v1/openapi.json", None, "openapi"),
    Route("GET", "/v1/devices", "reader", "devices", ("limit", "cursor")),
    Route("GET", "/v1/devices/{name}", "reader", "device"),
    Route("GET", "/v1/devices/{name}/latest", "reader", "latest"),
    Route("GET", "/v1/devices/{name}/readings", "reader", "readings", ("metric", "since", "until", "limit", "cursor")),
    Route("GET", "/v1/alerts", "reader", "alerts", ("state", "device", "limit")),
    Route("GET", "/v1/quarantine", "admin", "quarantine", ("device", "limit", "cursor")),
)

ROLES = {"reader": 1, "admin": 2}


def _one(args: dict[bytes, list[bytes]], name: str) -> str | None:
    values = args.get(name.encode())
    if not values:
        return None
    if len(values) > 1:
        raise ApiError("invalid_parameter", f"{name}: give it once")
    return values[0].decode("utf-8", "replace")


def _limit(args: dict[bytes, list[bytes]]) -> int:
    text = _one(args, "limit")
    if text is None:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise ApiError("invalid_parameter", f"limit: {text!r} is not a whole number in 1..{MAX_LIMIT}")
    return int(text)


def _time(args: dict[bytes, list[bytes]], name: str) -> int | None:
    text = _one(args, name)
    if text is None:
        return None
    try:
        return parse_ts(int(text) if text.lstrip("-").isdigit() else text)
    except ValueError as e:
        raise ApiError("invalid_parameter", f"{name}: {text!r} {e}") from None


def _name(args: dict[bytes, list[bytes]], name: str) -> str | None:
    text = _one(args, name)
    if text is not None and not is_name(text):
        raise ApiError("invalid_parameter", f"{name}: {NAME_RULE}")
    return text


def encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(text: str | None, check: Callable[[Any], bool]) -> Any:
    if text is None:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except ValueError:
        value = None
    if value is None or not check(value):
        raise ApiError("invalid_cursor", "cursor: not a cursor this API gave; start again without it")
    return value


class ReadApi:
    """The routes' work: authorisation and queries, on a pool of its own."""

    def __init__(self, pool: Any, clock: IReactorTime, policy: StatusPolicy, openapi: dict[str, Any]) -> None:
        self.pool = pool
        self.clock = clock
        self.policy = policy
        self.openapi_doc = openapi

    def _query(self, sql: str, params: Any) -> Deferred:
        return self.pool.run(lambda c: c.runQuery(sql, params))

    async def role_of(self, token: str | None) -> str:
        """The role of an API token; ApiError 401 (none, unknown, revoked) or 403 (a device token)."""
        parts = tokens.split_token(token) if token else None
        if parts is None:
            raise ApiError("unauthorized", "give an API token: Authorization: Bearer <token>")
        rows = await self._query(FIND_API_TOKEN, (parts[0],))
        if rows and not rows[0][2] and tokens.token_matches(token or "", bytes(rows[0][1])):
            return str(rows[0][0])
        if not rows:
            devices = await self._query(FIND_DEVICE_TOKEN, (parts[0],))
            if devices and tokens.token_matches(token or "", bytes(devices[0][0])):
                raise ApiError("forbidden", "a device token cannot read; use an API token (gatewayctl token add)")
        raise ApiError("unauthorized", "unknown or revoked API token")

    async def handle(self, method: str, path: str, args: dict[bytes, list[bytes]], token: str | None) -> Any:
        for route in ROUTES:
            match = route.pattern.match(path)
            if match is None:
                continue
            if route.method != method:
                raise ApiError("method_not_allowed", f"use {route.method}")
            unknown = sorted(k.decode("utf-8", "replace") for k in args if k.decode("latin-1") not in route.params)
            if unknown:
                allowed = ", ".join(route.params) or "none"
                raise ApiError("invalid_parameter", f"{unknown[0]}: unknown parameter (allowed: {allowed})")
            if route.role is not None:
                role = await self.role_of(token)
                if ROLES[role] < ROLES[route.role]:
                    raise ApiError("forbidden", f"this needs an API token with the {route.role} role")
            handler = getattr(self, route.handler)
            return await handler(args, *match.groups())
        raise ApiError("not_found", f"no such resource: {path}")

    # -- the routes --------------------------------------------------------

    async def openapi(self, args: Any) -> dict[str, Any]:
        return self.openapi_doc

    async def devices(self, args: Any) -> dict[str, Any]:
        now = self.clock.seconds()
        limit = _limit(args)
        after = decode_cursor(_one(args, "cursor"), is_name)
        rows = await self._query(*self.policy.query(now, after=after, limit=limit + 1))
        page = rows[:limit]
        return {
            "devices": [self.policy.describe(row, now) for row in page],
            "next_cursor": encode_cursor(page[-1][0]) if len(rows) > limit else None,
        }

    async def device(self, args: Any, name: str) -> dict[str, Any]:
        now = self.clock.seconds()
        rows = await self._query(*self.policy.query(now, name))
        if not rows:
            raise ApiError("no_such_device", f"no device {name!r}")
        return self.policy.describe(rows[0], now)

    async def _device_id(self, name: str) -> int:
        rows = await self._query(DEVICE_ID, (name,))
        if not rows:
            raise ApiError("no_such_device", f"no device {name!r}")
        return int(rows[0][0])

    async def latest(self, args: Any, name: str) -> dict[str, Any]:
        rows = await self._query(LATEST, (await self._device_id(name),))
        return {
            "device": name,
            "metrics": {m: {"ts": format_ts(ts), "value": v, "updated_at": format_ts(up)} for m, ts, v, up in rows},
        }

    async def readings(self, args: Any, name: str) -> dict[str, Any]:
        limit = _limit(args)
        after = decode_cursor(
            _one(args, "cursor"),
            lambda v: isinstance(v, list) and len(v) == 2 and type(v[0]) is int and is_name(v[1]),
        )
        params = {
            "metric": _name(args, "metric"),
            "since": _time(args, "since"),
            "until": _time(args, "until"),
            "after_ts": after[0] if after else None,
            "after_metric": after[1] if after else None,
            "limit": limit + 1,
        }
        params["device"] = await self._device_id(name)
        rows = await self._query(READINGS, params)
        page = rows[:limit]
        more = len(rows) > limit
        return {
            "device": name,
            "readings": [{"metric": m, "ts": format_ts(ts), "value": v} for m, ts, v in page],
            "next_cursor": encode_cursor([page[-1][1], page[-1][0]]) if more else None,
        }

    async def alerts(self, args: Any) -> dict[str, Any]:
        state = _one(args, "state") or "all"
        if state not in ("open", "cleared", "all"):
            raise ApiError("invalid_parameter", f"state: {state!r} is not open, cleared or all")
        rows = await self._query(ALERTS, {"state": state, "device": _name(args, "device"), "limit": _limit(args)})
        out = []
        for id_, rule, device, metric, message, fired_at, fired_ts, fired_value, cleared_at, cleared_ts, cv in rows:
            out.append(
                {
                    "id": id_,
                    "rule": rule,
                    "device": device,
                    "metric": metric,
                    "state": "open" if cleared_at is None else "cleared",
                    "message": message,
                    "fired_at": format_ts(fired_at),
                    "fired_reading": {"ts": format_ts(fired_ts), "value": fired_value},
                    "cleared_at": format_ts(cleared_at) if cleared_at is not None else None,
                    "cleared_reading": {"ts": format_ts(cleared_ts), "value": cv} if cleared_ts is not None else None,
                }
            )
        return {"alerts": out}

    async def quarantine(self, args: Any) -> dict[str, Any]:
        limit = _limit(args)
        after = decode_cursor(_one(args, "cursor"), lambda v: type(v) is int and v >= 0) or 0
        rows = await self._query(QUARANTINE, {"device": _name(args, "device"), "after": after, "limit": limit + 1})
        page = rows[:limit]
        return {
            "quarantine": [quarantined_doc(row) for row in page],
            "next_cursor": encode_cursor(page[-1][0]) if len(rows) > limit else None,
        }
