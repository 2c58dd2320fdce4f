"""
The uploader's RabbitMQ sink: [[sink]] tables with kind = "amqp" (or an
amqp:// URL), and, against a real RabbitMQ node (tests/rabbit.py) read with
pika's own blocking client: every reading published persistent and
confirmed, the cursor moved only then; a routing key no queue is bound for
parks the batch; the node down → the batch waits and goes once it is back.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from gateway.config import ConfigError, build_config
from gateway.readings import Source
from tests.conftest import start_service
from tests.rabbit import Rabbit
from tests.test_amqp_source import body, declare, depth
from tests.test_mqtt_broker import until
from tests.test_store import add_pg_device


def sinks(table: dict) -> list:
    return build_config({}, {"sink": [table]}).sinks


def test_amqp_sink_tables_are_read(monkeypatch):
    monkeypatch.setenv("AMQP_PASSWORD", "pw")
    [sink] = sinks({"url": "amqps://gateway@rabbit.example/iot", "password": {"env": "AMQP_PASSWORD"},
                    "exchange": "cloud", "batch": 100})  # fmt: skip
    a = sink.amqp
    assert (sink.name, sink.url, sink.batch) == (
        "rabbit.example-cloud",
        "amqps://gateway@rabbit.example/iot/exchange/cloud",
        100,
    )
    assert (a.exchange, a.routing_key, a.format, a.broker.vhost, a.broker.password) == (
        "cloud", "readings.{device}", "device", "iot", "pw",
    )  # fmt: skip
    [sink] = sinks({"url": "amqp://127.0.0.1", "format": "reading"})
    assert sink.amqp.routing_key == "readings.{device}.{metric}"
    [sink] = sinks({"kind": "amqp", "name": "hub", "url": "amqp://127.0.0.1", "format": "batch", "exchange": ""})
    assert (sink.amqp.routing_key, sink.amqp.format, sink.amqp.exchange) == ("readings", "batch", "")


@pytest.mark.parametrize(
    "table, message",
    [
        ({"url": "amqp://rabbit.example"}, "loopback address only"),
        ({"url": "amqps://h", "routing-key": "r.{metric}"}, "has {metric}; it may hold {device} (format = device)"),
        ({"url": "amqps://h", "format": "reading", "routing-key": "r.{value}"}, "it may hold {device} and {metric}"),
        ({"url": "amqps://h", "format": "batch", "routing-key": "r.{device}"}, "no placeholder (format = batch)"),
        ({"url": "amqps://h", "format": "csv"}, "format: 'csv' is not device"),
        ({"url": "amqps://h", "gzip-level": 9}, "unknown key 'gzip-level'"),
    ],
)
def test_amqp_sink_mistakes_name_the_sink_and_the_key(table, message):
    with pytest.raises(ConfigError) as e:
        sinks(table)
    assert message in str(e.value) and "[[sink]]" in str(e.value)


@pytest.fixture
def node(tmp_path):
    n = Rabbit(tmp_path / "node").start()
    yield n
    n.stop()


def take(rabbit: Rabbit, queue: str) -> list[tuple[str, dict, bytes]]:
    """Everything in a queue: (routing key, headers, body) each."""
    connection = rabbit.connection()
    channel = connection.channel()
    out = []
    while True:
        method, props, payload = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append((method.routing_key, props.headers or {}, payload))
    connection.close()
    return out


@pytest_twisted.ensureDeferred
async def test_readings_reach_the_exchange_confirmed_and_an_unroutable_key_parks_the_batch(tmp_path, db_dsn, sql, node):
    await deferToThread(
        declare, node,
        ("exchange_declare", {"exchange": "cloud", "exchange_type": "topic", "durable": True}),
        ("queue_declare", {"queue": "cloud.oil", "durable": True}),
        ("queue_bind", {"queue": "cloud.oil", "exchange": "cloud", "routing_key": "readings.*.oil_temp"}),
    )  # fmt: skip
    add_pg_device(sql, "truck-1")
    table = {"kind": "amqp", "name": "cloud", "url": node.url, "exchange": "cloud", "flush": 0.2, "backoff": 0.2,
             "backoff-cap": 1, "batch": 40, "format": "reading"}  # fmt: skip
    svc = await start_service(tmp_path, db_dsn, {"sink": [table]})
    try:
        loop = svc.uploader.loops["cloud"]
        device = (await svc.store.device_key("truck-1"))[0]
        await svc.ingest.write_json(device, body(list(range(100))), Source("https", "127.0.0.1"))
        assert await until(lambda: loop.counters.readings_sent == 100, 30), loop.counters
        got = await deferToThread(take, node, "cloud.oil")
        assert sorted(json.loads(b)["value"] for _, _, b in got) == list(range(100))
        assert {k for k, _, _ in got} == {"readings.truck-1.oil_temp"}
        assert all(h.get("batch") and "line" in h for _, h, _ in got)

        # The node down: the batch waits (failures counted), and goes once it is back.
        await deferToThread(node._end)
        await svc.ingest.write_json(device, body(list(range(100, 110))), Source("https", "127.0.0.1"))
        assert await until(lambda: loop.counters.failures >= 1, 30)
        await deferToThread(node.start)
        assert await until(lambda: loop.counters.readings_sent >= 110, 60), loop.counters
        got = await deferToThread(take, node, "cloud.oil")
        assert set(range(100, 110)) <= {json.loads(b)["value"] for _, _, b in got}  # at least once

        # A metric no queue is bound for: returned by the broker, the batch parked with the reason.
        await svc.ingest.write_json(
            device, json.dumps({"readings": [{"metric": "rpm", "ts": 1_795_341_600_000, "value": 1500}]}).encode(),
            Source("https", "127.0.0.1"),
        )  # fmt: skip
        assert await until(lambda: loop.counters.parked == 1, 30), loop.counters
        assert (
            "no queue is bound on exchange 'cloud' for routing key 'readings.truck-1.rpm'" in loop.counters.last_error
        )
        assert await deferToThread(depth, node, "cloud.oil") == 0
    finally:
        await svc.stopService()


def test_a_batch_becomes_a_message_per_device_by_default():
    import gzip

    from gateway.outbound.amqp_sender import messages

    lines = [
        b'{"device":"truck-1","metric":"rpm","ts":"2026-11-22T10:00:00.000000Z","value":1}',
        b'{"device":"truck-2","metric":"rpm","ts":"2026-11-22T10:00:00.000000Z","value":2}',
        b'{"device":"truck-1","metric":"oil","ts":"2026-11-22T10:00:01.000000Z","value":3}',
    ]
    body = gzip.compress(b"\n".join(lines) + b"\n")
    [sink] = sinks({"url": "amqp://127.0.0.1", "exchange": "cloud"})
    made = messages(sink.amqp, body)
    assert [(m.routing_key, m.body, m.line) for m in made] == [
        ("readings.truck-1", lines[0] + b"\n" + lines[2] + b"\n", 0),
        ("readings.truck-2", lines[1] + b"\n", 1),
    ]
    [sink] = sinks({"url": "amqp://127.0.0.1", "format": "batch"})
    [one] = messages(sink.amqp, body)
    assert one.routing_key == "readings" and one.body == b"\n".join(lines) + b"\n"
