"""
The gateway end of the GT06 protocol (Concox/Jimi trackers): a thin Twisted
protocol around ``protocols.gt06``.

Theory of operation. The login (the tracker's IMEI) is answered once the
device bound to it is known (``gatewayctl device add --imei``); an unknown or
revoked IMEI gets no answer and the connection closes. Locations, status
(the tracker's heartbeat) and alarms become readings and are answered with
their protocol number and serial only after they are committed (or
journaled), in the order they came. A location becomes ``lat``, ``lon``,
``speed``, ``heading`` and ``satellites`` at its own time, only with a fix;
status becomes ``ignition``, ``charging``, ``voltage_level`` and
``gsm_signal`` at its arrival (it carries no time); an alarm, its position
and status and ``alarm`` (the tracker's code) at its time.

Commands: the online command (0x80) with the command's ``text`` parameter,
or its name and ``args``; its server flag names the command, so the
tracker's answer (0x15) is that command's result, ``{"response": …}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.commands.model import Command
from gateway.commands.service import IDownlink
from gateway.readings import (
    CloseReason,
    Device,
    InvalidInput,
    RateLimited,
    Reading,
    StoreOverloaded,
    StoreRejected,
    StoreUnavailable,
    check_reading,
)
from gateway.transports.devices import DeviceConnection, DeviceListenerFactory
from gateway.transports.session import Ticket
from gateway.transports.trackers import Jumps, allowed, held_back
from protocols import gt06

log = Logger()

WINDOW = 4  # commands in flight to one tracker


def position_readings(p: gt06.Position, jump: Any = lambda ts, lat, lon: None) -> tuple[list[Reading], list[Any]]:
    """A position's readings when fixed, or (failing ``jump``, which names the rule) held with the rule."""
    if not p.fixed or p.satellites == 0 or (p.latitude == 0 and p.longitude == 0):
        return [], []
    ts = p.time_s * 1_000_000
    values = (("lat", p.latitude), ("lon", p.longitude), ("speed", p.speed), ("heading", p.course))
    readings = [check_reading(m, ts, float(v), m) for m, v in (*values, ("satellites", p.satellites))]
    rule = jump(ts, p.latitude, p.longitude)
    return ([], [(r, rule) for r in readings]) if rule else (readings, [])


def status_readings(s: gt06.TerminalStatus, ts_us: int, alarm: bool = False) -> list[Reading]:
    out = [
        Reading("ignition", ts_us, float(s.info >> 1 & 1)),
        Reading("charging", ts_us, float(s.info >> 2 & 1)),
        Reading("voltage_level", ts_us, float(s.voltage)),
        Reading("gsm_signal", ts_us, float(s.gsm)),
    ]
    if alarm:
        out.append(Reading("alarm", ts_us, float(s.alarm)))
    return out


