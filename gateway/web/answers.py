"""JSON answers over twisted.web, shared by every HTTP face (ingest, health, the read API)."""

from __future__ import annotations

import json
from typing import Any

from twisted.web import server


def json_answer(request: server.Request, status: int, doc: dict[str, Any], retry_after: int | None = None) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    if retry_after is not None:
        request.setHeader(b"retry-after", str(retry_after).encode())
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def error_body(code: str, message: str) -> dict[str, str]:
    return {"error": code, "message": message}


def answer_later(request: server.Request, d: Any) -> Any:
    """Write the bytes d fires with, unless the client has gone meanwhile."""
    gone: list[Any] = []
    request.notifyFinish().addBoth(gone.append)

    def write(body: bytes) -> None:
        if not gone:
            request.write(body)
            request.finish()

    d.addCallback(write)
    return server.NOT_DONE_YET


def bearer_token(request: server.Request) -> str | None:
    value = request.getHeader(b"authorization")
    if not value:
        return None
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip().decode("latin-1") or None


def same_origin(request: server.Request) -> bool:
    """
    False when the browser says the request comes from a page of another origin (Origin, or
    Sec-Fetch-Site); True when it says nothing (a program, not a browser) or names this host.
    """
    site = request.getHeader(b"sec-fetch-site")
    if site is not None and site not in (b"same-origin", b"none"):
        return False
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    host = request.getHeader(b"host") or b""
    scheme = b"https" if request.isSecure() else b"http"
    return origin == scheme + b"://" + host
