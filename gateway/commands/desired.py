"""
Desired configuration: the twin's other half. People set a device's
``desired`` document (each change a new version); the device reports what it
runs (``reported``). The delta (desired keys whose reported value differs or
is missing) travels as a command named ``desired`` with ``{"version": N,
"delta": {...}}``, over whatever transport reaches the device, like any
command: a new version cancels the delta of the one before; a device coming
back while its reported values still differ gets the delta again; a report
that matches (the command's result, or an MQTT device's publish to
``devices/<device>/reported``) finishes it.

A ``desired`` command that succeeds reports its result as the device's values
(an object of the keys it applied), or, with no object, the delta it was sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from gateway.commands.model import MAX_PARAMS, CommandError, new_id
from gateway.readings import format_ts

NAME = "desired"  # the command that carries a delta
TTL = 30 * 86400.0  # a delta waits for its device this long (the longest a command may)

Run = Callable[[Callable[[Any], Deferred]], Deferred]

DEVICE = "SELECT id FROM devices WHERE name = %s AND revoked_at IS NULL FOR SHARE"
SET = """
INSERT INTO twin_desired AS t (device_id, doc, version, updated_by) VALUES (%(device)s, %(doc)s::jsonb, 1, %(who)s)
ON CONFLICT (device_id) DO UPDATE SET doc = EXCLUDED.doc, version = t.version + 1, updated_at = now(),
    updated_by = EXCLUDED.updated_by
RETURNING version
"""
REPORT = """
INSERT INTO twin_reported AS t (device_id, doc) VALUES (%(device)s, %(doc)s::jsonb)
ON CONFLICT (device_id) DO UPDATE SET doc = t.doc || EXCLUDED.doc, updated_at = now()
RETURNING doc::text
"""
STATE = """
SELECT d.doc::text, d.version, d.updated_by, extract(epoch FROM d.updated_at)::double precision,
       r.doc::text, extract(epoch FROM r.updated_at)::double precision
FROM devices v LEFT JOIN twin_desired d ON d.device_id = v.id LEFT JOIN twin_reported r ON r.device_id = v.id
WHERE v.id = %s
"""
SUPERSEDE = """
UPDATE commands SET state = 'canceled', changed_at = now(), note = %(note)s
WHERE device_id = %(device)s AND name = 'desired' AND state IN ('queued', 'sent', 'delivered')
"""
QUEUE = """
INSERT INTO commands (id, device_id, name, params, sender, expires_at)
VALUES (%(id)s, %(device)s, 'desired', %(params)s::jsonb, %(who)s, now() + %(ttl)s * interval '1 second')
"""
MATCHED = """
UPDATE commands SET state = 'succeeded', changed_at = now(), result = %(result)s::jsonb,
    note = 'the reported configuration matches'
WHERE device_id = %(device)s AND name = 'desired' AND state IN ('queued', 'sent', 'delivered')
"""
# A device back on line whose reported values still differ: the delta it acknowledged is sent again.
AGAIN = """
UPDATE commands c SET state = 'queued', changed_at = now(),
    note = 'sent again: the device came back and its reported configuration still differs'
FROM devices d
WHERE d.id = c.device_id AND d.name = %s AND c.name = 'desired' AND c.state = 'delivered' AND c.expires_at > now()
"""


def delta(desired: dict[str, Any], reported: dict[str, Any]) -> dict[str, Any]:
    """The desired keys whose reported value differs (or is missing)."""
    missing = object()
    return {k: v for k, v in desired.items() if reported.get(k, missing) != v}


def check_document(doc: Any, what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise CommandError("invalid_command", f"{what}: give a JSON object")
    size = len(json.dumps(doc, separators=(",", ":")))
    if size > MAX_PARAMS:
        raise CommandError("invalid_command", f"{what}: {size} bytes as JSON; the limit is {MAX_PARAMS}")
    return doc


def state_of(name: str, row: Any) -> dict[str, Any]:
    """The document the API and gatewayctl show, from a row of STATE."""
    desired, version, by, at, reported, reported_at = row
    desired_doc = json.loads(desired) if desired is not None else {}
    reported_doc = json.loads(reported) if reported is not None else {}
    return {
        "device": name,
        "desired": desired_doc,
        "version": version or 0,
        "updated_by": by,
        "updated_at": format_ts(round(at * 1e6)) if at is not None else None,
        "reported": reported_doc,
        "reported_at": format_ts(round(reported_at * 1e6)) if reported_at is not None else None,
        "delta": delta(desired_doc, reported_doc),
    }


def queued_delta(name: str, version: int, state: dict[str, Any], who: str) -> dict[str, Any] | None:
    """QUEUE's parameters for the delta of a new version, or None when there is none."""
    if not state["delta"]:
        return None
    params = json.dumps({"version": version, "delta": state["delta"]})
    return {"id": new_id(), "params": params, "who": who, "ttl": TTL}


class Twin:
    """Desired and reported documents, on a pool's ``run``."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def _interaction(self, work: Callable[[Any], Any]) -> Deferred:
        return self.run(lambda conn: conn.runInteraction(lambda cur: Deferred.fromCoroutine(work(cur))))

    @staticmethod
    async def _device(cur: Any, name: str) -> int:
        await cur.execute(DEVICE, (name,))
        row = cur.fetchone()
        if row is None:
            raise CommandError("no_such_device", f"no device {name!r} (or it is revoked)")
        return int(row[0])

    @staticmethod
    async def _state(cur: Any, name: str, device: int) -> dict[str, Any]:
        await cur.execute(STATE, (device,))
        return state_of(name, cur.fetchone())

    def get(self, name: str) -> Deferred:
        async def work(cur: Any) -> dict[str, Any]:
            return await self._state(cur, name, await self._device(cur, name))

        return self._interaction(work)

    def desire(self, name: str, doc: dict[str, Any], who: str) -> Deferred:
        """Set the desired document (a new version); the delta, if any, is queued to the device."""
        check_document(doc, "desired")

        async def work(cur: Any) -> dict[str, Any]:
            device = await self._device(cur, name)
            await cur.execute(SET, {"device": device, "doc": json.dumps(doc), "who": who})
            (version,) = cur.fetchone()
            await cur.execute(SUPERSEDE, {"device": device, "note": f"superseded by desired version {version}"})
            state = await self._state(cur, name, device)
            queued = queued_delta(name, version, state, who)
            if queued is not None:
                await cur.execute(QUEUE, {**queued, "device": device})
            return state

        return self._interaction(work)

    def report(self, name: str, doc: dict[str, Any]) -> Deferred:
        """Merge what the device says it runs; when it matches the desired document, the delta is done."""
        check_document(doc, "reported")

        async def work(cur: Any) -> dict[str, Any]:
            device = await self._device(cur, name)
            await cur.execute(REPORT, {"device": device, "doc": json.dumps(doc)})
            state = await self._state(cur, name, device)
            if not state["delta"]:
                result = json.dumps({"reported": state["reported"]})
                await cur.execute(MATCHED, {"device": device, "result": result})
            return state

        return self._interaction(work)

    def again(self, name: str) -> Deferred:
        """The device is back: a delta it acknowledged without reporting a match goes again."""
        return self.run(lambda c: c.runOperation(AGAIN, (name,)))
