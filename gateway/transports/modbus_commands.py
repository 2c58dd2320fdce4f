"""
Commands to a polled Modbus device: ``write`` with ``{"metric": …, "value":
…}`` sets a register marked ``writable = true`` (its scale and offset undone,
encoded in its type and byte and word order; function 5, 6, 15 or 16), then
reads it back: the command succeeds only if the device holds the value.

The device's answer to the write (its echo) makes the command ``delivered``;
an exception answer fails it with the exception's code. A write that gets no
answer (a timeout, the host unreachable) is not known to have happened: the
command stays ``sent`` and the same write goes again as soon as the host may
be tried again (setting a value twice is setting it once), until it is
answered or expires.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from gateway.commands.model import Command
from gateway.commands.service import IDownlink
from gateway.transports.modbus_host import ReadFailed
from gateway.transports.modbus_map import Read, Register

log = Logger()


@implementer(IDownlink)
class ModbusDownlink:
    """One polled device's writable registers, as a downlink: one command at a time."""

    transport = "modbus"

    def __init__(self, polled: Any, commands: Any) -> None:
        self.polled = polled  # a modbus_poll.PolledDevice
        self.commands = commands
        self.busy = False
        self.writes = 0  # commands that wrote and read back the value
        self.writable = {r.metric: r for r in polled.settings.registers if r.writable}

    @property
    def device(self) -> str:
        return str(self.polled.settings.device)

    def room(self) -> int:
        return 0 if self.busy else 1

    def deliver(self, command: Command) -> None:
        self.busy = True

        def done(result: Any) -> None:
            self.busy = False
            self.commands.flush(self.device)  # the next one, if any

        d = Deferred.fromCoroutine(self._run(command))
        d.addErrback(lambda f: log.failure("Modbus command {id} failed", f, id=command.id))
        d.addBoth(done)

    async def _fail(self, command: Command, error: str, **more: Any) -> None:
        await self.commands.finished(self.device, command.id, "failed", {"error": error, **more}, "modbus")

    async def _run(self, command: Command) -> None:
        if command.name != "write":
            await self._fail(command, f"unknown command {command.name!r}: a Modbus device takes write")
            return
        metric, value = command.params.get("metric"), command.params.get("value")
        register = self.writable.get(metric) if isinstance(metric, str) else None
        if register is None:
            known = ", ".join(sorted(self.writable)) or "none"
            await self._fail(command, f"metric: {metric!r} is not a writable register of {self.device} ({known})")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            await self._fail(command, f"value: {value!r} is not a number")
            return
        try:
            items = register.items_for(float(value))
        except ValueError as e:
            await self._fail(command, f"value: {e}")
            return
        read = Read(register.kind, register.address, register.width, (register,))
        host = self.polled.host
        try:
            await host.submit(self.polled, read, items, register.function)
        except ReadFailed as e:
            if e.reason == "exception":
                await self._fail(command, e.message, exception_code=e.code)
            else:  # not known to be written: sent again after the resend interval, or when the host is back
                log.warn(
                    "write of {metric} to {device} not answered: {error}",
                    metric=metric,
                    device=self.device,
                    error=e.message,
                )
            return
        await self.commands.delivered(self.device, command.id)
        await self._read_back(command, register, read, items)

    def _again(self, host: Any) -> None:
        clock = self.polled.clock
        delay = max(1.0, host.retry_at - clock.seconds())

        def flush() -> None:
            if self.commands.downlinks.get(self.device) is self:
                self.commands.flush(self.device, resend=0.0)

        clock.callLater(delay, flush)

    async def _read_back(self, command: Command, register: Register, read: Read, items: tuple[int, ...]) -> None:
        try:
            values, _ = await self.polled.host.submit(self.polled, read)
        except ReadFailed as e:
            await self._fail(command, f"written, but not read back: {e.message}", metric=register.metric)
            return
        held = register.value(values)
        if tuple(values) != tuple(items):
            await self._fail(command, f"the device holds {held!r} after the write", metric=register.metric, value=held)
            return
        self.writes += 1
        result = {"metric": register.metric, "value": held}
        await self.commands.finished(self.device, command.id, "succeeded", result, "modbus")
