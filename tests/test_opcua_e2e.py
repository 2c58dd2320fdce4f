"""
The gateway subscribing to a real OPC UA server: asyncua's own server, in a
process of its own (``gatewayctl simulate --protocol opcua``), into a real
PostgreSQL:

- a value of every scalar numeric type is stored with the server's source
  timestamp as its time, scale and offset applied; a text node is counted as
  not a number, a NodeId the server does not know is named as refused;
- a node that goes Bad is counted by status code and stored no more, while
  the others go on;
- the server killed and started again (on another namespace index): values
  resume without a restart of the gateway, the gap is counted;
- SignAndEncrypt (Basic256Sha256) with the gateway's own certificate, with a
  user and password or an X.509 user identity (an unknown one refused);
- a ``write`` command is written, read back, and succeeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from gateway.cli.sim_opcua import NAMESPACE, NUMERIC
from gateway.commands.model import parse_request
from gateway.config import ConfigError, build_config
from tests.conftest import log_lines, start_from_file, start_service
from tests.gatewayproc import gatewayctl, script
from tests.test_commands_modbus import finished
from tests.test_store import add_pg_device

ROOT = Path(__file__).resolve().parent.parent
PERIOD = 0.2


class Server:
    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc = proc
        self.url = url

    def control(self, order: dict) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(order) + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().startswith("done"), "the OPC UA server did not take the order"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def opcua_server(*args: str, port: int = 0, env: dict | None = None) -> Iterator[Server]:
    argv = [script("gatewayctl"), "simulate", "--protocol", "opcua", "--target", f"127.0.0.1:{port}"]
    argv += ["--period", str(PERIOD), "--control", *args]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready "), f"the OPC UA server did not start: {line!r}"
        yield Server(proc, line.split()[1])
    finally:
        proc.kill()
        proc.wait()


def node(path: str) -> str:
    return f"nsu={NAMESPACE};s={path}"


def press_table(url: str, **more) -> dict:
    nodes = [{"node": node(f"Types.{t}"), "metric": t.lower()} for t in NUMERIC]
    nodes += [
        {"node": node("Press4.Temperature"), "metric": "temperature"},
        {"node": node("Press4.Pressure"), "metric": "pressure_kpa", "scale": 100, "offset": 1},
        {"node": node("Press4.Recipe"), "metric": "recipe"},
        {"node": node("Press4.Setpoint"), "metric": "setpoint", "writable": True},
        {"node": node("Press4.Missing"), "metric": "missing"},
    ]
    return {"device": "press-4", "endpoint": url, "publishing": "200ms", "sampling": "100ms", "node": nodes, **more}


async def until(what, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not what() and time.monotonic() < deadline:
        await deferLater(reactor, 0.1, lambda: None)
    return what()


def stored(sql, metric: str) -> list[tuple]:
    return sql(
        "SELECT r.value, extract(epoch FROM r.ts)::float8 FROM readings r JOIN metrics k ON k.id = r.metric_id "
        "JOIN devices d ON d.id = r.device_id WHERE d.name = 'press-4' AND k.name = %s ORDER BY r.ts",
        (metric,),
    )


@pytest_twisted.ensureDeferred
async def test_every_type_stored_one_bad_node_never_stops_the_rest_and_a_restarted_server_resumes(
    tmp_path, db_dsn, sql
):
    add_pg_device(sql, "press-4")
    with opcua_server() as server:
        browse = [{"under": node("Press4"), "match": "Strok*", "prefix": "press_"}]
        table = press_table(server.url, backoff="200ms", browse=browse, max_items_per_subscription=4)
        svc = await start_service(tmp_path, db_dsn, {"opcua": [table]})
        try:
            source = svc.transport("opcua").sources.sources["press-4"]
            assert await until(lambda: all(len(stored(sql, t.lower())) >= 3 for t in NUMERIC)), source.status()
            for t in NUMERIC:
                values = [v for v, _ in stored(sql, t.lower())]
                if t == "Boolean":
                    assert set(values) <= {0.0, 1.0} and len(set(values)) == 2, values
                elif t in ("Float", "Double"):
                    assert all(v % 1 == 0.5 for v in values), (t, values)
                else:
                    assert all(v == int(v) for v in values), (t, values)
            # The reading's time is the server's source timestamp: within a period of now, and distinct.
            times = [ts for _, ts in stored(sql, "double")]
            assert len(set(times)) == len(times) and abs(times[-1] - time.time()) < 30
            pressure = [v for v, _ in stored(sql, "pressure_kpa")]
            assert pressure and all(round((v - 1) / 100, 3) in {1 + k / 10 for k in range(7)} for v in pressure)

            status = source.status()
            # Every node and the one the browse table found, four to a subscription as the table asks.
            assert status["state"] == "subscribed" and status["monitored"] == len(NUMERIC) + 5
            assert status["subscriptions"] == -(-(len(NUMERIC) + 6) // 4)  # the refused node had its place too
            assert stored(sql, "press_Strokes"), "the browsed node is monitored"
            assert "BadNodeIdUnknown" in status["refused"]["press-4/missing"]
            assert status["bad"]["press-4/recipe"] == {"not_a_number": 1}
            assert stored(sql, "recipe") == []

            # One node goes Bad: counted by status code, no longer stored; the others go on.
            await deferToThread(server.control, {"bad": "Press4.Temperature"})
            assert await until(lambda: "BadSensorFailure" in source.status()["bad"].get("press-4/temperature", {}))
            # The last Good value may still be on its way to its COMMIT: counted once the device's later
            # writes (which follow it, in order) are in.
            double = len(stored(sql, "double"))
            assert await until(lambda: len(stored(sql, "double")) >= double + 3)
            frozen = len(stored(sql, "temperature"))
            double = len(stored(sql, "double"))
            assert await until(lambda: len(stored(sql, "double")) >= double + 5)
            assert len(stored(sql, "temperature")) == frozen
            metrics = svc.metrics.render().decode()
            assert (
                'gateway_opcua_bad_values_total{device="press-4",metric="temperature",status="BadSensorFailure"} 1.0'
            ) in metrics
            assert 'gateway_opcua_subscribed{source="press-4"} 1.0' in metrics

            # What a user maps: gatewayctl opcua browse lists the nodes by namespace URI, with type and value.
            out = await deferToThread(gatewayctl, "opcua", "browse", server.url, "--json")
            nodes = {row["node"]: row for row in json.loads(out.stdout)}
            assert nodes[node("Types.Int16")]["type"] == "Int16" and isinstance(
                nodes[node("Types.Int16")]["value"], int
            )
            assert nodes[node("Press4.Temperature")]["status"] == "BadSensorFailure"
            text = (await deferToThread(gatewayctl, "opcua", "browse", server.url, "--node", node("Press4"))).stdout
            assert f"{node('Press4.Setpoint')}  Setpoint  Double  = " in text

            # The server goes away and comes back on the same port with another namespace index.
            port = int(server.url.rsplit(":", 1)[1].strip("/"))
            server.stop()
            assert await until(lambda: source.status()["state"] == "down", 30), source.status()
            before = len(stored(sql, "double"))
            with opcua_server("--shift", "3", port=port):
                back = time.monotonic()
                assert await until(lambda: len(stored(sql, "double")) > before + 2, 30), source.status()
                assert time.monotonic() - back < 10
            status = source.status()
            assert status["gaps_by_reason"].get("session_lost", 0) >= 1, status
            assert 'gateway_opcua_gaps_total{device="press-4",reason="session_lost"}' in svc.metrics.render().decode()
            await svc.transport("opcua").sources.reporter.write()
            out = await deferToThread(gatewayctl, "opcua", "status", "--json", "--db", db_dsn)
            assert json.loads(out.stdout)[0]["source"] == "press-4"
            text = (await deferToThread(gatewayctl, "opcua", "status", "--db", db_dsn)).stdout
            assert "source press-4" in text and "BadSensorFailure" in text and "session_lost" in text
        finally:
            await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_sign_and_encrypt_with_the_gateways_certificate_a_user_and_a_write_read_back(
    tmp_path, db_dsn, sql, monkeypatch
):
    add_pg_device(sql, "press-4")
    monkeypatch.setenv("PLC_PASSWORD", "s3cret-plc")
    monkeypatch.setenv("WRONG_PASSWORD", "guess")
    server_args = ("--security-dir", str(tmp_path / "server-pki"), "--user", "plc", "--password-env", "SIM_PW")
    with opcua_server(*server_args, env={"SIM_PW": "s3cret-plc"}) as server:
        secure = {"security": "SignAndEncrypt:Basic256Sha256", "user": "plc"}
        table = press_table(server.url, **secure, password_env="PLC_PASSWORD")
        wrong = {
            "name": "intruder", "device": "press-9", "endpoint": server.url, **secure, "password-env": "WRONG_PASSWORD",
            "node": [{"node": node("Types.Double"), "metric": "double"}],
        }  # fmt: skip
        with log_lines() as lines:
            svc = await start_service(tmp_path, db_dsn, {"opcua": [table, wrong]})
            assert await until(lambda: any("SHA-1 thumbprint" in line for line in lines), 30)
        try:
            source = svc.transport("opcua").sources.sources["press-4"]
            assert await until(lambda: len(stored(sql, "double")) >= 3), source.status()
            assert source.status()["security"] == "SignAndEncrypt:Basic256Sha256"
            assert (tmp_path / "data" / "opcua" / "client.der").exists()

            async def send(id_: str, params: dict) -> dict:
                request = parse_request({"name": "write", "params": params, "id": id_})
                await svc.commands.send("press-4", request, "plant-engineer")
                return await finished(svc, id_)

            done = await send("w1", {"metric": "setpoint", "value": 72.5})
            assert (done["state"], done["result"]) == ("succeeded", {"metric": "setpoint", "value": 72.5})
            assert await until(lambda: any(v == 72.5 for v, _ in stored(sql, "setpoint")))
            refused = await send("w2", {"metric": "temperature", "value": 1})
            assert refused["state"] == "failed" and "not a writable node" in refused["result"]["error"]
            # The same server with a wrong password: no session, the server's refusal named, the other unharmed.
            intruder = svc.transport("opcua").sources.sources["intruder"]
            assert intruder.state != "subscribed" and intruder.attempts >= 1
            assert "BadUserAccessDenied" in intruder.last_error, intruder.last_error
        finally:
            await svc.stopService()


def user_identity(folder: Path, name: str) -> tuple[Path, Path]:
    """An X.509 user identity: a self-signed RSA certificate (PEM) and its key, as a plant's PKI would issue."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest_twisted.ensureDeferred
