"""
HTTPS ingest: ``POST /v1/readings``, a device's readings as JSON with its
token as a bearer token, answered after COMMIT. The answer carries the
device's pending commands (``"commands": [...]``), so a device that only
posts gets them on its next post; it may also long-poll ``GET
/v1/commands?wait=30`` and reports results to ``POST
/v1/commands/{id}/result`` (the commands API, ``gateway/api/commands.py``). The site it is served on
(body limit, deadlines, the other resources) is ``gateway/web/site.py``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from gateway.ingest.core import Ingest
from gateway.readings import Device, IngestError, InvalidInput, Source, WriteResult, format_ts
from gateway.web.answers import answer_later, bearer_token, error_body, json_answer
from gateway.web.site import GatewaySite, JsonResource, source_of

log = Logger()

JSON_TYPES = (b"application/json",)
COMMANDS_PER_ANSWER = 20  # commands a device is given on one answer to its readings


# The HTTP answer to each ingest error code. The codes are the product's;
# the statuses are this transport's.
STATUS = {
    "invalid_json": 400,
    "invalid_body": 400,
    "invalid_reading": 400,
    "unauthorized": 401,
    "length_required": 411,
    "unsupported_media_type": 415,
    "unmappable": 422,
    "rejected_by_database": 422,
    "rate_limited": 429,
    "database_unavailable": 503,
    "overloaded": 503,
    "journal_full": 503,
    "device_type_unknown": 503,
}


class ReadingsResource(JsonResource):
    """POST /v1/readings: a device's readings, answered after COMMIT."""

    allowed = (b"POST",)

    def __init__(self, ingest: Ingest, commands: Any = None) -> None:
        super().__init__()
        self.ingest = ingest
        self.commands = commands  # the gateway's commands service: pending commands ride on the answer

    def render_POST(self, request: server.Request) -> Any:
        arrived = self.ingest.clock.seconds()
        source = source_of(request)
        d = Deferred.fromCoroutine(self._handle(request, source))

        def failed(f: Failure) -> bytes:
            e = f.value
            if isinstance(e, IngestError):
                return json_answer(request, STATUS.get(e.code, 400), error_body(e.code, e.message), e.retry_after)
            log.failure("ingest failed unexpectedly", f)
            return json_answer(request, 500, error_body("internal_error", "the gateway failed; retry later"))

        d.addCallback(lambda done: Deferred.fromCoroutine(self._accepted(request, done[0], done[1], source, arrived)))
        d.addErrback(failed)
        # If the client has gone by now its readings are stored all the
        # same; it will send them again and hear they are duplicates.
        return answer_later(request, d)

    async def _handle(self, request: server.Request, source: Source) -> tuple[Device, WriteResult]:
        device = await self.ingest.authenticate(bearer_token(request), source)
        body = request.content.getvalue() if request.content is not None else b""
        headers = request.requestHeaders
        if (
            not headers.hasHeader(b"content-length")
            and b"chunked" not in b",".join(headers.getRawHeaders(b"transfer-encoding", [])).lower()
        ):
            error = IngestError("send the body with Content-Length or chunked encoding", "length_required")
            await self.ingest.refuse(source, error.code, error.message, device=device.name, raw=body)
            raise error
        content_type = (headers.getRawHeaders(b"content-type") or [b""])[0].split(b";")[0].strip().lower()
        if content_type not in JSON_TYPES:
            error = InvalidInput("the body must be application/json", "unsupported_media_type")
            await self.ingest.refuse(source, error.code, error.message, device=device.name, raw=body)
            raise error
        return device, await self.ingest.write_json(device, body, source)

    async def _accepted(
        self, request: server.Request, device: Device, result: WriteResult, source: Source, arrived: float
    ) -> bytes:
        self.ingest.metrics.acked(source, self.ingest.clock.seconds() - arrived)
        doc: dict[str, Any] = {"accepted": result.accepted, "duplicates": result.duplicates}
        if result.conflicts:
            doc["conflicts"] = result.conflicts
        if result.quarantined:
            doc["quarantined"] = [
                {"index": q.index, "metric": q.reading.metric, "ts": format_ts(q.reading.ts_us), "rule": q.rule}
                for q in result.quarantined
            ]
        if self.commands is not None and device.name in self.commands.waiting:
            # The readings are stored whatever happens here: a command not taken now rides on a later answer.
            try:
                commands = await self.commands.take(device.name, "https", COMMANDS_PER_ANSWER)
            except Exception as e:  # noqa: BLE001 - the database away: the answer goes without them
                log.warn("commands for {device} not taken: {error}", device=device.name, error=e)
                commands = []
            if commands:
                doc["commands"] = [c.wire() for c in commands]
        return json_answer(request, 200, doc)


def ingest_site(ingest: Ingest, store: Any, **settings: Any) -> GatewaySite:
    """A site that takes readings at /v1/readings (and serves the rest that ``settings`` gives)."""
    return GatewaySite(ingest, store, v1={b"readings": ReadingsResource(ingest)}, **settings)
