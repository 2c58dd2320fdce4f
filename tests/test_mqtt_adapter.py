"""
The gateway's MQTT server over an in-memory transport, with task.Clock:
CONNECT and credentials, acknowledgements only after the store and in
arrival order, both topics, refusals per version, backpressure, keepalive.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.ingest.core import Ingest
from gateway.ops.metrics import GatewayMetrics
from gateway.readings import CloseReason, StoreUnavailable
from gateway.storage.memory import MemoryStore
from gateway.transports.mqtt_adapter import MQTTFactory
from gateway.transport import DeviceRegistry
from gateway.transports.devices import DeviceSettings
from protocols import mqtt
from protocols.mqtt import V5, V311, Reason
from protocols.mqtt import Property as P
from tests.test_device_adapter import NO_TIME_RULES, ManualStore
from tests.test_mqtt_codec import drain

TS = "2026-11-22T10:00:00Z"
NO = object()  # no password at all
both = pytest.mark.parametrize("version", [V311, V5])


def body(*values: float, start: int = 0) -> bytes:
    return json.dumps(
        {
            "readings": [
                {"metric": "oil_temp", "ts": 1_795_341_600_000 + start + i, "value": v} for i, v in enumerate(values)
            ]
        }
    ).encode()


class Harness:
    def __init__(self, store=None, clock=None, require_client_cert=False, **settings) -> None:
        self.store = store or MemoryStore()
        self.token = self.store.add_device("truck-17")
        self.clock = clock or Clock()
        self.registry = DeviceRegistry()
        self.factory = MQTTFactory(
            Ingest(self.store, self.clock, GatewayMetrics(self.clock), quality=NO_TIME_RULES),
            self.registry,
            clock=self.clock,
            settings=DeviceSettings(**settings),
            tls=require_client_cert,
            require_client_cert=require_client_cert,
        )
        self.proto = self.factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
        self.proto.makeConnection(self.transport)
        self.client = mqtt.Connection(mqtt.CLIENT)

    def send(self, event) -> None:
        self.proto.dataReceived(self.client.send(event))

    def events(self) -> list:
        data = self.transport.value()
        self.transport.clear()
        if data:
            self.client.receive_data(data)
        return drain(self.client)

    def connect(self, version=V5, user="truck-17", password=None, **kw) -> mqtt.ConnAck:
        token = self.token if password is None else password
        self.send(mqtt.Connect("c1", version, username=user, password=None if token is NO else token.encode(), **kw))
        [connack] = self.events()
        return connack

    def publish(self, packet_id, payload, qos=1, topic="devices/truck-17/readings", **kw) -> None:
        self.send(mqtt.Publish(topic, payload, qos, packet_id if qos else None, **kw))


@both
def test_connect_with_the_devices_token_then_puback_after_storing(version):
    h = Harness()
    connack = h.connect(version)
    assert connack.reason == Reason.SUCCESS and not connack.session_present
    if version == V5:
        assert mqtt.prop(connack.properties, P.RECEIVE_MAXIMUM) == 32
        assert mqtt.prop(connack.properties, P.RETAIN_AVAILABLE) == 0
    assert "truck-17" in h.registry.sessions
    h.publish(1, body(81.5, 82.0))
    assert h.events() == [mqtt.PubAck(1)]
    assert len(h.store.readings) == 2
    h.publish(2, body(81.5, 82.0, 83.0))  # two sent again
    [ack] = h.events()
    assert ack.packet_id == 2 and ack.reason == Reason.SUCCESS
    if version == V5:  # a v5 device is told what happened, as HTTPS says it in its body
        assert dict(v for _, v in ack.properties) == {
            "accepted": "1",
            "duplicates": "2",
            "conflicts": "0",
            "quarantined": "0",
        }
    assert len(h.store.readings) == 3 and h.proto.readings == 3


@both
def test_wrong_unknown_or_missing_credentials_are_refused(version):
    refused = Reason.BAD_USER_NAME_OR_PASSWORD
    for user, password in (("truck-17", "0123456789abcdef.wrong"), ("truck-99", None), ("", None)):
        h = Harness()
        assert h.connect(version, user=user, password=password).reason == refused
        assert h.transport.disconnecting and not h.registry.sessions
    # a token of another device does not open this one
    h = Harness()
    other = h.store.add_device("truck-18")
    assert h.connect(version, user="truck-17", password=other).reason == refused


def test_a_311_refusal_is_its_return_code_on_the_wire():
    h = Harness()
    h.send(mqtt.Connect("c1", V311, username="truck-17", password=b"nope"))
    assert h.transport.value() == b"\x20\x02\x00\x04"


@both
def test_acknowledgements_leave_in_arrival_order(version):
    store = ManualStore()
    h = Harness(store)
    h.connect(version)
    for packet_id in (10, 11, 12):
        h.publish(packet_id, body(float(packet_id), start=packet_id))
    store.finish(2)
    store.finish(1)
    assert h.events() == []  # the first is not committed yet
    store.finish(0)
    assert [e.packet_id for e in h.events()] == [10, 11, 12]


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, *a, **kw):
        self.calls.append("write")
        return super().write(*a, **kw)

    def write_many(self, device, parts, source=None):
        self.calls.append(f"write_many({len(parts)})")
        return super().write_many(device, parts, source)


def publishes(h, *messages) -> None:
    """Several PUBLISHes arriving in one read, as a device with a window of messages in flight sends them."""
    h.proto.dataReceived(b"".join(h.client.send(mqtt.Publish(*m)) for m in messages))


def test_the_messages_of_one_read_are_stored_in_one_write_and_each_answered_with_its_own_result():
    store = CountingStore()
    h = Harness(store)
    h.connect(V5)
    topic = "devices/truck-17/readings"
    publishes(
        h,
        (topic, body(1.0), 1, 10),
        (topic, body(1.0), 1, 11),  # sent again: a duplicate
        (topic, body(7.0, start=5), 0, None),  # QoS 0 among them: stored, not answered
        (topic, body(2.0), 1, 12),  # another value for a stored key: a conflict
        (topic, body(3.0, start=9), 2, 13),
    )
    assert store.calls == ["write_many(5)"]
    acks = h.events()
    assert [(type(e), e.packet_id, e.reason) for e in acks] == [
        (mqtt.PubAck, 10, Reason.SUCCESS),
        (mqtt.PubAck, 11, Reason.SUCCESS),
        (mqtt.PubAck, 12, Reason.SUCCESS),
        (mqtt.PubRec, 13, Reason.SUCCESS),
    ]
    told = [dict(v for _, v in e.properties) for e in acks]
    assert told[0] == told[3] == {}
    assert told[1] == {"accepted": "0", "duplicates": "1", "conflicts": "0", "quarantined": "0"}
    assert told[2] == {"accepted": "0", "duplicates": "0", "conflicts": "1", "quarantined": "0"}
    assert len(store.readings) == 3 and h.proto.readings == 3


@both
def test_a_rate_limit_refuses_only_the_messages_over_it(version):
    from gateway.ingest.rates import DeviceRates

    store = CountingStore()
    h = Harness(store)
    h.factory.ingest.rates = DeviceRates(0.2, h.clock)  # two readings' allowance, then one every 5 s
    h.connect(version)
    topic = "devices/truck-17/readings"
    publishes(h, (topic, body(1.0, 2.0), 1, 1), (topic, body(3.0, start=2), 1, 2))
    assert store.calls == ["write_many(1)"] and len(store.readings) == 2  # the second is not written
    events = h.events()
    if version == V5:
        assert [(e.packet_id, e.reason) for e in events] == [(1, Reason.SUCCESS), (2, Reason.QUOTA_EXCEEDED)]
    else:  # 3.1.1 cannot refuse a message: no acknowledgement, and the device sends it again after reconnecting
        assert events == [mqtt.PubAck(1)] and h.transport.disconnecting


@both
def test_answers_keep_arrival_order_across_messages_stored_together(version):
    store = ManualStore()
    h = Harness(store)
    h.connect(version)
    topic = "devices/truck-17/readings"
    h.publish(1, body(1.0, start=1))  # alone in its read
    publishes(h, (topic, body(2.0, start=2), 1, 2), (topic, body(3.0, start=3), 1, 3))
    assert len(store.pending) == 2
    store.finish(1)
    assert h.events() == []  # the first is not committed yet
    store.finish(0)
    assert [e.packet_id for e in h.events()] == [1, 2, 3]


@both
def test_storage_away_for_messages_stored_together_gets_no_acknowledgement(version):
    h = Harness()
    h.connect(version)
    h.store.write_many = lambda *a, **kw: fail(StoreUnavailable("the database is away and the journal is full", 30))
    topic = "devices/truck-17/readings"
    publishes(h, (topic, body(1.0), 1, 1), (topic, body(2.0, start=1), 1, 2))
    events = h.events()
    assert not any(isinstance(e, mqtt.PubAck) for e in events)
    assert events == ([mqtt.Disconnect(Reason.SERVER_BUSY, events[0].properties)] if version == V5 else [])
    assert h.transport.disconnecting


@both
def test_qos_2_is_stored_once_before_pubrec(version):
    store = ManualStore()
    h = Harness(store)
    h.connect(version)
    h.publish(5, body(1.0), qos=2)
    assert h.events() == []
    store.finish(0)
    assert h.events() == [mqtt.PubRec(5)]
    h.send(mqtt.PubRel(5))
    assert h.events() == [mqtt.PubComp(5)]
    h.proto.dataReceived(b"\x62\x02\x00\x06")  # PUBREL 6: an exchange of an earlier connection
    assert h.transport.value() == b"\x70\x02\x00\x06"  # PUBCOMP 6


def test_a_metric_topic_takes_a_bare_number_timed_on_arrival():
    clock = Clock()
    clock.advance(1_795_341_600.25)
    h = Harness(clock=clock)
    h.connect()
    h.publish(1, b" 81.5\n", topic="devices/truck-17/oil_temp")
    assert h.events() == [mqtt.PubAck(1)]
    [((_, metric, ts), value)] = h.store.readings.items()
    assert (metric, ts, value) == ("oil_temp", 1_795_341_600_250_000, 81.5)


def test_a_single_reading_object_is_taken_on_the_readings_topic():
    h = Harness()
    h.connect()
    h.publish(1, json.dumps({"metric": "oil_temp", "ts": TS, "value": 81.5}).encode())
    assert h.events() == [mqtt.PubAck(1)] and len(h.store.readings) == 1


def test_qos_0_is_stored_without_an_acknowledgement():
    h = Harness()
    h.connect()
    h.publish(None, body(1.0), qos=0)
    assert h.events() == [] and len(h.store.readings) == 1


@pytest.mark.parametrize(
    "topic,payload,reason",
    [
        ("devices/truck-17/readings", b"{not json", Reason.PAYLOAD_FORMAT_INVALID),
        (
            "devices/truck-17/readings",
            b'{"readings": [{"metric": "t", "ts": 1, "value": "x"}]}',
            Reason.PAYLOAD_FORMAT_INVALID,
        ),
        ("devices/truck-17/oil_temp", b"warm", Reason.PAYLOAD_FORMAT_INVALID),
        ("devices/truck-17/oil_temp", b"inf", Reason.PAYLOAD_FORMAT_INVALID),
        ("devices/truck-18/readings", b"{}", Reason.NOT_AUTHORIZED),
        ("sensors/truck-17", b"1", Reason.TOPIC_NAME_INVALID),
        ("devices/truck-17/bad metric", b"1", Reason.TOPIC_NAME_INVALID),
    ],
)
def test_v5_refusals_say_why_and_the_session_goes_on(topic, payload, reason):
    h = Harness()
    h.connect(V5)
    h.publish(1, payload, topic=topic)
    [ack] = h.events()
    assert ack.packet_id == 1 and ack.reason == reason and mqtt.prop(ack.properties, P.REASON_STRING)
    assert h.store.rejected and h.store.rejected[-1][3] == payload  # the input is kept, with the reason
    h.publish(2, body(1.0))
    assert h.events() == [mqtt.PubAck(2)] and not h.transport.disconnecting


def test_a_bad_payload_is_acknowledged_only_once_it_is_kept():
    h = Harness()
    h.connect(V311)
    keeping = Deferred()
    h.store.keep_rejected_input = lambda *args: keeping
    h.publish(1, b"{not json")
    assert h.events() == []  # not kept yet: no PUBACK, so the device still holds the message
    keeping.callback(None)
    assert h.events() == [mqtt.PubAck(1)]


def test_v311_acknowledges_a_bad_payload_and_keeps_it_but_closes_on_another_devices_topic():
    h = Harness()
    h.connect(V311)
    h.publish(1, b"{not json")
    assert h.events() == [mqtt.PubAck(1)] and h.store.rejected[-1][3] == b"{not json"
    h.publish(2, b"{}", topic="devices/truck-18/readings")
    assert h.events() == [] and h.transport.disconnecting


@both
def test_storage_away_gets_no_acknowledgement_and_a_close(version):
    h = Harness()
    h.connect(version)
    h.store.write = lambda *a, **kw: fail(StoreUnavailable("the database is away and the journal is full", 30))
    h.publish(1, body(1.0))
    events = h.events()
    assert not any(isinstance(e, mqtt.PubAck) for e in events)
    assert events == ([mqtt.Disconnect(Reason.SERVER_BUSY, events[0].properties)] if version == V5 else [])
    assert h.transport.disconnecting


@both
def test_the_window_pauses_reading(version):
    store = ManualStore()
    h = Harness(store, window=2)
    h.connect(version)
    h.publish(1, body(1.0, start=1))
    h.publish(2, body(2.0, start=2))
    assert h.transport.producerState == "paused"
    store.finish(0)
    store.finish(1)
    assert [e.packet_id for e in h.events()] == [1, 2]
    assert h.transport.producerState == "producing"


def test_a_device_paused_for_backpressure_is_not_closed_as_silent():
    store = ManualStore()
    h = Harness(store, window=2)
    h.connect(V311, keepalive=10)
    h.publish(1, body(1.0, start=1))
    h.publish(2, body(2.0, start=2))
    h.clock.advance(100)  # the store holds both: the device's PINGREQs wait unread meanwhile
    assert not h.transport.disconnecting
    store.finish(0)
    store.finish(1)
    assert [e.packet_id for e in h.events()] == [1, 2]
    h.clock.advance(15.1)  # reading again, and really silent now
    assert h.transport.disconnecting


def test_a_full_store_holds_the_message_until_there_is_room():
    store = ManualStore()
    h = Harness(store)
    h.connect()
    store.room = False
    h.publish(1, body(1.0))
    assert h.transport.producerState == "paused" and store.pending == []
    store.room = True
    store.room_waiters.pop().callback(None)
    store.finish(0)
    assert h.events() == [mqtt.PubAck(1)]


def test_keepalive_is_enforced_at_one_and_a_half_times():
    h = Harness()
    h.connect(V311, keepalive=10)
    h.clock.advance(14)
    h.send(mqtt.PingReq())
    assert h.events() == [mqtt.PingResp()]
    h.clock.advance(14.9)
    assert not h.transport.disconnecting
    h.clock.advance(0.2)
    assert h.transport.disconnecting


def test_a_v5_device_without_keepalive_is_given_the_idle_timeout():
    h = Harness(idle_timeout=60)
    connack = h.connect(V5, keepalive=0)
    assert mqtt.prop(connack.properties, P.SERVER_KEEP_ALIVE) == 60
    h.clock.advance(89.9)
    assert not h.transport.disconnecting
    h.clock.advance(0.2)
    [disconnect] = h.events()
    assert disconnect.reason == Reason.KEEP_ALIVE_TIMEOUT and h.transport.disconnecting


def test_no_connect_within_the_deadline_closes():
    h = Harness(handshake_timeout=5)
    h.clock.advance(5.1)
    assert h.transport.disconnecting


def test_a_second_connection_replaces_the_first():
    h = Harness()
    h.connect(V5)
    second = h.factory.buildProtocol(None)
    t2 = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.4", 5556))
    second.makeConnection(t2)
    c2 = mqtt.Connection(mqtt.CLIENT)
    second.dataReceived(c2.send(mqtt.Connect("c2", V5, username="truck-17", password=h.token.encode())))
    [disconnect] = h.events()
    assert disconnect.reason == Reason.SESSION_TAKEN_OVER and h.transport.disconnecting
    assert h.registry.sessions["truck-17"] is second


def test_revocation_and_kick_end_the_session_with_a_reason():
    h = Harness()
    h.connect(V5)
    h.proto.end(CloseReason.NOT_AUTHORIZED, "the device was revoked")
    [disconnect] = h.events()
    assert disconnect.reason == Reason.NOT_AUTHORIZED
    assert mqtt.prop(disconnect.properties, P.REASON_STRING) == "the device was revoked"


@both
def test_subscribe_is_refused_politely(version):
    h = Harness()
    h.connect(version)
    h.send(mqtt.Subscribe(3, (("devices/#", 1),)))
    [suback] = h.events()
    assert suback.reasons == ((Reason.NOT_AUTHORIZED,) if version == V5 else (0x80,))
    assert not h.transport.disconnecting


def test_retained_messages_are_refused_in_v5_and_stored_in_311():
    h = Harness()
    h.connect(V5)
    h.publish(1, body(1.0), retain=True)
    [disconnect] = h.events()
    assert disconnect.reason == Reason.RETAIN_NOT_SUPPORTED and h.transport.disconnecting
    h = Harness()
    h.connect(V311)
    h.publish(1, body(1.0), retain=True)
    assert h.events() == [mqtt.PubAck(1)] and len(h.store.readings) == 1


def reconnect(h: Harness, after: float = 0.0, **kw) -> mqtt.ConnAck:
    """The same device again, ``after`` seconds after its connection ended, to the same store."""
    h.proto.connectionLost(None)
    ended = h.store.now()
    h.store.now = lambda: ended + after
    again = Harness(h.store, clock=h.clock)
    again.token = h.token
    return again, again.connect(**kw)


@pytest.mark.parametrize(
    "version, keep",
    [(V311, {}), (V5, {"properties": ((P.SESSION_EXPIRY_INTERVAL, 3600),)})],
)
def test_session_present_only_when_the_device_kept_a_session_that_is_still_there(version, keep):
    """[MQTT-3.2.2-2, 3.2.2-3]: 0 on a first connection, 1 on a later one that asked to keep it."""
    h = Harness()
    assert not h.connect(version, clean_start=False, **keep).session_present  # a first connection
    h, connack = reconnect(h, version=version, clean_start=False, **keep)
    assert connack.session_present
    h, connack = reconnect(h, version=version, clean_start=True)  # a clean start discards it
    assert not connack.session_present
    h, connack = reconnect(h, version=version, clean_start=False, **keep)
    assert not connack.session_present  # nothing was kept after the clean session
    h, connack = reconnect(h, after=3000, version=version, clean_start=False, **keep)
    assert connack.session_present  # within the expiry
    h, connack = reconnect(h, after=40 * 24 * 3600, version=version, clean_start=False, **keep)
    assert not connack.session_present  # past it


def test_a_v5_session_without_expiry_or_with_an_assigned_client_id_is_never_present():
    h = Harness()
    h.connect(V5, clean_start=False)  # Session Expiry Interval 0: the session ends with the connection
    h, connack = reconnect(h, version=V5, clean_start=False)
    assert not connack.session_present
    h.proto.connectionLost(None)
    h = Harness(h.store)
    h.send(mqtt.Connect("", V5, clean_start=False, username="truck-17", password=h.token.encode()))
    [connack] = h.events()
    assert connack.reason == Reason.SUCCESS and not connack.session_present
    assert mqtt.prop(connack.properties, P.ASSIGNED_CLIENT_IDENTIFIER).startswith("truck-17-")


def test_a_v5_session_expiry_longer_than_the_gateway_keeps_is_capped_in_connack():
    from gateway.transports.mqtt_adapter import MAX_SESSION_EXPIRY

    h = Harness()
    connack = h.connect(V5, clean_start=False, properties=((P.SESSION_EXPIRY_INTERVAL, 0xFFFFFFFF),))
    assert mqtt.prop(connack.properties, P.SESSION_EXPIRY_INTERVAL) == MAX_SESSION_EXPIRY


def test_when_the_store_cannot_say_a_device_keeping_its_session_is_told_it_has_one():
    """A device told "no session" would drop what it holds unacknowledged: while in doubt, say present."""
    store = MemoryStore()
    h = Harness(store)
    store.available = False
    store.authenticate = MemoryStore.authenticate.__get__(store)  # credentials still answer
    h.send(mqtt.Connect("c1", V311, clean_start=False, username="truck-17", password=h.token.encode()))
    [connack] = h.events()
    assert connack.reason == Reason.SUCCESS and connack.session_present


def test_garbage_gets_a_refusal_and_a_close_at_once():
    h = Harness()
    h.proto.dataReceived(b"GET / HTTP/1.1\r\n")
    assert h.transport.disconnecting and h.transport.value() == b""  # no CONNACK: nothing asked for one


def certificate_for(name: str):
    from cryptography import x509

    from tests.certs import TestCA

    return x509.load_pem_x509_certificate(TestCA().issue(name))


@pytest.mark.parametrize(
    "names,revoked,expected",
    [
        ("truck-17", False, Reason.SUCCESS),
        ("truck-18", False, Reason.BAD_USER_NAME_OR_PASSWORD),  # the certificate names another device
        ("truck-17", True, Reason.NOT_AUTHORIZED),
    ],
)
def test_with_device_ca_a_client_certificate_naming_the_device_stands_for_the_token(names, revoked, expected):
    h = Harness(require_client_cert=True)
    h.transport.getPeerCertificate = lambda: certificate_for(names)
    if revoked:
        h.store.revoke("truck-17")
    assert h.connect(V5, password=NO).reason == expected


def test_without_device_ca_a_password_is_needed():
    h = Harness()
    h.transport.getPeerCertificate = lambda: certificate_for("truck-17")
    assert h.connect(V5, password=NO).reason == Reason.BAD_USER_NAME_OR_PASSWORD


def test_a_refusal_too_large_for_the_devices_maximum_packet_size_goes_without_its_reason_string():
    """[MQTT-3.4.2-2]: leave out the Reason String and User Properties, never the PUBACK, SUBACK or DISCONNECT."""
    h = Harness()
    assert h.connect(V5, properties=((P.MAXIMUM_PACKET_SIZE, 40),)).reason == Reason.SUCCESS
    h.publish(1, b"not json")
    assert h.events() == [mqtt.PubAck(1, Reason.PAYLOAD_FORMAT_INVALID)]
    h.publish(2, body(1.0))
    assert h.events() == [mqtt.PubAck(2)]
    h.publish(3, body(1.0))  # a duplicate: its counts (user properties) do not fit in 40 bytes
    assert h.events() == [mqtt.PubAck(3)]
    h.send(mqtt.Subscribe(4, (("devices/truck-17/commands/#", 1),)))
    assert h.events() == [mqtt.SubAck(4, (Reason.NOT_AUTHORIZED,))]
    h.publish(5, body(1.0), retain=True)
    assert h.events() == [mqtt.Disconnect(Reason.RETAIN_NOT_SUPPORTED)] and h.transport.disconnecting


def test_a_device_asking_for_no_problem_information_gets_no_reason_strings_or_user_properties():
    """[MQTT-3.1.2-29]: Request Problem Information 0 leaves them out of PUBACK and SUBACK (not of DISCONNECT)."""
    h = Harness()
    h.connect(V5, properties=((P.REQUEST_PROBLEM_INFORMATION, 0),))
    h.publish(1, b"not json")
    assert h.events() == [mqtt.PubAck(1, Reason.PAYLOAD_FORMAT_INVALID)]
    h.publish(2, body(1.0))
    h.publish(3, body(1.0))  # a duplicate, as a reconnecting device sends
    assert h.events() == [mqtt.PubAck(2), mqtt.PubAck(3)]
    h.send(mqtt.Subscribe(4, (("x", 1),)))
    assert h.events() == [mqtt.SubAck(4, (Reason.NOT_AUTHORIZED,))]
    h.publish(5, body(1.0), retain=True)
    [disconnect] = h.events()
    assert mqtt.prop(disconnect.properties, P.REASON_STRING)  # DISCONNECT may still say why


@both
def test_a_qos_2_publish_and_its_dup_in_one_read_get_a_pubrec_each(version):
    """[MQTT-4.3.3-10]: every PUBLISH is answered, even one sent again before the first answer left."""
    h = Harness()
    h.connect(version)
    first = mqtt.Publish("devices/truck-17/readings", body(5.0), 2, 7)
    again = mqtt.Publish("devices/truck-17/readings", body(5.0), 2, 7, dup=True)
    h.proto.dataReceived(h.client.send(first) + h.client.send(again))
    answers = h.events()
    assert [type(a) for a in answers] == [mqtt.PubRec, mqtt.PubRec] and {a.packet_id for a in answers} == {7}
    assert len(h.store.readings) == 1
    h.send(mqtt.PubRel(7))
    assert h.events() == [mqtt.PubComp(7)]


def test_a_maximum_packet_size_too_small_for_any_connack_closes_at_once():
    h = Harness()
    h.send(
        mqtt.Connect("c1", V5, username="truck-17", password=h.token.encode(), properties=((P.MAXIMUM_PACKET_SIZE, 8),))
    )
    assert h.transport.value() == b"" and h.transport.disconnecting
    assert not h.clock.getDelayedCalls()


def test_an_empty_topic_without_a_topic_alias_is_a_protocol_error():
    h = Harness()
    h.connect(V5)
    h.proto.dataReceived(b"\x32\x06\x00\x00\x00\x01\x00x")  # QoS 1 PUBLISH, topic "", no properties
    assert h.events() == [
        mqtt.Disconnect(Reason.PROTOCOL_ERROR, ((P.REASON_STRING, "PUBLISH: an empty topic name and no topic alias"),))
    ]


@pytest.mark.parametrize(
    "connect",
    [
        b"\x10\x0e\x00\x04MQTT\x04\x03\x00\x3c\x00\x02c1",  # the reserved flag set
        b"\x10\x14\x00\x04MQTT\x04\x1c\x00\x3c\x00\x02c1\x00\x01t\x00\x01x",  # will QoS 3
        b"\x10\x11\x00\x04MQTT\x04\x42\x00\x3c\x00\x02c1\x00\x01p",  # a password without a user name
    ],
)
def test_a_311_connect_that_breaks_the_protocol_is_closed_without_connack(connect):
    """[MQTT-3.1.4-1]: no CONNACK 0x03 (server unavailable), which a device would retry for ever."""
    h = Harness()
    h.proto.dataReceived(connect)
    assert h.transport.value() == b"" and h.transport.disconnecting
