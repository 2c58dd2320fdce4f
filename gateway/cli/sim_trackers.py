"""
The trackers of ``gatewayctl simulate --protocol teltonika`` (``teltonika-udp``, ``gt06``):
each signs in with its IMEI (the simulator binds one to each simulated
device), drives a loop around its own point (a few km/h: a vehicle in a
yard), and sends its readings as records: Teltonika packets of ``--batch``
records (Codec 8: a position and IO 66, external voltage, 239, ignition,
and 16, odometer) or GT06 locations, one a packet. Records wait in the
tracker's buffer until they are answered and are sent again after a
reconnect, as a tracker's are; commands are answered (Codec 12, GT06's
0x15) after ``--command-delay``.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet import protocol, task

from gateway.cli.simulator import SimDevice
from gateway.net.tcp import no_delay
from protocols import gt06, teltonika
from protocols.sentinels import CONNECTION_CLOSED, NEED_DATA

IMEI_PREFIX = "3599"  # simulated trackers' IMEIs: 3599 and the device's number in 11 digits


def imei_of(name: str) -> str:
    """sim-7 -> 359900000000007."""
    return f"{IMEI_PREFIX}{int(name.rsplit('-', 1)[1]):011d}"


def position(name: str, ts_us: int) -> tuple[float, float, int]:
    """Where a simulated tracker is at a time: a loop of about 2 km around a point of its own; and its heading."""
    n = int(name.rsplit("-", 1)[1])
    lat0, lon0 = 54.0 + (n % 100) * 0.01, 25.0 + (n // 100 % 100) * 0.01
    angle = ts_us / 1e6 / 600 + n
    return lat0 + 0.01 * math.sin(angle), lon0 + 0.01 * math.cos(angle), int(math.degrees(angle)) % 360


def answered(device: SimDevice, readings: list[tuple[str, int, float]], sent_at: float) -> None:
    """A tracker's packet answered: its records counted, with the answer's latency."""
    if readings:
        stats = device.sim.stats
        stats.acked += len(readings)
        now = device.sim.clock.seconds()
        stats.latency(now - sent_at, now)
        device.backoff.succeeded()


def teltonika_records(device: SimDevice, readings: list[tuple[str, int, float]]) -> list[teltonika.Record]:
    """A Teltonika record for each reading: where the tracker is then, and IO 239, 66 and 16."""
    records = []
    for _, ts_us, value in readings:
        lat, lon, heading = position(device.name, ts_us)
        gps = teltonika.Gps(lon, lat, 120, heading, 9, 7)
        io = ((239, 1), (66, int(value * 200)), (16, ts_us // 1_000_000 % 10_000_000))
        records.append(teltonika.Record(ts_us // 1000, 0, gps, 0, io))
    return records


class _Tracker(protocol.Protocol):
    """What both trackers share: the buffer, the window, the stats."""

    transport: Any

    def __init__(self, device: SimDevice) -> None:
        self.device = device
        self.sim = device.sim
        self.ready = False
        self.in_flight: dict[int, tuple[list[tuple[str, int, float]], float]] = {}
        self.window = 4
        self.retry_after: float | None = None

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.device.client = self
        self.hello()

    def hello(self) -> None:
        raise NotImplementedError

    def acked(self, key: int) -> None:
        answered(self.device, *self.in_flight.pop(key, ([], 0.0)))
        self.pump()

    def pump(self) -> None:
        raise NotImplementedError

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        if self.ready:
            self.sim.stats.connected -= 1
        self.ready = False
        self.device.client = None
        for key in sorted(self.in_flight, reverse=True):
            self.device.give_back(self.in_flight[key][0])
        self.in_flight.clear()
        self.device.retry(self.retry_after)


class TeltonikaTracker(_Tracker):
    def __init__(self, device: SimDevice) -> None:
        super().__init__(device)
        self.conn = teltonika.DeviceConnection()
        self._seq = 0
        self._order: list[int] = []  # packets in flight, oldest first: answers come in order

    def hello(self) -> None:
        self.transport.write(teltonika.imei_packet(imei_of(self.device.name)))

    def dataReceived(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA or event is CONNECTION_CLOSED:
                return
            if isinstance(event, teltonika.Accepted):
                if not event.accepted:
                    self.sim.stats.errors["IMEI refused"] += 1
                    self.retry_after = 10.0
                    self.transport.loseConnection()
                    return
                self.ready = True
                self.sim.stats.connected += 1
                self.pump()
            elif isinstance(event, teltonika.Acked) and self._order:
                self.acked(self._order.pop(0))
            elif isinstance(event, teltonika.CommandRequest):
                name, _, args = event.text.partition(" ")

                def report(status: str, result: Any, n: str = name) -> None:
                    self.transport.write(teltonika.codec12(teltonika.RESPONSE, f"{n}: {status}"))
                    self.sim.commands.counts["recorded"] += 1  # Codec 12 answers are not acknowledged: written

                self._seq += 1
                self.sim.commands.receive(self.device.name, f"codec12-{self._seq}", name, {"args": args}, report)

    def pump(self) -> None:
        if not self.ready:
            return
        while len(self.in_flight) < self.window and not self.sim.stopping:
            readings = self.device.take(min(self.sim.batch, 255))
            if not readings:
                return
            self._seq += 1
            self.in_flight[self._seq] = (readings, self.sim.clock.seconds())
            self._order.append(self._seq)
            self.sim.stats.sent += len(readings)
            self.transport.write(teltonika.avl_packet(teltonika.CODEC_8, teltonika_records(self.device, readings)))


class Gt06Tracker(_Tracker):
    def __init__(self, device: SimDevice) -> None:
        super().__init__(device)
        self.conn = gt06.DeviceConnection()
        self._serial = 0
        self.window = 16

    def _next(self) -> int:
        self._serial = self._serial % 0xFFFF + 1
        return self._serial

    def hello(self) -> None:
        self.transport.write(gt06.DeviceConnection.login(imei_of(self.device.name), self._next()))

    def dataReceived(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while True:
            try:
                event = self.conn.next_event()
            except gt06.ProtocolError:
                self.transport.loseConnection()
                return
            if event is NEED_DATA or event is CONNECTION_CLOSED:
                return
            if isinstance(event, gt06.Answer) and event.protocol == gt06.LOGIN and not self.ready:
                self.ready = True
                self.sim.stats.connected += 1
                self.pump()
            elif isinstance(event, gt06.Answer):
                self.acked(event.serial)
            elif isinstance(event, gt06.CommandRequest):
                flag = event.server_flag

                name, _, args = event.text.rstrip("#").partition(",")

                def report(status: str, result: Any, flag: int = flag, name: str = name) -> None:
                    answer = gt06.DeviceConnection.command_answer(flag, f"{name}:{status}", self._next())
                    self.transport.write(answer)
                    self.sim.commands.counts["recorded"] += 1  # GT06's 0x15 is not acknowledged: written

                self.sim.commands.receive(self.device.name, f"gt06-{flag}", name, {"args": args}, report)

    def pump(self) -> None:
        if not self.ready:
            return
        while len(self.in_flight) < self.window and not self.sim.stopping:
            readings = self.device.take(1)
            if not readings:
                return
            _, ts_us, _ = readings[0]
            lat, lon, heading = position(self.device.name, ts_us)
            where = gt06.Position(ts_us // 1_000_000, lat, lon, 7, heading, 9, True)
            serial = self._next()
            self.in_flight[serial] = (readings, self.sim.clock.seconds())
            self.sim.stats.sent += 1
            self.transport.write(gt06.DeviceConnection.location(where, serial))


class TeltonikaUdpTracker(protocol.DatagramProtocol):
    """
    Teltonika over UDP, a socket of its own: up to four datagrams of ``--batch``
    records in flight, each sent again unchanged (same packet ids) every
    RESEND seconds until its answer comes, as a tracker does; the gateway
    stores a datagram once however often it comes. No commands: Codec 12
    needs the TCP connection.
    """

    RESEND = 2.0
    transport: Any  # the socket, connected to the gateway once started

    def __init__(self, device: SimDevice, address: str) -> None:
        self.device = device
        self.sim = device.sim
        self.address = address  # the gateway's
        self.ready = False
        self.window = 4
        self.in_flight: dict[int, tuple[list[tuple[str, int, float]], float]] = {}
        self._datagrams: dict[int, tuple[bytes, float]] = {}  # packet id: the datagram, when it was last sent
        self._packet_id = 0
        self._resender: task.LoopingCall | None = None

    def startProtocol(self) -> None:
        self.transport.connect(self.address, self.sim.port)
        self.device.client = self
        self.ready = True
        self.sim.stats.connected += 1
        self._resender = task.LoopingCall(self._resend)
        self._resender.clock = self.sim.clock
        self._resender.start(self.RESEND / 4, now=False)
        self.pump()

    def stopProtocol(self) -> None:
        if self._resender is not None and self._resender.running:
            self._resender.stop()
        if self.ready:
            self.sim.stats.connected -= 1
        self.ready = False

    def pump(self) -> None:
        while self.ready and len(self.in_flight) < self.window and not self.sim.stopping:
            readings = self.device.take(min(self.sim.batch, 255))
            if not readings:
                return
            self._packet_id = self._packet_id % 0xFFFF + 1
            records = teltonika_records(self.device, readings)
            imei = imei_of(self.device.name)
            datagram = teltonika.encode_datagram(
                self._packet_id, self._packet_id % 256, imei, teltonika.CODEC_8, records
            )
            now = self.sim.clock.seconds()
            self.in_flight[self._packet_id] = (readings, now)
            self._datagrams[self._packet_id] = (datagram, now)
            self.sim.stats.sent += len(readings)
            self.transport.write(datagram)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        try:
            packet_id, _, accepted = teltonika.decode_udp_ack(data)
        except teltonika.ProtocolError:
            self.sim.stats.errors["a bad UDP answer"] += 1
            return
        if packet_id not in self.in_flight:
            return  # the answer to a datagram sent twice, already counted
        readings, sent_at = self.in_flight.pop(packet_id)
        del self._datagrams[packet_id]
        if accepted < len(readings):  # the rest go again in a later datagram
            self.device.give_back(readings[accepted:])
            self.sim.stats.errors["records not accepted"] += len(readings) - accepted
        answered(self.device, readings[:accepted], sent_at)
        self.pump()

    def _resend(self) -> None:
        now = self.sim.clock.seconds()
        for packet_id, (datagram, last) in list(self._datagrams.items()):
            if now - last >= self.RESEND:
                self._datagrams[packet_id] = (datagram, now)
                self.sim.stats.errors["UDP datagrams sent again"] += 1
                self.transport.write(datagram)

    def connectionRefused(self) -> None:
        self.sim.stats.errors["UDP port unreachable"] += 1
