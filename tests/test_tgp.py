"""The TGP codec, with no I/O: state machine, encodings, limits, hostile bytes."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import tgp
from tests.tgp_helpers import Pair

F64 = tgp.ValueType.F64


def ready_pair(version: int = tgp.VERSIONS[-1], **limits) -> Pair:
    pair = Pair(**limits)
    pair.handshake(version=version)
    return pair


def test_handshake_then_declare_data_ack():
    pair = ready_pair()
    declare = tgp.Declare(1, (tgp.Metric(1, F64, "oil_temp"), tgp.Metric(2, tgp.ValueType.I32, "rpm")))
    assert pair.send("device", declare) == [declare]
    data = tgp.Data(2, (("oil_temp", 1_795_341_600_250_000, 81.5), ("rpm", 1_795_341_600_251_000, 1800.0)))
    assert pair.send("device", data) == [data]
    assert pair.send("gateway", tgp.Ack(1)) == [tgp.Ack(1)]
    assert pair.send("gateway", tgp.Ack(2, 2, 0)) == [tgp.Ack(2, 2, 0)]
    assert pair.send("device", tgp.Bye()) == [tgp.Bye(tgp.ErrorCode.NORMAL, "")]
    assert pair.gateway.state == pair.device.state == tgp.CLOSED


def test_data_frames_are_compact():
    pair = ready_pair()
    pair.send("device", tgp.Declare(1, (tgp.Metric(1, tgp.ValueType.F32, "t"),)))
    # one reading a second for a minute: deltas in whole seconds fit one varint byte
    readings = tuple(("t", 1_795_341_600_000_000 + i * 1_000_000, 20.5) for i in range(60))
    before = len(pair.wire)
    pair.send("device", tgp.Data(2, readings))
    frame = pair.wire[before][1]
    # 12 bytes framing + 15 bytes DATA head + 60 * (2 id + 1 delta + 4 value)
    assert len(frame) == 12 + 15 + 60 * 7


@pytest.mark.parametrize(
    "sender,event",
    [
        ("gateway", tgp.Ack(1)),
        ("device", tgp.Data(1, ())),
        ("device", tgp.Auth(b"x" * 32)),
        ("gateway", tgp.Welcome(1, 0, 1, 1, 1, 1)),
        ("device", tgp.Ping()),
    ],
)
def test_messages_out_of_order_are_refused_locally(sender, event):
    pair = Pair()
    with pytest.raises(tgp.LocalProtocolError) as e:
        pair.send(sender, event)
    assert e.value.code == tgp.ErrorCode.UNEXPECTED_MESSAGE


def test_messages_out_of_order_are_refused_remotely():
    device = tgp.Connection(tgp.DEVICE)
    gateway = tgp.Connection(tgp.GATEWAY)
    device.state = tgp.READY  # a device that skipped the handshake
    device.last_seq_sent = 0
    gateway.receive_data(device.send(tgp.Data(1, ())))
    with pytest.raises(tgp.RemoteProtocolError) as e:
        gateway.next_event()
    assert e.value.code == tgp.ErrorCode.UNEXPECTED_MESSAGE


def test_sequence_numbers_must_follow_on():
    pair = ready_pair()
    pair.send("device", tgp.Data(1, ()))
    pair.device.last_seq_sent = 2  # the device skips frame 2
    with pytest.raises(tgp.RemoteProtocolError) as e:
        pair.send("device", tgp.Data(3, ()))
    assert e.value.code == tgp.ErrorCode.BAD_SEQUENCE


def test_answers_must_come_in_order():
    pair = ready_pair()
    pair.send("device", tgp.Data(1, ()))
    pair.send("device", tgp.Data(2, ()))
    with pytest.raises(tgp.LocalProtocolError):
        pair.send("gateway", tgp.Ack(2))
    pair.send("gateway", tgp.Nack(1, tgp.ErrorCode.INVALID_READING, "readings[0].value: must be finite"))
    assert pair.send("gateway", tgp.Ack(2)) == [tgp.Ack(2)]
    with pytest.raises(tgp.LocalProtocolError):
        pair.send("gateway", tgp.Ack(3))  # never sent


def test_undeclared_metric_is_a_frame_error_not_a_fatal_one():
    pair = ready_pair()
    pair.send("device", tgp.Declare(1, (tgp.Metric(7, F64, "a"),)))
    pair.device._ours["b"] = (8, F64)  # the device thinks it declared b
    [event] = pair.send("device", tgp.Data(2, (("b", 0, 1.0),)))
    assert isinstance(event, tgp.InvalidFrame)
    assert (event.seq, event.code) == (2, tgp.ErrorCode.UNKNOWN_METRIC)
    assert pair.send("device", tgp.Data(3, (("a", 0, 1.0),))) == [tgp.Data(3, (("a", 0, 1.0),))]


def test_conflicting_declaration_is_refused_and_ignored():
    pair = ready_pair()
    pair.send("device", tgp.Declare(1, (tgp.Metric(1, F64, "a"),)))
    pair.device._ours.clear()
    pair.device._ours_by_id.clear()
    [event] = pair.send("device", tgp.Declare(2, (tgp.Metric(1, F64, "b"),)))
    assert isinstance(event, tgp.InvalidFrame) and event.code == tgp.ErrorCode.BAD_DECLARATION
    assert pair.gateway._theirs == {1: ("a", F64)}


def test_too_many_metrics_is_refused():
    pair = ready_pair(max_metrics=2)
    [event] = pair.send("device", tgp.Declare(1, tuple(tgp.Metric(i, F64, f"m{i}") for i in range(3))))
    assert isinstance(event, tgp.InvalidFrame) and "more than 2 metrics" in event.message


def test_oversized_frame_is_refused_from_its_header():
    gateway = tgp.Connection(tgp.GATEWAY, max_frame=1024)
    gateway.receive_data(tgp.HEADER.pack(tgp.MAGIC, tgp.MessageType.HELLO, 0, 1025))
    with pytest.raises(tgp.RemoteProtocolError) as e:
        gateway.next_event()
    assert e.value.code == tgp.ErrorCode.FRAME_TOO_LARGE


def test_bad_crc_unknown_type_flags_and_magic():
    hello = tgp.Connection(tgp.DEVICE).send(tgp.Hello("a"))
    cases = {
        tgp.ErrorCode.BAD_CRC: hello[:-1] + bytes([hello[-1] ^ 1]),
        tgp.ErrorCode.BAD_FRAME: b"XX" + hello[2:],
    }
    bogus = tgp.HEADER.pack(tgp.MAGIC, 0x7F, 0, 0)
    cases[tgp.ErrorCode.UNKNOWN_TYPE] = bogus + struct.pack(">I", zlib.crc32(bogus))
    flagged = tgp.HEADER.pack(tgp.MAGIC, 1, 0x80, 0)
    cases[tgp.ErrorCode.BAD_FRAME] = flagged + struct.pack(">I", zlib.crc32(flagged))
    for code, data in cases.items():
        gateway = tgp.Connection(tgp.GATEWAY)
        gateway.receive_data(data)
        with pytest.raises(tgp.RemoteProtocolError) as e:
            gateway.next_event()
        assert e.value.code == code


def test_trailing_bytes_in_a_payload_are_refused():
    payload = b"\x01\x01\x01a\x00" + b"extra"
    header = tgp.HEADER.pack(tgp.MAGIC, tgp.MessageType.HELLO, 0, len(payload))
    gateway = tgp.Connection(tgp.GATEWAY)
    gateway.receive_data(header + payload + struct.pack(">I", zlib.crc32(header + payload)))
    with pytest.raises(tgp.RemoteProtocolError, match="5 bytes after the last field"):
        gateway.next_event()


def test_eof_between_frames_and_inside_one():
    gateway = tgp.Connection(tgp.GATEWAY)
    gateway.receive_data(b"")
    assert gateway.next_event() is tgp.CONNECTION_CLOSED
    gateway = tgp.Connection(tgp.GATEWAY)
    gateway.receive_data(tgp.Connection(tgp.DEVICE).send(tgp.Hello("a"))[:-1])
    assert gateway.next_event() is tgp.NEED_DATA
    gateway.receive_data(b"")
    with pytest.raises(tgp.RemoteProtocolError, match="middle of a frame"):
        gateway.next_event()


def test_version_choice():
    assert tgp.choose_version(tgp.Hello("a", (1, 2, 7))) == 2
    assert tgp.choose_version(tgp.Hello("a", (1, 2, 3, 7))) == 3
    assert tgp.choose_version(tgp.Hello("a", (7, 1))) == 1
    assert tgp.choose_version(tgp.Hello("a", (4, 5))) is None


def test_a_version_the_device_did_not_offer_is_refused_on_both_ends():
    pair = Pair()
    pair.send("device", tgp.Hello("a", (1,)))
    with pytest.raises(tgp.LocalProtocolError) as e:
        pair.gateway.send(tgp.Challenge(2, bytes(32)))
    assert e.value.code == tgp.ErrorCode.UNSUPPORTED_VERSION
    # a gateway that chooses it anyway: the device refuses the CHALLENGE
    device = tgp.Connection(tgp.DEVICE)
    device.send(tgp.Hello("a", (1,)))
    rogue = tgp.Connection(tgp.GATEWAY)
    rogue.receive_data(tgp.Connection(tgp.DEVICE).send(tgp.Hello("a", (1, 2))))
    rogue.next_event()
    device.receive_data(rogue.send(tgp.Challenge(2, bytes(32))))
    with pytest.raises(tgp.RemoteProtocolError) as e:
        device.next_event()
    assert e.value.code == tgp.ErrorCode.UNSUPPORTED_VERSION
    # ... and says so with BYE, as the spec's table of fatal codes has it
    rogue.receive_data(device.send(tgp.Bye(e.value.code, e.value.message)))
    assert rogue.next_event() == tgp.Bye(tgp.ErrorCode.UNSUPPORTED_VERSION, "the gateway chose version 2")


def test_welcome_names_the_version_challenge_chose():
    pair = Pair()
    pair.send("device", tgp.Hello("a"))
    pair.send("gateway", tgp.Challenge(1, bytes(32)))
    pair.send("device", tgp.Auth(bytes(32)))
    with pytest.raises(tgp.LocalProtocolError, match="chose version 1"):
        pair.gateway.send(tgp.Welcome(2, 0, 1, 1, 1, 1))
    # the same bytes from a peer that does not check
    frame = bytearray(tgp.HEADER.pack(tgp.MAGIC, tgp.MessageType.WELCOME, 0, 19))
    frame += tgp._WELCOME.pack(2, 0, 1, 1, 1, 1)
    frame += tgp.TRAILER.pack(zlib.crc32(frame))
    pair.device.receive_data(bytes(frame))
    with pytest.raises(tgp.RemoteProtocolError, match="CHALLENGE chose 1"):
        pair.device.next_event()


@pytest.mark.parametrize("version,payload", [(1, 8), (2, 10)])
def test_ack_layout_by_version(version, payload):
    """Version 2 adds conflicts to ACK; version 1 has no field for them and counts them as duplicates."""
    pair = ready_pair(version)
    pair.send("device", tgp.Data(1, ()))
    [ack] = pair.send("gateway", tgp.Ack(1, 5, 2, 3))
    assert len(pair.wire[-1][1]) == tgp.OVERHEAD + payload
    assert ack == (tgp.Ack(1, 5, 2, 3) if version == 2 else tgp.Ack(1, 5, 5, 0))


def test_unknown_error_codes_from_newer_peers_keep_their_number():
    pair = ready_pair()
    pair.send("device", tgp.Data(1, ()))
    [nack] = pair.send("gateway", tgp.Nack(1, 99, "new kind of refusal"))
    assert nack.code == 99 and not nack.fatal


def test_events_validate_on_construction():
    for make in (
        lambda: tgp.Hello("x" * 256),
        lambda: tgp.Challenge(1, b"short"),
        lambda: tgp.Ack(-1),
        lambda: tgp.Ack(1, 70000),
        lambda: tgp.Metric(1, 9, "a"),
        lambda: tgp.Welcome(1, 1 << 63, 1, 1, 1, 1),
    ):
        with pytest.raises(ValueError):
            make()


# -- properties ----------------------------------------------------------

names = st.text(alphabet=st.characters(codec="utf-8"), max_size=40).filter(lambda s: len(s.encode()) <= 255)
metric_names = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)
u16 = st.integers(0, 0xFFFF)
times = st.integers(-(1 << 58), 1 << 58)  # µs: years 0001..9999 lie well inside


@given(names, st.lists(st.integers(0, 255), min_size=1, max_size=5), names)
def test_hello_round_trips(device, versions, firmware):
    event = tgp.Hello(device, tuple(versions), firmware)
    assert Pair().send("device", event) == [event]


@given(
    st.binary(min_size=32, max_size=32),
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.integers(0, 2**32 - 1),
    u16,
    u16,
    u16,
)
def test_handshake_messages_round_trip(nonce, now, max_frame, window, heartbeat, idle):
    pair = Pair()
    pair.send("device", tgp.Hello("d"))
    assert pair.send("gateway", tgp.Challenge(1, nonce)) == [tgp.Challenge(1, nonce)]
    assert pair.send("device", tgp.Auth(nonce)) == [tgp.Auth(nonce)]
    welcome = tgp.Welcome(1, now, max_frame, window, heartbeat, idle)
    assert pair.send("gateway", welcome) == [welcome]


@given(st.sampled_from([tgp.Reject, tgp.Bye]), u16, names)
def test_reject_and_bye_round_trip(kind, code, reason):
    pair = Pair()
    pair.send("device", tgp.Hello("d"))
    [event] = pair.send("gateway", kind(code, reason))
    assert (int(event.code), event.reason) == (code, reason)


value_for = {
    tgp.ValueType.F32: st.floats(width=32, allow_nan=False),
    tgp.ValueType.F64: st.floats(allow_nan=False),
    tgp.ValueType.I32: st.integers(-(2**31), 2**31 - 1),
    tgp.ValueType.I64: st.integers(-(2**53), 2**53),
}


@st.composite
def declared_data(draw):
    metrics = draw(
        st.lists(
            st.tuples(metric_names, st.sampled_from(list(tgp.ValueType))),
            min_size=1,
            max_size=5,
            unique_by=lambda m: m[0],
        )
    )
    declare = tgp.Declare(1, tuple(tgp.Metric(i + 1, t, n) for i, (n, t) in enumerate(metrics)))
    readings = []
    for _ in range(draw(st.integers(0, 30))):
        name, vtype = draw(st.sampled_from(metrics))
        unit = draw(st.sampled_from([1, 1000, 1_000_000]))
        ts = draw(times) // unit * unit
        readings.append((name, ts, float(draw(value_for[vtype]))))
    return declare, tgp.Data(2, tuple(readings))


@given(declared_data())
def test_data_round_trips(case):
    declare, data = case
    pair = ready_pair()
    assert pair.send("device", declare) == [declare]
    assert pair.send("device", data) == [data]


@given(st.integers(1, 50), u16, u16, u16, st.sampled_from(list(tgp.ErrorCode)), names, u16)
def test_ack_and_nack_round_trip(n, accepted, duplicates, conflicts, code, text, retry):
    pair = ready_pair()
    for seq in range(1, n + 2):
        pair.send("device", tgp.Data(seq, ()))
    for seq in range(1, n + 1):
        ack = tgp.Ack(seq, accepted, duplicates, conflicts)
        assert pair.send("gateway", ack) == [ack]
    nack = tgp.Nack(n + 1, code, text, retry)
    assert pair.send("gateway", nack) == [nack]


@given(st.integers(0, 2**64 - 1))
def test_ping_pong_round_trip(payload):
    pair = ready_pair()
    assert pair.send("gateway", tgp.Ping(payload)) == [tgp.Ping(payload)]
    assert pair.send("device", tgp.Pong(payload)) == [tgp.Pong(payload)]


def session_bytes() -> bytes:
    """A device's side of a whole session, as the gateway receives it."""
    pair = ready_pair()
    pair.send("device", tgp.Declare(1, (tgp.Metric(1, F64, "oil_temp"), tgp.Metric(2, tgp.ValueType.I64, "rpm"))))
    pair.send("device", tgp.Data(2, (("oil_temp", 1_000, 81.5), ("rpm", 2_000, 1800.0))))
    pair.send("device", tgp.Ping(7))
    pair.send("device", tgp.Bye())
    return b"".join(data for sender, data in pair.wire if sender == "device")


