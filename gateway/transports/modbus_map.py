"""
What to read from a Modbus device and how its registers become readings:
the ``[[modbus]]`` tables of the config file, checked into ``ModbusDevice``
settings; the reads a poll makes (``plan``: contiguous addresses grouped,
at most what one request carries, unmapped gaps crossed only as far as
``gap`` allows); and the readings a response gives (``readings_of``:
decoded with the register's type, byte and word order, then scaled).

Pure: no I/O, no clock. The poller (the Twisted side) drives it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.readings import NAME_RULE, is_name
from gateway.tables import checked_number, config_table
from protocols import modbus
from protocols.modbus import KINDS, Kind

TYPES = (*modbus.TYPES, "bool", "bit")
DEVICE_KEYS = {
    "device", "host", "port", "unit", "interval", "timeout", "pause", "byte-order", "word-order", "gap", "register",
}  # fmt: skip
REGISTER_KEYS = {
    "address", "kind", "type", "metric", "scale", "offset", "deadband", "heartbeat", "bit", "byte-order",
    "word-order", "writable", "write-function",
}  # fmt: skip


class ModbusConfigError(Exception):
    """A [[modbus]] table is wrong; the message names the table, the register and the key."""


@dataclass(frozen=True)
class Register:
    metric: str
    address: int
    kind: Kind = Kind.HOLDING
    type: str = "uint16"
    scale: float = 1.0
    offset: float = 0.0
    bit: int | None = None  # type "bit": which bit of the register (0: least significant)
    byte_order: str = "big"
    word_order: str = "big"
    deadband: float | None = None  # store only a change beyond this...
    heartbeat: float | None = None  # ...or when this many seconds passed since the last one stored
    writable: bool = False  # the write command may set it
    write_function: int = 0  # the function a write uses (0: 5 or 6 for one item, 15 or 16 for more)

    @property
    def width(self) -> int:
        """Items it takes: registers (holding, input) or bits (coil, discrete)."""
        return 1 if self.kind.bits else modbus.registers_of(self.type)

    @property
    def end(self) -> int:
        return self.address + self.width

    def value(self, items: Sequence[int]) -> float:
        """Its value from its own items (registers or bits), scaled."""
        if self.kind.bits or self.type == "bool":
            raw: float = 1.0 if items[0] else 0.0
        elif self.type == "bit":
            assert self.bit is not None
            raw = float(modbus.bit(items[0], self.bit))
        else:
            raw = modbus.decode(items, self.type, self.byte_order, self.word_order)
        return raw * self.scale + self.offset

    def items_for(self, value: float) -> tuple[int, ...]:
        """The items (bits or registers) that hold ``value``: scale and offset undone, encoded in its type and
        byte and word order; ValueError when the type cannot hold it."""
        raw = (value - self.offset) / self.scale
        if self.kind.bits or self.type == "bool":
            if raw not in (0.0, 1.0):
                raise ValueError(f"{self.metric} is a bit: {value!r} is {raw!r} before scaling, not 0 or 1")
            return (int(raw),)
        code = modbus.TYPES[self.type][1]
        if code in "fd":
            return modbus.encode(raw, self.type, self.byte_order, self.word_order)
        whole = round(raw)
        if abs(raw - whole) > 1e-9 * max(1.0, abs(raw)):
            raise ValueError(f"{self.metric} is a {self.type}: {value!r} is {raw!r} before scaling, not whole")
        bits = 8 * modbus.TYPES[self.type][0] * 2
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if code.islower() else (0, (1 << bits) - 1)
        if not lo <= whole <= hi:
            raise ValueError(f"{self.metric} is a {self.type}: {whole} is outside {lo}..{hi}")
        return modbus.encode(whole, self.type, self.byte_order, self.word_order)

    @property
    def function(self) -> int:
        """The function a write of it uses."""
        if self.write_function:
            return self.write_function
        if self.kind.bits:
            return modbus.WRITE_COIL
        return modbus.WRITE_REGISTER if self.width == 1 else modbus.WRITE_REGISTERS


@dataclass(frozen=True)
class ModbusDevice:
    device: str
    host: str
    registers: tuple[Register, ...]
    port: int = 502
    unit: int = 1
    interval: float = 10.0
    timeout: float = 3.0
    pause: float = 0.0  # between two requests to this device
    gap: int = 0  # unmapped registers (or bits) one read may cross


@dataclass(frozen=True)
class Read:
    """One request of a poll, and the registers whose values it brings."""

    kind: Kind
    address: int
    count: int
    registers: tuple[Register, ...]


def plan(device: ModbusDevice) -> tuple[Read, ...]:
    """The reads of one poll: by kind and address, contiguous runs joined up to one request's size."""
    reads: list[Read] = []
    for kind in Kind:
        mapped = sorted((r for r in device.registers if r.kind is kind), key=lambda r: (r.address, r.end))
        start = end = -1
        group: list[Register] = []
        for register in mapped:
            joined_end = max(end, register.end)
            if group and register.address <= end + device.gap and joined_end - start <= modbus.MAX_COUNT[kind]:
                group.append(register)
                end = joined_end
                continue
            if group:
                reads.append(Read(kind, start, end - start, tuple(group)))
            group, start, end = [register], register.address, register.end
        if group:
            reads.append(Read(kind, start, end - start, tuple(group)))
    return tuple(reads)


