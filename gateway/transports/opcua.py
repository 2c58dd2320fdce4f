"""
OPC UA servers as a source of readings: the gateway subscribes to their
nodes (``[[opcua]]`` tables, ``opcua_settings.py``) and stores each value it
is sent, through the ingest path like readings from any transport.

Theory of operation. The sessions run on asyncua in a thread of its own
(``opcua_client.py``); each publish response comes to the reactor as one
batch. Here a value becomes a reading (scale and offset applied, the source
timestamp as its time, the server's when the source gives none) and waits,
by device, for its device's write: one write in flight per device, the
values that came meanwhile going together in the next one.

What goes wrong stays where it happens:

- a value whose status is not Good (a sensor failed, a PLC stopped) is
  counted by node and status code and not stored; the other nodes go on;
- a node the server refuses (unknown NodeId, a namespace not in the server's
  array) is named in ``gatewayctl opcua status``; the others are monitored;
- a lost session (a server restart, the network) is counted as a gap, by
  device and reason, and another is made with backoff, with new
  subscriptions; values are not stored for the time no session held them;
- more values waiting than ``MAX_WAITING`` (the database far behind), or
  more than ``opcua_client.MAX_HANDED`` on their way from the OPC UA thread
  (the reactor held up), are counted as a gap (``overflow``) rather than
  held without bound.

OPC UA keeps no history the gateway reads: like Modbus, a value the gateway
did not receive while its session was down is a reading that never exists,
counted in ``gateway_opcua_gaps_total``. What it received and committed is
stored once.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.commands.model import Command
from gateway.commands.service import IDownlink
from gateway.families import counter, gauge
from gateway.ingest.core import Ingest
from gateway.ops.reports import StatusReport
from gateway.ratelimit import RateLimitedLog
from gateway.reactor import Reactor
from gateway.readings import Device, IngestError, Reading, Source, WriteResult, counted
from gateway.transports.devices import DeviceNames
from gateway.transports.opcua_client import UaLoop, UaSession, number
from gateway.transports.opcua_settings import Item, OpcuaSource

log = Logger()

MAX_WAITING = 200_000  # values waiting for their write, over every server
LATENCIES = 2000  # notification-to-commit times kept for the quantiles


class ServerSource:
    """One ``[[opcua]]`` table: its session's values, by device, to the store; its counters."""

    def __init__(self, settings: OpcuaSource, owner: OpcuaSources) -> None:
        self.settings = settings
        self.owner = owner
        self.clock = owner.reactor
        self.items: tuple[Item, ...] = ()
        self.refused: dict[str, str] = {}  # device/metric → why the server did not monitor it
        self.info: dict[str, Any] = {}
        self.origin = Source("opcua", settings.endpoint.removeprefix("opc.tcp://"))
        self.session: UaSession | None = None
        self.state = "connecting"
        self.state_since = self.clock.seconds()
        self.values = 0  # notifications received
        self.readings = 0  # readings stored new
        self.bad: collections.Counter[tuple[str, str, str]] = collections.Counter()  # (device, metric, status)
        self.gaps: collections.Counter[tuple[str, str]] = collections.Counter()  # (device, reason)
        self.attempts = 0  # sessions tried that failed
        self.last_value_at: float | None = None
        self.last_error = ""
        self.waiting: dict[str, list[tuple[Reading, float]]] = {}  # device → (reading, arrived) not yet written
        self.writing: set[str] = set()
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCIES)

    # -- what the session thread reports (in the reactor thread) --

    def subscribed(self, items: tuple[Item, ...], refused: dict[int, str], info: dict[str, Any]) -> None:
        self.items = items
        self.refused = {f"{items[h].device}/{items[h].metric}": why for h, why in refused.items()}
        self.info = info
        if info.get("items"):
            self._state("subscribed")
            log.info(
                "OPC UA {source}: {items} monitored in {subs}{refused}",
                source=self.settings.name,
                items=counted(info["items"], "node"),
                subs=counted(info["subscriptions"], "subscription"),
                refused=f"; {len(refused)} refused" if refused else "",
            )
        for key, why in self.refused.items():
            self.owner.errors.warn(
                key, "OPC UA {source}: {node} not monitored: {why}", source=self.settings.name, node=key, why=why
            )

    def values_in(
        self, batch: list[tuple[int, Any, float, int, str]], arrived: float, dropped: dict[int, int] | None = None
    ) -> None:
        items = self.items
        for handle, n in (dropped or {}).items():  # dropped on their way here (opcua_client.Handler)
            if handle < len(items):
                self.gaps[(items[handle].device, "overflow")] += n
        self.values += len(batch)
        self.last_value_at = self.clock.seconds()
        for handle, raw, ts, _, status in batch:
            if handle >= len(items):
                continue
            item = items[handle]
            if status:
                self.bad[(item.device, item.metric, status)] += 1
                continue
            value = number(raw)
            if value is None:
                self.bad[(item.device, item.metric, "not_a_number")] += 1
                continue
            if self.owner.waiting >= MAX_WAITING:
                self.gaps[(item.device, "overflow")] += 1
                continue
            reading = Reading(item.metric, int(ts * 1_000_000), value * item.scale + item.offset)
            self.waiting.setdefault(item.device, []).append((reading, arrived))
            self.owner.waiting += 1
        for device in list(self.waiting):
            if device not in self.writing:
                self._write(device)

    def lost(self, reason: str, message: str) -> None:
        self.last_error = message
        if reason == "browse":
            return
        self.attempts += 1
        if self.state != "down":
            for device in self.settings.devices:
                self.gaps[(device, reason)] += 1
            self._state("down")
        self.owner.errors.warn(
            self.settings.name,
            "OPC UA {source} ({endpoint}): {reason}: {error}; trying again",
            source=self.settings.name,
            endpoint=self.settings.endpoint,
            reason=reason,
            error=message,
        )

    def _state(self, state: str) -> None:
        if state != self.state:
            self.state, self.state_since = state, self.clock.seconds()

    # -- the store --

    def _write(self, device: str) -> None:
        batch = self.waiting.pop(device, [])
        if not batch:
            return
        self.owner.waiting -= len(batch)
        self.writing.add(device)
        known, found = self.owner.devices.get(device)
        looked: Deferred = succeed(found) if known else self.owner.devices.look_up(device)
        d = looked.addCallback(self._store, device, batch)
        d.addErrback(self._not_stored, device, len(batch))
        d.addBoth(self._written, device)

    def _store(self, found: Device | None, device: str, batch: list[tuple[Reading, float]]) -> Deferred | None:
        if found is None:
            self.gaps[(device, "unknown_device")] += len(batch)
            self.last_error = f"device {device!r} is not registered or is revoked (gatewayctl device add {device})"
            self.owner.errors.warn(device, "OPC UA {source}: {error}", source=self.settings.name, error=self.last_error)
            return None
        readings = [r for r, _ in batch]
        raw = lambda: repr([tuple(r) for r in readings]).encode()  # noqa: E731 - the rejected-input row, if refused
        d = self.owner.ingest.store_readings(found, readings, self.origin, raw)
        return d.addCallback(self._committed, batch)

    def _committed(self, result: WriteResult, batch: list[tuple[Reading, float]]) -> None:
        self.readings += result.accepted
        now = time.time()
        self.latencies.append(now - batch[0][1])
        self.latencies.append(now - batch[-1][1])

    def _not_stored(self, f: Failure, device: str, n: int) -> None:
        error = f.value
        message = error.message if isinstance(error, IngestError) else f.getErrorMessage()
        self.gaps[(device, "store")] += n
        self.last_error = f"readings not stored: {message}"
        if not isinstance(error, IngestError):
            log.failure("OPC UA {source}: storing values failed", f, source=self.settings.name)

    def _written(self, _: Any, device: str) -> None:
        self.writing.discard(device)
        if self.waiting.get(device):
            self._write(device)

    # -- reports --

    def quantile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def status(self) -> dict[str, Any]:
        now = self.clock.seconds()
        bad: dict[str, dict[str, int]] = {}
        for (device, metric, status), n in sorted(self.bad.items()):
            bad.setdefault(f"{device}/{metric}", {})[status] = n
        gaps: dict[str, int] = {}
        for (_, reason), n in self.gaps.items():
            gaps[reason] = gaps.get(reason, 0) + n
        return {
            "endpoint": self.settings.endpoint,
            "security": self.settings.security,
            "state": self.state,
            "state_seconds": now - self.state_since,
            "subscriptions": self.info.get("subscriptions", 0),
            "monitored": self.info.get("items", 0),
            "refused": dict(sorted(self.refused.items())),
            "values": self.values,
            "readings": self.readings,
            "bad": bad,
            "gaps": sum(gaps.values()),
            "gaps_by_reason": dict(sorted(gaps.items())),
            "failed_sessions": self.attempts,
            "last_value_seconds": None if self.last_value_at is None else now - self.last_value_at,
            "commit_p99_seconds": self.quantile(0.99),
            "last_error": self.last_error,
        }