SESSION = session_bytes()


def answer(gateway: tgp.Connection, event) -> None:
    """The gateway's turn in the handshake, as soon as it is its turn."""
    if isinstance(event, tgp.Hello):
        gateway.send(tgp.Challenge(1, bytes(32)))
    elif isinstance(event, tgp.Auth):
        gateway.send(tgp.Welcome(1, 0, 65536, 32, 30, 120))


def gateway_reading(data: bytes, chunks: list[int] | None = None) -> list:
    """Feed device bytes to a gateway (answering its own turn); return events."""
    gateway = tgp.Connection(tgp.GATEWAY)
    events = []
    pieces = [data] if chunks is None else [data[i:j] for i, j in zip([0, *chunks], [*chunks, len(data)])]
    for piece in pieces:
        gateway.receive_data(piece)
        for event in iter(gateway.next_event, tgp.NEED_DATA):
            events.append(event)
            answer(gateway, event)
    gateway.receive_data(b"")
    assert gateway.next_event() is tgp.CONNECTION_CLOSED
    return events


def test_session_decodes():
    kinds = [type(e).__name__ for e in gateway_reading(SESSION)]
    assert kinds == ["Hello", "Auth", "Declare", "Data", "Ping", "Bye"]


@given(st.lists(st.integers(1, len(SESSION) - 1), unique=True).map(sorted))
def test_any_split_of_the_bytes_gives_the_same_events(cuts):
    assert gateway_reading(SESSION, cuts) == gateway_reading(SESSION)


