"""
The gateway's TGP adapter over an in-memory transport, with task.Clock:
handshake, acks in frame order, backpressure, refusals and timeouts.
"""

from __future__ import annotations

import math

import pytest

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway import tokens
from gateway.transport import DeviceRegistry
from gateway.transports.devices import DeviceSettings
from gateway.transports.tgp_adapter import DeviceFactory
from gateway.ingest.core import Ingest
from gateway.ops.metrics import GatewayMetrics
from gateway.ingest.quality import QualityRules, Range

from gateway.readings import StoreUnavailable, WriteResult
from gateway.storage.memory import MemoryStore
from protocols import tgp
from tests.tgp_helpers import drain

F64 = tgp.ValueType.F64
E = tgp.ErrorCode

# A task.Clock starts at 1970: readings of 2026 would be far in its future.
NO_TIME_RULES = QualityRules(max_future=None, max_past=None)


class Parts(list):
    """The parts of several writes made at once (``write_many``), told apart from one write's readings."""


class ManualStore(MemoryStore):
    """MemoryStore whose writes wait until the test finishes them."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[Deferred, object, list]] = []
        self.room = True
        self.room_waiters: list[Deferred] = []

    def write(self, device, readings, source=None, quarantined=()):
        d = Deferred()
        self.pending.append((d, device, list(readings)))
        return d

    def write_many(self, device, parts, source=None):
        d = Deferred()
        self.pending.append((d, device, Parts((list(readings), list(held)) for readings, held in parts)))
        return d

    def finish(self, index: int) -> None:
        d, device, written = self.pending[index]
        if isinstance(written, Parts):
            super().write_many(device, written).chainDeferred(d)
        else:
            super().write(device, written).chainDeferred(d)

    def has_room(self, size):
        return self.room

    def admits(self, size):
        return self.room

    def wait_for_room(self):
        d = Deferred()
        self.room_waiters.append(d)
        return d


class Harness:
    def __init__(self, store=None, registry=None, clock=None, **settings) -> None:
        self.store = store or MemoryStore()
        self.token = self.store.add_device("truck-17") if not self.store.devices else None
        self.clock = clock or Clock()
        self.registry = registry if registry is not None else DeviceRegistry()
        self.factory = DeviceFactory(
            Ingest(self.store, self.clock, GatewayMetrics(self.clock), quality=NO_TIME_RULES),
            self.registry,
            clock=self.clock,
            settings=DeviceSettings(**settings),
        )
        peer = IPv4Address("TCP", "10.1.2.3", 5555)
        self.proto = self.factory.buildProtocol(peer)
        self.transport = StringTransport(peerAddress=peer)
        self.proto.makeConnection(self.transport)
        self.device = tgp.Connection(tgp.DEVICE)

    def send(self, event) -> None:
        self.proto.dataReceived(self.device.send(event))

    def events(self) -> list:
        data = self.transport.value()
        self.transport.clear()
        if data:  # b"" would tell the codec the stream ended
            self.device.receive_data(data)
        return drain(self.device)

    def login(self, name="truck-17", token=None, declare=True, versions=tgp.VERSIONS) -> list:
        self.send(tgp.Hello(name, versions))
        [challenge] = self.events()
        assert isinstance(challenge, tgp.Challenge)
        self.send(tgp.Auth(tokens.auth_proof(token or self.token, challenge.nonce, name)))
        events = self.events()
        if declare and isinstance(events[0], tgp.Welcome):
            self.send(tgp.Declare(1, (tgp.Metric(1, F64, "oil_temp"),)))
            events += self.events()
        return events

    def data(self, seq, n=3, start=0, value=1.5) -> None:
        self.send(tgp.Data(seq, tuple(("oil_temp", (start + i) * 1000, value) for i in range(n))))


def test_session_acks_after_storing():
    h = Harness()
    welcome, declared = h.login()
    assert isinstance(welcome, tgp.Welcome) and welcome.window == 32
    assert declared == tgp.Ack(1)
    h.data(2, n=3)
    assert h.events() == [tgp.Ack(2, 3, 0)]
    h.data(3, n=5)
    assert h.events() == [tgp.Ack(3, 2, 3)]  # three of them were stored before
    assert len(h.store.readings) == 5
    assert "truck-17" in h.registry.sessions


def test_readings_failing_a_quality_rule_are_kept_in_quarantine_and_acked():
    h = Harness()
    h.factory.ingest.quality = QualityRules(ranges=(Range("oil_temp", max=200),), max_future=None, max_past=None)
    h.login()
    h.send(tgp.Data(2, (("oil_temp", 1000, 90.0), ("oil_temp", 2000, 250.0))))
    assert h.events() == [tgp.Ack(2, 2, 0)]  # both kept: one stored, one in quarantine
    assert list(h.store.readings.values()) == [90.0]
    assert list(h.store.quarantined.values()) == [(250.0, "oil_temp.max: 250 is above 200")]


def test_a_retransmission_in_a_new_session_counts_duplicates():
    store = MemoryStore()
    token = store.add_device("truck-17")
    first = Harness(store)
    first.login(token=token)
    first.data(2, n=4)
    assert first.events() == [tgp.Ack(2, 4, 0)]
    again = Harness(store)
    again.login(token=token)
    again.data(2, n=4)
    assert again.events() == [tgp.Ack(2, 0, 4)]


def test_wrong_token_unknown_and_revoked_devices_get_the_same_reject():
    store = MemoryStore()
    good = store.add_device("truck-17")
    revoked = store.add_device("old-truck")
    store.revoke("old-truck")
    for name, token in [("truck-17", tokens.new_token().token), ("nobody", good), ("old-truck", revoked)]:
        h = Harness(store)
        events = h.login(name=name, token=token)
        assert events == [tgp.Reject(E.AUTH_FAILED, "unknown device, revoked device or wrong token")]
        assert h.transport.disconnecting
        assert name not in h.registry.sessions


def test_unsupported_version_is_rejected():
    h = Harness()
    h.send(tgp.Hello("truck-17", versions=(4, 5)))
    [reject] = h.events()
    assert reject.code == E.UNSUPPORTED_VERSION and "[1, 2, 3]" in reject.reason
    assert h.transport.disconnecting


def test_answers_go_out_in_frame_order():
    store = ManualStore()
    h = Harness(store)
    h.login()
    for seq in (2, 3, 4):
        h.data(seq, start=seq * 10)
    store.finish(2)
    store.finish(1)
    assert h.events() == []  # frame 2 is not committed yet
    store.finish(0)
    assert h.events() == [tgp.Ack(2, 3, 0), tgp.Ack(3, 3, 0), tgp.Ack(4, 3, 0)]


def test_window_full_pauses_reading_until_answers_drain():
    store = ManualStore()
    h = Harness(store, window=4)
    h.login()
    for seq in range(2, 5):
        h.data(seq, start=seq * 10)
    assert h.transport.producerState == "producing"  # 3 unanswered
    h.data(5, start=50)
    assert h.transport.producerState == "paused"  # 4: the window is full
    h.data(6, start=60)  # already on its way: buffered in the codec, not taken
    assert len(store.pending) == 4
    store.finish(0)
    assert h.transport.producerState == "paused"  # 3 left, more than half the window
    store.finish(1)
    assert h.transport.producerState == "producing"
    assert len(store.pending) == 5  # frame 6 was taken on resuming
    assert [e.seq for e in h.events()] == [2, 3]


def test_a_device_paused_for_backpressure_is_not_closed_as_idle():
    store = ManualStore()
    h = Harness(store, window=2, idle_timeout=60)
    h.login()
    h.data(2, start=20)
    h.data(3, start=30)
    assert h.transport.producerState == "paused"
    h.clock.advance(300)  # the store holds both: the device's PINGs wait unread meanwhile
    assert not h.transport.disconnecting
    store.finish(0)
    store.finish(1)
    assert [e.seq for e in h.events()] == [2, 3]
    h.clock.advance(60.1)  # reading again, and really silent now
    assert h.transport.disconnecting


def test_a_full_store_holds_the_frame_and_stops_reading():
    store = ManualStore()
    h = Harness(store)
    h.login()
    store.room = False
    h.data(2)
    assert h.transport.producerState == "paused"
    assert store.pending == []
    store.room = True
    store.room_waiters.pop().callback(None)
    assert h.transport.producerState == "producing"
    store.finish(0)
    assert h.events() == [tgp.Ack(2, 3, 0)]


def test_a_held_frame_keeps_the_transport_paused_while_the_window_drains():
    store = ManualStore()
    h = Harness(store, window=4)
    h.login()
    for seq in range(2, 6):
        h.data(seq, start=seq * 10)  # 4 unanswered: the window is full
    assert h.transport.producerState == "paused"
    store.room = False
    for i in range(3):
        store.finish(i)  # the window drains to 1 ...
    h.data(6, start=60)  # ... but arrives with no room in the store
    assert h.transport.producerState == "paused"
    store.finish(3)  # answers drained entirely: still paused, a frame is held
    assert h.transport.producerState == "paused"
    h.data(7, start=70)  # bytes that were already in flight stay in the codec
    assert len(store.pending) == 4
    store.room = True
    for waiter in store.room_waiters:
        waiter.callback(None)
    assert h.transport.producerState == "producing"
    assert len(store.pending) == 6  # the held frame and the buffered one were taken
    store.finish(4)
    store.finish(5)
    assert [e.seq for e in h.events()] == [2, 3, 4, 5, 6, 7]


def test_invalid_reading_is_nacked_kept_and_the_session_goes_on():
    h = Harness()
    h.login()
    h.data(2, value=math.nan)
    [nack] = h.events()
    assert (nack.seq, nack.code, nack.fatal) == (2, E.INVALID_READING, False)
    assert nack.text == "readings[0].value: must be finite"
    ((source, device, reason, raw),) = h.store.rejected
    assert source == "tgp 10.1.2.3:5555" and device == "truck-17" and reason.startswith("invalid_reading")
    assert b'"seq": 2' in raw
    h.data(3)
    assert h.events() == [tgp.Ack(3, 3, 0)]


def test_undeclared_metric_is_nacked():
    h = Harness()
    h.login()
    h.device._ours["rpm"] = (9, F64)  # the device forgot to declare it
    h.send(tgp.Data(2, (("rpm", 0, 1.0),)))
    [nack] = h.events()
    assert (nack.code, nack.fatal) == (E.UNKNOWN_METRIC, False)


def test_bad_metric_name_in_a_declaration_is_nacked():
    h = Harness()
    h.login(declare=False)
    h.send(tgp.Declare(1, (tgp.Metric(1, F64, "oil temp"),)))
    [nack] = h.events()
    assert nack.code == E.BAD_DECLARATION and "'oil temp'" in nack.text


def test_corrupt_frame_gets_a_fatal_nack_and_the_connection_closes():
    h = Harness()
    h.login()
    frame = bytearray(h.device.send(tgp.Data(2, (("oil_temp", 0, 1.0),))))
    frame[-1] ^= 0xFF
    h.proto.dataReceived(bytes(frame))
    [nack] = h.events()
    assert (nack.seq, nack.code, nack.fatal) == (0, E.BAD_CRC, True)
    assert h.transport.disconnecting


def test_garbage_before_hello_is_refused():
    h = Harness()
    h.proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    assert h.transport.disconnecting
    [nack] = h.events()
    assert nack.code == E.BAD_FRAME


def test_database_down_asks_the_device_to_retry_later():
    h = Harness()
    h.login()
    h.store.available = False
    h.data(2)
    [nack] = h.events()
    assert (nack.code, nack.fatal) == (E.RETRY_LATER, True) and nack.retry_after_s > 0
    assert h.transport.disconnecting


def test_lookup_failure_during_handshake_is_retry_later():
    h = Harness()
    h.store.device_key = lambda name: fail(StoreUnavailable("database unavailable"))
    h.send(tgp.Hello("truck-17"))
    [reject] = h.events()
    assert reject.code == E.RETRY_LATER
    assert h.transport.disconnecting


def test_handshake_must_finish_in_time():
    """Waiting for the device's AUTH: BYE 7 TIMEOUT, then the close."""
    h = Harness(handshake_timeout=10)
    h.send(tgp.Hello("truck-17"))
    [challenge] = h.events()
    assert isinstance(challenge, tgp.Challenge)
    h.clock.advance(9.9)
    assert not h.transport.disconnecting
    h.clock.advance(0.1)
    [bye] = h.events()
    assert (type(bye), bye.code) == (tgp.Bye, E.TIMEOUT)
    assert h.transport.disconnecting


