"""
The uploader's MQTT sink: [[sink]] tables with an mqtt:// or mqtts:// URL,
and, against a real Mosquitto (TLS, a password file and an ACL), every
reading published once per batch attempt with the cursor moved only after
every PUBACK; a broker that goes away is waited out, a topic the broker
refuses parks the batch.
"""

from __future__ import annotations

import gzip
import json
import threading

import pytest
import pytest_twisted
from paho.mqtt import client as paho
from twisted.internet.threads import deferToThread

from gateway.config import ConfigError, build_config
from gateway.outbound.mqtt_sender import messages
from gateway.outbound.sender import Reply, judge
from gateway.readings import Source
from protocols.mqtt import V311
from tests.broker import PASSWORD, USER, Mosquitto
from tests.conftest import start_service
from tests.gatewayproc import gatewayctl
from tests.test_mqtt_broker import until
from tests.test_store import add_pg_device

ACL = f"""topic read txgateway/#
user {USER}
topic write txgateway/#
"""


def sink_config(table: dict, environ_password: bool = True) -> list:
    return build_config({}, {"sink": [table]}).sinks


def test_mqtt_sink_tables_are_read_with_their_broker(monkeypatch):
    monkeypatch.setenv("HUB_PASSWORD", "p4ss")
    [sink] = sink_config(
        {
            "name": "hub",
            "url": "mqtts://hub.example:8883",
            "username": "gw",
            "password": {"env": "HUB_PASSWORD"},
            "topic": "fleet/{device}/{metric}",
            "version": "3.1.1",
            "batch": 100,
        }
    )
    assert sink.mqtt is not None and sink.batch == 100
    assert (sink.mqtt.topic, sink.mqtt.format, sink.mqtt.broker.version) == ("fleet/{device}/{metric}", "reading", V311)
    assert sink.mqtt.broker.password == "p4ss" and "p4ss" not in repr(sink)
    [sink] = sink_config({"url": "mqtts://hub.example", "format": "batch"})
    assert (sink.name, sink.mqtt.topic, sink.mqtt.format) == ("hub.example", "txgateway/readings", "batch")


@pytest.mark.parametrize(
    "table, message",
    [
        ({"url": "mqtts://h", "topic": "a/{device}/{value}"}, "has {value}; a topic may hold {device} and {metric}"),
        ({"url": "mqtts://h", "format": "batch", "topic": "a/{device}"}, "may hold no placeholder (format = batch)"),
        ({"url": "mqtts://h", "topic": "a/+/b"}, "is not a topic name (no wildcards)"),
        ({"url": "mqtts://h", "topic": "a/{device"}, "topic: 'a/{device':"),
        ({"url": "mqtts://h", "format": "csv"}, "format: 'csv' is not reading"),
        ({"url": "mqtts://h", "headers": {"A": "b"}}, "unknown key 'headers'"),
        ({"url": "mqtts://h", "gzip_level": 9}, "unknown key 'gzip-level'"),
        ({"url": "mqtt://cloud.example"}, "mqtt:// (no TLS) is allowed to a loopback address only"),
    ],
)
def test_mqtt_sink_mistakes_name_the_sink_and_the_key(table, message):
    with pytest.raises(ConfigError) as e:
        sink_config(table)
    assert message in str(e.value) and "[[sink]]" in str(e.value)
    if "unknown key" in message:
        assert str(e.value).endswith("; an MQTT sink)") and "known: " in str(e.value)


def test_an_mqtt_upload_url_is_sent_to_a_sink_table():
    with pytest.raises(ConfigError, match="give an MQTT sink in a \\[\\[sink\\]\\] table"):
        build_config({"upload-url": ["mqtts://hub.example"]})


def test_a_batch_becomes_one_message_per_reading_or_one_for_all():
    lines = [
        '{"device":"truck-17","metric":"oil_temp","ts":"2026-11-22T06:00:00.000000Z","value":88.5}',
        '{"device":"truck-18","metric":"rpm","ts":"2026-11-22T06:00:00.000000Z","value":1500}',
    ]
    body = gzip.compress("\n".join(lines).encode() + b"\n")
    [sink] = sink_config({"url": "mqtts://h", "topic": "t/{device}/{metric}"})
    made = messages(sink, body)
    assert [(m.topic, m.payload, m.line) for m in made] == [
        ("t/truck-17/oil_temp", lines[0].encode(), 0),
        ("t/truck-18/rpm", lines[1].encode(), 1),
    ]
    [sink] = sink_config({"url": "mqtts://h", "format": "batch"})
    [one] = messages(sink, body)
    assert one.topic == "txgateway/readings" and one.payload.splitlines() == [line.encode() for line in lines]


