"""
gateway/transports/modbus_map.py: [[modbus]] tables checked into settings,
the reads a poll makes (contiguous runs, gaps, one request's size), and the
readings a response gives (types, orders, scale and offset).
"""

from __future__ import annotations

import pytest

from gateway.config import duration
from gateway.transports.modbus_map import (
    ModbusConfigError,
    ModbusDevice,
    Register,
    device_from_table,
    plan,
    readings_of,
)
from protocols import modbus
from protocols.modbus import Kind


def seconds(value) -> float:
    return duration(value, 0.0)  # the config's durations; the table's own bounds are checked after


def meter(*registers: Register, gap: int = 0) -> ModbusDevice:
    return ModbusDevice("meter-1", "10.0.0.5", registers, gap=gap)


def spans(device: ModbusDevice) -> list[tuple[Kind, int, int, list[str]]]:
    return [(r.kind, r.address, r.count, [x.metric for x in r.registers]) for r in plan(device)]


def test_contiguous_registers_are_read_together_and_kinds_apart():
    device = meter(
        Register("v1", 3000, type="float32"),
        Register("v2", 3002, type="float32"),
        Register("hz", 3004, type="uint16"),
        Register("temp", 10, kind=Kind.INPUT, type="int16"),
        Register("run", 5, kind=Kind.COIL),
        Register("alarm", 6, kind=Kind.COIL),
    )
    assert spans(device) == [
        (Kind.COIL, 5, 2, ["run", "alarm"]),
        (Kind.HOLDING, 3000, 5, ["v1", "v2", "hz"]),
        (Kind.INPUT, 10, 1, ["temp"]),
    ]


def test_an_unmapped_gap_is_crossed_only_as_far_as_gap_allows():
    registers = (Register("a", 100), Register("b", 103), Register("c", 110))
    assert spans(meter(*registers)) == [
        (Kind.HOLDING, 100, 1, ["a"]),
        (Kind.HOLDING, 103, 1, ["b"]),
        (Kind.HOLDING, 110, 1, ["c"]),
    ]
    assert spans(meter(*registers, gap=2)) == [(Kind.HOLDING, 100, 4, ["a", "b"]), (Kind.HOLDING, 110, 1, ["c"])]
    assert spans(meter(*registers, gap=6)) == [(Kind.HOLDING, 100, 11, ["a", "b", "c"])]


def test_a_read_never_exceeds_what_one_request_carries():
    registers = [Register(f"r{i}", i * 4, type="float64") for i in range(40)]  # 160 registers in a row
    reads = plan(meter(*registers))
    assert [(r.address, r.count) for r in reads] == [(0, 124), (124, 36)]
    assert all(r.count <= modbus.MAX_COUNT[Kind.HOLDING] for r in reads)


def test_bits_of_one_register_share_it():
    device = meter(Register("door", 7, type="bit", bit=0), Register("fan", 7, type="bit", bit=3))
    [read] = plan(device)
    assert (read.address, read.count) == (7, 1)
    assert readings_of(read, [0b1000]) == [("door", 0.0), ("fan", 1.0)]


def test_values_are_decoded_in_their_order_then_scaled():
    device = meter(
        Register("v1", 0, type="float32", word_order="little"),
        Register("energy", 2, type="uint32", scale=0.01),
        Register("temp", 4, type="int16", scale=0.1, offset=-40),
    )
    [read] = plan(device)
    values = [*modbus.encode(230.5, "float32", word_order="little"), *modbus.encode(123456, "uint32"), 650]
    assert readings_of(read, values) == [("v1", 230.5), ("energy", 1234.56), ("temp", pytest.approx(25.0))]


# -- the config file ----------------------------------------------------------------------


TABLE = {
    "device": "meter-1",
    "host": "10.0.0.5",
    "unit": 3,
    "interval": "2s",
    "timeout": 0.5,
    "word_order": "little",
    "register": [
        {"address": 3000, "type": "float32", "metric": "voltage_l1"},
        {"address": 3020, "type": "float32", "metric": "current_l1", "word_order": "big", "scale": 0.001},
        {"address": 1, "kind": "coil", "metric": "breaker_closed"},
        {"address": 40, "type": "bit", "bit": 2, "metric": "alarm"},
        {"address": 50, "metric": "freq", "scale": 0.01, "deadband": 0.05, "heartbeat": "5m"},
    ],
}


