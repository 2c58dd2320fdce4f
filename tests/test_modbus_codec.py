"""
protocols/modbus.py with no reactor: the examples of the MODBUS Application
Protocol Specification V1.1b3 byte for byte, the MBAP framing, both ends,
values of every type in every byte and word order, and property tests (any
split of the stream, random bytes, truncation) that raise only ProtocolError.
"""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import modbus
from protocols.modbus import (
    NEED_DATA,
    ClientConnection,
    ExceptionCode,
    ExceptionResponse,
    Kind,
    Late,
    ProtocolError,
    ReadRequest,
    ReadResponse,
    ServerConnection,
)


def mbap(transaction: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", transaction, 0, len(pdu) + 1, unit) + pdu


def answer(client: ClientConnection, data: bytes):
    client.receive_data(data)
    return client.next_event()


# The specification's examples (6.1-6.4 and 7): request PDU, response PDU, the values they carry.
SPEC = [
    (Kind.COIL, 0x13, 19, "01 00 13 00 13", "01 03 CD 6B 05",
     [1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 1]),
    (Kind.DISCRETE, 0xC4, 22, "02 00 C4 00 16", "02 03 AC DB 35",
     [0, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 0, 1, 1]),
    (Kind.HOLDING, 0x6B, 3, "03 00 6B 00 03", "03 06 02 2B 00 00 00 64", [555, 0, 100]),
    (Kind.INPUT, 0x08, 1, "04 00 08 00 01", "04 02 00 0A", [10]),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "address", "count", "request_pdu", "response_pdu", "values"), SPEC)
def test_the_specifications_examples_byte_for_byte(kind, address, count, request_pdu, response_pdu, values):
    client = ClientConnection()
    request, data = client.request(17, kind, address, count)
    assert data == mbap(request.transaction, 17, bytes.fromhex(request_pdu))
    response = answer(client, mbap(request.transaction, 17, bytes.fromhex(response_pdu)))
    assert response == ReadResponse(request.transaction, 17, kind, tuple(values))
    # and the other end reads the request and writes the same response
    server = ServerConnection()
    server.receive_data(data)
    assert server.next_event() == request
    assert modbus.encode_response(response) == mbap(request.transaction, 17, bytes.fromhex(response_pdu))


def test_the_specifications_exception_example():
    """7: reading a coil that does not exist: function 0x81, exception code 02."""
    client = ClientConnection()
    request, data = client.request(1, Kind.COIL, 0x04A1, 1)
    assert data[7:] == bytes.fromhex("01 04 A1 00 01")
    event = answer(client, mbap(request.transaction, 1, bytes.fromhex("81 02")))
    assert event == ExceptionResponse(request.transaction, 1, Kind.COIL, ExceptionCode.ILLEGAL_DATA_ADDRESS)
    assert event.name == "illegal_data_address"
    assert ExceptionResponse(1, 1, 3, 0x42).name == "exception_0x42"


def test_responses_are_matched_by_transaction_in_any_order_and_late_ones_are_said_so():
    client = ClientConnection()
    first, _ = client.request(1, Kind.HOLDING, 0, 1)
    second, _ = client.request(2, Kind.HOLDING, 10, 1)
    assert first.transaction != second.transaction and client.in_flight == 2
    client.receive_data(mbap(second.transaction, 2, bytes.fromhex("03 02 00 07")))
    client.receive_data(mbap(first.transaction, 1, bytes.fromhex("03 02 00 05")))
    assert client.next_event() == ReadResponse(second.transaction, 2, Kind.HOLDING, (7,))
    assert client.next_event() == ReadResponse(first.transaction, 1, Kind.HOLDING, (5,))
    assert client.next_event() is NEED_DATA
    third, _ = client.request(1, Kind.INPUT, 0, 1)
    client.forget(third.transaction)  # timed out
    assert answer(client, mbap(third.transaction, 1, bytes.fromhex("04 02 00 01"))) == Late(third.transaction, 1)