def test_byte_at_a_time_gives_the_same_events():
    assert gateway_reading(SESSION, list(range(1, len(SESSION)))) == gateway_reading(SESSION)


def only_protocol_errors(role: tgp.Role, data: bytes, state: str = tgp.START) -> None:
    conn = tgp.Connection(role)
    if state == tgp.READY:  # as after a handshake
        conn.state = tgp.READY
    conn.receive_data(data)
    conn.receive_data(b"")
    try:
        while conn.next_event() not in (tgp.NEED_DATA, tgp.CONNECTION_CLOSED):
            pass
    except tgp.RemoteProtocolError as e:
        assert isinstance(e.code, tgp.ErrorCode)


@settings(max_examples=300)
@given(st.binary(max_size=300), st.sampled_from([tgp.GATEWAY, tgp.DEVICE]), st.sampled_from([tgp.START, tgp.READY]))
def test_random_bytes_raise_only_protocol_errors(data, role, state):
    only_protocol_errors(role, data, state)


@settings(max_examples=300)
@given(
    st.sampled_from(list(tgp.MessageType)),
    st.binary(max_size=120),
    st.sampled_from([tgp.GATEWAY, tgp.DEVICE]),
    st.sampled_from([None, *tgp.VERSIONS]),
)
def test_well_framed_random_payloads_raise_only_protocol_errors(kind, payload, role, version):
    """Frames with a good header and CRC and random contents, for every type, in READY, in every version."""
    header = tgp.HEADER.pack(tgp.MAGIC, kind, 0, len(payload))
    frame = header + payload + struct.pack(">I", zlib.crc32(header + payload))
    conn = tgp.Connection(role)
    conn.state = tgp.READY
    conn.version = version
    conn.last_seq_sent = 1000
    conn._theirs = {1: ("a", tgp.ValueType.F32), 2: ("b", tgp.ValueType.I64)}
    conn.receive_data(frame)
    try:
        event = conn.next_event()
    except tgp.RemoteProtocolError:
        return
    assert event is not tgp.NEED_DATA


