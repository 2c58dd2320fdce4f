"""
Single sign-on: bearer JWTs from an OpenID Connect provider (Keycloak,
Entra ID, Okta, Auth0, Cognito, ...) on the read API and the dashboard.

Tokens are verified here, with the provider's public keys (its JWKS),
never by asking the provider: signature, issuer, audience (or, for
Cognito-style access tokens, the ``client_id`` claim), expiry. Only
asymmetric algorithms are taken (RS*, PS*, ES*, EdDSA): ``alg=none`` and
HMAC are refused whatever the key, so a public key can never be used as an
HMAC secret. The keys are fetched with treq at start and cached; a token
signed with a key not in the cache (the provider rotated its keys) makes
the gateway fetch them again, at most once a minute. The role comes from
a claim (``groups``, ``roles``, ``realm_access.roles``, ``cognito:groups``,
...) whose values ``[oidc.roles]`` maps to reader, operator and admin.

With ``client_id``, ``authorization_endpoint`` and ``token_endpoint`` the
dashboard also signs in through the provider: the authorization-code flow
with PKCE (S256). The state, the PKCE verifier and the nonce travel in a
short-lived HttpOnly cookie of the gateway's own, so any gateway behind a
load balancer can finish a sign-in another began.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from gateway.reactor import Reactor
from gateway.net.httpclient import QuietPool, VerifyingPolicy
from gateway.tables import known_keys
from gateway.trust import ca_file, loopback, secret_value, trust_root

if TYPE_CHECKING:
    import jwt

log = Logger()

# Asymmetric signatures only: never "none", never HMAC (whose "secret" could be the public key).
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
REFETCH_AFTER = 60.0  # an unknown key id fetches the JWKS again at most this often
MAX_AGE = 3600.0  # the JWKS is fetched again when this old, at the next token
LEEWAY = 30  # seconds of clock difference allowed on exp, nbf and iat
MAX_DOCUMENT = 1024 * 1024  # a JWKS or a token endpoint's answer
TIMEOUT = 10.0
FLOW_SECONDS = 600  # a sign-in through the provider must come back within this
FLOW_COOKIE = b"__Host-gateway-oidc"


class OidcError(Exception):
    """A token or a sign-in that is not let in: ``code`` unauthorized (who?) or forbidden (no role)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    jwks_url: str
    audience: str | None
    client_id: str | None
    roles_claim: str
    admin: tuple[str, ...]
    reader: tuple[str, ...]
    operator: tuple[str, ...] = ()
    name: str = "single sign-on"
    authorization_endpoint: str | None = None
    token_endpoint: str | None = None
    client_secret: str | None = None
    redirect_uri: str | None = None
    scope: str = "openid"
    ca: Path | None = None

    @property
    def signs_in(self) -> bool:
        """Does the dashboard offer the provider's sign-in (the authorization-code flow)?"""
        return bool(self.client_id and self.authorization_endpoint and self.token_endpoint)


def _url(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key}: give an https:// URL")
    parts = urlsplit(value)
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback(parts.hostname or "")):
        raise ValueError(f"{key}: {value!r} is not an https:// URL (http:// only on loopback)")
    return value


