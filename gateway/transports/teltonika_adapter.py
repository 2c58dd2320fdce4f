"""
The gateway end of Teltonika's TCP protocol: a thin Twisted protocol around
``protocols.teltonika`` (the codec), feeding the same ingest path as every
other transport.

Theory of operation. A tracker sends its IMEI; while the device it is bound
to (``gatewayctl device add --imei``) is looked up, nothing more is read. An
unknown or revoked IMEI is answered ``00`` and the connection closes (the
refusal is counted and logged at a bounded rate by the ingest path).
Then each AVL packet's records become readings (``trackers.py``) and are
stored in one write; the answer, the count of records, goes out only after
that write is committed (or journaled), in the order the packets came, so a
tracker deletes a record only when it is stored. A packet whose CRC, counts
or codec are wrong is kept in rejected_input and not answered: the tracker
sends it again. With the database away and the journal full, nothing is
answered and the connection closes; the tracker keeps its records and sends
them later.

Commands (Codec 12): one at a time. The command's text is its ``text``
parameter, or its name followed by its ``args`` parameter; the tracker's
answer (a Codec 12 response) is the command's result, ``{"response": …}``.
Codec 12 carries no id, so an answer belongs to the command in flight.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet import protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.commands.model import Command
from gateway.commands.service import IDownlink
from gateway.readings import (
    Device,
    InvalidInput,
    RateLimited,
    Reading,
    Source,
    StoreOverloaded,
    StoreRejected,
    StoreUnavailable,
    WriteResult,
)
from gateway.transports.devices import DeviceListenerFactory
from gateway.transports.tracker_session import TrackerDownlink, TrackerSession
from gateway.net.ranges import allowed
from gateway.transports.trackers import Jumps, held_back, outside_networks, record_readings
from protocols import teltonika

log = Logger()


class TeltonikaProtocol(TrackerSession):
    __slots__ = ("unstored_io",)
    framing_error = teltonika.ProtocolError
    protocol_name = "Teltonika"

    def __init__(self, factory: TeltonikaFactory) -> None:
        super().__init__(factory)
        self.conn = teltonika.ServerConnection(max_packet=factory.settings.max_frame)
        self.unstored_io = 0  # variable-length IO values too long to be a number (kept in the raw packet only)

    def _handle(self, event: object) -> None:
        if isinstance(event, teltonika.AvlData):
            self._records(event)
        elif isinstance(event, teltonika.Imei):
            self.sign_in(
                event.imei,
                accepted=lambda: self.transport.write(self.conn.accept(True)),
                refused=lambda: self.transport.write(self.conn.accept(False)),
            )
        elif isinstance(event, teltonika.BadPacket):
            self._bad_packet(event.reason, event.raw)
        elif isinstance(event, teltonika.CommandResponse) and self.downlink is not None:
            self.downlink.answered(event.text)

    def make_downlink(self, device: str) -> TeltonikaDownlink:
        return TeltonikaDownlink(self, device, self.factory.commands)

    def _records(self, avl: teltonika.AvlData) -> None:
        if self.device is None:  # records before the IMEI was accepted cannot come: the codec wants the IMEI first
            return
        readings: list[Reading] = []
        held: list[tuple[Reading, str]] = []
        model = self.factory.tracker_types.get(self.device.type or "")
        name, jumps = self.device.name, self.factory.jumps
        jump = lambda ts, lat, lon: jumps.check(name, ts, lat, lon)  # noqa: E731
        try:
            for record in avl.records:
                got, doubtful, skipped = record_readings(record.timestamp_ms, record.gps, record.io, model, jump)
                readings += got
                held += doubtful
                self.unstored_io += skipped
        except InvalidInput as e:  # a value not finite, a time out of range: answered once kept (nothing to resend)
            name, raw = self.device.name, avl.raw
            kept = self.factory.ingest.refuse(self.source, "invalid_reading", e.message, device=name, raw=raw)
            self._queue(kept.addCallback(lambda _: WriteResult(0, 0)), len(avl.records))
            return
        if not self.factory.ingest.admits(len(readings)):
            self._hold(avl, self._records)
            return
        kept = held_back(held, len(readings))
        stored = self.factory.ingest.store_readings(self.device, readings, self.source, lambda: avl.raw, kept)
        self._queue(stored, len(avl.records))

    def _answer(self, count: int, outcome: Any, arrived: float) -> None:
        if not isinstance(outcome, Failure):
            self.transport.write(self.conn.ack(count))
            self.factory.metrics.acked(self.source, self.factory.clock.seconds() - arrived)
            self.readings += outcome.accepted
            return
        error = outcome.value
        self.last_error = f"{type(error).__name__}: {getattr(error, 'message', error)}"
        if isinstance(error, (StoreRejected, RateLimited)):
            # Kept in rejected_input by the ingest path: answered as taken, or the tracker would resend it for ever.
            self.transport.write(self.conn.ack(0))
        elif isinstance(error, (StoreUnavailable, StoreOverloaded)):
            self._close()  # no answer: the tracker keeps its records and sends them again
        else:
            log.failure("storing tracker records failed", outcome)
            self._close()


@implementer(IDownlink)
class TeltonikaDownlink(TrackerDownlink):
    """Codec 12 commands to one tracker: one in flight; its answer is its result."""

    transport = "teltonika"

    def __init__(self, session: TeltonikaProtocol, device: str, commands: Any) -> None:
        super().__init__(session, device, commands)
        self.in_flight: Command | None = None

    def room(self) -> int:
        return 0 if self.in_flight is not None else 1

    def deliver(self, command: Command) -> None:
        text = command.params.get("text")
        if not isinstance(text, str):
            args = command.params.get("args")
            text = command.name if args is None else f"{command.name} {args}"
        self.in_flight = command
        self.session.transport.write(self.session.conn.command(text))

    def answered(self, text: str) -> None:
        command, self.in_flight = self.in_flight, None
        if command is not None:
            self._succeeded(command, text)


class TeltonikaFactory(DeviceListenerFactory):
    protocol = TeltonikaProtocol
    transport_name = "teltonika"
    tracker_types: dict[str, Any] = {}  # model name -> IO mapping; set by the plugin
    allow: tuple[Any, ...] = ()  # --tracker-allow: the address ranges trackers may connect from (none: any)
    jumps = Jumps(None)  # the impossible-jump rule (--tracker-max-speed); set by the plugin


class TeltonikaUdp(protocol.DatagramProtocol):
    """
    Teltonika over UDP: each datagram names its tracker by IMEI and is answered, after its records are
    committed, with its packet ids and the count of records. A datagram sent again (its answer lost) is
    stored once (the natural key) and answered again. A datagram that cannot be read is kept and not
    answered; with no room in the store, nothing is answered (the tracker sends it again).
    """

    noisy = False
    transport: Any  # set by the reactor when it listens
    allow: tuple[Any, ...] = ()  # --tracker-allow
    jumps = Jumps(None)  # the impossible-jump rule (--tracker-max-speed); set by the plugin
    KNOWN_FOR = 30.0  # seconds an IMEI's device is trusted before it is looked up again
    KNOWN_MAX = 100_000
    IN_FLIGHT_MAX = 1_000  # datagrams being stored at once; past it they go unanswered (and come again)

    def __init__(self, ingest: Any, clock: IReactorTime, types: dict[str, Any]) -> None:
        self.ingest = ingest
        self.clock = clock
        self.tracker_types = types
        self.in_flight = 0
        self._known: dict[str, tuple[Device | None, float]] = {}

    def forget(self) -> None:
        self._known.clear()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        source = Source("teltonika+udp", str(addr[0]), int(addr[1]))
        if not allowed(source.host, self.allow):
            self.ingest.refuse(source, "not_allowed", f"{source.host} is outside --tracker-allow")
            return
        try:
            packet = teltonika.decode_datagram(data)
        except teltonika.ProtocolError as e:
            self.ingest.refuse(source, "bad_frame", str(e), raw=data[:1024])
            return
        except ValueError as e:
            self.ingest.refuse(source, "bad_packet", str(e), raw=data)
            return
        if self.in_flight >= self.IN_FLIGHT_MAX:
            self.ingest.refuse(source, "overloaded", f"{self.in_flight} datagrams are being stored; send it again")
            return
        self.in_flight += 1
        d = Deferred.fromCoroutine(self._store(packet, data, source, addr))
        d.addErrback(lambda f: log.failure("a Teltonika datagram failed", f))

    async def _device(self, imei: str) -> Device | None:
        known = self._known.get(imei)
        if known is not None and known[1] > self.clock.seconds():
            return known[0]
        device = await self.ingest.device_by_imei(imei)
        if len(self._known) >= self.KNOWN_MAX:
            self._known.clear()
        self._known[imei] = (device, self.clock.seconds() + self.KNOWN_FOR)
        return device

    async def _store(self, packet: teltonika.UdpPacket, data: bytes, source: Source, addr: Any) -> None:
        try:
            try:
                device = await self._device(packet.imei)
            except (StoreUnavailable, StoreOverloaded):
                return  # not answered: the tracker sends it again
            if device is None:
                message = f"unknown or revoked IMEI {packet.imei} (gatewayctl device add NAME --imei {packet.imei})"
                self.ingest.refuse(source, "unknown_imei", message, raw=data)
                return
            if not allowed(source.host, device.networks):
                self.ingest.refuse(source, "not_allowed", outside_networks(device, packet.imei), raw=data)
                return
            model = self.tracker_types.get(device.type or "")
            readings: list[Reading] = []
            held: list[tuple[Reading, str]] = []
            jump = lambda ts, lat, lon: self.jumps.check(device.name, ts, lat, lon)  # noqa: E731
            for record in packet.records:
                got, doubtful, _ = record_readings(record.timestamp_ms, record.gps, record.io, model, jump)
                readings += got
                held += doubtful
            if not self.ingest.admits(len(readings)):
                return  # no room: unanswered, sent again
            arrived = self.clock.seconds()
            try:
                await self.ingest.store_readings(device, readings, source, lambda: data, held_back(held, len(readings)))
            except (StoreUnavailable, StoreOverloaded):
                return
            except (StoreRejected, RateLimited):
                pass  # kept in rejected_input by the ingest path: answered, or the tracker would send it for ever
            self.ingest.metrics.acked(source, self.clock.seconds() - arrived)
            self.transport.write(teltonika.udp_ack(packet.packet_id, packet.avl_packet_id, len(packet.records)), addr)
        except InvalidInput as e:  # answered once kept: sent again, it would be refused again
            await self.ingest.refuse(source, "invalid_reading", e.message, raw=data)
            self.transport.write(teltonika.udp_ack(packet.packet_id, packet.avl_packet_id, len(packet.records)), addr)
        finally:
            self.in_flight -= 1
