"""The MQTT codec, with no I/O: both versions, both roles, every packet, limits, hostile bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import mqtt
from protocols.mqtt import V5, V311, Reason
from protocols.mqtt import Property as P


def drain(conn: mqtt.Connection) -> list:
    events = []
    while True:
        event = conn.next_event()
        if event is mqtt.NEED_DATA or event is mqtt.CONNECTION_CLOSED:
            return events
        events.append(event)


class Pair:
    def __init__(self, **limits) -> None:
        self.client = mqtt.Connection(mqtt.CLIENT, **limits)
        self.server = mqtt.Connection(mqtt.SERVER, **limits)
        self.wire: list[bytes] = []

    def send(self, sender: str, event) -> list:
        ours, theirs = (self.client, self.server) if sender == "client" else (self.server, self.client)
        data = ours.send(event)
        self.wire.append(data)
        theirs.receive_data(data)
        return drain(theirs)

    def connect(self, version: int = V5, **kw) -> Pair:
        connect = mqtt.Connect("truck-17", version, username="truck-17", password=b"token", **kw)
        assert self.send("client", connect) == [connect]
        assert self.send("server", mqtt.ConnAck()) == [mqtt.ConnAck()]
        assert self.client.state == self.server.state == mqtt.CONNECTED
        return self


both = pytest.mark.parametrize("version", [V311, V5])


# -- known bytes -----------------------------------------------------------


def test_a_311_connect_as_the_standard_lays_it_out():
    server = mqtt.Connection(mqtt.SERVER)
    # MQTT 3.1.1 section 3.1: "MQTT", level 4, flags (user name, password, clean session), keepalive 60
    body = b"\x00\x04MQTT\x04\xc2\x00\x3c" + b"\x00\x02id" + b"\x00\x01u" + b"\x00\x02pw"
    server.receive_data(bytes([0x10, len(body)]) + body)
    assert server.next_event() == mqtt.Connect("id", V311, True, 60, "u", b"pw")
    assert server.send(mqtt.ConnAck()) == b"\x20\x02\x00\x00"


def test_a_refused_connect_gets_the_return_code_its_version_knows():
    for version, expected in ((V311, b"\x20\x02\x00\x04"), (V5, b"\x20\x03\x00\x86\x00")):
        pair = Pair()
        pair.send("client", mqtt.Connect("id", version, username="u", password=b"wrong"))
        assert pair.server.send(mqtt.ConnAck(Reason.BAD_USER_NAME_OR_PASSWORD)) == expected
        assert pair.server.state == mqtt.CLOSED


@pytest.mark.parametrize("name,level", [("MQIsdp", 3), ("MQTT", 3), ("MQTT", 6), ("HTTP", 4)])
def test_an_unknown_protocol_is_refused_with_a_connack_it_can_read(name, level):
    server = mqtt.Connection(mqtt.SERVER)
    body = bytes([0, len(name)]) + name.encode() + bytes([level, 0x02, 0, 60, 0, 1]) + b"x"
    server.receive_data(bytes([0x10, len(body)]) + body)
    with pytest.raises(mqtt.RemoteProtocolError) as e:
        server.next_event()
    assert e.value.reason == Reason.UNSUPPORTED_PROTOCOL_VERSION
    assert server.send(mqtt.ConnAck(Reason.UNSUPPORTED_PROTOCOL_VERSION)) == b"\x20\x02\x00\x01"


def test_remaining_length_takes_at_most_four_bytes():
    assert mqtt.encode_varint(127) == b"\x7f" and mqtt.encode_varint(128) == b"\x80\x01"
    assert mqtt.encode_varint(mqtt.MAX_REMAINING) == b"\xff\xff\xff\x7f"
    server = mqtt.Connection(mqtt.SERVER, max_packet=1 << 30)
    server.receive_data(b"\x10\xff\xff\xff\xff\x01")
    with pytest.raises(mqtt.RemoteProtocolError, match="longer than four bytes"):
        server.next_event()


def test_a_packet_over_the_limit_is_refused_from_its_header():
    server = mqtt.Connection(mqtt.SERVER, max_packet=1000)
    server.receive_data(b"\x10" + mqtt.encode_varint(5000))  # nothing of the body has come yet
    with pytest.raises(mqtt.RemoteProtocolError) as e:
        server.next_event()
    assert e.value.reason == Reason.PACKET_TOO_LARGE


def test_a_v5_peer_that_takes_small_packets_is_not_sent_big_ones():
    pair = Pair()
    pair.send("client", mqtt.Connect("id", V5, properties=((P.MAXIMUM_PACKET_SIZE, 100),)))
    pair.send("server", mqtt.ConnAck())
    pair.server.send(mqtt.Publish("t", b"x" * 50))
    with pytest.raises(mqtt.LocalProtocolError) as e:
        pair.server.send(mqtt.Publish("t", b"x" * 200))
    assert e.value.reason == Reason.PACKET_TOO_LARGE


# -- the session -----------------------------------------------------------


def test_nothing_before_connect_and_connect_only_once():
    server = mqtt.Connection(mqtt.SERVER)
    server.receive_data(b"\xc0\x00")  # PINGREQ
    with pytest.raises(mqtt.RemoteProtocolError, match="first packet must be CONNECT"):
        server.next_event()
    pair = Pair().connect()
    with pytest.raises(mqtt.LocalProtocolError):
        pair.client.send(mqtt.Connect("again"))
    pair.server.receive_data(mqtt.Connection(mqtt.CLIENT).send(mqtt.Connect("again")))
    with pytest.raises(mqtt.RemoteProtocolError) as e:
        pair.server.next_event()
    assert e.value.reason == Reason.PROTOCOL_ERROR


@both
def test_qos_1_is_answered_by_packet_identifier(version):
    pair = Pair().connect(version)
    publishes = [mqtt.Publish("devices/truck-17/readings", b"{}", 1, i) for i in (7, 8)]
    for p in publishes:
        assert pair.send("client", p) == [p]
    assert pair.server.inbound_in_flight == 2
    with pytest.raises(mqtt.LocalProtocolError) as e:
        pair.server.send(mqtt.PubAck(9))
    assert e.value.reason == Reason.PACKET_IDENTIFIER_NOT_FOUND
    assert pair.send("server", mqtt.PubAck(7)) == [mqtt.PubAck(7)]
    with pytest.raises(mqtt.LocalProtocolError):
        pair.client.send(mqtt.Publish("t", b"", 1, 8))  # still in flight
    assert pair.send("server", mqtt.PubAck(8)) == [mqtt.PubAck(8)]
    assert pair.server.inbound_in_flight == 0


@both
def test_qos_2_runs_its_four_packets(version):
    pair = Pair().connect(version)
    publish = mqtt.Publish("devices/truck-17/oil_temp", b"81.5", 2, 1)
    assert pair.send("client", publish) == [publish]
    assert pair.send("server", mqtt.PubRec(1)) == [mqtt.PubRec(1)]
    assert pair.send("client", mqtt.PubRel(1)) == [mqtt.PubRel(1)]
    assert pair.send("server", mqtt.PubComp(1)) == [mqtt.PubComp(1)]
    assert pair.server.inbound_in_flight == 0
    pair.server.receive_data(b"\x70\x02\x00\x01")  # a second PUBCOMP for 1: nothing is in flight
    with pytest.raises(mqtt.RemoteProtocolError, match="not in flight"):
        pair.server.next_event()


@both
def test_a_publish_sent_again_before_its_answer_is_answered_twice(version):
    pair = Pair().connect(version)
    pair.send("client", mqtt.Publish("t", b"1", 1, 5))
    [again] = pair.send("client", mqtt.Publish("t", b"1", 1, 5, dup=True))
    assert again.dup
    pair.send("server", mqtt.PubAck(5))
    pair.server.send(mqtt.PubAck(5))
    with pytest.raises(mqtt.LocalProtocolError):
        pair.server.send(mqtt.PubAck(5))


def test_v5_receive_maximum_is_enforced_on_both_ends():
    pair = Pair(receive_maximum=2)
    pair.send("client", mqtt.Connect("id", V5))
    pair.send("server", mqtt.ConnAck(properties=((P.RECEIVE_MAXIMUM, 2),)))
    pair.send("client", mqtt.Publish("t", b"", 1, 1))
    pair.send("client", mqtt.Publish("t", b"", 1, 2))
    with pytest.raises(mqtt.LocalProtocolError) as e:
        pair.client.send(mqtt.Publish("t", b"", 1, 3))
    assert e.value.reason == Reason.RECEIVE_MAXIMUM_EXCEEDED
    rogue = mqtt.Connection(mqtt.CLIENT)
    rogue.send(mqtt.Connect("id", V5))
    rogue.receive_data(b"\x20\x03\x00\x00\x00")
    rogue.next_event()
    pair.server.receive_data(rogue.send(mqtt.Publish("t", b"", 1, 3)))
    with pytest.raises(mqtt.RemoteProtocolError) as e:
        pair.server.next_event()
    assert e.value.reason == Reason.RECEIVE_MAXIMUM_EXCEEDED


def test_v311_acknowledgements_carry_no_reason():
    pair = Pair().connect(V311)
    pair.send("client", mqtt.Publish("t", b"", 1, 1))
    assert pair.server.send(mqtt.PubAck(1, Reason.PAYLOAD_FORMAT_INVALID)) == b"\x40\x02\x00\x01"
    pair = Pair().connect(V5)
    pair.send("client", mqtt.Publish("t", b"", 1, 1))
    data = pair.server.send(mqtt.PubAck(1, Reason.PAYLOAD_FORMAT_INVALID, ((P.REASON_STRING, "readings[0].value"),)))
    pair.client.receive_data(data)
    assert drain(pair.client) == [
        mqtt.PubAck(1, Reason.PAYLOAD_FORMAT_INVALID, ((P.REASON_STRING, "readings[0].value"),))
    ]


def test_only_a_v5_server_says_disconnect():
    pair = Pair().connect(V311)
    with pytest.raises(mqtt.LocalProtocolError):
        pair.server.send(mqtt.Disconnect())
    assert pair.send("client", mqtt.Disconnect()) == [mqtt.Disconnect()]
    pair = Pair().connect(V5)
    assert pair.send("server", mqtt.Disconnect(Reason.SERVER_BUSY)) == [mqtt.Disconnect(Reason.SERVER_BUSY)]
    assert pair.server.state == pair.client.state == mqtt.CLOSED


@both
def test_subscribe_round_trip_and_refusal(version):
    pair = Pair().connect(version)
    sub = mqtt.Subscribe(3, (("devices/+/readings", 1),))
    assert pair.send("client", sub) == [sub]
    [suback] = pair.send("server", mqtt.SubAck(3, (Reason.NOT_AUTHORIZED,)))
    assert suback.reasons == ((Reason.NOT_AUTHORIZED,) if version == V5 else (0x80,))
    unsub = mqtt.Unsubscribe(4, ("a/b",))
    assert pair.send("client", unsub) == [unsub]
    [unsuback] = pair.send("server", mqtt.UnsubAck(4, (Reason.NO_SUBSCRIPTION_EXISTED,)))
    assert unsuback.reasons == ((Reason.NO_SUBSCRIPTION_EXISTED,) if version == V5 else ())


def test_topic_aliases_within_the_maximum():
    pair = Pair(topic_alias_maximum=4)
    pair.send("client", mqtt.Connect("id", V5))
    pair.send("server", mqtt.ConnAck(properties=((P.TOPIC_ALIAS_MAXIMUM, 4),)))
    [first] = pair.send("client", mqtt.Publish("devices/a/t", b"1", properties=((P.TOPIC_ALIAS, 2),)))
    [second] = pair.send("client", mqtt.Publish("", b"2", properties=((P.TOPIC_ALIAS, 2),)))
    assert first.topic == second.topic == "devices/a/t"
    for alias in (0, 5):
        with pytest.raises(mqtt.RemoteProtocolError) as e:
            pair.send("client", mqtt.Publish("x", b"", properties=((P.TOPIC_ALIAS, alias),)))
        assert e.value.reason == Reason.TOPIC_ALIAS_INVALID


@pytest.mark.parametrize(
    "packet,reason",
    [
        (b"\x32\x05\x00\x01#\x00\x01", Reason.TOPIC_NAME_INVALID),  # QoS 1 to topic "#"
        (b"\x38\x03\x00\x01t", Reason.MALFORMED_PACKET),  # DUP on QoS 0
        (b"\x36\x05\x00\x01t\x00\x01", Reason.MALFORMED_PACKET),  # QoS 3
        (b"\x32\x05\x00\x01t\x00\x00", Reason.MALFORMED_PACKET),  # packet identifier 0
        (b"\x30\x04\x00\x02\xc3\x28", Reason.MALFORMED_PACKET),  # not UTF-8
        (b"\x30\x04\x00\x02a\x00", Reason.MALFORMED_PACKET),  # U+0000
        (b"\x30\x02\x00\x00", Reason.TOPIC_NAME_INVALID),  # an empty topic without an alias
        (b"\x41\x02\x00\x01", Reason.MALFORMED_PACKET),  # PUBACK with flags
        (b"\x60\x02\x00\x01", Reason.MALFORMED_PACKET),  # PUBREL without its flags
        (b"\x90\x03\x00\x01\x00", Reason.PROTOCOL_ERROR),  # SUBACK from a client
        (b"\x00\x00", Reason.MALFORMED_PACKET),  # type 0
        (b"\xc0\x01\x00", Reason.MALFORMED_PACKET),  # PINGREQ with a body
    ],
)
def test_malformed_packets_from_a_311_client(packet, reason):
    pair = Pair().connect(V311)
    pair.server.receive_data(packet)
    with pytest.raises(mqtt.RemoteProtocolError) as e:
        pair.server.next_event()
    assert e.value.reason == reason


def test_v5_properties_belong_to_their_packets():
    pair = Pair().connect(V5)
    # PUBLISH "t" with Session Expiry Interval, a CONNECT property
    pair.server.receive_data(b"\x30\x09\x00\x01t\x05\x11\x00\x00\x00\x0a")
    with pytest.raises(mqtt.RemoteProtocolError) as e:
        pair.server.next_event()
    assert e.value.reason == Reason.PROTOCOL_ERROR
    pair = Pair().connect(V5)
    pair.server.receive_data(b"\x30\x06\x00\x01t\x02\x7f\x00")  # unknown property 0x7f
    with pytest.raises(mqtt.RemoteProtocolError, match="unknown property"):
        pair.server.next_event()
    with pytest.raises(mqtt.LocalProtocolError):
        pair.client.send(mqtt.Publish("t", b"", properties=((P.CONTENT_TYPE, "a"), (P.CONTENT_TYPE, "b"))))
    users = ((P.USER_PROPERTY, ("a", "1")), (P.USER_PROPERTY, ("a", "2")))
    assert pair.send("client", mqtt.Publish("t", b"", properties=users)) == [mqtt.Publish("t", b"", properties=users)]
    assert mqtt.prop(users, P.USER_PROPERTY) == ("a", "1") and mqtt.prop(users, P.CONTENT_TYPE, "x") == "x"


def test_eof_between_packets_and_inside_one():
    pair = Pair().connect()
    pair.server.receive_data(b"")
    assert pair.server.next_event() is mqtt.CONNECTION_CLOSED
    pair = Pair().connect()
    pair.server.receive_data(b"\x30\x05\x00")
    assert pair.server.next_event() is mqtt.NEED_DATA
    pair.server.receive_data(b"")
    with pytest.raises(mqtt.RemoteProtocolError, match="middle of a packet"):
        pair.server.next_event()


# -- properties ------------------------------------------------------------

texts = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=30)
topics = texts.filter(lambda t: t and "+" not in t and "#" not in t)
ids = st.integers(1, 0xFFFF)
user_properties = st.lists(st.tuples(st.just(int(P.USER_PROPERTY)), st.tuples(texts, texts)), max_size=3)


@st.composite
def connects(draw):
    version = draw(st.sampled_from([V311, V5]))
    username = draw(st.none() | texts)
    password = draw(st.none() | st.binary(max_size=40)) if username is not None or version == V5 else None
    will = None
    if draw(st.booleans()):
        will = mqtt.Will(
            draw(topics),
            draw(st.binary(max_size=20)),
            draw(st.integers(0, 2)),
            draw(st.booleans()),
            tuple(draw(user_properties)) if version == V5 else (),
        )
    properties = ((P.SESSION_EXPIRY_INTERVAL, draw(st.integers(0, 2**32 - 1))),) if version == V5 else ()
    return mqtt.Connect(
        draw(texts), version, draw(st.booleans()), draw(st.integers(0, 0xFFFF)), username, password, will, properties
    )


@given(connects())
def test_connect_round_trips(connect):
    pair = Pair()
    assert pair.send("client", connect) == [connect]


@given(
    st.sampled_from([V311, V5]),
    st.lists(st.tuples(topics, st.binary(max_size=100), st.integers(0, 2), st.booleans()), max_size=20),
)
def test_publishes_round_trip_in_both_directions(version, messages):
    pair = Pair().connect(version)
    for i, (topic, payload, qos, retain) in enumerate(messages, 1):
        publish = mqtt.Publish(topic, payload, qos, i if qos else None, retain)
        for sender in ("client", "server"):
            assert pair.send(sender, publish) == [publish]


def session_packets(version: int) -> list[bytes]:
    """A client's side of a session, packet by packet, as the server receives it."""
    pair = Pair().connect(version)
    for i in range(1, 6):
        pair.send("client", mqtt.Publish(f"devices/truck-17/m{i}", b'{"value": %d}' % i, i % 3, i if i % 3 else None))
    pair.send("client", mqtt.PingReq())
    pair.send("client", mqtt.Disconnect())
    return [data for i, data in enumerate(pair.wire) if i != 1]  # all but the CONNACK


