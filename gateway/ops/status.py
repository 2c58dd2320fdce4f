"""
Device status: silent (nothing heard for longer than the device's expected
interval) and flagged (too many quality failures within a window).

Both are worked out from the database (``devices.last_seen``, the
quarantine and rejected-input tables), never from one gateway's memory, so
every gateway sharing the database gives the same answer and the API can
answer for any device. ``StatusWatch`` runs the same query on a timer with
an injected clock: it keeps the sets of silent and flagged devices for
/metrics and the console, and logs each device that goes silent, is heard
again, is flagged, or behaves again.

A device's expected interval is its own (``gatewayctl device set NAME
--interval 10m``) or its type's (``expected_interval`` of
``[device_types.NAME]``); a device with neither is never silent. A device
never heard from counts from when it was added. ``last_seen`` is written a
few seconds late (``LAST_SEEN_INTERVAL``), so a device is called silent at
most that much late.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Iterator, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.ingest.quality import QualityRules
from gateway.families import gauge
from gateway.readings import Source, format_ts
from gateway.storage.pool import first_line
from gateway.ingest.vendor import DeviceType

log = Logger()

# Heard within this many seconds: "online" on the fleet page (last_seen is written up to 5 s late).
ONLINE_WITHIN = 60.0

_US = "(extract(epoch FROM {0}) * 1000000)::bigint"

DEVICE_ROWS = f"""
WITH failures AS (
    SELECT device_id AS id, count(*) AS n FROM quarantine
    WHERE received_at > to_timestamp(%(since)s) GROUP BY device_id
    UNION ALL
    SELECT d.id, count(*) FROM rejected_input j JOIN devices d ON d.name = j.device
    WHERE j.received_at > to_timestamp(%(since)s) GROUP BY d.id
)
SELECT d.name, d.device_type, d.expected_interval, {_US.format("d.created_at")}, {_US.format("d.last_seen")},
       d.last_source, d.revoked_at IS NOT NULL,
       coalesce((SELECT sum(n) FROM failures f WHERE f.id = d.id), 0)::bigint,
       CASE WHEN d.readings_day = (now() AT TIME ZONE 'UTC')::date THEN d.readings_today ELSE 0 END
FROM devices d
WHERE (%(name)s::text IS NULL OR d.name = %(name)s)
  AND (%(after)s::text IS NULL OR (d.natural_name, d.name) > (natural_sort_key(%(after)s), %(after)s))
  AND (%(match)s::text IS NULL OR strpos(lower(d.name), lower(%(match)s)) > 0)
