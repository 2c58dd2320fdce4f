"""
An OpenID Connect provider for the tests, on a loopback port: a JWKS
endpoint that counts its fetches, an authorization endpoint that signs the
configured user in at once, and a token endpoint that checks the PKCE
verifier against the challenge. Tokens are signed with RSA keys made here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from typing import Any
from urllib.parse import urlencode

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import reactor
from twisted.web import resource, server

CLIENT_ID = "txgateway-dashboard"
AUDIENCE = "txgateway"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Provider:
    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}
        self.published: list[str] = []
        self.add_key("k1")
        self.jwks_fetches = 0
        self.codes: dict[str, dict[str, Any]] = {}
        self.token_requests: list[dict[str, str]] = []
        self.user: dict[str, Any] = {"sub": "u-1", "preferred_username": "maria", "groups": ["gateway-admins"]}
        root = resource.Resource()
        for name, child in (("jwks", _Jwks(self)), ("authorize", _Authorize(self)), ("token", _Token(self))):
            root.putChild(name.encode(), child)
        self.port = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"

    def add_key(self, kid: str, publish: bool = True, curve: ec.EllipticCurve | None = None) -> None:
        """An RSA signing key, or an EC one on ``curve`` (published with alg ES256 for P-256)."""
        if curve is None:
            self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            self.keys[kid] = ec.generate_private_key(curve)
        if publish:
            self.published.append(kid)

    def public_pem(self, kid: str) -> bytes:
        return (
            self.keys[kid]
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        return {"iss": self.url, "aud": AUDIENCE, "iat": now, "exp": now + 600, **self.user, **changes}

    def alg(self, kid: str) -> str:
        return "ES256" if isinstance(self.keys[kid], ec.EllipticCurvePrivateKey) else "RS256"

    def token(
        self, kid: str = "k1", alg: str | None = None, headers: dict[str, Any] | None = None, **changes: Any
    ) -> str:
        """A token signed with key ``kid``; ``alg`` names another algorithm in the header, as an attacker would."""
        key = self.keys[kid]
        alg = alg or self.alg(kid)
        header = b64(json.dumps({"alg": alg, "kid": kid, "typ": "JWT", **(headers or {})}).encode())
        payload = b64(json.dumps(self.claims(**changes)).encode())
        signer = jwt.get_algorithm_by_name(self.alg(kid))
        signature = signer.sign(f"{header}.{payload}".encode(), key)
        return f"{header}.{payload}.{b64(signature)}"

    def unsigned(self, alg: str, secret: bytes | None = None, **changes: Any) -> str:
        """A token PyJWT would not make: alg=none, or HMAC keyed with ``secret`` (a public key)."""
        header = b64(json.dumps({"alg": alg, "kid": "k1", "typ": "JWT"}).encode())
        payload = b64(json.dumps(self.claims(**changes)).encode())
        signing_input = f"{header}.{payload}".encode()
        if secret is None:
            return f"{header}.{payload}."
        import hmac

        return f"{header}.{payload}.{b64(hmac.new(secret, signing_input, hashlib.sha256).digest())}"

    def settings(self, **changes: Any) -> dict[str, Any]:
        """[oidc] for the gateway's config."""
        return {
            "issuer": self.url,
            "jwks_url": self.url + "/jwks",
            "audience": AUDIENCE,
            "client_id": CLIENT_ID,
            "roles_claim": "groups",
            "roles": {"admin": ["gateway-admins"], "operator": ["gateway-operators"], "reader": ["gateway-readers"]},
            "name": "Plant SSO",
            "authorization_endpoint": self.url + "/authorize",
            "token_endpoint": self.url + "/token",
            **changes,
        }

    def close(self) -> Any:
        return self.port.stopListening()


class _Jwks(resource.Resource):
    isLeaf = True

    def __init__(self, provider: Provider) -> None:
        super().__init__()
        self.provider = provider

    def render_GET(self, request: server.Request) -> bytes:
        self.provider.jwks_fetches += 1
        keys = []
        for kid in self.provider.published:
            key = self.provider.keys[kid]
            alg = self.provider.alg(kid)
            family = jwt.algorithms.ECAlgorithm if alg == "ES256" else jwt.algorithms.RSAAlgorithm
            jwk = json.loads(family.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": alg})
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"keys": keys}).encode()


class _Authorize(resource.Resource):
    """Signs the provider's user in at once and sends the browser back with a code."""

    isLeaf = True

    def __init__(self, provider: Provider) -> None:
        super().__init__()
        self.provider = provider

    def render_GET(self, request: server.Request) -> bytes:
        args = {k.decode(): v[0].decode() for k, v in (request.args or {}).items()}
        assert args["response_type"] == "code" and args["code_challenge_method"] == "S256", args
        code = secrets.token_urlsafe(16)
        self.provider.codes[code] = args
        request.redirect(f"{args['redirect_uri']}?{urlencode({'code': code, 'state': args['state']})}".encode())
        return b""


class _Token(resource.Resource):
    """The code and the PKCE verifier in, tokens out; a code works once."""

    isLeaf = True

    def __init__(self, provider: Provider) -> None:
        super().__init__()
        self.provider = provider

    def render_POST(self, request: server.Request) -> bytes:
        form = {k.decode(): v[0].decode() for k, v in (request.args or {}).items()}
        self.provider.token_requests.append(form)
        request.setHeader(b"content-type", b"application/json")
        started = self.provider.codes.pop(form.get("code", ""), None)
        challenge = b64(hashlib.sha256(form.get("code_verifier", "").encode()).digest())
        if (
            started is None
            or form.get("grant_type") != "authorization_code"
            or form.get("redirect_uri") != started["redirect_uri"]
            or form.get("client_id") != started["client_id"]
            or challenge != started["code_challenge"]
        ):
            request.setResponseCode(400)
            return json.dumps({"error": "invalid_grant"}).encode()
        p = self.provider
        return json.dumps(
            {
                "id_token": p.token(aud=CLIENT_ID, nonce=started["nonce"]),
                "access_token": p.token(),
                "token_type": "Bearer",
                "expires_in": 600,
            }
        ).encode()
