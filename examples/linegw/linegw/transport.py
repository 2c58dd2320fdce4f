"""
The line protocol on txgateway's transport interface: a plugin that adds
``--line ENDPOINT`` and takes readings through the gateway's ingest core, so
that they are stored once, in order, and answered only after COMMIT.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.plugin import IPlugin
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.readings import CloseReason, IngestError, Reading, Source, check_reading
from gateway.settings import Setting, server_endpoint
from gateway.transport import IDeviceTransport, Port, Transport, TransportContext
from linegw import codec

WINDOW = 64  # readings a device may have waiting for COMMIT before the gateway stops reading from it


class LineSession(Protocol, TimeoutMixin):
    transport: Any  # a TCP or TLS transport once connected

    def __init__(self, factory: LineFactory) -> None:
        self.factory = factory
        self.codec = codec.LineCodec()
        self.device: Any = None
        self.readings = 0  # stored (or found stored) over this connection
        self.last_error = ""
        self.waiting: deque[codec.Event] = deque()  # received, not yet taken: the transport is paused meanwhile
        self.answers: dict[int, bytes] = {}  # answers ready, by reading number, sent in order
        self.sent = 0  # readings answered so far
        self.taken = 0  # readings taken (numbered) so far
        self.busy = False  # signing in, or waiting for room
        self.last = 0  # the line whose answer ends the connection (a refused one), once there is one
        self.paused = False

    def callLater(self, period: float, func: Any) -> Any:  # TimeoutMixin's timer, on the gateway's reactor
        return self.factory.context.reactor.callLater(period, func)

    @property
    def transport_label(self) -> str:
        return "line+tls" if self.factory.tls else "line"

    def connectionMade(self) -> None:
        self.since = self.factory.context.reactor.seconds()
        self.source = Source.of(self.transport_label, self.transport.getPeer(), self.factory.tls)
        self.factory.connections.add(self)
        self.setTimeout(self.factory.idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self.waiting.extend(self.codec.receive(data))
        self._run()

    def _run(self) -> None:
        ingest = self.factory.context.ingest
        while self.waiting and not self.busy and self.connected:
            event = self.waiting[0]
            if isinstance(event, codec.Bad):
                self._refuse("bad_line", event.reason)
                return
            if isinstance(event, codec.Auth):
                self.waiting.popleft()
                if self.device is not None:
                    self._refuse("bad_line", "AUTH was sent already")
                    return
                self.busy = True
                Deferred.fromCoroutine(ingest.authenticate(event.token, self.source)).addCallbacks(
                    self._signed_in, self._not_signed_in
                )
                break
            if self.device is None:
                self._refuse("unauthorized", "send 'AUTH <token>' first")
                return
            if self.taken - self.sent >= WINDOW:
                break  # answers catch up first
            if not ingest.admits(1):
                self.busy = True
                ingest.wait_for_room().addCallback(self._room)
                break
            self.waiting.popleft()
            self._store(event)
        self._flow()

    def _store(self, event: codec.Value) -> None:
        self.taken += 1
        n = self.taken
        try:
            reading: Reading = check_reading(event.metric, event.ts_ms * 1000, event.value, f"line {n}")
        except IngestError as e:
            self._answer(n, codec.error(n, e.code, e.message))
            return
        raw = f"{event.metric} {event.value!r} {event.ts_ms}".encode()
        d = self.factory.context.ingest.store_readings(self.device, [reading], self.source, lambda: raw)
        d.addCallbacks(self._stored, self._not_stored, callbackArgs=(n,), errbackArgs=(n,))

    def _stored(self, result: Any, n: int) -> None:
        self.readings += 1
        self._answer(n, codec.ack(n))

    def _not_stored(self, f: Failure, n: int) -> None:
        error = f.value
        if not isinstance(error, IngestError):
            self.last_error = "the gateway failed; send it again later"
            self.transport.loseConnection()  # unanswered: the device sends it again
            return
        self.last_error = error.message
        self._answer(n, codec.error(n, error.code, error.message))

    def _answer(self, n: int, line: bytes) -> None:
        self.answers[n] = line
        while self.sent + 1 in self.answers:
            self.sent += 1
            if self.connected:
                self.transport.write(self.answers.pop(self.sent))
            else:
                del self.answers[self.sent]
            if self.sent == self.last:
                self.transport.loseConnection()
                return
        self._run()

    def _signed_in(self, device: Any) -> None:
        self.busy = False
        self.device = device
        self.factory.context.registry.register(device.name, self)
        if self.connected:
            self.transport.write(b"OK\n")
        self._run()

    def _not_signed_in(self, f: Failure) -> None:
        self.busy = False
        message = f.value.message if isinstance(f.value, IngestError) else "the gateway failed; retry later"
        self._close_with(codec.error(0, "unauthorized", message))

    def _room(self, _: Any) -> None:
        self.busy = False
        self._run()

    def _refuse(self, code: str, reason: str) -> None:
        """Answer the line with an error after the answers before it, then close."""
        device = self.device.name if self.device is not None else None
        self.factory.context.ingest.refuse(self.source, code, reason, device=device, closing=True)
        self.waiting.clear()
        self.codec.broken = True  # nothing after it is read
        self.taken += 1
        self.last = self.taken
        self._answer(self.taken, codec.error(self.taken, code, reason))

    def _close_with(self, line: bytes) -> None:
        self.waiting.clear()
        if self.connected:
            self.transport.write(line)
            self.transport.loseConnection()

    def _flow(self) -> None:
        """Read no more while something waits: what is waiting is all this connection holds."""
        hold = bool(self.waiting) or self.busy
        if hold and not self.paused:
            self.paused = True
            self.transport.pauseProducing()
        elif not hold and self.paused:
            self.paused = False
            self.transport.resumeProducing()

    # -- what the gateway asks of a session ------------------------------

    def stop_reading(self) -> None:
        self.paused = True
        self.transport.pauseProducing()

    def end(self, reason: CloseReason, text: str) -> None:
        self._close_with(f"BYE {reason.value} {text}\n".encode("ascii", "replace"))

    def timeoutConnection(self) -> None:
        self.end(CloseReason.TIMEOUT, f"nothing received for {self.factory.idle_timeout:g} seconds")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self.setTimeout(None)
        self.factory.connections.discard(self)
        if self.device is not None:
            self.factory.context.registry.unregister(self.device.name, self)


class LineFactory(Factory):
    noisy = False

    def __init__(self, context: TransportContext, tls: bool, idle_timeout: float) -> None:
        self.context = context
        self.tls = tls
        self.idle_timeout = idle_timeout
        self.connections: set[LineSession] = set()

    def buildProtocol(self, addr: Any) -> LineSession:
        return LineSession(self)


class LineTransport(Transport):
    name = "line"

    def __init__(self, config: Any, context: TransportContext) -> None:
        super().__init__()
        self.specs = config.line
        self.factories = [LineFactory(context, spec.tls, config.device_idle_timeout) for spec in self.specs]

    def ports(self) -> list[Port]:
        what = "the line protocol"
        return [
            Port(spec, factory, "line", f"{what} over TLS" if spec.tls else what)
            for spec, factory in zip(self.specs, self.factories)
        ]

    def sessions(self) -> list[LineSession]:
        return [s for f in self.factories for s in f.connections]

    def connections(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for session in self.sessions():
            out[session.transport_label] = out.get(session.transport_label, 0) + 1
        return out


@implementer(IPlugin, IDeviceTransport)
class LinePlugin:
    name = "line"
    order = 100
    settings = (
        Setting(
            "line",
            (),
            server_endpoint(("tcp", "ssl")),
            "Endpoint for devices speaking the line protocol (AUTH <token>, then '<metric> <value> <ts_ms>' "
            "lines); repeat for several.",
            multiple=True,
        ),
    )

    def build(self, config: Any, context: TransportContext) -> Transport | None:
        return LineTransport(config, context) if config.line else None
