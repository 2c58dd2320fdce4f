"""
The write command to a Modbus device, end to end: the real service and
PostgreSQL polling pymodbus's own server (tests/modbus_server.py, a process
of its own); a pymodbus client reads back what the gateway wrote.
"""

from __future__ import annotations


import pytest
import pytest_twisted
from pymodbus.client import ModbusTcpClient
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from gateway.commands.model import parse_request
from tests.conftest import start_service
from tests.test_modbus_e2e import modbus_table, running_slaves
from tests.test_store import add_pg_device

SERVERS = {"plc": {"units": {"1": {"holding": {"0": 200, "1": 55}, "coil": {"3": 0, "4": 0}, "bad": ["holding:30"]}}}}
REGISTERS = [
    {"metric": "setpoint", "address": 0, "scale": 0.1, "writable": True},  # function 6
    {"metric": "temp", "address": 1},  # read-only
    {"metric": "limit", "address": 10, "type": "float32", "writable": True},  # function 16
    {"metric": "pump", "address": 3, "kind": "coil", "writable": True},  # function 5
    {"metric": "valve", "address": 4, "kind": "coil", "writable": True, "write-function": 15},
    {"metric": "nowhere", "address": 30, "writable": True},  # the slave has no register 30
]


@pytest.fixture
def plc(tmp_path):
    with running_slaves(tmp_path, SERVERS) as ports:
        yield ports["plc"]


async def finished(service, id_: str) -> dict:
    for _ in range(1500):
        command = await service.commands.ledger.find(id_)
        if command is not None and command.finished:
            return command.doc()
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"command {id_} did not finish: {await service.commands.ledger.find(id_)}")


def holding(port: int, address: int, count: int = 1) -> list[int]:
    client = ModbusTcpClient("127.0.0.1", port=port)
    try:
        client.connect()
        return list(client.read_holding_registers(address, count=count, device_id=1).registers)
    finally:
        client.close()


def coils(port: int, address: int, count: int) -> list[bool]:
    client = ModbusTcpClient("127.0.0.1", port=port)
    try:
        client.connect()
        return list(client.read_coils(address, count=count, device_id=1).bits[:count])
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_write_sets_the_register_and_succeeds_only_when_read_back(tmp_path, db_dsn, sql, plc):
    add_pg_device(sql, "press-4")
    table = modbus_table("press-4", plc, 1, REGISTERS, interval=5, timeout=2)
    service = await start_service(tmp_path, db_dsn, {"modbus": [table]})
    try:

        async def write(id_: str, metric, value, name: str = "write") -> dict:
            request = parse_request({"name": name, "params": {"metric": metric, "value": value}, "id": id_})
            await service.commands.send("press-4", request, "plant-engineer")
            return await finished(service, id_)

        done = await write("w1", "setpoint", 21.5)
        assert (done["state"], done["result"]) == ("succeeded", {"metric": "setpoint", "value": 21.5})
        assert await deferToThread(holding, plc, 0) == [215]
        done = await write("w2", "limit", 3.25)
        assert done["state"] == "succeeded" and await deferToThread(holding, plc, 10, 2) == [0x4050, 0]
        assert (await write("w3", "pump", 1))["state"] == "succeeded"
        assert (await write("w4", "valve", 1))["state"] == "succeeded"
        assert await deferToThread(coils, plc, 3, 2) == [True, True]
        assert sql("SELECT state FROM commands WHERE id = 'w1'") == [("succeeded",)]
        events = sql("SELECT state FROM command_events WHERE command_id = 'w1' ORDER BY at")
        assert [e[0] for e in events] == ["queued", "sent", "delivered", "succeeded"]

        # Refused before anything is written: the device keeps its values.
        done = await write("r1", "temp", 1)
        assert done["state"] == "failed" and "not a writable register" in done["result"]["error"]
        done = await write("r2", "setpoint", 1e9)
        assert done["state"] == "failed" and "outside 0..65535" in done["result"]["error"]
        done = await write("r3", "pump", 0.5)
        assert done["state"] == "failed" and "not 0 or 1" in done["result"]["error"]
        done = await write("r4", "setpoint", 1, name="reboot")
        assert done["state"] == "failed" and "takes write" in done["result"]["error"]
        assert await deferToThread(holding, plc, 0) == [215]
        # The device refuses: its exception is the result.
        done = await write("x1", "nowhere", 7)
        assert done["state"] == "failed" and done["result"]["exception_code"] == 2
    finally:
        await service.stopService()
