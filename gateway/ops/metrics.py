"""
What the gateway counts, for ``GET /metrics`` (Prometheus text format), the
manhole's ``status()`` and ``/healthz``.

Counters and histograms that change on the hot path are prometheus_client
objects, each label's child looked up once and kept. Values that already
live elsewhere (queue depth, open connections, the uploader's lag) are read
when scraped, by ``LiveCollector``, so nothing keeps a second copy up to
date. The page is rendered on the reactor thread: collecting is a few dozen
values, and it reads state that only the reactor thread may touch (the
stock ``prometheus_client.twisted`` resource would read it from a thread).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime
from twisted.web import resource, server

from gateway.readings import Source

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000)
ACTIVITY_SIZE = 100_000  # devices remembered for devices()/status(); the least recently active go first


class RateWindow:
    """Events per second over the last ``seconds``, in one-second buckets on an injected clock."""

    def __init__(self, clock: IReactorTime, seconds: int = 60) -> None:
        self.clock = clock
        self.seconds = seconds
        self._buckets: list[list[float]] = [[-1, 0.0, 0.0] for _ in range(seconds)]  # [second, count, total]

    def add(self, count: float, total: float = 0.0) -> None:
        second = int(self.clock.seconds())
        bucket = self._buckets[second % self.seconds]
        if bucket[0] != second:
            bucket[0], bucket[1], bucket[2] = second, 0.0, 0.0
        bucket[1] += count
        bucket[2] += total

    def _recent(self) -> list[list[float]]:
        now = int(self.clock.seconds())
        return [b for b in self._buckets if now - self.seconds < b[0] <= now]

    def per_second(self) -> float:
        return sum(b[1] for b in self._recent()) / self.seconds

    def mean(self) -> float | None:
        """Mean of ``total / count`` over the window (for example seconds per commit), or None."""
        recent = self._recent()
        count = sum(b[1] for b in recent)
        return sum(b[2] for b in recent) / count if count else None


@dataclass
class DeviceActivity:
    name: str
    transport: str
    address: str
    since: float  # first seen by this process
    last: float
    readings: int = 0
    duplicates: int = 0
    rejected: int = 0
    last_error: str = ""
    last_error_at: float | None = None


@dataclass
class Counts:
    """Children of the labelled counters, looked up once per label value."""

    accepted: dict[str, Any] = field(default_factory=dict)
    duplicates: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)


class GatewayMetrics:
    """One gateway's counters, in its own registry (so several gateways in one process do not mix)."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.started = clock.seconds()
        self.registry = CollectorRegistry()
        r = self.registry
        self._accepted = Counter(
            "gateway_readings_accepted", "Readings stored (new), by transport.", ["transport"], registry=r
        )
        self._duplicates = Counter(
            "gateway_readings_duplicate",
            "Readings received again and not stored a second time, by transport.",
            ["transport"],
            registry=r,
        )
        self._conflicting = Counter(
            "gateway_readings_conflicting",
            "Readings sent again with another value (the first value kept, this one set aside), by transport.",
            ["transport"],
            registry=r,
        )
        self._quarantined = Counter(
            "gateway_readings_quarantined",
            "Readings that failed a quality rule and were kept in quarantine, by transport.",
            ["transport"],
            registry=r,
        )
        self._rejected = Counter(
            "gateway_inputs_rejected",
            "Requests, frames and handshakes refused, by transport and reason (the error code the client got).",
            ["transport", "reason"],
            registry=r,
        )
        self._latency = Histogram(
            "gateway_ack_latency_seconds",
            "From a request or frame arriving whole to its acknowledgement (after COMMIT), by transport.",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._batch = Histogram(
            "gateway_store_batch_readings",
            "Readings per group-committed transaction.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self._commit = Histogram(
            "gateway_store_commit_seconds",
            "Time to write and commit one batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ui_sign_ins = Counter(
            "gateway_ui_sign_ins",
            "Dashboard sign-ins, by outcome (ok, refused).",
            ["outcome"],
            registry=r,
        )
        self.ui_csp_reports = Counter(
            "gateway_ui_csp_reports",
            "Content-Security-Policy violations browsers reported from the dashboard (should stay 0).",
            registry=r,
        )
        ProcessCollector(registry=r)
        self.live = LiveCollector()
        r.register(self.live)
        self._counts = Counts()
        self.accepted_window = RateWindow(clock)
        self.commit_window = RateWindow(clock)
        self.activity: OrderedDict[tuple[str, str], DeviceActivity] = OrderedDict()  # by (device, transport)

    # -- recording (hot path) -------------------------------------------

    def stored(self, device: str, source: Source, accepted: int, duplicates: int) -> None:
        transport = source.transport
        counts = self._counts
        child = counts.accepted.get(transport)
        if child is None:
            child = counts.accepted[transport] = self._accepted.labels(transport)
            counts.duplicates[transport] = self._duplicates.labels(transport)
        if accepted:
            child.inc(accepted)
            self.accepted_window.add(accepted)
        if duplicates:
            counts.duplicates[transport].inc(duplicates)
        seen = self._seen(device, transport, source)
        seen.readings += accepted
        seen.duplicates += duplicates

    def conflicting(self, source: Source, count: int) -> None:
        self._conflicting.labels(source.transport).inc(count)

    def quarantined(self, source: Source, count: int) -> None:
        self._quarantined.labels(source.transport).inc(count)

    def rejected(self, source: Source, reason: str, device: str | None = None, message: str = "") -> None:
        transport = source.transport
        self._rejected.labels(transport, reason).inc()
        if device is not None:
            seen = self._seen(device, transport, source)
            seen.rejected += 1
            seen.last_error = f"{reason}: {message}" if message else reason
            seen.last_error_at = self.clock.seconds()

    def acked(self, source: Source, seconds: float) -> None:
        transport = source.transport
        child = self._counts.latency.get(transport)
        if child is None:
            child = self._counts.latency[transport] = self._latency.labels(transport)
        child.observe(seconds)

    def committed(self, readings: int, seconds: float) -> None:
        self._batch.observe(readings)
        self._commit.observe(seconds)
        self.commit_window.add(1, seconds)

    def _seen(self, device: str, transport: str, source: Source) -> DeviceActivity:
        now = self.clock.seconds()
        activity = self.activity
        key = (device, transport)
        seen = activity.get(key)
        if seen is None:
            seen = activity[key] = DeviceActivity(device, transport, source.address, now, now)
            if len(activity) > ACTIVITY_SIZE:
                activity.popitem(last=False)
        else:
            activity.move_to_end(key)
            seen.address, seen.last = source.address, now
        return seen

    # -- reading -----------------------------------------------------------

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The current value of one sample (tests, status())."""
        value = self.registry.get_sample_value(name, labels or {})
        return value or 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LiveCollector(Collector):
    """Gauges read from the running gateway at scrape time; sources are added as parts start."""

    def __init__(self) -> None:
        self.sources: list[Callable[[], Iterator[Any]]] = []

    def collect(self) -> Iterator[Any]:
        for source in list(self.sources):
            yield from source()


class MetricsResource(resource.Resource):
    """GET /metrics: the registry in Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: GatewayMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"cache-control", b"no-store")
        return self.metrics.render()

    render_HEAD = render_GET
