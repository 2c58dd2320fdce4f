"""
twisted.web's side of the dashboard: the page, its script and style, the
charting library, sign-in and sign-out, and the CSP report endpoint.

Everything is served by the gateway from the installed packages: the
page's own files from ``gateway/ui/static``, plotly.js from the ``plotly``
package's bundled ``plotly.min.js`` (a plant's network reaches no CDN).
Each file is read and gzipped once, in a thread, on its first request, and
answered with an ETag; plotly's address carries its version, so browsers
keep it a year without asking again (``immutable``).

Every answer under /ui carries the headers a scanner looks for: a strict
Content-Security-Policy (scripts only from this origin, no inline script,
no eval), X-Frame-Options DENY, nosniff, no referrer, and HSTS over TLS.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from gateway.api.read import ApiError, ReadApi
from gateway.api.resource import STATUS, credentials_of
from gateway.api.oidc import FLOW_COOKIE, FLOW_SECONDS, Flow, Oidc, OidcError, begin_flow, finish_flow
from gateway.api.sessions import COOKIE, NewSession, Sessions
from gateway.ratelimit import RateLimitedLog
from gateway.ops.metrics import GatewayMetrics
from gateway.readings import format_ts
from gateway.ui.tiles import page_meta, page_policy
from gateway.web.site import NotFound
from gateway.web.answers import answer_later, error_body, json_answer, same_origin

log = Logger()

# plotly.js draws with inline style attributes and a <style> element of its own (plotly.js#2355): styles may be
# inline, scripts may not.
CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    b"connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; "
    b"report-uri /ui/csp-report"
)
HEADERS = {
    b"content-security-policy": CSP,
    b"x-frame-options": b"DENY",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cross-origin-opener-policy": b"same-origin",
    b"cross-origin-resource-policy": b"same-origin",
    b"permissions-policy": b"camera=(), microphone=(), geolocation=(), usb=(), serial=()",
}
YEAR = 365 * 86400
MAX_TOKEN = 16_384  # a sign-in body's token: ours are 60 characters, a provider's JWT a few KB


def secure_headers(request: server.Request) -> None:
    for name, value in HEADERS.items():
        request.setHeader(name, value)
    if request.isSecure():
        request.setHeader(b"strict-transport-security", b"max-age=31536000")


def plotly_file() -> tuple[Path, str]:
    """The plotly package's browser bundle and its version, found without importing the package (7 MB)."""
    from importlib import metadata, util

    spec = util.find_spec("plotly")
    if spec is None or spec.origin is None:
        raise RuntimeError("the plotly package is not installed (pip install plotly): the dashboard draws with it")
    return Path(spec.origin).parent / "package_data" / "plotly.min.js", metadata.version("plotly")


# What the sign-in form says of a token it refuses: what the person can do, not the API's header syntax.
NOT_A_TOKEN = (
    "that is not an API token: paste the whole token that 'gatewayctl token add NAME' printed "
    "(two parts joined by a dot), or a token from your single sign-on provider"
)
UNKNOWN_TOKEN = (
    "this API token is unknown or has been revoked: check that it was pasted whole, "
    "or ask an administrator for a new one ('gatewayctl token add NAME')"
)


def _for_a_person(e: ApiError) -> ApiError:
    if e.code != "unauthorized":
        return e
    if e.message.startswith("give an API token"):
        return ApiError(e.code, NOT_A_TOKEN)
    if e.message == "unknown or revoked API token":
        return ApiError(e.code, UNKNOWN_TOKEN)
    return e


@dataclass(frozen=True)
class Loaded:
    body: bytes
    gzipped: bytes
    etag: bytes