class Gt06Protocol(DeviceConnection):
    __slots__ = ("conn", "_seq", "_serial", "downlink")

    def __init__(self, factory: Gt06Factory) -> None:
        super().__init__(factory)
        self.conn = gt06.ServerConnection()
        self._seq = 0
        self._serial = 0
        self.downlink: Gt06Downlink | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if not allowed(self.source.host, self.factory.allow):
            message = f"{self.source.host} is outside --tracker-allow"
            self.factory.ingest.refuse(self.source, "not_allowed", message, closing=True)
            self._close()

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.conn.receive_data(data)
        if self.device is not None:
            self._touch(self.factory.settings.idle_timeout)
        self._process()

    def _process(self) -> None:
        while not self._closing and self.session.may_read:
            try:
                event = self.conn.next_event()
            except gt06.ProtocolError as e:
                name = self.device.name if self.device else None
                self.factory.ingest.refuse(self.source, "bad_frame", str(e), device=name, closing=True)
                self._close()
                return
            if event is gt06.NEED_DATA:
                return
            if event is gt06.CONNECTION_CLOSED:
                self._close()
                return
            self._handle(event)

    def _handle(self, event: object) -> None:
        if isinstance(event, gt06.Login):
            self._login(event)
        elif isinstance(event, gt06.BadPacket):
            name = self.device.name if self.device else None
            self.last_error = event.reason
            self.factory.ingest.refuse(self.source, "bad_packet", event.reason, device=name, raw=event.raw)
        elif self.device is None:  # nothing counts before the login is answered
            self.factory.ingest.refuse(self.source, "not_logged_in", f"{type(event).__name__} before a login",
                                       closing=True)  # fmt: skip
            self._close()
        elif isinstance(event, gt06.Location):
            self._store(event.protocol, event.serial, *position_readings(event.position, self._jump))
        elif isinstance(event, gt06.Status):
            now = int(self.factory.clock.seconds() * 1_000_000)
            self._store(gt06.STATUS, event.serial, status_readings(event.status, now))
        elif isinstance(event, gt06.Alarm):
            when = event.position.time_s * 1_000_000
            readings, held = position_readings(event.position, self._jump)
            self._store(event.protocol, event.serial, readings + status_readings(event.status, when, alarm=True), held)
        elif isinstance(event, gt06.CommandAnswer) and self.downlink is not None:
            self.downlink.answered(event.server_flag, event.text)

    def _login(self, login: gt06.Login) -> None:
        self._looking_up(True)

        def found(device: Device | None) -> None:
            self.session.busy = False
            if self._closing:
                return
            if device is None:
                message = f"unknown or revoked IMEI {login.imei} (gatewayctl device add NAME --imei {login.imei})"
                self.factory.ingest.refuse(self.source, "unknown_imei", message, raw=login.imei.encode(), closing=True)
                self._close()  # no answer: the GT06 way of refusing
                return
            self.device = device
            self.factory.registry.register(device.name, self)
            self.transport.write(self.conn.answer(gt06.LOGIN, login.serial))
            self._set_timer(self.factory.settings.idle_timeout, self.idle_too_long)
            log.info("tracker {device} (IMEI {imei}, GT06) connected from {source}", device=device.name,
                     imei=login.imei, source=self.source)  # fmt: skip
            if self.factory.commands is not None:
                self.downlink = Gt06Downlink(self, device.name, self.factory.commands)
                self.factory.commands.attach(device.name, self.downlink)
            self._looking_up(False)

        def failed(f: Failure) -> None:
            self.session.busy = False
            if not isinstance(f.value, (StoreUnavailable, StoreOverloaded)):
                log.failure("IMEI lookup failed", f)
            self.factory.ingest.refuse(self.source, "retry_later", "the gateway cannot look the IMEI up now",
                                       closing=True)  # fmt: skip
            self._close()

        self.factory.ingest.device_by_imei(login.imei).addCallbacks(found, failed)

    def _jump(self, ts_us: int, lat: float, lon: float) -> str | None:
        assert self.device is not None
        return self.factory.jumps.check(self.device.name, ts_us, lat, lon)

    def _store(self, protocol: int, serial: int, readings: list[Reading], held: Sequence[Any] = ()) -> None:
        assert self.device is not None
        if not readings and not held:  # a location without a fix: nothing to store, answered
            self._queue(protocol, serial, Deferred.fromCoroutine(self._nothing()))
            return
        if not self.factory.ingest.admits(len(readings) + len(held)):
            self._hold((protocol, serial, readings, held), lambda waiting: self._store(*waiting))
            return
        raw = lambda: f"GT06 {protocol:#04x} serial {serial}: {readings}".encode()  # noqa: E731
        kept = held_back(held, len(readings))
        stored = self.factory.ingest.store_readings(self.device, readings, self.source, raw, kept)
        self._queue(protocol, serial, stored)

    async def _nothing(self) -> None:
        return None

    def _queue(self, protocol: int, serial: int, d: Deferred) -> None:
        self._seq += 1
        ticket = self.session.arrived(self._seq, self.factory.clock.seconds())
        self.flow()
        d.addBoth(lambda outcome: (protocol, serial, outcome)).addCallback(self._answer_ready, ticket)

    def _answer_ready(self, outcome: Any, ticket: Ticket[Any]) -> None:
        for ready in self.session.settle(ticket, outcome):
            if not self._closing:
                answered: Any = ready.outcome  # (protocol, serial, the write's outcome), as _queue made it
                self._answer(*answered)
        self.flow()

    def _answer(self, protocol: int, serial: int, outcome: Any) -> None:
        if isinstance(outcome, Failure):
            error = outcome.value
            self.last_error = f"{type(error).__name__}: {getattr(error, 'message', error)}"
            if isinstance(error, (StoreUnavailable, StoreOverloaded)):
                self._close()  # no answer: the tracker keeps the packet and sends it again
                return
            if not isinstance(error, (InvalidInput, StoreRejected, RateLimited)):
                log.failure("storing GT06 readings failed", outcome)
                self._close()
                return
            # Refused for good and kept by the ingest path: answered, or the tracker would send it for ever.
        else:
            self.readings += getattr(outcome, "accepted", 0)
        self.transport.write(self.conn.answer(protocol, serial))

    def next_serial(self) -> int:
        self._serial = self._serial % 0xFFFF + 1
        return self._serial

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self.downlink is not None:
            self.factory.commands.detach(self.downlink.device, self.downlink)

    def end(self, code: CloseReason, reason: str) -> None:
        if not self._closing:
            self._close()

    def handshake_too_slow(self) -> None:
        self._timer = None
        if self.device is not None or self._closing:
            return
        seconds = self.factory.settings.handshake_timeout
        self.factory.ingest.refuse(self.source, "timeout", f"no login within {seconds:g} seconds", closing=True)
        self._close()

    def idle_too_long(self) -> None:
        self._timer = None
        if self._not_reading(self.factory.settings.idle_timeout):
            return
        self._close()


