"""
Sparkplug B payloads (Eclipse Sparkplug 3.0, chapter 6.4): the protobuf
message ``Payload`` with its ``Metric``s, encoded and decoded by Google's
protobuf runtime from a schema declared here field by field, as the
specification gives it. Sans-IO: bytes in, values out.

Only what a host application reads is declared: the payload's timestamp,
seq and metrics, and a metric's name, alias, timestamp, datatype, flags and
scalar value. The rest (metadata, property sets, DataSet and Template
values, extensions) are kept by protobuf as unknown fields: a metric whose
value is one of them decodes with no value.

Signed integers travel as their two's complement in the unsigned fields
(Int8, Int16 and Int32 in ``int_value``, a uint32; Int64 in ``long_value``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, EncodeError


class DataType(enum.IntEnum):
    UNKNOWN = 0
    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14
    UUID = 15
    DATASET = 16
    BYTES = 17
    FILE = 18
    TEMPLATE = 19


NUMERIC = frozenset(DataType(t) for t in range(1, 12))
_FIELD = {
    **{t: "int_value" for t in (DataType.INT8, DataType.INT16, DataType.INT32)},
    **{t: "int_value" for t in (DataType.UINT8, DataType.UINT16, DataType.UINT32)},
    DataType.INT64: "long_value",
    DataType.UINT64: "long_value",
    DataType.DATETIME: "long_value",
    DataType.FLOAT: "float_value",
    DataType.DOUBLE: "double_value",
    DataType.BOOLEAN: "boolean_value",
    DataType.STRING: "string_value",
    DataType.TEXT: "string_value",
    DataType.UUID: "string_value",
    DataType.BYTES: "bytes_value",
    DataType.FILE: "bytes_value",
}
_TYPES = {int(t): t for t in DataType}
_SIGNED = {DataType.INT8: 32, DataType.INT16: 32, DataType.INT32: 32, DataType.INT64: 64}


def _schema() -> Any:
    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="txgateway/sparkplug_b.proto", package="txgateway.sparkplug_b")
    file.syntax = "proto2"
    payload = file.message_type.add(name="Payload")
    metric = payload.nested_type.add(name="Metric")
    metric.oneof_decl.add(name="value")
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    for name, number, kind in (
        ("name", 1, F.TYPE_STRING), ("alias", 2, F.TYPE_UINT64), ("timestamp", 3, F.TYPE_UINT64),
        ("datatype", 4, F.TYPE_UINT32), ("is_historical", 5, F.TYPE_BOOL), ("is_transient", 6, F.TYPE_BOOL),
        ("is_null", 7, F.TYPE_BOOL),
    ):  # fmt: skip
        metric.field.add(name=name, number=number, type=kind, label=opt)
    for name, number, kind in (
        ("int_value", 10, F.TYPE_UINT32), ("long_value", 11, F.TYPE_UINT64), ("float_value", 12, F.TYPE_FLOAT),
        ("double_value", 13, F.TYPE_DOUBLE), ("boolean_value", 14, F.TYPE_BOOL), ("string_value", 15, F.TYPE_STRING),
        ("bytes_value", 16, F.TYPE_BYTES),
    ):  # fmt: skip
        metric.field.add(name=name, number=number, type=kind, label=opt, oneof_index=0)
    payload.field.add(name="timestamp", number=1, type=F.TYPE_UINT64, label=opt)
    payload.field.add(
        name="metrics", number=2, type=F.TYPE_MESSAGE, label=rep, type_name=".txgateway.sparkplug_b.Payload.Metric"
    )
    payload.field.add(name="seq", number=3, type=F.TYPE_UINT64, label=opt)
    payload.field.add(name="uuid", number=4, type=F.TYPE_STRING, label=opt)
    payload.field.add(name="body", number=5, type=F.TYPE_BYTES, label=opt)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("txgateway.sparkplug_b.Payload"))


_Payload = _schema()


@dataclass
class Metric:
    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None  # ms since the epoch
    datatype: DataType = DataType.UNKNOWN  # UNKNOWN in data messages that leave it to the birth
    value: Any = None  # None: no scalar value (null, or a DataSet/Template/extension)
    is_historical: bool = False
    is_transient: bool = False
    is_null: bool = False
    raw: Any = None  # the value as on the wire (the datatype may come later, from the birth)

    def typed(self, datatype: DataType) -> Any:
        """The value read as ``datatype`` (a data message's metric takes its birth's type)."""
        raw = self.raw
        if raw is None:
            return None
        bits = _SIGNED.get(datatype)
        if bits and isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1 << (bits - 1):
            return raw - (1 << bits)
        return raw


@dataclass
class Message:
    timestamp: int | None = None
    seq: int | None = None
    metrics: list[Metric] = field(default_factory=list)


def parse(data: bytes) -> Any:
    """The payload as protobuf's message (for ``numbers``); ValueError when the bytes are not one."""
    try:
        return _Payload.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ValueError(f"not a Sparkplug B payload: {e}") from None


