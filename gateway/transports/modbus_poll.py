"""
Polling Modbus/TCP devices: the gateway reads their registers itself, on the
reactor, without a thread per device.

Theory of operation. Each ``[[modbus]]`` table is a ``PolledDevice``: a
schedule (every ``interval`` seconds, from a random phase so that a thousand
devices do not poll in step) and the reads its register map needs
(``modbus_map.plan``). The devices of one ``host:port`` share a
``ModbusHost``: one TCP connection and one request in flight at a time — what
serial gateways and most PLCs expect — with the others queued behind it, and
``pause`` seconds between two requests to the same device.

What goes wrong stays where it happens:

- a Modbus exception response (illegal data address, a busy slave) fails its
  read only; the other reads of the poll are stored, and the exception is
  counted by device and code and logged at most a few times a minute;
- a request unanswered within ``timeout`` fails its read only, and the next
  queued request goes out; a response that comes later is ignored;
- a host that cannot be reached fails its devices' polls at once (no queue
  builds up behind it) and is tried again with exponential backoff;
- a device that closes idle connections, or closes after every request, is
  simply connected to again when the next request is due.

Modbus keeps no history: a poll that fails or cannot run in its slot is a
reading that never exists. Each is counted in ``gateway_modbus_gaps_total``
with its reason, so gaps are visible rather than silent.

A reading's time is when the response to its read arrived. The readings of a
poll are stored in one write through the ingest path, as readings from any
transport are (quality rules, quarantine, the twin, alerts, upload). A
register with a ``deadband`` is stored only when its value moved by more
than the deadband since the last stored one, or ``heartbeat`` seconds passed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.reactor import Clock, Reactor
from gateway.deadband import worth_keeping
from gateway.ingest.core import Ingest
from gateway.ratelimit import RateLimitedLog
from gateway.families import counter, gauge
from gateway.ops.reports import StatusReport
from gateway.readings import Device, IngestError, Reading, Source, WriteResult, counted
from gateway.transports.devices import DeviceNames
from gateway.transports.modbus_commands import ModbusDownlink
from gateway.transports.modbus_map import ModbusDevice, plan, readings_of
from protocols import modbus
from gateway.transports.modbus_host import ReadFailed, _Link, ModbusHost, tcp_connect

log = Logger()


@dataclass
class PollCounters:
    polls: int = 0  # polls made (each scheduled slot the gateway polled in)
    complete: int = 0  # of them, polls that brought every value
    readings: int = 0  # readings stored new
    suppressed: int = 0  # values within their deadband, not stored
    gaps: dict[str, int] = field(default_factory=dict)  # reason → polls that brought no or only some values
    exceptions: dict[int, int] = field(default_factory=dict)  # exception code → responses
    last_read_at: float | None = None  # a response with values arrived
    last_poll_seconds: float | None = None  # first request queued → last response, for the last poll
    last_error: str = ""
    last_exception: str = ""


class PolledDevice:
    """One ``[[modbus]]`` table: its schedule, its polls, and the readings they give."""

    def __init__(self, settings: ModbusDevice, host: ModbusHost, poller: ModbusPoller) -> None:
        self.settings = settings
        self.host = host
        self.poller = poller
        self.clock = poller.clock
        self.reads = plan(settings)
        self.counters = PollCounters()
        self.origin = Source("modbus", settings.host, settings.port)
        self.ready_at = 0.0  # no request before this (pause)
        self.polling = False
        self.started_at: float | None = None
        self._due = 0.0
        self._timer: Any = None
        self._stored: dict[str, tuple[float, int]] = {}  # metric → (value, time in µs) last stored, for deadbands
        self.downlink: ModbusDownlink | None = None  # its writable registers, for commands

    def start(self) -> None:
        commands = self.poller.commands
        if commands is not None and any(r.writable for r in self.settings.registers):
            self.downlink = ModbusDownlink(self, commands)
            commands.attach(self.settings.device, self.downlink, back=False)
        self.started_at = self.clock.seconds()
        self._due = self.clock.seconds() + self.poller.rand() * self.settings.interval
        self._timer = self.clock.callLater(self._due - self.clock.seconds(), self._tick)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.downlink is not None:
            self.poller.commands.detach(self.settings.device, self.downlink)
            self.downlink = None

    def _tick(self) -> None:
        now = self.clock.seconds()
        interval = self.settings.interval
        if self.polling:
            self._gap("missed", "the previous poll had not finished when this one was due")
        else:
            self.poll()
        # Fixed rate: slots stay where they were; slots the reactor slept through are gaps too.
        self._due += interval
        if self._due <= now:
            skipped = int((now - self._due) // interval) + 1
            for _ in range(skipped):
                self._gap("missed", "the gateway was too busy to poll in this slot")
            self._due += skipped * interval
        self._timer = self.clock.callLater(self._due - now, self._tick)

    def poll(self) -> Deferred:
        """One poll: look the device up, read every group, store what came. Never errbacks."""
        self.polling = True
        self.counters.polls += 1
        started = self.clock.seconds()
        known, device = self.poller.devices.get(self.settings.device)
        looked: Deferred = succeed(device) if known else self.poller.devices.look_up(self.settings.device)
        d = looked.addCallback(self._read_all, started)
        d.addErrback(self._lookup_failed)
        return d.addBoth(self._finished)

    def _lookup_failed(self, f: Failure) -> None:
        error = f.value
        message = error.message if isinstance(error, IngestError) else f.getErrorMessage()
        self._gap("store", f"device {self.settings.device} could not be looked up: {message}")
        if not isinstance(error, IngestError):
            log.failure("Modbus device {device}: a poll failed", f, device=self.settings.device)

    def _read_all(self, device: Device | None, started: float) -> Deferred | None:
        if device is None:
            self._gap(
                "unknown_device",
                f"device {self.settings.device!r} is not registered or is revoked "
                f"(gatewayctl device add {self.settings.device})",
            )
            return None
        reads = DeferredList([self.host.submit(self, read) for read in self.reads], consumeErrors=True)
        return reads.addCallback(lambda results: self._store(device, results, started))

    def _store(self, device: Device, results: list[tuple[bool, Any]], started: float) -> Deferred | None:
        readings: list[Reading] = []
        failures: list[ReadFailed] = []
        last = started
        for read, (_, result) in zip(self.reads, results):
            if isinstance(result, Failure):
                error = result.value
                if not isinstance(error, ReadFailed):
                    log.failure("Modbus device {device}: a read failed", result, device=self.settings.device)
                    error = ReadFailed("protocol", result.getErrorMessage())
                failures.append(error)
                continue
            values, arrived = result
            last = max(last, arrived)
            ts_us = int(arrived * 1_000_000)
            for metric, value in readings_of(read, values):
                if math.isfinite(value):
                    readings.append(Reading(metric, ts_us, value))
                else:  # a float register's "no value" (NaN) or an overflow: no reading can hold it
                    failures.append(ReadFailed("value", f"{metric} read as {value} (not a number a reading can hold)"))
        c = self.counters
        if readings or not failures:
            c.last_read_at = last
        c.last_poll_seconds = last - started
        if failures:
            self._failed(failures)
        else:
            c.complete += 1
        kept = self._deadband(readings)
        if not kept:
            return None
        raw = lambda: repr([tuple(r) for r in kept]).encode()  # noqa: E731 - the rejected-input row, if refused
        d = self.poller.ingest.store_readings(device, kept, self.origin, raw)
        return d.addCallbacks(self._committed, self._not_stored, callbackArgs=(kept,))

    def _failed(self, failures: list[ReadFailed]) -> None:
        c = self.counters
        for error in failures:
            if error.reason == "exception" and error.code is not None:
                c.exceptions[error.code] = c.exceptions.get(error.code, 0) + 1
                c.last_exception = error.message
        first = failures[0]
        self._gap(first.reason, first.message if len(failures) == 1 else f"{first.message} (+{len(failures) - 1})")

    def _deadband(self, readings: list[Reading]) -> list[Reading]:
        by_metric = {r.metric: r for r in self.settings.registers}
        kept = []
        for reading in readings:
            register = by_metric[reading.metric]
            last = self._stored.get(reading.metric)
            if not worth_keeping(reading.value, reading.ts_us, last, register.deadband, register.heartbeat):
                self.counters.suppressed += 1
                continue
            kept.append(reading)
        return kept

    def _committed(self, result: WriteResult, kept: list[Reading]) -> None:
        self.counters.readings += result.accepted
        for reading in kept:
            self._stored[reading.metric] = (reading.value, reading.ts_us)

    def _not_stored(self, f: Failure) -> None:
        error = f.value
        message = error.message if isinstance(error, IngestError) else f.getErrorMessage()
        self._gap("store", f"readings not stored: {message}")
        if not isinstance(error, IngestError):
            log.failure("Modbus device {device}: storing a poll failed", f, device=self.settings.device)

    def _gap(self, reason: str, message: str) -> None:
        c = self.counters
        c.gaps[reason] = c.gaps.get(reason, 0) + 1
        c.last_error = message
        self.poller.errors.warn(
            self.settings.device,
            "Modbus device {device} ({host} unit {unit}): a gap ({reason}): {error}",
            device=self.settings.device,
            host=self.host.address,
            unit=self.settings.unit,
            reason=reason,
            error=message,
        )

    def _finished(self, _: Any) -> None:
        self.polling = False

    def status(self) -> dict[str, Any]:
        c = self.counters
        now = self.clock.seconds()
        s = self.settings
        return {
            "host": self.host.address,
            "unit": s.unit,
            "interval": s.interval,
            "state": self._state(now),
            "connected": self.host.connected,
            "polls": c.polls,
            "complete_polls": c.complete,
            "readings": c.readings,
            "suppressed": c.suppressed,
            "gaps": sum(c.gaps.values()),
            "gaps_by_reason": dict(sorted(c.gaps.items())),
            "exceptions": {modbus.exception_name(code): n for code, n in sorted(c.exceptions.items())},
            "last_read_seconds": None if c.last_read_at is None else now - c.last_read_at,
            "last_poll_seconds": c.last_poll_seconds,
            "last_error": c.last_error,
            "last_exception": c.last_exception,
        }

    def _state(self, now: float) -> str:
        c = self.counters
        if c.last_read_at is None:
            return "failing" if c.gaps else "starting"
        if now - c.last_read_at > self.poller.stale_intervals * self.settings.interval:
            return "stale"
        return "reading"


class ModbusPoller(Service):
    """Every ``[[modbus]]`` table, their hosts, their health and their /metrics."""

    def __init__(
        self,
        devices: tuple[ModbusDevice, ...],
        ingest: Ingest,
        reactor: Reactor,
        clock: Clock | None = None,
        connect: Callable[[str, int, float], Callable[[_Link], Deferred]] | None = None,
        stale_intervals: int = 3,
        rand: Callable[[], float] = random.random,
        commands: Any = None,
    ) -> None:
        self.ingest = ingest
        self.rand = rand  # spreads the devices' first polls and the hosts' reconnections (seeded in tests)
        self.reactor = reactor
        self.clock = clock or reactor
        self._connector = connect or (lambda host, port, timeout: tcp_connect(reactor, host, port, timeout))
        self.stale_intervals = stale_intervals
        self.devices = DeviceNames(ingest, self.clock)
        self.errors = RateLimitedLog(log, self.clock)
        self.hosts: dict[tuple[str, int], ModbusHost] = {}
        self.polled: dict[str, PolledDevice] = {}
        self.reporter: StatusReport | None = None  # writes status() to modbus_devices, for gatewayctl
        self.commands = commands  # the gateway's commands service: devices with writable registers take write
        self.configure(devices)

    def configure(self, devices: tuple[ModbusDevice, ...]) -> list[str]:
        """Take new settings: unchanged devices keep polling; changed ones start over. Returns the changes."""
        new = {d.device: d for d in devices}
        changes = []
        for name in sorted(self.polled):
            if new.get(name) != self.polled[name].settings:
                self.polled.pop(name).stop()
                changes.append(f"Modbus device {name} {'changed' if name in new else 'removed'}")
        for name, settings in new.items():
            if name in self.polled:
                continue
            if not any(c.startswith(f"Modbus device {name} ") for c in changes):
                changes.append(f"Modbus device {name} added")
            polled = self.polled[name] = PolledDevice(settings, self._host(settings), self)
            if self.running:
                polled.start()
        for key in [k for k, h in self.hosts.items() if not any(p.host is h for p in self.polled.values())]:
            self.hosts.pop(key).stop()
        return changes

    def _host(self, settings: ModbusDevice) -> ModbusHost:
        key = (settings.host, settings.port)
        host = self.hosts.get(key)
        if host is None:
            connect = self._connector(settings.host, settings.port, max(settings.timeout, 5.0))
            host = self.hosts[key] = ModbusHost(
                settings.host, settings.port, self.clock, connect, settings.timeout, self.rand
            )
        return host

    def startService(self) -> None:
        super().startService()
        for polled in self.polled.values():
            polled.start()
        if self.reporter is not None:
            self.reporter.start()
        log.info(
            "Modbus: polling {devices} on {hosts}",
            devices=counted(len(self.polled), "device"),
            hosts=counted(len(self.hosts), "host"),
        )

    def stopService(self) -> Deferred:
        super().stopService()
        for polled in self.polled.values():
            polled.stop()
        for host in self.hosts.values():
            host.stop()
        return self.reporter.stop() if self.reporter is not None else succeed(None)

    def forget(self, names: list[str] | None = None) -> None:
        self.devices.forget(names)

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: polled.status() for name, polled in sorted(self.polled.items())}

    def health(self) -> dict[str, Any]:
        """For /healthz: how many devices are polled, and those not read lately with the reason."""
        return {"devices": len(self.polled), "stale": self.stale()}

    def stale(self) -> dict[str, str]:
        """Devices not read for ``stale_intervals`` intervals (or never, that long after the start), and why."""
        out = {}
        now = self.clock.seconds()
        for name, polled in sorted(self.polled.items()):
            c = polled.counters
            since = c.last_read_at if c.last_read_at is not None else polled.started_at
            if since is not None and now - since > self.stale_intervals * polled.settings.interval:
                out[name] = f"not read for {now - since:.0f}s" + (f": {c.last_error}" if c.last_error else "")
        return out

    def live_metrics(self) -> Iterator[Any]:
        polls = counter("gateway_modbus_polls", "Polls made of the device, complete or not.", ["device"])
        complete = counter(
            "gateway_modbus_polls_complete", "Polls that brought every value of their device.", ["device"]
        )
        gaps = counter(
            "gateway_modbus_gaps",
            "Polls that brought no or only some values (missed slot, timeout, unreachable, closed, exception, "
            "protocol, value, store, unknown_device, stopped): readings that will never exist.",
            ["device", "reason"],
        )
        exceptions = counter(
            "gateway_modbus_exceptions", "Modbus exception responses, by exception code.", ["device", "code"]
        )
        latency = gauge(
            "gateway_modbus_poll_seconds",
            "From the first request of the last poll to its last response.",
            labels=["device"],
        )
        age = gauge(
            "gateway_modbus_last_read_age_seconds", "Seconds since values last came from the device.", labels=["device"]
        )
        connected = gauge(
            "gateway_modbus_connected", "1 while the gateway holds a connection to the host.", labels=["host"]
        )
        now = self.clock.seconds()
        for name, polled in sorted(self.polled.items()):
            c = polled.counters
            polls.add_metric([name], c.polls)
            complete.add_metric([name], c.complete)
            for reason, n in sorted(c.gaps.items()):
                gaps.add_metric([name, reason], n)
            for code, n in sorted(c.exceptions.items()):
                exceptions.add_metric([name, str(code)], n)
            if c.last_poll_seconds is not None:
                latency.add_metric([name], c.last_poll_seconds)
            if c.last_read_at is not None:
                age.add_metric([name], now - c.last_read_at)
        for host in self.hosts.values():
            connected.add_metric([host.address], 1 if host.connected else 0)
        yield from (polls, complete, gaps, exceptions, latency, age, connected)
