"""
Commands over TGP version 3 (SPEC.rst, Commands): the session of a device
that chose version 3 is its downlink. Each command goes out as COMMAND; the
device's RECEIVED makes it ``delivered``; its RESULT (a numbered frame) is
recorded and then acknowledged in frame order like DATA: ACK accepted 1 when
recorded now, duplicates 1 when recorded before, NACK 25 UNKNOWN_COMMAND when
the id names no command of this device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from gateway.commands.model import Command
from gateway.commands.service import IDownlink
from gateway.readings import WriteResult
from protocols import tgp

log = Logger()

WINDOW = 10  # commands sent and not yet RECEIVED, per session
VERSION = 3  # the first version with commands


@dataclass(frozen=True)
class Recorded(WriteResult):
    """A RESULT's answer, in an ACK's counts (accepted 1: recorded now; duplicates 1: before): no reading."""


@implementer(IDownlink)
class TgpDownlink:
    transport = "tgp"

    def __init__(self, session: Any, device: str, commands: Any) -> None:
        self.session = session
        self.device = device
        self.commands = commands
        self.in_flight: dict[str, float] = {}  # command id -> when sent, until RECEIVED

    def room(self) -> int:
        # A command not RECEIVED within the resend interval is due again (the service sends it, oldest first):
        # it no longer holds a place, so a device that never answers cannot stop its commands for good.
        stale = self.session.factory.clock.seconds() - self.commands.resend
        for id_ in [i for i, sent in self.in_flight.items() if sent <= stale]:
            del self.in_flight[id_]
        return max(0, WINDOW - len(self.in_flight))

    def deliver(self, command: Command) -> None:
        self.in_flight[command.id] = self.session.factory.clock.seconds()
        params = json.dumps(command.params, separators=(",", ":"))
        self.session._send(tgp.Command(command.id, round(command.expires * 1e6), command.name, params))

    def received(self, event: tgp.Received) -> None:
        self.in_flight.pop(event.id, None)
        d = Deferred.fromCoroutine(self.commands.delivered(self.device, event.id))
        d.addErrback(lambda f: log.warn("RECEIVED of {id} not recorded: {e}", id=event.id, e=f.value))

    def result(self, event: tgp.Result) -> Deferred:
        """Fires with the RESULT's answer: a WriteResult (ACK) or UNKNOWN_COMMAND (a refusal's code)."""
        try:
            value = json.loads(event.result)
        except ValueError:
            value = event.result  # kept as the text the device sent
        status = "succeeded" if event.status == tgp.CommandStatus.SUCCEEDED else "failed"
        self.in_flight.pop(event.id, None)
        return Deferred.fromCoroutine(self._record(event.id, status, value))

    async def _record(self, id_: str, status: str, value: Any) -> Recorded | tgp.ErrorCode:
        if await self.commands.finished(self.device, id_, status, value, "tgp"):
            return Recorded(1, 0)
        known = await self.commands.ledger.find(id_)
        if known is None or known.device != self.device:
            return tgp.ErrorCode.UNKNOWN_COMMAND
        return Recorded(0, 1)  # recorded before (or expired or canceled): changes nothing