async def test_an_x509_user_identity_opens_the_session_and_an_unknown_one_is_refused(tmp_path, db_dsn, sql):
    add_pg_device(sql, "press-4")
    operator = user_identity(tmp_path / "users", "plant-gateway")
    stranger = user_identity(tmp_path / "users", "stranger")
    server_args = ("--security-dir", str(tmp_path / "server-pki"), "--user-certificate", str(operator[0]))
    with opcua_server(*server_args) as server:
        secure = {"security": "SignAndEncrypt:Basic256Sha256"}
        table = {
            "device": "press-4", "endpoint": server.url, **secure,
            "certificate": str(operator[0]), "private-key": str(operator[1]),
            "node": [{"node": node("Types.Double"), "metric": "double"}],
        }  # fmt: skip
        wrong = {
            **table, "name": "intruder", "device": "press-9",
            "certificate": str(stranger[0]), "private-key": str(stranger[1]),
        }  # fmt: skip
        svc = await start_service(tmp_path, db_dsn, {"opcua": [table, wrong]})
        try:
            sources = svc.transport("opcua").sources.sources
            assert await until(lambda: len(stored(sql, "double")) >= 3), sources["press-4"].status()
            intruder = sources["intruder"]
            assert await until(lambda: "BadUserAccessDenied" in intruder.last_error, 30), intruder.last_error
            assert intruder.state != "subscribed"
        finally:
            await svc.stopService()


