"""
The uploader's decisions and timing, with task.Clock and fakes for the
database and the HTTP client; edge reduction; sink configuration.
"""

from __future__ import annotations

import email.utils

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway.config import ConfigError, build_config
from gateway.readings import StoreUnavailable
from gateway.outbound.reduce import Row, raw_line, reduce_rows, wire_ts
from gateway.outbound.sinks import Rule, Sink
from gateway.outbound.ledger import START, Batch, Wait
from gateway.outbound.sender import Reply, backoff, judge, retry_after_seconds
from gateway.outbound.uploader import SinkUploader

SINK = Sink(name="cloud", url="https://cloud.example/in", batch=100, flush=5.0, backoff=1.0, backoff_cap=60.0)


def half() -> float:
    return 0.5


# -- verdicts ------------------------------------------------------------


@pytest.mark.parametrize(
    "status, kind",
    [(200, "sent"), (202, "sent"), (204, "sent"), (500, "retry"), (502, "retry"), (503, "retry"), (408, "retry"),
     (429, "retry"), (301, "retry"), (400, "park"), (401, "park"), (403, "park"), (404, "park"), (413, "park"),
     (422, "park")],
)  # fmt: skip
def test_each_status_gets_its_verdict(status, kind):
    verdict = judge(SINK, Reply(status, None, "why"), 0, 0.0, half)
    assert verdict.kind == kind
    if kind != "sent":
        assert verdict.error.startswith(f"HTTP {status}: why")


def test_retry_after_is_honoured_for_408_429_503_only():
    assert judge(SINK, Reply(429, "30"), 0, 0.0, half).delay == 30
    assert judge(SINK, Reply(503, "120"), 5, 0.0, half).delay == 120
    assert judge(SINK, Reply(408, "2"), 0, 0.0, half).delay == 2
    assert judge(SINK, Reply(500, "30"), 0, 0.0, half).delay == 0.5  # backoff, not the header
    assert judge(SINK, Reply(429, "soon"), 0, 0.0, half).delay == 0.5
    assert judge(SINK, Reply(429, "999999"), 0, 0.0, half).delay == 3600


def test_retry_after_as_an_http_date():
    now = 1_800_000_000.0
    assert retry_after_seconds(email.utils.formatdate(now + 42, usegmt=True), now) == 42
    assert retry_after_seconds(email.utils.formatdate(now - 42, usegmt=True), now) == 0
    assert retry_after_seconds("7", now) == 7
    assert retry_after_seconds(None, now) is None
    assert retry_after_seconds("Tuesday", now) is None


def test_backoff_is_exponential_with_full_jitter_and_a_cap():
    top = [backoff(SINK, n, lambda: 1.0) for n in range(10)]
    assert top == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert backoff(SINK, 3, lambda: 0.0) == 0
    assert backoff(SINK, 3, lambda: 0.25) == 2
    assert backoff(SINK, 10_000, lambda: 1.0) == 60


def test_a_connection_error_is_retried_and_described():
    verdict = judge(SINK, Failure(ConnectionRefusedError("Connection refused")), 2, 0.0, half)
    assert verdict.kind == "retry" and verdict.delay == 2.0
    assert "Connection refused" in verdict.error


# -- the loop, on a Clock -------------------------------------------------


class FakeLedger:
    def __init__(self, cuts=()) -> None:
        self.cuts = list(cuts)  # what cut() returns, in order; then Wait(flush)
        self.recorded: list[tuple[int, str, float]] = []
        self.claimable: list[Batch] = []
        self.down = False
        self.cut_calls: list[bool] = []

    def claim(self, sink, holding=()):
        if self.down:
            return fail(StoreUnavailable("database unavailable: gone"))
        return succeed(self.claimable.pop(0) if self.claimable else None)

    def cut(self, sink, force=False):
        self.cut_calls.append(force)
        return succeed(self.cuts.pop(0) if self.cuts else Wait(sink.flush))

    def fill(self, sink, batch):
        return succeed([batch])

    def record(self, sink, batch):
        self.recorded.append((batch.id, batch.verdict.kind, batch.verdict.delay))
        return succeed(None)


