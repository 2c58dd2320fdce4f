"""
protocols/teltonika.py with no reactor: Teltonika's own published example
packets (Codec 8, 8 Extended, 16, 12 and a UDP datagram) byte for byte, the
answers, the refusals, and property tests (round trips of random records in
every codec; random, cut and corrupted bytes raise nothing but ProtocolError).
"""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import teltonika as t
from protocols.sentinels import CONNECTION_CLOSED, NEED_DATA

IMEI = "356307042441013"
# Teltonika's examples (their "Codec" pages); each CRC checks.
CODEC_8 = bytes.fromhex(
    "000000000000003608010000016B40D8EA30010000000000000000000000000000000105021503010101425E0F01F10000601A014E0000"
    "000000000000010000C7CF"
)
CODEC_8E = bytes.fromhex(
    "000000000000004A8E010000016B412CEE000100000000000000000000000000000000010005000100010100010011001D00010010015E"
    "2C880002000B000000003544C87A000E000000001DD7E06A00000100002994"
)
CODEC_16 = bytes.fromhex(
    "000000000000005F10020000016BDBC7833000000000000000000000000000000000000B05040200010000030002000B00270042563A00"
    "000000016BDBC7871800000000000000000000000000000000000B05040200010000030002000B00260042563A00000200005FB3"
)
GETINFO = bytes.fromhex("000000000000000F0C010500000007676574696E666F0100004312")
GETINFO_ANSWER = bytes.fromhex(
    "00000000000000900C010600000088494E493A323031392F372F323220373A3232205254433A323031392F372F323220373A353320525354"
    "3A32204552523A312053523A302042523A302043463A302046473A3020464C3A302054553A302F302055543A3020534D533A30204E4F4750"
    "533A303A3330204750533A31205341543A302052533A332052463A36352053463A31204D443A30010000C78F"
)
UDP = bytes.fromhex(
    "003DCAFE0105000F33353230393330383634303336353508010000016B4F815B30010000000000000000000000000000000103021503010101"
    "425DBC000001"
)


def server_reading(data: bytes) -> list:
    conn = t.ServerConnection()
    conn.receive_data(t.imei_packet(IMEI) + data)
    return [e for e in iter(conn.next_event, NEED_DATA)]


def when(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def test_the_codec_8_example_decodes_to_its_record_and_is_answered_with_its_count():
    imei, avl = server_reading(CODEC_8)
    assert imei == t.Imei(IMEI)
    assert avl.codec == t.CODEC_8 and avl.raw == CODEC_8 and len(avl.records) == 1
    record = avl.records[0]
    assert when(record.timestamp_ms) == "2019-06-10 10:04:46"
    assert record.io == ((21, 3), (1, 1), (66, 24079), (241, 24602), (78, 0))
    assert record.priority == 1 and not record.gps.fixed
    assert t.ServerConnection.ack(len(avl.records)) == bytes.fromhex("00000001")
    assert t.ServerConnection.accept(True) == b"\x01" and t.ServerConnection.accept(False) == b"\x00"


def test_the_codec_8_extended_and_16_examples_decode():
    _, extended = server_reading(CODEC_8E)
    (record,) = extended.records
    assert extended.codec == t.CODEC_8E and when(record.timestamp_ms) == "2019-06-10 11:36:32"
    assert dict(record.io) == {1: 1, 17: 29, 16: 22949000, 11: 893700218, 14: 500686954}
    _, generation = server_reading(CODEC_16)
    assert generation.codec == t.CODEC_16 and len(generation.records) == 2
    assert [r.generation for r in generation.records] == [5, 5] and generation.records[0].event_io == 11
    assert dict(generation.records[0].io) == {1: 0, 3: 0, 11: 39, 66: 22074}


def test_codec_12_commands_and_answers_are_framed_as_the_example():
    assert t.ServerConnection.command("getinfo") == GETINFO
    device = t.DeviceConnection()
    device.receive_data(b"\x01" + GETINFO)
    assert device.next_event() == t.Accepted(True)
    assert device.next_event() == t.CommandRequest("getinfo")
    assert t.codec12(t.RESPONSE, "ok") == t.codec12(t.RESPONSE, "ok")
    (_, answer) = server_reading(GETINFO_ANSWER)
    assert isinstance(answer, t.CommandResponse) and answer.text.startswith("INI:2019/7/22 7:22 RTC:")


def test_the_udp_example_decodes_and_is_answered_with_its_ids():
    packet = t.decode_datagram(UDP)
    assert (packet.packet_id, packet.avl_packet_id, packet.imei) == (0xCAFE, 5, "352093086403655")
    assert packet.codec == t.CODEC_8 and dict(packet.records[0].io) == {21: 3, 1: 1, 66: 23996}
    assert t.udp_ack(packet.packet_id, packet.avl_packet_id, 1) == bytes.fromhex("0005CAFE010501")
    again = t.encode_datagram(0xCAFE, 5, packet.imei, packet.codec, list(packet.records))
    assert t.decode_datagram(again) == packet
    assert t.decode_udp_ack(bytes.fromhex("0005CAFE010501")) == (0xCAFE, 5, 1)  # the tracker's reading of it


@given(st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 255))
def test_udp_answers_round_trip(packet_id, avl_packet_id, accepted):
    assert t.decode_udp_ack(t.udp_ack(packet_id, avl_packet_id, accepted)) == (packet_id, avl_packet_id, accepted)


