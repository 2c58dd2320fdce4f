"""
Commands across failures and gateways, end to end: a gateway killed with
SIGKILL after sending a command and before the device acknowledged it sends
it again after its restart (same id) and records the device's result once;
of two gateways sharing one database, the one holding the device's session
delivers, and only it.
"""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest_twisted
from paho.mqtt import client as paho
from twisted.internet.threads import deferToThread

from gateway.commands.model import parse_request
from tests.conftest import start_service
from tests.gatewayproc import gatewayctl
from tests.test_commands_mqtt import Device, state_of
from tests.test_resilience import make_gateway, wait_until  # noqa: F401 - a fixture
from tests.test_store import add_pg_device


class SlowDevice:
    """A paho v5 device over TLS that acknowledges a command only when told to (manual_ack)."""

    def __init__(self, port: int, cafile: str, token: str) -> None:
        self.got: queue.Queue = queue.Queue()
        self.c = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"truck-1-{time.monotonic_ns()}",
            protocol=paho.MQTTv5, manual_ack=True,
        )  # fmt: skip
        self.c.username_pw_set("truck-1", token)
        self.c.tls_set(ca_certs=cafile)
        self.c.tls_insecure_set(True)  # the gateway's certificate names localhost; the CA is what is checked
        self.c.on_message = lambda client, userdata, message: self.got.put(message)
        connected, granted = threading.Event(), queue.Queue()
        self.c.on_connect = lambda *a: connected.set()
        self.c.on_subscribe = lambda client, userdata, mid, codes, properties: granted.put(codes)
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        assert connected.wait(20)
        self.c.subscribe("devices/truck-1/commands/#", qos=1)
        assert [c.value for c in granted.get(timeout=20)] == [1]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_a_gateway_killed_before_the_acknowledgement_sends_the_command_again(make_gateway, db_dsn, sql):  # noqa: F811
    token = add_pg_device(sql, "truck-1")
    gw = make_gateway("--db", db_dsn).start()
    gatewayctl("command", "send", "truck-1", "reboot", "--id", "k-1", "--db", db_dsn)
    device = SlowDevice(gw.mqtt_tls_port, gw.cert, token)
    try:
        first = device.got.get(timeout=30)
        assert first.topic == "devices/truck-1/commands/k-1"
        assert wait_until(lambda: sql("SELECT state FROM commands") == [("sent",)])
        gw.kill()  # SIGKILL: the device's PUBACK never reaches it
    finally:
        device.close()
    gw.start()
    device = SlowDevice(gw.mqtt_tls_port, gw.cert, token)
    try:
        again = device.got.get(timeout=30)
        assert again.topic == first.topic and json.loads(again.payload)["id"] == "k-1"
        device.c.ack(again.mid, again.qos)
        assert wait_until(lambda: sql("SELECT state FROM commands") == [("delivered",)])
        for _ in range(2):  # the result, and the same result again (as after a lost PUBACK)
            body = json.dumps({"status": "succeeded", "result": {"rebooted": True}})
            device.c.publish("devices/truck-1/commands/k-1/result", body, qos=1).wait_for_publish(timeout=20)
        assert wait_until(lambda: sql("SELECT state FROM commands") == [("succeeded",)])
    finally:
        device.close()
    events = sql("SELECT state, attempt FROM command_events WHERE command_id = 'k-1' ORDER BY at")
    assert events == [("queued", 0), ("sent", 1), ("sent", 2), ("delivered", 2), ("succeeded", 2)]


@pytest_twisted.ensureDeferred
async def test_of_two_gateways_the_one_holding_the_device_delivers(tmp_path, db_dsn, sql):
    token = add_pg_device(sql, "truck-1")
    first = await start_service(tmp_path / "a", db_dsn)
    second = await start_service(tmp_path / "b", db_dsn)
    device = Device("5.0", second.mqtt_ports[0].getHost().port, token)
    try:
        await deferToThread(device.connect)
        await deferToThread(device.subscribe)
        for i in range(5):
            await first.commands.send("truck-1", parse_request({"name": "ping", "id": f"p{i}"}), "ops")
            message = await deferToThread(device.next)
            assert message.topic == f"devices/truck-1/commands/p{i}"
            await state_of(sql, f"p{i}", "delivered")
        await first.commands.tick()
        await second.commands.tick()
        assert sql("SELECT DISTINCT gateway, attempts FROM commands") == [(second.commands.gateway_id(), 1)]
        assert first.commands.gateway_id() != second.commands.gateway_id()
    finally:
        await deferToThread(device.close)
        await second.stopService()
        await first.stopService()
