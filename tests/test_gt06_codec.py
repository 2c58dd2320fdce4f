"""
protocols/gt06.py with no reactor: Concox's own examples (a login and its
answer, a heartbeat) byte for byte, every packet the gateway reads round
tripped, refusals, and property tests (random, cut and flipped bytes raise
nothing but ProtocolError, and never read a bad packet as a good one).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import gt06
from protocols.sentinels import CONNECTION_CLOSED, NEED_DATA

# Concox, GT06 protocol v1.8: a login of terminal 0123456789012345 (serial 1), its answer, and a heartbeat.
LOGIN = bytes.fromhex("78780D01012345678901234500018CDD0D0A")
LOGIN_ANSWER = bytes.fromhex("78780501000 1D9DC0D0A".replace(" ", ""))
HEARTBEAT = bytes.fromhex("78780A134004040001000FDCEE0D0A")


def read(data: bytes) -> list:
    conn = gt06.ServerConnection()
    conn.receive_data(data)
    return list(iter(conn.next_event, NEED_DATA))


def test_concox_examples_decode_and_the_login_is_answered_as_the_example():
    login, heartbeat = read(LOGIN + HEARTBEAT)
    assert login == gt06.Login("123456789012345", 1)
    assert gt06.ServerConnection.answer(gt06.LOGIN, login.serial) == LOGIN_ANSWER
    assert heartbeat == gt06.Status(15, gt06.TerminalStatus(0x40, 4, 4, 0))
    device = gt06.DeviceConnection()
    device.receive_data(LOGIN_ANSWER)
    assert device.next_event() == gt06.Answer(gt06.LOGIN, 1)
    assert gt06.DeviceConnection.login("123456789012345", 1) == LOGIN


def test_locations_alarms_and_command_answers_round_trip():
    where = gt06.Position(1_795_341_600, 54.6872, -3.1234, 61, 275, 9, True)
    south = gt06.Position(1_795_341_601, -33.8688, 151.2093, 0, 0, 0, False)
    status = gt06.TerminalStatus(0x46, 5, 3, 0x01)
    data = gt06.DeviceConnection.location(where, 7) + gt06.DeviceConnection.alarm(south, status, 8)
    data += gt06.DeviceConnection.command_answer(0xA1B2C3D4, "RELAY:OK", 9)
    location, alarm, answer = read(data)
    assert location.serial == 7 and location.protocol == gt06.LOCATION
    got = location.position
    assert (got.time_s, got.speed, got.course, got.satellites, got.fixed) == (1_795_341_600, 61, 275, 9, True)
    assert got.latitude == pytest.approx(54.6872, abs=1e-6) and got.longitude == pytest.approx(-3.1234, abs=1e-6)
    assert alarm.status == status and alarm.position.latitude == pytest.approx(-33.8688, abs=1e-6)
    assert not alarm.position.fixed
    assert answer == gt06.CommandAnswer(9, 0xA1B2C3D4, "RELAY:OK")
    device = gt06.DeviceConnection()
    device.receive_data(gt06.ServerConnection.command("RELAY,1#", 0xA1B2C3D4, 3))
    assert device.next_event() == gt06.CommandRequest(3, 0xA1B2C3D4, "RELAY,1#")


def test_a_wrong_crc_is_a_bad_packet_and_the_stream_goes_on():
    bad = bytearray(HEARTBEAT)
    bad[-3] ^= 1
    first, second = read(bytes(bad) + HEARTBEAT)
    assert isinstance(first, gt06.BadPacket) and "CRC" in first.reason and first.raw == bytes(bad)
    assert isinstance(second, gt06.Status)


@pytest.mark.parametrize(
    "data,words",
    [
        (b"\x77\x78" + HEARTBEAT[2:], "start with 78 78"),
        (HEARTBEAT[:-1] + b"\x0b", "end with 0d 0a"),
        (b"\x78\x78\x02\x13\x00\x00\x0d\x0a", "at least a protocol"),
    ],
)
def test_what_cannot_be_framed_is_a_protocol_error(data, words):
    conn = gt06.ServerConnection()
    conn.receive_data(data)
    with pytest.raises(gt06.ProtocolError, match=words):
        conn.next_event()


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_errors(data):
    conn = gt06.ServerConnection()
    conn.receive_data(data)
    conn.receive_data(b"")
    try:
        while conn.next_event() not in (NEED_DATA, CONNECTION_CLOSED):
            pass
    except gt06.ProtocolError:
        pass


@given(st.integers(0, len(LOGIN) * 8 - 1), st.integers(0, len(LOGIN)))
def test_flipped_or_cut_packets_are_never_read_as_good_ones(bit, cut):
    flipped = bytearray(LOGIN)
    flipped[bit // 8] ^= 1 << (bit % 8)
    for data in (bytes(flipped), LOGIN[:cut]):
        conn = gt06.ServerConnection()
        conn.receive_data(data)
        conn.receive_data(b"")
        try:
            event = conn.next_event()
        except gt06.ProtocolError:
            continue
        assert event != gt06.Login("123456789012345", 1) or data == LOGIN