def _names(key: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
        raise ValueError(f"{key}: give a claim value or a list of them")
    return tuple(items)


def oidc_from_table(table: Any, environ: Mapping[str, str]) -> OidcSettings:
    """[oidc] of the config file; ValueError naming the key when something is wrong."""
    if not isinstance(table, dict):
        raise ValueError("give [oidc] as a table")
    known = {
        "issuer", "jwks_url", "audience", "client_id", "roles_claim", "roles", "name", "authorization_endpoint",
        "token_endpoint", "client_secret", "redirect_uri", "scope", "ca",
    }  # fmt: skip
    table = {k.replace("-", "_"): v for k, v in table.items()}
    known_keys(table, known)
    for key in ("issuer", "jwks_url"):
        if key not in table:
            raise ValueError(f"{key}: required")
    if not table.get("audience") and not table.get("client_id"):
        raise ValueError("audience: give the audience your tokens carry, or client_id for tokens without one")
    roles = table.get("roles")
    if not isinstance(roles, dict) or not set(roles) <= {"admin", "operator", "reader"} or not roles:
        raise ValueError('roles: give [oidc.roles] with admin = ["..."], operator = ["..."] and/or reader = ["..."]')
    claim = table.get("roles_claim", "groups")
    if not isinstance(claim, str) or not claim:
        raise ValueError("roles_claim: give the claim holding the roles, such as groups or realm_access.roles")
    settings = OidcSettings(
        issuer=str(table["issuer"]),
        jwks_url=_url("jwks_url", table["jwks_url"]),
        audience=str(table["audience"]) if table.get("audience") else None,
        client_id=str(table["client_id"]) if table.get("client_id") else None,
        roles_claim=claim,
        admin=_names("roles.admin", roles.get("admin", [])),
        reader=_names("roles.reader", roles.get("reader", [])),
        operator=_names("roles.operator", roles.get("operator", [])),
        name=str(table.get("name", "single sign-on")),
        authorization_endpoint=_url("authorization_endpoint", table["authorization_endpoint"])
        if "authorization_endpoint" in table
        else None,
        token_endpoint=_url("token_endpoint", table["token_endpoint"]) if "token_endpoint" in table else None,
        client_secret=secret_value("client_secret", table["client_secret"], environ)
        if "client_secret" in table
        else None,
        redirect_uri=_url("redirect_uri", table["redirect_uri"]) if "redirect_uri" in table else None,
        scope=str(table.get("scope", "openid")),
        ca=ca_file(table["ca"]) if "ca" in table else None,
    )
    if (settings.authorization_endpoint is None) != (settings.token_endpoint is None):
        raise ValueError("authorization_endpoint and token_endpoint go together (the dashboard's sign-in)")
    if settings.authorization_endpoint and not settings.client_id:
        raise ValueError("client_id: the dashboard's sign-in through the provider needs it")
    return settings


@dataclass(frozen=True)
class Identity:
    subject: str  # shown in the dashboard and gatewayctl session list
    role: str
    expires: float  # epoch seconds


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name, or by a dotted path into nested objects (realm_access.roles)."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


class Keys:
    """The provider's signing keys by key id, fetched with treq; refetched when a token names an unknown one."""

    def __init__(self, settings: OidcSettings, reactor: Reactor, clock: IReactorTime | None = None) -> None:
        self.settings = settings
        self.clock = clock or reactor
        self.pool = QuietPool(reactor, persistent=False)
        self.agent = Agent(
            reactor, contextFactory=VerifyingPolicy(trust_root(settings.ca)), connectTimeout=TIMEOUT, pool=self.pool
        )
        self.keys: dict[str | None, jwt.PyJWK] = {}
        self.fetched_at: float | None = None
        self.fetches = 0
        self.last_error: str | None = None
        self._fetching: Deferred | None = None

    async def fetch(self) -> None:
        """Fetch the JWKS now (one fetch at a time; callers during one share it). Never raises."""
        d = self._fetching
        if d is None:
            d = self._fetching = Deferred.fromCoroutine(self._fetch())
            d.addBoth(self._fetched)
        await _share(d)

    def _fetched(self, result: Any) -> Any:
        self._fetching = None
        return result

    async def _fetch(self) -> None:
        import jwt  # PyJWT and the cryptography it needs load only where [oidc] is set

        self.fetches += 1
        self.fetched_at = self.clock.seconds()
        try:
            body = await get_json(self.agent, self.settings.jwks_url)
            listed = body.get("keys") if isinstance(body, dict) else None
            if not isinstance(listed, list):
                raise ValueError("the JWKS has no list of keys")
            signing = [jwk for jwk in listed if isinstance(jwk, dict) and jwk.get("use", "sig") == "sig"]
            try:
                # PyJWT skips the keys it cannot use, and binds each to its algorithm (the JWK's "alg", or the
                # one its type implies), so a token cannot name an RSA key with an EC algorithm or the reverse.
                keyset = jwt.PyJWKSet.from_dict({"keys": signing})
            except jwt.exceptions.PyJWKSetError:
                raise ValueError("the JWKS holds no signing key") from None
            skipped = len(signing) - len(keyset.keys)
            if skipped:
                log.warn("OIDC keys: {skipped} of the provider's signing keys cannot be used", skipped=skipped)
            found: dict[str | None, jwt.PyJWK] = {key.key_id: key for key in keyset.keys}
            self.keys = found
            self.last_error = None
        except Exception as e:
            self.last_error = f"{type(e).__name__}: {e}"[:300]
            log.warn("OIDC keys not fetched from {url}: {error}", url=self.settings.jwks_url, error=self.last_error)

    def status(self) -> dict[str, Any]:
        """For /healthz: how many keys are held, when they were fetched, and the last fetch's error."""
        return {
            "keys": len(self.keys),
            "fetches": self.fetches,
            "seconds_since_fetch": round(self.clock.seconds() - self.fetched_at, 1) if self.fetched_at else None,
            "last_error": self.last_error,
        }

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        now = self.clock.seconds()
        stale = self.fetched_at is None or now - self.fetched_at >= MAX_AGE
        if kid not in self.keys or stale:
            if self.fetched_at is None or now - self.fetched_at >= REFETCH_AFTER:
                await self.fetch()
        if kid is None and len(self.keys) == 1:
            return next(iter(self.keys.values()))
        return self.keys.get(kid)


async def _share(d: Deferred) -> None:
    """Wait for a Deferred that others wait for too, without taking its result from them."""
    mine: Deferred = Deferred()

    def passed(result: Any) -> Any:
        mine.callback(None)
        return result

    d.addBoth(passed)
    await mine


async def get_json(agent: Any, url: str, body: bytes | None = None, headers: dict[bytes, bytes] | None = None) -> Any:
    """GET (or POST ``body``) ``url`` and parse its JSON answer; at most MAX_DOCUMENT bytes, TIMEOUT seconds."""
    import treq

    client = treq.client.HTTPClient(agent)
    all_headers = Headers({b"Accept": [b"application/json"], **{k: [v] for k, v in (headers or {}).items()}})
    if body is None:
        response = await client.get(url, headers=all_headers, timeout=TIMEOUT)
    else:
        response = await client.post(url, data=body, headers=all_headers, timeout=TIMEOUT)
    parts: list[bytes] = []
    size = [0]

    def collect(data: bytes) -> None:
        size[0] += len(data)
        if size[0] > MAX_DOCUMENT:
            raise ValueError(f"the answer of {url} is over {MAX_DOCUMENT} bytes")
        parts.append(data)

    await treq.collect(response, collect)
    text = b"".join(parts)
    if response.code != 200:
        raise ValueError(f"{url} answered {response.code}: {text[:200]!r}")
    return json.loads(text)


class OidcVerifier:
    """Who a bearer JWT names, and with which role; raises OidcError."""

    def __init__(self, settings: OidcSettings, keys: Keys, clock: IReactorTime) -> None:
        self.settings = settings
        self.keys = keys
        self.clock = clock

    @staticmethod
    def looks_like_jwt(token: str) -> bool:
        return token.count(".") == 2 and token.startswith("ey")

    async def identity(self, token: str, audience: str | None = None, nonce: str | None = None) -> Identity:
        """
        Verify ``token`` (for the read API: the configured audience or client_id; for an ID token from the
        sign-in flow: ``audience`` is the client id and ``nonce`` must match).
        """
        import jwt

        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.exceptions.DecodeError:
            raise OidcError("unauthorized", "the bearer token is not a JWT") from None
        except jwt.exceptions.PyJWTError as e:
            raise OidcError("unauthorized", f"the token's header is not valid: {e}") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise OidcError("unauthorized", f"tokens signed with {alg!r} are not accepted")
        kid = header.get("kid")
        key = await self.keys.key(kid if isinstance(kid, str) else None)
        if key is None:
            raise OidcError("unauthorized", f"the token's key {kid!r} is not one of the provider's")
        audience = audience or s.audience
        try:
            # The PyJWK itself, not its raw key: PyJWT then refuses an alg that is not the key's own.
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=audience,
                issuer=s.issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "sub"], "verify_aud": audience is not None},
            )
        except jwt.exceptions.ExpiredSignatureError:
            raise OidcError("unauthorized", "the token has expired; sign in again") from None
        except jwt.exceptions.InvalidAudienceError:
            raise OidcError("unauthorized", "the token is for another audience") from None
        except jwt.exceptions.InvalidIssuerError:
            raise OidcError("unauthorized", "the token is from another issuer") from None
        except jwt.exceptions.InvalidAlgorithmError:
            raise OidcError("unauthorized", f"the token's alg {alg!r} is not that of its key {kid!r}") from None
        except jwt.exceptions.PyJWTError as e:
            raise OidcError("unauthorized", f"the token is not valid: {e}") from None
        if audience is None and claims.get("client_id") != s.client_id:
            raise OidcError("unauthorized", "the token is for another client")
        if nonce is not None and not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
            raise OidcError("unauthorized", "the sign-in's nonce does not match; sign in again")
        role = self.role_of(claims)
        subject = str(
            claims.get("preferred_username") or claims.get("email") or claims.get("username") or claims["sub"]
        )
        if role is None:
            raise OidcError("forbidden", f"{subject} has no role on this gateway (claim {s.roles_claim})")
        return Identity(subject, role, float(claims["exp"]))

    def role_of(self, claims: Mapping[str, Any]) -> str | None:
        value = _claim(claims, self.settings.roles_claim)
        # A claim of another shape (an object, numbers, nested lists) grants nothing.
        listed = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        held = {v for v in listed if isinstance(v, str)}
        if held & set(self.settings.admin):
            return "admin"
        if held & set(self.settings.operator):
            return "operator"
        if held & set(self.settings.reader):
            return "reader"
        return None