ORDER BY d.natural_name, d.name
LIMIT %(limit)s
"""


@dataclass
class StatusPolicy:
    """How rows of DEVICE_ROWS become statuses: the config's quality flags and device types."""

    quality: QualityRules = field(default_factory=QualityRules)
    device_types: dict[str, DeviceType] = field(default_factory=dict)

    def reconfigure(self, quality: QualityRules, device_types: Sequence[DeviceType]) -> None:
        """Settings a SIGHUP changes: the flag threshold and window, and the types' expected intervals."""
        self.quality = quality
        self.device_types = {t.name: t for t in device_types}

    def query(
        self,
        now: float,
        name: str | None = None,
        after: str | None = None,
        limit: int | None = None,
        match: str | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """
        DEVICE_ROWS and its parameters: one device, or a page after a name (of those whose name contains
        ``match``), or (limit None) all.
        """
        params = {"since": now - self.quality.flag_window, "name": name, "after": after, "limit": limit}
        return DEVICE_ROWS, {**params, "match": match}

    def interval(self, device_type: str | None, own: float | None) -> float | None:
        if own is not None:
            return own
        kind = self.device_types.get(device_type) if device_type else None
        return kind.expected_interval if kind is not None else None

    def describe(self, row: tuple, now: float) -> dict[str, Any]:
        name, device_type, own, created_us, seen_us, source, revoked, failures, today = row
        interval = self.interval(device_type, own)
        heard = (seen_us if seen_us is not None else created_us) / 1e6
        silent = bool(interval is not None and not revoked and now - heard > interval)
        last = Source.parse(source)
        rules = self.quality
        return {
            "name": name,
            "type": device_type,
            "status": "revoked" if revoked else "active",
            "created": format_ts(created_us),
            "last_seen": format_ts(seen_us) if seen_us is not None else None,
            "online": bool(seen_us is not None and not revoked and now - seen_us / 1e6 <= ONLINE_WITHIN),
            "readings_today": today,
            "transport": last.transport if last else None,
            "address": last.address if last else None,
            "expected_interval": interval,
            "silent": silent,
            "silent_for": round(now - heard, 1) if silent else None,
            "quality": {
                "flagged": failures >= rules.flag_failures,
                "failures": failures,
                "window": rules.flag_window,
                "threshold": rules.flag_failures,
            },
        }


class StatusWatch(Service):
    """Checks every device on a timer; keeps who is silent and flagged, and logs the changes."""

    def __init__(
        self,
        run: Callable[[str, dict[str, Any]], Deferred],
        policy: StatusPolicy,
        clock: IReactorTime,
        interval: float,
    ) -> None:
        self.run = run  # (sql, params) → Deferred of rows
        self.policy = policy
        self.clock = clock
        self.interval = interval
        self.silent: dict[str, dict[str, Any]] = {}
        self.flagged: dict[str, dict[str, Any]] = {}
        self.checked_at: float | None = None
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=True).addErrback(lambda f: log.failure("device status check stopped", f))

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def set_interval(self, seconds: float) -> None:
        if seconds == self.interval:
            return
        self.interval = seconds
        if self._loop.running:
            self._loop.stop()
            self._loop.start(seconds, now=False)

    def live_metrics(self) -> Iterator[Any]:
        """Who was silent or flagged at the last check, for /metrics."""
        yield gauge(
            "gateway_devices_silent",
            "Devices heard from longer ago than their expected interval (at the last status check).",
            len(self.silent),
        )
        yield gauge(
            "gateway_devices_flagged",
            "Devices over the quality failure threshold within the window (at the last status check).",
            len(self.flagged),
        )
        attention = gauge(
            "gateway_device_attention",
            "1 for each device that is silent or flagged, by device and reason.",
            labels=["device", "reason"],
        )
        for name in sorted(self.silent):
            attention.add_metric([name, "silent"], 1)
        for name in sorted(self.flagged):
            attention.add_metric([name, "flagged"], 1)
        yield attention

    def check(self) -> Deferred:
        """One pass over every device; never errbacks (a database away is logged and tried next time)."""
        now = self.clock.seconds()
        sql, params = self.policy.query(now)
        d = self.run(sql, params)
        d.addCallback(self._update, now)

        def failed(f: Failure) -> None:
            log.warn("device status not checked: {error}", error=first_line(f.value))

        return d.addErrback(failed)

    def _update(self, rows: list[tuple], now: float) -> None:
        silent, flagged = {}, {}
        for row in rows:
            doc = self.policy.describe(row, now)
            if doc["silent"]:
                silent[doc["name"]] = doc
            if doc["quality"]["flagged"] and doc["status"] == "active":
                flagged[doc["name"]] = doc
        for name in silent.keys() - self.silent.keys():
            doc = silent[name]
            log.warn(
                "device {device} is silent: nothing heard for {seconds:.0f}s (expected every {interval:g}s)",
                device=name,
                seconds=doc["silent_for"],
                interval=doc["expected_interval"],
            )
        for name in self.silent.keys() - silent.keys():
            log.info("device {device} is heard again (or no longer expected)", device=name)
        for name in flagged.keys() - self.flagged.keys():
            q = flagged[name]["quality"]
            log.warn(
                "device {device} is flagged: {failures} quality failures within {window:g}s (threshold {threshold})",
                device=name,
                failures=q["failures"],
                window=q["window"],
                threshold=q["threshold"],
            )
        for name in self.flagged.keys() - flagged.keys():
            log.info("device {device} is no longer flagged: it behaves again", device=name)
        self.silent, self.flagged, self.checked_at = silent, flagged, now
