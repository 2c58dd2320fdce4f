"""
The HTTP resource over an in-memory transport: every status the API
promises, body limits while reading, the request deadline (task.Clock),
and keep-alive. The store is MemoryStore; storage has its own tests.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.transports.http import ingest_site
from gateway.ingest.core import Ingest
from gateway.ops.metrics import GatewayMetrics
from gateway.ops.health import Health
from gateway.ingest.quality import QualityRules

from gateway.storage.memory import MemoryStore

BODY = json.dumps({"readings": [{"metric": "oil_temp", "ts": "2026-11-22T10:00:00.250Z", "value": 81.5}]}).encode()

# A task.Clock starts at 1970: readings of 2026 would be far in its future.
NO_TIME_RULES = QualityRules(max_future=None, max_past=None)


class Client:
    def __init__(self, max_body=1024, timeout=30.0, uploader=None):
        self.store = MemoryStore()
        self.token = self.store.add_device("truck-17")
        self.clock = Clock()
        self.site = ingest_site(
            Ingest(self.store, self.clock, GatewayMetrics(self.clock), quality=NO_TIME_RULES),
            self.store,
            clock=self.clock,
            max_body=max_body,
            request_timeout=timeout,
            health=Health(self.store, stall_after=300.0, uploader=lambda: uploader),
        )
        self.channel = self.site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 4711))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 4711))
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def request(self, method=b"POST", path=b"/v1/readings", body=BODY, headers=None, token=True):
        hdrs = {b"Host": b"gw", b"Content-Type": b"application/json"}
        if token:
            hdrs[b"Authorization"] = b"Bearer " + (self.token.encode() if token is True else token)
        if body is not None:
            hdrs[b"Content-Length"] = str(len(body)).encode()
        hdrs.update(headers or {})
        head = b"%s %s HTTP/1.1\r\n" % (method, path) + b"".join(
            b"%s: %s\r\n" % kv for kv in hdrs.items() if kv[1] is not None
        )
        self.send(head + b"\r\n" + (body or b""))

    def responses(self) -> list[tuple[int, dict, dict]]:
        """Parse every response written so far: (status, headers, json)."""
        data = self.transport.value()
        out = []
        while data:
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
            if b"content-length" in headers:
                n = int(headers[b"content-length"])
                body, data = rest[:n], rest[n:]
            else:  # chunked
                body, data = b"", rest
                while True:
                    size_line, _, data = data.partition(b"\r\n")
                    size = int(size_line, 16)
                    chunk, data = data[:size], data[size + 2 :]
                    if size == 0:
                        break
                    body += chunk
            out.append((status, headers, json.loads(body)))
        return out

    def only(self):
        rs = self.responses()
        assert len(rs) == 1, rs
        return rs[0]


def test_accepts_then_reports_duplicates_on_one_connection():
    c = Client()
    c.request()
    c.request()
    (s1, h1, b1), (s2, _, b2) = c.responses()
    assert (s1, b1) == (200, {"accepted": 1, "duplicates": 0})
    assert (s2, b2) == (200, {"accepted": 0, "duplicates": 1})
    assert h1[b"content-type"] == b"application/json"
    assert not c.transport.disconnecting  # keep-alive


@pytest.mark.parametrize("token", [None, b"wrong", b"0123456789abcdef." + b"A" * 43])
def test_missing_or_wrong_token_get_the_same_401(token):
    c = Client()
    c.request(token=token if token is not None else False)
    status, _, body = c.only()
    assert status == 401
    assert body == {"error": "unauthorized", "message": "missing, unknown or revoked device token"}
    assert c.store.readings == {}


def test_revoked_token_gets_401():
    c = Client()
    c.store.revoke("truck-17")
    c.request()
    assert c.only()[0] == 401


def test_bad_reading_is_named_and_kept():
    c = Client()
    bad = json.dumps(
        {"readings": [{"metric": "a", "ts": 1, "value": 1}, {"metric": "a", "ts": "x", "value": 1}]}
    ).encode()
    c.request(body=bad)
    status, _, body = c.only()
    assert status == 400 and body["error"] == "invalid_reading"
    assert body["message"].startswith("readings[1].ts:")
    assert c.store.readings == {}  # the request is refused whole
    ((source, device, reason, raw),) = c.store.rejected
    assert source == "http 10.0.0.1:4711" and device == "truck-17"
    assert reason.startswith("invalid_reading: readings[1].ts") and raw == bad


def test_not_json_is_415():
    c = Client()
    c.request(headers={b"Content-Type": b"text/plain"})
    status, _, body = c.only()
    assert status == 415 and body["error"] == "unsupported_media_type"


def test_json_with_charset_is_fine():
    c = Client()
    c.request(headers={b"Content-Type": b"application/json; charset=utf-8"})
    assert c.only()[0] == 200


def test_no_length_is_411():
    c = Client()
    c.request(body=None)
    status, _, body = c.only()
    assert status == 411 and body["error"] == "length_required"


def test_declared_length_over_limit_is_413_before_the_body():
    c = Client(max_body=1024)
    c.send(b"POST /v1/readings HTTP/1.1\r\nHost: gw\r\nContent-Length: 5000\r\nContent-Type: application/json\r\n\r\n")
    status, headers, body = c.only()
    assert status == 413 and body["error"] == "body_too_large"
    assert headers[b"connection"] == b"close"
    assert c.transport.disconnecting
    assert c.store.rejected[0][2].startswith("body_too_large")


def test_chunked_body_over_limit_is_413_while_reading():
    c = Client(max_body=1024)
    c.send(
        b"POST /v1/readings HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\nAuthorization: Bearer " + c.token.encode() + b"\r\n\r\n"
    )
    for _ in range(2):
        c.send(b"200\r\n" + b"x" * 0x200 + b"\r\n")
    assert c.transport.value() == b""  # 1024 bytes: still within the limit
    c.send(b"1\r\nx\r\n")
    status, _, body = c.only()
    assert status == 413 and "1024" in body["message"]
    assert c.transport.disconnecting


def test_chunked_body_within_limit_is_accepted():
    c = Client()
    c.send(
        b"POST /v1/readings HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\nAuthorization: Bearer " + c.token.encode() + b"\r\n\r\n"
    )
    c.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY))
    assert c.only()[:1] == (200,)


def test_a_body_that_drips_in_gets_408_at_the_deadline():
    """The idle timer restarts with every byte; the request deadline does not."""
    c = Client(timeout=30)
    c.send(b"POST /v1/readings HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\nContent-Type: application/json\r\n\r\n")
    for _ in range(29):
        c.clock.advance(1)
        c.send(b"{")
    assert c.transport.value() == b""
    c.clock.advance(1)
    status, _, body = c.only()
    assert status == 408 and body["error"] == "request_timeout"
    assert c.transport.disconnecting


def test_database_down_is_503_with_retry_after():
    c = Client()
    c.store.available = False
    c.request()
    status, headers, body = c.only()
    assert status == 503 and body["error"] == "database_unavailable"
    assert int(headers[b"retry-after"]) > 0


def test_unknown_path_and_wrong_method_answer_json():
    c = Client()
    c.request(method=b"GET", path=b"/nope", body=None)
    c.request(method=b"GET", path=b"/v1/readings", body=None)
    (s1, _, b1), (s2, h2, b2) = c.responses()
    assert (s1, b1["error"]) == (404, "not_found")
    assert (s2, b2["error"], h2[b"allow"]) == (405, "method_not_allowed", b"POST")


def test_healthz_follows_the_database():
    c = Client()
    c.request(method=b"GET", path=b"/healthz", body=None, token=False)
    c.store.available = False
    c.request(method=b"GET", path=b"/healthz", body=None, token=False)
    (s1, _, b1), (s2, h2, b2) = c.responses()
    assert (s1, b1["status"]) == (200, "ok")
    assert (s2, b2["status"]) == (503, "unavailable") and b"retry-after" in h2


def test_headers_that_drip_in_get_408_at_the_deadline():
    c = Client(timeout=30)
    c.send(b"POST /v1/readings HTTP/1.1\r\n")
    for i in range(29):
        c.clock.advance(1)
        c.send(b"X-Drip-%d: 1\r\n" % i)
    assert c.transport.value() == b""
    c.clock.advance(1)
    status, _, body = c.only()
    assert status == 408 and body["error"] == "request_timeout"
    assert c.transport.disconnecting


def test_a_slow_database_does_not_trip_the_request_deadline():
    """The deadline covers arrival only; waiting for COMMIT is the store's business."""
    from twisted.internet.defer import Deferred

    c = Client(timeout=30)
    pending = Deferred()
    c.store.write = lambda device, readings, source=None, quarantined=(): pending
    c.request()
    c.clock.advance(60)
    assert c.transport.value() == b""
    from gateway.readings import WriteResult

    pending.callback(WriteResult(1, 0))
    assert c.only()[0] == 200


