"""
What every tracker protocol's session does the same way (Teltonika's and
GT06's adapters are the rest): refuse a peer outside ``--tracker-allow``,
feed the codec and take its events while the session may read, sign the
tracker in by its IMEI (the device bound to it, or a refusal that is
counted, logged at a bounded rate and kept), answer what is stored in the
order it came and only once committed, attach its commands' downlink, and
its timers: the IMEI within the handshake timeout, then silence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.readings import CloseReason, Device, StoreOverloaded, StoreUnavailable
from gateway.transports.devices import DeviceConnection
from gateway.transports.session import Ticket
from gateway.net.ranges import allowed
from gateway.transports.trackers import outside_networks
from protocols.sentinels import CONNECTION_CLOSED, NEED_DATA

log = Logger()


class TrackerDownlink:
    """What a tracker's downlink has whatever its protocol: the session it writes on, and the recording of
    an answer (the command succeeded, with the tracker's text) before the next due command is sent."""

    transport = ""  # the protocol's name, for the ledger's counts

    def __init__(self, session: Any, device: str, commands: Any) -> None:
        self.session = session
        self.device = device
        self.commands = commands

    def _succeeded(self, command: Any, text: str) -> None:
        d = Deferred.fromCoroutine(self.commands.finished(self.device, command.id, "succeeded", {"response": text},
                                                          self.transport))  # fmt: skip
        d.addErrback(lambda f: log.warn("the answer to {id} not recorded: {e}", id=command.id, e=f.value))
        d.addBoth(lambda _: self.commands.flush(self.device))


class TrackerSession(DeviceConnection):
    """A tracker's connection; a subclass gives ``conn`` (its codec), ``framing_error``, ``_handle`` and
    ``_answer``, and the downlink it attaches (``make_downlink``)."""

    __slots__ = ("conn", "_seq", "downlink")
    conn: Any  # the codec's ServerConnection, made by the subclass
    framing_error: type[Exception] = Exception  # the codec's ProtocolError
    protocol_name = ""  # for the log

    def __init__(self, factory: Any) -> None:
        super().__init__(factory)
        self._seq = 0
        self.downlink: Any = None

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
            except self.framing_error as e:
                name = self.device.name if self.device else None
                self.factory.ingest.refuse(self.source, "bad_frame", str(e), device=name, closing=True)
                self._close()
                return
            if event is NEED_DATA:
                return
            if event is CONNECTION_CLOSED:
                self._close()
                return
            self._handle(event)

    def _handle(self, event: object) -> None:
        raise NotImplementedError

    def _bad_packet(self, reason: str, raw: bytes) -> None:
        """A packet whose CRC or contents are wrong: not answered (the tracker sends it again), kept."""
        name = self.device.name if self.device else None
        self.last_error = reason
        self.factory.ingest.refuse(self.source, "bad_packet", reason, device=name, raw=raw)

    # -- signing in ------------------------------------------------------

    def sign_in(self, imei: str, accepted: Callable[[], None], refused: Callable[[], None]) -> None:
        """Look the IMEI's device up, reading nothing meanwhile; then ``accepted()`` (the device is
        ``self.device``) or ``refused()`` before the connection closes."""
        self._looking_up(True)

        def found(device: Device | None) -> None:
            self.session.busy = False
            if self._closing:
                return
            if device is None:
                message = f"unknown or revoked IMEI {imei} (gatewayctl device add NAME --imei {imei})"
                # Counted, logged at a bounded rate per address, and kept: an operator sees which IMEI knocked.
                self.factory.ingest.refuse(self.source, "unknown_imei", message, raw=imei.encode(), closing=True)
                refused()
                self._close()
                return
            if not allowed(self.source.host, device.networks):
                self.factory.ingest.refuse(
                    self.source, "not_allowed", outside_networks(device, imei), raw=imei.encode(), closing=True
                )
                refused()
                self._close()
                return
            self.device = device
            self.factory.registry.register(device.name, self)
            accepted()
            self._set_timer(self.factory.settings.idle_timeout, self.idle_too_long)
            log.info(
                "tracker {device} (IMEI {imei}, {protocol}) connected from {source}",
                device=device.name, imei=imei, protocol=self.protocol_name, source=self.source,
            )  # fmt: skip
            if self.factory.commands is not None:
                self.downlink = self.make_downlink(device.name)
                self.factory.commands.attach(device.name, self.downlink)
            self._looking_up(False)

        def failed(f: Failure) -> None:
            self.session.busy = False
            if not isinstance(f.value, (StoreUnavailable, StoreOverloaded)):
                log.failure("IMEI lookup failed", f)
            message = "the gateway cannot look the IMEI up now"
            self.factory.ingest.refuse(self.source, "retry_later", message, closing=True)
            self._close()  # no answer at all: the tracker tries again later

        self.factory.ingest.device_by_imei(imei).addCallbacks(found, failed)

    def make_downlink(self, device: str) -> Any:
        raise NotImplementedError

    # -- answers, in order -------------------------------------------------

    def _queue(self, d: Deferred, *context: Any) -> None:
        """Answer once ``d`` fires (with the write's outcome, or its failure), after every earlier answer:
        ``_answer(*context, outcome, arrived)``."""
        self._seq += 1
        ticket = self.session.arrived(self._seq, self.factory.clock.seconds())
        self.flow()
        d.addBoth(lambda outcome: (*context, outcome)).addCallback(self._answer_ready, ticket)

    def _answer_ready(self, outcome: Any, ticket: Ticket[Any]) -> None:
        for ready in self.session.settle(ticket, outcome):
            if not self._closing:
                answered: Any = ready.outcome
                self._answer(*answered, ready.arrived)
        self.flow()

    def _answer(self, *outcome: Any) -> None:
        raise NotImplementedError

    # -- endings and timers ---------------------------------------------------

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self.downlink is not None:
            self.factory.commands.detach(self.downlink.device, self.downlink)

    def end(self, code: CloseReason, reason: str) -> None:
        """The tracker protocols have no goodbye: close."""
        if not self._closing:
            self._close()

    def handshake_too_slow(self) -> None:
        self._timer = None
        if self.device is not None or self._closing:
            return
        seconds = self.factory.settings.handshake_timeout
        self.factory.ingest.refuse(self.source, "timeout", f"no IMEI within {seconds:g} seconds", closing=True)
        self._close()

    def idle_too_long(self) -> None:
        self._timer = None
        if self._not_reading(self.factory.settings.idle_timeout):
            return
        self._close()