def session_bytes(version: int) -> bytes:
    return b"".join(session_packets(version))


def server_events(data: bytes, cuts: list[int]) -> list:
    server = mqtt.Connection(mqtt.SERVER)
    events = []
    last = 0
    for cut in sorted({min(c, len(data)) for c in cuts} | {len(data)}):
        if cut > last:  # b"" would mean the end of the stream
            server.receive_data(data[last:cut])
        last = cut
        while True:
            event = server.next_event()
            if event is mqtt.NEED_DATA:
                break
            events.append(event)
            if isinstance(event, mqtt.Connect):
                server.send(mqtt.ConnAck())
    return events


@given(st.sampled_from([V311, V5]), st.lists(st.integers(0, 400), max_size=20))
def test_any_split_of_the_bytes_gives_the_same_events(version, cuts):
    data = session_bytes(version)
    assert server_events(data, cuts) == server_events(data, [])
    assert len(server_events(data, [])) == 8


def only_protocol_errors(conn: mqtt.Connection, data: bytes) -> None:
    conn.receive_data(data)
    try:
        while conn.next_event() not in (mqtt.NEED_DATA, mqtt.CONNECTION_CLOSED):  # b"" is the end of the stream
            pass
    except mqtt.RemoteProtocolError as e:
        assert isinstance(e.reason, Reason) or e.reason in Reason._value2member_map_


@given(st.binary(max_size=300), st.sampled_from([None, V311, V5]), st.sampled_from(["client", "server"]))
def test_random_bytes_raise_only_protocol_errors(data, connected, role):
    pair = Pair() if connected is None else Pair().connect(connected)
    only_protocol_errors(pair.server if role == "server" else pair.client, data)


def packet_ends(version: int) -> set[int]:
    ends, at = set(), 0
    for data in session_packets(version):
        at += len(data)
        ends.add(at)
    return ends


@given(st.sampled_from([V311, V5]), st.integers(0, 10_000))
def test_a_truncated_session_ends_cleanly_only_at_a_packet_boundary(version, cut):
    session = session_bytes(version)
    cut = min(cut, len(session))
    server = mqtt.Connection(mqtt.SERVER)
    server.receive_data(session[:cut])
    server.receive_data(b"")
    try:
        while (event := server.next_event()) is not mqtt.CONNECTION_CLOSED:
            if isinstance(event, mqtt.Connect):
                server.send(mqtt.ConnAck())
    except mqtt.RemoteProtocolError as e:
        assert e.reason == Reason.MALFORMED_PACKET and cut not in packet_ends(version) | {0}
    else:
        assert cut in packet_ends(version) | {0}