def test_the_channel_idle_timer_runs_on_the_site_clock_not_the_global_reactor():
    """twisted.web's own idle timeout (timeOut) is scheduled on the clock the site was given."""
    from twisted.internet import reactor

    before = set(reactor.getDelayedCalls())
    c = Client(timeout=30)
    c.send(b"POST /v1/readings HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n")  # headers never finish
    assert set(reactor.getDelayedCalls()) == before
    assert c.site.reactor is c.clock
    assert len(c.clock.getDelayedCalls()) >= 2  # the request deadline and the channel's idle timer
    c.clock.advance(30)
    assert c.transport.disconnecting
    assert not [call for call in c.clock.getDelayedCalls() if call.active() and call.getTime() <= c.clock.seconds()]


def test_every_ingest_error_code_has_its_http_status():
    """Ingest errors carry codes; the HTTPS adapter maps each to a status (a new one must be given one)."""
    import gateway.ingest.vendor  # noqa: F401  (Unmappable)
    import gateway.storage.journal  # noqa: F401  (JournalFull)
    from gateway.readings import IngestError
    from gateway.transports.http import STATUS

    def codes(cls):
        out = {cls.code}
        for sub in cls.__subclasses__():
            out |= codes(sub)
        return out

    found = codes(IngestError) - {"bad_request"}  # the base class's placeholder
    assert len(found) >= 8 and found <= STATUS.keys(), found - STATUS.keys()