@given(st.integers(0, len(SESSION) - 1))
def test_truncated_sessions_raise_only_protocol_errors(cut):
    gateway = tgp.Connection(tgp.GATEWAY)
    gateway.receive_data(SESSION[:cut])
    gateway.receive_data(b"")
    try:
        for event in iter(gateway.next_event, tgp.CONNECTION_CLOSED):
            answer(gateway, event)
    except tgp.RemoteProtocolError as e:
        assert e.code == tgp.ErrorCode.BAD_FRAME


@given(st.integers(0, len(SESSION) * 8 - 1))
def test_every_single_bit_flip_is_caught(bit):
    """CRC-32 catches every single-bit error; a flip in a header field is caught by its own check."""
    flipped = bytearray(SESSION)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(tgp.RemoteProtocolError):
        gateway_reading(bytes(flipped))


# -- version 3: commands ---------------------------------------------------

ids = st.text(st.sampled_from("abcXYZ019_.:-"), min_size=1, max_size=64)
json_text = st.dictionaries(names, st.integers() | names, max_size=5).map(lambda d: __import__("json").dumps(d))


@given(ids, st.integers(-(2**63), 2**63 - 1), names, json_text, st.sampled_from(list(tgp.CommandStatus)), json_text)
def test_commands_round_trip_in_version_3(id_, expires, name, params, status, result):
    pair = ready_pair(3)
    command = tgp.Command(id_, expires, name, params)
    assert pair.send("gateway", command) == [command]
    assert pair.send("device", tgp.Received(id_)) == [tgp.Received(id_)]
    # A RESULT is numbered with DECLARE and DATA, and answered by ACK in that order.
    pair.send("device", tgp.Data(1, ()))
    report = tgp.Result(2, id_, status, result)
    assert pair.send("device", report) == [report]
    assert pair.send("gateway", tgp.Ack(1)) == [tgp.Ack(1)]
    assert pair.send("gateway", tgp.Ack(2, 1)) == [tgp.Ack(2, 1)]