def test_a_table_with_every_key():
    d = device_from_table(TABLE, 0, seconds)
    assert (d.device, d.host, d.port, d.unit, d.interval, d.timeout) == ("meter-1", "10.0.0.5", 502, 3, 2.0, 0.5)
    v, i, breaker, alarm, freq = d.registers
    assert (v.type, v.word_order, i.word_order, i.scale) == ("float32", "little", "big", 0.001)
    assert (breaker.kind, breaker.type, alarm.bit) == (Kind.COIL, "bool", 2)
    assert (freq.type, freq.deadband, freq.heartbeat) == ("uint16", 0.05, 300.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"device": "bad name"}, "[[modbus]] 'bad name': device: the name of a registered device"),
        ({"colour": "red"}, "[[modbus]] 'meter-1': unknown key 'colour'"),
        ({"port": 70000}, "port: 70000 is outside 1..65535"),
        ({"timeout": 3}, "timeout: 3s is not shorter than the interval (2s)"),
        ({"interval": "soon"}, "interval: "),
        ({"timeout": 0.01}, "timeout: at least 0.05 seconds"),
        ({"register": []}, "register: give the registers to read as [[modbus.register]] tables"),
        ({"word_order": "middle"}, "word-order: 'middle' is not big or little"),
    ],
)
def test_device_mistakes_name_the_table_and_the_key(change, message):
    with pytest.raises(ModbusConfigError) as e:
        device_from_table({**TABLE, **change}, 0, seconds)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("register", "message"),
    [
        ({"address": 1, "metric": "x", "type": "float16"}, "register #1 (x): type: 'float16' is not one of"),
        ({"metric": "x"}, "register #1 (x): address: missing"),
        ({"address": 65535, "metric": "x", "type": "float32"}, "a float32 at 65535 runs past register 65535"),
        ({"address": 1, "metric": "x", "kind": "coil", "type": "int16"}, 'a coil is one bit: give type = "bool"'),
        ({"address": 1, "metric": "x", "type": "bit"}, "bit: None is not a whole number"),
        ({"address": 1, "metric": "x", "bit": 3}, 'bit: goes with type = "bit"'),
        ({"address": 1, "metric": "x", "heartbeat": 60}, "heartbeat: goes with deadband"),
        ({"address": 1, "metric": "x", "kind": "output"}, "kind: 'output' is not one of holding, input"),
        ({"address": 1, "metric": "x y"}, "register #1 (x y): metric: must be"),
        ({"address": 1, "metric": "x", "kind": "input", "writable": True}, "input registers are read-only"),
        ({"address": 1, "metric": "x", "kind": "discrete", "writable": True}, "discrete inputs are read-only"),
        ({"address": 1, "metric": "x", "type": "bit", "bit": 2, "writable": True}, "cannot be written alone"),
        ({"address": 1, "metric": "x", "writable": "yes"}, "writable: give true or false"),
        ({"address": 1, "metric": "x", "write-function": 16}, "write-function: goes with writable = true"),
        ({"address": 1, "metric": "x", "writable": True, "write-function": 5}, "is not 6 or 16 for a holding"),
        ({"address": 1, "metric": "x", "type": "int32", "writable": True, "write-function": 6}, "int32 takes 2"),
        ({"address": 1, "metric": "x", "writable": True, "scale": 0}, "scale cannot be 0"),
    ],
)
def test_register_mistakes_name_the_register_and_the_key(register, message):
    with pytest.raises(ModbusConfigError) as e:
        device_from_table({**TABLE, "register": [register]}, 0, seconds)
    assert message in str(e.value) and str(e.value).startswith("[[modbus]] 'meter-1' register #1")


def test_one_metric_from_two_registers_is_refused():
    twice = [{"address": 1, "metric": "x"}, {"address": 2, "metric": "x"}]
    with pytest.raises(ModbusConfigError, match="metric 'x' is read from two registers"):
        device_from_table({**TABLE, "register": twice}, 0, seconds)


@pytest.mark.parametrize(
    "register,value,items",
    [
        (Register("sp", 0, scale=0.1, writable=True), 21.5, (215,)),
        (Register("sp", 0, offset=-40.0, writable=True), 0.0, (40,)),
        (Register("t", 0, type="int16", writable=True), -2.0, (0xFFFE,)),
        (Register("t", 0, type="int32", word_order="little", writable=True), 70000.0, (70000 & 0xFFFF, 1)),
        (Register("f", 0, type="float32", writable=True), 3.25, (0x4050, 0)),
        (Register("c", 0, kind=Kind.COIL, type="bool", writable=True), 1.0, (1,)),
    ],
)
def test_a_written_value_is_encoded_as_a_read_decodes_it(register, value, items):
    assert register.items_for(value) == items
    assert register.value(items) == pytest.approx(value)


@pytest.mark.parametrize(
    "register,value,message",
    [
        (Register("sp", 0, writable=True), 65536.0, "outside 0..65535"),
        (Register("sp", 0, type="int16", writable=True), -40000.0, "outside -32768..32767"),
        (Register("sp", 0, scale=0.1, writable=True), 21.55, "not whole"),
        (Register("c", 0, kind=Kind.COIL, type="bool", writable=True), 2.0, "not 0 or 1"),
    ],
)
def test_a_value_the_register_cannot_hold_is_refused(register, value, message):
    with pytest.raises(ValueError, match=message):
        register.items_for(value)


def test_the_write_function_follows_the_register_unless_given():
    assert Register("a", 0, writable=True).function == modbus.WRITE_REGISTER
    assert Register("a", 0, type="float32", writable=True).function == modbus.WRITE_REGISTERS
    assert Register("a", 0, kind=Kind.COIL, type="bool", writable=True).function == modbus.WRITE_COIL
    assert Register("a", 0, writable=True, write_function=modbus.WRITE_REGISTERS).function == modbus.WRITE_REGISTERS
