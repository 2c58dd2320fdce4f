"""
The Modbus poller with task.Clock and in-memory connections: the schedule
and its jitter, one request in flight per host, the pause, exceptions,
timeouts, unreachable and connection-closing devices each failing only what
they touch, gaps counted by reason, the time of a reading, deadbands, and
live reconfiguration.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.ingest.core import Ingest
from gateway.ops.metrics import GatewayMetrics
from gateway.storage.memory import MemoryStore
from gateway.transports.modbus_map import ModbusDevice, Register
from gateway.transports.modbus_poll import ModbusPoller
from protocols import modbus
from protocols.modbus import Kind
from protocols.sentinels import NEED_DATA
from tests.test_device_adapter import NO_TIME_RULES

LATENCY = 0.01  # seconds a slave takes to answer


class Slave:
    """A device's end of the connection: answers reads from its registers, or misbehaves as told."""

    def __init__(
        self, clock: Clock, registers: dict | None = None, *, silent=False, close_after=None, bad=(), latency=LATENCY
    ):
        self.clock = clock
        self.latency = latency
        self.registers = registers or {}  # (unit, kind, address) → value
        self.silent = silent
        self.close_after = close_after  # answer this many requests per connection, then close it
        self.bad = set(bad)  # (unit, kind, address) of reads answered "illegal data address"
        self.requests: list[tuple[float, modbus.ReadRequest]] = []
        self.connections = 0

    def answer(self, request: modbus.ReadRequest) -> modbus.ReadResponse | modbus.ExceptionResponse:
        if (request.unit, request.kind, request.address) in self.bad:
            return modbus.ExceptionResponse(
                request.transaction, request.unit, request.kind, modbus.ExceptionCode.ILLEGAL_DATA_ADDRESS
            )
        values = tuple(
            self.registers.get((request.unit, request.kind, a), 0)
            for a in range(request.address, request.address + request.count)
        )
        return modbus.ReadResponse(request.transaction, request.unit, request.kind, values)


class Wire(StringTransport):
    """What the poller writes goes to the slave; its answer comes back LATENCY later."""

    def __init__(self, slave: Slave, link) -> None:
        super().__init__()
        self.slave = slave
        self.link = link
        self.codec = modbus.ServerConnection()
        self.answered = 0

    def write(self, data: bytes) -> None:
        self.codec.receive_data(data)
        while (request := self.codec.next_event()) is not NEED_DATA:
            self.slave.requests.append((self.slave.clock.seconds(), request))
            if not self.slave.silent:
                self.slave.clock.callLater(self.slave.latency, self._respond, self.slave.answer(request))

    def _respond(self, response) -> None:
        if self.disconnecting:
            return
        self.link.dataReceived(modbus.encode_response(response))
        self.answered += 1
        if self.slave.close_after is not None and self.answered >= self.slave.close_after:
            self.loseConnection()

    def loseConnection(self) -> None:
        if not self.disconnecting:
            super().loseConnection()
            self.slave.clock.callLater(0, self.link.connectionLost)