@implementer(IDownlink)
class Gt06Downlink:
    """Online commands (0x80) to one tracker; the server flag of each names its answer."""

    transport = "gt06"

    def __init__(self, session: Gt06Protocol, device: str, commands: Any) -> None:
        self.session = session
        self.device = device
        self.commands = commands
        self.in_flight: dict[int, Command] = {}  # server flag -> command
        self._flag = 0

    def room(self) -> int:
        return max(0, WINDOW - len(self.in_flight))

    def deliver(self, command: Command) -> None:
        text = command.params.get("text")
        if not isinstance(text, str):
            args = command.params.get("args")
            text = command.name if args is None else f"{command.name},{args}#"
        self._flag = self._flag % 0xFFFFFFFF + 1
        self.in_flight[self._flag] = command
        try:
            data = self.session.conn.command(text, self._flag, self.session.next_serial())
        except (ValueError, UnicodeEncodeError) as e:
            del self.in_flight[self._flag]
            result = {"error": f"not sent: {e}"}
            Deferred.fromCoroutine(self.commands.finished(self.device, command.id, "failed", result, self.transport))
            return
        self.session.transport.write(data)

    def answered(self, flag: int, text: str) -> None:
        command = self.in_flight.pop(flag, None)
        if command is None:
            return
        d = Deferred.fromCoroutine(self.commands.finished(self.device, command.id, "succeeded", {"response": text},
                                                          self.transport))  # fmt: skip
        d.addErrback(lambda f: log.warn("the answer to {id} not recorded: {e}", id=command.id, e=f.value))
        d.addBoth(lambda _: self.commands.flush(self.device))


class Gt06Factory(DeviceListenerFactory):
    protocol = Gt06Protocol
    transport_name = "gt06"
    allow: tuple[Any, ...] = ()  # --tracker-allow: the address ranges trackers may connect from (none: any)
    jumps = Jumps(None)  # the impossible-jump rule (--tracker-max-speed); set by the plugin
