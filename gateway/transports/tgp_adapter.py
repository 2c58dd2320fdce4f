"""
The gateway end of TGP: a thin Twisted protocol around ``protocols.tgp``
(the codec) and ``transports.session`` (answer order and flow control).

Theory of operation. ``dataReceived`` feeds the codec and handles events
one at a time. The handshake needs the database (the device's stored
key), so while that lookup runs the session is busy and no further event
is taken. Once READY, each DECLARE or DATA frame gets a ticket in the
session; DATA goes through the same ingest path as HTTPS and its Deferred
fires after COMMIT. The session releases answers strictly in frame order,
so an ACK always means "this frame and every one before it are settled".

Backpressure. A device may have ``window`` frames unanswered; past that,
and whenever the store's write queue has no room for a frame, the session
says pause and the protocol pauses the transport (the kernel's socket
buffer then pushes back on the device), resuming when answers drain or
the store has room again. Nothing is buffered without bound.

Failures. A protocol error from the device gets a NACK with its code and
the connection closes; so does a frame that could not be stored because
the database is down or full (RETRY_LATER with a delay): the device
reconnects and sends again whatever was not acknowledged. A frame whose
readings are refused (INVALID_READING, UNKNOWN_METRIC, REJECTED_BY_DATABASE)
gets a NACK, is kept in rejected_input, and the session goes on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway import tokens
from gateway.transports.devices import DeviceConnection, DeviceListenerFactory
from gateway.transports.tgp_commands import VERSION as COMMANDS_VERSION, Recorded, TgpDownlink
from gateway.transports.session import Ticket
from gateway.readings import (
    CloseReason,
    Device,
    InvalidInput,
    RateLimited,
    StoreOverloaded,
    StoreRejected,
    StoreUnavailable,
    MAX_TS_US,
    MIN_TS_US,
    WriteResult,
    check_reading,
    is_name,
)
from protocols import tgp

log = Logger()

E = tgp.ErrorCode

# The BYE code that says each reason the gateway ends a session for.
_BYE = {
    CloseReason.NORMAL: E.NORMAL,
    CloseReason.REPLACED: E.REPLACED,
    CloseReason.SHUTTING_DOWN: E.SHUTTING_DOWN,
    CloseReason.NOT_AUTHORIZED: E.AUTH_FAILED,
    CloseReason.TIMEOUT: E.TIMEOUT,
}


class DeviceProtocol(DeviceConnection):
    __slots__ = ("conn", "claimed_name", "stored_key", "_nonce", "downlink")

    def __init__(self, factory: DeviceFactory) -> None:
        super().__init__(factory)
        settings = factory.settings
        self.conn = tgp.Connection(
            tgp.GATEWAY, max_frame=settings.max_frame, max_metrics=settings.max_metrics, valid_name=is_name
        )
        self.claimed_name: str | None = None
        self.stored_key: bytes | None = None
        self._nonce = b""
        self.downlink: TgpDownlink | None = None  # version 3 sessions, when the gateway takes commands

    # -- connection ------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.conn.receive_data(data)
        if self.conn.state == tgp.READY:
            self._touch(self.factory.settings.idle_timeout)
        self._process()

    # -- events ----------------------------------------------------------

    def _process(self) -> None:
        while not self._closing and self.session.may_read:
            try:
                event = self.conn.next_event()
            except tgp.RemoteProtocolError as e:
                self._refuse_connection(e.code, e.message)
                return
            if event is tgp.NEED_DATA:
                return
            if event is tgp.CONNECTION_CLOSED:
                self.transport.loseConnection()
                return
            self._handle(event)

    def _handle(self, event: object) -> None:
        if isinstance(event, tgp.Data):
            self._data(event)
        elif isinstance(event, tgp.Declare):
            self._declare(event)
        elif isinstance(event, tgp.InvalidFrame):
            self._refuse_frame(event.seq, event.code, event.message, event.raw)
        elif isinstance(event, tgp.Result):
            self._result(event)
        elif isinstance(event, tgp.Received):
            if self.downlink is not None:
                self.downlink.received(event)
        elif isinstance(event, tgp.Ping):
            self._send(tgp.Pong(event.payload))
        elif isinstance(event, tgp.Pong):
            pass
        elif isinstance(event, tgp.Hello):
            self._hello(event)
        elif isinstance(event, tgp.Auth):
            self._auth(event)
        elif isinstance(event, tgp.Bye):
            self._closing = True
            self.transport.loseConnection()

    def _hello(self, hello: tgp.Hello) -> None:
        version = tgp.choose_version(hello)
        if version is None:
            self._refuse_handshake(E.UNSUPPORTED_VERSION, f"this gateway speaks TGP versions {list(tgp.VERSIONS)}")
            return
        self.claimed_name = hello.device
        self._looking_up(True)
        lookup = self.factory.ingest.device_key(hello.device) if is_name(hello.device) else succeed(None)

        def found(result: tuple[Device, bytes] | None) -> None:
            if self._closing:
                return
            if result is not None:
                self.device, self.stored_key = result
            # An unknown name gets a challenge too, so names cannot be probed.
            self._nonce = os.urandom(tgp.NONCE_SIZE)
            self._send(tgp.Challenge(version, self._nonce))
            self._looking_up(False)

        def failed(f: Failure) -> None:
            self.session.busy = False
            error = f.value
            if isinstance(error, (StoreUnavailable, StoreOverloaded)):
                self._refuse_handshake(E.RETRY_LATER, f"the gateway cannot check credentials now: {error.message}")
            else:
                log.failure("device lookup failed", f)
                self._refuse_handshake(E.INTERNAL_ERROR, "the gateway failed; retry later")

        lookup.addCallbacks(found, failed)

    def _auth(self, auth: tgp.Auth) -> None:
        name = self.claimed_name or ""
        ok = tokens.proof_matches(auth.proof, self.stored_key, self._nonce, name)
        if not ok or self.device is None:
            self.device = None
            self._refuse_handshake(E.AUTH_FAILED, "unknown device, revoked device or wrong token")
            return
        if not self.factory.certificate_allows(self.transport, name):
            self.device = None
            self._refuse_handshake(E.AUTH_FAILED, "the client certificate does not name this device")
            return
        settings = self.factory.settings
        self.factory.registry.register(name, self)
        self._send(
            tgp.Welcome(
                self.conn.version or 1,
                int(self.factory.clock.seconds() * 1_000_000),
                settings.max_frame,
                settings.window,
                settings.heartbeat,
                int(settings.idle_timeout),
            )
        )
        self._set_timer(settings.idle_timeout, self.idle_too_long)
        log.info("device {device} connected from {source}", device=name, source=self.source)
        if (self.conn.version or 1) >= COMMANDS_VERSION and self.factory.commands is not None:
            self.downlink = TgpDownlink(self, name, self.factory.commands)
            self.factory.commands.attach(name, self.downlink)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self.downlink is not None:
            self.factory.commands.detach(self.downlink.device, self.downlink)

    def _declare(self, declare: tgp.Declare) -> None:
        # Names were checked by the codec (valid_name): nothing to store.
        self._queue_answer(declare.seq, succeed(WriteResult(0, 0)))

    def _data(self, data: tgp.Data) -> None:
        assert self.device is not None
        readings = data.readings  # (metric, ts_us, value); names were checked when declared
        problem = first_invalid(readings)
        if problem is not None:
            self._refuse_frame(data.seq, E.INVALID_READING, problem, _render(data))
            return
        if not self.factory.ingest.admits(len(readings)):
            self._hold(data, self._data)
            return
        stored = self.factory.ingest.store_readings(self.device, readings, self.source, lambda: _render(data))
        self._queue_answer(data.seq, stored)

    def _result(self, event: tgp.Result) -> None:
        if self.downlink is None:  # a version 3 session of a gateway that takes no commands
            self._refuse_frame(event.seq, E.UNKNOWN_COMMAND, "this gateway takes no commands", _raw(event))
            return

        def answer(outcome: Any) -> Any:
            if outcome == E.UNKNOWN_COMMAND:
                message = f"no command {event.id!r} for this device"
                name = self.device.name if self.device else None
                self.factory.ingest.refuse(self.source, "unknown_command", message, device=name, raw=_raw(event))
                return _Refusal(E.UNKNOWN_COMMAND, message)
            return outcome

        self._queue_answer(event.seq, self.downlink.result(event).addCallback(answer))

    # -- answers, in order -----------------------------------------------

    def _queue_answer(self, seq: int, d: Deferred) -> None:
        ticket = self.session.arrived(seq, self.factory.clock.seconds())
        self.flow()
        d.addBoth(self._answer_ready, ticket)

    def _answer_ready(self, outcome: Any, ticket: Ticket[Any]) -> None:
        for ready in self.session.settle(ticket, outcome):
            if not self._closing:
                self._send_answer(ready.seq, ready.outcome, ready.arrived)
        self.flow()

    def _send_answer(self, seq: int, outcome: Any, arrived: float) -> None:
        if isinstance(outcome, WriteResult):
            # Readings kept in quarantine count as accepted: they are kept, and sending them again changes nothing.
            accepted = outcome.accepted + len(outcome.quarantined)
            # A version 1 ACK has no field for conflicts: the codec counts them with the duplicates.
            self._send(
                tgp.Ack(seq, min(accepted, 0xFFFF), min(outcome.duplicates, 0xFFFF), min(outcome.conflicts, 0xFFFF))
            )
            self.factory.metrics.acked(self.source, self.factory.clock.seconds() - arrived)
            if not isinstance(outcome, Recorded):
                self.readings += outcome.accepted
            return
        if isinstance(outcome, _Refusal):
            self.last_error = f"{outcome.code.name}: {outcome.message}"
            self._send(tgp.Nack(seq, outcome.code, outcome.message))
            return
        error = outcome.value if isinstance(outcome, Failure) else outcome
        self.last_error = f"{type(error).__name__}: {getattr(error, 'message', error)}"
        if isinstance(error, StoreRejected):
            self._send(tgp.Nack(seq, E.REJECTED_BY_DATABASE, error.message))
        elif isinstance(error, RateLimited):
            self._send(tgp.Nack(seq, E.RATE_LIMITED, error.message, error.retry_after or 1))
        elif isinstance(error, (StoreUnavailable, StoreOverloaded)):
            self._send(tgp.Nack(seq, E.RETRY_LATER, error.message, error.retry_after or 1))
            self._close()
        else:
            log.failure("storing a frame failed", outcome if isinstance(outcome, Failure) else None)
            self._send(tgp.Nack(seq, E.INTERNAL_ERROR, "the gateway failed; retry later", 5))
            self._close()

    # -- refusals and endings ---------------------------------------------

    def _refuse_frame(self, seq: int, code: tgp.ErrorCode, message: str, raw: bytes) -> None:
        name = self.device.name if self.device else None
        self.factory.ingest.refuse(self.source, code.name.lower(), message, device=name, raw=raw)
        self._queue_answer(seq, succeed(_Refusal(code, message)))

    def _refuse_connection(self, code: int, message: str) -> None:
        if self.device is not None:
            self.factory.ingest.refuse(
                self.source, _code_name(code).lower(), message, device=self.device.name, closing=True
            )
        else:
            reason = f"{message} (device {self.claimed_name})" if self.claimed_name else message
            self.factory.ingest.refuse(self.source, _code_name(code).lower(), reason, closing=True)
        self._send(tgp.Nack(0, code, message))
        self._close()

    def _refuse_handshake(self, code: tgp.ErrorCode, reason: str) -> None:
        # The claimed name is not proven: the log is keyed by address, not by a name anyone can send.
        self.factory.ingest.refuse(self.source, code.name.lower(), f"{reason} (device {self.claimed_name})")
        if self.conn.state in (tgp.HELLO_SENT, tgp.AUTH_SENT):
            self._send(tgp.Reject(code, reason))
        self._close()

    def end(self, code: CloseReason, reason: str) -> None:
        """Say BYE and close (replaced by a newer connection, shutting down)."""
        if self._closing:
            return
        if self.conn.state == tgp.READY:
            self._send(tgp.Bye(_BYE[code], reason))
        self._close()

    def _send(self, event: tgp.Event) -> None:
        try:
            data = self.conn.send(event)
        except tgp.LocalProtocolError:
            return  # the state moved on (the peer said BYE meanwhile)
        self.transport.write(data)

    # -- timers ----------------------------------------------------------

    def handshake_too_slow(self) -> None:
        self._timer = None
        if self.conn.state == tgp.READY:
            return
        seconds = self.factory.settings.handshake_timeout
        reason = f"no handshake within {seconds:g} seconds"
        self.factory.ingest.refuse(self.source, "timeout", reason, closing=True)
        # The spec's fatal codes go out before the close: REJECT when it is the gateway's
        # turn (a HELLO or an AUTH being answered), BYE otherwise.
        if self.conn.state in (tgp.HELLO_SENT, tgp.AUTH_SENT):
            self._send(tgp.Reject(E.TIMEOUT, reason))
        else:
            self._send(tgp.Bye(E.TIMEOUT, reason))
        self._close()

    def idle_too_long(self) -> None:
        self._timer = None
        if self._not_reading(self.factory.settings.idle_timeout):
            return
        self.end(CloseReason.TIMEOUT, f"nothing received for {self.factory.settings.idle_timeout:g} seconds")


@dataclass(frozen=True)
class _Refusal:
    code: tgp.ErrorCode
    message: str


def first_invalid(readings: tuple[tuple[str, int, float], ...]) -> str | None:
    """Why the first reading that breaks the ingest rules does, or None (a fast path for decoded frames)."""
    for i, (metric, ts_us, value) in enumerate(readings):
        if not (MIN_TS_US <= ts_us <= MAX_TS_US and -_INF < value < _INF):
            try:
                check_reading(metric, ts_us, value, f"readings[{i}]")
            except InvalidInput as e:
                return e.message
    return None


_INF = float("inf")


def _code_name(code: int) -> str:
    try:
        return tgp.ErrorCode(code).name
    except ValueError:
        return str(code)


def _raw(result: tgp.Result) -> bytes:
    """A RESULT frame as JSON, for the rejected-input table."""
    return json.dumps(
        {"seq": result.seq, "id": result.id, "status": int(result.status), "result": result.result}
    ).encode()


def _render(data: tgp.Data) -> bytes:
    """A DATA frame's readings as JSON lines, for the rejected-input table."""
    return json.dumps({"seq": data.seq, "readings": [list(r) for r in data.readings]}, allow_nan=True).encode()


class DeviceFactory(DeviceListenerFactory):
    protocol = DeviceProtocol
    transport_name = "tgp"
