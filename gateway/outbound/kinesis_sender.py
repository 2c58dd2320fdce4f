"""
Sending upload batches to an Amazon Kinesis data stream (a ``[[sink]]`` with
``kind = "kinesis"``), on the reactor.

A batch becomes records: by default one per device, the device's JSON lines
(each within Kinesis's 1 MB record limit, split if need be), with the
device's name as the partition key so its readings stay ordered within a
shard; or one per reading (``format = "reading"``). The records go in
``PutRecords`` calls of at most 500 records and 5 MB. botocore builds and
signs each request (SigV4), and Twisted's HTTP client sends it: no thread
per request, no blocking of the reactor.

``PutRecords`` can succeed in part. The records it accepted are remembered
for the batch, and the next attempt (after the uploader's backoff) sends only
the others, with the same data and partition key; ``send`` fires with a 2xx
``Reply`` only when every record of the batch is accepted, so the uploader
moves the sink's cursor only then. In the default format a device's second
record goes only after its first is accepted, so a partial failure never
reorders a device's readings. Throttling (a whole call, or records of it)
is answered 429: retried after the backoff, never parked. A refusal the same
records will always get (access denied, a record too large, a KMS key that
cannot be used) is answered 4xx: the batch is parked with the reason. A
gateway that stops mid-batch sends the whole batch again after its restart:
at least once, as for every sink.

Credentials come from AWS's own chain (botocore): the environment, the shared
config and credentials files (``profile``), a container or an instance role.
Finding them may ask a metadata service, so it runs in a thread, as does
refreshing credentials that expire (roles, SSO), which happens before they
lapse: botocore says when a refresh is due.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections import Counter
from collections.abc import Iterator
from io import BytesIO
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from gateway import __version__
from gateway.net.httpclient import QuietPool, VerifyingPolicy
from gateway.outbound.lines import by_device, names
from gateway.outbound.sender import Payload, Reply, Snippet
from gateway.outbound.sinks import KinesisSink, Sink
from gateway.reactor import Reactor
from gateway.trust import trust_root

log = Logger()

MAX_RECORDS = 500  # PutRecords: records a call
MAX_CALL_BYTES = 5 * 1024 * 1024  # PutRecords: data and partition keys of a call
MAX_RECORD_BYTES = 1024 * 1024  # a record: its data and partition key
MAX_KEY = 256  # a partition key, in characters
ANSWER_KEEP = 4 * 1024 * 1024  # bytes of an answer read (500 records' results are ~60 KB)
TARGET = b"Kinesis_20131202."

# Whole-call errors (the answer's __type) that pass: throttled, or the service or the credentials for a moment.
THROTTLED = {"ProvisionedThroughputExceededException", "LimitExceededException", "ThrottlingException"}
# Refusals the same records will always get: the batch is parked with the reason.
FOR_GOOD = {
    "AccessDeniedException",
    "ValidationException",
    "InvalidArgumentException",
    "SerializationException",
    "KMSAccessDeniedException",
    "KMSDisabledException",
    "KMSInvalidStateException",
    "KMSNotFoundException",
    "KMSOptInRequired",
}
EXPIRED = {"ExpiredTokenException", "ExpiredToken", "RequestExpired"}


@dataclass
class Record:
    key: str  # the partition key
    data: bytes  # JSON lines
    lines: int

    @property
    def size(self) -> int:
        return len(self.data) + len(self.key.encode())


def records(sink: KinesisSink, body: bytes) -> list[Record]:
    """The records of a batch body (gzip-compressed JSON lines), in order. CPU work: run it in a thread."""
    text = gzip.decompress(body)
    out: list[Record] = []
    if sink.format == "reading":
        for line in text.splitlines():
            device, metric = names(line)
            key = sink.partition_key.format(device=device, metric=metric)[:MAX_KEY]
            out.append(Record(key, line + b"\n", 1))
        return out
    for name, lines in by_device(text).items():
        key = sink.partition_key.format(device=name)[:MAX_KEY]
        room = MAX_RECORD_BYTES - len(key.encode())
        first, size = 0, 0
        for i, line in enumerate(lines):
            if i > first and size + len(line) + 1 > room:
                out.append(Record(key, b"\n".join(lines[first:i]) + b"\n", i - first))
                first, size = i, 0
            size += len(line) + 1
        out.append(Record(key, b"\n".join(lines[first:]) + b"\n", len(lines) - first))
    return out


def calls(pending: list[Record], one_per_key: bool) -> Iterator[list[Record]]:
    """The next PutRecords calls for the pending records (with one_per_key, a key's first pending record only)."""
    chosen: list[Record] = []
    if one_per_key:
        seen: set[str] = set()
        for record in pending:
            if record.key not in seen:
                seen.add(record.key)
                chosen.append(record)
    else:
        chosen = pending
    call: list[Record] = []
    size = 0
    for record in chosen:
        if call and (len(call) == MAX_RECORDS or size + record.size > MAX_CALL_BYTES):
            yield call
            call, size = [], 0
        call.append(record)
        size += record.size
    if call:
        yield call


def signed(
    stream: KinesisSink, action: str, doc: dict[str, Any], credentials: Any
) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """A call's URL, headers and body, signed with SigV4 by botocore."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    body = json.dumps(doc, separators=(",", ":")).encode()
    request = AWSRequest(
        method="POST",
        url=stream.endpoint + "/",
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": (TARGET + action.encode()).decode(),
            "User-Agent": f"txgateway/{__version__}",
        },
    )
    SigV4Auth(credentials, "kinesis", stream.region).add_auth(request)
    headers = [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in request.headers.items()
        if name.lower() != "host"  # the HTTP client writes Host from the URL, as botocore signed it
    ]
    return request.url.encode("ascii"), headers, body


@dataclass
class KinesisFigures:
    """This process's counts for a Kinesis sink (in /metrics and gatewayctl's status)."""

    records_sent: int = 0
    records_failed: int = 0  # records a partial answer did not accept (sent again)
    throttles: int = 0  # calls throttled, whole or in part
    calls: int = 0
    codes: dict[str, int] = field(default_factory=dict)  # the failed records' error codes


class Credentials:
    """AWS credentials from botocore's chain; looked up, and refreshed before they lapse, in a thread."""

    def __init__(self, profile: str | None, in_thread: Any) -> None:
        self.profile = profile
        self.in_thread = in_thread
        self._source: Any = None
        self._frozen: Any = None

    async def current(self) -> Any:
        if self._source is None:
            self._source = await self.in_thread(self._look_up)
            self._frozen = None
        refresh = getattr(self._source, "refresh_needed", None)
        if self._frozen is None or (refresh is not None and refresh()):
            self._frozen = await self.in_thread(self._source.get_frozen_credentials)
        return self._frozen

    def _look_up(self) -> Any:
        import botocore.session

        found = botocore.session.Session(profile=self.profile).get_credentials()
        if found is None:
            raise LookupError(
                "no AWS credentials found: give AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile in "
                "~/.aws/credentials (profile = ... in the sink's table), or run with a container or instance role"
            )
        return found

    def expired(self) -> None:
        """The service said the credentials expired: look them up again before the next request."""
        self._source = None
        self._frozen = None


