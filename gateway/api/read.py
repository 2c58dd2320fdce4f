"""
The read API on the HTTPS port: devices and their status, the digital
twin, stored readings, alerts and (for admins) the quarantine.

Callers present an API token (``gatewayctl token add NAME --role
reader|operator|admin``), never a device token: a device proves who sends, and
reading the fleet's data is another right. Every answer is JSON; errors
are ``{"error": code, "message": text}``. Routing is a table (``ROUTES``)
that the OpenAPI document at ``/v1/openapi.json`` is checked against.

Readings are paged by keyset, not offset: ``next_cursor`` holds the
(time, metric) of the last reading sent, and the next page starts after
it, so readings stored meanwhile neither shift nor repeat a page. A long
range is drawn from ``/series``: PostgreSQL reduces it to at most
``points`` buckets, each with its min, max and mean, so a week at one
reading a second (600,000 readings) is a few hundred rows on the wire.

The dashboard calls the same routes with its session cookie instead of a
token (``gateway.api.sessions``); a request that changes something must
then also carry the session's CSRF token.
"""

from __future__ import annotations

import base64
import heapq
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.api.oidc import OidcError, OidcVerifier
from gateway.api.sessions import Session, Sessions, csrf_matches
from gateway import tokens
from gateway.storage.sinkstatus import RETRY_DEAD, STATUS_FIELDS, sink_doc, status_sql
from gateway.readings import NAME_RULE, format_ts, is_name, parse_ts
from gateway.ops.status import StatusPolicy
from gateway.storage.cold import COLD_HOURS, COLD_READINGS, COLD_ROWS, hours_for_page
from gateway.storage.queries import QUARANTINE_COLUMNS, RELEASE, RELEASE_METRICS, quarantined_doc

log = Logger()

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_POINTS = 4000  # buckets of a series: more than a screen has pixels across
DEFAULT_POINTS = 600
DEFAULT_SPAN_US = 86_400 * 1_000_000  # a series without since: the day before until
SINK_COUNT_AT_MOST = 1_000_000  # readings not yet batched are counted up to this many per sink

