"""
The one ingest path every transport uses: authenticate the device,
normalise and validate what it sent, store it, and only then answer.

Parsing is pure (``ingest.parse``: bytes in, readings or InvalidInput
out); ``Ingest`` joins it to an IStore. Every refusal, whatever the
transport, goes through ``Ingest.refuse``: counted, logged (rate-limited)
and, when there is input to keep, kept in the rejected-input table with the
reason, so nothing disappears without a trace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.ratelimit import RateLimitedLog
from gateway.ingest.rates import DeviceRates, OverLimit
from gateway.ingest.quality import QualityRules
from gateway.ingest.vendor import DeviceType

from gateway.ingest.parse import parse_readings_json
from gateway.readings import (
    Device,
    DeviceTypeUnknown,
    InvalidInput,
    Quarantined,
    RateLimited,
    Reading,
    Source,
    StoreRejected,
    Unauthorized,
    WriteResult,
)
from gateway.storage.interface import IStore

log = Logger()


class Ingest:
    """Authenticate → normalise → check quality → store → answer, for every transport."""

    def __init__(
        self,
        store: IStore,
        clock: IReactorTime,
        metrics: Any,
        rates: DeviceRates | None = None,
        quality: QualityRules | None = None,
        device_types: Sequence[DeviceType] = (),
    ) -> None:
        self.store = store
        self.clock = clock
        # The gateway's metrics (ops.metrics.GatewayMetrics), given: the ingest core counts into them without
        # importing the layer that serves them.
        self.metrics = metrics
        self.rates = rates or DeviceRates(0, clock)
        self.quality = quality or QualityRules()
        self.device_types = {t.name: t for t in device_types}
        # Called with (device, readings) once readings are committed: the edge alerts.
        self.observers: list[Callable[[Device, Sequence[Reading]], None]] = []
        # A device that keeps sending bad input must not flood the log.
        self.refusal_log = RateLimitedLog(log, clock)

    async def authenticate(self, token: str | None, source: Source) -> Device:
        device = await self.store.authenticate(token) if token else None
        if device is None:
            error = Unauthorized("missing, unknown or revoked device token")
            self.refuse(source, error.code, error.message)
            raise error
        assert isinstance(device, Device)
        return device

    def store_readings(
        self,
        device: Device,
        readings: Sequence[Reading],
        source: Source,
        raw: Callable[[], bytes],
        held: Sequence[Quarantined] = (),
    ) -> Deferred[WriteResult]:
        """
        Store readings; fires with WriteResult or fails with IngestError. ``raw()`` renders the input for
        the rejected-input table if refused. ``held``: readings a transport's own rule failed (a tracker's
        impossible jump), kept in quarantine with the rest. A plain chain of callbacks rather than a
        coroutine: it runs for every message, and a coroutine's machinery costs as much as the rest of it at
        one reading a message.
        """
        try:
            self.rates.take(device.name, len(readings))
        except OverLimit as e:
            return fail(self._rate_limited(device, source, e))
        good, failed = self.quality.split(readings, self.clock.seconds())
        if held:
            failed = [*failed, *held]
        # One write: the readings and those held in quarantine commit (or go to the journal)
        # together, before the answer, so an ack covers both.
        d: Deferred[WriteResult] = self.store.write(device, good, source, failed)
        d.addCallbacks(
            self._stored,
            self._not_stored,
            callbackArgs=(device, source, good, failed),
            errbackArgs=(device, source, raw),
        )
        return d

    def store_messages(
        self, device: Device, messages: Sequence[tuple[Sequence[Reading], Callable[[], bytes]]], source: Source
    ) -> Deferred[list[Any]]:
        """
        Store several messages of one device (``(readings, raw)`` each) in one write: one place in the
        commit queue and one callback for all, where a message of one reading would otherwise pay for
        its own. Fires with one outcome per message, in order: its WriteResult, or the IngestError that
        refused it alone (a rate limit, a reading the database refused); fails as ``store_readings``
        does when the store cannot take the write at all.
        """
        outcomes: list[Any] = [None] * len(messages)
        parts: list[tuple[Sequence[Reading], Sequence[Any]]] = []
        taken: list[int] = []
        now = self.clock.seconds()
        for k, (readings, _) in enumerate(messages):
            try:
                self.rates.take(device.name, len(readings))
            except OverLimit as e:
                outcomes[k] = self._rate_limited(device, source, e)
                continue
            parts.append(self.quality.split(readings, now))
            taken.append(k)
        if not parts:
            return succeed(outcomes)
        d: Deferred[list[Any]] = self.store.write_many(device, parts, source)
        d.addCallback(self._stored_messages, device, source, messages, parts, taken, outcomes)
        return d

    def _stored_messages(
        self,
        results: list[Any],
        device: Device,
        source: Source,
        messages: Sequence[tuple[Sequence[Reading], Callable[[], bytes]]],
        parts: list[tuple[Sequence[Reading], Sequence[Any]]],
        taken: list[int],
        outcomes: list[Any],
    ) -> Any:
        accepted = duplicates = 0
        good_all: list[Reading] = []
        keeping: list[Deferred[None]] = []
        for k, (good, failed), result in zip(taken, parts, results):
            if isinstance(result, WriteResult):
                accepted += result.accepted
                duplicates += result.duplicates
                outcomes[k] = self._result(result, device, source, failed)
                good_all += good
            else:
                outcomes[k] = result
                if isinstance(result, StoreRejected):
                    keeping.append(self._keep(result, device, source, messages[k][1]))
        self.metrics.stored(device.name, source, accepted, duplicates)
        self._observe(device, good_all)
        if keeping:  # the answers wait until the refused input is kept
            return gatherResults(keeping).addCallback(lambda _: outcomes)
        return outcomes

    def _rate_limited(self, device: Device, source: Source, e: OverLimit) -> RateLimited:
        error = RateLimited(
            f"device {device.name} sends more than {self.rates.rate:g} readings/s; "
            f"send these again in {e.retry_after}s",
            e.retry_after,
        )
        # Not kept: nothing is wrong with the input, and it is sent again.
        self.refuse(source, error.code, error.message, device=device.name)
        return error

    def _stored(
        self, result: WriteResult, device: Device, source: Source, good: Sequence[Reading], failed: Sequence[Any]
    ) -> WriteResult:
        self.metrics.stored(device.name, source, result.accepted, result.duplicates)
        result = self._result(result, device, source, failed)
        self._observe(device, good)
        return result

    def _result(self, result: WriteResult, device: Device, source: Source, failed: Sequence[Any]) -> WriteResult:
        """One write's result, counted: conflicts logged, quarantined readings added."""
        if result.conflicts:
            self.metrics.conflicting(source, result.conflicts)
            self.refusal_log.warn(
                device.name,
                "device {device} at {source} sent {count} readings already stored with another value; the first "
                "values stay, these are kept in the conflicts table (gatewayctl conflicts list)",
                device=device.name,
                source=source,
                count=result.conflicts,
            )
        if failed:
            self.metrics.quarantined(source, len(failed))
            result = dataclasses.replace(result, quarantined=tuple(failed))
        return result

    def _observe(self, device: Device, good: Sequence[Reading]) -> None:
        if good:
            for observe in self.observers:
                try:
                    observe(device, good)
                except Exception:
                    log.failure("a reading observer failed")

    def _not_stored(self, f: Failure, device: Device, source: Source, raw: Callable[[], bytes]) -> Any:
        """A reading the database refused: keep the input with the reason, then fail as the write did."""
        if not f.check(StoreRejected):
            return f
        error = f.value
        assert isinstance(error, StoreRejected)
        return self._keep(error, device, source, raw).addCallback(lambda _: f)

    def _keep(self, error: StoreRejected, device: Device, source: Source, raw: Callable[[], bytes]) -> Deferred[None]:
        return self.refuse(source, error.code, error.message, device=device.name, raw=raw())

    # -- admission and lookups: what a transport asks before it reads more or lets a device in --

    def admits(self, size: int) -> bool:
        """
        Whether a write of ``size`` readings would be taken now, with no other writer waiting for room
        before it: a transport that hears False stops reading (``wait_for_room``) instead of writing.
        """
        return bool(self.store.admits(size))

    def wait_for_room(self) -> Deferred[None]:
        """Fire when writes are taken again, after the transports that were waiting already (in turn)."""
        d: Deferred[None] = self.store.wait_for_room()
        return d

    def device_key(self, name: str) -> Deferred[Any]:
        """(Device, its stored key) of a registered, unrevoked device, or None: for protocols that prove a
        device by a challenge on its key (TGP) rather than by sending its token."""
        d: Deferred[Any] = self.store.device_key(name)
        return d

    def device_by_imei(self, imei: str) -> Deferred[Any]:
        """The registered, unrevoked Device an IMEI is bound to, or None: trackers say who they are by IMEI."""
        d: Deferred[Any] = self.store.device_by_imei(imei)
        return d

    def session_begins(self, device: Device, client_id: str, clean_start: bool, expiry: int) -> Deferred[bool]:
        """
        A device connects with a session (MQTT): whether one it kept under ``client_id`` is still there; the
        one kept from now lasts ``expiry`` seconds after the connection ends. Errbacks when the store cannot say.
        """
        d: Deferred[bool] = self.store.session_begins(device.id, client_id, clean_start, expiry)
        return d

    def session_ends(self, device: Device, client_id: str) -> Deferred[None]:
        """The connection of a kept session ended: its expiry counts from now."""
        d: Deferred[None] = self.store.session_ends(device.id, client_id)
        return d

    def refuse(
        self,
        source: Source,
        code: str,
        reason: str,
        *,
        device: str | None = None,
        raw: bytes | None = None,
        closing: bool = False,
    ) -> Deferred[None]:
        """
        The one way every transport refuses input or a connection: count it
        (``gateway_inputs_rejected_total`` and the device's activity), log it
        (at most 5 lines a minute per device, or per address when the device
        is unknown), and keep ``raw`` with the reason in rejected_input. Fires
        when kept; never errbacks.
        """
        self.metrics.rejected(source, code, device, reason)
        key = device or source.host
        what = "closing" if closing else "refused"
        if device is None:
            self.refusal_log.warn(key, what + " {source}: {code}: {reason}", source=source, code=code, reason=reason)
        else:
            self.refusal_log.warn(
                key,
                what + " {source} (device {device}): {code}: {reason}",
                source=source,
                device=device,
                code=code,
                reason=reason,
            )
        if raw is None:
            return succeed(None)
        d: Deferred[None] = self.store.keep_rejected_input(source, f"{code}: {reason}", raw, device)
        return d

    def reconfigure(self, rate: float, quality: QualityRules, device_types: Sequence[DeviceType]) -> None:
        """Settings a SIGHUP changes: readings per second per device, quality rules, vendor mappings."""
        self.rates.rate = rate
        self.quality = quality
        self.device_types = {t.name: t for t in device_types}

    def write_json(self, device: Device, body: bytes, source: Source, one: bool = False) -> Deferred[WriteResult]:
        """
        Parse a JSON body and store it; fires with WriteResult or fails with IngestError. With ``one``,
        a body in the gateway's own shape may also be a single reading object.
        """

        async def run() -> WriteResult:
            try:
                readings = self.read_body(device, body, one)
            except InvalidInput as e:
                await self.refuse(source, e.code, e.message, device=device.name, raw=body)
                raise
            return await self.store_readings(device, readings, source, lambda: body)

        return Deferred.fromCoroutine(run())

    def read_body(self, device: Device, body: bytes, one: bool = False) -> list[Reading]:
        """The readings of a JSON body: the gateway's own shape, or the device type's vendor mapping."""
        if device.type is None:
            return parse_readings_json(body, one)
        mapping = self.device_types.get(device.type)
        if mapping is None:
            log.error(
                "device {device} has type {type}, which the config file does not define: its input is "
                "answered 503 until [device_types.{type}] is added",
                device=device.name,
                type=device.type,
            )
            raise DeviceTypeUnknown(f"device type {device.type!r} is not configured on this gateway; retry later")
        return mapping.read(body, device.name)
