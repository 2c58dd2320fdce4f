"""
A Modbus/TCP host as the poller sees it: one connection, one request in flight at a
time (the pause between requests kept), timeouts that replace a connection that
stops answering, and a host that cannot be reached failing its devices' polls at
once and tried again with backoff.
"""

from __future__ import annotations

from twisted.logger import Logger

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint
from twisted.python.failure import Failure

from gateway.reactor import Clock, Reactor
from gateway.backoff import Backoff
from gateway.net.tcp import no_delay
from gateway.transports.modbus_map import Read
from protocols import modbus
from protocols.sentinels import NEED_DATA

if TYPE_CHECKING:
    from gateway.transports.modbus_poll import PolledDevice

log = Logger()


BACKOFF_FIRST = 1.0  # seconds before the first retry of a host that could not be reached


BACKOFF_CAP = 60.0


TIMEOUTS_BEFORE_RECONNECT = 2  # consecutive unanswered requests after which the connection is replaced


class ReadFailed(Exception):
    """A read brought no values. ``reason`` is the gap's label: timeout, unreachable, closed, exception, protocol."""

    def __init__(self, reason: str, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.code = code  # the exception code, for reason "exception"


@dataclass
class _Request:
    poller: PolledDevice
    read: Read
    done: Deferred  # fires with (values, arrival time) or fails with ReadFailed
    transaction: int | None = None
    timer: Any = None
    retried: bool = False  # sent again after the connection closed under it
    write: tuple[int, ...] | None = None  # a write of these items (with ``function``), not a read
    function: int = 0


class _Link(protocol.Protocol):
    """One TCP connection to a host: bytes to the codec, events to the host."""

    def __init__(self, host: ModbusHost) -> None:
        self.host = host
        self.codec = modbus.ClientConnection()
        self.open = False
        self.error = ""  # what the host sent that was not Modbus/TCP, when that is why it is closed

    def connectionMade(self) -> None:
        self.open = True
        no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.codec.receive_data(data)
        while self.open:
            try:
                event = self.codec.next_event()
            except modbus.ProtocolError as e:
                self.host.broken(self, str(e))
                return
            if event is NEED_DATA:
                return
            self.host.answer(self, event)
        # Closed while reading: the rest of what came is not ours to read.

    def send(self, request: _Request) -> None:
        read, unit = request.read, request.poller.settings.unit
        sent: Any
        if request.write is not None:
            sent, data = self.codec.write(unit, request.function, read.address, request.write)
        else:
            sent, data = self.codec.request(unit, read.kind, read.address, read.count)
        request.transaction = sent.transaction
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.open:
            self.open = False
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.open = False
        self.host.lost(self, reason.getErrorMessage())


class ModbusHost:
    """One ``host:port``: one connection, one request in flight, a queue of its devices' reads."""

    def __init__(
        self,
        host: str,
        port: int,
        clock: Clock,
        connect: Callable[[_Link], Deferred],
        connect_timeout: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.host = host
        self.port = port
        self.clock = clock
        self._connect = connect
        self.connect_timeout = connect_timeout
        self.queue: deque[_Request] = deque()
        self.link: _Link | None = None
        self.connecting: Deferred | None = None
        self.in_flight: _Request | None = None
        self.backoff = Backoff(BACKOFF_FIRST, BACKOFF_CAP, "equal", rand)
        self.retry_at = 0.0  # while now < retry_at the host is not tried: reads fail at once as unreachable
        self.last_error = ""
        self.connections = 0
        self.timeouts = 0  # consecutive
        self.late = 0  # responses that came after their request was given up
        self._wake: Any = None
        self.stopped = False

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.open

    def submit(
        self, poller: PolledDevice, read: Read, write: tuple[int, ...] | None = None, function: int = 0
    ) -> Deferred:
        """Queue a read (or, with ``write``, a write of those items to ``read``'s address by ``function``); fires
        with (values, time of arrival) (a write: the items written), or fails with ReadFailed."""
        if self.stopped:
            return fail(ReadFailed("stopped", "the poller is stopping"))
        if not self.connected and self.clock.seconds() < self.retry_at:
            return fail(ReadFailed("unreachable", f"{self.address} cannot be reached: {self.last_error}"))
        request = _Request(poller, read, Deferred(), write=write, function=function)
        self.queue.append(request)
        self._next()
        return request.done

    def _next(self) -> None:
        if self.in_flight is not None or not self.queue or self.stopped:
            return
        if not self.connected:
            if self.connecting is None:
                self._open()
            return
        now = self.clock.seconds()
        for request in self.queue:
            if request.poller.ready_at <= now:
                break
        else:  # every queued device asked for a pause after its last answer: come back when the first is ready
            if self._wake is None or not self._wake.active():
                first = min(r.poller.ready_at for r in self.queue)
                self._wake = self.clock.callLater(first - now, self._next)
            return
        self.queue.remove(request)
        assert self.link is not None
        self.in_flight = request
        request.timer = self.clock.callLater(request.poller.settings.timeout, self._timed_out, request)
        self.link.send(request)

    def _open(self) -> None:
        link = _Link(self)
        d = self.connecting = self._connect(link)

        def up(_: Any) -> None:
            self.connecting = None
            if self.stopped:
                link.close()
                return
            self.link = link
            self.connections += 1
            self.backoff.succeeded()
            self._next()

        def down(f: Failure) -> None:
            self.connecting = None
            if self.stopped:
                return
            self.last_error = f.getErrorMessage()
            delay = self.backoff.failed()
            self.retry_at = self.clock.seconds() + delay
            log.warn(
                "Modbus host {host} cannot be reached ({error}); its devices' polls fail until it is tried again "
                "in {delay:.1f}s",
                host=self.address,
                error=self.last_error,
                delay=delay,
            )
            self._fail_queue("unreachable", f"{self.address} cannot be reached: {self.last_error}")

        d.addCallbacks(up, down)

    def answer(self, link: _Link, event: object) -> None:
        request = self.in_flight
        if isinstance(event, modbus.Late) or request is None or event.transaction != request.transaction:  # type: ignore[attr-defined]
            self.late += 1
            return
        self._done(request)
        self.timeouts = 0
        if isinstance(event, modbus.ExceptionResponse):
            request.done.errback(
                ReadFailed(
                    "exception",
                    f"exception {event.code} ({event.name}) {'writing' if request.write else 'reading'} "
                    f"{_describe(request.read)}",
                    event.code,
                )
            )
        elif isinstance(event, modbus.WriteResponse):
            request.done.callback((request.write, self.clock.seconds()))
        else:
            assert isinstance(event, modbus.ReadResponse)
            request.done.callback((event.values, self.clock.seconds()))
        self._next()

    def _done(self, request: _Request) -> None:
        self.in_flight = None
        if request.timer is not None and request.timer.active():
            request.timer.cancel()
        request.poller.ready_at = self.clock.seconds() + request.poller.settings.pause

    def _timed_out(self, request: _Request) -> None:
        if self.in_flight is not request:
            return
        request.timer = None
        if self.link is not None and request.transaction is not None:
            self.link.codec.forget(request.transaction)
        self._done(request)
        self.timeouts += 1
        timeout = request.poller.settings.timeout
        message = f"no answer within {timeout:g}s to {_describe(request.read)}"
        request.done.errback(ReadFailed("timeout", message))
        # The rest of this poll would wait as long again, holding up the host's other devices: give it up.
        for other in [r for r in self.queue if r.poller is request.poller]:
            self.queue.remove(other)
            other.done.errback(ReadFailed("timeout", f"not asked: {message}"))
        if self.timeouts >= TIMEOUTS_BEFORE_RECONNECT and self.link is not None:
            # The connection may be dead without either side knowing (a device rebooted, a NAT forgot it).
            self.timeouts = 0
            self.link.close()
        self._next()

    def broken(self, link: _Link, why: str) -> None:
        """The host sent what is not Modbus/TCP: the stream cannot be trusted; close it."""
        self.last_error = f"not Modbus/TCP: {why}"
        log.warn("Modbus host {host} sent what is not Modbus/TCP ({error}); reconnecting", host=self.address, error=why)
        link.error = why
        link.close()

    def lost(self, link: _Link, why: str) -> None:
        if link is not self.link:
            return
        self.link = None
        request = self.in_flight
        if request is not None:
            self._done(request)
            if self.stopped:
                request.done.errback(ReadFailed("stopped", "the poller is stopping"))
            elif link.error:
                request.done.errback(
                    ReadFailed("protocol", f"{self.address} sent what is not Modbus/TCP: {link.error}")
                )
            elif request.retried:
                request.done.errback(
                    ReadFailed("closed", f"{self.address} closed the connection ({why}) during a read, twice")
                )
            else:
                # A read changes nothing on the device, and a write sets the same value again: ask again once on
                # a new connection (a device that closes after each answer may close as the next request goes out).
                request.retried = True
                request.poller.ready_at = 0.0
                self.queue.appendleft(request)
        # A device that closes idle connections (or after each request) is connected to again when needed.
        self._next()

    def _fail_queue(self, reason: str, message: str) -> None:
        queued, self.queue = self.queue, deque()
        for request in queued:
            request.done.errback(ReadFailed(reason, message))

    def stop(self) -> None:
        self.stopped = True
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._fail_queue("stopped", "the poller is stopping")
        if self.link is not None:
            self.link.close()
        if self.connecting is not None:
            self.connecting.cancel()


class _OneLink(protocol.Factory):
    """connectProtocol's factory, without a "Starting factory" line per connection."""

    noisy = False

    def __init__(self, link: _Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> _Link:
        return self.link


def tcp_connect(reactor: Reactor, host: str, port: int, timeout: float) -> Callable[[_Link], Deferred]:
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    return lambda link: endpoint.connect(_OneLink(link))


def _describe(read: Read) -> str:
    return f"{read.count} {read.kind.name.lower()} at {read.address}"
