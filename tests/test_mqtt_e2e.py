"""
MQTT end to end: the real service on 127.0.0.1 with a real PostgreSQL, and
paho-mqtt clients (3.1.1 and 5.0) over TCP and TLS. paho blocks, so each
client runs in a thread while the reactor serves.
"""

from __future__ import annotations

import json
import threading

import pytest
import pytest_twisted
from paho.mqtt import client as paho
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.test_store import add_pg_device

PROTOCOLS = {"3.1.1": paho.MQTTv311, "5.0": paho.MQTTv5}


def messages(start: int, count: int, per_message: int = 20) -> list[bytes]:
    out = []
    for m in range(start, start + count):
        readings = [
            {"metric": "oil_temp", "ts": 1_795_341_600_000 + m * per_message + i, "value": m + i / 100}
            for i in range(per_message)
        ]
        out.append(json.dumps({"readings": readings}).encode())
    return out


class Client:
    """A paho client that records the reason code of every acknowledgement."""

    def __init__(self, version: str, port: int, token: str, cafile: str | None = None, name: str = "truck-17"):
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{name}-test", protocol=PROTOCOLS[version])
        self.c.username_pw_set(name, token)
        if cafile:
            self.c.tls_set(ca_certs=cafile)
        self.acks: dict[int, int] = {}
        self.connected = threading.Event()
        self.refused: list = []
        self.c.on_publish = self._published
        self.c.on_connect = self._connected
        self.port = port

    def _published(self, client, userdata, mid, reason_code, properties) -> None:
        self.acks[mid] = reason_code.value

    def _connected(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.refused.append(reason_code.value)
        self.connected.set()

    def run(self, payloads: list[tuple[str, bytes, int]], properties=None) -> list[int]:
        """Publish (topic, payload, qos) in order; the acknowledgements' reason codes (0 for QoS 0)."""
        self.c.connect("127.0.0.1", self.port, keepalive=30, properties=properties)
        self.c.loop_start()
        try:
            assert self.connected.wait(20), "no CONNACK"
            if self.refused:
                return self.refused
            infos = [self.c.publish(topic, payload, qos) for topic, payload, qos in payloads]
            for info in infos:
                info.wait_for_publish(timeout=20)
            return [self.acks.get(info.mid, 0) for info in infos]
        finally:
            self.c.disconnect()
            self.c.loop_stop()


async def committed(service) -> None:
    """Until the store has nothing queued or under way: every message the gateway took is committed."""
    committer = service.store.committer
    for _ in range(2000):
        if not (committer.in_flight or committer.queued):
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("the store did not settle in 20 s")


def ports(service) -> dict[str, tuple[int, str | None]]:
    tcp, tls = (p.getHost().port for p in service.mqtt_ports)
    return {"tcp": (tcp, None), "tls": (tls, str(service.config.tls_dir / "ca.crt"))}


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@pytest.mark.parametrize("version", PROTOCOLS)
@pytest_twisted.ensureDeferred
async def test_paho_publishes_are_stored_once_however_often_sent(service, sql, version, transport):
    token = add_pg_device(sql, "truck-17")
    port, ca = ports(service)[transport]
    batch = [("devices/truck-17/readings", body, qos) for body, qos in zip(messages(0, 6), (1, 2, 1, 2, 0, 1))]
    batch.append(("devices/truck-17/rpm", b"1800", 1))
    codes = await deferToThread(Client(version, port, token, ca).run, batch)
    assert codes == [0] * 7
    count = "SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id WHERE d.name = 'truck-17'"
    # The QoS 0 message has no acknowledgement to wait for: its commit may come after the others' PUBACKs.
    await committed(service)
    assert sql(count)[0][0] == 6 * 20 + 1
    # everything sent again, in a new session: nothing more is stored (the bare number is timed anew)
    codes = await deferToThread(Client(version, port, token, ca).run, batch[:-1])
    assert codes == [0] * 6
    await committed(service)
    assert sql(count)[0][0] == 6 * 20 + 1
    assert sql("SELECT count(*) FROM readings WHERE metric_id = metric_id_of('rpm') AND value = 1800")[0][0] == 1


@pytest.mark.parametrize("limit", ["maximum packet size", "no problem information"])
@pytest_twisted.ensureDeferred
async def test_a_v5_device_with_a_small_maximum_packet_size_or_no_problem_information_gets_every_answer(
    service, sql, limit
):
    """paho with Maximum Packet Size 40 or Request Problem Information 0: each refusal and duplicate is answered."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    token = add_pg_device(sql, "truck-17")
    port, _ = ports(service)["tcp"]
    connect = Properties(PacketTypes.CONNECT)
    if limit == "maximum packet size":
        connect.MaximumPacketSize = 40
    else:
        connect.RequestProblemInformation = 0
    good = messages(0, 1)[0]
    batch = [
        ("devices/truck-17/readings", b"{not json", 1),
        ("devices/truck-17/readings", good, 1),
        ("devices/truck-17/readings", good, 1),  # a duplicate: its counts are user properties
        ("devices/truck-17/oil_temp", b"warm", 1),
    ]
    codes = await deferToThread(Client("5.0", port, token).run, batch, connect)
    assert codes == [0x99, 0, 0, 0x99]


@pytest_twisted.ensureDeferred
async def test_a_v5_device_is_told_what_was_wrong_and_goes_on(service, sql):
    token = add_pg_device(sql, "truck-17")
    port, _ = ports(service)["tcp"]
    batch = [
        ("devices/truck-17/readings", b"{not json", 1),
        ("devices/truck-18/readings", messages(0, 1)[0], 1),
        ("devices/truck-17/oil_temp", b"warm", 1),
        ("devices/truck-17/readings", messages(1, 1)[0], 1),
    ]
    codes = await deferToThread(Client("5.0", port, token).run, batch)
    assert codes == [0x99, 0x87, 0x99, 0]
    assert sql("SELECT count(*) FROM readings")[0][0] == 20
    # each refused input is kept with its reason (written as they come, not necessarily in this order)
    kept = sql("SELECT reason FROM rejected_input")
    reasons = sorted(r[0].split(":")[0] for r in kept)
    assert reasons == ["not_authorized", "payload_format_invalid", "payload_format_invalid"]


@pytest.mark.parametrize("version", PROTOCOLS)
@pytest_twisted.ensureDeferred
async def test_wrong_token_and_revoked_device_are_refused(service, sql, version):
    add_pg_device(sql, "truck-17")
    revoked = add_pg_device(sql, "old-1", revoked=True)
    port, ca = ports(service)["tls"]
    codes = await deferToThread(Client(version, port, "0123456789abcdef.nope", ca).run, [])
    assert codes == [0x86]  # paho reports 3.1.1's return code 4 by its 5.0 name
    codes = await deferToThread(Client(version, port, revoked, ca, name="old-1").run, [])
    assert codes == [0x86]


@pytest.mark.parametrize("version", PROTOCOLS)
@pytest_twisted.ensureDeferred
async def test_paho_keeping_its_session_is_told_session_present_only_after_its_first_connection(service, sql, version):
    """A spec-following client with no state closes on Session Present 1 [MQTT-3.2.2-4]: 1 only when kept."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    token = add_pg_device(sql, "truck-17")
    port, _ = ports(service)["tcp"]

    def connect_once() -> bool:
        flags_seen: list = []
        done = threading.Event()
        kw = {"clean_session": False} if version == "3.1.1" else {}
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="truck-17-kept", protocol=PROTOCOLS[version], **kw)
        c.username_pw_set("truck-17", token)

        def on_connect(client, userdata, flags, reason_code, properties):
            flags_seen.append((reason_code.value, flags.session_present))
            done.set()

        c.on_connect = on_connect
        if version == "5.0":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
            c.connect("127.0.0.1", port, keepalive=30, clean_start=False, properties=props)
        else:
            c.connect("127.0.0.1", port, keepalive=30)
        c.loop_start()
        try:
            assert done.wait(20), "no CONNACK"
        finally:
            c.disconnect()
            c.loop_stop()
        [(code, present)] = flags_seen
        assert code == 0
        return present

    assert await deferToThread(connect_once) is False
    assert await deferToThread(connect_once) is True
