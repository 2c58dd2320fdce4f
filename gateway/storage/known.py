"""
The devices this gateway knows, kept on its own disk, so that a gateway
restarted while the database is away still recognises them and keeps
acknowledging their readings into the journal.

Theory of operation. ``DATA_DIR/known-devices.json`` (mode 0600, written
whole or not at all) lists the devices: id, name, token id, the SHA-256
that checks a token or a TGP proof, and the device type; never a token. Of
a revoked device only that its token id is refused is kept, so it stays
refused (401, REJECT 11) through an outage. It is read at start, before the database answers, into the store's
credentials (used only while the database cannot be reached). It is
rewritten from the database once the gateway is connected, every
``interval`` seconds, and soon after every device change this gateway is
told of (``NOTIFY``): a revoked device is dropped from memory at once and
from the file with the next rewrite, a second or so later.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.readings import counted, is_name
from gateway.storage.credentials import DEVICES, KNOWN_DEVICES, Credentials, KnownDevice
from gateway.files import write_private
from gateway.storage.pool import first_line

log = Logger()

INTERVAL = 300.0
SOON = 1.0  # seconds after a change notice before rewriting (changes in a burst are written once)


def read_snapshot(path: Path) -> list[KnownDevice]:
    """The devices in a snapshot file; [] when there is none. ValueError when it is not one. Blocks."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("devices"), list):
        raise ValueError("not a known-devices file")
    out = []
    for row in doc["devices"]:
        if not (isinstance(row, list) and len(row) == 6):
            raise ValueError("a device entry is not [id, name, token_id, token_hash, type, revoked]")
        id_, name, token_id, digest, kind, revoked = row
        if not (isinstance(id_, int) and is_name(name) and isinstance(token_id, str) and isinstance(digest, str)):
            raise ValueError(f"a device entry is malformed: {row[:2]!r}")
        kind = kind if isinstance(kind, str) else None
        out.append(KnownDevice(id_, name, token_id, bytes.fromhex(digest), kind, revoked is True))
    return out


def write_snapshot(path: Path, devices: list[KnownDevice]) -> None:
    """Write the snapshot whole, mode 0600. Blocks."""
    rows = [[d.id, d.name, d.token_id, d.token_hash.hex(), d.type, d.revoked] for d in devices]
    write_private(path, json.dumps({"version": 1, "devices": rows}, separators=(",", ":")).encode())


class KnownDevices(Service):
    def __init__(
        self,
        path: Path,
        credentials: Credentials,
        query: Callable[[str, tuple[Any, ...]], Deferred],
        clock: IReactorTime,
        in_thread: Callable[..., Deferred],
        interval: float = INTERVAL,
    ) -> None:
        self.path = path
        self.credentials = credentials
        self.query = query  # (sql, params) → Deferred of rows, on the store's pool
        self.clock = clock
        self.in_thread = in_thread
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = clock
        self.interval = interval
        self._soon: Any = None
        self._refreshing: Deferred | None = None
        self.written = 0  # snapshots written, for tests and the console

    def load(self) -> Deferred:
        """Read the snapshot into the credentials; never errbacks (a bad file is logged and ignored)."""

        def loaded(devices: list[KnownDevice]) -> int:
            self.credentials.know(devices)
            if devices:
                log.info(
                    "{known} known from {path}: they are recognised while the database is away",
                    known=counted(len(devices), "device"),
                    count=len(devices),
                    path=str(self.path),
                )
            return len(devices)

        def failed(f: Failure) -> int:
            log.warn(
                "{path} not read, no device is known until the database answers: {error}",
                path=str(self.path),
                error=str(f.value),
            )
            return 0

        return self.in_thread(read_snapshot, self.path).addCallbacks(loaded, failed)

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=True).addErrback(lambda f: log.failure("known devices not kept", f))

    def stopService(self) -> Deferred:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        return self._refreshing if self._refreshing is not None else succeed(None)

    def changed(self) -> None:
        """A device changed: rewrite the snapshot soon."""
        if self.running and (self._soon is None or not self._soon.active()):
            self._soon = self.clock.callLater(SOON, self.refresh)

    def refresh(self) -> Deferred:
        """Read the active devices from the database, know them, write them; never errbacks."""
        if self._refreshing is not None:
            return self._refreshing
        self._refreshing = Deferred.fromCoroutine(self._refresh())

        def done(_: Any) -> None:
            self._refreshing = None

        return self._refreshing.addBoth(done)

    async def _refresh(self) -> None:
        try:
            rows = await self.query(DEVICES, (KNOWN_DEVICES,))
            devices = [KnownDevice(r[0], r[1], r[2], bytes(r[3]), r[4], r[5]) for r in rows]
            self.credentials.know(devices)
            await self.in_thread(write_snapshot, self.path, devices)
            self.written += 1
        except Exception as e:
            log.warn("known devices not refreshed yet: {error}", error=first_line(e))
