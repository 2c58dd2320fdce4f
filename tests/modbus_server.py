"""
Modbus/TCP slaves for the tests, run as a process of their own:

    python -m tests.modbus_server SPEC.json

SPEC names servers, each listening on 127.0.0.1 on a port of its own (port
0: the system picks), with units and their registers, and what goes wrong:

    {"servers": {"NAME": {"units": {"1": {"holding": {"0": 123}, "input": {}, "coil": {}, "discrete": {},
                                          "bad": ["input:10"]}},
                          "silent": false, "close_after": null}}}

``bad``: reads starting at those addresses are answered "illegal data
address"; ``silent``: requests are read and never answered; ``close_after``:
the connection is closed after that many answers. An address not given
reads as 0. Once listening it prints {"NAME": port, ...} on one line.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import protocol, reactor

from protocols import modbus
from protocols.sentinels import NEED_DATA


class Slave(protocol.Protocol):
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.codec = modbus.ServerConnection()
        self.answered = 0

    def dataReceived(self, data: bytes) -> None:
        self.codec.receive_data(data)
        while True:
            try:
                event = self.codec.next_event()
            except modbus.ProtocolError:
                self.transport.loseConnection()
                return
            if event is NEED_DATA:
                return
            if not self.spec.get("silent"):
                self.answer(event)

    def answer(self, event: Any) -> None:
        if isinstance(event, modbus.ReadRequest):
            event = self.read(event)
        self.transport.write(modbus.encode_response(event))
        self.answered += 1
        if self.spec.get("close_after") and self.answered >= self.spec["close_after"]:
            self.transport.loseConnection()

    def read(self, r: modbus.ReadRequest) -> modbus.ReadResponse | modbus.ExceptionResponse:
        unit = self.spec["units"].get(str(r.unit))
        kind = r.kind.name.lower()
        if unit is None or f"{kind}:{r.address}" in unit.get("bad", ()):
            return modbus.ExceptionResponse(r.transaction, r.unit, r.kind, modbus.ExceptionCode.ILLEGAL_DATA_ADDRESS)
        table = unit.get(kind, {})
        values = tuple(int(table.get(str(a), 0)) for a in range(r.address, r.address + r.count))
        return modbus.ReadResponse(r.transaction, r.unit, r.kind, values)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    ports = {}
    for name, server in spec["servers"].items():
        factory = protocol.Factory.forProtocol(lambda server=server: Slave(server))
        factory.noisy = False
        port = reactor.listenTCP(server.get("port", 0), factory, interface="127.0.0.1")
        ports[name] = port.getHost().port
    print(json.dumps(ports), flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