class KinesisSender:
    """Sends a sink's batches to a Kinesis data stream; the same interface as HTTPSender."""

    def __init__(self, reactor: Reactor, sink: Sink, in_thread: Any) -> None:
        assert sink.kinesis is not None
        self.reactor = reactor
        self.sink = sink
        self.stream = sink.kinesis
        self.in_thread = in_thread
        self.credentials = Credentials(self.stream.profile, in_thread)
        self.pool = QuietPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 2
        policy = VerifyingPolicy(trust_root(sink.ca))
        self.agent = Agent(reactor, contextFactory=policy, connectTimeout=sink.timeout, pool=self.pool)
        self.figures = KinesisFigures()
        self._pending: tuple[str, list[Record]] | None = None  # the batch being sent, and its records not accepted
        self._described = False
        stream = self.stream.stream
        self._stream_field = {"StreamARN": stream} if stream.startswith("arn:") else {"StreamName": stream}

    def send(self, batch: Payload) -> Deferred:
        if batch.body is None:
            return fail(ValueError("a batch is sent once its body is made"))
        d = Deferred.fromCoroutine(self._send(batch.key, batch.body))
        d.addTimeout(self.sink.timeout, self.reactor)
        return d

    async def _send(self, key: str, body: bytes) -> Reply:
        if self._pending is None or self._pending[0] != key:
            self._pending = (key, await self.in_thread(records, self.stream, body))
        pending = self._pending[1]
        if not self._described:
            await self._describe()
        one_per_key = self.stream.format == "device"
        while pending:
            for call in calls(pending, one_per_key):
                outcome = await self._put(call)
                if isinstance(outcome, Reply):
                    return outcome
                accepted = {id(r) for r, code in zip(call, outcome) if code is None}
                pending[:] = [r for r in pending if id(r) not in accepted]
                self.figures.records_sent += len(accepted)
                failed = Counter(code for code in outcome if code is not None)
                if failed:
                    self.figures.records_failed += failed.total()
                    if "ProvisionedThroughputExceededException" in failed:
                        self.figures.throttles += 1
                    codes = ", ".join(f"{c} ×{n}" for c, n in sorted(failed.items()))
                    return Reply(
                        429,
                        error=f"Kinesis accepted {len(accepted)} of {len(call)} records ({codes}); "
                        f"{len(pending)} sent again after the backoff",
                    )
        self._pending = None
        return Reply(200)

    async def _request(self, action: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
        """One signed call: (HTTP status, the answer's JSON object, its text)."""
        frozen = await self.credentials.current()
        # Encoding a call of up to 5 MB and hashing it for the signature is CPU work: in a thread.
        url, raw, body = await self.in_thread(signed, self.stream, action, doc, frozen)
        headers = Headers()
        for name, value in raw:
            headers.addRawHeader(name, value)
        self.figures.calls += 1
        response = await self.agent.request(b"POST", url, headers, FileBodyProducer(BytesIO(body)))
        done: Deferred = Deferred()
        response.deliverBody(Snippet(done, ANSWER_KEEP))
        text = (await done).decode("utf-8", "replace")
        try:
            answer = json.loads(text) if text.strip() else {}
        except ValueError:
            answer = {}
        return response.code, answer if isinstance(answer, dict) else {}, text

    async def _put(self, call: list[Record]) -> list[str | None] | Reply:
        """One PutRecords call: each record's error code (None: accepted), or the Reply that ends this attempt."""
        doc = {
            **self._stream_field,
            "Records": [{"Data": base64.b64encode(r.data).decode("ascii"), "PartitionKey": r.key} for r in call],
        }
        status, answer, text = await self._request("PutRecords", doc)
        if status != 200:
            return self._refused(status, answer, text)
        results = answer.get("Records")
        if not isinstance(results, list) or len(results) != len(call):
            return Reply(502, body=text[:500], error="Kinesis answered PutRecords without a result for each record")
        codes: list[str | None] = []
        for result in results:
            code = (result.get("ErrorCode") or None) if isinstance(result, dict) else "no result"
            codes.append(code)
            if code:
                self.figures.codes[code] = self.figures.codes.get(code, 0) + 1
                if code in FOR_GOOD:
                    message = result.get("ErrorMessage", "") if isinstance(result, dict) else ""
                    return Reply(400, body=text[:500], error=f"Kinesis refused a record: {code}: {message}"[:300])
        return codes

    def _refused(self, status: int, answer: dict[str, Any], text: str) -> Reply:
        kind = str(answer.get("__type", "")).rsplit("#", 1)[-1]
        message = answer.get("message") or answer.get("Message") or ""
        error = f"Kinesis {status} {kind or 'error'}" + (f": {message}" if message else "")
        if kind in THROTTLED:
            self.figures.throttles += 1
            return Reply(429, body=text[:500], error=error)
        if kind in EXPIRED:
            self.credentials.expired()
            return Reply(503, body=text[:500], error=error + " (credentials looked up again)")
        if kind in FOR_GOOD:
            return Reply(403 if kind.startswith(("AccessDenied", "KMSAccess")) else 400, body=text[:500], error=error)
        if kind == "ResourceNotFoundException":  # a stream not (yet) there: wait for it rather than park everything
            return Reply(503, body=text[:500], error=f"{error} (is stream = {self.stream.stream!r} right?)")
        return Reply(status if status >= 500 else 503, body=text[:500], error=error)

    async def _describe(self) -> None:
        """Say once what the stream is (DescribeStreamSummary); a refusal here is logged, not fatal."""
        try:
            status, answer, _ = await self._request("DescribeStreamSummary", dict(self._stream_field))
        except Exception as e:
            log.warn("sink {sink}: cannot describe stream {stream}: {error}", sink=self.sink.name,
                     stream=self.stream.stream, error=e)  # fmt: skip
            return
        self._described = True
        summary = answer.get("StreamDescriptionSummary", {})
        if status == 200 and isinstance(summary, dict):
            log.info(
                "sink {sink}: stream {stream} is {state} with {shards} open shards",
                sink=self.sink.name, stream=summary.get("StreamName", self.stream.stream),
                state=summary.get("StreamStatus"), shards=summary.get("OpenShardCount"),
            )  # fmt: skip
        else:
            log.warn("sink {sink}: describing stream {stream} answered {status}: {answer}", sink=self.sink.name,
                     stream=self.stream.stream, status=status, answer=str(answer)[:300])  # fmt: skip

    def status(self) -> dict[str, Any]:
        f = self.figures
        return {
            "stream": self.stream.stream,
            "records_sent": f.records_sent,
            "records_failed": f.records_failed,
            "throttles": f.throttles,
            "record_errors": dict(f.codes),
        }

    def close(self) -> Deferred:
        return self.pool.closeCachedConnections()