def test_transaction_ids_wrap_and_skip_those_in_flight():
    client = ClientConnection()
    held, _ = client.request(1, Kind.HOLDING, 0, 1)
    seen = set()
    for _ in range(70_000):  # past 65,535: the ids wrap
        request, _ = client.request(1, Kind.HOLDING, 0, 1)
        seen.add(request.transaction)
        client.forget(request.transaction)
    assert held.transaction not in seen and len(seen) == 65_535 and client.in_flight == 1


@pytest.mark.parametrize(
    ("pdu", "message"),
    [
        ("03 04 00 01 00 02", "4 data bytes (byte count 4) for 1 holding items; expected 2"),
        ("03 02 00", "1 data bytes"),
        ("04 02 00 01", "function 0x04 answers 0x03"),
        ("83 02 00", "an exception response of 3 bytes"),
    ],
)
def test_a_response_that_does_not_fit_its_request_is_a_protocol_error(pdu, message):
    client = ClientConnection()
    request, _ = client.request(1, Kind.HOLDING, 0, 1)
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        answer(client, mbap(request.transaction, 1, bytes.fromhex(pdu)))


def test_a_response_from_another_unit_or_not_modbus_at_all_is_a_protocol_error():
    client = ClientConnection()
    request, _ = client.request(1, Kind.HOLDING, 0, 1)
    with pytest.raises(ProtocolError, match="unit 2 answers a request to unit 1"):
        answer(client, mbap(request.transaction, 2, bytes.fromhex("03 02 00 01")))
    with pytest.raises(ProtocolError, match="protocol id 21584"):
        answer(ClientConnection(), b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(ProtocolError, match="an MBAP length of 1000"):
        answer(ClientConnection(), struct.pack(">HHHB", 1, 0, 1000, 1))


@pytest.mark.parametrize(
    ("kind", "address", "count", "message"),
    [
        (Kind.HOLDING, 0, 126, "1 to 125 items, not 126"),
        (Kind.COIL, 0, 2001, "1 to 2000 items, not 2001"),
        (Kind.INPUT, 0, 0, "not 0"),
        (Kind.HOLDING, 65535, 2, "addresses 65535..65536 are outside 0..65535"),
    ],
)
def test_reads_modbus_cannot_carry_are_refused_before_sending(kind, address, count, message):
    with pytest.raises(ValueError, match=message):
        ClientConnection().request(1, kind, address, count)


def test_the_server_answers_bad_requests_with_exceptions():
    server = ServerConnection()
    server.receive_data(mbap(5, 1, bytes.fromhex("06 00 01 00 03")))  # write single register: not served
    assert server.next_event() == ExceptionResponse(5, 1, 6, ExceptionCode.ILLEGAL_FUNCTION)
    server.receive_data(mbap(6, 1, bytes.fromhex("03 00 00 00 7E")))  # 126 registers
    assert server.next_event() == ExceptionResponse(6, 1, 3, ExceptionCode.ILLEGAL_DATA_VALUE)
    server.receive_data(mbap(7, 1, bytes.fromhex("03 FF FF 00 02")))
    assert server.next_event() == ExceptionResponse(7, 1, 3, ExceptionCode.ILLEGAL_DATA_ADDRESS)
    assert modbus.encode_response(ExceptionResponse(7, 1, 3, 2)) == mbap(7, 1, bytes.fromhex("83 02"))


# -- values ------------------------------------------------------------------------

# 123456.789 as float32 is 0x47F12065: registers 0x47F1 0x2065 in the standard order (ABCD).
FLOAT_ORDERS = [
    ("big", "big", (0x47F1, 0x2065)),  # ABCD
    ("big", "little", (0x2065, 0x47F1)),  # CDAB: word-swapped, as many power meters send it
    ("little", "big", (0xF147, 0x6520)),  # BADC
    ("little", "little", (0x6520, 0xF147)),  # DCBA
]


@pytest.mark.parametrize(("byte_order", "word_order", "registers"), FLOAT_ORDERS)
def test_a_float32_in_each_byte_and_word_order(byte_order, word_order, registers):
    value = modbus.decode(registers, "float32", byte_order, word_order)
    assert value == pytest.approx(123456.789, rel=1e-7)
    assert modbus.encode(value, "float32", byte_order, word_order) == registers


def test_integers_of_every_width_and_sign():
    assert modbus.decode((0xFFFF,), "int16") == -1 and modbus.decode((0xFFFF,), "uint16") == 65535
    assert modbus.decode((0x0001, 0x0000), "uint32") == 65536
    assert modbus.decode((0x0000, 0x0001), "uint32", word_order="little") == 65536
    assert modbus.decode((0xFFFF, 0xFFFE), "int32") == -2
    assert modbus.decode((0x0000, 0x0000, 0x0000, 0x0001), "uint64") == 1
    assert modbus.decode((0x8000, 0, 0, 0), "int64") == -(2**63)
    assert modbus.decode(modbus.encode(math.pi, "float64"), "float64") == math.pi
    assert modbus.bit(0b1010, 1) == 1 and modbus.bit(0b1010, 2) == 0
    assert [modbus.registers_of(t) for t in ("int16", "float32", "float64", "bool")] == [1, 2, 4, 1]
    with pytest.raises(ValueError, match="float32 takes 2 registers, not 1"):
        modbus.decode((1,), "float32")
    with pytest.raises(ValueError, match="registers hold 0..65535"):
        modbus.decode((70000,), "uint16")
    with pytest.raises(ValueError, match="bit 16"):
        modbus.bit(1, 16)


@given(
    st.sampled_from(sorted(modbus.TYPES)),
    st.sampled_from(modbus.ORDERS),
    st.sampled_from(modbus.ORDERS),
    st.data(),
)
def test_every_register_pattern_decodes_and_encodes_back(type_name, byte_order, word_order, data):
    size = modbus.registers_of(type_name)
    registers = tuple(data.draw(st.lists(st.integers(0, 0xFFFF), min_size=size, max_size=size)))
    value = modbus.decode(registers, type_name, byte_order, word_order)
    if isinstance(value, float) and math.isnan(value):
        return  # NaN has many bit patterns; each decodes to NaN
    assert modbus.encode(value, type_name, byte_order, word_order) == registers


# -- the stream ------------------------------------------------------------------------


def reads():
    return st.tuples(st.integers(0, 255), st.sampled_from(list(Kind)), st.integers(0, 65000), st.integers(1, 125))


@given(st.lists(reads(), min_size=1, max_size=8), st.lists(st.integers(0, 2000), max_size=10), st.data())
def test_any_split_of_the_stream_gives_the_same_events(requests, cuts, data):
    client, server = ClientConnection(), ServerConnection()
    stream = b""
    expected = []
    for unit, kind, address, count in requests:
        request, wire = client.request(unit, kind, address, count)
        server.receive_data(wire)
        assert server.next_event() == request
        bits = st.integers(0, 1) if kind.bits else st.integers(0, 0xFFFF)
        values = tuple(data.draw(st.lists(bits, min_size=count, max_size=count)))
        response = ReadResponse(request.transaction, unit, kind, values)
        expected.append(response)
        stream += modbus.encode_response(response)
    got = []
    start = 0
    for cut in sorted({min(c, len(stream)) for c in cuts}) + [len(stream)]:
        client.receive_data(stream[start:cut])
        start = cut
        while (event := client.next_event()) is not NEED_DATA:
            got.append(event)
    assert got == expected and client.in_flight == 0


@given(st.binary(max_size=400), st.sampled_from(["client", "server"]))
def test_random_bytes_raise_only_protocol_errors(data, role):
    conn = ClientConnection() if role == "client" else ServerConnection()
    if role == "client":
        for transaction in range(1, 4):
            conn.request(1, Kind.HOLDING, 0, transaction)
    conn.receive_data(data)
    try:
        while conn.next_event() is not NEED_DATA:
            pass
    except ProtocolError:
        pass


@given(st.integers(0, 40))
def test_a_truncated_response_waits_for_the_rest(cut):
    client = ClientConnection()
    request, _ = client.request(1, Kind.HOLDING, 0, 3)
    wire = modbus.encode_response(ReadResponse(request.transaction, 1, Kind.HOLDING, (1, 2, 3)))
    client.receive_data(wire[:cut])
    if cut < len(wire):
        assert client.next_event() is NEED_DATA
        client.receive_data(wire[cut:])
    assert client.next_event() == ReadResponse(request.transaction, 1, Kind.HOLDING, (1, 2, 3))


def test_an_unread_request_is_an_event_once():
    server = ServerConnection()
    request = ReadRequest(9, 3, Kind.INPUT, 100, 2)
    server.receive_data(modbus.encode_request(request) * 2)
    assert [server.next_event(), server.next_event(), server.next_event()] == [request, request, NEED_DATA]


# The specification's write examples (6.5, 6.6, 6.11, 6.12): function, address, values, request PDU, response PDU.
WRITES = [
    (modbus.WRITE_COIL, 0xAC, [1], "05 00 AC FF 00", "05 00 AC FF 00"),
    (modbus.WRITE_REGISTER, 0x01, [3], "06 00 01 00 03", "06 00 01 00 03"),
    (modbus.WRITE_COILS, 0x13, [1, 0, 1, 1, 0, 0, 1, 1, 1, 0], "0F 00 13 00 0A 02 CD 01", "0F 00 13 00 0A"),
    (modbus.WRITE_REGISTERS, 0x01, [0x000A, 0x0102], "10 00 01 00 02 04 00 0A 01 02", "10 00 01 00 02"),
]  # fmt: skip


@pytest.mark.parametrize(("function", "address", "values", "request_pdu", "response_pdu"), WRITES)
def test_the_specifications_write_examples_byte_for_byte(function, address, values, request_pdu, response_pdu):
    client = ClientConnection()
    request, data = client.write(17, function, address, values)
    assert data == mbap(request.transaction, 17, bytes.fromhex(request_pdu))
    response = answer(client, mbap(request.transaction, 17, bytes.fromhex(response_pdu)))
    assert response == modbus.WriteResponse(request.transaction, 17, function, address, len(values))


@pytest.mark.parametrize(
    "pdu,message",
    [
        ("06 00 02 00 03", "echo"),  # another address
        ("06 00 01 00 04", "echo"),  # another value
        ("06 00 01 00", "4 bytes"),
        ("10 00 01 00 02", "answers"),  # a function 16 answer to a function 6 write
    ],
)
def test_a_write_answer_that_is_not_its_echo_is_a_protocol_error(pdu, message):
    client = ClientConnection()
    request, _ = client.write(1, modbus.WRITE_REGISTER, 1, [3])
    with pytest.raises(ProtocolError, match=message):
        answer(client, mbap(request.transaction, 1, bytes.fromhex(pdu)))


def test_a_write_refused_by_the_device_is_an_exception_event():
    client = ClientConnection()
    request, _ = client.write(1, modbus.WRITE_REGISTERS, 40, [1, 2])
    event = answer(client, mbap(request.transaction, 1, bytes([0x90, ExceptionCode.ILLEGAL_DATA_ADDRESS])))
    assert event == ExceptionResponse(request.transaction, 1, modbus.WRITE_REGISTERS, 2)


@pytest.mark.parametrize(
    "function,address,values,message",
    [
        (modbus.WRITE_REGISTER, 0, [1, 2], "1 to 1 items"),
        (modbus.WRITE_REGISTERS, 0, [0] * 124, "1 to 123 items"),
        (modbus.WRITE_COIL, 0, [2], "bit"),
        (modbus.WRITE_REGISTER, 0, [65536], "register value"),
        (modbus.WRITE_REGISTERS, 65535, [1, 2], "outside"),
        (0x03, 0, [1], "does not write"),
    ],
)
def test_writes_modbus_cannot_carry_are_refused_before_sending(function, address, values, message):
    with pytest.raises(ValueError, match=message):
        ClientConnection().write(1, function, address, values)


@given(st.integers(0, 40))
def test_a_truncated_write_answer_waits_for_the_rest(cut):
    client = ClientConnection()
    request, _ = client.write(1, modbus.WRITE_REGISTERS, 1, [10, 258])
    whole = mbap(request.transaction, 1, bytes.fromhex("10 00 01 00 02"))
    client.receive_data(whole[:cut])
    event = client.next_event()
    if cut < len(whole):
        assert event is NEED_DATA
        client.receive_data(whole[cut:])
        event = client.next_event()
    assert isinstance(event, modbus.WriteResponse)
