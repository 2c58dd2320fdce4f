"""
The OpenAPI 3 document of the HTTPS port, served at ``/v1/openapi.json``.
Its paths are the read API's ROUTES plus ingest and operations; a test
sends a request for each documented answer and checks the gateway gives it.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.commands.model import STATES

_TS = {"type": "string", "format": "date-time", "example": "2026-11-22T10:00:00.25Z"}
_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"}
_NULL_TS = {**_TS, "nullable": True}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
    },
    "Reading": {
        "type": "object",
        "required": ["metric", "ts", "value"],
        "properties": {
            "metric": _NAME,
            "ts": {"oneOf": [_TS, {"type": "integer", "description": "epoch milliseconds"}]},
            "value": {"type": "number"},
        },
    },
    "ReadingsBody": {
        "type": "object",
        "required": ["readings"],
        "properties": {"readings": {"type": "array", "items": {"$ref": "#/components/schemas/Reading"}}},
        "description": "A device with a type posts its vendor JSON instead (see [device_types.NAME]).",
    },
    "WriteResult": {
        "type": "object",
        "required": ["accepted", "duplicates"],
        "properties": {
            "accepted": {"type": "integer"},
            "duplicates": {"type": "integer"},
            "quarantined": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "metric": _NAME,
                        "ts": _TS,
                        "rule": {"type": "string"},
                    },
                },
            },
        },
    },
    "Device": {
        "type": "object",
        "properties": {
            "name": _NAME,
            "type": {**_NAME, "nullable": True},
            "status": {"type": "string", "enum": ["active", "revoked"]},
            "created": _TS,
            "last_seen": _NULL_TS,
            "transport": {"type": "string", "nullable": True},
            "address": {"type": "string", "nullable": True},
            "expected_interval": {"type": "number", "nullable": True, "description": "seconds"},
            "silent": {"type": "boolean"},
            "silent_for": {"type": "number", "nullable": True},
            "online": {"type": "boolean", "description": "heard from within the last minute"},
            "readings_today": {"type": "integer", "description": "readings stored since midnight UTC"},
            "quality": {
                "type": "object",
                "properties": {
                    "flagged": {"type": "boolean"},
                    "failures": {"type": "integer"},
                    "window": {"type": "number"},
                    "threshold": {"type": "integer"},
                },
            },
        },
    },
    "Latest": {
        "type": "object",
        "properties": {
            "device": _NAME,
            "metrics": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "properties": {"ts": _TS, "value": {"type": "number"}, "updated_at": _TS},
                },
            },
        },
    },
    "ReadingsPage": {
        "type": "object",
        "properties": {
            "device": _NAME,
            "readings": {"type": "array", "items": {"$ref": "#/components/schemas/Reading"}},
            "next_cursor": {"type": "string", "nullable": True},
        },
    },
    "Alert": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "rule": {"type": "string"},
            "device": _NAME,
            "metric": _NAME,
            "state": {"type": "string", "enum": ["open", "cleared"]},
            "message": {"type": "string"},
            "fired_at": _TS,
            "fired_reading": {"type": "object", "properties": {"ts": _TS, "value": {"type": "number"}}},
            "cleared_at": _NULL_TS,
            "cleared_reading": {"type": "object", "nullable": True},
        },
    },
    "Series": {
        "type": "object",
        "description": "Readings of one metric reduced to buckets; arrays of the same length, one entry a bucket.",
        "properties": {
            "device": _NAME,
            "metric": _NAME,
            "since": _TS,
            "until": _TS,
            "bucket_seconds": {"type": "number"},
            "t": {"type": "array", "items": {"type": "integer"}, "description": "middle of the bucket's readings, ms"},
            "min": {"type": "array", "items": {"type": "number"}},
            "max": {"type": "array", "items": {"type": "number"}},
            "mean": {"type": "array", "items": {"type": "number"}},
            "count": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "Rejected": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "received_at": _TS,
            "source": {"type": "string"},
            "reason": {"type": "string"},
            "bytes": {"type": "integer"},
            "sample": {"type": "string", "description": "the input's first 300 bytes"},
        },
    },
    "Sink": {
        "type": "object",
        "description": "A sink's cursor, lag and batches, as gatewayctl upload status --json shows them.",
        "properties": {
            "name": {"type": "string"},
            "url": {"type": "string"},
            "lag_readings": {"type": "integer"},
            "lag_seconds": {"type": "number", "nullable": True},
            "parked_batches": {"type": "integer"},
            "last_error": {"type": "string", "nullable": True},
        },
    },
    "Command": {
        "type": "object",
        "properties": {
            "id": _NAME,
            "device": _NAME,
            "name": {"type": "string"},
            "params": {"type": "object"},
            "sender": {"type": "string", "description": "the API token's name or the OIDC subject that sent it"},
            "state": {"type": "string", "enum": list(STATES)},
            "created": _TS,
            "expires": _TS,
            "attempts": {"type": "integer", "description": "times sent to the device"},
            "transport": {"type": "string", "nullable": True, "description": "over which it was sent last"},
            "result": {"nullable": True, "description": "the device's result, when it reported one"},
            "history": {
                "type": "array",
                "description": "every change of state (and every send), oldest first",
                "items": {
                    "type": "object",
                    "properties": {
                        "at": _TS,
                        "state": {"type": "string"},
                        "attempt": {"type": "integer"},
                        "gateway": {"type": "string"},
                        "transport": {"type": "string"},
                        "note": {"type": "string"},
                    },
                },
            },
        },
    },
    "Desired": {
        "type": "object",
        "properties": {
            "device": _NAME,
            "desired": {"type": "object", "description": "what people want the device's configuration to be"},
            "version": {"type": "integer", "description": "1 more each time desired is set; 0 never set"},
            "updated_by": {"type": "string", "nullable": True},
            "updated_at": _NULL_TS,
            "reported": {"type": "object", "description": "what the device last said it runs"},
            "reported_at": _NULL_TS,
            "delta": {"type": "object", "description": "the desired keys whose reported value differs"},
        },
    },
    "NewCommand": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_.:/-]{1,64}$"},
            "params": {"type": "object", "description": "at most 16 KiB as JSON"},
            "ttl": {"description": "seconds, or 90s, 10m, 12h, 30d (default 10m, at most 30d)"},
            "id": {**_NAME, "description": "an idempotency key: posting it again answers the same command"},
        },
    },
    "DeviceCommand": {
        "type": "object",
        "description": "a command as a device is given it; run it once per id",
        "properties": {"id": _NAME, "name": {"type": "string"}, "params": {"type": "object"}, "expires": _TS},
    },
    "Quarantined": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "device": _NAME,
            "metric": _NAME,
            "ts": _TS,
            "value": {"type": "number"},
            "rule": {"type": "string"},
            "source": {"type": "string"},
            "received_at": _TS,
        },
    },
}

_ERRORS = {
    400: "A parameter or the body is malformed; the message names it.",
    401: "No token, or an unknown or revoked one.",
    403: "A device token on the read API, or a reader token where admin is needed.",
    404: "No such device (or quarantined reading, sink, command).",
    405: "Another method is needed (see Allow).",
    409: "The command id names another command, or the command can no longer be canceled.",
    408: "The request did not arrive whole in time.",
    411: "No Content-Length and not chunked.",
    413: "The body is over --max-body.",
    415: "The body is not application/json.",
    422: "The body cannot be mapped (unmappable) or PostgreSQL refused a reading.",
    429: "The device sends faster than --device-rate; retry after Retry-After.",
    503: "The database is away or the gateway is overloaded; retry after Retry-After.",
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _op(
    summary: str,
    ok: dict[str, Any] | None,
    errors: tuple[int, ...],
    *,
    ok_status: tuple[int, ...] = (200,),
    **extra: Any,
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        str(status): {"description": "OK", "content": {"application/json": {"schema": ok}}}
        if ok is not None
        else {"description": "OK"}
        for status in ok_status
    }
    for status in (*errors, 405):
        responses[str(status)] = {
            "description": _ERRORS[status],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    return {"summary": summary, "responses": responses, **extra}


def _page(key: str, item: str) -> dict[str, Any]:
    """A page of ``item``s under ``key``, with the cursor of the next page."""
    return {
        "type": "object",
        "properties": {
            key: {"type": "array", "items": _ref(item)},
            "next_cursor": {"type": "string", "nullable": True},
        },
    }


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


_DEVICE = {"name": "name", "in": "path", "required": True, "schema": _NAME}
_LIMIT = _query("limit", "at most this many (1..1000, default 100)", {"type": "integer", "minimum": 1, "maximum": 1000})
_READ: dict[str, Any] = {"security": [{"apiToken": []}]}


_DEVICE_TOKEN: dict[str, Any] = {"security": [{"deviceToken": []}]}
_COMMAND = {"name": "id", "in": "path", "required": True, "schema": _NAME}
_WAIT = _query("wait", "wait up to this many seconds (at most 60)", {"type": "number", "minimum": 0, "maximum": 60})


def _command_paths(read_errors: tuple[int, ...]) -> dict[str, Any]:
    body = {"required": True, "content": {"application/json": {"schema": _ref("NewCommand")}}}
    result = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"type": "string", "enum": ["succeeded", "failed"]}, "result": {}},
                }
            }
        },
    }
    return {
        "/v1/devices/{name}/commands": {
            "post": _op(
                "Send a command (operator role): 202 when queued, 200 when the id was given before",
                _ref("Command"),
                (400, *read_errors, 404, 409),
                ok_status=(200, 202),
                requestBody=body,
                **_READ,
            ),
            "get": _op(
                "The device's commands, newest first",
                _page("commands", "Command"),
                (400, *read_errors, 404),
                parameters=[
                    _query("state", "only commands in this state", {"type": "string", "enum": list(STATES)}),
                    _LIMIT,
                    _query("cursor", "next_cursor"),
                ],
                **_READ,
            ),
            "parameters": [_DEVICE],
        },
        "/v1/devices/{name}/desired": {
            "get": _op(
                "The device's desired and reported configuration, and the delta",
                _ref("Desired"),
                (*read_errors, 404),
                **_READ,
            ),
            "put": _op(
                "Set the desired configuration (operator role): a new version; the delta goes to the device",
                _ref("Desired"),
                (400, *read_errors, 404),
                requestBody={"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                **_READ,
            ),
            "parameters": [_DEVICE],
        },
        "/v1/commands/{id}": {
            "get": _op(
                "A command, its result and history",
                _ref("Command"),
                (400, *read_errors, 404),
                parameters=[_WAIT],
                **_READ,
            ),
            "parameters": [_COMMAND],
        },
        "/v1/commands/{id}/cancel": {
            "post": _op(
                "Cancel a command not yet delivered (operator role)", _ref("Command"), (*read_errors, 404, 409), **_READ
            ),
            "parameters": [_COMMAND],
        },
        "/v1/commands": {
            "get": _op(
                "A device's commands to run (device token); with wait, answered when one comes",
                {"type": "object", "properties": {"commands": {"type": "array", "items": _ref("DeviceCommand")}}},
                (400, 401, 503),
                parameters=[_WAIT],
                **_DEVICE_TOKEN,
            )
        },
        "/v1/commands/{id}/result": {
            "post": _op(
                "A device reports a command's result (device token); recorded once",
                {
                    "type": "object",
                    "properties": {"id": _NAME, "state": {"type": "string"}, "recorded": {"type": "boolean"}},
                },
                (400, 401, 404, 503),
                requestBody=result,
                **_DEVICE_TOKEN,
            ),
            "parameters": [_COMMAND],
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI 3.0 document of the HTTPS port."""
    read_errors = (401, 403, 503)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "txgateway",
            "version": __version__,
            "description": "Device readings in (POST /v1/readings, device tokens); the fleet's state out "
            "(GET /v1/..., API tokens made with gatewayctl token add).",
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "deviceToken": {"type": "http", "scheme": "bearer", "description": "gatewayctl device add"},
                "apiToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "gatewayctl token add; the dashboard's session cookie stands for it, and then a "
                    "POST also needs the session's X-CSRF-Token",
                },
            },
        },
        "paths": {
            "/v1/readings": {
                "post": _op(
                    "Store a device's readings; answered after COMMIT",
                    _ref("WriteResult"),
                    (400, 401, 408, 411, 413, 415, 422, 429, 503),
                    security=[{"deviceToken": []}],
                    requestBody={"required": True, "content": {"application/json": {"schema": _ref("ReadingsBody")}}},
                )
            },
            "/v1/openapi.json": {"get": _op("This document", {"type": "object"}, ())},
            "/v1/devices": {
                "get": _op(
                    "Devices with their status, by name, a page at a time",
                    _page("devices", "Device"),
                    (400, *read_errors),
                    parameters=[
                        _LIMIT,
                        _query("cursor", "next_cursor of the previous page"),
                        _query("match", "only devices whose name contains this (any case)"),
                    ],
                    **_READ,
                )
            },
            "/v1/devices/{name}": {
                "get": _op(
                    "One device: status, last seen, quality flags", _ref("Device"), (*read_errors, 404), **_READ
                ),
                "parameters": [_DEVICE],
            },
            "/v1/devices/{name}/latest": {
                "get": _op(
                    "The digital twin: the latest value of each metric", _ref("Latest"), (*read_errors, 404), **_READ
                ),
                "parameters": [_DEVICE],
            },
            "/v1/devices/{name}/readings": {
                "get": _op(
                    "Stored readings in (time, metric) order, a page at a time",
                    _ref("ReadingsPage"),
                    (400, *read_errors, 404),
                    parameters=[
                        _query("metric", "only this metric", _NAME),
                        _query("since", "at or after this time (RFC 3339 or epoch ms)"),
                        _query("until", "before this time (RFC 3339 or epoch ms)"),
                        _LIMIT,
                        _query("cursor", "next_cursor of the previous page"),
                    ],
                    **_READ,
                ),
                "parameters": [_DEVICE],
            },
            "/v1/devices/{name}/series": {
                "get": _op(
                    "One metric over a time range, reduced in PostgreSQL to at most `points` buckets (min, max, mean)",
                    _ref("Series"),
                    (400, *read_errors, 404),
                    parameters=[
                        _query("metric", "the metric (required)", _NAME),
                        _query("since", "from this time (RFC 3339 or epoch ms; default: a day before until)"),
                        _query("until", "before this time (default: now)"),
                        _query("points", "at most this many buckets (1..4000, default 600)", {"type": "integer"}),
                    ],
                    **_READ,
                ),
                "parameters": [_DEVICE],
            },
            "/v1/devices/{name}/rejected": {
                "get": _op(
                    "The device's input the gateway refused, newest first, with the reasons",
                    _page("rejected", "Rejected"),
                    (400, *read_errors),
                    parameters=[_LIMIT, _query("cursor", "next_cursor of the previous page")],
                    **_READ,
                ),
                "parameters": [_DEVICE],
            },
            "/v1/alerts": {
                "get": _op(
                    "Alerts, newest first: open and recently cleared",
                    {"type": "object", "properties": {"alerts": {"type": "array", "items": _ref("Alert")}}},
                    (400, *read_errors),
                    parameters=[
                        _query(
                            "state",
                            "open, cleared or all (default)",
                            {"type": "string", "enum": ["open", "cleared", "all"]},
                        ),
                        _query("device", "only this device", _NAME),
                        _LIMIT,
                    ],
                    **_READ,
                )
            },
            "/v1/quarantine": {
                "get": _op(
                    "Readings held in quarantine (admin role)",
                    _page("quarantine", "Quarantined"),
                    (400, *read_errors),
                    parameters=[_query("device", "only this device", _NAME), _LIMIT, _query("cursor", "next_cursor")],
                    **_READ,
                )
            },
            "/v1/quarantine/{id}/release": {
                "post": _op(
                    "Store a quarantined reading as a reading (admin role): readings, twin, uploads",
                    {
                        "type": "object",
                        "properties": {"released": {"type": "integer"}, "stored": {"type": "integer"}},
                    },
                    (400, *read_errors, 404),
                    **_READ,
                ),
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
            },
            "/v1/sinks": {
                "get": _op(
                    "The upload sinks: lag, last error, parked batches",
                    {"type": "object", "properties": {"sinks": {"type": "array", "items": _ref("Sink")}}},
                    read_errors,
                    **_READ,
                )
            },
            "/v1/sinks/{name}/retry": {
                "post": _op(
                    "Send a sink's parked batches again (admin role)",
                    {
                        "type": "object",
                        "properties": {"sink": {"type": "string"}, "retried_batches": {"type": "integer"}},
                    },
                    (*read_errors, 404),
                    **_READ,
                ),
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            },
            **_command_paths(read_errors),
            "/healthz": {
                "get": _op("Health of the database, the queue, the journal and the sinks", {"type": "object"}, (503,))
            },
            "/metrics": {"get": {"summary": "Prometheus text format", "responses": {"200": {"description": "OK"}}}},
        },
    }