class FakeSender:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.requests: list[tuple[float, str, Deferred]] = []

    def send(self, batch):
        d: Deferred = Deferred()
        self.requests.append((self.clock.seconds(), batch.key, d))
        return d

    def answer(self, result) -> None:
        d = self.requests[-1][2]
        if isinstance(result, Exception):
            d.errback(result)
        else:
            d.callback(result)


def batch(n: int) -> Batch:
    return Batch(n, f"key-{n}", START, START, 10, b"body")


def loop(ledger, rand=half):
    clock = Clock()
    sender = FakeSender(clock)
    return SinkUploader(SINK, ledger, sender, clock, rand=rand), clock, sender


def test_a_partial_batch_waits_for_the_flush_interval_plus_jitter():
    ledger = FakeLedger([Wait(3.0), batch(1)])
    uploader, clock, sender = loop(ledger)
    uploader.start()
    assert uploader.next_wake == 0.5  # first look: a random phase within the jitter
    clock.advance(0.5)
    assert ledger.cut_calls == [False] and sender.requests == []
    assert uploader.next_wake == 0.5 + 3.0 + 0.5  # due in 3s, plus 20% of 5s times 0.5
    clock.advance(3.49)
    assert sender.requests == []
    clock.advance(0.01)
    assert [key for _, key, _ in sender.requests] == ["key-1"]


def test_a_full_batch_committed_wakes_the_loop_early():
    ledger = FakeLedger([Wait(5.0), batch(1)])
    uploader, clock, sender = loop(ledger)
    uploader.start()
    clock.advance(0.5)
    uploader.committed(60)
    clock.advance(0)
    assert sender.requests == []
    uploader.committed(40)  # 100 = a full batch
    clock.advance(0)
    assert len(sender.requests) == 1


def test_a_failing_batch_is_resent_with_backoff_until_it_is_taken():
    ledger = FakeLedger([batch(1), batch(2)])
    uploader, clock, sender = loop(ledger)
    uploader.start()
    clock.advance(0.5)
    sender.answer(Reply(500))
    assert ledger.recorded == [(1, "retry", 0.5)]  # 1s * 2**0, times 0.5
    clock.advance(0.49)
    assert len(sender.requests) == 1
    clock.advance(0.01)
    sender.answer(ConnectionRefusedError())
    assert ledger.recorded[-1] == (1, "retry", 1.0)  # 1s * 2**1, times 0.5
    clock.advance(1.0)
    sender.answer(Reply(429, "30"))
    assert ledger.recorded[-1] == (1, "retry", 30)
    clock.advance(29.9)
    assert len(sender.requests) == 3
    clock.advance(0.1)
    sender.answer(Reply(200))
    # the same batch every time; then at once the next
    assert [key for _, key, _ in sender.requests] == ["key-1"] * 4 + ["key-2"]
    assert ledger.recorded[-1] == (1, "sent", 0.0)
    assert uploader.counters.batches_sent == 1 and uploader.counters.failures == 3


def test_a_refused_batch_is_parked_and_the_next_one_goes_at_once():
    ledger = FakeLedger([batch(1), batch(2)])
    uploader, clock, sender = loop(ledger)
    uploader.start()
    clock.advance(0.5)
    sender.answer(Reply(400, None, "bad field"))
    assert ledger.recorded == [(1, "park", 0.0)]
    assert [key for _, key, _ in sender.requests] == ["key-1", "key-2"]
    assert uploader.counters.parked == 1 and "bad field" in uploader.counters.last_error


def test_batches_left_by_a_dead_gateway_go_before_new_ones():
    ledger = FakeLedger([batch(2)])
    ledger.claimable = [batch(1)]
    uploader, clock, sender = loop(ledger)
    uploader.start()
    clock.advance(0.5)
    sender.answer(Reply(200))
    assert [key for _, key, _ in sender.requests] == ["key-1", "key-2"]


def test_a_database_outage_is_waited_out():
    ledger = FakeLedger([batch(1)])
    ledger.down = True
    uploader, clock, sender = loop(ledger)
    uploader.start()
    clock.advance(0.5)
    assert sender.requests == [] and uploader.next_wake is not None
    ledger.down = False
    clock.advance(60)
    assert len(sender.requests) == 1


