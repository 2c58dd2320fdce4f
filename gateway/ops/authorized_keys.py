"""
The console's authorized_keys, as OpenSSH reads them: the key types it takes,
from= patterns and expiry-time= options, and a file re-read when it changes, so
that a key added or removed takes effect at the next login without a restart.
"""

from __future__ import annotations

from twisted.logger import Logger

import calendar
import fnmatch
import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh import keys
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

log = Logger()


# User key signature algorithms taken (server-sig-algs, RFC 8308): no SHA-1 (ssh-rsa, ssh-dss).
USER_KEY_ALGORITHMS = (
    b"ssh-ed25519",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
    b"rsa-sha2-512",
    b"rsa-sha2-256",
)


# authorized_keys options that ask for nothing this console would do anyway: it forwards nothing and runs no rc.
IMPLIED_OPTIONS = frozenset({"no-port-forwarding", "no-agent-forwarding", "no-x11-forwarding", "no-user-rc"})


@dataclass(frozen=True)
class AuthorizedKey:
    """One usable line of authorized_keys: the key, and where and until when it may log in."""

    key: keys.Key
    comment: str
    sources: tuple[str, ...] = ()  # from="...": patterns; empty for anywhere
    expires: float | None = None  # expiry-time="...": epoch seconds

    def allows(self, peer: str | None, now: float) -> str | None:
        """None if a login from ``peer`` may use this key now, else why not."""
        if self.expires is not None and now >= self.expires:
            return "the key's expiry-time has passed"
        if self.sources and not _from_allows(self.sources, peer):
            return f"from={','.join(self.sources)!r} does not allow {peer}"
        return None


def _from_allows(patterns: tuple[str, ...], peer: str | None) -> bool:
    """OpenSSH's from= on the client's address: a negated match refuses, otherwise any match allows."""
    if peer is None:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    allowed = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        if "/" in body:
            try:
                matched = address in ipaddress.ip_network(body, strict=False)
            except ValueError:
                matched = False
        else:
            matched = fnmatch.fnmatchcase(str(address), body)
        if matched and negated:
            return False
        allowed = allowed or matched
    return allowed


def _split_options(line: str) -> tuple[list[str], str]:
    """
    A line's leading options and what follows them: comma-separated up to the first space outside double
    quotes, where values may hold commas, spaces and backslash-escaped characters.
    """
    options, current, quoted, i = [], [], False, 0
    while i < len(line):
        c = line[i]
        if c == "\\" and quoted and i + 1 < len(line):
            current.append(line[i + 1])
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            options.append("".join(current))
            current = []
        elif c.isspace() and not quoted:
            break
        else:
            current.append(c)
        i += 1
    if quoted:
        raise ValueError("an option's quotes are not closed")
    options.append("".join(current))
    return options, line[i:]


def _expiry(value: str) -> float:
    """expiry-time: YYYYMMDD[HHMM[SS]], local time as OpenSSH reads it (a trailing Z: UTC)."""
    utc = value.endswith("Z")
    digits = value[:-1] if utc else value
    if not digits.isdigit() or len(digits) not in (8, 12, 14):
        raise ValueError(f"expiry-time {value!r} is not YYYYMMDD[HHMM[SS]]")
    parts = time.strptime(digits.ljust(14, "0"), "%Y%m%d%H%M%S")
    return float(calendar.timegm(parts)) if utc else time.mktime(parts)


