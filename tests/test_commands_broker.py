"""
Commands to a device that sits on a broker (a real Mosquitto), through the
[[mqtt_source]] the gateway consumes from: published to its command-topic,
the broker's PUBACK marks them delivered, and the device's result comes back
on the same topic with /result added.
"""

from __future__ import annotations

import json
import queue
import time

import pytest
import pytest_twisted
from paho.mqtt import client as paho
from twisted.internet.threads import deferToThread

from gateway.commands.model import parse_request
from gateway.net.brokers import SourceError, source_from_table
from tests.broker import PASSWORD
from tests.conftest import start_service
from tests.test_commands_mqtt import state_of
from tests.test_mqtt_broker import broker, payload, publish, source_table, until  # noqa: F401 - a fixture
from tests.test_store import add_pg_device


def test_the_command_topic_is_a_template_of_device_and_id():
    table = {"name": "plant", "url": "mqtt://127.0.0.1:1883", "command-topic": "fleet/{device}/cmd/{id}"}
    settings = source_from_table(table)
    assert settings.filters == ("$share/txgateway/devices/+/+", "$share/txgateway/fleet/+/cmd/+/result")
    for template in ("fleet/{device}/cmd", "fleet/+/{device}/{id}", "fleet/x{device}/{id}", "$SYS/{device}/{id}"):
        with pytest.raises(SourceError, match="command-topic"):
            source_from_table({**table, "command-topic": template})


class BrokerDevice:
    """A device on the broker: subscribes to its command topic, answers each command on .../result."""

    def __init__(self, port: int) -> None:
        self.got: queue.Queue = queue.Queue()
        self.c = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"dev-{time.monotonic_ns()}", protocol=paho.MQTTv5
        )
        self.c.on_message = lambda client, userdata, message: self.got.put(message)
        self.c.connect("127.0.0.1", port, keepalive=30)
        subscribed = queue.Queue()
        self.c.on_subscribe = lambda *a: subscribed.put(a)
        self.c.loop_start()
        self.c.subscribe("devices/truck-17/commands/+", qos=1)
        subscribed.get(timeout=20)

    def answer(self, message, body: dict) -> None:
        self.c.publish(message.properties.ResponseTopic, json.dumps(body), qos=1).wait_for_publish(timeout=20)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest_twisted.ensureDeferred
async def test_a_command_reaches_a_device_on_the_broker_and_its_result_comes_back(
    tmp_path,
    db_dsn,
    sql,
    broker,  # noqa: F811 - the fixture
    monkeypatch,
):
    monkeypatch.setenv("TEST_BROKER_PASSWORD", PASSWORD)
    add_pg_device(sql, "truck-17")
    table = source_table(broker, **{"command-topic": "devices/{device}/commands/{id}"})
    svc = await start_service(tmp_path, db_dsn, {"mqtt-source": [table]})
    device = None
    try:
        source = svc.transport("mqtt_source").sources.sources["plant"]
        assert await until(lambda: source.counters.state == "subscribed"), source.counters.last_error
        await svc.commands.send("truck-17", parse_request({"name": "reboot", "id": "b-1"}), "ops")
        device = await deferToThread(BrokerDevice, broker.port)
        # Not heard from yet on this broker: nothing is sent.
        assert sql("SELECT state FROM commands") == [("queued",)]
        await deferToThread(publish, broker.port, [("devices/truck-17/readings", payload(1))])
        message = await deferToThread(device.got.get, True, 20)
        assert message.topic == "devices/truck-17/commands/b-1"
        assert json.loads(message.payload)["name"] == "reboot"
        await state_of(sql, "b-1", "delivered")  # the broker has it
        await deferToThread(device.answer, message, {"status": "succeeded", "result": {"uptime": 0}})
        await state_of(sql, "b-1", "succeeded")
        assert sql("SELECT result, transport FROM commands") == [({"uptime": 0}, "mqtt_source")]
        # Readings still flow as before.
        assert sql("SELECT count(*) FROM readings")[0][0] == 5
    finally:
        if device is not None:
            await deferToThread(device.close)
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_after_a_restart_a_device_heard_before_gets_its_commands_without_publishing_first(
    tmp_path,
    db_dsn,
    sql,
    broker,  # noqa: F811 - the fixture
    monkeypatch,
):
    monkeypatch.setenv("TEST_BROKER_PASSWORD", PASSWORD)
    add_pg_device(sql, "truck-17")
    add_pg_device(sql, "truck-18")
    table = source_table(broker, **{"command-topic": "devices/{device}/commands/{id}"})
    first = await start_service(tmp_path, db_dsn, {"mqtt-source": [table]})
    try:
        source = first.transport("mqtt_source").sources.sources["plant"]
        assert await until(lambda: source.counters.state == "subscribed"), source.counters.last_error
        await deferToThread(publish, broker.port, [("devices/truck-17/readings", payload(1))])
        assert await until(lambda: sql("SELECT count(*) FROM readings")[0][0] == 5)
    finally:
        await first.stopService()  # what was heard is written at the latest when the source stops
    assert sql("SELECT device FROM broker_devices") == [("truck-17",)]
    # truck-18 was heard there too, but eight days ago: its commands wait for it to be heard again.
    sql(
        "INSERT INTO broker_devices (gateway, source, device, heard_at) "
        "SELECT gateway, source, 'truck-18', now() - interval '8 days' FROM broker_devices"
    )
    device = await deferToThread(BrokerDevice, broker.port)
    second = await start_service(tmp_path, db_dsn, {"mqtt-source": [table]})
    try:
        await second.commands.send("truck-18", parse_request({"name": "reboot", "id": "old-1"}), "ops")
        await second.commands.send("truck-17", parse_request({"name": "reboot", "id": "r-1"}), "ops")
        message = await deferToThread(device.got.get, True, 30)
        assert message.topic == "devices/truck-17/commands/r-1"
        await state_of(sql, "r-1", "delivered")
        assert sql("SELECT state FROM commands WHERE id = 'old-1'") == [("queued",)]
    finally:
        await deferToThread(device.close)
        await second.stopService()