@dataclass(frozen=True)
class Flow:
    """One sign-in through the provider under way: what the gateway checks when the browser comes back."""

    state: str
    verifier: str
    nonce: str
    redirect_uri: str

    def cookie(self) -> bytes:
        doc = {"s": self.state, "v": self.verifier, "n": self.nonce, "r": self.redirect_uri}
        return base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).rstrip(b"=")

    @classmethod
    def from_cookie(cls, value: bytes | None) -> Flow | None:
        if not value or len(value) > 2000:
            return None
        try:
            doc = json.loads(base64.urlsafe_b64decode(value + b"=" * (-len(value) % 4)))
            return cls(str(doc["s"]), str(doc["v"]), str(doc["n"]), str(doc["r"]))
        except (ValueError, KeyError, TypeError):
            return None


def begin_flow(settings: OidcSettings, redirect_uri: str) -> tuple[Flow, str]:
    """A new sign-in: its Flow (for the cookie) and the provider's address to send the browser to."""
    flow = Flow(secrets.token_urlsafe(24), secrets.token_urlsafe(48), secrets.token_urlsafe(24), redirect_uri)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(flow.verifier.encode()).digest()).rstrip(b"=").decode()
    assert settings.authorization_endpoint is not None and settings.client_id is not None
    query = urlencode(
        {
            "response_type": "code",
            "client_id": settings.client_id,
            "redirect_uri": redirect_uri,
            "scope": settings.scope,
            "state": flow.state,
            "nonce": flow.nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )
    separator = "&" if "?" in settings.authorization_endpoint else "?"
    return flow, settings.authorization_endpoint + separator + query


async def finish_flow(settings: OidcSettings, keys: Keys, verifier: OidcVerifier, flow: Flow, code: str) -> Identity:
    """Exchange the code (with the PKCE verifier) for tokens, and verify the ID token."""
    assert settings.token_endpoint is not None and settings.client_id is not None
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": flow.redirect_uri,
        "client_id": settings.client_id,
        "code_verifier": flow.verifier,
    }
    headers = {b"Content-Type": b"application/x-www-form-urlencoded"}
    if settings.client_secret is not None:
        pair = f"{settings.client_id}:{settings.client_secret}".encode()
        headers[b"Authorization"] = b"Basic " + base64.b64encode(pair)
    try:
        tokens = await get_json(keys.agent, settings.token_endpoint, urlencode(form).encode(), headers)
    except Exception as e:
        raise OidcError("unauthorized", f"the provider did not give tokens: {e}"[:300]) from None
    id_token = tokens.get("id_token") if isinstance(tokens, dict) else None
    if not isinstance(id_token, str):
        raise OidcError("unauthorized", "the provider's answer holds no id_token")
    try:
        return await verifier.identity(id_token, audience=settings.client_id, nonce=flow.nonce)
    except OidcError as e:
        access = tokens.get("access_token")
        if e.code == "forbidden" and isinstance(access, str) and verifier.looks_like_jwt(access):
            # Some providers (Cognito, Entra ID) put the roles in the access token only.
            return await verifier.identity(access)
        raise


class Oidc:
    """The provider as the gateway uses it: its settings, its keys, the verifier."""

    def __init__(self, settings: OidcSettings, reactor: Reactor, clock: IReactorTime | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings, reactor, clock)
        self.verifier = OidcVerifier(settings, self.keys, clock or reactor)
