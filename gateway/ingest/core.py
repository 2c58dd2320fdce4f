"""
The one ingest path every transport uses: authenticate the device,
normalise and validate what it sent, store it, and only then answer.

Parsing is pure (``ingest.parse``: bytes in, readings or InvalidInput
out); ``Ingest`` joins it to an IStore. Refused input is kept in the store's rejected-input table
with the reason, so nothing disappears without a trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.ingest.rates import DeviceRates, OverLimit
from gateway.ops.logs import RateLimitedLog
from gateway.ops.metrics import GatewayMetrics
from gateway.ingest.quality import QualityRules
from gateway.ingest.vendor import DeviceType

from gateway.ingest.parse import parse_readings_json
from gateway.readings import (
    Device,
    DeviceTypeUnknown,
    IngestError,
    InvalidInput,
    RateLimited,
    Reading,
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
        metrics: GatewayMetrics | None = None,
        rates: DeviceRates | None = None,
        quality: QualityRules | None = None,
        device_types: Sequence[DeviceType] = (),
    ) -> None:
        self.store = store
        self.clock = clock
        self.metrics = metrics or GatewayMetrics(clock)
        self.rates = rates or DeviceRates(0, clock)
        self.quality = quality or QualityRules()
        self.device_types = {t.name: t for t in device_types}
        # Called with (device, readings) once readings are committed: the edge alerts.
        self.observers: list[Callable[[Device, Sequence[Reading]], None]] = []
        # A device that keeps sending bad input must not flood the log.
        self.refusals = RateLimitedLog(log, clock)

    async def authenticate(self, token: str | None, source: str) -> Device:
        device = await self.store.authenticate(token) if token else None
        if device is None:
            self.metrics.rejected(source, "unauthorized")
            self.refusals.warn(
                peer_of(source),
                "refused {source}: missing, unknown or revoked device token",
                source=source,
                code="unauthorized",
            )
            raise Unauthorized("missing, unknown or revoked device token")
        assert isinstance(device, Device)
        return device

    async def store_readings(
        self, device: Device, readings: Sequence[Reading], source: str, raw: Callable[[], bytes]
    ) -> WriteResult:
        """Store readings; ``raw()`` renders the input for the rejected-input table if refused."""
        try:
            self.rates.take(device.name, len(readings))
        except OverLimit as e:
            error = RateLimited(
                f"device {device.name} sends more than {self.rates.rate:g} readings/s; "
                f"send these again in {e.retry_after}s",
                e.retry_after,
            )
            self.metrics.rejected(source, error.code, device.name, error.message)
            self.refusals.warn(
                device.name,
                "refused input from {source} (device {device}): {code}: {reason}",
                source=source,
                device=device.name,
                code=error.code,
                reason=error.message,
            )
            raise error from None
        good, failed = self.quality.split(readings, self.clock.seconds())
        try:
            if failed:
                # Kept before the answer, like the readings: an ack covers both.
                await self.store.quarantine(device, failed, source)
            result: WriteResult = await self.store.write(device, good, source) if good else WriteResult(0, 0)
        except StoreRejected as e:
            await self.refused(source, e, raw(), device)
            raise
        self.metrics.stored(device.name, source, result.accepted, result.duplicates)
        if failed:
            self.metrics.quarantined(source, len(failed))
            result = WriteResult(result.accepted, result.duplicates, tuple(failed))
        if good:
            for observe in self.observers:
                try:
                    observe(device, good)
                except Exception:
                    log.failure("a reading observer failed")
        return result

    async def refused(self, source: str, error: IngestError, raw: bytes, device: Device | None) -> None:
        """Log input that gets an error, and keep it with the reason."""
        name = device.name if device else None
        self.metrics.rejected(source, error.code, name, error.message)
        self.refusals.warn(
            name or peer_of(source),
            "refused input from {source} (device {device}): {code}: {reason}",
            source=source,
            device=name,
            code=error.code,
            reason=error.message,
        )
        await self.store.reject(source, f"{error.code}: {error.message}", raw, name)

    def write_json(self, device: Device, body: bytes, source: str) -> Deferred[WriteResult]:
        """Parse a JSON body and store it; fires with WriteResult or fails with IngestError."""

        async def run() -> WriteResult:
            try:
                readings = self.read_body(device, body)
            except InvalidInput as e:
                await self.refused(source, e, body, device)
                raise
            return await self.store_readings(device, readings, source, lambda: body)

        return Deferred.fromCoroutine(run())

    def read_body(self, device: Device, body: bytes) -> list[Reading]:
        """The readings of a JSON body: the gateway's own shape, or the device type's vendor mapping."""
        if device.type is None:
            return parse_readings_json(body)
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


def peer_of(source: str) -> str:
    """The peer's host in a source string ('https 10.0.0.5:4431' → '10.0.0.5'), the rate limit's key."""
    address = source.partition(" ")[2]
    return address.rpartition(":")[0] or address
