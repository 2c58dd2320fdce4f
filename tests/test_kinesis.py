"""
The uploader's Kinesis sink: [[sink]] tables with kind = "kinesis", records
made from a batch, and, against moto's server (an emulator of the Kinesis
API, started here on a free port), a backlog delivered and read back with
boto3's GetRecords; a partial PutRecords failure (made by a small proxy in
front of the emulator, which holds some records back and answers them as
failed) resends only those; throttling slows the sink and loses nothing; the
emulator unreachable → the batch waits and goes when it is back.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import threading
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.web import resource, server
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from gateway.config import ConfigError, build_config
from gateway.outbound.kinesis_sender import MAX_CALL_BYTES, MAX_RECORDS, Record, calls, records
from gateway.readings import Source
from tests.conftest import script, start_service
from tests.gatewayproc import gatewayctl
from tests.test_mqtt_broker import until
from tests.test_store import add_pg_device

REGION = "eu-west-1"
T0 = 1_795_341_600_000  # 2026-11-22T10:00:00Z, ms


def sinks(table: dict, environ: dict | None = None) -> list:
    return build_config({}, {"sink": [table]}).sinks


# -- the table -----------------------------------------------------------------


def test_kinesis_sink_tables_are_read(monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    [sink] = sinks({"kind": "kinesis", "stream": "fleet", "region": "eu-west-1", "batch": 500})
    k = sink.kinesis
    assert (sink.name, sink.url, sink.batch, sink.gzip_level) == ("fleet", "kinesis://eu-west-1/fleet", 500, 1)
    assert (k.endpoint, k.partition_key, k.format, k.profile) == (
        "https://kinesis.eu-west-1.amazonaws.com", "{device}", "device", None,
    )  # fmt: skip
    arn = "arn:aws:kinesis:us-east-2:123456789012:stream/plant-a"
    [sink] = sinks({"kind": "kinesis", "stream": arn, "format": "reading", "partition_key": "{device}/{metric}"})
    assert (sink.name, sink.url, sink.kinesis.region, sink.kinesis.partition_key) == (
        "plant-a", arn, "us-east-2", "{device}/{metric}",
    )  # fmt: skip
    monkeypatch.setenv("AWS_REGION", "cn-north-1")
    [sink] = sinks({"kind": "kinesis", "stream": "s", "endpoint": "http://127.0.0.1:4566", "profile": "gw"})
    assert (sink.kinesis.region, sink.kinesis.endpoint, sink.kinesis.profile) == (
        "cn-north-1", "http://127.0.0.1:4566", "gw",
    )  # fmt: skip


@pytest.mark.parametrize(
    "table, message",
    [
        ({"stream": "s"}, "region: None is not an AWS region"),
        ({"stream": "s", "region": "Ireland"}, "region: 'Ireland' is not an AWS region"),
        ({"stream": "a b", "region": REGION}, "neither a stream name"),
        ({"stream": "arn:aws:kinesis:us-east-2:123456789012:stream/s", "region": REGION}, "not the stream's"),
        ({"stream": "s", "region": REGION, "partition-key": "{metric}"}, "has {metric}; it may hold {device}"),
        ({"stream": "s", "region": REGION, "format": "csv"}, "format: 'csv' is not device"),
        ({"stream": "s", "region": REGION, "endpoint": "http://kinesis.example"}, "loopback address only"),
        ({"stream": "s", "region": REGION, "aws_secret_access_key": "x"}, "not taken from the config file"),
        ({"stream": "s", "region": REGION, "headers": {"A": "b"}}, "unknown key 'headers'"),
        ({"kind": "sqs", "url": "https://x.example"}, "kind: 'sqs' is not https, mqtt, amqp or kinesis"),
    ],
)
def test_kinesis_sink_mistakes_name_the_sink_and_the_key(table, message, monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with pytest.raises(ConfigError) as e:
        sinks({"kind": "kinesis", **table})
    assert message in str(e.value) and "[[sink]]" in str(e.value)


def line(device: str, metric: str, i: int, pad: int = 0) -> bytes:
    doc = {"device": device, "metric": metric, "ts": f"2026-11-22T10:00:{i % 60:02d}.{i:06d}Z", "value": i}
    if pad:
        doc["note"] = "x" * pad
    return json.dumps(doc, separators=(",", ":")).encode()


def test_a_batch_becomes_a_record_per_device_split_at_the_record_limit_or_one_per_reading():
    lines = [line("truck-1", "rpm", 0), line("truck-2", "rpm", 1), line("truck-1", "oil", 2)]
    big = [line("truck-3", "img", i, pad=300_000) for i in range(7)]  # 2.1 MB of one device
    body = gzip.compress(b"\n".join(lines + big) + b"\n")
    [sink] = sinks({"kind": "kinesis", "stream": "s", "region": REGION})
    made = records(sink.kinesis, body)
    assert [(r.key, r.lines) for r in made] == [("truck-1", 2), ("truck-2", 1), ("truck-3", 3), ("truck-3", 3),
                                                ("truck-3", 1)]  # fmt: skip
    assert made[0].data == lines[0] + b"\n" + lines[2] + b"\n"
    assert all(r.size <= 1024 * 1024 for r in made)
    assert b"".join(r.data for r in made[2:]) == b"".join(x + b"\n" for x in big)  # in order, nothing lost
    [sink] = sinks({"kind": "kinesis", "stream": "s", "region": REGION, "format": "reading",
                    "partition-key": "{device}:{metric}"})  # fmt: skip
    made = records(sink.kinesis, gzip.compress(b"\n".join(lines) + b"\n"))
    assert [(r.key, r.data) for r in made] == [("truck-1:rpm", lines[0] + b"\n"), ("truck-2:rpm", lines[1] + b"\n"),
                                               ("truck-1:oil", lines[2] + b"\n")]  # fmt: skip


def test_calls_hold_at_most_500_records_and_5_mb_and_a_devices_first_pending_record_alone():
    many = [Record(f"d{i}", b"x", 1) for i in range(1201)]
    assert [len(c) for c in calls(many, one_per_key=False)] == [500, 500, 201]
    heavy = [Record(f"d{i}", b"x" * 900_000, 1) for i in range(12)]
    made = list(calls(heavy, one_per_key=False))
    assert [len(c) for c in made] == [5, 5, 2] and all(sum(r.size for r in c) <= MAX_CALL_BYTES for c in made)
    same = [Record("truck-3", b"a", 1), Record("truck-4", b"b", 1), Record("truck-3", b"c", 1)]
    assert [[r.data for r in c] for c in calls(same, one_per_key=True)] == [[b"a", b"b"]]
    assert MAX_RECORDS == 500


# -- against the emulator ------------------------------------------------------------


class Moto:
    """moto's server on 127.0.0.1, on a port the kernel chose, with a stream of two shards."""

    def __init__(self, workdir: Path) -> None:
        self.proc = subprocess.Popen(
            [script("moto_server"), "-H", "127.0.0.1", "-p", "0"],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.port = 0
        for text in self.proc.stdout:
            m = re.search(r"Running on http://127\.0\.0\.1:(\d+)", text)
            if m:
                self.port = int(m.group(1))
                break
        if not self.port:
            self.proc.kill()
            raise AssertionError("moto_server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = self._client()
        self.client.create_stream(StreamName="fleet", ShardCount=2)
        self.client.get_waiter("stream_exists").wait(StreamName="fleet", WaiterConfig={"Delay": 0.2})

    def _client(self):
        import boto3

        return boto3.client(
            "kinesis", region_name=REGION, endpoint_url=self.url,
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip

    def lines(self, stream: str = "fleet") -> list[dict]:
        """Every line in the stream, shard by shard, in each shard's order."""
        out = []
        for shard in self.client.list_shards(StreamName=stream)["Shards"]:
            iterator = self.client.get_shard_iterator(
                StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
            while iterator:
                got = self.client.get_records(ShardIterator=iterator, Limit=10_000)
                for record in got["Records"]:
                    out += [
                        {**json.loads(text), "_key": record["PartitionKey"]}
                        for text in record["Data"].decode().splitlines()
                    ]
                if not got["Records"]:
                    break
                iterator = got.get("NextShardIterator")
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def moto(tmp_path, monkeypatch):
    # The gateway's credentials: AWS's chain reads them from the environment, and nothing else.
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    server = Moto(tmp_path)
    yield server
    server.stop()


class Proxy(resource.Resource):
    """
    In front of the emulator: passes calls through, except that it can fail
    records of PutRecords (held back from the emulator and answered with
    ProvisionedThroughputExceededException), throttle whole calls, or cut
    every connection (the emulator unreachable). Keeps the partition keys of
    every PutRecords call it saw.
    """

    isLeaf = True

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream.encode()
        self.agent = Agent(reactor)
        self.fail_keys: set[str] = set()  # records with these keys fail, once each
        self.throttle_calls = 0  # the next calls answered 400 ProvisionedThroughputExceededException
        self.down = False
        self.calls: list[list[str]] = []

    def render_POST(self, request):
        if self.down:
            request.channel.transport.abortConnection()
            return server.NOT_DONE_YET
        body = request.content.read()
        target = (request.getHeader(b"x-amz-target") or b"").decode()
        failed: list[int] = []
        if target.endswith(".PutRecords"):
            doc = json.loads(body)
            self.calls.append([r["PartitionKey"] for r in doc["Records"]])
            if self.throttle_calls:
                self.throttle_calls -= 1
                request.setResponseCode(400)
                request.setHeader(b"content-type", b"application/x-amz-json-1.1")
                return b'{"__type":"ProvisionedThroughputExceededException","message":"Rate exceeded for shard"}'
            kept = []
            for i, record in enumerate(doc["Records"]):
                if record["PartitionKey"] in self.fail_keys:
                    self.fail_keys.discard(record["PartitionKey"])
                    failed.append(i)
                else:
                    kept.append(record)
            doc["Records"] = kept
            body = json.dumps(doc).encode()
        self._forward(request, body, failed)
        return server.NOT_DONE_YET

    @inlineCallbacks
    def _forward(self, request, body, failed):
        from twisted.web.client import FileBodyProducer
        from io import BytesIO

        skip = {b"host", b"content-length", b"transfer-encoding", b"connection"}
        headers = Headers({k: v for k, v in request.requestHeaders.getAllRawHeaders() if k.lower() not in skip})
        if failed and not json.loads(body)["Records"]:
            answer, code = {"FailedRecordCount": 0, "Records": []}, 200
        else:
            response = yield self.agent.request(b"POST", self.upstream + b"/", headers, FileBodyProducer(BytesIO(body)))
            code = response.code
            text = yield treq.content(response)
            if not failed:
                request.setResponseCode(code)
                request.setHeader(b"content-type", b"application/x-amz-json-1.1")
                request.write(text)
                request.finish()
                return
            answer = json.loads(text)
        results = list(answer["Records"])
        for i in failed:  # answered as failed, in their places
            results.insert(i, {"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "Rate exceeded"})
        answer = {"FailedRecordCount": answer.get("FailedRecordCount", 0) + len(failed), "Records": results}
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/x-amz-json-1.1")
        request.write(json.dumps(answer).encode())
        request.finish()


def kinesis_table(endpoint: str, **more) -> dict:
    return {"kind": "kinesis", "name": "stream", "stream": "fleet", "region": REGION, "endpoint": endpoint,
            "flush": 0.2, "backoff": 0.2, "backoff-cap": 1, **more}  # fmt: skip


def body_of(start: int, count: int, metric: str = "oil_temp") -> bytes:
    return json.dumps(
        {"readings": [{"metric": metric, "ts": T0 + start + i, "value": start + i} for i in range(count)]}
    ).encode()


def in_order_once(lines: list[dict], device: str, expected: list[int]) -> bool:
    values = [x["value"] for x in lines if x["device"] == device]
    return values == expected


@pytest_twisted.ensureDeferred
async def test_a_backlog_reaches_the_stream_once_in_order_per_device(tmp_path, db_dsn, sql, moto):
    for name in ("truck-1", "truck-2", "truck-3"):
        add_pg_device(sql, name)
    svc = await start_service(tmp_path, db_dsn, {"sink": [kinesis_table(moto.url, batch=200)]})
    try:
        source = Source("https", "127.0.0.1")
        for name in ("truck-1", "truck-2", "truck-3"):
            device = (await svc.store.device_key(name))[0]
            for part in range(3):
                await svc.ingest.write_json(device, body_of(part * 100, 100), source)
        loop = svc.uploader.loops["stream"]
        assert await until(lambda: loop.counters.readings_sent == 900, 60), loop.counters
        lines = await deferToThread(moto.lines)
        assert len(lines) == 900  # every reading once
        for name in ("truck-1", "truck-2", "truck-3"):
            assert in_order_once(lines, name, list(range(300))), name  # in order within the device's shard
            assert {x["_key"] for x in lines if x["device"] == name} == {name}
        status = svc.uploader.sink_status()["stream"]
        assert status["stream"] == "fleet" and status["records_sent"] >= 3 and status["records_failed"] == 0
        sample = svc.metrics.registry.get_sample_value
        assert sample("gateway_upload_records_sent_total", {"sink": "stream"}) == status["records_sent"]
        assert sample("gateway_upload_throttles_total", {"sink": "stream"}) == 0
        out = json.loads((await deferToThread(gatewayctl, "upload", "status", "--json", "--db", db_dsn)).stdout)
        assert [(s["name"], s["url"], s["lag_readings"]) for s in out] == [("stream", "kinesis://eu-west-1/fleet", 0)]
    finally:
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_a_partial_failure_resends_only_the_failed_records_and_throttling_parks_nothing(
    tmp_path, db_dsn, sql, moto
):
    proxy = Proxy(moto.url)
    port = reactor.listenTCP(0, server.Site(proxy), interface="127.0.0.1")
    for name in ("truck-1", "truck-2", "truck-3"):
        add_pg_device(sql, name)
    table = kinesis_table(f"http://127.0.0.1:{port.getHost().port}", flush=1)  # the three devices in one batch
    svc = await start_service(tmp_path, db_dsn, {"sink": [table]})
    try:
        loop = svc.uploader.loops["stream"]
        source = Source("https", "127.0.0.1")
        devices = {name: (await svc.store.device_key(name))[0] for name in ("truck-1", "truck-2", "truck-3")}
        proxy.fail_keys = {"truck-2"}
        for device in devices.values():
            await svc.ingest.write_json(device, body_of(0, 10), source)
        assert await until(lambda: loop.counters.readings_sent == 30, 60), (loop.counters, proxy.calls)
        # The call with all three devices, then one with truck-2's record alone: the others were not sent again.
        first = next(i for i, keys in enumerate(proxy.calls) if "truck-2" in keys and len(keys) > 1)
        assert proxy.calls[first + 1] == ["truck-2"], proxy.calls
        status = svc.uploader.sink_status()["stream"]
        assert status["records_failed"] == 1 and status["record_errors"] == {
            "ProvisionedThroughputExceededException": 1
        }
        assert status["throttles"] >= 1 and loop.counters.parked == 0

        # Whole calls throttled three times: the sink backs off and sends the batch after, parking nothing.
        proxy.throttle_calls = 3
        calls_before = len(proxy.calls)
        await svc.ingest.write_json(devices["truck-1"], body_of(100, 10), source)
        assert await until(lambda: loop.counters.readings_sent == 40, 60), loop.counters
        assert len(proxy.calls) - calls_before == 4 and loop.counters.parked == 0
        assert "ProvisionedThroughputExceededException" in (await deferToThread(gatewayctl, "upload", "status",
                                                                                  "--db", db_dsn)).stdout  # fmt: skip

        # The emulator unreachable: the batch waits, and goes when it is back.
        proxy.down = True
        await svc.ingest.write_json(devices["truck-3"], body_of(200, 10), source)
        failures = loop.counters.failures
        assert await until(lambda: loop.counters.failures >= failures + 2, 30)
        proxy.down = False
        assert await until(lambda: loop.counters.readings_sent == 50, 60), loop.counters
        lines = await deferToThread(moto.lines)
        assert len(lines) == 50  # each once: the failed record was held back, the throttled calls took nothing
        assert in_order_once(lines, "truck-1", [*range(10), *range(100, 110)])
        assert in_order_once(lines, "truck-2", list(range(10)))
        assert in_order_once(lines, "truck-3", [*range(10), *range(200, 210)])
    finally:
        await svc.stopService()
        await port.stopListening()


class HoldingProxy:
    """
    A proxy in a thread in front of the emulator that, once asked, holds the next PutRecords call: it has the
    records, and passes them on only when released, so a gateway killed meanwhile never hears they went.
    """

    def __init__(self, upstream: int) -> None:
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.hold = threading.Event()
        self.holding = threading.Event()
        self.release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if proxy.hold.is_set() and self.headers.get("X-Amz-Target", "").endswith(".PutRecords"):
                    proxy.hold.clear()
                    proxy.holding.set()
                    proxy.release.wait(30)
                conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=30)
                skip = {"host", "content-length", "connection"}
                conn.request("POST", "/", body, {k: v for k, v in self.headers.items() if k.lower() not in skip})
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                try:
                    self.send_response(answer.status)
                    self.send_header("Content-Type", answer.getheader("Content-Type", "application/json"))
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the gateway is gone

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_kill_9_mid_upload_then_the_stream_holds_every_acknowledged_reading(workdir, moto):
    """twistd with a Kinesis sink, a device posting all along, killed with SIGKILL while a PutRecords call is
    on its way (the records reach the stream; the gateway never hears so): after the restart every reading the
    gateway acknowledged is in the stream (at least once, no gap), the batch in flight sent again whole."""
    import time

    from tests.gatewayproc import GatewayProcess
    from tests.test_e2e import post

    proxy = HoldingProxy(moto.port)
    config = workdir / "gateway.toml"
    config.write_text(
        '[[sink]]\nkind = "kinesis"\nname = "stream"\nstream = "fleet"\nregion = "eu-west-1"\n'
        f'endpoint = "{proxy.url}"\nflush = 0.1\nbatch = 50\nbackoff = 0.2\nbackoff-cap = 1\n'
    )
    gw = GatewayProcess(workdir / "gateway-data", "--config", str(config), "--device-rate", "0", cwd=workdir)
    acked: list[int] = []
    stop = threading.Event()

    def device(token: str) -> None:
        i = 0
        while not stop.is_set():
            values = list(range(i * 20, i * 20 + 20))
            body = json.dumps({"readings": [{"metric": "rpm", "ts": T0 + v, "value": v} for v in values]})
            try:
                status = post(gw, token, body)[0]
            except (OSError, ValueError):  # the gateway is down: the same readings again, as a device does
                time.sleep(0.1)
                continue
            if status == 200:
                acked.extend(values)
                i += 1
            time.sleep(0.02)

    try:
        gw.start()
        token = gatewayctl("device", "add", "truck-1", data_dir=gw.data_dir).stdout.strip()
        sender = threading.Thread(target=device, args=(token,), daemon=True)
        sender.start()
        deadline = time.monotonic() + 60
        while len(moto.lines()) < 200 and time.monotonic() < deadline:  # uploads are flowing
            time.sleep(0.2)
        proxy.hold.set()
        assert proxy.holding.wait(30)  # a batch's records are on their way
        gw.kill()
        proxy.release.set()  # they reach the stream; the gateway, killed, never heard
        gw.start()
        time.sleep(2)
        stop.set()
        sender.join(30)
        wanted = set(acked)
        deadline = time.monotonic() + 60
        while True:
            seen = [x["value"] for x in moto.lines()]
            if wanted <= set(seen) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(wanted) > 200 and wanted <= set(seen), sorted(wanted - set(seen))[:20]
        assert len(seen) > len(set(seen))  # the batch that was on its way went again: at least once
        print(f"kill -9 mid-upload: {len(wanted)} readings acknowledged, all in the stream "
              f"({len(seen) - len(set(seen))} sent twice)")  # fmt: skip
    finally:
        stop.set()
        gw.close()
        proxy.close()


def test_a_lines_device_and_metric_are_read_off_its_head_and_escaped_names_are_parsed():
    from gateway.outbound.lines import names

    assert names(line("truck-1", "oil_temp", 3)) == ("truck-1", "oil_temp")
    odd = json.dumps({"device": 'a"b', "metric": "m\\n", "ts": "x", "value": 1}, separators=(",", ":")).encode()
    assert names(odd) == ('a"b', "m\\n")
    reordered = b'{"metric":"rpm","device":"truck-2","ts":"x","value":1}'
    assert names(reordered) == ("truck-2", "rpm")


def test_credentials_that_expire_are_refreshed_before_they_lapse_and_looked_up_again_when_refused():
    """botocore says when a refresh is due (15 minutes before the expiry); the refresh runs in the thread."""
    import datetime

    from botocore.credentials import RefreshableCredentials
    from twisted.internet.defer import Deferred, succeed

    from gateway.outbound.kinesis_sender import Credentials

    made = []

    def fetch(minutes: float) -> dict:
        made.append(minutes)
        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=minutes)
        return {"access_key": f"AK{len(made)}", "secret_key": "s", "token": "t", "expiry_time": expiry.isoformat()}

    in_thread_calls = []

    def in_thread(f, *args):
        in_thread_calls.append(getattr(f, "__name__", f))
        return succeed(f(*args))

    lasting = [60.0]
    role = RefreshableCredentials.create_from_metadata(fetch(60), lambda: fetch(lasting[0]), "test-role")
    creds = Credentials(None, in_thread)
    creds._look_up = lambda: role  # the chain found this role (as an instance or container role is found)

    def current():
        return Deferred.fromCoroutine(creds.current()).result

    assert current().access_key == "AK1" and len(made) == 1  # an hour left: no refresh
    assert current().access_key == "AK1" and len(made) == 1
    role._expiry_time = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=10)
    assert current().access_key == "AK2" and len(made) == 2  # 10 minutes left: refreshed before it lapses
    assert "get_frozen_credentials" in in_thread_calls  # in the thread, never on the reactor
    assert in_thread_calls.count("<lambda>") == 1
    creds.expired()  # the service said ExpiredTokenException
    assert current().access_key == "AK2" and in_thread_calls.count("<lambda>") == 2  # the chain is asked again


@pytest.mark.parametrize(
    "kind, status, verdict",
    [
        ("ProvisionedThroughputExceededException", 400, "retry"),
        ("LimitExceededException", 400, "retry"),
        ("ExpiredTokenException", 400, "retry"),
        ("ResourceNotFoundException", 400, "retry"),
        ("InternalFailure", 500, "retry"),
        ("AccessDeniedException", 400, "park"),
        ("ValidationException", 400, "park"),
        ("KMSAccessDeniedException", 400, "park"),
    ],
)
def test_whole_call_refusals_are_retried_or_parked_as_they_say(kind, status, verdict):
    from twisted.internet import reactor

    from gateway.outbound.kinesis_sender import KinesisSender
    from gateway.outbound.sender import judge

    [sink] = sinks({"kind": "kinesis", "stream": "fleet", "region": REGION})
    sender = KinesisSender(reactor, sink, None)
    reply = sender._refused(status, {"__type": f"com.amazonaws.kinesis#{kind}", "message": "m"}, "{}")
    assert judge(sink, reply, 0, 0.0, lambda: 0.5).kind == verdict and kind in reply.error
    if kind == "ExpiredTokenException":
        assert sender.credentials._source is None  # looked up again before the next call