def readings_of(read: Read, values: Sequence[int]) -> list[tuple[str, float]]:
    """(metric, value) for every register of a read, from the values its response carried."""
    return [(r.metric, r.value(values[r.address - read.address : r.end - read.address])) for r in read.registers]


# -- the config file ---------------------------------------------------------------


def _seconds(key: str, value: Any, duration: Callable[[Any], float]) -> float:
    try:
        return duration(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key}: {e}") from None


def _order(key: str, value: Any) -> str:
    if value not in modbus.ORDERS:
        raise ValueError(f"{key}: {value!r} is not big or little")
    return str(value)


def _register(table: Any, defaults: Mapping[str, str], duration: Callable[[Any], float]) -> Register:
    if not isinstance(table, dict):
        raise ValueError("each [[modbus.register]] is a table")
    table = config_table(table, REGISTER_KEYS)
    metric = table.get("metric")
    if not is_name(metric):
        raise ValueError(f"metric: {NAME_RULE}")
    if "address" not in table:
        raise ValueError("address: missing (the register's number from 0, as the device's manual gives it)")
    address = checked_number(table["address"], "address", 0, 0xFFFF, whole=True)
    kind_name = table.get("kind", "holding")
    if kind_name not in KINDS:
        raise ValueError(f"kind: {kind_name!r} is not one of {', '.join(KINDS)}")
    kind = KINDS[kind_name]
    type_name = table.get("type", "bool" if kind.bits else "uint16")
    if type_name not in TYPES:
        raise ValueError(f"type: {type_name!r} is not one of {', '.join(TYPES)}")
    if kind.bits and type_name != "bool":
        raise ValueError(f'type: a {kind_name} is one bit: give type = "bool" (or leave type out)')
    values: dict[str, Any] = {}
    if type_name == "bit":
        values["bit"] = checked_number(table.get("bit"), "bit", 0, 15, whole=True)
    elif "bit" in table:
        raise ValueError('bit: goes with type = "bit"')
    for key in ("scale", "offset"):
        if key in table:
            values[key] = checked_number(table[key], key)
    if "deadband" in table:
        values["deadband"] = checked_number(table["deadband"], "deadband")
        if values["deadband"] < 0:
            raise ValueError("deadband: must be 0 or more")
    if "heartbeat" in table:
        if "deadband" not in table:
            raise ValueError("heartbeat: goes with deadband")
        values["heartbeat"] = _seconds("heartbeat", table["heartbeat"], duration)
    for key in ("byte-order", "word-order"):
        values[key.replace("-", "_")] = _order(key, table.get(key, defaults[key]))
    values.update(_writable(table, kind, type_name))
    if values.get("writable") and values.get("scale") == 0:
        raise ValueError("scale: a writable register's scale cannot be 0 (a value could not be turned back)")
    register = Register(metric, address, kind, type_name, **values)
    if register.end > 0x10000:
        raise ValueError(f"address: a {type_name} at {address} runs past register 65535")
    return register


