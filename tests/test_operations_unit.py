"""
The operations pieces that need no network: the log rate limit and the
rate window on task.Clock, JSON log lines, sink health rules, the console's
host key, its plain prompt, and the Health aggregate over MemoryStore.
"""

from __future__ import annotations

import json
import stat

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure

from gateway.ops.health import Health, sink_health
from gateway.ops.logs import LevelFilter, json_line
from gateway.ratelimit import RateLimitedLog
from gateway.ops.authorized_keys import AuthorizedKeys
from gateway.ops.manhole import HOST_KEY_NAME, PlainConsole, host_key
from gateway.readings import Source
from gateway.ops.metrics import GatewayMetrics, RateWindow
from gateway.storage.memory import MemoryStore


class Captured:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.events]


def test_rate_limit_lets_a_burst_through_then_sums_up_the_rest():
    clock, seen = Clock(), Captured()
    limited = RateLimitedLog(Logger(observer=seen), clock, burst=3, window=60)
    for i in range(10):
        limited.warn("10.0.0.5", "bad frame {i}", i=i)
    limited.warn("10.0.0.6", "another peer")
    assert seen.texts() == ["bad frame 0", "bad frame 1", "bad frame 2", "another peer"]
    clock.advance(59)
    limited.warn("10.0.0.5", "still bad")
    assert len(seen.events) == 4
    clock.advance(1)
    limited.warn("10.0.0.5", "bad again")
    assert seen.texts()[4:] == ["8 more messages about 10.0.0.5 were not logged in 60s", "bad again"]


def test_rate_limit_forgets_keys_beyond_its_bound():
    clock, seen = Clock(), Captured()
    limited = RateLimitedLog(Logger(observer=seen), clock, burst=1, window=60)
    limited.MAX_KEYS = 100
    for i in range(1000):
        limited.warn(f"peer-{i}", "x")
        clock.advance(0.01)
    assert len(limited._keys) <= 100
    assert len(seen.events) == 1000  # every new peer gets its first line


def test_rate_window_counts_the_last_minute_only():
    clock = Clock()
    window = RateWindow(clock, 60)
    window.add(600)
    assert window.per_second() == 10
    clock.advance(30)
    window.add(1, 0.004)
    window.add(1, 0.002)
    assert window.per_second() == 602 / 60
    assert window.mean() == (0.004 + 0.002) / 602
    clock.advance(31)  # the first second has left the window
    assert window.per_second() == 2 / 60 and window.mean() == 0.003
    clock.advance(3600)
    assert window.per_second() == 0 and window.mean() is None


def test_json_log_lines_carry_time_level_namespace_and_fields():
    event = {
        "log_format": "refused {source}: {code}",
        "log_level": LogLevel.warn,
        "log_namespace": "gateway.ingest",
        "log_time": 1795341600.25,
        "source": "https 10.0.0.5:4431",
        "code": "unauthorized",
        "log_logger": object(),
    }
    doc = json.loads(json_line(event))
    assert doc == {
        "time": "2026-11-22T10:00:00.250+00:00",
        "level": "warn",
        "namespace": "gateway.ingest",
        "message": "refused https 10.0.0.5:4431: unauthorized",
        "source": "https 10.0.0.5:4431",
        "code": "unauthorized",
    }
    try:
        _ = 1 / 0
    except ZeroDivisionError:
        failure = Failure()
    doc = json.loads(json_line({"log_format": "boom", "log_level": LogLevel.critical, "log_failure": failure}))
    assert doc["level"] == "critical" and "ZeroDivisionError" in doc["traceback"]


def test_level_filter_changes_while_running():
    seen = Captured()
    levels = LevelFilter("warn")
    log = Logger(namespace="gateway.store", observer=levels.wrap(seen))
    log.info("quiet")
    log.warn("loud")
    levels.set("debug")
    log.debug("now visible")
    assert seen.texts() == ["loud", "now visible"]


def test_sink_health_rules():
    ok = {"checked_at": 1.0, "lag_seconds": 400.0, "idle_seconds": 2.0, "paused": False}
    assert sink_health(ok, 300)["ok"] is True  # behind, but moving
    stalled = {**ok, "idle_seconds": 500.0}
    doc = sink_health(stalled, 300)
    assert doc["ok"] is False and doc["problem"] == "readings have waited 400s and nothing was sent for 500s"
    paused = {**stalled, "paused": True}
    assert sink_health(paused, 300)["problem"].endswith("(the sink is paused)")
    assert sink_health({**ok, "lag_seconds": None, "idle_seconds": None}, 300)["ok"] is True  # nothing waits
    assert sink_health({"checked_at": None}, 300)["ok"] is False


