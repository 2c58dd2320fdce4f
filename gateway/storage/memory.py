"""IStore in memory: the same contract as PostgresStore, for tests of the transports and the ingest path."""

from __future__ import annotations

import time
from collections.abc import Sequence

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from gateway import tokens
from gateway.readings import Device, Quarantined, Reading, Source, StoreUnavailable, WriteResult
from gateway.storage.interface import IStore


@implementer(IStore)
class MemoryStore:
    """IStore in memory, for tests of the transports and the ingest path."""

    def __init__(self) -> None:
        self.devices: dict[str, tuple[Device, bytes, bool]] = {}
        self.imeis: dict[str, str] = {}  # IMEI -> device name
        self.readings: dict[tuple[int, str, int], float] = {}
        self.rejected: list[tuple[str, str | None, str, bytes]] = []
        self.quarantined: dict[tuple[int, str, int], tuple[float, str]] = {}
        self.conflicts: set[tuple[int, str, int, float]] = set()  # (device id, metric, ts, the other value)
        self.available = True
        self._next_id = 1
        self.sessions: dict[tuple[int, str], tuple[int, float | None]] = {}  # -> (expiry, ended at or None)
        self.now = time.time

    def add_device(self, name: str, device_type: str | None = None, imei: str | None = None) -> str:
        new = tokens.new_token()
        self.devices[new.token_id] = (Device(self._next_id, name, device_type), new.digest, False)
        if imei is not None:
            self.imeis[imei] = name
        self._next_id += 1
        return new.token

    def device_by_imei(self, imei: str) -> Deferred:
        name = self.imeis.get(imei)
        for device, _, revoked in self.devices.values():
            if device.name == name and not revoked:
                return succeed(device)
        return succeed(None)

    def revoke(self, name: str) -> None:
        for token_id, (device, digest, _) in list(self.devices.items()):
            if device.name == name:
                self.devices[token_id] = (device, digest, True)

    def authenticate(self, token: str) -> Deferred:
        parts = tokens.split_token(token)
        if parts is None:
            return succeed(None)
        entry = self.devices.get(parts[0])
        if entry is None or entry[2] or not tokens.token_matches(token, entry[1]):
            return succeed(None)
        return succeed(entry[0])

    def session_begins(self, device_id: int, client_id: str, clean_start: bool, expiry: int) -> Deferred:
        if not self.available:
            return fail(StoreUnavailable("the store is away"))
        old = self.sessions.pop((device_id, client_id), None)
        present = old is not None and (old[1] is None or old[1] + old[0] > self.now())
        if expiry > 0:
            self.sessions[(device_id, client_id)] = (expiry, None)
        return succeed(present and not clean_start)

    def session_ends(self, device_id: int, client_id: str) -> Deferred:
        kept = self.sessions.get((device_id, client_id))
        if kept is not None and kept[1] is None:
            self.sessions[(device_id, client_id)] = (kept[0], self.now())
        return succeed(None)

    def device_key(self, name: str) -> Deferred:
        for device, stored, revoked in self.devices.values():
            if device.name == name and not revoked:
                return succeed((device, stored))
        return succeed(None)

    def write(
        self,
        device: Device,
        readings: Sequence[Reading],
        source: Source | None = None,
        quarantined: Sequence[Quarantined] = (),
    ) -> Deferred:
        if not self.available:
            return fail(StoreUnavailable("database unavailable"))
        return succeed(self._write(device, readings, quarantined))

    def _write(self, device: Device, readings: Sequence[Reading], quarantined: Sequence[Quarantined]) -> WriteResult:
        for q in quarantined:
            self.quarantined.setdefault((device.id, q.reading.metric, q.reading.ts_us), (q.reading.value, q.rule))
        new = dup = conflicts = 0
        for metric, ts_us, value in readings:
            key = (device.id, metric, ts_us)
            if key not in self.readings:
                self.readings[key] = value
                new += 1
            elif self.readings[key] == value:
                dup += 1
            else:
                self.conflicts.add((device.id, metric, ts_us, value))
                conflicts += 1
        return WriteResult(new, dup, (), conflicts)

    def write_many(
        self,
        device: Device,
        parts: Sequence[tuple[Sequence[Reading], Sequence[Quarantined]]],
        source: Source | None = None,
    ) -> Deferred:
        if not self.available:
            return fail(StoreUnavailable("database unavailable"))
        return succeed([self._write(device, readings, quarantined) for readings, quarantined in parts])

    def keep_rejected_input(self, source: Source, reason: str, raw: bytes, device: str | None = None) -> Deferred:
        self.rejected.append((str(source), device, reason, raw))
        return succeed(None)

    def check(self) -> Deferred:
        return succeed(None) if self.available else fail(StoreUnavailable("database unavailable"))

    def has_room(self, size: int) -> bool:
        return True

    def admits(self, size: int) -> bool:
        return True

    def wait_for_room(self) -> Deferred:
        return succeed(None)
