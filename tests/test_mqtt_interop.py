"""
The MQTT codec against a real client: paho-mqtt (3.1.1 and 5.0) publishing
at QoS 0, 1 and 2 to a plain socket server, in a thread, that speaks through
``protocols.mqtt`` alone.
"""

from __future__ import annotations

import socket
import threading

import pytest
from paho.mqtt import client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from protocols import mqtt

VERSIONS = {"3.1.1": (paho.MQTTv311, mqtt.V311), "5.0": (paho.MQTTv5, mqtt.V5)}


class Server(threading.Thread):
    """Answers one client: CONNACK, PUBACK, PUBREC then PUBCOMP, PINGRESP; keeps every event."""

    def __init__(self, refuse: int | None = None) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(20)
        self.port = self.listener.getsockname()[1]
        self.refuse = refuse
        self.events: list = []
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            sock, _ = self.listener.accept()
            sock.settimeout(20)
            with sock:
                self.serve(sock)
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.listener.close()

    def serve(self, sock: socket.socket) -> None:
        conn = mqtt.Connection(mqtt.SERVER)
        while True:
            data = sock.recv(65536)
            conn.receive_data(data)
            while (event := conn.next_event()) not in (mqtt.NEED_DATA, mqtt.CONNECTION_CLOSED):
                self.events.append(event)
                answer = self.answer(event)
                if answer is not None:
                    sock.sendall(conn.send(answer))
                if conn.state == mqtt.CLOSED:
                    return
            if not data:
                return

    def answer(self, event):
        if isinstance(event, mqtt.Connect):
            return mqtt.ConnAck(self.refuse or mqtt.Reason.SUCCESS)
        if isinstance(event, mqtt.Publish) and event.qos == 1:
            return mqtt.PubAck(event.packet_id)
        if isinstance(event, mqtt.Publish) and event.qos == 2:
            return mqtt.PubRec(event.packet_id)
        if isinstance(event, mqtt.PubRel):
            return mqtt.PubComp(event.packet_id)
        if isinstance(event, mqtt.PingReq):
            return mqtt.PingResp()
        return None


def client(version: str) -> paho.Client:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="truck-17", protocol=VERSIONS[version][0])
    c.username_pw_set("truck-17", "0123456789abcdef.secret")
    return c


@pytest.mark.parametrize("version", VERSIONS)
def test_paho_publishes_at_every_qos(version):
    server = Server()
    c = client(version)
    properties = None
    if version == "5.0":
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", server.port, keepalive=30, properties=properties)
    c.loop_start()
    try:
        infos = [
            c.publish(f"devices/truck-17/m{qos}", f'{{"value": {qos}}}'.encode(), qos=qos) for qos in (0, 1, 2, 1, 2)
        ]
        for info in infos:
            info.wait_for_publish(timeout=20)
            assert info.is_published()
        c.disconnect()
    finally:
        c.loop_stop()
    server.join(20)
    assert server.error is None, server.error
    connect, *rest = server.events
    assert connect.version == VERSIONS[version][1] and connect.client_id == "truck-17"
    assert (connect.username, connect.password) == ("truck-17", b"0123456789abcdef.secret")
    assert connect.keepalive == 30
    if version == "5.0":
        assert mqtt.prop(connect.properties, mqtt.Property.SESSION_EXPIRY_INTERVAL) == 3600
    publishes = [e for e in rest if isinstance(e, mqtt.Publish)]
    assert [(p.topic, p.qos, p.payload) for p in publishes] == [
        (f"devices/truck-17/m{qos}", qos, f'{{"value": {qos}}}'.encode()) for qos in (0, 1, 2, 1, 2)
    ]
    assert sum(isinstance(e, mqtt.PubRel) for e in rest) == 2
    assert isinstance(rest[-1], mqtt.Disconnect)


@pytest.mark.parametrize("version", VERSIONS)
def test_paho_reads_a_refusal_in_its_version(version):
    server = Server(refuse=mqtt.Reason.BAD_USER_NAME_OR_PASSWORD)
    c = client(version)
    result: list = []
    done = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        result.append(reason_code)
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", server.port)
    c.loop_start()
    try:
        assert done.wait(20)
    finally:
        c.disconnect()
        c.loop_stop()
    server.join(20)
    [reason] = result
    # paho reports 3.1.1's return code 4 with 5.0's name for it, as the codec maps them
    assert reason.is_failure and reason.value == 0x86 and str(reason) == "Bad user name or password"