def test_a_verdict_is_recorded_even_when_the_database_was_down_at_first():
    ledger = FakeLedger([batch(1)])
    uploader, clock, sender = loop(ledger)
    uploader.start()
    clock.advance(0.5)
    failures = [StoreUnavailable("database unavailable: gone")]
    real_record = ledger.record

    def record(sink, b):
        return fail(failures.pop()) if failures else real_record(sink, b)

    ledger.record = record
    sender.answer(Reply(200))
    assert ledger.recorded == []
    clock.advance(60)
    assert ledger.recorded == [(1, "sent", 0.0)]
    assert len(sender.requests) == 1, "recorded, not sent again"


def test_stop_cancels_the_request_and_records_nothing():
    ledger = FakeLedger([batch(1)])
    uploader, clock, sender = loop(ledger)
    uploader.start()
    clock.advance(0.5)
    stopped = uploader.stop()
    assert stopped.called and ledger.recorded == []
    clock.advance(1000)
    assert len(sender.requests) == 1


def test_flush_sends_a_partial_batch_now_and_pause_holds_everything():
    ledger = FakeLedger([Wait(5.0), batch(1)])
    uploader, clock, sender = loop(ledger)
    uploader.pause()
    uploader.start()
    clock.advance(100)
    assert ledger.cut_calls == []
    uploader.resume()
    clock.advance(0)
    assert ledger.cut_calls == [False]
    uploader.flush()
    clock.advance(0)
    assert ledger.cut_calls[:2] == [False, True] and len(sender.requests) == 1


# -- edge reduction -------------------------------------------------------


def rows(metric: str, values, step_s: float = 1.0) -> list[Row]:
    return [
        Row(1, "truck-1", metric, int(i * step_s * 1e6), v, int(i * step_s * 1e6) + 5) for i, v in enumerate(values)
    ]


def test_deadband_with_heartbeat():
    sink = Sink(name="s", url="https://x/", rules=(Rule("oil_*", deadband=1.0, heartbeat=10),))
    lines, state = reduce_rows(sink, rows("oil_temp", [50, 50.5, 50.9, 51.2, 51.3] + [51.3] * 20), {})
    import json

    sent = [(json.loads(line)["ts"], json.loads(line)["value"]) for line in lines]
    assert sent == [(wire_ts(0), 50), (wire_ts(3_000_000), 51.2), (wire_ts(13_000_000), 51.3),
                    (wire_ts(23_000_000), 51.3)]  # fmt: skip
    assert state == {(1, "oil_temp"): (51.3, 23_000_000)}
    # the next batch goes on from the state
    more, _ = reduce_rows(sink, [Row(1, "truck-1", "oil_temp", 24_000_000, 52.0, 0)], state)
    assert more == []


def test_aggregates_per_interval_and_raw_for_other_metrics():
    import json

    sink = Sink(name="s", url="https://x/", rules=(Rule("vib*", aggregate=10),))
    lines, state = reduce_rows(sink, rows("vibration", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]) + rows("fuel", [7]), {})
    decoded = [json.loads(line) for line in lines]
    assert decoded[0] == json.loads(raw_line(rows("fuel", [7])[0]))
    assert [(d["ts"], d["count"], d["min"], d["max"], d["mean"]) for d in decoded[1:]] == [
        (wire_ts(0), 10, 1, 10, 5.5),
        (wire_ts(10_000_000), 2, 11, 12, 11.5),
    ]
    assert state == {}


def test_uploaded_timestamps_are_rfc3339_with_microseconds():
    assert wire_ts(0) == "1970-01-01T00:00:00.000000Z"
    assert wire_ts(1_767_225_600_123_456) == "2026-01-01T00:00:00.123456Z"


# -- configuration ---------------------------------------------------------


def config(**values):
    return build_config({k.replace("_", "-"): v for k, v in values.items()})