def load(read: Callable[[], bytes]) -> Loaded:
    body = read()
    return Loaded(body, gzip.compress(body, 6, mtime=0), b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"')


class Asset(resource.Resource):
    """One file: loaded and gzipped in a thread on first use, then answered from memory with its ETag."""

    isLeaf = True

    def __init__(
        self,
        read: Callable[[], bytes],
        content_type: bytes,
        in_thread: Callable[..., Deferred],
        immutable: bool,
        policy: bytes = CSP,
    ) -> None:
        super().__init__()
        self.read = read
        self.policy = policy  # the page's Content-Security-Policy (the dashboard's, widened for a tile server)
        self.content_type = content_type
        self.in_thread = in_thread
        self.immutable = immutable
        self._loaded: Loaded | None = None
        self._loading: list[Deferred] | None = None

    def loaded(self) -> Deferred:
        d: Deferred = Deferred()
        if self._loaded is not None:
            d.callback(self._loaded)
            return d
        if self._loading is None:
            self._loading = []

            def done(result: Any) -> None:
                waiting, self._loading = self._loading or [], None
                if not isinstance(result, Failure):
                    self._loaded = result
                for w in waiting:
                    w.callback(result) if not isinstance(result, Failure) else w.errback(result)

            self.in_thread(load, self.read).addBoth(done)
        self._loading.append(d)
        return d

    def render_GET(self, request: server.Request) -> Any:
        secure_headers(request)
        request.setHeader(b"content-security-policy", self.policy)

        def answer(file: Loaded) -> bytes:
            request.setHeader(b"content-type", self.content_type)
            request.setHeader(b"etag", file.etag)
            request.setHeader(b"vary", b"accept-encoding")
            request.setHeader(
                b"cache-control", f"public, max-age={YEAR}, immutable".encode() if self.immutable else b"no-cache"
            )
            if request.getHeader(b"if-none-match") == file.etag:
                request.setResponseCode(304)
                return b""
            body = file.body
            if b"gzip" in (request.getHeader(b"accept-encoding") or b""):
                request.setHeader(b"content-encoding", b"gzip")
                body = file.gzipped
            request.setHeader(b"content-length", str(len(body)).encode())
            return b"" if request.method == b"HEAD" else body

        def failed(f: Failure) -> bytes:
            log.failure("a dashboard file could not be read", f)
            return json_answer(request, 500, error_body("internal_error", "the dashboard's files are missing"))

        return answer_later(request, self.loaded().addCallbacks(answer, failed))

    render_HEAD = render_GET


def set_session_cookie(request: server.Request, new: NewSession) -> None:
    request.addCookie(
        COOKIE,
        new.cookie.encode(),
        path=b"/",
        max_age=str(int(new.seconds)).encode(),
        secure=True,
        httpOnly=True,
        sameSite="strict",
    )


class SessionResource(resource.Resource):
    """
    /ui/session: POST {"token": ...} signs in (a cookie, and the CSRF token in the answer); GET says who
    is signed in; DELETE signs out.
    """

    isLeaf = True

    def __init__(self, api: ReadApi, sessions: Sessions, metrics: GatewayMetrics) -> None:
        super().__init__()
        self.api = api
        self.sessions = sessions
        self.metrics = metrics

    def _answer(self, request: server.Request, run: Any) -> Any:
        secure_headers(request)

        def failed(f: Failure) -> bytes:
            e = f.value
            if isinstance(e, ApiError):
                return json_answer(request, STATUS.get(e.code, 400), error_body(e.code, e.message))
            log.failure("dashboard sign-in failed", f)
            return json_answer(request, 503, error_body("unavailable", "the gateway cannot sign you in now"), 5)

        d = Deferred.fromCoroutine(run())
        d.addCallbacks(lambda doc: json_answer(request, 200, doc), failed)
        return answer_later(request, d)

    def render_POST(self, request: server.Request) -> Any:
        async def run() -> dict[str, Any]:
            if not same_origin(request):
                raise ApiError("forbidden", "sign in from the gateway's own page")
            try:
                doc = json.loads(request.content.read() if request.content is not None else b"")
                token = doc["token"]
                assert isinstance(token, str) and len(token) <= MAX_TOKEN
            except (ValueError, KeyError, TypeError, AssertionError):
                raise ApiError("invalid_parameter", 'send {"token": "<API token>"} as JSON') from None
            try:
                who = await self.api.api_token(token.strip())
            except ApiError as e:
                self.metrics.ui_sign_ins.labels("refused").inc()
                raise _for_a_person(e) from None
            address = request.getClientAddress()
            new = await self.sessions.begin(who.role, who.name, who.id, getattr(address, "host", None), who.expires)
            set_session_cookie(request, new)
            self.metrics.ui_sign_ins.labels("ok").inc()
            how = "API token" if who.id is not None else "a provider's token for"
            log.info("dashboard sign-in with {how} {name} ({role})", how=how, name=who.name, role=who.role)
            return self._doc(new.session)

        return self._answer(request, run)

    def render_GET(self, request: server.Request) -> Any:
        async def run() -> dict[str, Any]:
            return self._doc(await self.api.session_of(credentials_of(request), changes=False))

        return self._answer(request, run)

    def render_DELETE(self, request: server.Request) -> Any:
        async def run() -> dict[str, Any]:
            session = await self.api.session_of(credentials_of(request), changes=True)
            await self.sessions.end(session.id)
            request.addCookie(COOKIE, b"", path=b"/", max_age=b"0", secure=True, httpOnly=True, sameSite="strict")
            return {"signed_out": True}

        return self._answer(request, run)

    @staticmethod
    def _doc(session: Any) -> dict[str, Any]:
        return {
            "role": session.role,
            "subject": session.subject,
            "csrf": session.csrf,
            "expires_at": format_ts(session.expires_us),
        }


class CspReports(resource.Resource):
    """POST /ui/csp-report: what a browser refused under the page's policy; counted and logged."""

    isLeaf = True

    def __init__(self, metrics: GatewayMetrics, refusals: RateLimitedLog) -> None:
        super().__init__()
        self.metrics = metrics
        self.refusals = refusals

    def render_POST(self, request: server.Request) -> bytes:
        self.metrics.ui_csp_reports.inc()
        body = (request.content.read(2000) if request.content is not None else b"").decode("utf-8", "replace")
        self.refusals.warn(
            "csp", "the dashboard broke its Content-Security-Policy in a browser: {report}", report=body[:500]
        )
        request.setResponseCode(204)
        return b""


class SignInOptions(resource.Resource):
    """GET /ui/sign-in: how this gateway lets people sign in (the page shows the provider's button if any)."""

    isLeaf = True

    def __init__(self, oidc: Oidc | None) -> None:
        super().__init__()
        self.oidc = oidc

    def render_GET(self, request: server.Request) -> bytes:
        secure_headers(request)
        provider = None
        if self.oidc is not None and self.oidc.settings.signs_in:
            provider = {"name": self.oidc.settings.name, "url": "/ui/oidc/login"}
        return json_answer(request, 200, {"token": True, "provider": provider})


def _back_to_page(request: server.Request, error: str | None = None) -> bytes:
    request.redirect(b"/ui/" + (b"?" + urlencode({"error": error}).encode() if error else b""))
    return b""


class OidcLogin(resource.Resource):
    """GET /ui/oidc/login: off to the provider, with PKCE; the flow's secrets wait in a short-lived cookie."""

    isLeaf = True

    def __init__(self, oidc: Oidc) -> None:
        super().__init__()
        self.oidc = oidc

    def render_GET(self, request: server.Request) -> bytes:
        secure_headers(request)
        settings = self.oidc.settings
        host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
        redirect_uri = settings.redirect_uri or f"https://{host}/ui/oidc/callback"
        flow, url = begin_flow(settings, redirect_uri)
        # Lax, not Strict: the provider's redirect back is a navigation from another site.
        request.addCookie(
            FLOW_COOKIE, flow.cookie(), path=b"/", max_age=str(FLOW_SECONDS).encode(), secure=True, httpOnly=True,
            sameSite="lax",
        )  # fmt: skip
        request.setHeader(b"cache-control", b"no-store")
        request.redirect(url.encode())
        return b""


class OidcCallback(resource.Resource):
    """GET /ui/oidc/callback?code=&state=: the provider sends the browser back; a session begins."""

    isLeaf = True

    def __init__(self, oidc: Oidc, sessions: Sessions, metrics: GatewayMetrics) -> None:
        super().__init__()
        self.oidc = oidc
        self.sessions = sessions
        self.metrics = metrics

    def render_GET(self, request: server.Request) -> Any:
        secure_headers(request)
        request.setHeader(b"cache-control", b"no-store")
        args = request.args or {}
        flow = Flow.from_cookie(request.getCookie(FLOW_COOKIE))
        request.addCookie(FLOW_COOKIE, b"", path=b"/", max_age=b"0", secure=True, httpOnly=True, sameSite="lax")
        if b"error" in args:
            said = args[b"error"][0].decode("utf-8", "replace")[:100]
            return _back_to_page(request, f"the provider refused the sign-in: {said}")
        state = args.get(b"state", [b""])[0].decode("latin-1")
        code = args.get(b"code", [b""])[0].decode("latin-1")
        if flow is None or not code or not secrets.compare_digest(state, flow.state):
            self.metrics.ui_sign_ins.labels("refused").inc()
            return _back_to_page(request, "the sign-in expired or was not started here; sign in again")

        async def run() -> bytes:
            try:
                who = await finish_flow(self.oidc.settings, self.oidc.keys, self.oidc.verifier, flow, code)
            except OidcError as e:
                self.metrics.ui_sign_ins.labels("refused").inc()
                log.warn("dashboard sign-in through the provider refused: {error}", error=e.message)
                return _back_to_page(request, e.message)
            address = request.getClientAddress()
            new = await self.sessions.begin(who.role, who.subject, None, getattr(address, "host", None))
            set_session_cookie(request, new)
            self.metrics.ui_sign_ins.labels("ok").inc()
            log.info("dashboard sign-in through the provider: {name} ({role})", name=who.subject, role=who.role)
            return _back_to_page(request)

        def failed(f: Failure) -> bytes:
            log.failure("dashboard sign-in through the provider failed", f)
            return _back_to_page(request, "the gateway could not sign you in now; try again")

        return answer_later(request, Deferred.fromCoroutine(run()).addErrback(failed))


class Folder(resource.Resource):
    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return NotFound()


class UiResource(resource.Resource):
    """/ui/ and what it loads."""

    def __init__(
        self,
        api: ReadApi,
        sessions: Sessions,
        metrics: GatewayMetrics,
        in_thread: Callable[..., Deferred],
        oidc: Oidc | None = None,
        tiles: tuple[str | None, str | None] = (None, None),
    ) -> None:
        super().__init__()
        static = resources.files("gateway.ui") / "static"
        plotly_js, plotly_version = plotly_file()
        self.plotly_path = f"/ui/vendor/plotly-{plotly_version}.min.js"
        tile_url, attribution = tiles

        def page() -> bytes:
            body = (static / "index.html").read_bytes().replace(b"{{plotly}}", self.plotly_path.encode())
            return body.replace(b"{{tiles}}", page_meta(tile_url, attribution))

        self.putChild(
            b"",
            Asset(page, b"text/html; charset=utf-8", in_thread, immutable=False, policy=page_policy(CSP, tile_url)),
        )
        self.putChild(b"app.js", Asset((static / "app.js").read_bytes, b"text/javascript", in_thread, False))
        self.putChild(b"app.css", Asset((static / "app.css").read_bytes, b"text/css", in_thread, False))
        vendor = Folder()
        vendor.putChild(
            self.plotly_path.rsplit("/", 1)[1].encode(),
            Asset(plotly_js.read_bytes, b"text/javascript", in_thread, immutable=True),
        )
        self.putChild(b"vendor", vendor)
        self.putChild(b"session", SessionResource(api, sessions, metrics))
        self.putChild(b"csp-report", CspReports(metrics, RateLimitedLog(log, metrics.clock)))
        self.putChild(b"sign-in", SignInOptions(oidc))
        if oidc is not None and oidc.settings.signs_in:
            flow = Folder()
            flow.putChild(b"login", OidcLogin(oidc))
            flow.putChild(b"callback", OidcCallback(oidc, sessions, metrics))
            self.putChild(b"oidc", flow)

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return NotFound()

    def render_GET(self, request: server.Request) -> bytes:
        # /ui without the slash: the page's relative addresses need it.
        request.redirect(b"/ui/")
        return b""
