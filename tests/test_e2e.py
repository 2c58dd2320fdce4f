"""
The gateway as a user meets it: ``twistd -n gateway`` in a subprocess with
its embedded PostgreSQL, ``gatewayctl`` and ``curl`` as in README.rst.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization

from tests.conftest import script
from tests.gatewayproc import GatewayProcess, gatewayctl, postmaster

BODY = '{"readings": [{"metric": "oil_temp", "ts": "2026-11-22T10:00:00.250Z", "value": 81.5}]}'


def curl_post(gw: GatewayProcess, token: str, body: str = BODY) -> dict:
    """README's curl command, pointed at the test's port."""
    if shutil.which("curl") is None:
        pytest.fail("curl is needed by the README's quick start and by this test: install curl")
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            gw.cert,
            f"https://localhost:{gw.port}/v1/readings",
            "-H",
            f"Authorization: Bearer {token}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)


def post(gw: GatewayProcess, token: str | None, body: str = BODY, path: str = "/v1/readings"):
    ctx = ssl.create_default_context(cafile=gw.cert)
    conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=ctx, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request("POST" if body is not None else "GET", path, body=body, headers=headers)
    response = conn.getresponse()
    result = response.status, dict(response.getheaders()), json.loads(response.read())
    conn.close()
    return result


@pytest.fixture
def gateway(workdir):
    gw = GatewayProcess(workdir / "gateway-data", cwd=workdir)
    yield gw
    gw.close()  # a test that killed the gateway leaves its database behind: close() stops it too


def test_quick_start_then_kill_9_loses_nothing(gateway):
    gateway.start()
    made = gateway.wait_for_line("SHA-256 fingerprint [0-9A-F:]{95}")
    assert "made TLS certificate" in made and "signed by the local CA" in made
    added = gatewayctl("device", "add", "truck-17", data_dir=gateway.data_dir)
    token = added.stdout.strip()
    assert added.stdout == token + "\n" and len(token) == 60  # the token alone on stdout
    assert "truck-17" in added.stderr

    assert curl_post(gateway, token) == {"accepted": 1, "duplicates": 0}
    gateway.kill()  # SIGKILL right after the 200

    gateway.start()
    assert curl_post(gateway, token) == {"accepted": 0, "duplicates": 1}

    csv_out = gatewayctl("export", "--format", "csv", data_dir=gateway.data_dir).stdout.splitlines()
    assert csv_out[0] == "device,metric,ts,value,received_at"
    assert len(csv_out) == 2
    assert csv_out[1].startswith("truck-17,oil_temp,2026-11-22T10:00:00.250Z,81.5,")
    jsonl = [json.loads(line) for line in gatewayctl("export", data_dir=gateway.data_dir).stdout.splitlines()]
    assert [(r["device"], r["metric"], r["ts"], r["value"]) for r in jsonl] == [
        ("truck-17", "oil_temp", "2026-11-22T10:00:00.250Z", 81.5)
    ]
    assert set(jsonl[0]) == {"device", "metric", "ts", "value", "received_at"}

    assert gateway.stop() == 0  # a clean stop on SIGTERM exits 0
    assert "SIGTERM: stopping" in gateway.log()
    assert "Main loop terminated." in gateway.log()
    assert "Traceback" not in gateway.log()
    assert postmaster(gateway.data_dir) is None  # the embedded database stopped with it


def test_bad_requests_get_their_errors(gateway):
    gateway.start()
    token = gatewayctl("device", "add", "truck-1", data_dir=gateway.data_dir).stdout.strip()
    status, _, body = post(gateway, token, '{"readings": [{"metric": "oil_temp", "ts": "noon", "value": 1}]}')
    assert (status, body["error"]) == (400, "invalid_reading") and body["message"].startswith("readings[0].ts")
    status, _, body = post(gateway, "0123456789abcdef." + "x" * 43)
    assert (status, body["error"]) == (401, "unauthorized")
    status, _, body = post(gateway, token, "x" * (1024 * 1024 + 1))
    assert (status, body["error"]) == (413, "body_too_large")
    status, _, body = post(gateway, None, None, "/healthz")
    assert (status, body["status"]) == (200, "ok")


def test_database_outage_is_answered_from_the_journal_then_replayed(gateway, outage_db):
    gateway.extra = ["--db", outage_db.dsn]
    gateway.start()
    token = gatewayctl("device", "add", "truck-2", "--db", outage_db.dsn).stdout.strip()
    assert post(gateway, token)[0] == 200

    outage_db.stop()

    later = BODY.replace("10:00:00.250Z", "10:00:01Z")
    status, _, body = post(gateway, token, later)  # the device is still known; its reading is journaled
    assert (status, body) == (200, {"accepted": 1, "duplicates": 0})
    # A reading that fails a quality rule (dated before --max-past) is journaled with its request, not refused.
    mixed = '{"readings": [{"metric": "oil_temp", "ts": "2010-01-01T00:00:00Z", "value": 1.5}]}'
    status, _, body = post(gateway, token, mixed)
    assert status == 200 and body["accepted"] == 0 and [q["rule"][:8] for q in body["quarantined"]] == ["max_past"]
    status, _, body = post(gateway, None, None, "/healthz")
    assert status == 503 and body["status"] == "unavailable"
    assert body["journal"]["bytes"] > 0 and body["journal"]["ok"] is True
    status, _, body = post(gateway, "0123456789abcdef." + "x" * 43, later)  # never seen: cannot be checked now
    assert (status, body["error"]) == (503, "database_unavailable")

    outage_db.start()
    deadline = time.monotonic() + 30
    while True:  # the pool reconnects with backoff (at most 5 s between tries), then the journal is replayed
        status, _, body = post(gateway, None, None, "/healthz")
        if (status == 200 and body["journal"]["bytes"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert (status, body["status"], body["database"], body["journal"]["bytes"]) == (200, "ok", "ok", 0)
    gateway.wait_for_line(r"journal: replayed \d+\.seg: 1 readings stored, 0 were stored already")
    assert post(gateway, token, later)[2] == {"accepted": 0, "duplicates": 1}
    rows = gatewayctl("export", "--db", outage_db.dsn).stdout.splitlines()
    assert len(rows) == 2
    held = gatewayctl("quarantine", "list", "--json", "--db", outage_db.dsn).stdout.splitlines()
    assert [(json.loads(line)["ts"], json.loads(line)["value"]) for line in held] == [("2010-01-01T00:00:00Z", 1.5)]


def test_gatewayctl_starts_and_stops_the_database_when_no_gateway_runs(workdir):
    data_dir = workdir / "gateway-data"
    gatewayctl("device", "add", "truck-3", data_dir=data_dir)
    listed = gatewayctl("device", "list", data_dir=data_dir).stdout.splitlines()
    assert listed[0].split() == ["NAME", "TYPE", "CREATED", "LAST", "SEEN", "STATE", "FAILURES"]
    assert listed[1].split()[0] == "truck-3" and "never" in listed[1]
    gatewayctl("device", "revoke", "truck-3", data_dir=data_dir)
    again = gatewayctl("device", "add", "truck-3", data_dir=data_dir, check=False)
    assert again.returncode == 1 and again.stderr.strip() == "gatewayctl: device 'truck-3' exists already"
    assert postmaster(data_dir) is None


@pytest.mark.parametrize(
    "protocol,extra",
    [
        ("tcp", ()),
        ("tls", ()),
        ("https", ()),
        ("mqtts", ("--mqtt-version", "5", "--qos", "1")),
        ("mqtts", ("--mqtt-version", "3.1.1", "--qos", "2")),
    ],
)
def test_simulated_devices_as_in_the_readme(gateway, protocol, extra):
    """README: gatewayctl simulate --target localhost:9000 --devices 10 --rate 1000 --duration 10"""
    gateway.start()
    ports = {
        "tcp": gateway.tgp_port,
        "tls": gateway.tgp_tls_port,
        "https": gateway.port,
        "mqtts": gateway.mqtt_tls_port,
    }
    port = ports[protocol]
    out = gatewayctl(
        "simulate",
        *extra,
        "--target",
        f"localhost:{port}",
        "--devices",
        "10",
        "--rate",
        "1000",
        "--duration",
        "1.5",
        "--protocol",
        protocol,
        "--json",
        data_dir=gateway.data_dir,
    )
    summary = json.loads(out.stdout)
    assert {"acked", "rate", "p50_ms", "p99_ms", "errors"} <= summary.keys()
    assert summary["errors"] == {} and summary["duplicates"] == 0
    assert summary["acked"] >= 1000  # 1.5 s at 1,000/s, less what is still in flight at the end
    assert "acked" in out.stderr  # the progress line
    stored = gatewayctl("export", "--format", "csv", data_dir=gateway.data_dir).stdout.count("\nsim-")
    assert stored >= summary["acked"]


def test_systemd_is_told_ready_only_when_listening_and_stopping_on_sigterm(gateway, tmp_path):
    """Type=notify: READY=1 after the ports accept; STOPPING=1 when SIGTERM arrives."""
    import socket

    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    try:
        gateway.env["NOTIFY_SOCKET"] = str(path)
        gateway.start()
        ready = sock.recv(4096).decode()
        assert ready.startswith("READY=1\n") and "listening for HTTPS" in gateway.log()
        assert post(gateway, None, None, "/livez")[0] == 200
        assert gateway.stop() == 0
        assert sock.recv(4096).decode() == "STOPPING=1"
    finally:
        sock.close()


def test_mosquitto_pub_as_in_the_readme_stores_a_reading_once_however_often_sent(gateway):
    """docs/transports/mqtt.rst: mosquitto_pub -p 8883 --cafile … -u truck-17 -P "$TOKEN" -q 1 -t … -m …"""
    if shutil.which("mosquitto_pub") is None:
        pytest.fail("mosquitto_pub is needed by the README's MQTT example and by this test: install mosquitto-clients")
    gateway.start()
    token = gatewayctl("device", "add", "truck-17", data_dir=gateway.data_dir).stdout.strip()
    message = '{"metric": "oil_temp", "ts": "2026-11-22T10:00:00Z", "value": 81.5}'
    for version in ("mqttv311", "mqttv5", "mqttv5"):
        subprocess.run(
            ["mosquitto_pub", "-V", version, "-h", "localhost", "-p", str(gateway.mqtt_tls_port),
             "--cafile", gateway.cert, "-u", "truck-17", "-P", token, "-q", "1",
             "-t", "devices/truck-17/readings", "-m", message],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
    rows = [json.loads(line) for line in gatewayctl("export", data_dir=gateway.data_dir).stdout.splitlines()]
    assert [(r["device"], r["metric"], r["ts"], r["value"]) for r in rows] == [
        ("truck-17", "oil_temp", "2026-11-22T10:00:00Z", 81.5)
    ]
    wrong = subprocess.run(
        ["mosquitto_pub", "-h", "localhost", "-p", str(gateway.mqtt_tls_port), "--cafile", gateway.cert,
         "-u", "truck-17", "-P", "0123456789abcdef.wrong", "-q", "1", "-t", "devices/truck-17/readings", "-m", message],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert wrong.returncode != 0 and "bad user name or password" in wrong.stderr.lower()


def _served_certificate(port: int, cafile: str | None) -> bytes:
    """The certificate a handshake with the HTTPS port presents (verified against ``cafile`` when given)."""
    import socket

    ctx = ssl.create_default_context(cafile=cafile) if cafile else ssl._create_unverified_context()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def test_an_old_data_directory_keeps_its_certificate_until_gatewayctl_moves_it_and_sighup_takes_it_up(gateway):
    from cryptography import x509
    from cryptography.x509 import DNSName
    from cryptography.x509.verification import PolicyBuilder, Store

    from tests.certs import make_self_signed

    old = make_self_signed(gateway.data_dir / "tls")  # as the gateway made them before the local CA
    gateway.start()
    gateway.wait_for_line("gatewayctl tls new-layout")
    old_der = x509.load_pem_x509_certificate(old.cert_path.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert _served_certificate(gateway.port, str(old.cert_path)) == old_der  # pinned devices keep working

    moved = gatewayctl("tls", "new-layout", data_dir=gateway.data_dir)
    assert moved.stdout.strip() == str(gateway.data_dir / "tls" / "ca.crt")
    gateway.proc.send_signal(signal.SIGHUP)
    gateway.wait_for_line("TLS certificate was taken up")
    served = x509.load_der_x509_certificate(_served_certificate(gateway.port, gateway.cert))
    ca = x509.load_pem_x509_certificate(Path(gateway.cert).read_bytes())
    PolicyBuilder().store(Store([ca])).build_server_verifier(DNSName("localhost")).verify(served, [])
    shown = json.loads(gatewayctl("tls", "show", "--json", data_dir=gateway.data_dir).stdout)
    assert (
        shown["layout"] == "local CA"
        and shown["server"]["sha256"].replace(":", "").lower() == served.fingerprint(hashes.SHA256()).hex()
    )


@pytest.mark.parametrize("protocol", ["tcp", "https", "mqtts"])
def test_simulated_devices_run_commands_and_report_on_every_protocol(gateway, protocol):
    """docs: commands walk-through (gatewayctl command send to a simulated device, and its result)."""
    gateway.start()
    port = {"tcp": gateway.tgp_port, "https": gateway.port, "mqtts": gateway.mqtt_tls_port}[protocol]
    simulate = ["simulate", "--target", f"localhost:{port}", "--devices", "2", "--rate", "20", "--protocol", protocol]
    for name in ("sim-0", "sim-1"):  # the simulator gives them tokens of its own when it starts
        gatewayctl("device", "add", name, data_dir=gateway.data_dir)
    gatewayctl("command", "send", "sim-0", "reboot", "--param", "delay=0.2", "--id", "ok", data_dir=gateway.data_dir)
    gatewayctl("command", "send", "sim-1", "reboot", "--param", "fail=true", "--id", "bad", data_dir=gateway.data_dir)
    gatewayctl("device", "desire", "sim-0", "rate=5", data_dir=gateway.data_dir)
    # Until the gateway has recorded the three results (at most a minute).
    out = gatewayctl(
        *simulate, "--duration", "60", "--commands", "3", "--command-delay", "0.2", "--json", data_dir=gateway.data_dir
    )
    summary = json.loads(out.stdout)
    assert summary["commands"]["received"] == 3 and summary["commands"]["succeeded"] == 2
    assert summary["commands"]["failed"] == 1
    ok = json.loads(gatewayctl("command", "show", "ok", data_dir=gateway.data_dir).stdout)
    assert ok["state"] == "succeeded" and ok["result"] == {"ran": "reboot", "params": {"delay": 0.2}, "device": "sim-0"}
    bad = json.loads(gatewayctl("command", "show", "bad", data_dir=gateway.data_dir).stdout)
    assert bad["state"] == "failed" and "on request" in bad["result"]["error"]
    twin = json.loads(gatewayctl("device", "desire", "sim-0", data_dir=gateway.data_dir).stdout)
    assert twin["reported"] == {"rate": 5} and twin["delta"] == {}


@pytest.mark.parametrize("protocol,command,answer", [("teltonika", "getinfo", "getinfo: succeeded"),
                                                      ("gt06", "RELAY", "RELAY:succeeded")])  # fmt: skip
def test_simulated_trackers_as_in_the_docs(workdir, protocol, command, answer):
    """docs/transports/trackers.rst: gatewayctl simulate --protocol teltonika|gt06, and a command to a tracker."""
    gateway = GatewayProcess(workdir / "gateway-data", f"--{protocol}", "tcp:0:interface=127.0.0.1", cwd=workdir)
    try:
        gateway.start()
        port = gateway.teltonika_port if protocol == "teltonika" else gateway.gt06_port
        simulate = ["simulate", "--target", f"localhost:{port}", "--protocol", protocol, "--devices", "3"]
        for name in ("sim-0", "sim-1", "sim-2"):  # the simulator binds their IMEIs when it starts
            gatewayctl("device", "add", name, data_dir=gateway.data_dir)
        argv = [script("gatewayctl"), *simulate, "--rate", "30", "--batch", "5", "--duration", "60", "--commands", "1",
                "--json", "--data-dir", str(gateway.data_dir)]  # fmt: skip
        sim = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Sent while the trackers run: the command waits for sim-2 to sign in, then for its answer.
            sent = gatewayctl("command", "send", "sim-2", command, "--id", "c1", "--wait", "50", check=False,
                              data_dir=gateway.data_dir)  # fmt: skip
            assert sent.returncode == 0, sent.stderr
            assert json.loads(sent.stdout.splitlines()[-1]) == {"response": answer}
        finally:
            out, err = sim.communicate(timeout=90)  # it stops once it has answered the command
        summary = json.loads(out)
        assert summary["errors"] == {} and summary["acked"] > 0 and summary["duplicates"] == 0, summary
        rows = gatewayctl("export", "--format", "csv", data_dir=gateway.data_dir).stdout.splitlines()
        metrics = {line.split(",")[1] for line in rows[1:]}
        assert {"lat", "lon", "speed", "heading", "satellites"} <= metrics
    finally:
        gateway.close()


def test_simulated_trackers_over_udp_as_in_the_docs(workdir):
    """docs/transports/trackers.rst: gatewayctl simulate --protocol teltonika-udp; every answered record stored."""
    gateway = GatewayProcess(workdir / "gateway-data", "--teltonika", "udp:0:interface=127.0.0.1", cwd=workdir)
    try:
        gateway.start()
        for name in ("sim-0", "sim-1", "sim-2"):
            gatewayctl("device", "add", name, data_dir=gateway.data_dir)
        out = gatewayctl("simulate", "--target", f"127.0.0.1:{gateway.teltonika_udp_port}", "--protocol",
                         "teltonika-udp", "--devices", "3", "--rate", "30", "--batch", "5", "--duration", "4",
                         "--json", "--data-dir", str(gateway.data_dir)).stdout  # fmt: skip
        summary = json.loads(out)
        # A datagram answered late (a busy machine) is sent again, as a tracker would: that is no error.
        assert summary["acked"] > 0 and set(summary["errors"]) <= {"UDP datagrams sent again"}, summary
        rows = gatewayctl("export", "--format", "csv", data_dir=gateway.data_dir).stdout.splitlines()[1:]
        assert sum(1 for r in rows if r.split(",")[1] == "lat") >= summary["acked"]
    finally:
        gateway.close()


def test_a_tracker_is_answered_from_the_journal_while_the_database_is_away(workdir, outage_db):
    """Teltonika over TCP: answered after the journal's fsync during an outage, replayed after; a tracker that
    signs in meanwhile gets no answer (its IMEI cannot be looked up) and keeps its records."""
    from tests.test_teltonika_e2e import IMEI, T0, Tracker, packet

    gateway = GatewayProcess(
        workdir / "gateway-data", "--db", outage_db.dsn, "--teltonika", "tcp:0:interface=127.0.0.1", cwd=workdir
    )
    tracker = None
    try:
        gateway.start()
        gatewayctl("device", "add", "truck-9", "--imei", IMEI, "--db", outage_db.dsn)
        tracker = Tracker(gateway.teltonika_port)
        assert tracker.accepted() == b"\x01"
        tracker.send(packet([(T0, 54.6872, 25.2797, 9)]))
        assert tracker.read(4) == b"\x00\x00\x00\x01"

        outage_db.stop()
        tracker.send(packet([(T0 + 1000, 54.6873, 25.2798, 9)]))
        assert tracker.read(4) == b"\x00\x00\x00\x01"  # journaled: answered all the same
        newcomer = Tracker(gateway.teltonika_port, "356307042441099")
        assert newcomer.accepted() == b""  # not looked up now: no answer, the connection closes
        newcomer.close()

        outage_db.start()  # the record's six position readings and its external voltage
        gateway.wait_for_line(r"journal: replayed \d+\.seg: 7 readings stored, 0 were stored already", timeout=60)
        rows = gatewayctl("export", "--format", "csv", "--db", outage_db.dsn).stdout.splitlines()[1:]
        lats = sorted(float(r.split(",")[3]) for r in rows if r.split(",")[1] == "lat")
        assert lats == [54.6872, 54.6873]
    finally:
        if tracker is not None:
            tracker.close()
        gateway.close()
