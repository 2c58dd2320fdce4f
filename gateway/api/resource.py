"""twisted.web's side of the read API: HTTP in, ``ReadApi`` calls, JSON and status codes out."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from gateway.api.read import ApiError, Credentials, ReadApi
from gateway.api.sessions import COOKIE
from gateway.readings import StoreOverloaded, StoreUnavailable
from gateway.web.site import source_of
from gateway.web.answers import answer_later, bearer_token, error_body, json_answer, same_origin

log = Logger()

# The HTTP answer to each read API error code.
STATUS = {
    "invalid_parameter": 400,
    "invalid_cursor": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "no_such_device": 404,
    "method_not_allowed": 405,
    "invalid_json": 400,
    "invalid_command": 400,
    "invalid_result": 400,
    "id_in_use": 409,
    "not_cancelable": 409,
}


def credentials_of(request: server.Request) -> Credentials:
    """The bearer token, or the dashboard's session cookie with its CSRF token, that a request presents."""
    cookie = request.getCookie(COOKIE)
    csrf = request.getHeader(b"x-csrf-token")
    return Credentials(
        token=bearer_token(request),
        cookie=cookie.decode("latin-1") if cookie else None,
        csrf=csrf.decode("latin-1") if csrf else None,
        same_origin=same_origin(request),
    )


class ApiResource(resource.Resource):
    """twisted.web's side of ReadApi: one leaf for every /v1 path but /v1/readings."""

    isLeaf = True

    def __init__(self, api: ReadApi) -> None:
        super().__init__()
        self.api = api

    def render(self, request: server.Request) -> Any:
        method = request.method.decode("latin-1")
        if method == "HEAD":
            method = "GET"
        path = request.path.decode("utf-8", "replace").rstrip("/") or "/"
        body = request.content.getvalue() if request.content is not None else b""
        call = self.api.handle(method, path, request.args or {}, credentials_of(request), body, source_of(request))
        d = Deferred.fromCoroutine(call)

        def done(doc: Any) -> bytes:
            return json_answer(request, getattr(doc, "status", 200), doc)

        def failed(f: Failure) -> bytes:
            e = f.value
            if isinstance(e, ApiError):
                status = STATUS.get(e.code, 400)
                if status == 405:
                    allowed = self.api.allowed(path) or "GET"
                    allowed = allowed.replace("GET", "GET, HEAD")
                    request.setHeader(b"allow", allowed.encode())
                return json_answer(request, status, error_body(e.code, e.message), e.retry_after)
            if isinstance(e, (StoreUnavailable, StoreOverloaded)):
                return json_answer(request, 503, error_body("database_unavailable", e.message), 5)
            log.failure("read API request failed", f)
            return json_answer(request, 500, error_body("internal_error", "the gateway failed; retry later"))

        d.addCallbacks(done, failed)
        return answer_later(request, d)
