"""
Modbus/TCP slaves for the tests, run as a process of their own: pymodbus's
own server (its simulator's devices), so that the gateway's codec meets
someone else's on the wire:

    python -m tests.modbus_server SPEC.json

SPEC names servers, each listening on 127.0.0.1 on a port of its own (port
0: the system picks), with units and their registers, and what goes wrong:

    {"servers": {"NAME": {"units": {"1": {"holding": {"0": 123}, "input": {}, "coil": {}, "discrete": {},
                                          "bad": ["input:10"]}},
                          "silent": false, "close_after": null}}}

Each table's addresses from 0 to its highest read as given, 0 where not
given; ``bad`` addresses are answered "illegal data address" (pymodbus's
answer for an address it does not hold). ``silent``: requests are read and
never answered (a plain socket, no Modbus at all); ``close_after``: the
connection is closed after that many answers (a byte relay in front of a
pymodbus server, counting what it relays). Once listening it prints
{"NAME": port, ...} on one line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

KINDS = ("coil", "discrete", "holding", "input")  # the order of SimDevice's separate blocks


def blocks(unit: dict[str, Any], kind: str) -> list[SimData]:
    """One kind's addresses 0..highest as runs of values, with each bad address left out of every run."""
    table = {int(a): int(v) for a, v in unit.get(kind, {}).items()}
    bad = {int(b.split(":")[1]) for b in unit.get("bad", ()) if b.split(":")[0] == kind}
    top = max([*table, *bad, 0])
    bits = kind in ("coil", "discrete")
    out, run, start = [], [], 0
    for address in range(top + 1):
        if address in bad:
            if run:
                out.append(SimData(start, values=run, datatype=DataType.BITS if bits else DataType.REGISTERS))
            run, start = [], address + 1
            continue
        value = table.get(address, 0)
        run.append(bool(value) if bits else value)
    if run:
        out.append(SimData(start, values=run, datatype=DataType.BITS if bits else DataType.REGISTERS))
    return out


def devices(spec: dict[str, Any]) -> list[SimDevice]:
    return [
        SimDevice(id=int(unit_id), simdata=tuple(blocks(unit, kind) for kind in KINDS))
        for unit_id, unit in spec["units"].items()
    ]


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await reader.read(65536):
        pass  # read, never answered
    writer.close()


def relay(upstream_port: int, close_after: int) -> Any:
    """Bytes both ways to the pymodbus server; the client's connection is closed after ``close_after`` answers."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)

        async def requests() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        forwarding = asyncio.ensure_future(requests())
        try:
            answers = 0
            while answers < close_after and (data := await up_reader.read(65536)):
                writer.write(data)
                await writer.drain()
                answers += 1  # one request at a time per connection: each read is one answer
        finally:
            forwarding.cancel()
            up_writer.close()
            writer.close()

    return serve


async def main() -> None:
    logging.disable(logging.WARNING)  # pymodbus logs each frame at debug and more at info
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    ports = {}
    for name, server in spec["servers"].items():
        port = server.get("port", 0)
        if server.get("silent"):
            listening = await asyncio.start_server(silent, "127.0.0.1", port)
        else:
            slave = ModbusTcpServer(devices(server), address=("127.0.0.1", 0 if server.get("close_after") else port))
            await slave.serve_forever(background=True)
            listening = slave.transport
            if server.get("close_after"):
                inner = listening.sockets[0].getsockname()[1]
                listening = await asyncio.start_server(relay(inner, server["close_after"]), "127.0.0.1", port)
        ports[name] = listening.sockets[0].getsockname()[1]
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main())
