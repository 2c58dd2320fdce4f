"""
The commands API: people and programs send commands to a device and follow
them (``/v1/devices/{name}/commands``, ``/v1/commands/{id}``) and set its
desired configuration (``/v1/devices/{name}/desired``); a device that
speaks HTTPS polls for its own and reports their results
(``GET /v1/commands?wait=30``, ``POST /v1/commands/{id}/result``) with its
device token. Sending and canceling need the operator role (or admin);
reading a command's state, the reader role.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from gateway.api.read import ApiError, Call, _limit, _one, decode_cursor, encode_cursor
from gateway.commands.model import STATES, Command, CommandError, parse_request, parse_result
from gateway.commands.service import MAX_WAIT, Commands, IDownlink
from gateway.readings import Device, IngestError, is_name

POLL_LIMIT = 20  # commands a device is given in one answer
STATUS = {  # the HTTP answer to each command error code
    "invalid_command": 400,
    "invalid_result": 400,
    "no_such_device": 404,
    "not_found": 404,
    "id_in_use": 409,
    "not_cancelable": 409,
}


class Answer(dict[str, Any]):
    """A document answered with another status than 200."""

    def __init__(self, status: int, doc: dict[str, Any]) -> None:
        super().__init__(doc)
        self.status = status


def _json(body: bytes) -> Any:
    try:
        return json.loads(body) if body.strip() else {}
    except ValueError as e:
        raise ApiError("invalid_json", f"the body is not JSON: {e}") from None


def _wait(args: dict[bytes, list[bytes]]) -> float:
    text = _one(args, "wait")
    if text is None:
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_WAIT:
        raise ApiError("invalid_parameter", f"wait: {text!r} is not a number of seconds in 0..{MAX_WAIT:g}")
    return seconds


def _refused(e: CommandError) -> ApiError:
    return ApiError(e.code, e.message)


@implementer(IDownlink)
class _Poll:
    """A device's long poll as its downlink: the first commands sent answer it."""

    transport = "https"

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.got: list[Command] = []
        self.done: Deferred = Deferred()

    def room(self) -> int:
        return POLL_LIMIT - len(self.got)

    def deliver(self, command: Command) -> None:
        self.got.append(command)
        if len(self.got) == 1:  # the rest of this flush's commands come in the same turn of the reactor
            self.clock.callLater(0, self._answer)

    def _answer(self) -> None:
        if not self.done.called:
            self.done.callback(None)


class CommandsApi:
    """The routes' work; ``authenticate(token, source)`` proves a device token (the ingest path's check)."""

    def __init__(self, commands: Commands, authenticate: Callable[[str | None, Any], Any], clock: IReactorTime) -> None:
        self.service = commands
        self.authenticate = authenticate
        self.clock = clock

    async def _device(self, call: Call) -> Device:
        try:
            return await self.authenticate(call.credentials.token, call.source)
        except IngestError as e:
            raise ApiError("unauthorized", e.message) from None

    async def send(self, call: Call, name: str) -> Answer:
        try:
            request = parse_request(_json(call.body))
            command, new = await self.service.send(name, request, call.who)
        except CommandError as e:
            raise _refused(e) from None
        return Answer(202 if new else 200, command.doc())

    async def of_device(self, args: Any, name: str) -> dict[str, Any]:
        state = _one(args, "state")
        if state is not None and state not in STATES:
            raise ApiError("invalid_parameter", f"state: {state!r} is not one of {', '.join(STATES)}")
        limit = _limit(args)
        before = decode_cursor(_one(args, "cursor"), is_name)
        if not await self.service.ledger.device_exists(name):
            raise ApiError("no_such_device", f"no device {name!r}")
        page = await self.service.ledger.of_device(name, state, limit + 1, before)
        shown = page[:limit]
        return {
            "device": name,
            "commands": [c.doc() for c in shown],
            "next_cursor": encode_cursor(shown[-1].id) if len(page) > limit else None,
        }

    async def desired(self, args: Any, name: str) -> dict[str, Any]:
        try:
            return dict(await self.service.twin.get(name))
        except CommandError as e:
            raise _refused(e) from None

    async def desire(self, call: Call, name: str) -> dict[str, Any]:
        """Set the device's desired configuration: a new version, its delta queued to the device."""
        try:
            return dict(await self.service.twin.desire(name, _json(call.body), call.who))
        except CommandError as e:
            raise _refused(e) from None

    async def show(self, args: Any, id_: str) -> dict[str, Any]:
        wait = _wait(args)
        command = await self.service.wait(id_, wait) if wait else await self.service.ledger.find(id_)
        if command is None:
            raise ApiError("not_found", f"no command {id_!r}")
        shown = await self.service.ledger.find(id_, history=True)
        return (shown or command).doc()

    async def cancel(self, call: Call, id_: str) -> dict[str, Any]:
        try:
            return (await self.service.cancel(id_, call.who)).doc()
        except CommandError as e:
            raise _refused(e) from None

    async def poll(self, call: Call) -> dict[str, Any]:
        """A device's commands to run: at once when some wait, else when one comes within ``wait`` seconds."""
        device = await self._device(call)
        wait = _wait(call.args)
        commands = await self.service.take(device.name, "https", POLL_LIMIT)
        if not commands and wait:
            poll = _Poll(self.clock)
            self.service.attach(device.name, poll, back=False)
            timer = self.clock.callLater(wait, poll._answer)
            try:
                await poll.done
            finally:
                self.service.detach(device.name, poll)
                if timer.active():
                    timer.cancel()
            commands = poll.got
        return {"commands": [c.wire() for c in commands]}

    async def result(self, call: Call, id_: str) -> dict[str, Any]:
        device = await self._device(call)
        try:
            status, result = parse_result(_json(call.body))
        except CommandError as e:
            raise _refused(e) from None
        recorded = await self.service.finished(device.name, id_, status, result, "https")
        if not recorded:
            command = await self.service.ledger.find(id_)
            if command is None or command.device != device.name:
                raise ApiError("not_found", f"no command {id_!r} for device {device.name}")
            return {"id": id_, "state": command.state, "recorded": False}
        return {"id": id_, "state": status, "recorded": True}