class Net:
    """The poller's connect(): host:port → Slave; a host with no slave refuses connections."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.slaves: dict[tuple[str, int], Slave] = {}
        self.attempts: list[tuple[float, str]] = []

    def connect(self, host, port, timeout):
        def go(link):
            self.attempts.append((self.clock.seconds(), host))
            slave = self.slaves.get((host, port))
            if slave is None:
                return fail(ConnectionRefusedError("connection refused"))
            slave.connections += 1
            link.makeConnection(Wire(slave, link))
            return succeed(link)

        return go


def meter(name="meter-1", host="10.0.0.1", unit=1, **settings) -> ModbusDevice:
    registers = settings.pop(
        "registers",
        (
            Register("voltage", 0, Kind.HOLDING, "uint16", scale=0.1),
            Register("power", 10, Kind.INPUT, "float32", word_order="little"),
        ),
    )
    return ModbusDevice(name, host, registers, unit=unit, **{"interval": 10.0, "timeout": 1.0, **settings})


def meter_registers(unit=1, volts=2301, power=1234.5) -> dict:
    lo, hi = modbus.encode(power, "float32", word_order="little")
    return {(unit, Kind.HOLDING, 0): volts, (unit, Kind.INPUT, 10): lo, (unit, Kind.INPUT, 11): hi}


class Harness:
    def __init__(self, *devices: ModbusDevice, store=None) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.net = Net(self.clock)
        self.store = store or MemoryStore()
        names = {d.device for d in devices}
        for name in sorted(names):
            self.store.add_device(name)
        self.ingest = Ingest(self.store, self.clock, GatewayMetrics(self.clock), quality=NO_TIME_RULES)
        self.poller = ModbusPoller(devices, self.ingest, None, clock=self.clock, connect=self.net.connect)

    def slave(self, host="10.0.0.1", port=502, **kw) -> Slave:
        slave = self.net.slaves[(host, port)] = Slave(self.clock, **kw)
        return slave

    def run(self, seconds: float, step: float = 0.005) -> None:
        """Poll on schedule for this long."""
        if not self.poller.running:
            self.poller.startService()
        self.wait(seconds, step)

    def wait(self, seconds: float, step: float = 0.005) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)

    def stored(self, device: str) -> list[tuple[str, int, float]]:
        ids = {d.name: d.id for d, _, _ in self.store.devices.values()}
        return sorted((m, ts, v) for (i, m, ts), v in self.store.readings.items() if i == ids[device])

    def status(self, device: str) -> dict:
        return self.poller.status()[device]


def test_values_are_decoded_scaled_and_timed_by_the_responses_arrival():
    h = Harness(meter())
    slave = h.slave(registers=meter_registers())
    h.run(10.0)  # the first poll falls somewhere in the first interval
    [(asked, _), (asked2, _)] = slave.requests
    stored = h.stored("meter-1")
    assert [(m, v) for m, _, v in stored] == [("power", 1234.5), ("voltage", pytest.approx(230.1))]
    by_metric = {m: ts for m, ts, _ in stored}
    assert by_metric["voltage"] == pytest.approx((asked + LATENCY) * 1e6, abs=10)
    assert by_metric["power"] == pytest.approx((asked2 + LATENCY) * 1e6, abs=10)
    status = h.status("meter-1")
    assert status["polls"] == 1 and status["gaps"] == 0 and status["state"] == "reading"
    assert status["last_poll_seconds"] == pytest.approx(2 * LATENCY, abs=0.006)


def test_polls_keep_their_slots_and_a_thousand_devices_do_not_poll_in_step():
    devices = [meter(f"m{i}", host=f"10.0.{i // 250}.{i % 250}") for i in range(1000)]
    h = Harness(*devices)
    for d in devices:
        h.slave(d.host, registers=meter_registers())
    h.run(10.0, step=0.01)
    firsts = sorted(t for s in h.net.slaves.values() for t, _ in s.requests[:1])
    assert len(firsts) == 1000
    # Spread over the interval: no tenth of it holds more than a fifth of the devices.
    start = firsts[0] - (firsts[0] % 10)
    per_second = [sum(1 for t in firsts if start + k <= t < start + k + 1) for k in range(11)]
    assert max(per_second) < 200
    h.run(30.0, step=0.01)
    one = h.net.slaves[("10.0.0.0", 502)].requests
    polls = [t for t, r in one if r.kind is Kind.HOLDING]
    assert [round(b - a, 2) for a, b in zip(polls, polls[1:])] == [10.0, 10.0, 10.0]
    assert sum(s["gaps"] for s in h.poller.status().values()) == 0


def test_one_request_in_flight_per_host_and_units_share_the_connection():
    a, b = meter("a", unit=1), meter("b", unit=2)
    h = Harness(a, b)
    slave = h.slave(registers={**meter_registers(1), **meter_registers(2, volts=2400)})
    h.poller.polled["a"].poll()
    h.poller.polled["b"].poll()
    assert len(slave.requests) == 1  # the next waits for the answer
    h.clock.advance(LATENCY)
    assert len(slave.requests) == 2
    h.wait(1.0)
    assert slave.connections == 1
    assert [r.unit for _, r in slave.requests[:4]] == [1, 1, 2, 2]
    assert dict((m, v) for m, _, v in h.stored("b"))["voltage"] == pytest.approx(240.0)


def test_the_pause_between_two_requests_to_a_device():
    h = Harness(meter(pause=0.5))
    slave = h.slave(registers=meter_registers())
    h.poller.polled["meter-1"].poll()
    h.wait(2.0, step=0.01)
    (t1, _), (t2, _) = slave.requests[:2]
    assert t2 - t1 == pytest.approx(LATENCY + 0.5, abs=0.011)


def test_an_exception_fails_only_its_group_and_is_counted_by_code():
    h = Harness(meter())
    h.slave(registers=meter_registers(), bad={(1, Kind.INPUT, 10)})
    h.poller.polled["meter-1"].poll()
    h.wait(0.5)
    assert [m for m, _, _ in h.stored("meter-1")] == ["voltage"]
    status = h.status("meter-1")
    assert status["gaps_by_reason"] == {"exception": 1}
    assert status["exceptions"] == {"illegal_data_address": 1}
    assert "illegal" in status["last_exception"] and "input at 10" in status["last_exception"]
    metrics = {m.name: m for m in h.poller.live_metrics()}
    [sample] = metrics["gateway_modbus_exceptions"].samples
    assert sample.labels == {"device": "meter-1", "code": "2"} and sample.value == 1
    [gap] = metrics["gateway_modbus_gaps"].samples
    assert gap.labels == {"device": "meter-1", "reason": "exception"}
    # The poll was made and stored what it could: one poll, not a complete one.
    assert (status["polls"], status["complete_polls"]) == (1, 0)
    assert [s.value for s in metrics["gateway_modbus_polls"].samples] == [1]
    assert [s.value for s in metrics["gateway_modbus_polls_complete"].samples] == [0]


def test_a_silent_host_times_out_alone_while_another_is_read_on_time():
    h = Harness(meter("dead", host="10.0.0.9", interval=2.0), meter("alive", interval=2.0))
    h.slave("10.0.0.9", silent=True)
    alive = h.slave(registers=meter_registers())
    h.run(20.0, step=0.01)
    dead = h.status("dead")
    assert dead["complete_polls"] == 0 and dead["polls"] >= 9
    assert dead["gaps_by_reason"] == {"timeout": dead["gaps"]}
    assert dead["state"] in ("failing", "stale") and "no answer within 1s" in dead["last_error"]
    ok = h.status("alive")
    assert ok["gaps"] == 0 and ok["polls"] >= 9
    polls = [t for t, r in alive.requests if r.kind is Kind.HOLDING]
    assert all(round(b - a, 2) == 2.0 for a, b in zip(polls, polls[1:]))
    assert "dead" in h.poller.stale() and "alive" not in h.poller.stale()


def test_an_unreachable_host_fails_at_once_and_is_retried_with_backoff():
    h = Harness(meter("gone", host="10.0.0.7", interval=1.0))
    h.run(20.0, step=0.01)
    status = h.status("gone")
    assert status["gaps_by_reason"].keys() == {"unreachable"} and "refused" in status["last_error"]
    times = [t for t, host in h.net.attempts]
    waits = [b - a for a, b in zip(times, times[1:])]
    assert 3 <= len(times) <= 7  # about 20 polls; attempts after 1, 2, 4, 8 s of backoff (with jitter)
    assert waits[-1] >= 4.0
    h.slave("10.0.0.7", registers=meter_registers())
    h.run(120.0, step=0.05)
    assert h.status("gone")["state"] == "reading"


def test_a_device_that_closes_after_each_request_is_reconnected_without_gaps():
    h = Harness(meter(interval=1.0))
    slave = h.slave(registers=meter_registers(), close_after=1)
    h.run(10.5)
    status = h.status("meter-1")
    assert status["gaps"] == 0 and status["polls"] >= 9
    # Each finished poll's two reads needed a connection each; a poll under way as the run ended has made one or two.
    busy = int(h.poller.polled["meter-1"].polling)
    assert status["complete_polls"] == status["polls"] - busy
    assert 2 * status["complete_polls"] + busy <= slave.connections <= 2 * status["polls"]


def test_a_poll_still_running_when_the_next_is_due_is_a_gap():
    h = Harness(meter("slow", interval=1.0, timeout=0.9, registers=(Register("a", 0), Register("b", 100))))
    h.slave(latency=0.7)  # each answer in time, but two of them take longer than the interval
    h.run(10.0, step=0.01)
    status = h.status("slow")
    assert status["gaps_by_reason"].keys() == {"missed"} and 3 <= status["gaps"] <= 6
    assert status["polls"] >= 3 and "had not finished" in status["last_error"]


def test_a_late_response_is_ignored():
    h = Harness(meter(registers=(Register("a", 0),)))
    slave = h.slave(registers={(1, Kind.HOLDING, 0): 7})
    slave.silent = True
    h.poller.polled["meter-1"].poll()
    h.clock.advance(1.5)  # timed out
    [(_, request)] = slave.requests
    host = h.poller.hosts[("10.0.0.1", 502)]
    host.link.dataReceived(modbus.encode_response(slave.answer(request)))
    assert host.late == 1 and h.stored("meter-1") == []
    assert h.status("meter-1")["gaps_by_reason"] == {"timeout": 1}


def test_deadband_stores_changes_and_a_heartbeat():
    h = Harness(meter(interval=1.0, registers=(Register("level", 0, deadband=5.0, heartbeat=10.0),)))
    slave = h.slave(registers={(1, Kind.HOLDING, 0): 100})
    h.run(5.0)
    slave.registers[(1, Kind.HOLDING, 0)] = 103  # within the deadband
    h.run(3.0)
    slave.registers[(1, Kind.HOLDING, 0)] = 110  # beyond it
    h.run(3.0)
    values = [v for _, _, v in h.stored("meter-1")]
    assert values == [100.0, 110.0]
    h.run(12.0)  # no change, but the heartbeat is due
    assert [v for _, _, v in h.stored("meter-1")] == [100.0, 110.0, 110.0]
    assert h.status("meter-1")["suppressed"] > 10


def test_an_unknown_device_and_a_database_away_are_gaps():
    h = Harness(meter(interval=1.0))
    h.slave(registers=meter_registers())
    h.store.revoke("meter-1")
    h.run(3.0)
    assert h.status("meter-1")["gaps_by_reason"].keys() == {"unknown_device"}
    assert "gatewayctl device add meter-1" in h.status("meter-1")["last_error"]
    h2 = Harness(meter(interval=1.0))
    h2.slave(registers=meter_registers())
    h2.store.available = False
    h2.run(3.0)
    assert h2.status("meter-1")["gaps_by_reason"].keys() == {"store"}


def test_a_nan_float_is_not_stored_but_counted():
    h = Harness(meter(registers=(Register("power", 0, type="float32"), Register("v", 2))))
    h.slave(registers={(1, Kind.HOLDING, 0): 0x7FC0, (1, Kind.HOLDING, 1): 0, (1, Kind.HOLDING, 2): 5})
    h.poller.polled["meter-1"].poll()
    h.wait(0.5)
    assert [(m, v) for m, _, v in h.stored("meter-1")] == [("v", 5.0)]
    assert h.status("meter-1")["gaps_by_reason"] == {"value": 1}


def test_reconfigure_keeps_unchanged_devices_and_closes_hosts_no_longer_used():
    a, b = meter("a"), meter("b", host="10.0.0.2")
    h = Harness(a, b)
    h.slave(registers=meter_registers())
    h.slave("10.0.0.2", registers=meter_registers())
    h.run(11.0)
    kept = h.poller.polled["a"]
    changes = h.poller.configure((a, meter("c", host="10.0.0.1", unit=3)))
    assert changes == ["Modbus device b removed", "Modbus device c added"]
    assert h.poller.polled["a"] is kept and set(h.poller.hosts) == {("10.0.0.1", 502)}
    assert h.poller.configure((meter("a", interval=5.0), meter("c", unit=3))) == ["Modbus device a changed"]
    h.poller.stopService()
    assert not h.poller.hosts[("10.0.0.1", 502)].connected


def test_a_host_that_does_not_speak_modbus_is_a_protocol_gap_and_is_reconnected():
    h = Harness(meter(registers=(Register("a", 0),)))
    slave = h.slave(registers={(1, Kind.HOLDING, 0): 7})
    slave.silent = True
    h.poller.polled["meter-1"].poll()
    host = h.poller.hosts[("10.0.0.1", 502)]
    host.link.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    h.wait(0.1)
    status = h.status("meter-1")
    assert status["gaps_by_reason"] == {"protocol": 1} and "not Modbus/TCP" in status["last_error"]
    assert not host.connected
    slave.silent = False
    h.poller.polled["meter-1"].poll()
    h.wait(0.1)
    assert [v for _, _, v in h.stored("meter-1")] == [7.0] and slave.connections == 2


def test_stopping_with_a_read_in_flight_ends_the_poll():
    h = Harness(meter())
    slave = h.slave(registers=meter_registers())
    slave.silent = True
    polled = h.poller.polled["meter-1"]
    polled.poll()
    assert polled.polling and len(slave.requests) == 1
    h.poller.stopService()
    h.wait(0.1)
    assert not polled.polling  # the read in flight and the one queued behind it failed as "stopped"
    assert h.status("meter-1")["gaps_by_reason"] == {"stopped": 1}
