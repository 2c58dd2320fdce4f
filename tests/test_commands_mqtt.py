"""
Commands over the MQTT listener, end to end: the real service and
PostgreSQL, paho-mqtt devices (3.1.1 and 5.0) that subscribe to their
command topic, run what they are sent and publish the result.
"""

from __future__ import annotations

import json
import queue
import threading

import pytest
import pytest_twisted
from paho.mqtt import client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from gateway.commands.model import parse_request
from tests.test_store import add_pg_device

PROTOCOLS = {"3.1.1": paho.MQTTv311, "5.0": paho.MQTTv5}


class Device:
    """A paho device: connects, subscribes to its command topic, answers each command with a result."""

    def __init__(self, version: str, port: int, token: str, name: str = "truck-1", keep: bool = False):
        self.version, self.name = version, name
        v5 = version == "5.0"
        self.c = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"{name}-cmd",
            protocol=PROTOCOLS[version],
            clean_session=None if v5 else not keep,
        )
        self.c.username_pw_set(name, token)
        self.port, self.keep = port, keep
        self.got: queue.Queue = queue.Queue()
        self.granted: queue.Queue = queue.Queue()
        self.connected = threading.Event()
        self.present = None
        self.c.on_connect = self._connected
        self.c.on_message = self._message
        self.c.on_subscribe = lambda client, userdata, mid, codes, properties: self.granted.put(
            [c.value for c in codes]
        )

    def _connected(self, client, userdata, flags, reason_code, properties) -> None:
        self.present = flags.session_present
        self.connected.set()

    def _message(self, client, userdata, message) -> None:
        self.got.put(message)

    def connect(self) -> None:
        properties = None
        kw = {}
        if self.version == "5.0":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 3600 if self.keep else 0
            kw["clean_start"] = not self.keep
        self.c.connect("127.0.0.1", self.port, keepalive=30, properties=properties, **kw)
        self.c.loop_start()
        assert self.connected.wait(20), "no CONNACK"

    def subscribe(self, topic: str | None = None) -> list[int]:
        self.c.subscribe(topic or f"devices/{self.name}/commands/#", qos=1)
        return self.granted.get(timeout=20)

    def next(self, timeout: float = 20):
        return self.got.get(timeout=timeout)

    def answer(self, message, status: str = "succeeded", result=None) -> None:
        """Publish the result where the command says (v5: its Response Topic) and wait for the PUBACK."""
        topic = message.topic + "/result"
        if self.version == "5.0":
            topic = message.properties.ResponseTopic
        body = json.dumps({"status": status, "result": result or {}})
        self.c.publish(topic, body, qos=1).wait_for_publish(timeout=20)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


async def state_of(sql, id_: str, want: str) -> None:
    for _ in range(1000):
        if sql("SELECT state FROM commands WHERE id = %s", (id_,)) == [(want,)]:
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"command {id_} is {sql('SELECT state FROM commands WHERE id = %s', (id_,))}, not {want}")


def port_of(service) -> int:
    return service.mqtt_ports[0].getHost().port


@pytest.mark.parametrize("version", PROTOCOLS)
@pytest_twisted.ensureDeferred
async def test_a_command_queued_while_away_reaches_the_device_when_it_subscribes(service, sql, version):
    token = add_pg_device(sql, "truck-1")
    command, _ = await service.commands.send("truck-1", parse_request({"name": "reboot", "id": "r-1"}), "ops")
    device = Device(version, port_of(service), token)
    try:
        await deferToThread(device.connect)
        assert await deferToThread(device.subscribe) == [1]
        message = await deferToThread(device.next)
        assert message.topic == "devices/truck-1/commands/r-1" and message.qos == 1
        body = json.loads(message.payload)
        assert (body["id"], body["name"], body["params"]) == ("r-1", "reboot", {})
        if version == "5.0":
            assert message.properties.ResponseTopic == "devices/truck-1/commands/r-1/result"
            assert message.properties.CorrelationData == b"r-1"
            assert 590 <= message.properties.MessageExpiryInterval <= 600
        await state_of(sql, "r-1", "delivered")  # the PUBACK
        await deferToThread(device.answer, message, "failed", {"why": "busy"})
        assert sql("SELECT state, result FROM commands") == [("failed", {"why": "busy"})]
        # One sent while connected arrives at once.
        await service.commands.send("truck-1", parse_request({"name": "sample", "params": {"hz": 2}}), "ops")
        message = await deferToThread(device.next)
        assert json.loads(message.payload)["params"] == {"hz": 2}
    finally:
        await deferToThread(device.close)