class FakeUploader:
    def __init__(self, status: dict) -> None:
        self.status = status

    def sink_status(self) -> dict:
        return self.status


def test_health_is_the_conjunction_of_database_queue_and_sinks():
    store = MemoryStore()
    uploader = FakeUploader({"cloud": {"checked_at": 1.0, "lag_seconds": 1.0, "idle_seconds": 1.0, "paused": False}})
    health = Health(store, stall_after=300, uploader=lambda: uploader)
    results: list = []
    health.check().addCallback(results.append)
    assert results[-1][0] is True and results[-1][1]["sinks"]["cloud"]["ok"] is True
    uploader.status["cloud"]["lag_seconds"] = uploader.status["cloud"]["idle_seconds"] = 900.0
    health.check().addCallback(results.append)
    assert results[-1][0] is False and results[-1][1]["database"] == "ok"
    uploader.status.clear()
    store.available = False
    health.check().addCallback(results.append)
    assert results[-1][0] is False and results[-1][1]["database"] == "database unavailable"


def test_host_key_is_made_once_privately(tmp_path):
    directory = tmp_path / "manhole"
    first, made = host_key(directory)
    again, made_again = host_key(directory)
    assert (made, made_again) == (True, False)
    assert first == again and first.sshType() == b"ssh-ed25519"
    assert stat.S_IMODE((directory / HOST_KEY_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_authorized_keys_are_read_at_each_login(tmp_path):
    first, _ = host_key(tmp_path / "a")
    second, _ = host_key(tmp_path / "b")
    path = tmp_path / "authorized_keys"
    db = AuthorizedKeys(path)
    assert db.entries() == []  # no file: nobody
    path.write_bytes(b"# comment\n" + first.public().toString("openssh") + b" ops\n")
    assert [e.key for e in db.entries()] == [first.public()]
    path.write_bytes(path.read_bytes() + b"not a key\n" + second.public().toString("openssh") + b"\n")
    assert [e.key for e in db.entries()] == [first.public(), second.public()]


def test_plain_console_prompts_runs_and_reports_errors():
    console = PlainConsole({"answer": 42}, "hello")
    transport = StringTransport()
    console.makeConnection(transport)
    console.dataReceived(b"answer + 1\r\ndef f():\n    return 1\n\nf()\n1/0\n")
    out = transport.value().decode()
    assert out.startswith("hello\n>>> 43\n>>> ... ... >>> 1\n>>> Traceback")
    assert "ZeroDivisionError" in out and out.endswith(">>> ")
    assert console.failed is True


def test_metrics_remember_device_activity_per_transport():
    clock = Clock()
    metrics = GatewayMetrics(clock)
    metrics.stored("truck-1", Source("tgp", "10.0.0.5", 40000), 10, 1)
    clock.advance(5)
    metrics.stored("truck-1", Source("https", "10.0.0.5", 40001, tls=True), 2, 0)
    metrics.rejected(Source("tgp", "10.0.0.5", 40000), "invalid_reading", "truck-1", "readings[0].value: not finite")
    tgp, https = metrics.activity[("truck-1", "tgp")], metrics.activity[("truck-1", "https")]
    assert (tgp.readings, tgp.duplicates, tgp.rejected, tgp.since) == (10, 1, 1, 0)
    assert tgp.last_error == "invalid_reading: readings[0].value: not finite"
    assert (https.readings, https.since) == (2, 5)
    assert metrics.sample("gateway_readings_accepted_total", {"transport": "tgp"}) == 10
    assert metrics.sample("gateway_inputs_rejected_total", {"transport": "tgp", "reason": "invalid_reading"}) == 1


def test_a_console_connection_that_does_not_log_in_is_dropped(tmp_path):
    from twisted.internet.address import IPv4Address

    from gateway.ops.manhole import LOGIN_TIMEOUT, console_factory

    clock = Clock()
    factory = console_factory(tmp_path / "m", tmp_path / "authorized_keys", dict, "hi", clock)
    factory.startFactory()
    peer = IPv4Address("TCP", "127.0.0.1", 50000)
    transport = StringTransport(peerAddress=peer)
    proto = factory.buildProtocol(peer)
    proto.makeConnection(transport)
    assert transport.value().startswith(b"SSH-2.0-")  # the server said hello
    clock.advance(LOGIN_TIMEOUT - 1)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionError("gone")))
    assert not clock.getDelayedCalls()
