"""
Dashboard sessions: an API token, or a sign-in through the OIDC provider,
exchanged for a cookie the browser keeps and script cannot read.

The cookie holds ``id.secret``; the database holds the id, a hash of the
secret, the role, a CSRF token and when the session expires. Every request
made with the cookie is checked against that row, so a session ends at
once when it expires, when ``gatewayctl session revoke`` revokes it, or when
the API token it came from is revoked, on every gateway sharing the
database (the provider's sign-outs do not reach it: its sessions last their
12 hours, or until the token pasted in expires). Requests that change something (POST, DELETE) must also carry the
session's CSRF token in ``X-CSRF-Token``: a page of another site can make a
browser send the cookie (SameSite=Strict already stops that in current
browsers), but it cannot read the token.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from gateway import tokens

SESSION_SECONDS = 12 * 3600  # a session lasts a working day, then the user signs in again
COOKIE = b"__Host-gateway-session"  # __Host-: Secure, Path=/, no Domain, so no other host can set it
TOUCH_EVERY = 60.0  # last_used is written at most this often per session

NEW_SESSION = """
INSERT INTO ui_sessions (id, secret_hash, csrf, role, token_id, subject, address, expires_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, now() + %s * interval '1 second')
RETURNING (extract(epoch FROM expires_at) * 1000000)::bigint
"""
FIND_SESSION = """
SELECT s.role, s.secret_hash, s.csrf, s.subject, (extract(epoch FROM s.expires_at) * 1000000)::bigint,
       s.expires_at > now() AND s.revoked_at IS NULL AND (t.id IS NULL OR t.revoked_at IS NULL)
FROM ui_sessions s LEFT JOIN api_tokens t ON t.id = s.token_id
WHERE s.id = %s
"""
TOUCH = "UPDATE ui_sessions SET last_used = now() WHERE id = %s"
END_SESSION = "UPDATE ui_sessions SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL"
# Sessions that ended more than a week ago are forgotten when a new one begins.
FORGET_OLD = "DELETE FROM ui_sessions WHERE expires_at < now() - interval '7 days'"


@dataclass(frozen=True)
class Session:
    id: str
    role: str
    csrf: str
    subject: str  # who signed in: the API token's name
    expires_us: int


@dataclass(frozen=True)
class NewSession:
    session: Session
    cookie: str  # id.secret, for the Set-Cookie header only
    seconds: float  # how long it lasts (the cookie's Max-Age)


class Sessions:
    """Sessions in the database, on the read API's pool."""

    def __init__(self, pool: Any, clock: IReactorTime, seconds: float = SESSION_SECONDS) -> None:
        self.pool = pool
        self.clock = clock
        self.seconds = seconds
        self._touched: dict[str, float] = {}

    def _query(self, sql: str, params: Any) -> Deferred:
        return self.pool.run(lambda c: c.runQuery(sql, params))

    async def begin(
        self, role: str, subject: str, token_id: int | None, address: str | None, until: float | None = None
    ) -> NewSession:
        """A new session; it ends after ``seconds``, or at ``until`` (epoch seconds: a provider's token) if sooner."""
        made = tokens.new_token()
        csrf = secrets.token_urlsafe(32)
        seconds = self.seconds if until is None else max(0.0, min(self.seconds, until - self.clock.seconds()))
        await self.pool.run(lambda c: c.runOperation(FORGET_OLD))
        rows = await self._query(
            NEW_SESSION, (made.token_id, made.digest, csrf, role, token_id, subject, address, seconds)
        )
        return NewSession(Session(made.token_id, role, csrf, subject, int(rows[0][0])), made.token, seconds)

    async def find(self, cookie: str | None) -> Session | None:
        """The live session this cookie belongs to, or None (unknown, expired, revoked, or its token revoked)."""
        # The same shape as a token: 16 hex digits, a dot, 43 characters.
        parts = tokens.split_token(cookie) if cookie else None
        if parts is None or cookie is None:
            return None
        rows = await self._query(FIND_SESSION, (parts[0],))
        if not rows:
            tokens.token_matches(cookie, None)  # the same work as for a known id
            return None
        role, digest, csrf, subject, expires_us, live = rows[0]
        if not tokens.token_matches(cookie, bytes(digest)) or not live:
            return None
        now = self.clock.seconds()
        if now - self._touched.get(parts[0], 0.0) >= TOUCH_EVERY:
            if len(self._touched) > 10_000:
                self._touched.clear()
            self._touched[parts[0]] = now
            await self.pool.run(lambda c: c.runOperation(TOUCH, (parts[0],)))
        return Session(parts[0], str(role), str(csrf), str(subject), int(expires_us))

    async def end(self, session_id: str) -> None:
        await self.pool.run(lambda c: c.runOperation(END_SESSION, (session_id,)))
        self._touched.pop(session_id, None)


def csrf_matches(session: Session, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(session.csrf.encode(), given.encode("utf-8", "replace"))
