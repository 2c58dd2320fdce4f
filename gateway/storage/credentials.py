"""
Device credentials as the store checks them: a token (HTTPS) or a stored
key for the TGP challenge.

Three memories, each bounded. ``_rows``: the devices row of a token id,
for AUTH_CACHE_TTL seconds, so a burst of requests is one query; a
revocation takes effect within that time (at once on the gateway that is
told by NOTIFY: ``forget``). ``_proven``: whole tokens proven within the
same time, so a device sending request after request skips the key
derivation (7% of a one-reading request's CPU). ``_known_tokens`` and
``_known_keys``: the last answer the database gave per token id and per
name, used only while the database cannot be reached and only when the
store has a journal to acknowledge into; a revoked device is remembered
as unknown.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from gateway import tokens
from gateway.readings import Device, StoreOverloaded, StoreUnavailable

AUTH_CACHE_TTL = 1.0  # a revoked token stops working within this many seconds
AUTH_CACHE_SIZE = 10_000
KNOWN_DEVICES = 100_000  # credentials remembered for use while the database is away

FIND_DEVICE = "SELECT id, name, token_hash, revoked_at IS NOT NULL, device_type FROM devices WHERE token_id = %s"
FIND_DEVICE_BY_NAME = "SELECT id, token_hash, revoked_at IS NOT NULL, device_type FROM devices WHERE name = %s"
_DUMMY_TOKEN = "0" * 16 + "." + "A" * 43


# The devices, for the known-devices snapshot: never a token, only what checks one (and for a
# revoked device not even that: only that its token id is refused).
DEVICES = (
    "SELECT id, name, token_id, CASE WHEN revoked_at IS NULL THEN token_hash ELSE '' END, device_type, "
    "revoked_at IS NOT NULL FROM devices ORDER BY id LIMIT %s"
)


@dataclass(frozen=True)
class KnownDevice:
    id: int
    name: str
    token_id: str
    token_hash: bytes  # SHA-256 of the client key: checks a token or a TGP proof, gives neither; b"" if revoked
    type: str | None
    revoked: bool = False


class Credentials:
    def __init__(self, query: Callable[[str, tuple], Deferred], clock: IReactorTime, remember: bool) -> None:
        self._query = query
        self._clock = clock
        self._remember_for_outages = remember
        self._rows: dict[str, tuple[float, Any]] = {}
        self._proven: dict[str, tuple[float, Device]] = {}
        self._known_tokens: dict[str, Any] = {}
        self._known_keys: dict[str, tuple[Device, bytes]] = {}

    def authenticate(self, token: str) -> Deferred:
        hit = self._proven.get(token)
        if hit is not None and hit[0] > self._clock.seconds():
            return succeed(hit[1])
        return Deferred.fromCoroutine(self._authenticate(token))

    async def _authenticate(self, token: str) -> Device | None:
        parts = tokens.split_token(token)
        if parts is None:
            tokens.token_matches(_DUMMY_TOKEN, None)
            return None
        token_id = parts[0]
        now = self._clock.seconds()
        cached = self._rows.get(token_id)
        if cached is not None and cached[0] > now:
            row = cached[1]
        else:
            try:
                rows = await self._query(FIND_DEVICE, (token_id,))
            except (StoreUnavailable, StoreOverloaded):
                row = self._known_tokens.get(token_id) if self._remember_for_outages else None
                if row is None:
                    raise
            else:
                # The hash as bytes: psycopg2 gives a view that keeps its whole result buffer alive, and the
                # row is remembered (a few hundred bytes less per device, 10,000 of them being the norm).
                row = (*rows[0][:2], bytes(rows[0][2]), *rows[0][3:]) if rows else None
                remember(self._known_tokens, token_id, row if row is not None and not row[3] else None)
                cache(self._rows, token_id, (now + AUTH_CACHE_TTL, row), now)
        if row is None or row[3]:
            tokens.token_matches(token, None)
            return None
        if not tokens.token_matches(token, row[2]):
            return None
        device = Device(row[0], row[1], row[4])
        cache(self._proven, token, (now + AUTH_CACHE_TTL, device), now)
        return device

    def device_key(self, name: str) -> Deferred:
        return Deferred.fromCoroutine(self._device_key(name))

    async def _device_key(self, name: str) -> tuple[Device, bytes] | None:
        try:
            rows = await self._query(FIND_DEVICE_BY_NAME, (name,))
        except (StoreUnavailable, StoreOverloaded):
            known = self._known_keys.get(name) if self._remember_for_outages else None
            if known is None:
                raise
            return known
        if not rows or rows[0][2]:
            remember(self._known_keys, name, None)
            return None
        device_id, stored, _, device_type = rows[0]
        found = Device(device_id, name, device_type), bytes(stored)
        remember(self._known_keys, name, found)
        return found

    def forget(self, names: list[str] | None = None) -> None:
        """
        Devices changed (revoked, rotated): look every token up again, and stop
        knowing the named devices for outages at once (None: every device; the
        next refresh of the known devices brings back those still active).
        """
        self._rows.clear()
        self._proven.clear()
        if names is None:
            self._known_tokens.clear()
            self._known_keys.clear()
            return
        gone = set(names)
        for token_id in [t for t, row in self._known_tokens.items() if row is not None and row[1] in gone]:
            del self._known_tokens[token_id]
        for name in gone:
            self._known_keys.pop(name, None)

    def know(self, devices: list[KnownDevice]) -> None:
        """The devices as the database (or the last snapshot of it) lists them: what an outage falls back on."""
        tokens: dict[str, Any] = {}
        keys: dict[str, tuple[Device, bytes]] = {}
        for d in devices[:KNOWN_DEVICES]:
            tokens[d.token_id] = (d.id, d.name, d.token_hash, d.revoked, d.type)
            if not d.revoked:
                keys[d.name] = (Device(d.id, d.name, d.type), d.token_hash)
        self._known_tokens, self._known_keys = tokens, keys

    @property
    def known(self) -> int:
        return len(self._known_keys)


def remember(table: dict[str, Any], key: str, value: Any, limit: int = KNOWN_DEVICES) -> None:
    """Keep (or with None, forget) the latest answer for key, newest last, within ``limit`` keys."""
    table.pop(key, None)
    if value is None:
        return
    if len(table) >= limit:
        table.pop(next(iter(table)))
    table[key] = value


def cache(table: dict[str, tuple[float, Any]], key: str, entry: tuple[float, Any], now: float) -> None:
    """
    Keep ``entry`` (its expiry first) under ``key``, newest last, within AUTH_CACHE_SIZE keys. Entries share
    one lifetime, so the oldest are the expired: those at the front go, and an idle fleet holds none.
    """
    table.pop(key, None)
    while table:
        oldest = next(iter(table))
        if table[oldest][0] > now and len(table) < AUTH_CACHE_SIZE:
            break
        del table[oldest]
    table[key] = entry