@given(st.binary(max_size=12))
def test_a_udp_answer_of_random_bytes_raises_only_protocol_errors(data):
    try:
        t.decode_udp_ack(data)
    except t.ProtocolError:
        assert data[:2] != b"\x00\x05" or len(data) != 7


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda p: p[:-1] + bytes([p[-1] ^ 1]), "CRC"),
        (lambda p: _with_data(p, lambda d: d[:-1] + b"\x02"), "record counts differ"),
        (lambda p: _with_data(p, lambda d: b"\x09" + d[1:]), "codec 0x09"),
        (lambda p: _with_data(p, lambda d: d[:-6] + d[-5:]), "ends inside a record"),
    ],
)
def test_a_packet_with_a_bad_crc_count_or_codec_is_not_answered_but_kept(change, reason):
    conn = t.ServerConnection()
    conn.receive_data(t.imei_packet(IMEI) + change(CODEC_8) + CODEC_8)
    conn.next_event()
    bad = conn.next_event()
    assert isinstance(bad, t.BadPacket) and reason in bad.reason and bad.raw
    assert isinstance(conn.next_event(), t.AvlData)  # the connection goes on with the next packet


def _with_data(packet: bytes, change) -> bytes:
    data = change(packet[8:-4])
    return (0).to_bytes(4, "big") + len(data).to_bytes(4, "big") + data + t.crc16_ibm(data).to_bytes(4, "big")


@pytest.mark.parametrize(
    "data,words",
    [
        (t.imei_packet("35630704244101X"), "not 15 digits"),
        ((16).to_bytes(2, "big") + b"3563070424410131", "15 digits"),
        (t.imei_packet(IMEI) + b"\x00\x00\x00\x01" + CODEC_8[4:], "four zero bytes"),
        (t.imei_packet(IMEI) + b"\x00\x00\x00\x00\x00\x10\x00\x01", "the limit is"),
    ],
)
def test_what_cannot_be_framed_is_a_protocol_error(data, words):
    conn = t.ServerConnection(max_packet=4096)
    conn.receive_data(data)
    with pytest.raises(t.ProtocolError, match=words):
        while conn.next_event() is not NEED_DATA:
            pass


