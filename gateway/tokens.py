"""
Device tokens. A token is ``<id>.<secret>``: the id (16 hex digits) finds
the device row, the secret (256 random bits) proves possession. Only
SHA-256 of the secret is stored; a high-entropy secret needs no slow hash.
Comparison is constant-time, and an unknown id costs the same comparison
against a dummy digest, so answers do not tell a wrong id from a wrong
secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

_TOKEN = re.compile(r"([0-9a-f]{16})\.([A-Za-z0-9_-]{43})\Z")
_DUMMY = hashlib.sha256(b"no such token").digest()


@dataclass(frozen=True)
class NewToken:
    token: str  # shown once to the operator, never stored
    token_id: str
    digest: bytes  # stored


def new_token() -> NewToken:
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return NewToken(f"{token_id}.{secret}", token_id, digest(secret))


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret), or None when the text cannot be a token."""
    m = _TOKEN.match(token)
    return (m.group(1), m.group(2)) if m else None


def secret_matches(secret: str, stored: bytes | None) -> bool:
    return hmac.compare_digest(digest(secret), stored if stored is not None else _DUMMY) and stored is not None
