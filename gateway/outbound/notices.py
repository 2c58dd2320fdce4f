"""
Alert notices: ``AlertNotifier`` POSTs the notices that edge alerts
(``outbound.alerts``) record to ``--alert-webhook``, at least once each
and in order per alert, with the uploader's retry policy: exponential
backoff with full jitter, Retry-After honoured, a 4xx other than 408/429
parked (``last_error`` says why). A notice is claimed with a lease, so
gateways sharing the database do not send it twice in the normal case;
its ``key`` is sent as ``Idempotency-Key``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.reactor import Reactor
from gateway.families import counter
from gateway.outbound.sender import HTTPSender, judge
from gateway.outbound.sinks import Sink
from gateway.readings import format_ts
from gateway.storage.pool import PgPool

log = Logger()

POLL = 5.0  # seconds between looks for notices due (other gateways', retries)
LEASE = 60.0  # seconds a claimed notice is not offered to another sender, beyond the request timeout

CLAIM = """
UPDATE alert_notices SET attempts = attempts + 1, due_at = now() + %s * interval '1 second'
WHERE id = (
    SELECT n.id FROM alert_notices n
    WHERE n.sent_at IS NULL AND n.parked_at IS NULL AND n.due_at <= now()
      AND NOT EXISTS (SELECT 1 FROM alert_notices e WHERE e.alert_id = n.alert_id AND e.id < n.id
                      AND e.sent_at IS NULL AND e.parked_at IS NULL)
    ORDER BY n.due_at, n.id LIMIT 1 FOR UPDATE SKIP LOCKED
)
RETURNING id, key, event, attempts, alert_id
"""
ALERT_ROW = f"""
SELECT a.id, a.rule, d.name, a.metric, a.message, {
    ", ".join(
        f"(extract(epoch FROM a.{c}) * 1000000)::bigint" for c in ("fired_at", "fired_ts", "cleared_at", "cleared_ts")
    )
}, a.fired_value, a.cleared_value
FROM alerts a JOIN devices d ON d.id = a.device_id WHERE a.id = %s
"""
SENT = "UPDATE alert_notices SET sent_at = now(), last_error = NULL WHERE id = %s"
RETRY = "UPDATE alert_notices SET due_at = now() + %s * interval '1 second', last_error = %s WHERE id = %s"
PARK = "UPDATE alert_notices SET parked_at = now(), last_error = %s WHERE id = %s"


@dataclass(frozen=True)
class Notice:
    key: str
    body: bytes


def notice_body(event: str, key: str, row: tuple, gateway: str) -> bytes:
    id_, rule, device, metric, message, fired_at, fired_ts, cleared_at, cleared_ts, fired_value, cleared_value = row
    doc = {
        "event": event,
        "key": key,
        "alert": id_,
        "rule": rule,
        "device": device,
        "metric": metric,
        "message": message,
        "fired_at": format_ts(fired_at),
        "fired_reading": {"ts": format_ts(fired_ts), "value": fired_value},
        "cleared_at": format_ts(cleared_at) if cleared_at is not None else None,
        "cleared_reading": {"ts": format_ts(cleared_ts), "value": cleared_value} if cleared_ts is not None else None,
        "gateway": gateway,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


class AlertNotifier(Service):
    """Sends alert notices to the webhook, one at a time, oldest due first."""

    def __init__(
        self,
        sink: Sink,
        pool: PgPool,
        clock: Reactor,  # a task.Clock in tests that give their own sender
        gateway: str,
        sender: Any = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.sink = sink
        self.pool = pool
        self.clock = clock
        self.gateway = gateway
        self.sender = sender or HTTPSender(clock, sink, content_type=b"application/json", encoding=None)
        self.rand = rand
        self.sent = 0
        self.failures = 0
        self.parked = 0
        self._running: Deferred | None = None
        self._again = False
        self._timer: Any = None

    def live_metrics(self) -> Iterator[Any]:
        yield counter("gateway_alert_notices_sent", "Alert notices the webhook took.", [], self.sent)
        yield counter("gateway_alert_notices_failed", "Failed attempts to send a notice (retried).", [], self.failures)
        yield counter("gateway_alert_notices_parked", "Notices the webhook refused for good.", [], self.parked)

    def startService(self) -> None:
        super().startService()
        self.wake()

    def stopService(self) -> Deferred:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        running = self._running or succeed(None)
        return running.addBoth(lambda _: self.sender.close())

    def wake(self) -> None:
        """Look for due notices now (a change was recorded, or the timer)."""
        if not self.running:
            return
        if self._running is not None:
            self._again = True
            return
        self._running = Deferred.fromCoroutine(self._drain())
        self._running.addBoth(self._drained)

    def _drained(self, result: Any) -> None:
        self._running = None
        if isinstance(result, Failure):
            log.warn("alert notices not sent yet: {error}", error=str(result.value).strip().splitlines()[0])
        if not self.running:
            return
        if self._again:
            self._again = False
            self.wake()
            return
        self._schedule(POLL)

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self.wake)

    def _query(self, sql: str, params: Any) -> Deferred:
        return self.pool.run(lambda c: c.runQuery(sql, params))

    def _record(self, sql: str, params: Any) -> Deferred:
        return self.pool.run(lambda c: c.runOperation(sql, params))

    async def _drain(self) -> None:
        while self.running:
            claimed = await self._query(CLAIM, (self.sink.timeout + LEASE,))
            if not claimed:
                return
            notice_id, key, event, attempts, alert_id = claimed[0]
            rows = await self._query(ALERT_ROW, (alert_id,))
            body = notice_body(event, str(key), rows[0], self.gateway)
            try:
                outcome: Any = await self.sender.send(Notice(str(key), body))
            except Exception:
                outcome = Failure()
            verdict = judge(self.sink, outcome, attempts - 1, self.clock.seconds(), self.rand)
            if verdict.kind == "sent":
                self.sent += 1
                await self._record(SENT, (notice_id,))
            elif verdict.kind == "park":
                self.parked += 1
                log.error(
                    "alert notice {key} refused for good by the webhook: {error}; it is kept, not sent",
                    key=str(key),
                    error=verdict.error,
                )
                await self._record(PARK, (verdict.error, notice_id))
            else:
                self.failures += 1
                log.warn(
                    "alert notice {key} not delivered ({error}); again in {delay:.1f}s",
                    key=str(key),
                    error=verdict.error,
                    delay=verdict.delay,
                )
                await self._record(RETRY, (verdict.delay, verdict.error, notice_id))
                self._schedule(verdict.delay)