def _writable(table: Mapping[str, Any], kind: Kind, type_name: str) -> dict[str, Any]:
    writable = table.get("writable", False)
    if not isinstance(writable, bool):
        raise ValueError("writable: give true or false")
    if not writable:
        if "write-function" in table:
            raise ValueError("write-function: goes with writable = true")
        return {}
    if kind not in (Kind.HOLDING, Kind.COIL):
        what = "input registers" if kind is Kind.INPUT else "discrete inputs"
        raise ValueError(f"writable: {what} are read-only in Modbus; holding registers and coils can be written")
    if type_name == "bit":
        raise ValueError("writable: a bit of a register cannot be written alone; map the whole register instead")
    out: dict[str, Any] = {"writable": True}
    if "write-function" in table:
        allowed = (
            (modbus.WRITE_COIL, modbus.WRITE_COILS) if kind.bits else (modbus.WRITE_REGISTER, modbus.WRITE_REGISTERS)
        )
        function = table["write-function"]
        if function not in allowed or isinstance(function, bool):
            raise ValueError(
                f"write-function: {function!r} is not {allowed[0]} or {allowed[1]} for a {kind.name.lower()}"
            )
        if function == modbus.WRITE_REGISTER and modbus.registers_of(type_name) > 1:
            raise ValueError(
                f"write-function: 6 writes one register; {type_name} takes {modbus.registers_of(type_name)}"
            )
        out["write_function"] = function
    return out


def device_from_table(table: Any, index: int, duration: Callable[[Any], float]) -> ModbusDevice:
    """An ``[[modbus]]`` table as settings; ModbusConfigError names the table, the register and the key."""
    if not isinstance(table, dict):
        raise ModbusConfigError(f"[[modbus]] #{index + 1}: not a table")
    label = f"[[modbus]] {table.get('device') or '#' + str(index + 1)!r}"
    where = label
    try:
        table = config_table(table, DEVICE_KEYS)
        device = table.get("device")
        if not is_name(device):
            raise ValueError(f"device: the name of a registered device ({NAME_RULE})")
        host = table.get("host")
        if not isinstance(host, str) or not host or any(c.isspace() for c in host):
            raise ValueError("host: give the device's address or host name")
        values: dict[str, Any] = {}
        if "port" in table:
            values["port"] = checked_number(table["port"], "port", 1, 65535, whole=True)
        if "unit" in table:
            values["unit"] = checked_number(table["unit"], "unit", 0, 255, whole=True)
        if "gap" in table:
            values["gap"] = checked_number(table["gap"], "gap", 0, 124, whole=True)
        for key, lo in (("interval", 0.1), ("timeout", 0.05), ("pause", 0.0)):
            if key in table:
                seconds = _seconds(key, table[key], duration)
                if seconds < lo:
                    raise ValueError(f"{key}: at least {lo:g} seconds")
                values[key] = seconds
        defaults = {key: _order(key, table.get(key, "big")) for key in ("byte-order", "word-order")}
        raw = table.get("register")
        if not isinstance(raw, list) or not raw:
            raise ValueError("register: give the registers to read as [[modbus.register]] tables")
        registers = []
        for i, entry in enumerate(raw):
            where = f"{label} register #{i + 1}" + (
                f" ({entry['metric']})" if isinstance(entry, dict) and "metric" in entry else ""
            )
            registers.append(_register(entry, defaults, duration))
        where = label
        metrics = [r.metric for r in registers]
        twice = sorted({m for m in metrics if metrics.count(m) > 1})
        if twice:
            raise ValueError(f"metric {twice[0]!r} is read from two registers")
        settings = ModbusDevice(device, host, tuple(registers), **values)
        if settings.timeout >= settings.interval:
            raise ValueError(
                f"timeout: {settings.timeout:g}s is not shorter than the interval ({settings.interval:g}s)"
            )
    except ValueError as e:
        raise ModbusConfigError(f"{where}: {e}") from None
    return settings
