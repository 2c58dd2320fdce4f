"""
The command ledger's statements. Each is one statement (so one transaction:
the connections run in autocommit) and returns the rows it changed; the
table's trigger records the change and tells every gateway (NOTIFY).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from gateway.commands.model import FINAL, Command, CommandError, Request
from gateway.readings import format_ts

Run = Callable[[Callable[[Any], Deferred]], Deferred]  # a pool's run: run(lambda c: c.runQuery(sql, params))

_EPOCH = "extract(epoch FROM {})::double precision"
COLUMNS = ", ".join(
    [
        "c.id",
        "d.name",
        "c.name",
        "c.params::text",
        "c.sender",
        _EPOCH.format("c.created_at"),
        _EPOCH.format("c.expires_at"),
        "c.state",
        "c.attempts",
        "c.result::text",
        "c.transport",
    ]
)

ACCEPT = f"""
WITH new AS (
    INSERT INTO commands AS c (id, device_id, name, params, sender, expires_at)
    SELECT %(id)s, d.id, %(name)s, %(params)s::jsonb, %(sender)s, now() + %(ttl)s * interval '1 second'
    FROM devices d WHERE d.name = %(device)s AND d.revoked_at IS NULL
    ON CONFLICT (id) DO NOTHING
    RETURNING c.*
)
SELECT {COLUMNS} FROM new c JOIN devices d ON d.id = c.device_id
"""
FIND = f"SELECT {COLUMNS} FROM commands c JOIN devices d ON d.id = c.device_id WHERE c.id = %s"
EVENTS = """
SELECT extract(epoch FROM at)::double precision, state, attempt, gateway, transport, note
FROM command_events WHERE command_id = %s ORDER BY at, attempt
"""
OF_DEVICE = f"""
SELECT {COLUMNS} FROM commands c JOIN devices d ON d.id = c.device_id
WHERE d.name = %(device)s AND (%(state)s::text IS NULL OR c.state = %(state)s)
  AND (%(before)s::text IS NULL OR (c.created_at, c.id) < (
       SELECT b.created_at, b.id FROM commands b WHERE b.id = %(before)s))
ORDER BY c.created_at DESC, c.id DESC
LIMIT %(limit)s
"""
LIST = f"""
SELECT {COLUMNS} FROM commands c JOIN devices d ON d.id = c.device_id
WHERE (%(state)s::text IS NULL OR c.state = %(state)s)
ORDER BY c.created_at DESC, c.id DESC
LIMIT %(limit)s
"""
# Commands of a device to send now: never sent, or sent and not acknowledged ``resend`` seconds ago (any
# gateway: a send younger than that is another gateway's, or ours in flight). Oldest first.
CLAIM = f"""
WITH due AS (
    SELECT c.id FROM commands c
    WHERE c.device_id = (SELECT id FROM devices WHERE name = %(device)s)
      AND c.state IN ('queued', 'sent') AND c.expires_at > now()
      AND (c.state = 'queued' OR c.sent_at <= now() - %(resend)s * interval '1 second')
      AND (%(only)s::text IS NULL OR c.id = %(only)s)
    ORDER BY c.created_at, c.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), sent AS (
    UPDATE commands c SET state = 'sent', sent_at = now(), changed_at = now(), attempts = c.attempts + 1,
        gateway = %(gateway)s, transport = %(transport)s, note = NULL
    FROM due WHERE c.id = due.id
    RETURNING c.*
)
SELECT {COLUMNS} FROM sent c JOIN devices d ON d.id = c.device_id ORDER BY c.created_at, c.id
"""
DELIVERED = """
UPDATE commands c SET state = 'delivered', changed_at = now(), note = NULL
FROM devices d
WHERE c.id = %(id)s AND d.id = c.device_id AND d.name = %(device)s AND c.state IN ('queued', 'sent')
RETURNING c.id
"""
# A device's result: recorded once. A second report of a finished command changes nothing.
FINISH = """
UPDATE commands c SET state = %(state)s, result = %(result)s::jsonb, changed_at = now(), note = NULL
FROM devices d
WHERE c.id = %(id)s AND d.id = c.device_id AND d.name = %(device)s AND c.state IN ('queued', 'sent', 'delivered')
RETURNING c.device_id, c.name, (extract(epoch FROM c.changed_at) * 1000000)::bigint
"""
CANCEL = f"""
WITH done AS (
    UPDATE commands c SET state = 'canceled', changed_at = now(), note = %(note)s
    WHERE c.id = %(id)s AND c.state IN ('queued', 'sent')
    RETURNING c.*
)
SELECT {COLUMNS} FROM done c JOIN devices d ON d.id = c.device_id
"""
EXPIRE = """
UPDATE commands c SET state = 'expired', changed_at = now(), note = 'not finished within its ttl'
WHERE c.state IN ('queued', 'sent', 'delivered') AND c.expires_at <= now()
RETURNING c.id, (SELECT name FROM devices WHERE id = c.device_id), c.name, c.device_id,
    (extract(epoch FROM c.changed_at) * 1000000)::bigint, coalesce(c.transport, '')
