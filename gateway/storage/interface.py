"""
IStore: what the ingest path needs of storage, as Deferreds. Two
implementations satisfy it and run one contract suite: PostgresStore
(``storage.store``) and MemoryStore (``storage.memory``), the latter for
tests of the layers above.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
from zope.interface import Interface

from gateway.readings import Device, Quarantined, Reading, Source


class IStore(Interface):
    def authenticate(token: str) -> Deferred:
        """Fire with the Device a bearer token belongs to, or None."""

    def device_key(name: str) -> Deferred:
        """Fire with (Device, stored key) of a device that is not revoked, or None."""

    def device_by_imei(imei: str) -> Deferred:
        """Fire with the Device an IMEI is bound to (gatewayctl device add --imei), not revoked, or None."""

    def write(
        device: Device,
        readings: Sequence[Reading],
        source: Source | None = None,
        quarantined: Sequence[Quarantined] = (),
    ) -> Deferred:
        """
        Store readings once each, and keep ``quarantined`` (readings that failed a
        quality rule, with the rule) once each in quarantine; fire with WriteResult
        (of the readings) after both are committed. A reading whose key was stored
        before is a duplicate with the same value, a conflict with another: the
        first value stays, and the other is kept aside. ``source`` is kept as where the
        device was last heard from. Errbacks: StoreUnavailable, StoreOverloaded,
        StoreRejected.
        """

    def write_many(
        device: Device,
        parts: Sequence[tuple[Sequence[Reading], Sequence[Quarantined]]],
        source: Source | None = None,
    ) -> Deferred:
        """
        Several writes of one device, ``(readings, quarantined)`` each, committed together: fire with a
        list of one outcome per part, its WriteResult or the StoreRejected that refused that part alone.
        Errbacks as ``write`` when the store cannot take them at all.
        """

    def keep_rejected_input(source: Source, reason: str, raw: bytes, device: str | None = None) -> Deferred:
        """Keep input that was refused, with why; fire when kept (never errbacks)."""

    def has_room(size: int) -> bool:
        """Would a write of ``size`` readings be queued now (not refused as overloaded)?"""

    def admits(size: int) -> bool:
        """``has_room``, and no writer waiting for room (``wait_for_room``) before this one: device sessions
        ask this, so that they are let in in turn."""

    def wait_for_room() -> Deferred:
        """Fire when the write queue has drained enough to take writes again, after writers waiting already."""

    def check() -> Deferred:
        """Fire when the database answers; errback StoreUnavailable otherwise."""

    def session_begins(device_id: int, client_id: str, clean_start: bool, expiry: int) -> Deferred:
        """
        An MQTT device connects with ``client_id``: fire with True when a session it kept before is still
        there (not discarded by a clean start and not past its expiry), else False. The session kept from
        now on lasts ``expiry`` seconds after the connection ends (0: it ends with the connection).
        """

    def session_ends(device_id: int, client_id: str) -> Deferred:
        """The connection of a kept session ended: its expiry starts counting now."""
