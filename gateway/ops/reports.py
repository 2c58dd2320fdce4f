"""
Parts of a running gateway that the command line reports on (MQTT sources,
polled Modbus devices) write their state to a table every few seconds: one
row per gateway and part, replaced each time, read by ``gatewayctl``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from gateway.reactor import Clock

log = Logger()

INTERVAL = 5.0

# The tables and their key columns; nothing else is ever formatted into the statement.
TABLES = {"mqtt_sources": "source", "modbus_devices": "device", "amqp_sources": "source", "opcua_sources": "source"}


class StatusReport:
    """Every ``INTERVAL`` seconds, and once more on stop, ``statuses()`` go to ``table`` under ``owner``."""

    def __init__(
        self,
        table: str,
        owner: str,
        statuses: Callable[[], dict[str, dict[str, Any]]],
        run: Callable[..., Any],
        clock: Clock,
    ) -> None:
        key = TABLES[table]
        self.sql = f"""
            INSERT INTO {table} (gateway, {key}, status, updated_at)
            SELECT g, k, st::jsonb, now() FROM unnest(%s::text[], %s::text[], %s::text[]) AS u(g, k, st)
            ON CONFLICT (gateway, {key}) DO UPDATE SET status = EXCLUDED.status, updated_at = EXCLUDED.updated_at
        """
        self.what = table.replace("_", " ")
        self.owner = owner  # this gateway's id
        self.statuses = statuses
        self.run = run  # runs one statement on the read pool
        self._loop = LoopingCall(self.write)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(INTERVAL, now=True)

    def stop(self) -> Deferred:
        if self._loop.running:
            self._loop.stop()
        return self.write()

    def write(self) -> Deferred:
        """Write every status (never errbacks)."""
        statuses = self.statuses()
        params = ([self.owner] * len(statuses), list(statuses), [json.dumps(s) for s in statuses.values()])
        d: Deferred = self.run(lambda c: c.runOperation(self.sql, params))
        return d.addErrback(self._not_written)

    def _not_written(self, f: Any) -> None:
        log.debug("{what} not written: {error}", what=self.what, error=f.getErrorMessage())