def numbers(pb: Any, names: dict[int, str], types: dict[str, DataType]) -> tuple[list[tuple[str, int, Any]], int]:
    """
    A data message's numeric values, named and typed as its birth gave them (``names`` by alias, ``types`` by
    name): ([(name, time in ms, value)], how many metrics are not numbers, null, transient or timeless).
    KeyError for an alias or a name no birth gave. One pass, no object a metric: data messages are the stream.
    """
    out = []
    skipped = 0
    default_ts = pb.timestamp if pb.HasField("timestamp") else None
    for m in pb.metrics:
        name = m.name if m.HasField("name") else names[m.alias]
        datatype = m.datatype or types[name]
        which = m.WhichOneof("value")
        if which is None or m.is_null or m.is_transient or datatype not in NUMERIC:
            skipped += 1
            continue
        value = getattr(m, which)
        bits = _SIGNED.get(datatype)
        if bits is not None and value >= 1 << (bits - 1):
            value -= 1 << bits
        ts = m.timestamp if m.HasField("timestamp") else default_ts
        if ts is None:
            skipped += 1
            continue
        out.append((name, ts, value))
    return out, skipped


def decode(data: bytes) -> Message:
    """A payload; ValueError when the bytes are not one."""
    pb = parse(data)
    out = Message(pb.timestamp if pb.HasField("timestamp") else None, pb.seq if pb.HasField("seq") else None)
    append = out.metrics.append
    for m in pb.metrics:
        which = m.WhichOneof("value")
        datatype = _TYPES.get(m.datatype, DataType.UNKNOWN)
        raw: Any = getattr(m, which) if which is not None else None
        metric = Metric(
            m.name if m.HasField("name") else None,
            m.alias if m.HasField("alias") else None,
            m.timestamp if m.HasField("timestamp") else None,
            datatype,
            raw if datatype not in _SIGNED else None,
            m.is_historical,
            m.is_transient,
            m.is_null,
            raw,
        )
        if datatype in _SIGNED:
            metric.value = metric.typed(datatype)
        append(metric)
    return out


def encode(message: Message) -> bytes:
    """A payload's bytes; ValueError for a value its datatype cannot hold."""
    pb = _Payload()
    if message.timestamp is not None:
        pb.timestamp = message.timestamp
    if message.seq is not None:
        pb.seq = message.seq
    for metric in message.metrics:
        m = pb.metrics.add()
        if metric.name is not None:
            m.name = metric.name
        if metric.alias is not None:
            m.alias = metric.alias
        if metric.timestamp is not None:
            m.timestamp = metric.timestamp
        if metric.datatype != DataType.UNKNOWN:
            m.datatype = int(metric.datatype)
        m.is_historical, m.is_transient, m.is_null = metric.is_historical, metric.is_transient, metric.is_null
        if metric.value is None or metric.is_null:
            continue
        name = _FIELD.get(metric.datatype)
        if name is None:
            raise ValueError(f"{metric.datatype.name} values are not encoded here")
        value = metric.value
        bits = _SIGNED.get(metric.datatype)
        if bits is not None:
            value = int(value) & ((1 << bits) - 1)
        try:
            setattr(m, name, value)
        except (TypeError, ValueError, EncodeError) as e:
            raise ValueError(f"{metric.name or metric.alias}: {value!r} is not a {metric.datatype.name}: {e}") from None
    return bytes(pb.SerializeToString())