def test_upload_urls_must_be_https_except_to_loopback():
    assert config(upload_url=["https://cloud.example/in"]).sinks[0].name == "cloud.example"
    assert config(upload_url=["http://127.0.0.1:8080/in"]).sinks[0].name == "127.0.0.1:8080"
    with pytest.raises(ConfigError, match="^--upload-url: 'http://cloud.example/in': plain http:// is allowed"):
        config(upload_url=["http://cloud.example/in"])
    with pytest.raises(ConfigError, match="^--upload-url: 'ftp://x/' is not an https:// URL"):
        config(upload_url=["ftp://x/"])
    with pytest.raises(ConfigError, match="credentials in a header"):
        config(upload_url=["https://user:pw@cloud.example/"])
    with pytest.raises(ConfigError, match="two sinks are named 'cloud.example'"):
        config(upload_url=["https://cloud.example/a", "https://cloud.example/b"])


def test_sink_tables_with_headers_from_the_environment_and_files(tmp_path, monkeypatch):
    secret = tmp_path / "token"
    secret.write_text("Bearer from-file\n")
    monkeypatch.setenv("CLOUD_TOKEN", "Bearer from-env")
    tables = [
        {"name": "primary", "url": "https://a.example/", "headers": {"Authorization": {"env": "CLOUD_TOKEN"}},
         "batch": 500, "flush": 2, "reduce": [{"match": "oil_*", "deadband": 0.5, "heartbeat": 60}]},
        {"name": "backup", "url": "https://b.example/", "headers": {"Authorization": {"file": str(secret)}}},
    ]  # fmt: skip
    sinks = build_config({}, {"sink": tables, "upload-batch": 2000}).sinks
    assert [(s.name, s.batch, s.flush) for s in sinks] == [("primary", 500, 2), ("backup", 2000, 5.0)]
    assert sinks[0].headers == (("Authorization", "Bearer from-env"),)
    assert sinks[1].headers == (("Authorization", "Bearer from-file"),)
    assert sinks[0].rules == (Rule("oil_*", deadband=0.5, heartbeat=60),)


@pytest.mark.parametrize(
    "table, message",
    [
        ({"url": "https://a.example/", "headers": {"Authorization": {"env": "NOPE_NOT_SET"}}},
         "[[sink]] 'https://a.example/': headers.Authorization: environment variable NOPE_NOT_SET is not set"),
        ({"name": "a", "url": "https://a.example/", "headers": {"Content-Type": "x"}},
         "[[sink]] 'a': headers: Content-Type is set by the uploader"),
        ({"name": "a", "url": "https://a.example/", "batch": 0}, "[[sink]] 'a': 0 is outside 1..1e+06"),
        ({"name": "a", "url": "https://a.example/", "colour": "red"}, "[[sink]] 'a': unknown key 'colour'"),
        ({"name": "a b", "url": "https://a.example/"}, "[[sink]] 'a b': name: must be 1-64 characters"),
        ({"name": "a", "url": "https://a.example/", "reduce": [{"match": "x*"}]},
         "[[sink]] 'a': reduce 'x*': give either deadband (with an optional heartbeat) or aggregate"),
        ({"name": "a", "url": "https://a.example/", "ca": "/nonexistent.pem"},
         "[[sink]] 'a': ca: '/nonexistent.pem' cannot be read"),
    ],
)  # fmt: skip
def test_bad_sink_tables_stop_the_start_with_one_line(table, message):
    with pytest.raises(ConfigError) as e:
        build_config({}, {"sink": [table]})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_retention_takes_durations():
    assert config(retention="30d").retention == 30 * 86400
    assert config(retention="12h").retention == 12 * 3600
    assert config(retention="3600").retention == 3600
    assert config().retention is None
    with pytest.raises(ConfigError, match="^--retention: '5s' is outside 60s..100 years"):
        config(retention="5s")
    with pytest.raises(ConfigError, match="^--retention: 'soon' is not a duration"):
        config(retention="soon")


def test_upload_ca_must_hold_certificates(tmp_path):
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing here\n")
    with pytest.raises(ConfigError, match="^--upload-ca: '.*empty.pem' holds no PEM certificate$"):
        config(upload_ca=str(empty))