def test_a_connection_that_never_says_hello_gets_bye_timeout():
    h = Harness(handshake_timeout=10)
    h.clock.advance(10)
    [bye] = h.events()
    assert (type(bye), bye.code) == (tgp.Bye, E.TIMEOUT) and "no handshake within 10 seconds" in bye.reason
    assert h.transport.disconnecting


def test_a_handshake_stuck_on_the_gateways_turn_gets_reject_timeout():
    """The device's key lookup never answers: it is the gateway's turn, so REJECT 7 goes out."""
    h = Harness(handshake_timeout=10)
    h.store.device_key = lambda name: Deferred()
    h.send(tgp.Hello("truck-17"))
    assert h.events() == []
    h.clock.advance(10)
    [reject] = h.events()
    assert (type(reject), reject.code) == (tgp.Reject, E.TIMEOUT)
    assert h.transport.disconnecting


@pytest.mark.parametrize(("idle", "heartbeat"), [(120, 30), (600, 30), (20, 6), (6, 2), (2, 1)])
def test_welcome_heartbeat_is_at_most_a_third_of_the_idle_timeout(idle, heartbeat):
    """A device that pings every heartbeat_s seconds is never closed as idle."""
    h = Harness(idle_timeout=idle)
    welcome = h.login(declare=False)[0]
    assert (welcome.heartbeat_s, welcome.idle_timeout_s) == (heartbeat, idle)
    for _ in range(5):
        h.clock.advance(welcome.heartbeat_s)
        h.send(tgp.Ping(1))
        assert h.events() == [tgp.Pong(1)]
    assert not h.transport.disconnecting