FIND_API_TOKEN = "SELECT role, token_hash, revoked_at IS NOT NULL, id, name FROM api_tokens WHERE token_id = %s"
FIND_DEVICE_TOKEN = "SELECT token_hash FROM devices WHERE token_id = %s AND revoked_at IS NULL"
DEVICE_ID = "SELECT id FROM devices WHERE name = %s"
LATEST = (
    "SELECT metric, (extract(epoch FROM ts) * 1000000)::bigint, value, "
    "(extract(epoch FROM updated_at) * 1000000)::bigint FROM twin WHERE device_id = %s ORDER BY metric"
)
# A page of a device's readings in (time, metric) order, from the natural key (device, metric, ts): for each of
# the device's metrics (the twin holds every one ever stored) its first ``limit`` times after the cursor, from the
# index alone; the first ``limit`` of those together; then their values. Each metric costs one short index scan,
# and only the page's rows are read from the table.
_US = "timestamptz 'epoch' + %({})s * interval '1 microsecond'"
READINGS = f"""
WITH page AS (
    SELECT t.metric, m.id AS metric_id, k.ts FROM twin t JOIN metrics m ON m.name = t.metric CROSS JOIN LATERAL (
        SELECT r.ts FROM readings r
        WHERE r.device_id = t.device_id AND r.metric_id = m.id
          AND (%(since)s::bigint IS NULL OR r.ts >= {_US.format("since")})
          AND (%(until)s::bigint IS NULL OR r.ts < {_US.format("until")})
          AND (%(after_ts)s::bigint IS NULL OR (r.ts >= {_US.format("after_ts")}
               AND (r.ts > {_US.format("after_ts")} OR t.metric > %(after_metric)s::text)))
        ORDER BY r.ts
        LIMIT %(limit)s
    ) k
    WHERE t.device_id = %(device)s AND (%(metric)s::text IS NULL OR t.metric = %(metric)s)
    ORDER BY k.ts, t.metric
    LIMIT %(limit)s
)
SELECT p.metric, (extract(epoch FROM p.ts) * 1000000)::bigint, r.value
FROM page p JOIN readings r ON r.device_id = %(device)s AND r.metric_id = p.metric_id AND r.ts = p.ts
ORDER BY p.ts, p.metric
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
# The readings of one metric in [since, until) reduced to buckets of ``width`` µs, in PostgreSQL. date_bin keeps
# the per-row work in integer time arithmetic: converting every row's time to epoch numbers cost 3.5 times as much.
SERIES = f"""
SELECT lo, hi, mean, n, (extract(epoch FROM first) * 1000000)::bigint, (extract(epoch FROM last) * 1000000)::bigint
FROM (
    SELECT date_bin(
               %(width)s * interval '1 microsecond', ts, timestamptz 'epoch' + %(since)s * interval '1 microsecond'
           ) AS bucket,
           min(value) AS lo, max(value) AS hi, avg(value) AS mean, count(*) AS n, min(ts) AS first, max(ts) AS last
    FROM (
        SELECT ts, value FROM readings
        WHERE device_id = %(device)s AND metric_id = (SELECT id FROM metrics WHERE name = %(metric)s)
        UNION ALL
        SELECT ts, value FROM ({COLD_ROWS}) AS k
        WHERE k.device_id = %(device)s AND k.metric = %(metric)s
          AND k.hour > timestamptz 'epoch' + (%(since)s - 3600000000) * interval '1 microsecond'
          AND k.hour < timestamptz 'epoch' + %(until)s * interval '1 microsecond'
    ) AS r
    WHERE ts >= timestamptz 'epoch' + %(since)s * interval '1 microsecond'
      AND ts < timestamptz 'epoch' + %(until)s * interval '1 microsecond'
    GROUP BY 1
) AS buckets
ORDER BY bucket
"""
REJECTED = """
SELECT id, (extract(epoch FROM received_at) * 1000000)::bigint, source, reason, octet_length(raw),
       substring(raw FROM 1 FOR %(sample)s)
FROM rejected_input WHERE device = %(device)s AND (%(after)s::bigint IS NULL OR id < %(after)s)
ORDER BY received_at DESC, id DESC
LIMIT %(limit)s
"""
REJECTED_SAMPLE = 300
SINK_EXISTS = "SELECT 1 FROM upload_sinks WHERE name = %s"
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
class Call:
    """A request as a handler that takes more than its query sees it."""

    args: dict[bytes, list[bytes]]
    body: bytes
    credentials: Credentials
    who: str  # the API token's name, the OIDC subject, the dashboard session's subject; "" for a device
    source: Any = None  # where the request came from (a readings.Source), for a device's refusals


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # as in the OpenAPI document: /v1/devices/{name}
    role: str | None  # "reader", "operator", "admin"; "device" (a device token, checked by the handler); None
    handler: str  # ReadApi method, or "commands.<method>" of its CommandsApi
    params: tuple[str, ...] = ()  # query parameters allowed
    call: bool = False  # the handler takes the whole Call (body, who asks), not the query alone

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{[a-z]+\}", "([^/]+)", self.template) + "$")


ROUTES = (
    Route("GET", "/v1/openapi.json", None, "openapi"),
    Route("GET", "/v1/devices", "reader", "devices", ("limit", "cursor", "match")),
    Route("GET", "/v1/devices/{name}", "reader", "device"),
    Route("GET", "/v1/devices/{name}/latest", "reader", "latest"),
    Route("GET", "/v1/devices/{name}/readings", "reader", "readings", ("metric", "since", "until", "limit", "cursor")),
    Route("GET", "/v1/devices/{name}/series", "reader", "series", ("metric", "since", "until", "points")),
    Route("GET", "/v1/devices/{name}/rejected", "reader", "rejected", ("limit", "cursor")),
    Route("GET", "/v1/alerts", "reader", "alerts", ("state", "device", "limit")),
    Route("GET", "/v1/quarantine", "admin", "quarantine", ("device", "limit", "cursor")),
    Route("POST", "/v1/quarantine/{id}/release", "admin", "release"),
    Route("GET", "/v1/sinks", "reader", "sinks"),
    Route("POST", "/v1/sinks/{name}/retry", "admin", "retry_sink"),
    # Commands (gateway/api/commands.py): people and programs send them, devices poll and answer over HTTPS.
    Route("POST", "/v1/devices/{name}/commands", "operator", "commands.send", call=True),
    Route("GET", "/v1/devices/{name}/desired", "reader", "commands.desired"),
    Route("PUT", "/v1/devices/{name}/desired", "operator", "commands.desire", call=True),
    Route("GET", "/v1/devices/{name}/commands", "reader", "commands.of_device", ("state", "limit", "cursor")),
    Route("GET", "/v1/commands/{id}", "reader", "commands.show", ("wait",)),
    Route("POST", "/v1/commands/{id}/cancel", "operator", "commands.cancel", call=True),
    Route("GET", "/v1/commands", "device", "commands.poll", ("wait",), call=True),
    Route("POST", "/v1/commands/{id}/result", "device", "commands.result", call=True),
)

ROLES = {"reader": 1, "operator": 2, "admin": 3}


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


@dataclass(frozen=True)
class Credentials:
    """What a request presents: an API token, or the dashboard's session cookie and CSRF token."""

    token: str | None = None  # Authorization: Bearer
    cookie: str | None = None  # the session cookie
    csrf: str | None = None  # X-CSRF-Token
    same_origin: bool = True  # False when the browser said the request came from another site's page


