"""
The worked example of a device protocol (examples/linegw, docs/protocol.rst):
a package of its own, installed beside the gateway, that the gateway finds
and takes readings through with no edit anywhere else.
"""

from __future__ import annotations

import importlib.metadata
import json
import socket
from pathlib import Path

import pytest

from gateway.config import build_config
from gateway.transport import IDeviceTransport, transports
from tests.gatewayproc import GatewayProcess, gatewayctl

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_is_a_package_of_its_own_found_as_a_plugin():
    dist = importlib.metadata.distribution("txgateway-linegw")
    files = {str(f) for f in dist.files or ()}
    assert "linegw/transport.py" in files and "twisted/plugins/linegw_transport.py" in files
    [line] = [p for p in transports() if p.name == "line"]
    assert IDeviceTransport.providedBy(line)
    module = importlib.import_module(type(line).__module__)
    assert not Path(module.__file__).resolve().is_relative_to(ROOT / "gateway")
    # Its option is the gateway's like any other: parsed and checked by the shared machinery.
    assert [spec.port for spec in build_config({"line": ["tcp:7001"]}).line] == [7001]
    with pytest.raises(Exception, match="^--line: .*notaport"):
        build_config({"line": ["tcp:notaport"]})


def converse(port: int, lines: list[bytes], answers: int) -> list[str]:
    """Send the lines on one connection; the first ``answers`` lines the gateway sends back."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"".join(lines))
        got = b""
        while got.count(b"\n") < answers:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    return got.decode().splitlines()


def test_a_gateway_takes_readings_through_the_example_protocol(workdir):
    gateway = GatewayProcess(workdir / "gateway-data", "--line", "tcp:0:interface=127.0.0.1", cwd=workdir)
    try:
        gateway.start()
        port = int(gateway.wait_for_line(r"listening for the line protocol on 127\.0\.0\.1:\d+").rsplit(":", 1)[1])
        token = gatewayctl("device", "add", "pump-7", data_dir=gateway.data_dir).stdout.strip()
        readings = [b"flow 12.5 1795000000000\n", b"pressure 3.25 1795000000000\n", b"flow 12.75 1795000001000\n"]
        assert converse(port, [b"AUTH " + token.encode() + b"\n", *readings], 4) == ["OK", "ACK 1", "ACK 2", "ACK 3"]
        # The same readings again (a device that heard no ACK): acknowledged, stored once.
        again = converse(port, [b"AUTH " + token.encode() + b"\n", readings[0], b"flow x 1\n"], 3)
        assert again[:2] == ["OK", "ACK 1"] and again[2].startswith("ERR 2 bad_line ")
        assert converse(port, [b"AUTH nope\n"], 1)[0].startswith("ERR 0 unauthorized ")
        exported = [json.loads(line) for line in gatewayctl("export", data_dir=gateway.data_dir).stdout.splitlines()]
        assert sorted((r["device"], r["metric"], r["ts"], r["value"]) for r in exported) == [
            ("pump-7", "flow", "2026-11-18T11:06:40Z", 12.5),
            ("pump-7", "flow", "2026-11-18T11:06:41Z", 12.75),
            ("pump-7", "pressure", "2026-11-18T11:06:40Z", 3.25),
        ]
        assert gateway.stop() == 0
        assert "Traceback" not in gateway.log()
    finally:
        gateway.close()