@implementer(IDownlink)
class OpcuaDownlink:
    """A device's writable nodes, as a downlink: ``write`` with {"metric", "value"}, read back."""

    transport = "opcua"

    def __init__(self, device: str, source: ServerSource, commands: Any) -> None:
        self.device = device
        self.source = source
        self.commands = commands
        self.busy = False
        self.writes = 0

    def writable(self) -> dict[str, Item]:
        return {
            i.metric: i
            for i in self.source.items or self.source.settings.items
            if i.device == self.device and i.writable
        }

    def room(self) -> int:
        return 0 if self.busy else 1

    def deliver(self, command: Command) -> None:
        self.busy = True

        def done(_: Any) -> None:
            self.busy = False
            self.commands.flush(self.device)

        d = Deferred.fromCoroutine(self._run(command))
        d.addErrback(lambda f: log.failure("OPC UA command {id} failed", f, id=command.id))
        d.addBoth(done)

    async def _fail(self, command: Command, error: str, **more: Any) -> None:
        await self.commands.finished(self.device, command.id, "failed", {"error": error, **more}, "opcua")

    async def _run(self, command: Command) -> None:
        writable = self.writable()
        if command.name != "write":
            await self._fail(command, f"unknown command {command.name!r}: an OPC UA device takes write")
            return
        metric, value = command.params.get("metric"), command.params.get("value")
        item = writable.get(metric) if isinstance(metric, str) else None
        if item is None:
            known = ", ".join(sorted(writable)) or "none"
            await self._fail(command, f"metric: {metric!r} is not a writable node of {self.device} ({known})")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            await self._fail(command, f"value: {value!r} is not a number")
            return
        session = self.source.session
        try:
            if session is None:
                raise ConnectionError("no session")
            held = await self.source.owner.loop.call(session.write(item, float(value)))
        except ConnectionError as e:  # not known to be written: sent again when the session is back
            log.warn("write of {metric} to {device} not made: {error}", metric=metric, device=self.device, error=str(e))
            return
        except Exception as e:  # noqa: BLE001 - the server's refusal (BadNotWritable, BadTypeMismatch…) is the result
            await self._fail(command, f"{type(e).__name__}: {e}", metric=metric)
            return
        await self.commands.delivered(self.device, command.id)
        got = number(held)
        if got is None or abs(got * item.scale + item.offset - float(value)) > 1e-6 * max(1.0, abs(float(value))):
            await self._fail(command, f"the server holds {held!r} after the write", metric=metric, value=got)
            return
        self.writes += 1
        result = {"metric": metric, "value": got * item.scale + item.offset}
        await self.commands.finished(self.device, command.id, "succeeded", result, "opcua")