def parse_authorized_key(line: str) -> AuthorizedKey:
    """One line of an OpenSSH authorized_keys file; ValueError saying why it cannot be used."""
    fields = line.split(None, 1)
    options: list[str] = []
    if fields and not _looks_like_key_type(fields[0]):
        options, rest_of_line = _split_options(line)
        fields = rest_of_line.split(None, 1)
    if not fields:
        raise ValueError("no key")
    rest = fields[1].split(None, 1) if len(fields) > 1 else []
    if not rest:
        raise ValueError("no key data after the key type")
    try:
        key = keys.Key.fromString(f"{fields[0]} {rest[0]}".encode())
    except (keys.BadKeyError, ValueError, IndexError) as e:
        raise ValueError(f"the key cannot be read: {e}") from None
    sources: tuple[str, ...] = ()
    expires = None
    for option in options:
        name, _, value = option.partition("=")
        name = name.strip().lower()
        if name in IMPLIED_OPTIONS:
            continue
        if name == "from" and value:
            sources = tuple(p.strip() for p in value.split(",") if p.strip())
        elif name == "expiry-time" and value:
            expires = _expiry(value)
        else:
            raise ValueError(f"option {name!r} is not supported by the console (from= and expiry-time= are)")
    return AuthorizedKey(key, rest[1].strip() if len(rest) > 1 else "", sources, expires)


def _looks_like_key_type(word: str) -> bool:
    return word.startswith(("ssh-", "ecdsa-", "sk-"))


def fingerprint(key: keys.Key) -> str:
    """As ssh and ssh-keygen -l show it."""
    return "SHA256:" + key.fingerprint(format=keys.FingerprintFormats.SHA256_BASE64).rstrip("=")


@implementer(ICredentialsChecker)
class AuthorizedKeys:
    """
    The keys of one OpenSSH authorized_keys file, for any user name, read at each login; the checker that
    lets a login in only with one of them, from where and until when its line allows, signed with SHA-2.
    """

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, path: Path, now: Callable[[], float] = time.time) -> None:
        self.path = path
        self.now = now
        self._told: set[str] = set()  # lines whose refusal was logged already

    def entries(self) -> list[AuthorizedKey]:
        try:
            text = self.path.read_text("utf-8", "replace")
        except OSError as e:
            log.warn("console: {path} cannot be read: {error}", path=str(self.path), error=e.strerror)
            return []
        found = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                found.append(parse_authorized_key(line))
            except ValueError as e:
                if line not in self._told and len(self._told) < 1000:
                    self._told.add(line)
                    log.warn(
                        "console: {path} line {number} is not used: {why}", path=str(self.path), number=number, why=e
                    )
        return found

    def count(self) -> int:
        return len(self.entries())

    def requestAvatarId(self, credentials: Any) -> Deferred:
        peer = getattr(credentials, "peer", None)
        try:
            key = keys.Key.fromString(credentials.blob)
        except keys.BadKeyError:
            return fail(UnauthorizedLogin("not a key"))
        if credentials.algName not in USER_KEY_ALGORITHMS:
            log.warn(
                "console: {peer} offered a {algorithm} signature, not taken (SHA-1)",
                peer=peer,
                algorithm=credentials.algName.decode("ascii", "replace"),
            )
            return fail(UnauthorizedLogin("signature algorithm not taken"))
        listed = [entry for entry in self.entries() if entry.key == key]
        if not listed:
            return fail(UnauthorizedLogin("key not authorized"))
        reasons = [entry.allows(peer, self.now()) for entry in listed]
        if all(reasons):
            # A listed key is an operator's: saying why it was refused is worth a line each time.
            log.warn(
                "console: key {fingerprint} refused for {peer}: {why}",
                fingerprint=fingerprint(key),
                peer=peer,
                why=reasons[0],
            )
            return fail(UnauthorizedLogin("key not allowed here or now"))
        if not credentials.signature:
            return fail(ValidPublicKey())
        try:
            verified = key.verify(credentials.signature, credentials.sigData)
        except Exception:
            verified = False
        if not verified:
            return fail(UnauthorizedLogin("bad signature"))
        entry = listed[reasons.index(None)]
        log.info(
            "console: {user} logged in from {peer} with key {fingerprint} {comment}",
            user=credentials.username.decode("utf-8", "replace"),
            peer=peer,
            fingerprint=fingerprint(key),
            comment=entry.comment,
        )
        return succeed(credentials.username)
