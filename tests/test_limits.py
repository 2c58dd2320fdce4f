"""
Limits without a network: connection caps on a wrapped factory, device
rates on a token bucket, and the HTTP deadline for a request's first line,
all on task.Clock.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.ingest.core import Ingest
from gateway.ops.metrics import GatewayMetrics

from gateway.ingest.rates import BURST_SECONDS, DeviceRates, OverLimit
from gateway.net.limits import ConnectionLimits, LimitedFactory
from tests.test_http_adapter import BODY, NO_TIME_RULES, Client


def connect(factory, host: str):
    protocol = factory.buildProtocol(IPv4Address("TCP", host, 4000))
    if protocol is not None:
        protocol.makeConnection(StringTransport())
    return protocol


def test_connections_over_the_caps_are_refused_and_counted_back_when_closed():
    refused = []
    limits = ConnectionLimits(max_total=5, max_per_address=3, refused=lambda a, why: refused.append((a, why)))
    factory = LimitedFactory(Factory.forProtocol(Protocol), limits)
    a = [connect(factory, "10.0.0.1") for _ in range(4)]
    assert [p is not None for p in a] == [True, True, True, False]
    b = [connect(factory, "10.0.0.2") for _ in range(3)]
    assert [p is not None for p in b] == [True, True, False]
    assert refused == [("10.0.0.1", "address"), ("10.0.0.2", "total")]
    assert (limits.total, limits.by_address) == (5, {"10.0.0.1": 3, "10.0.0.2": 2})
    a[0].connectionLost(None)
    b[0].connectionLost(None)
    assert (limits.total, limits.by_address) == (3, {"10.0.0.1": 2, "10.0.0.2": 1})
    assert connect(factory, "10.0.0.1") is not None
    for p in b[1:2]:
        p.connectionLost(None)
    assert "10.0.0.2" not in limits.by_address  # no entry kept for an address with nothing open


def test_a_factory_that_builds_nothing_gives_its_place_back():
    limits = ConnectionLimits(1, 1)
    factory = LimitedFactory(Factory.forProtocol(Protocol), limits)
    factory.wrappedFactory.buildProtocol = lambda addr: None
    assert connect(factory, "10.0.0.1") is None
    assert limits.total == 0


def test_a_device_may_burst_then_is_told_when_to_come_back():
    clock = Clock()
    rates = DeviceRates(100, clock)  # 100 readings/s, bursts of 1000
    rates.take("truck-1", 1000)
    try:
        rates.take("truck-1", 50)
    except OverLimit as e:
        assert e.retry_after == 1  # 50 readings at 100/s
    else:
        raise AssertionError("the second write went through")
    rates.take("truck-2", 10)  # another device is not affected
    clock.advance(0.5)
    rates.take("truck-1", 50)
    assert rates.refused == 1


def test_a_write_bigger_than_the_burst_passes_when_the_bucket_is_full_and_leaves_a_debt():
    clock = Clock()
    rates = DeviceRates(10, clock)
    rates.take("big", 5000)  # over the 100-reading bucket: allowed once, leaves it 4900 short
    try:
        rates.take("big", 1)
    except OverLimit as e:
        assert e.retry_after == 491
    clock.advance(491 + BURST_SECONDS)
    rates.take("big", 100)


def test_rate_zero_means_no_limit_and_the_table_is_bounded(monkeypatch):
    clock = Clock()
    unlimited = DeviceRates(0, clock)
    for _ in range(100):
        unlimited.take("x", 1_000_000)
    monkeypatch.setattr("gateway.ingest.rates.MAX_TRACKED", 10)
    rates = DeviceRates(1, clock)
    for i in range(50):
        rates.take(f"d{i}", 1)
    assert len(rates._buckets) == 10


def test_https_answers_429_with_retry_after_and_stores_nothing():
    c = Client()
    c.site.ingest = Ingest(
        c.store, c.clock, GatewayMetrics(c.clock), rates=DeviceRates(0.1, c.clock), quality=NO_TIME_RULES
    )  # one reading in 10 s
    c.site.resource.children[b"v1"].children[b"readings"].ingest = c.site.ingest
    c.request()
    c.request(body=BODY.replace(b"00.250Z", b"01Z"))
    (s1, _, b1), (s2, h2, b2) = c.responses()
    assert (s1, b1) == (200, {"accepted": 1, "duplicates": 0})
    assert (s2, b2["error"]) == (429, "rate_limited") and int(h2[b"retry-after"]) == 10
    assert "sends more than 0.1 readings/s" in b2["message"]
    assert len(c.store.readings) == 1


def test_a_request_line_that_drips_in_is_cut_at_the_deadline():
    """twisted.web's idle timer restarts with every byte; the first line has its own deadline."""
    c = Client(timeout=30)
    for _ in range(29):
        c.clock.advance(1)
        c.send(b"P")
    assert not c.transport.disconnecting
    c.clock.advance(1)
    assert c.transport.value() == b"" and c.transport.disconnecting  # cut: no request was begun


def test_after_an_answer_the_next_request_line_has_its_own_deadline():
    c = Client(timeout=30)
    c.request()
    assert c.only()[0] == 200
    c.clock.advance(20)
    c.send(b"POST /v1/rea")
    c.clock.advance(9)
    assert not c.transport.disconnecting
    c.clock.advance(1)
    assert c.transport.disconnecting


def test_a_quiet_keep_alive_connection_closes_without_counting_as_a_refusal():
    c = Client(timeout=30)
    c.request()
    c.clock.advance(31)
    assert c.transport.disconnecting
    assert "request_timeout" not in str(list(c.site.ingest.metrics.registry.collect()))


def test_a_connection_that_never_sends_is_counted_as_refused():
    c = Client(timeout=30)
    c.clock.advance(30)
    assert c.transport.disconnecting
    assert 'reason="request_timeout"' in _metrics_text(c)


def _metrics_text(c: Client) -> str:
    from prometheus_client import generate_latest

    return generate_latest(c.site.ingest.metrics.registry).decode()