@dataclass(frozen=True)
class ApiToken:
    """Who a bearer token names: an API token of ours (id), or an identity from the OIDC provider (no id)."""

    id: int | None
    name: str
    role: str
    expires: float | None = None  # epoch seconds, for a provider's token


class ReadApi:
    """The routes' work: authorisation and queries, on a pool of its own."""

    def __init__(
        self,
        pool: Any,
        clock: IReactorTime,
        policy: StatusPolicy,
        openapi: dict[str, Any],
        sessions: Sessions | None = None,
        oidc: OidcVerifier | None = None,
        commands: Any = None,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.commands = commands  # a CommandsApi, when the gateway takes commands
        self.policy = policy
        self.openapi_doc = openapi
        self.sessions = sessions
        self.oidc = oidc

    def _query(self, sql: str, params: Any) -> Deferred:
        return self.pool.run(lambda c: c.runQuery(sql, params))

    async def api_token(self, token: str | None) -> ApiToken:
        """
        The API token presented, or the identity in a JWT from the OIDC provider; ApiError 401 (none,
        unknown, revoked, expired, not verified) or 403 (a device token; a JWT naming no role here).
        """
        if token and self.oidc is not None and self.oidc.looks_like_jwt(token):
            try:
                who = await self.oidc.identity(token)
            except OidcError as e:
                raise ApiError(e.code, e.message) from None
            return ApiToken(None, who.subject, who.role, who.expires)
        parts = tokens.split_token(token) if token else None
        if parts is None:
            raise ApiError("unauthorized", "give an API token: Authorization: Bearer <token>")
        rows = await self._query(FIND_API_TOKEN, (parts[0],))
        if rows and not rows[0][2] and tokens.token_matches(token or "", bytes(rows[0][1])):
            return ApiToken(int(rows[0][3]), str(rows[0][4]), str(rows[0][0]))
        if not rows:
            devices = await self._query(FIND_DEVICE_TOKEN, (parts[0],))
            if devices and tokens.token_matches(token or "", bytes(devices[0][0])):
                raise ApiError("forbidden", "a device token cannot read; use an API token (gatewayctl token add)")
        raise ApiError("unauthorized", "unknown or revoked API token")

    async def session_of(self, credentials: Credentials, changes: bool) -> Session:
        """The dashboard session of a cookie; for a request that ``changes`` something, its CSRF token too."""
        session = await self.sessions.find(credentials.cookie) if self.sessions is not None else None
        if session is None:
            raise ApiError("unauthorized", "the session expired or was ended; sign in again")
        if changes and (not credentials.same_origin or not csrf_matches(session, credentials.csrf)):
            raise ApiError("forbidden", "this request needs the session's X-CSRF-Token, from the gateway's own page")
        return session

    async def _caller(self, credentials: Credentials, changes: bool) -> tuple[str, str]:
        """The role and name of who presents ``credentials``."""
        if credentials.token is None and credentials.cookie is not None:
            session = await self.session_of(credentials, changes)
            return session.role, session.subject
        token = await self.api_token(credentials.token)
        return token.role, token.name

    async def handle(
        self,
        method: str,
        path: str,
        args: dict[bytes, list[bytes]],
        credentials: Credentials,
        body: bytes = b"",
        source: Any = None,
    ) -> Any:
        matching = [r for r in ROUTES if r.pattern.match(path)]
        if not matching:
            raise ApiError("not_found", f"no such resource: {path}")
        route = next((r for r in matching if r.method == method), None)
        if route is None:
            raise ApiError("method_not_allowed", f"use {' or '.join(r.method for r in matching)}")
        match = route.pattern.match(path)
        assert match is not None
        unknown = sorted(k.decode("utf-8", "replace") for k in args if k.decode("latin-1") not in route.params)
        if unknown:
            allowed = ", ".join(route.params) or "none"
            raise ApiError("invalid_parameter", f"{unknown[0]}: unknown parameter (allowed: {allowed})")
        who = ""
        if route.role not in (None, "device"):
            role, who = await self._caller(credentials, changes=route.method != "GET")
            if ROLES[role] < ROLES[route.role]:
                raise ApiError("forbidden", f"this needs an API token with the {route.role} role")
        handler: Any = self
        for part in route.handler.split("."):
            handler = getattr(handler, part)
        if route.call:
            return await handler(Call(args, body, credentials, who, source), *match.groups())
        return await handler(args, *match.groups())

    @staticmethod
    def allowed(path: str) -> str | None:
        """The methods the routes at ``path`` take (for Allow), or None."""
        methods = [r.method for r in ROUTES if r.pattern.match(path)]
        return ", ".join(methods) or None

    # -- the routes --------------------------------------------------------

    async def openapi(self, args: Any) -> dict[str, Any]:
        return self.openapi_doc

    async def devices(self, args: Any) -> dict[str, Any]:
        now = self.clock.seconds()
        limit = _limit(args)
        after = decode_cursor(_one(args, "cursor"), is_name)
        match = _one(args, "match")
        if match is not None and len(match) > 64:
            raise ApiError("invalid_parameter", "match: at most 64 characters (device names are no longer)")
        rows = await self._query(*self.policy.query(now, after=after, limit=limit + 1, match=match or None))
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
        cold = await self._cold_page(params, limit + 1)
        if cold:
            # Both lists are in (time, metric) order: the page is the first of the two together.
            rows = heapq.nsmallest(limit + 1, [*rows, *cold], key=lambda r: (r[1], r[0]))
        page = rows[:limit]
        more = len(rows) > limit
        return {
            "device": name,
            "readings": [{"metric": m, "ts": format_ts(ts), "value": v} for m, ts, v in page],
            "next_cursor": encode_cursor([page[-1][1], page[-1][0]]) if more else None,
        }

    async def _cold_page(self, params: dict[str, Any], count: int) -> list[tuple]:
        """The first ``count`` readings of the cold tier for a readings page (none unless it reaches there)."""
        start = params["after_ts"] if params["after_ts"] is not None else params["since"]
        hours = await self._query(COLD_HOURS, {**params, "start": start, "hours": count + 1})
        chosen = hours_for_page([(int(h), int(n)) for h, n in hours], start, count)
        if not chosen:
            return []
        stamps = [format_ts(h) for h in chosen]
        return list(await self._query(COLD_READINGS, {**params, "hours": stamps, "limit": count}))

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

    async def series(self, args: Any, name: str) -> dict[str, Any]:
        metric = _name(args, "metric")
        if metric is None:
            raise ApiError("invalid_parameter", "metric: give the metric to draw")
        until = _time(args, "until")
        until = until if until is not None else int(self.clock.seconds() * 1e6)
        since = _time(args, "since")
        since = since if since is not None else until - DEFAULT_SPAN_US
        if since >= until:
            raise ApiError("invalid_parameter", "since: must be before until")
        text = _one(args, "points")
        if text is not None and (not text.isdigit() or not 1 <= int(text) <= MAX_POINTS):
            raise ApiError("invalid_parameter", f"points: {text!r} is not a whole number in 1..{MAX_POINTS}")
        points = int(text) if text is not None else DEFAULT_POINTS
        width = max(1, -(-(until - since) // points))
        params = {"since": since, "until": until, "width": width, "metric": metric}
        params["device"] = await self._device_id(name)
        rows = await self._query(SERIES, params)
        return {
            "device": name,
            "metric": metric,
            "since": format_ts(since),
            "until": format_ts(until),
            "bucket_seconds": width / 1e6,
            # Per bucket: the middle of its readings' times (epoch ms), min, max, mean, count.
            "t": [round((first + last) / 2000) for _, _, _, _, first, last in rows],
            "min": [row[0] for row in rows],
            "max": [row[1] for row in rows],
            "mean": [row[2] for row in rows],
            "count": [row[3] for row in rows],
        }

    async def rejected(self, args: Any, name: str) -> dict[str, Any]:
        limit = _limit(args)
        after = decode_cursor(_one(args, "cursor"), lambda v: type(v) is int and v > 0)
        rows = await self._query(
            REJECTED, {"device": name, "after": after, "limit": limit + 1, "sample": REJECTED_SAMPLE}
        )
        page = rows[:limit]
        return {
            "device": name,
            "rejected": [
                {
                    "id": id_,
                    "received_at": format_ts(at),
                    "source": source,
                    "reason": reason,
                    "bytes": size,
                    "sample": bytes(sample).decode("utf-8", "replace"),
                }
                for id_, at, source, reason, size, sample in page
            ],
            "next_cursor": encode_cursor(page[-1][0]) if len(rows) > limit else None,
        }

    async def release(self, args: Any, id_text: str) -> dict[str, Any]:
        if not id_text.isdigit() or len(id_text) > 18:
            raise ApiError("invalid_parameter", f"id: {id_text!r} is not a quarantined reading's id")
        chosen = {"ids": [int(id_text)], "device": None, "rule": None}
        await self.pool.run(lambda c: c.runOperation(RELEASE_METRICS, chosen))
        rows = await self._query(RELEASE, chosen)
        moved, stored = rows[0]
        if not moved:
            raise ApiError("not_found", f"no quarantined reading {id_text} (released already?)")
        return {"released": moved, "stored": stored}

    async def sinks(self, args: Any) -> dict[str, Any]:
        rows = await self._query(status_sql(SINK_COUNT_AT_MOST), ())
        docs = [sink_doc(dict(zip(STATUS_FIELDS, row))) for row in rows]
        return {"sinks": [{**doc, "lag_counted_up_to": SINK_COUNT_AT_MOST} for doc in docs]}

    async def retry_sink(self, args: Any, name: str) -> dict[str, Any]:
        if not await self._query(SINK_EXISTS, (name,)):
            raise ApiError("not_found", f"no sink {name!r}")
        rows = await self._query(RETRY_DEAD + " RETURNING 1", (name,))
        return {"sink": name, "retried_batches": len(rows)}
