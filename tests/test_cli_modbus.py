"""
``gatewayctl modbus read`` against a Modbus/TCP device on a real socket on
127.0.0.1 (pymodbus's own server, in a process of its own):
raw registers and every decoding side by side, an exception answer, a device
that never answers, and one that is not there.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from pymodbus.client.mixin import ModbusClientMixin

from tests.gatewayproc import gatewayctl

ROOT = Path(__file__).resolve().parent.parent

# A power meter: voltage as float32 word-swapped (CDAB) at 0, energy as uint32 at 2, temperature int16 at 4,
# encoded by pymodbus (not by the gateway's codec) and served by pymodbus's own server.
T = ModbusClientMixin.DATATYPE
REGISTERS = {
    **dict(enumerate(ModbusClientMixin.convert_to_registers(230.5, T.FLOAT32, word_order="little"))),
    **dict(enumerate(ModbusClientMixin.convert_to_registers(123456, T.UINT32), start=2)),
    4: ModbusClientMixin.convert_to_registers(-12, T.INT16)[0],
}


class Device:
    """tests.modbus_server in a process: REGISTERS as unit 1's holding registers (others: exception 02), or mute."""

    def __init__(self, tmp_path, mute: bool = False) -> None:
        spec = tmp_path / f"meter-{'mute' if mute else 'on'}.json"
        unit = {"holding": {str(a): v for a, v in REGISTERS.items()}}
        spec.write_text(json.dumps({"servers": {"meter": {"units": {"1": unit}, "silent": mute}}}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.modbus_server", str(spec)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline()
        assert line, "the Modbus slave did not start"
        self.port = json.loads(line)["meter"]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def device(tmp_path):
    d = Device(tmp_path)
    yield d
    d.close()


def test_read_prints_the_registers_and_every_decoding(device):
    out = gatewayctl("modbus", "read", f"127.0.0.1:{device.port}", "--address", "0", "--count", "5", "--json")
    doc = json.loads(out.stdout)
    assert [r["value"] for r in doc["raw"]] == [REGISTERS[a] for a in range(5)]
    found = {(r["address"], r["type"], r["order"]): r["value"] for r in doc["decoded"]}
    assert found[(0, "float32", "CDAB")] == 230.5  # the meter's voltage, word-swapped
    assert found[(0, "float32", "ABCD")] != 230.5  # the wrong order gives nonsense, side by side
    assert found[(2, "uint32", "ABCD")] == 123456
    assert found[(4, "int16", "ABCD")] == -12
    text = gatewayctl("modbus", "read", f"127.0.0.1:{device.port}", "--address", "0", "--type", "float32",
                      "--word-order", "little").stdout  # fmt: skip
    assert "0  float32  CDAB  230.5" in text and "ABCD" not in text


def test_an_exception_answer_a_silent_device_and_no_device_are_one_line_each(device, tmp_path):
    out = gatewayctl("modbus", "read", f"127.0.0.1:{device.port}", "--address", "100", check=False)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"gatewayctl: 127.0.0.1:{device.port} unit 1 answered exception 2 (illegal_data_address) to a read of "
        "2 holding at 100"
    )
    mute = Device(tmp_path, mute=True)
    try:
        out = gatewayctl("modbus", "read", f"127.0.0.1:{mute.port}", "--address", "0", "--timeout", "0.5", check=False)
        assert out.returncode == 1 and "sent no answer within 0.5s (unit 1)" in out.stderr
    finally:
        mute.close()
    with socket.socket() as bound:  # bound, not listening: connections are refused, and no one else gets the port
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        out = gatewayctl("modbus", "read", f"127.0.0.1:{port}", "--address", "0", check=False)
    assert out.returncode == 1 and out.stderr.strip() == f"gatewayctl: 127.0.0.1:{port}: Connection refused"
    out = gatewayctl("modbus", "read", "127.0.0.1:1", "--address", "0", "--count", "126", check=False)
    assert "a read is of 1 to 125 items, not 126" in out.stderr


@pytest.mark.parametrize(
    "value, kind, text",
    [
        (0.1, "float64", "0.1"),
        (1234.5678901234567, "float64", "1234.5678901234567"),
        (2.0**-30, "float64", "9.313225746154785e-10"),
        (struct.unpack(">f", struct.pack(">f", 0.1))[0], "float32", "0.1"),
        (struct.unpack(">f", struct.pack(">f", 16777217.0))[0], "float32", "16777216"),
        (struct.unpack(">f", struct.pack(">f", 3.4028234e38))[0], "float32", "3.4028235e+38"),
        (81, "uint16", "81"),
    ],
)
def test_modbus_read_prints_each_value_exactly_in_the_fewest_digits(value, kind, text):
    from gateway.cli.modbus import exact_text

    assert exact_text(value, kind) == text
    if kind.startswith("float"):
        back = float(text) if kind == "float64" else struct.unpack(">f", struct.pack(">f", float(text)))[0]
        assert back == value
