"""
Sparkplug B payloads written byte by byte from the specification (Sparkplug
3.0, 6.4.1: the protobuf fields of Payload and Metric, and the protobuf
encoding's varints, fixed32/64 and length-delimited fields), with struct and
no protobuf library: the other side of the wire for the host's tests, so a
field number the gateway's schema got wrong could not pass.
"""

from __future__ import annotations

import struct
from typing import Any

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
INT_VALUE = {1, 2, 3, 5, 6, 7}  # Int8, Int16, Int32, UInt8, UInt16, UInt32 → int_value (10), a uint32
LONG_VALUE = {4, 8, 13}  # Int64, UInt64, DateTime → long_value (11), a uint64
FLOAT, DOUBLE, BOOLEAN, STRING = 9, 10, 11, 12


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def text(number: int, value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return key(number, LENGTH) + varint(len(data)) + data


def metric(
    name: str | None = None,
    alias: int | None = None,
    timestamp: int | None = None,
    datatype: int | None = None,
    value: Any = None,
    is_historical: bool = False,
    is_transient: bool = False,
    typed: bool = True,
) -> bytes:
    """A Metric; ``typed=False`` leaves its datatype to the birth (the value is still written as ``datatype``)."""
    out = b""
    if name is not None:
        out += text(1, name)
    if alias is not None:
        out += key(2, VARINT) + varint(alias)
    if timestamp is not None:
        out += key(3, VARINT) + varint(timestamp)
    if datatype is not None and typed:
        out += key(4, VARINT) + varint(datatype)
    if is_historical:
        out += key(5, VARINT) + varint(1)
    if is_transient:
        out += key(6, VARINT) + varint(1)
    if value is not None:
        if datatype in INT_VALUE:
            out += key(10, VARINT) + varint(int(value) & 0xFFFFFFFF)
        elif datatype in LONG_VALUE:
            out += key(11, VARINT) + varint(int(value) & 0xFFFFFFFFFFFFFFFF)
        elif datatype == FLOAT:
            out += key(12, FIXED32) + struct.pack("<f", value)
        elif datatype == DOUBLE:
            out += key(13, FIXED64) + struct.pack("<d", value)
        elif datatype == BOOLEAN:
            out += key(14, VARINT) + varint(1 if value else 0)
        elif datatype == STRING:
            out += text(15, value)
        else:
            raise ValueError(f"datatype {datatype} is not written here")
    return out


def payload(timestamp: int | None, seq: int | None, metrics: list[bytes]) -> bytes:
    out = key(1, VARINT) + varint(timestamp) if timestamp is not None else b""
    for m in metrics:
        out += text(2, m)
    if seq is not None:
        out += key(3, VARINT) + varint(seq)
    return out


def encode(timestamp: int | None, seq: int | None, metrics: list[dict[str, Any]]) -> bytes:
    """The edge node simulator's codec: metrics as dicts (name, alias, datatype, value, timestamp); data
    metrics (with an alias and no name) leave their datatype to the birth."""
    return payload(timestamp, seq, [metric(**m, typed=m.get("name") is not None) for m in metrics])


def _fields(data: bytes) -> list[tuple[int, Any]]:
    out, i = [], 0
    while i < len(data):
        k, i = _varint(data, i)
        number, wire = k >> 3, k & 7
        if wire == VARINT:
            value, i = _varint(data, i)
        elif wire == FIXED64:
            value, i = data[i : i + 8], i + 8
        elif wire == FIXED32:
            value, i = data[i : i + 4], i + 4
        elif wire == LENGTH:
            n, i = _varint(data, i)
            value, i = data[i : i + n], i + n
        else:
            raise ValueError(f"wire type {wire}")
        out.append((number, value))
    return out


def _varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = data[i]
        n |= (byte & 0x7F) << shift
        i += 1
        shift += 7
        if not byte & 0x80:
            return n, i


def decode(data: bytes) -> dict[str, Any]:
    """A payload as {timestamp, seq, metrics: [{name, alias, datatype, value…}]} (scalars only)."""
    doc: dict[str, Any] = {"metrics": []}
    for number, value in _fields(data):
        if number in (1, 3):
            doc["timestamp" if number == 1 else "seq"] = value
        elif number == 2:
            m: dict[str, Any] = {}
            for n, v in _fields(value):
                if n == 1:
                    m["name"] = v.decode()
                elif n in (2, 3, 4):
                    m[{2: "alias", 3: "timestamp", 4: "datatype"}[n]] = v
                elif n in (10, 11):
                    m["value"] = v
                elif n == 12:
                    m["value"] = struct.unpack("<f", v)[0]
                elif n == 13:
                    m["value"] = struct.unpack("<d", v)[0]
                elif n == 14:
                    m["value"] = bool(v)
                elif n == 15:
                    m["value"] = v.decode()
            if m.get("datatype") in (1, 2, 3) and m.get("value", 0) >= 1 << 31:
                m["value"] -= 1 << 32
            if m.get("datatype") == 4 and m.get("value", 0) >= 1 << 63:
                m["value"] -= 1 << 64
            doc["metrics"].append(m)
    return doc


def decode_command(data: bytes) -> list[tuple[str | None, Any]]:
    return [(m.get("name"), m.get("value")) for m in decode(data)["metrics"]]