def test_a_silent_broker_is_left_within_two_keepalives_and_the_batch_is_not_acknowledged():
    """A half-open connection (the broker gone without a FIN) fails the batch in seconds, not at TCP's timeout."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from gateway.outbound.mqtt_sender import MQTTSender, Message, _Publisher
    from protocols import mqtt

    [sink] = sink_config({"url": "mqtt://127.0.0.1:1883", "keepalive": 10, "timeout": 600})
    from twisted.internet import reactor

    clock = Clock()
    sender = MQTTSender(reactor, sink, None, "gw-1")
    sender.reactor = clock  # the publisher's timers run on the test's clock
    publisher = _Publisher(sender)
    transport = StringTransport()
    publisher.makeConnection(transport)
    broker = mqtt.Connection(mqtt.SERVER)
    broker.receive_data(transport.value())
    assert isinstance(next(broker.events()), mqtt.Connect)
    transport.clear()
    publisher.dataReceived(broker.send(mqtt.ConnAck(False, 0)))
    outcome = []
    publisher.publish("k1", [Message("t/a", b"1", 1)]).addBoth(outcome.append)
    assert b"t/a" in transport.value() and outcome == []
    for _ in range(3):  # a PINGREQ every half keepalive, unanswered
        clock.advance(5)
        assert not transport.disconnecting and transport.value().endswith(b"\xc0\x00")
    clock.advance(5)  # the first ping past 1.5 keepalives of silence
    assert transport.disconnecting and "said nothing for 15 seconds" in sender.last_error
    publisher.connectionLost()
    [failure] = outcome
    assert failure.check(ConnectionError) and "said nothing" in str(failure.value)


def test_a_brokers_refusal_is_parked_or_retried_as_it_says():
    [sink] = sink_config({"url": "mqtts://h"})
    parked = judge(sink, Reply(400, error="MQTT t/a/b: not authorized (0x87)"), 0, 0.0, lambda: 0.5)
    assert parked.kind == "park" and parked.error == "MQTT t/a/b: not authorized (0x87)"
    assert judge(sink, Reply(503, error="MQTT t: quota exceeded (0x97)"), 0, 0.0, lambda: 0.5).kind == "retry"


# -- against a real broker -------------------------------------------------------


class Subscriber:
    """A paho client collecting what arrives on txgateway/#."""

    def __init__(self, port: int) -> None:
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="watcher", protocol=paho.MQTTv5)
        self.got: list[tuple[str, bytes, dict]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.c.on_message = self._message
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.connect("127.0.0.1", port)
        self.c.subscribe("txgateway/#", qos=1)
        self.c.loop_start()
        assert self.ready.wait(20)

    def _message(self, client, userdata, message) -> None:
        props = dict(getattr(message.properties, "UserProperty", None) or [])
        with self.lock:
            self.got.append((message.topic, message.payload, props))

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def hub(tmp_path):
    b = Mosquitto(tmp_path / "broker", tls=True, anonymous=True, acl=ACL).start()
    yield b
    b.stop()


def hub_table(hub: Mosquitto, **more) -> dict:
    """A [[sink]] table for the test's broker: verified TLS, the password from the environment."""
    return {
        "name": "hub",
        "url": f"mqtts://localhost:{hub.tls_port}",
        "ca": str(hub.ca),
        "username": USER,
        "password": {"env": "HUB_PASSWORD"},
        **more,
    }


def reading_body(start: int, count: int) -> bytes:
    readings = [{"metric": "oil_temp", "ts": 1_795_341_600_000 + start + i, "value": start + i} for i in range(count)]
    return json.dumps({"readings": readings}).encode()


@pytest_twisted.ensureDeferred
async def test_readings_reach_the_broker_and_the_cursor_moves_after_every_puback(
    tmp_path, db_dsn, sql, hub, monkeypatch
):
    monkeypatch.setenv("HUB_PASSWORD", PASSWORD)
    add_pg_device(sql, "truck-17")
    watcher = await deferToThread(Subscriber, hub.port)
    table = hub_table(hub, flush=0.2, backoff=0.2, batch=50, **{"backoff-cap": 1})
    svc = await start_service(tmp_path, db_dsn, {"sink": [table]})
    try:
        found = await svc.store.device_key("truck-17")
        device = found[0]
        source = Source("https", "127.0.0.1")
        await svc.ingest.write_json(device, reading_body(0, 120), source)
        assert await until(lambda: len(watcher.got) >= 120, 30), len(watcher.got)
        topics = {topic for topic, _, _ in watcher.got}
        assert topics == {"txgateway/truck-17/oil_temp"}
        values = sorted(json.loads(payload)["value"] for _, payload, _ in watcher.got)
        assert values == list(range(120))
        assert all(props.get("batch") and "line" in props for _, _, props in watcher.got)
        assert await until(lambda: svc.uploader.loops["hub"].counters.readings_sent == 120)

        # The broker goes away: readings wait in PostgreSQL and go once it is back.
        await deferToThread(hub.stop)
        await svc.ingest.write_json(device, reading_body(1000, 30), source)
        assert await until(lambda: svc.uploader.loops["hub"].counters.failures >= 1, 30)
        await deferToThread(hub.start)
        await deferToThread(watcher.close)
        watcher = await deferToThread(Subscriber, hub.port)
        # At least once: what the broker took before it went away may come again.
        assert await until(lambda: svc.uploader.loops["hub"].counters.readings_sent >= 150, 30)
        out = json.loads((await deferToThread(gatewayctl, "upload", "status", "--json", "--db", db_dsn)).stdout)
        [status] = out
        assert status["name"] == "hub" and status["lag_readings"] == 0 and status["parked_batches"] == 0
    finally:
        await svc.stopService()
        await deferToThread(watcher.close)


@pytest_twisted.ensureDeferred
async def test_a_topic_the_broker_refuses_parks_the_batch(tmp_path, db_dsn, sql, hub, monkeypatch):
    monkeypatch.setenv("HUB_PASSWORD", PASSWORD)
    add_pg_device(sql, "truck-17")
    table = hub_table(hub, topic="forbidden/{device}/{metric}", flush=0.2)
    svc = await start_service(tmp_path, db_dsn, {"sink": [table]})
    try:
        found = await svc.store.device_key("truck-17")
        await svc.ingest.write_json(found[0], reading_body(0, 3), Source("https", "127.0.0.1"))
        loop = svc.uploader.loops["hub"]
        assert await until(lambda: loop.counters.parked == 1, 30), loop.counters
        assert "forbidden/truck-17/oil_temp: not authorized (0x87)" in loop.counters.last_error
    finally:
        await svc.stopService()