def test_readyz_and_livez_while_the_database_is_down():
    """Kubernetes' probes: /readyz says whether writes can be taken, /livez only that the process serves."""
    c = Client()
    c.store.available = False
    c.clock.advance(5)  # within the connection's idle timeout
    for path in (b"/readyz", b"/livez"):
        c.request(method=b"GET", path=path, body=None, token=False)
    (s1, _, b1), (s2, _, b2) = c.responses()
    assert (s1, b1["status"], b1["database"]) == (503, "unavailable", "database unavailable")
    assert (s2, b2) == (200, {"status": "ok", "uptime_seconds": 5})


def test_a_stalled_sink_fails_healthz_but_not_readyz():
    """A load balancer asks /readyz: a sink that stopped taking batches is no reason to refuse devices."""

    class StalledUploader:
        def sink_status(self):
            return {"cloud": {"checked_at": 1.0, "lag_seconds": 900.0, "idle_seconds": 900.0}}

    c = Client(uploader=StalledUploader())
    for path in (b"/healthz", b"/readyz"):
        c.request(method=b"GET", path=path, body=None, token=False)
    (s1, _, b1), (s2, _, b2) = c.responses()
    assert (s1, b1["status"], b1["storing"], b1["sinks"]["cloud"]["ok"]) == (503, "unavailable", True, False)
    assert (s2, b2["status"], b2["storing"]) == (200, "ok", True)


def test_a_reading_sent_again_with_another_value_is_answered_as_a_conflict():
    c = Client()
    c.request()
    c.request(body=BODY.replace(b"81.5", b"99.5"))
    (_, _, first), (status, _, second) = c.responses()
    assert first == {"accepted": 1, "duplicates": 0}
    assert (status, second) == (200, {"accepted": 0, "duplicates": 0, "conflicts": 1})
    assert c.store.conflicts == {(1, "oil_temp", next(iter(c.store.readings))[2], 99.5)}