class OpcuaSources(Service):
    """Every ``[[opcua]]`` table, the thread their sessions run in, their health and their /metrics."""

    def __init__(
        self,
        sources: tuple[OpcuaSource, ...],
        ingest: Ingest,
        reactor: Reactor,
        pki: Path,
        commands: Any = None,
    ) -> None:
        self.ingest = ingest
        self.reactor = reactor
        self.pki = pki
        self.commands = commands
        self.devices = DeviceNames(ingest, reactor)
        self.errors = RateLimitedLog(log, reactor)
        self.loop = UaLoop(reactor)
        self.sources = {s.name: ServerSource(s, self) for s in sources}
        self.downlinks: dict[str, OpcuaDownlink] = {}
        self.waiting = 0
        self.reporter: StatusReport | None = None

    def startService(self) -> None:
        super().startService()
        self.pki.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.loop.start()
        for source in self.sources.values():
            self._run(source)
            if self.commands is not None:
                for item in source.settings.items:
                    if item.writable and item.device not in self.downlinks:
                        link = self.downlinks[item.device] = OpcuaDownlink(item.device, source, self.commands)
                        self.commands.attach(item.device, link, back=False)
        if self.reporter is not None:
            self.reporter.start()
        log.info("OPC UA: {n} on a thread of their own", n=counted(len(self.sources), "server"))

    def _run(self, source: ServerSource) -> None:
        def make() -> Any:
            session = source.session = UaSession(
                source.settings, _Listener(source), self.reactor, self.loop.loop, self.pki, self.loop.pki_lock
            )
            return session.run()

        async def run() -> None:
            await make()

        d = self.loop.call(run())
        d.addErrback(lambda f: None if f.check(Exception) and "Cancel" in type(f.value).__name__ else f)
        d.addErrback(lambda f: log.failure("OPC UA {source}: the session loop ended", f, source=source.settings.name))

    def stopService(self) -> Deferred:
        super().stopService()
        for device, link in self.downlinks.items():
            self.commands.detach(device, link)
        self.downlinks.clear()
        d = self.loop.stop()
        if self.reporter is not None:
            d.addBoth(lambda _: self.reporter.stop() if self.reporter is not None else None)
        return d

    def forget(self, names: list[str] | None = None) -> None:
        self.devices.forget(names)

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: s.status() for name, s in sorted(self.sources.items())}

    def health(self) -> dict[str, Any]:
        return {
            "servers": len(self.sources),
            "down": {n: s.last_error for n, s in sorted(self.sources.items()) if s.state != "subscribed"},
        }

    def live_metrics(self) -> Iterator[Any]:
        values = counter(
            "gateway_opcua_values", "Values the servers sent (notifications), of every status.", ["source"]
        )
        readings = counter("gateway_opcua_readings", "Readings stored new from OPC UA values.", ["source"])
        bad = counter(
            "gateway_opcua_bad_values",
            "Values not stored: their status was not Good (by status code), or not a number (not_a_number).",
            ["device", "metric", "status"],
        )
        gaps = counter(
            "gateway_opcua_gaps",
            "Times values could not come or be kept: session_lost, unreachable, refused (sessions), "
            "overflow, store, unknown_device (values): readings that will never exist.",
            ["device", "reason"],
        )
        monitored = gauge(
            "gateway_opcua_monitored_items", "Nodes the server monitors for the gateway.", labels=["source"]
        )
        refused = gauge("gateway_opcua_refused_items", "Nodes the server did not monitor.", labels=["source"])
        up = gauge("gateway_opcua_subscribed", "1 while the session and its subscriptions are up.", labels=["source"])
        latency = gauge(
            "gateway_opcua_commit_seconds",
            "From a publish response reaching the gateway to its values' COMMIT, over the last values.",
            labels=["source", "quantile"],
        )
        for name, s in sorted(self.sources.items()):
            values.add_metric([name], s.values)
            readings.add_metric([name], s.readings)
            for (device, metric, status), n in sorted(s.bad.items()):
                bad.add_metric([device, metric, status], n)
            for (device, reason), n in sorted(s.gaps.items()):
                gaps.add_metric([device, reason], n)
            monitored.add_metric([name], s.info.get("items", 0))
            refused.add_metric([name], len(s.refused))
            up.add_metric([name], 1 if s.state == "subscribed" else 0)
            for q in (0.5, 0.99):
                v = s.quantile(q)
                if v is not None:
                    latency.add_metric([name, str(q)], v)
        yield from (values, readings, bad, gaps, monitored, refused, up, latency)


class _Listener:
    """The session's calls, in the reactor thread, to its source."""

    def __init__(self, source: ServerSource) -> None:
        self.source = source

    def session(self, items: tuple[Item, ...], refused: dict[int, str], info: dict[str, Any]) -> None:
        self.source.subscribed(items, refused, info)

    def values(self, batch: list[tuple[int, Any, float, int, str]], dropped: dict[int, int], arrived: float) -> None:
        self.source.values_in(batch, arrived, dropped)

    def lost(self, reason: str, message: str) -> None:
        self.source.lost(reason, message)

    def certificate(self, path: str, thumbprint: str) -> None:
        log.info(
            "OPC UA {source}: the gateway's client certificate is {path} (SHA-1 thumbprint {thumbprint}): "
            "trust it on the server ({endpoint})",
            source=self.source.settings.name,
            path=path,
            thumbprint=thumbprint,
            endpoint=self.source.settings.endpoint,
        )