def test_a_connection_closed_inside_a_packet_is_a_protocol_error_and_between_packets_is_not():
    conn = t.ServerConnection()
    conn.receive_data(t.imei_packet(IMEI) + CODEC_8)
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), t.Imei) and isinstance(conn.next_event(), t.AvlData)
    assert conn.next_event() is CONNECTION_CLOSED
    cut = t.ServerConnection()
    cut.receive_data(t.imei_packet(IMEI) + CODEC_8[:20])
    cut.receive_data(b"")
    cut.next_event()
    with pytest.raises(t.ProtocolError, match="middle of a packet"):
        cut.next_event()


# -- properties ------------------------------------------------------------------------------------------

longitudes = st.integers(-1_800_000_000, 1_800_000_000).map(lambda n: n / 1e7)
latitudes = st.integers(-900_000_000, 900_000_000).map(lambda n: n / 1e7)


@st.composite
def records(draw, codec: int) -> t.Record:
    id_max = 0xFF if codec == t.CODEC_8 else 0xFFFF
    values = st.integers(0, 2**64 - 1)
    if codec == t.CODEC_8E:
        values = values | st.binary(max_size=20)
    io = draw(st.lists(st.tuples(st.integers(0, id_max), values), max_size=12))
    # The encoder groups values by size (1, 2, 4, 8 bytes, then variable): the decoder gives them back so.
    size = lambda v: 9 if isinstance(v, bytes) else t._size_of(v)  # noqa: E731
    io.sort(key=lambda item: size(item[1]))
    gps = t.Gps(
        draw(longitudes), draw(latitudes), draw(st.integers(-32768, 32767)),
        draw(st.integers(0, 360)), draw(st.integers(0, 255)), draw(st.integers(0, 0xFFFF)),
    )  # fmt: skip
    return t.Record(
        draw(st.integers(0, 2**62)), draw(st.integers(0, 2)), gps, draw(st.integers(0, id_max)), tuple(io),
        draw(st.integers(0, 255)) if codec == t.CODEC_16 else None,
    )  # fmt: skip


@given(
    st.sampled_from(t.AVL_CODECS).flatmap(lambda c: st.tuples(st.just(c), st.lists(records(c), min_size=1, max_size=5)))
)
def test_records_round_trip_in_every_codec(case):
    codec, recs = case
    (_, avl) = server_reading(t.avl_packet(codec, recs))
    assert avl.codec == codec and avl.records == tuple(recs)
    assert t.decode_datagram(t.encode_datagram(7, 9, IMEI, codec, recs)).records == tuple(recs)


@given(st.binary(max_size=400), st.booleans())
def test_random_bytes_raise_only_protocol_errors(data, after_imei):
    conn = t.ServerConnection()
    conn.receive_data((t.imei_packet(IMEI) if after_imei else b"") + data)
    conn.receive_data(b"")
    try:
        while conn.next_event() not in (NEED_DATA, CONNECTION_CLOSED):
            pass
    except t.ProtocolError:
        pass


@given(st.integers(0, len(CODEC_16)), st.integers(0, len(CODEC_16) * 8 - 1))
def test_cut_or_flipped_packets_are_refused_never_taken_wrong(cut, bit):
    flipped = bytearray(CODEC_16)
    flipped[bit // 8] ^= 1 << (bit % 8)
    for data in (CODEC_16[:cut], bytes(flipped)):
        conn = t.ServerConnection()
        conn.receive_data(t.imei_packet(IMEI) + data)
        conn.receive_data(b"")
        conn.next_event()
        try:
            event = conn.next_event()
        except t.ProtocolError:
            continue
        if data == CODEC_16:
            assert isinstance(event, t.AvlData)
        else:
            assert isinstance(event, t.BadPacket) or event is NEED_DATA or event is CONNECTION_CLOSED, event


@given(st.binary(max_size=200))
def test_random_datagrams_raise_only_protocol_or_value_errors(data):
    try:
        t.decode_datagram(data)
    except (t.ProtocolError, ValueError):
        pass