def test_a_wrong_opcua_table_stops_the_start_with_one_line():
    def error(table: dict) -> str:
        with pytest.raises(ConfigError) as e:
            build_config({"data-dir": "/tmp/x"}, {"opcua": [table]})
        return str(e.value)

    good = press_table("opc.tcp://127.0.0.1:4840")
    assert "endpoint: 'http://x' is not an opc.tcp://host:port URL" in error({**good, "endpoint": "http://x"})
    assert "security: mode 'Encrypt' is not Sign or SignAndEncrypt" in error({**good, "security": "Encrypt:Basic256"})
    assert "is not a NodeId" in error({**good, "node": [{"node": "Press4.T", "metric": "t"}]})
    assert "password-env" in error({**good, "user": "plc"})
    assert "[[opcua]] 'press-4'" in error({**good, "publishing": "0.01s"})
    assert "\n" not in error({**good, "endpoint": "http://x"})


@pytest_twisted.ensureDeferred
async def test_sighup_adds_changes_and_removes_servers(tmp_path, db_dsn, sql):
    add_pg_device(sql, "press-4")
    config = tmp_path / "gateway.toml"

    def write(*nodes: tuple[str, str]) -> None:
        lines = [f'db = "{db_dsn}"']
        if nodes:
            lines += ["[[opcua]]", 'device = "press-4"', f'endpoint = "{server.url}"', 'publishing = "200ms"']
            for path, metric in nodes:
                lines += ["[[opcua.node]]", f'node = "{node(path)}"', f'metric = "{metric}"']
        config.write_text("\n".join(lines) + "\n")

    with opcua_server() as server:
        write()
        service = await start_from_file(tmp_path, config)
        try:
            assert service.transport("opcua").sources is None
            write(("Press4.Strokes", "strokes"))
            assert await service.reload() == ["OPC UA server press-4 added"]
            assert await until(lambda: len(stored(sql, "strokes")) >= 2)
            write(("Press4.Strokes", "strokes"), ("Types.Int32", "int32"))
            assert await service.reload() == ["OPC UA server press-4 subscribed again"]
            assert await until(lambda: len(stored(sql, "int32")) >= 2)
            write()
            assert await service.reload() == ["OPC UA server press-4 removed"]
            assert service.transport("opcua").sources is None
        finally:
            await service.stopService()