@pytest.mark.parametrize("version", [1, 2])
def test_versions_1_and_2_have_no_commands(version):
    pair = ready_pair(version)
    for sender, event in [
        ("gateway", tgp.Command("c1", 0, "reboot")),
        ("device", tgp.Received("c1")),
        ("device", tgp.Result(1, "c1", tgp.CommandStatus.SUCCEEDED)),
    ]:
        with pytest.raises(tgp.LocalProtocolError) as e:
            (pair.gateway if sender == "gateway" else pair.device).send(event)
        assert e.value.code == tgp.ErrorCode.UNEXPECTED_MESSAGE
    # A peer that sends one anyway breaks the protocol.
    v3 = ready_pair(3)
    frame = v3.gateway.send(tgp.Command("c1", 0, "reboot"))
    pair.device.receive_data(frame)
    with pytest.raises(tgp.RemoteProtocolError) as e:
        pair.device.next_event()
    assert e.value.code == tgp.ErrorCode.UNEXPECTED_MESSAGE


def test_a_result_with_an_unknown_status_is_a_bad_frame():
    pair = ready_pair(3)
    frame = bytearray(pair.device.send(tgp.Result(1, "c1", tgp.CommandStatus.FAILED, "{}")))
    payload_at = tgp.HEADER.size
    frame[payload_at + 4 + 3] = 7  # seq (4), id "c1" (3): the status byte
    frame[-4:] = struct.pack(">I", zlib.crc32(bytes(frame[:-4])))
    pair.gateway.receive_data(bytes(frame))
    with pytest.raises(tgp.RemoteProtocolError, match="status 7") as e:
        pair.gateway.next_event()
    assert e.value.code == tgp.ErrorCode.BAD_FRAME


@given(st.integers(0, 80), st.sampled_from([tgp.DEVICE, tgp.GATEWAY]))
def test_truncated_command_frames_raise_only_protocol_errors(cut, receiver):
    """A COMMAND (as a device receives it) or a RESULT (as the gateway does) cut anywhere."""
    pair = ready_pair(3)
    if receiver is tgp.DEVICE:
        frame = pair.gateway.send(tgp.Command("c-1", 1_795_341_600_000_000, "set", '{"hz": 5}'))
    else:
        frame = pair.device.send(tgp.Result(1, "c-1", tgp.CommandStatus.SUCCEEDED, '{"ok": true}'))
    conn = tgp.Connection(receiver)
    conn.state, conn.version = tgp.READY, 3
    conn.receive_data(frame[:cut])
    conn.receive_data(b"")
    try:
        event = conn.next_event()
    except tgp.RemoteProtocolError as e:
        assert e.code == tgp.ErrorCode.BAD_FRAME and cut < len(frame)
        return
    assert (event is tgp.CONNECTION_CLOSED) == (cut == 0)
    assert cut == 0 or cut >= len(frame)