def test_idle_session_is_closed_with_bye():
    h = Harness(idle_timeout=60)
    h.login()
    h.clock.advance(59)
    h.send(tgp.Ping(5))
    assert h.events() == [tgp.Pong(5)]
    h.clock.advance(59)
    assert not h.transport.disconnecting  # the ping counted as life
    h.clock.advance(1)
    [bye] = h.events()
    assert bye.code == E.TIMEOUT
    assert h.transport.disconnecting


def test_a_second_connection_replaces_the_first():
    store, registry, clock = MemoryStore(), DeviceRegistry(), Clock()
    token = store.add_device("truck-17")
    first = Harness(store, registry, clock)
    first.login(token=token)
    second = Harness(store, registry, clock)
    second.login(token=token)
    [bye] = first.events()
    assert bye.code == E.REPLACED
    assert first.transport.disconnecting
    assert registry.sessions["truck-17"] is second.proto
    first.proto.connectionLost(None)
    assert registry.sessions["truck-17"] is second.proto  # the old one's end does not unregister the new


def test_commits_finishing_after_the_device_left_are_not_answered():
    store = ManualStore()
    h = Harness(store)
    h.login()
    h.data(2)
    h.proto.connectionLost(None)
    store.finish(0)  # stored all the same: the device will resend and hear "duplicates"
    assert h.events() == []
    assert len(store.readings) == 3


