"""
``gatewayctl modbus status``: each polled device as its gateway last reported
it (state, polls, gaps by reason, exceptions, the last error).

``gatewayctl modbus read``: commissioning a Modbus device. It reads a block
once and prints each register raw (decimal and hex) beside every way of
decoding it (each type, each byte and word order), so whoever maps a device
can see which type and order give sane numbers before writing the
``[[modbus]]`` table. A blocking socket is fine here: this is the command
line, not the gateway.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import struct
import sys
import time
from typing import Any

from gateway.cli.common import CommandError, note, reported_state, reports, seconds, when
from protocols import modbus
from protocols.modbus import KINDS
from protocols.modbus import Kind

ORDER_NAMES = {
    ("big", "big"): "ABCD",
    ("big", "little"): "CDAB",
    ("little", "big"): "BADC",
    ("little", "little"): "DCBA",
}


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    if not port:
        return text, 502
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise CommandError(f"{text!r}: give HOST or HOST:PORT")
    return host, int(port)


def read_once(host: str, port: int, unit: int, kind: Kind, address: int, count: int, timeout: float) -> Any:
    """One read over a new connection: a ReadResponse or an ExceptionResponse; CommandError otherwise."""
    conn = modbus.ClientConnection()
    try:
        request, data = conn.request(unit, kind, address, count)
    except ValueError as e:
        raise CommandError(str(e)) from None
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(data)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommandError(f"{host}:{port} sent no answer within {timeout:g}s (unit {unit})")
                sock.settimeout(left)
                chunk = sock.recv(modbus.MAX_ADU)
                if not chunk:
                    raise CommandError(f"{host}:{port} closed the connection without answering (unit {unit})")
                conn.receive_data(chunk)
                event = conn.next_event()
                if isinstance(event, (modbus.ReadResponse, modbus.ExceptionResponse)):
                    return event
    except TimeoutError:
        raise CommandError(f"{host}:{port} sent no answer within {timeout:g}s (unit {unit})") from None
    except OSError as e:
        raise CommandError(f"{host}:{port}: {e.strerror or e}") from None
    except modbus.ProtocolError as e:
        raise CommandError(f"{host}:{port} does not speak Modbus/TCP: {e}") from None


def decodings(address: int, registers: tuple[int, ...], types: list[str]) -> list[dict[str, Any]]:
    """For every start address in the block, each type in each order that fits: the value it gives."""
    out = []
    for i in range(len(registers)):
        for type_name in types:
            size = modbus.registers_of(type_name)
            if i + size > len(registers):
                continue
            words = registers[i : i + size]
            for (byte_order, word_order), name in ORDER_NAMES.items():
                if size == 1 and word_order == "little":
                    continue  # one register has no word order
                value = modbus.decode(words, type_name, byte_order, word_order)
                row = {"address": address + i, "type": type_name, "order": name, "value": value}
                out.append(row | ({} if size == 1 else {"word_order": word_order}))
    return out


def cmd_modbus_read(args: argparse.Namespace) -> None:
    host, port = _target(args.target)
    kind = KINDS[args.kind]
    event = read_once(host, port, args.unit, kind, args.address, args.count, args.timeout)
    if isinstance(event, modbus.ExceptionResponse):
        raise CommandError(
            f"{host}:{port} unit {args.unit} answered exception {event.code} ({event.name}) to a read of "
            f"{args.count} {args.kind} at {args.address}"
        )
    types = [args.type] if args.type else sorted(modbus.TYPES)
    rows = [] if kind.bits else decodings(args.address, event.values, types)
    if args.word_order:  # one-register types have no word order: they stay
        rows = [r for r in rows if r.get("word_order", args.word_order) == args.word_order]
    if args.json:
        raw = [{"address": args.address + i, "value": v} for i, v in enumerate(event.values)]
        json.dump({"raw": raw, "decoded": rows}, sys.stdout, indent=2)
        print()
        return
    print(f"{host}:{port} unit {args.unit}, {args.count} {args.kind} from {args.address}:")
    for i, value in enumerate(event.values):
        print(f"  {args.address + i:>5}  {value:>5}" + ("" if kind.bits else f"  0x{value:04X}"))
    if rows:
        print("decoded (address, type, order: value):")
        for row in rows:
            value = row["value"]
            text = exact_text(value, row["type"])
            print(f"  {row['address']:>5}  {row['type']:<8} {row['order']}  {text}")


def exact_text(value: Any, kind: str) -> str:
    """A decoded value as the shortest text that reads back to it: float32 to 9 digits at most, float64 to 17."""
    if not isinstance(value, float):
        return str(value)
    if kind.startswith("float32") and math.isfinite(value):
        for digits in range(6, 10):
            text = f"{value:.{digits}g}"
            if struct.unpack(">f", struct.pack(">f", float(text)))[0] == value:
                return text
    return repr(value)


def cmd_modbus_status(args: argparse.Namespace) -> None:
    rows = reports(args, "modbus_devices", "device")
    if not rows and not args.json:
        note("no polled Modbus devices: give the gateway [[modbus]] tables in its config file")
    for gateway, device, s, at, age in rows:
        state = reported_state(s, age)
        print(f"device {device}  {s['host']} unit {s['unit']} every {s['interval']:g}s  on gateway {gateway}")
        print(f"  state         {state}  (reported {when(at)})")
        print(
            f"  last read     {seconds(s['last_read_seconds'])} ago, last poll took {seconds(s['last_poll_seconds'])}"
        )
        print(
            f"  polls         {s['polls']} made, {s.get('complete_polls', 0)} complete; "
            f"{s['readings']} readings stored, {s['suppressed']} in deadband"
        )
        reasons = ", ".join(f"{n} {reason}" for reason, n in s["gaps_by_reason"].items())
        print(f"  gaps          {s['gaps']}" + (f" ({reasons})" if reasons else ""))
        if s["exceptions"]:
            print("  exceptions    " + ", ".join(f"{n} {name}" for name, n in s["exceptions"].items()))
            print(f"  last one      {s['last_exception']}")
        if s["last_error"]:
            print(f"  last error    {s['last_error']}")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    noun = sub.add_parser("modbus", parents=[common], help="polled Modbus devices; read one once (commissioning)")
    msub = noun.add_subparsers(dest="modbus_command", required=True, metavar="ACTION")
    p = msub.add_parser("status", parents=[common], help="per polled device: state, polls, gaps, exceptions")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_modbus_status)
    p = msub.add_parser("read", parents=[common], help="read registers once and print every decoding side by side")
    p.add_argument("target", metavar="HOST[:PORT]", help="the device (port 502 by default)")
    p.add_argument("--unit", type=int, default=1, help="unit (slave) id [1]")
    p.add_argument("--address", type=int, required=True, help="first register, from 0")
    p.add_argument("--count", type=int, default=2, help="registers (or bits) to read [2]")
    p.add_argument("--kind", choices=sorted(KINDS), default="holding", help="what to read [holding]")
    p.add_argument("--type", choices=sorted(modbus.TYPES), help="show this type only [all]")
    p.add_argument("--word-order", choices=modbus.ORDERS, help="show this word order only [both]")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer [3]")
    p.add_argument("--json", action="store_true", help="print raw values and decodings as JSON")
    p.set_defaults(func=cmd_modbus_read)
