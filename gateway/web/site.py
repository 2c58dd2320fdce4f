"""
The HTTP site every HTTP surface shares: the HTTPS API's site (ingest,
read API, dashboard, operations) and the ``--metrics`` site.

twisted.web reads a whole body before it calls a resource and has no body
limit of its own, so ``LimitedRequest`` counts body bytes as they arrive
(chunked bodies included) and answers 413 and closes the connection as
soon as the limit is passed, before buffering more. Bodies are held in
memory (bounded by that limit), never in temporary files.

Deadlines. twisted.web's idle timer restarts with every byte, so a client
dripping one byte at a time would hold a connection for ever. Here a
request's first line must arrive within ``request_timeout`` of the
connection opening (TLS handshake included) or of the previous answer, and
the rest of the request (headers and body) within ``request_timeout`` of
that first line; a connection that misses either is answered 408 (or, with
no request begun, just cut) and closed.

Resources under ``/v1/`` come from the transports (``POST /v1/readings``
from HTTPS ingest) and from the read API. Every answer is JSON. Errors are
``{"error": code, "message": text}``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from gateway.ingest.core import Ingest
from gateway.ops.health import Health
from gateway.ops.metrics import MetricsResource
from gateway.readings import Source
from gateway.storage.interface import IStore
from gateway.web.answers import answer_later, error_body, json_answer

log = Logger()

SAMPLE_BYTES = 4096  # how much of an over-long body is kept as evidence


def source_of(request: server.Request) -> Source:
    secure = request.isSecure()
    return Source.of("https" if secure else "http", request.getClientAddress(), secure)


class LimitedRequest(server.Request):
    """A Request that refuses bodies over the site's limit while reading them."""

    channel: Any  # a GatewayChannel, or the HTTPChannel of a test's site
    content: Any  # the body so far, a BytesIO once the length is known
    _received = 0
    _answered = False  # refused and answered already: the connection is closing
    _deadline = None

    def __init__(self, channel: Any, *args: Any, **kw: Any) -> None:
        super().__init__(channel, *args, **kw)
        # The channel makes a request when its first line arrives; from then
        # on, headers and body together have request_timeout to arrive.
        site = channel.site
        self._deadline = site.clock.callLater(site.request_timeout, self._too_slow)
        if isinstance(channel, GatewayChannel):
            channel.request_begun()

    def gotLength(self, length: int | None) -> None:
        site = self.channel.site
        self.content = io.BytesIO()
        self._received = 0
        if length is not None and length > site.max_body:
            self._refuse(413, "body_too_large", f"the body is {length} bytes; the limit is {site.max_body}")

    def handleContentChunk(self, data: bytes) -> None:
        if self._answered:
            return
        self._received += len(data)
        site = self.channel.site
        if self._received > site.max_body:
            sample = self.content.getvalue()[:SAMPLE_BYTES]
            self._refuse(413, "body_too_large", f"the body is over the limit of {site.max_body} bytes", sample)
            return
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._cancel_deadline()
        if self._answered:
            return  # already answered; the connection is closing
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        transport = getattr(self.channel, "transport", None)
        if transport is None or transport.disconnecting:
            return  # already refused (a bad request line) and closing
        timeout = self.channel.site.request_timeout
        self._refuse(408, "request_timeout", f"the request did not arrive whole within {timeout:g} seconds")

    def _refuse(self, status: int, code: str, message: str, sample: bytes = b"") -> None:
        """Answer at once, bypassing the resource, and close the connection."""
        self._answered = True
        self._cancel_deadline()
        self.content = io.BytesIO()
        body = json.dumps(error_body(code, message), separators=(",", ":")).encode() + b"\n"
        head = (
            f"HTTP/1.1 {status} {http.RESPONSES.get(status, b'Error').decode()}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        self.channel.transport.write(head + body)
        self.channel.loseConnection()
        self.channel.site.ingest.refuse(source_of(self), code, message, raw=sample, closing=True)


class GatewayChannel(http.HTTPChannel):
    """An HTTPChannel with a deadline for each request's first line (see the module's docstring)."""

    transport: Any  # set by makeConnection before any event; Twisted types it Optional
    site: GatewaySite

    _waiting = None
    _served = 0
    _heard = False  # bytes of a next request have arrived

    def connectionMade(self) -> None:
        super().connectionMade()
        self._wait_for_request()

    def _wait_for_request(self) -> None:
        site = self.site
        self._waiting = site.clock.callLater(site.request_timeout, self._no_request)

    def request_begun(self) -> None:
        if self._waiting is not None and self._waiting.active():
            self._waiting.cancel()
        self._waiting = None

    def dataReceived(self, data: bytes) -> None:
        self._heard = True
        super().dataReceived(data)

    # Each request asks for both addresses and whether TLS carries it; none of
    # that changes in a connection's life, and asking every time (the kernel
    # for addresses, zope adaptation for TLS) cost 5% of a small request's CPU.
    _host = _peer = _secure = None

    def isSecure(self) -> bool:
        if self._secure is None:
            self._secure = super().isSecure()
        return self._secure

    def getHost(self) -> Any:
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def getPeer(self) -> Any:
        if self._peer is None:
            self._peer = self.transport.getPeer()
        return self._peer

    def requestDone(self, request: Any) -> None:
        self._served += 1
        self._heard = False
        super().requestDone(request)
        if self.persistent and not self.requests and self._waiting is None and not self.transport.disconnecting:
            self._wait_for_request()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.request_begun()
        super().connectionLost(reason)

    def timeoutConnection(self) -> None:
        # twisted.web logs each connection it times out; under a crowd of
        # idle sockets that is a flood. A keep-alive connection going quiet
        # after its requests is normal; one that never sent a whole request
        # is refused like the others, counted and rate-limited.
        if self.transport is not None and self.transport.disconnecting:
            # Closed already (an answer to a malformed request), and the peer has not taken the answer since:
            # cut it. Closing it again would undo the producer registration a second time.
            self.transport.abortConnection()
            return
        self.request_begun()
        if self.requests or not self._served or self._heard:
            self._refuse_connection("idle for {seconds:g}s before a whole request arrived")
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

    def _no_request(self) -> None:
        self._waiting = None
        if self.requests:
            return
        if self._served and not self._heard:  # a keep-alive connection gone quiet: fine
            self.loseConnection()
            return
        self._refuse_connection("no request within {seconds:g}s")
        self.transport.abortConnection()

    def _refuse_connection(self, why: str) -> None:
        secure = self.isSecure()
        source = Source.of("https" if secure else "http", self.getPeer(), secure)
        self.site.ingest.refuse(source, "request_timeout", why.format(seconds=self.site.request_timeout), closing=True)


class JsonResource(resource.Resource):
    isLeaf = True
    allowed: tuple[bytes, ...] = ()

    def render(self, request: server.Request) -> Any:
        if request.method not in self.allowed:
            request.setHeader(b"allow", b", ".join(self.allowed))
            return json_answer(
                request, 405, error_body("method_not_allowed", f"use {b', '.join(self.allowed).decode()}")
            )
        return super().render(request)


class NotFound(JsonResource):
    allowed = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS")

    def render(self, request: server.Request) -> bytes:
        return json_answer(request, 404, error_body("not_found", f"no such resource: {request.path.decode('latin-1')}"))


class HealthResource(JsonResource):
    """
    GET /healthz: 200 when all is well (database, queue, journal, sinks, broker sources), else 503.
    GET /readyz (``ready``): 200 when the gateway can store what devices send (database or journal, queue),
    whatever the sinks and broker sources do: what a load balancer asks before sending it devices.
    """

    allowed = (b"GET", b"HEAD")

    def __init__(self, health: Health, ready: bool = False) -> None:
        super().__init__()
        self.health = health
        self.ready = ready

    def render_GET(self, request: server.Request) -> Any:
        def answer(result: tuple[bool, dict[str, Any]]) -> bytes:
            healthy, doc = result
            if self.ready:
                healthy = doc["storing"]
                doc = {**doc, "status": "ok" if healthy else "unavailable"}
            return json_answer(request, 200 if healthy else 503, doc, None if healthy else 5)

        return answer_later(request, self.health.check().addCallback(answer))

    render_HEAD = render_GET


class LiveResource(JsonResource):
    """GET /livez: 200 whenever the process serves requests at all (restart it only when this fails)."""

    allowed = (b"GET", b"HEAD")

    def __init__(self, clock: IReactorTime) -> None:
        super().__init__()
        self.clock = clock
        self.started = clock.seconds()

    def render_GET(self, request: server.Request) -> bytes:
        return json_answer(
            request, 200, {"status": "ok", "uptime_seconds": round(self.clock.seconds() - self.started, 3)}
        )

    render_HEAD = render_GET


def operations_resources(health: Health, metrics: Any) -> dict[bytes, resource.Resource]:
    """/healthz, /readyz, /livez and /metrics, for the HTTPS site or the --metrics site."""
    return {
        b"healthz": HealthResource(health),
        b"readyz": HealthResource(health, ready=True),
        b"livez": LiveResource(metrics.clock),
        b"metrics": MetricsResource(metrics),
    }


class OperationsRoot(resource.Resource):
    """The --metrics endpoint's site: /metrics and /healthz only."""

    def __init__(self, health: Health, metrics: Any) -> None:
        super().__init__()
        for name, child in operations_resources(health, metrics).items():
            self.putChild(name, child)

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return NotFound()

    def render(self, request: server.Request) -> bytes:
        return NotFound().render(request)


class Root(resource.Resource):
    def __init__(
        self,
        ingest: Ingest,
        health: Health,
        metrics_here: bool,
        api: resource.Resource | None = None,
        ui: resource.Resource | None = None,
        children: Mapping[bytes, resource.Resource] | None = None,
    ) -> None:
        super().__init__()
        v1 = resource.Resource()
        for name, child in (children or {}).items():
            v1.putChild(name, child)
        if api is not None:
            for name in (b"devices", b"alerts", b"quarantine", b"sinks", b"commands", b"openapi.json"):
                v1.putChild(name, api)
        if ui is not None:
            self.putChild(b"ui", ui)
        v1.getChild = lambda path, request: NotFound()  # type: ignore[method-assign]
        self.putChild(b"v1", v1)
        for name, child in operations_resources(health, ingest.metrics).items():
            if name != b"metrics" or metrics_here:
                self.putChild(name, child)

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return NotFound()

    def render(self, request: server.Request) -> bytes:
        return NotFound().render(request)


class GatewaySite(server.Site):
    requestFactory = LimitedRequest
    protocol: Any = GatewayChannel
    noisy = False  # the listener says where it listens
    displayTracebacks = False

    def __init__(
        self,
        ingest: Ingest,
        store: IStore | None,
        *,
        clock: IReactorTime,
        max_body: int,
        request_timeout: float,
        health: Health | None = None,
        metrics_here: bool = True,
        api: resource.Resource | None = None,
        ui: resource.Resource | None = None,
        v1: Mapping[bytes, resource.Resource] | None = None,
    ) -> None:
        # The API takes JSON, never forms: without form parsing twisted.web
        # skips its Content-Type parsing through the email package, which
        # cost a quarter of the CPU of a one-reading request.
        if health is None:
            assert store is not None, "a site without a Health answers /healthz from the store"
            health = Health(store, stall_after=300.0)
        super().__init__(
            Root(ingest, health, metrics_here, api, ui, v1),
            timeout=request_timeout,
            parsePOSTFormSubmission=False,
            reactor=clock,
        )
        self.ingest = ingest
        self.clock = clock
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.open_connections = 0

    def reconfigure(self, max_body: int, request_timeout: float) -> None:
        """Settings a SIGHUP changes; connections made from now on take the new idle timeout."""
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.timeOut = request_timeout

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if channel is None:
            return None
        self.open_connections += 1
        lost = channel.connectionLost

        def connectionLost(reason: Failure) -> None:
            self.open_connections -= 1
            lost(reason)

        channel.connectionLost = connectionLost
        return channel

    def log(self, request: http.Request) -> None:
        # No access log line per request: at thousands of requests a second
        # it would cost more than the request. Refusals are logged where made.
        pass
