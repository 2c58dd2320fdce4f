"""
The gateway polling real Modbus/TCP slaves (pymodbus's own server, run by
``tests/modbus_server.py`` in a process of its own on 127.0.0.1) into a real
PostgreSQL, so a framing mistake the gateway's codec made on both sides
could not pass:

- registers of every type and both word orders (their values encoded by
  pymodbus, not by the gateway's codec) are stored exact after scaling;
- a unit answering "illegal data address" for one group, a slave that never
  answers and one that closes every connection after one answer: the others
  are read on time, the gaps are counted, /healthz, /metrics, the console and
  ``gatewayctl modbus status`` say so;
- ``twistd -n gateway`` killed with SIGKILL mid-poll: after the restart no
  reading is stored twice and polling goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from pymodbus.client.mixin import ModbusClientMixin
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from gateway.config import ConfigError, build_config
from gateway.ops.console import Console
from tests.conftest import log_lines, start_from_file, start_service
from tests.gatewayproc import gatewayctl
from tests.test_resilience import make_gateway, wait_until  # noqa: F401 - a fixture
from tests.test_store import add_pg_device

ROOT = Path(__file__).resolve().parent.parent
T = ModbusClientMixin.DATATYPE


def words(value, datatype, word_order="big", byte_swap=False) -> list[int]:
    registers = ModbusClientMixin.convert_to_registers(value, datatype, word_order=word_order)
    return [((r & 0xFF) << 8) | (r >> 8) for r in registers] if byte_swap else registers


# metric: (address, type, word order, byte order, the value as pymodbus encodes it)
VALUES = {
    "i16": (0, "int16", "big", "big", -1234, T.INT16),
    "u16": (1, "uint16", "big", "big", 54321, T.UINT16),
    "i32": (2, "int32", "big", "big", -123456789, T.INT32),
    "i32_cdab": (4, "int32", "little", "big", -123456789, T.INT32),
    "u32": (6, "uint32", "big", "big", 4_000_000_000, T.UINT32),
    "i64": (8, "int64", "big", "big", -1_234_567_890_123, T.INT64),
    "u64_dcba": (12, "uint64", "little", "big", 12_345_678_901_234, T.UINT64),
    "f32": (16, "float32", "big", "big", 1234.5, T.FLOAT32),
    "f32_cdab": (18, "float32", "little", "big", -0.15625, T.FLOAT32),
    "f32_badc": (20, "float32", "big", "little", 3.25, T.FLOAT32),
    "f64": (22, "float64", "big", "big", 2.718281828459045, T.FLOAT64),
    "f64_dcba": (26, "float64", "little", "big", -6.02214076e23, T.FLOAT64),
}
INTERVAL = 1.0
TIMEOUT = 0.9
POLLS = 5


def plant_registers() -> dict[str, int]:
    holding = {}
    for address, _, word_order, byte_order, value, datatype in VALUES.values():
        for i, r in enumerate(words(value, datatype, word_order, byte_swap=byte_order == "little")):
            holding[str(address + i)] = r
    holding["30"] = 2301  # volts: scaled
    holding["31"] = 0b1000  # alarm: bit 3
    return holding


def meter_table(port: int) -> dict:
    registers = [
        {"metric": m, "address": a, "type": t, "word-order": wo, "byte-order": bo}
        for m, (a, t, wo, bo, _, _) in VALUES.items()
    ]
    registers += [
        {"metric": "volts", "address": 30, "scale": 0.1, "offset": -30},
        {"metric": "alarm", "address": 31, "type": "bit", "bit": 3},
        {"metric": "flow", "address": 100, "kind": "input", "scale": 0.5},
        {"metric": "pump", "address": 5, "kind": "coil"},
        {"metric": "door", "address": 7, "kind": "discrete"},
    ]
    return modbus_table("meter", port, 1, registers)


def modbus_table(device: str, port: int, unit: int, registers: list[dict], **more) -> dict:
    return {
        "device": device,
        "host": "127.0.0.1",
        "port": port,
        "unit": unit,
        "interval": INTERVAL,
        "timeout": TIMEOUT,
        "register": registers,
        **more,
    }


SERVERS = {
    "plant": {
        "units": {
            "1": {"holding": plant_registers(), "input": {"100": 77}, "coil": {"5": 1}, "discrete": {"7": 1}},
            "2": {"holding": {"0": 5}, "bad": ["input:10"]},
        }
    },
    "silent": {"units": {"1": {}}, "silent": True},
    "closer": {"units": {"1": {"holding": {"0": 9}, "input": {"0": 10}}}, "close_after": 1},
}


@contextlib.contextmanager
def running_slaves(tmp_path: Path, servers: dict) -> Iterator[dict[str, int]]:
    """tests/modbus_server.py in a process of its own serving ``servers``; their ports by name."""
    spec = tmp_path / "slaves.json"
    spec.write_text(json.dumps({"servers": servers}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.modbus_server", str(spec)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line, "the Modbus slaves did not start"
        yield json.loads(line)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def slaves(tmp_path):
    with running_slaves(tmp_path, SERVERS) as ports:
        yield ports


def tables(ports: dict[str, int]) -> list[dict]:
    return [
        meter_table(ports["plant"]),
        modbus_table(
            "partial",
            ports["plant"],
            2,
            [{"metric": "ok", "address": 0}, {"metric": "broken", "address": 10, "kind": "input"}],
        ),
        modbus_table("dead", ports["silent"], 1, [{"metric": "x", "address": 0}]),
        modbus_table(
            "flaky", ports["closer"], 1, [{"metric": "a", "address": 0}, {"metric": "b", "address": 0, "kind": "input"}]
        ),
    ]


def toml_of(modbus: list[dict], first: str = "") -> str:
    lines = [first]
    for table in modbus:
        lines.append("[[modbus]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items() if k != "register"]
        for register in table["register"]:
            lines.append("[[modbus.register]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in register.items()]
    return "\n".join(lines) + "\n"


async def until(what, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not what() and time.monotonic() < deadline:
        await deferLater(reactor, 0.1, lambda: None)
    return what()


def good_gaps(status: dict) -> dict:
    """Gaps other than slots missed because the machine was too busy (that is load, not the slave)."""
    return {reason: n for reason, n in status["gaps_by_reason"].items() if reason != "missed"}


@pytest_twisted.ensureDeferred
async def test_polled_values_are_exact_and_one_bad_slave_never_stalls_the_others(tmp_path, db_dsn, sql, slaves):
    for name in ("meter", "partial", "dead", "flaky"):
        add_pg_device(sql, name)
    svc = await start_service(tmp_path, db_dsn, {"modbus": tables(slaves)})
    try:

        def polled() -> bool:
            s = svc.transport("modbus").poller.status()
            return all(s[d]["polls"] >= POLLS for d in ("meter", "flaky")) and all(
                s[d]["gaps"] >= POLLS for d in ("partial", "dead")
            )

        assert await until(polled), svc.transport("modbus").poller.status()
        status = svc.transport("modbus").poller.status()
        rows = sql(
            "SELECT d.name, k.name, r.value, count(*) OVER (PARTITION BY d.name, k.name) FROM readings r "
            "JOIN devices d ON d.id = r.device_id JOIN metrics k ON k.id = r.metric_id ORDER BY r.ts"
        )
        latest = {(d, m): (v, n) for d, m, v, n in rows}
        for metric, (*_, value, _) in VALUES.items():
            assert latest[("meter", metric)][0] == value, metric
        assert latest[("meter", "volts")][0] == pytest.approx(200.1)
        assert [latest[("meter", m)][0] for m in ("alarm", "flow", "pump", "door")] == [1.0, 38.5, 1.0, 1.0]

        # The good devices are read in every poll while the bad ones fail beside them.
        for device, metric in (("meter", "i16"), ("partial", "ok"), ("flaky", "a"), ("flaky", "b")):
            assert latest[(device, metric)][1] >= POLLS, (device, metric, status[device])
        assert good_gaps(status["meter"]) == {} and good_gaps(status["flaky"]) == {}, status

        # The bad group fails alone, every time; the silent slave times out.
        assert ("partial", "broken") not in latest
        assert status["partial"]["exceptions"]["illegal_data_address"] >= POLLS
        assert good_gaps(status["partial"]).keys() == {"exception"}
        assert ("dead", "x") not in latest and status["dead"]["gaps_by_reason"]["timeout"] >= POLLS

        ok, doc = await svc.health.check()
        stale = doc["modbus"]["stale"]
        assert ok and "dead" in stale and "meter" not in stale and "no answer within 0.9s" in stale["dead"]
        metrics = svc.metrics.render().decode()
        assert 'gateway_modbus_gaps_total{device="dead",reason="timeout"}' in metrics
        assert 'gateway_modbus_exceptions_total{code="2",device="partial"}' in metrics
        assert f'gateway_modbus_connected{{host="127.0.0.1:{slaves["plant"]}"}} 1.0' in metrics
        assert 'gateway_modbus_poll_seconds{device="meter"}' in metrics

        rows = {r["device"]: r for r in Console(svc).devices()}
        assert rows["meter"]["transport"] == "modbus (reading)" and rows["dead"]["transport"] == "modbus (failing)"
        await svc.transport("modbus").poller.reporter.write()
        out = await deferToThread(gatewayctl, "modbus", "status", "--json", "--db", db_dsn)
        by_device = {s["device"]: s for s in json.loads(out.stdout)}
        assert by_device["meter"]["state"] == "reading" and by_device["dead"]["gaps"] >= POLLS
        text = (await deferToThread(gatewayctl, "modbus", "status", "--db", db_dsn)).stdout
        assert "device partial  127.0.0.1:" in text and "illegal_data_address" in text
    finally:
        await svc.stopService()


def test_kill_9_mid_poll_then_no_reading_is_stored_twice(make_gateway, slaves, tmp_path):  # noqa: F811
    config = tmp_path / "gateway.toml"
    config.write_text(toml_of(tables(slaves)[:1]))
    gw = make_gateway("--config", str(config)).start()
    gatewayctl("device", "add", "meter", data_dir=gw.data_dir)

    def stored() -> tuple[int, int]:
        out = gatewayctl("export", "--device", "meter", data_dir=gw.data_dir).stdout.splitlines()
        return len(out), len({tuple(json.loads(line)[k] for k in ("metric", "ts")) for line in out})

    assert wait_until(lambda: stored()[0] >= 17 * 3, 60)
    os.kill(gw.proc.pid, signal.SIGKILL)
    gw.proc.wait()
    before = stored()[0]
    gw.start()
    assert wait_until(lambda: stored()[0] >= before + 17 * 3, 60)
    total, distinct = stored()
    assert total == distinct
    gw.stop()


@pytest_twisted.ensureDeferred
async def test_sighup_adds_changes_and_removes_polled_devices(tmp_path, db_dsn, sql, slaves):
    add_pg_device(sql, "meter")
    config = tmp_path / "gateway.toml"
    config.write_text(f'db = "{db_dsn}"\n')
    service = await start_from_file(tmp_path, config)
    meter = tables(slaves)[0]
    try:
        assert service.transport("modbus").poller is None
        config.write_text(toml_of([meter], f'db = "{db_dsn}"'))
        with log_lines() as lines:
            assert await service.reload() == ["Modbus device meter added"]
            assert await until(lambda: service.transport("modbus").poller.status()["meter"]["complete_polls"] >= 1)
        assert [line for line in lines if "factory" in line.lower()] == []  # no line per connection
        config.write_text(toml_of([{**meter, "interval": 2.0}], f'db = "{db_dsn}"'))
        assert await service.reload() == ["Modbus device meter changed"]
        assert service.transport("modbus").poller.polled["meter"].settings.interval == 2.0
        config.write_text(toml_of([{**meter, "unit": 999}], f'db = "{db_dsn}"'))
        assert await service.reload() == []  # a mistake changes nothing
        assert service.transport("modbus").poller.polled["meter"].settings.interval == 2.0
        config.write_text(f'db = "{db_dsn}"\n')
        assert await service.reload() == ["Modbus device meter removed"]
        assert service.transport("modbus").poller.polled == {} and service.transport("modbus").poller.hosts == {}
    finally:
        await service.stopService()


def test_a_mistake_in_a_modbus_table_stops_the_start_naming_it():
    table = modbus_table("meter", 502, 1, [{"metric": "power", "address": 0, "type": "float33"}])
    with pytest.raises(ConfigError, match=r"\[\[modbus\]\] 'meter' register #1 \(power\): type: 'float33'"):
        build_config({}, {"modbus": [table]})
    with pytest.raises(ConfigError, match="two tables poll this device"):
        build_config({}, {"modbus": [table | {"register": [{"metric": "a", "address": 0}]}] * 2})