def test_unexpected_write_result_shapes_do_not_crash():
    h = Harness()
    h.login()
    h.store.write = lambda device, readings, source=None, quarantined=(): succeed(WriteResult(70000, 0))
    h.data(2)
    assert h.events() == [tgp.Ack(2, 0xFFFF, 0)]


# -- hostile bytes ------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=8), st.booleans())
def test_random_bytes_never_escape_the_adapter(chunks, after_login):
    """Garbage before or after the handshake: a NACK or nothing, never an exception, never a hang."""
    h = Harness()
    if after_login:
        h.login()
    for chunk in chunks:
        h.proto.dataReceived(chunk)  # must not raise
    h.clock.advance(200)  # the handshake or idle timer has fired: the connection does not linger
    assert h.transport.disconnecting
    h.proto.connectionLost(None)
    assert h.registry.sessions.get("truck-17") is not h.proto


@pytest.mark.parametrize("version", tgp.VERSIONS)
def test_a_conflicting_reading_is_reported_in_the_ack(version):
    """Version 2's ACK (and 3's) counts conflicts apart; version 1's has no field for them and counts them as stored
    before."""
    h = Harness()
    [welcome, _] = h.login(versions=(version,))
    assert welcome.version == version
    h.data(2, n=2, value=1.5)
    assert h.events() == [tgp.Ack(2, 2, 0, 0)]
    h.data(3, n=3, value=7.25)  # two of them stored before with 1.5
    assert h.events() == [tgp.Ack(3, 1, 0, 2) if version >= 2 else tgp.Ack(3, 1, 2, 0)]
    h.data(4, n=3, value=7.25)  # the third is a retransmission, the other two conflict again
    assert h.events() == [tgp.Ack(4, 0, 1, 2) if version >= 2 else tgp.Ack(4, 0, 3, 0)]
    assert len(h.store.conflicts) == 2
