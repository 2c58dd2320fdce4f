"""
Device tokens. A token is ``<id>.<secret>``: the id (16 hex digits) finds
the device row for HTTPS, the secret (256 random bits) proves possession.

What is stored is a *stored key*, as in SCRAM (RFC 5802)::

    client_key = HMAC-SHA256(key=token, msg="txgateway client key")
    stored_key = SHA-256(client_key)

HTTPS presents the token itself; the gateway derives the stored key and
compares. The binary protocol never sends the token: the device proves it
knows ``client_key`` for the gateway's nonce (see ``auth_proof``), and the
gateway checks the proof against the stored key. The stored key alone
cannot produce a proof, so a copy of the database does not let anyone
pose as a device. Comparisons are constant-time, and an unknown id costs
the same comparison against a dummy key, so answers do not tell a wrong
id from a wrong secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

_TOKEN = re.compile(r"([0-9a-f]{16})\.([A-Za-z0-9_-]{43})\Z")
CLIENT_KEY_LABEL = b"txgateway client key"
AUTH_LABEL = b"txgateway auth v1\x00"
_DUMMY = hashlib.sha256(b"no such device").digest()


@dataclass(frozen=True)
class NewToken:
    token: str  # shown once to the operator, never stored
    token_id: str
    digest: bytes  # the stored key


def new_token() -> NewToken:
    token_id = secrets.token_hex(8)
    token = f"{token_id}.{secrets.token_urlsafe(32)}"
    return NewToken(token, token_id, stored_key(client_key(token)))


def client_key(token: str) -> bytes:
    return hmac.new(token.encode("ascii"), CLIENT_KEY_LABEL, hashlib.sha256).digest()


def stored_key(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret), or None when the text cannot be a token."""
    m = _TOKEN.match(token)
    return (m.group(1), m.group(2)) if m else None


def token_matches(token: str, stored: bytes | None) -> bool:
    """Does a bearer token belong to this stored key? Constant-time."""
    derived = stored_key(client_key(token))
    same = hmac.compare_digest(derived, stored if stored is not None else _DUMMY)
    return same and stored is not None


def _auth_message(nonce: bytes, device: str) -> bytes:
    return AUTH_LABEL + nonce + device.encode("utf-8")


def auth_proof(token: str, nonce: bytes, device: str) -> bytes:
    """What a device sends in AUTH: client_key XOR HMAC(stored_key, nonce ‖ name)."""
    key = client_key(token)
    signature = hmac.new(stored_key(key), _auth_message(nonce, device), hashlib.sha256).digest()
    return bytes(a ^ b for a, b in zip(key, signature))


def proof_matches(proof: bytes, stored: bytes | None, nonce: bytes, device: str) -> bool:
    """Check an AUTH proof against the stored key. Constant-time."""
    key = stored if stored is not None else _DUMMY
    signature = hmac.new(key, _auth_message(nonce, device), hashlib.sha256).digest()
    if len(proof) != len(signature):
        return False
    candidate = bytes(a ^ b for a, b in zip(proof, signature))
    return hmac.compare_digest(hashlib.sha256(candidate).digest(), key) and stored is not None
