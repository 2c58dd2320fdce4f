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
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.commands.model import Command
from gateway.commands.service import IDownlink
from gateway.readings import (
    InvalidInput,
    RateLimited,
    Reading,
    StoreOverloaded,
    StoreRejected,
    StoreUnavailable,
    check_reading,
)
from gateway.transports.devices import DeviceListenerFactory
from gateway.transports.tracker_session import TrackerDownlink, TrackerSession
from gateway.transports.trackers import Jumps, held_back
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


class Gt06Protocol(TrackerSession):
    __slots__ = ("_serial",)
    framing_error = gt06.ProtocolError
    protocol_name = "GT06"

    def __init__(self, factory: Gt06Factory) -> None:
        super().__init__(factory)
        self.conn = gt06.ServerConnection()
        self._serial = 0

    def _handle(self, event: object) -> None:
        if isinstance(event, gt06.Login):
            answer = self.conn.answer(gt06.LOGIN, event.serial)
            self.sign_in(event.imei, accepted=lambda: self.transport.write(answer), refused=lambda: None)
        elif isinstance(event, gt06.BadPacket):
            self._bad_packet(event.reason, event.raw)
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

    def make_downlink(self, device: str) -> Gt06Downlink:
        return Gt06Downlink(self, device, self.factory.commands)

    def _jump(self, ts_us: int, lat: float, lon: float) -> str | None:
        assert self.device is not None
        return self.factory.jumps.check(self.device.name, ts_us, lat, lon)

    def _store(self, protocol: int, serial: int, readings: list[Reading], held: Sequence[Any] = ()) -> None:
        assert self.device is not None
        if not readings and not held:  # a location without a fix: nothing to store, answered
            self._queue(Deferred.fromCoroutine(self._nothing()), protocol, serial)
            return
        if not self.factory.ingest.admits(len(readings) + len(held)):
            self._hold((protocol, serial, readings, held), lambda waiting: self._store(*waiting))
            return
        raw = lambda: f"GT06 {protocol:#04x} serial {serial}: {readings}".encode()  # noqa: E731
        kept = held_back(held, len(readings))
        stored = self.factory.ingest.store_readings(self.device, readings, self.source, raw, kept)
        self._queue(stored, protocol, serial)

    async def _nothing(self) -> None:
        return None

    def _answer(self, protocol: int, serial: int, outcome: Any, arrived: float) -> None:
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
            self.factory.metrics.acked(self.source, self.factory.clock.seconds() - arrived)
        self.transport.write(self.conn.answer(protocol, serial))

    def next_serial(self) -> int:
        self._serial = self._serial % 0xFFFF + 1
        return self._serial


@implementer(IDownlink)
class Gt06Downlink(TrackerDownlink):
    """Online commands (0x80) to one tracker; the server flag of each names its answer."""

    transport = "gt06"

    def __init__(self, session: Gt06Protocol, device: str, commands: Any) -> None:
        super().__init__(session, device, commands)
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
        if command is not None:
            self._succeeded(command, text)


class Gt06Factory(DeviceListenerFactory):
    protocol = Gt06Protocol
    transport_name = "gt06"
    allow: tuple[Any, ...] = ()  # --tracker-allow: the address ranges trackers may connect from (none: any)
    jumps = Jumps(None)  # the impossible-jump rule (--tracker-max-speed); set by the plugin