"""
# Devices with commands to send, for a gateway that starts (or missed notices while its LISTEN was down).
WAITING_DEVICES = """
SELECT DISTINCT d.name FROM commands c JOIN devices d ON d.id = c.device_id
WHERE c.state IN ('queued', 'sent') AND c.expires_at > now()
"""
PURGE = """
DELETE FROM commands WHERE id IN (
    SELECT id FROM commands
    WHERE state IN ('succeeded', 'failed', 'expired', 'canceled') AND changed_at < now() - %s * interval '1 second'
    LIMIT 10000)
RETURNING 1
"""
WAITING = f"""
SELECT {COLUMNS} FROM commands c JOIN devices d ON d.id = c.device_id
WHERE c.state IN ('queued', 'sent', 'delivered')
ORDER BY c.created_at, c.id
LIMIT %s
"""
# Commands not finished, from the partial index (finished ones are counted as they finish, by each gateway).
COUNTS = """
SELECT state, coalesce(transport, ''), count(*),
       count(*) FILTER (WHERE now() > created_at + (expires_at - created_at) / 2)
FROM commands WHERE state IN ('queued', 'sent', 'delivered') GROUP BY 1, 2
"""


KEPT_SUBSCRIPTION = """
SELECT s.commands FROM mqtt_sessions s JOIN devices d ON d.id = s.device_id WHERE d.name = %s AND s.client_id = %s
"""
KEEP_SUBSCRIPTION = """
UPDATE mqtt_sessions s SET commands = %s FROM devices d WHERE d.id = s.device_id AND d.name = %s AND s.client_id = %s
"""


def command_of(row: Any, events: Any = ()) -> Command:
    id_, device, name, params, sender, created, expires, state, attempts, result, transport = row
    return Command(
        id=id_,
        device=device,
        name=name,
        params=json.loads(params),
        sender=sender,
        created=float(created),
        expires=float(expires),
        state=state,
        attempts=int(attempts),
        result=json.loads(result) if result is not None else None,
        transport=transport,
        events=tuple(_event(e) for e in events),
    )


def _event(row: Any) -> dict[str, Any]:
    at, state, attempt, gateway, transport, note = row
    out: dict[str, Any] = {"at": format_ts(round(float(at) * 1e6)), "state": state, "attempt": attempt}
    for key, value in (("gateway", gateway), ("transport", transport), ("note", note)):
        if value is not None:
            out[key] = value
    return out


class Ledger:
    """The ledger's operations, on a pool's ``run``."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def _query(self, sql: str, params: Any) -> Deferred:
        return self.run(lambda c: c.runQuery(sql, params))

    async def accept(self, device: str, request: Request, sender: str) -> tuple[Command, bool]:
        """The command committed (and whether it is new: an id given again answers the command it named)."""
        params = {
            "id": request.id,
            "device": device,
            "name": request.name,
            "params": json.dumps(request.params, separators=(",", ":")),
            "sender": sender,
            "ttl": request.ttl,
        }
        rows = await self._query(ACCEPT, params)
        if rows:
            return command_of(rows[0]), True
        existing = await self.find(request.id)
        if existing is None:
            raise CommandError("no_such_device", f"no device {device!r} (or it is revoked)")
        if existing.device != device or existing.name != request.name:
            raise CommandError(
                "id_in_use", f"id {request.id!r} names another command ({existing.name} to {existing.device})"
            )
        return existing, False

    def kept_subscription(self, device: str, client_id: str) -> Deferred:
        """Whether the MQTT session a device kept under ``client_id`` is subscribed to its command topic."""
        d = self._query(KEPT_SUBSCRIPTION, (device, client_id))
        return d.addCallback(lambda rows: bool(rows and rows[0][0]))

    def keep_subscription(self, device: str, client_id: str, on: bool) -> Deferred:
        return self._query(KEEP_SUBSCRIPTION + " RETURNING 1", (on, device, client_id))

    async def device_exists(self, name: str) -> bool:
        return bool(await self._query("SELECT 1 FROM devices WHERE name = %s", (name,)))

    async def find(self, id_: str, history: bool = False) -> Command | None:
        rows = await self._query(FIND, (id_,))
        if not rows:
            return None
        events = await self._query(EVENTS, (id_,)) if history else ()
        return command_of(rows[0], events)

    async def of_device(
        self, device: str, state: str | None = None, limit: int = 100, before: str | None = None
    ) -> list[Command]:
        rows = await self._query(OF_DEVICE, {"device": device, "state": state, "limit": limit, "before": before})
        return [command_of(row) for row in rows]

    async def recent(self, state: str | None = None, limit: int = 100) -> list[Command]:
        return [command_of(row) for row in await self._query(LIST, {"state": state, "limit": limit})]

    async def claim(
        self, device: str, gateway: str, transport: str, resend: float, limit: int, only: str | None = None
    ) -> list[Command]:
        params = {
            "device": device,
            "gateway": gateway,
            "transport": transport,
            "resend": resend,
            "limit": limit,
            "only": only,
        }
        return [command_of(row) for row in await self._query(CLAIM, params)]

    async def delivered(self, device: str, id_: str) -> bool:
        return bool(await self._query(DELIVERED, {"device": device, "id": id_}))

    async def finish(self, device: str, id_: str, status: str, result: Any) -> tuple[int, str, int] | None:
        """Record a device's result: (device id, command name, µs); None when the command is not this device's
        or was finished already."""
        params = {"device": device, "id": id_, "state": status, "result": json.dumps(result)}
        rows = await self._query(FINISH, params)
        return (int(rows[0][0]), str(rows[0][1]), int(rows[0][2])) if rows else None

    async def cancel(self, id_: str, who: str) -> Command:
        rows = await self._query(CANCEL, {"id": id_, "note": f"canceled by {who}"})
        if rows:
            return command_of(rows[0])
        existing = await self.find(id_)
        if existing is None:
            raise CommandError("not_found", f"no command {id_!r}")
        if existing.state in FINAL:
            raise CommandError("not_cancelable", f"command {id_} is {existing.state} already")
        raise CommandError("not_cancelable", f"command {id_} is delivered: the device has it")

    async def expire(self) -> list[tuple[str, str, str, int, int, str]]:
        """Commands past their expiry, now expired: (id, device, name, device id, when in µs, transport)."""
        return [(r[0], r[1], r[2], int(r[3]), int(r[4]), r[5]) for r in await self._query(EXPIRE, ())]

    async def waiting(self, limit: int) -> list[Command]:
        """Commands not finished, oldest first."""
        return [command_of(row) for row in await self._query(WAITING, (limit,))]

    async def waiting_devices(self) -> set[str]:
        return {r[0] for r in await self._query(WAITING_DEVICES, ())}

    async def purge(self, retention: float) -> int:
        return len(await self._query(PURGE, (retention,)))

    async def counts(self) -> list[tuple[str, str, int, int]]:
        return [(r[0], r[1], int(r[2]), int(r[3])) for r in await self._query(COUNTS, ())]