@pytest.mark.parametrize("version", PROTOCOLS)
@pytest_twisted.ensureDeferred
async def test_a_kept_session_gets_its_commands_without_subscribing_again(service, sql, version):
    token = add_pg_device(sql, "truck-1")
    device = Device(version, port_of(service), token, keep=True)
    await deferToThread(device.connect)
    assert await deferToThread(device.subscribe) == [1]
    await deferToThread(device.close)
    await service.commands.send("truck-1", parse_request({"name": "reboot", "id": "later"}), "ops")
    again = Device(version, port_of(service), token, keep=True)
    try:
        await deferToThread(again.connect)
        assert again.present
        message = await deferToThread(again.next)  # no SUBSCRIBE this time
        assert message.topic == "devices/truck-1/commands/later"
        await deferToThread(again.answer, message)
        await state_of(sql, "later", "succeeded")
    finally:
        await deferToThread(again.close)
    # A clean start drops the subscription with the session.
    await service.commands.send("truck-1", parse_request({"name": "reboot", "id": "clean"}), "ops")
    clean = Device(version, port_of(service), token)
    try:
        await deferToThread(clean.connect)
        with pytest.raises(queue.Empty):
            await deferToThread(clean.next, 1.0)
        assert sql("SELECT state FROM commands WHERE id = 'clean'") == [("queued",)]
    finally:
        await deferToThread(clean.close)


@pytest.mark.parametrize("version", PROTOCOLS)
@pytest_twisted.ensureDeferred
async def test_a_device_may_subscribe_to_its_own_commands_only(service, sql, version):
    token = add_pg_device(sql, "truck-1")
    add_pg_device(sql, "truck-2")
    await service.commands.send("truck-2", parse_request({"name": "reboot", "id": "theirs"}), "ops")
    device = Device(version, port_of(service), token)
    try:
        await deferToThread(device.connect)
        for topic in ("devices/truck-2/commands/#", "devices/#", "#", "devices/truck-1/readings"):
            assert await deferToThread(device.subscribe, topic) == [0x80 if version == "3.1.1" else 0x87]
        with pytest.raises(queue.Empty):
            await deferToThread(device.next, 0.5)
        assert sql("SELECT state FROM commands") == [("queued",)]
    finally:
        await deferToThread(device.close)


@pytest_twisted.ensureDeferred
async def test_an_unacknowledged_command_is_sent_again_with_the_same_id(service, sql):
    """A device that takes the command but goes before its PUBACK gets it again (same id) on its return."""
    token = add_pg_device(sql, "truck-1")
    device = Device("5.0", port_of(service), token)
    await service.commands.send("truck-1", parse_request({"name": "reboot", "id": "twice"}), "ops")
    # paho answers QoS 1 at once; to lose the PUBACK the connection is cut under it as the message arrives.
    device.c.on_message = lambda client, userdata, message: (device.got.put(message), client.socket().close())
    try:
        await deferToThread(device.connect)
        await deferToThread(device.subscribe)
        first = await deferToThread(device.next)
    finally:
        await deferToThread(device.close)
    assert sql("SELECT state, attempts FROM commands") == [("sent", 1)]
    again = Device("5.0", port_of(service), token)
    try:
        await deferToThread(again.connect)
        await deferToThread(again.subscribe)
        second = await deferToThread(again.next)
        assert first.topic == second.topic == "devices/truck-1/commands/twice"
        await state_of(sql, "twice", "delivered")
        assert sql("SELECT attempts FROM commands") == [(2,)]
    finally:
        await deferToThread(again.close)


@pytest_twisted.ensureDeferred
async def test_a_command_that_expired_while_the_device_was_away_is_not_sent(service, sql):
    token = add_pg_device(sql, "truck-1")
    await service.commands.send("truck-1", parse_request({"name": "reboot", "id": "stale", "ttl": "1m"}), "ops")
    await service.commands.send("truck-1", parse_request({"name": "reboot", "id": "fresh"}), "ops")
    sql("UPDATE commands SET expires_at = now() - interval '1 second' WHERE id = 'stale'")
    await service.commands.tick()
    device = Device("3.1.1", port_of(service), token)
    try:
        await deferToThread(device.connect)
        await deferToThread(device.subscribe)
        assert (await deferToThread(device.next)).topic == "devices/truck-1/commands/fresh"
        with pytest.raises(queue.Empty):
            await deferToThread(device.next, 0.5)
        assert sql("SELECT state, attempts FROM commands WHERE id = 'stale'") == [("expired", 0)]
    finally:
        await deferToThread(device.close)
