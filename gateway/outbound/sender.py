"""
Sending one batch to a sink over HTTPS, and judging the answer: sent,
retry after a delay (backoff with full jitter, or the sink's Retry-After),
or park for good (a 4xx the same bytes will always get).
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from io import BytesIO
import typing
from typing import Any
from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from gateway import __version__
from gateway.reactor import Reactor
from gateway.backoff import backoff_delay
from gateway.net.httpclient import QuietPool, VerifyingPolicy
from gateway.outbound.sinks import Sink
from gateway.trust import trust_root


class Payload(typing.Protocol):
    """What HTTPSender sends: an upload batch or an alert notice."""

    @property
    def key(self) -> str:  # sent as Idempotency-Key
        ...

    @property
    def body(self) -> bytes | None:  # None only for a batch not yet made (never sent so)
        ...


RETRY_AFTER_CAP = 3600.0
RESPONSE_KEEP = 4096  # bytes of a refusal kept with the parked batch


@dataclass(frozen=True)
class Reply:
    status: int
    retry_after: str | None = None
    body: str = ""
    error: str = ""  # the failure in words when not HTTP's (an MQTT broker's refusal)


@dataclass(frozen=True)
class Verdict:
    kind: str  # "sent" | "retry" | "park"
    status: int | None = None
    error: str = ""
    response: str = ""
    delay: float = 0.0


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Retry-After as delay-seconds or an HTTP-date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def backoff(sink: Sink, attempt: int, rand: Callable[[], float]) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt))."""
    return backoff_delay(sink.backoff, sink.backoff_cap, attempt, "full", rand)


def judge(sink: Sink, outcome: Reply | Failure, attempt: int, now: float, rand: Callable[[], float]) -> Verdict:
    """What to do after one attempt to send a batch."""
    if isinstance(outcome, Failure):
        text = describe_failure(outcome)
        return Verdict("retry", error=text, delay=backoff(sink, attempt, rand))
    status = outcome.status
    if 200 <= status < 300:
        return Verdict("sent", status)
    error = outcome.error or (
        f"HTTP {status}" + (f": {outcome.body.strip().splitlines()[0][:200]}" if outcome.body.strip() else "")
    )
    if status in (408, 429, 503):
        after = retry_after_seconds(outcome.retry_after, now)
        if after is not None:
            return Verdict("retry", status, error, outcome.body, min(after, RETRY_AFTER_CAP))
    if 400 <= status < 500 and status not in (408, 429):
        return Verdict("park", status, error, outcome.body)
    if 300 <= status < 400:
        error += " (redirects are not followed: give the final URL)"
    return Verdict("retry", status, error, outcome.body, backoff(sink, attempt, rand))


def describe_failure(f: Failure) -> str:
    """One line for a failed request, digging out the TLS or socket error underneath."""
    value = f.value
    if isinstance(value, CancelledError) or type(value).__name__ == "TimeoutError":
        return "no answer in time"
    reasons = getattr(value, "reasons", None)
    if reasons:
        return describe_failure(reasons[0])
    text = str(value).strip()
    if "certificate verify failed" in text or "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS: the server's certificate is not trusted (see --upload-ca)"
    if type(value).__name__ == "VerificationError":
        return f"TLS: the certificate does not name the host: {text}"
    return f"{type(value).__name__}: {text}"[:300] if text else type(value).__name__


class Snippet(Protocol):
    """Reads a response body, keeping its first bytes."""

    def __init__(self, done: Deferred, limit: int) -> None:
        self.done = done
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.size < self.limit:
            self.parts.append(data[: self.limit - self.size])
        self.size += len(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(b"".join(self.parts))


class HTTPSender:
    """POSTs batches to one sink over a persistent, verified connection."""

    def __init__(
        self,
        reactor: Reactor,
        sink: Sink,
        content_type: bytes = b"application/x-ndjson",
        encoding: bytes | None = b"gzip",
    ) -> None:
        self.reactor = reactor
        self.sink = sink
        self.pool = QuietPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 2
        policy = VerifyingPolicy(trust_root(sink.ca))
        self.agent = Agent(reactor, contextFactory=policy, connectTimeout=sink.timeout, pool=self.pool)
        self._headers = [
            (b"Content-Type", content_type),
            *([(b"Content-Encoding", encoding)] if encoding else []),
            (b"User-Agent", f"txgateway/{__version__}".encode()),
            *[(name.encode("latin-1"), value.encode("latin-1")) for name, value in sink.headers],
        ]

    def send(self, batch: Payload) -> Deferred:
        headers = Headers()
        for name, value in self._headers:
            headers.addRawHeader(name, value)
        headers.addRawHeader(b"Idempotency-Key", batch.key.encode("ascii"))
        assert batch.body is not None, "a batch is sent once its body is made"
        d = self.agent.request(b"POST", self.sink.url.encode("ascii"), headers, FileBodyProducer(BytesIO(batch.body)))

        def read(response: Any) -> Deferred:
            done: Deferred = Deferred()
            response.deliverBody(Snippet(done, RESPONSE_KEEP))
            retry_after = response.headers.getRawHeaders(b"retry-after", [None])[0]
            return done.addCallback(
                lambda body: Reply(
                    response.code,
                    retry_after.decode("latin-1") if retry_after else None,
                    body.decode("utf-8", "replace"),
                )
            )

        d.addCallback(read)
        d.addTimeout(self.sink.timeout, self.reactor)
        return d

    def close(self) -> Deferred:
        return self.pool.closeCachedConnections()
