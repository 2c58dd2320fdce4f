"""
The SSH console as an administrator meets it: ``twistd -n gateway
--manhole …`` in a subprocess and the real OpenSSH ``ssh`` client (which
``.ci/run`` installs when the machine lacks it). Also: JSON logs and
SIGHUP on the real process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tests.gatewayproc import GatewayProcess, gatewayctl

ANSI = re.compile(rb"\x1b(\[[0-9;?]*[A-Za-z]|[()][A-Z0-9]|[78=>cDEHM])")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is needed by the console tests: install OpenSSH's client (.ci/run does)")
    return path


def keypair(path: Path) -> Path:
    subprocess.run(
        [need("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    key, stranger = keypair(tmp / "admin"), keypair(tmp / "stranger")
    data = tmp / "data"
    (data / "manhole").mkdir(parents=True)
    (data / "manhole" / "authorized_keys").write_text("# the operators\n" + (tmp / "admin.pub").read_text())
    config = tmp / "gateway.toml"
    config.write_text("max-body = 4096\n")
    gw = GatewayProcess(
        data,
        "--manhole",
        "tcp:0:interface=127.0.0.1",
        "--log-format",
        "json",
        "--config",
        str(config),
    ).start()
    try:
        yield gw, key, stranger, config
    finally:
        gw.close()


def ssh(
    gw: GatewayProcess, key: Path, *args: str, stdin: bytes = b"", timeout: float = 30, log_level: str = "ERROR"
) -> subprocess.CompletedProcess:
    argv = [
        need("ssh"),
        "-p",
        str(gw.manhole_port),
        "-i",
        str(key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        f"LogLevel={log_level}",
        *args,
    ]
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)


def test_a_command_runs_and_its_output_comes_back(console):
    gw, key, _, _ = console
    out = ssh(gw, key, "-o", "BatchMode=yes", "admin@127.0.0.1", "status()")
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert re.search(r"^uptime_seconds: [\d.]+$", text, re.M), text
    assert re.search(r"^connections:\n  https: \d+\n  tgp: 0\n  tgp\+tls: 0$", text, re.M), text
    assert "database: up" in text and "queue_depth: 0" in text

    failed = ssh(gw, key, "-o", "BatchMode=yes", "admin@127.0.0.1", "kick(")
    assert failed.returncode == 1 and b"SyntaxError" in failed.stdout


def test_a_plain_session_reads_lines_and_ends_at_eof(console):
    gw, key, _, _ = console
    script = b"x = 6 * 7\nprint(x)\nfor i in range(2):\n    print('line', i)\n\nsinks()\nkick('truck-1')\n"
    out = ssh(gw, key, "-T", "-o", "BatchMode=yes", "admin@127.0.0.1", stdin=script)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert text.startswith("txgateway console")
    assert ">>> 42\n" in text and "line 0\nline 1\n" in text
    assert ">>> []\n" in text  # no sinks configured
    assert ">>> 0\n" in text  # nobody to kick
    assert b"\x1b" not in out.stdout  # no terminal, no control sequences


def test_a_terminal_session_gets_the_line_editor(console):
    gw, key, _, _ = console
    out = ssh(gw, key, "-tt", "-o", "BatchMode=yes", "admin@127.0.0.1", stdin=b"6 * 7\r")
    assert out.returncode == 0, out.stderr
    text = ANSI.sub(b"", out.stdout).decode(errors="replace")
    assert "txgateway console" in text and "42" in text


def test_a_key_that_is_not_listed_is_refused(console):
    gw, _, stranger, _ = console
    out = ssh(gw, stranger, "-o", "BatchMode=yes", "admin@127.0.0.1", "status()")
    assert out.returncode == 255
    assert b"Permission denied (publickey)" in out.stderr


def test_passwords_are_not_even_offered(console):
    gw, _, stranger, _ = console
    out = ssh(
        gw,
        stranger,
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "PreferredAuthentications=password,keyboard-interactive",
        "-o",
        "NumberOfPasswordPrompts=1",
        "admin@127.0.0.1",
        "status()",
        stdin=b"secret\n",
    )
    assert out.returncode == 255
    assert b"Permission denied (publickey)" in out.stderr


def test_the_host_key_is_private_and_kept(console):
    gw, _, _, _ = console
    key = gw.data_dir / "manhole" / "ssh_host_ed25519_key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    line = gw.wait_for_line("console: made host key")
    listed = subprocess.run([need("ssh-keygen"), "-l", "-f", f"{key}.pub"], capture_output=True, text=True)
    assert json.loads(line)["fingerprint"] == listed.stdout.split()[1]


def test_logs_are_json_lines_without_secrets(console):
    gw, _, _, _ = console
    token = gatewayctl("device", "add", "truck-1", data_dir=gw.data_dir).stdout.strip()
    wrong = token[:-4] + "AAAA"
    import http.client
    import ssl

    ctx = ssl.create_default_context(cafile=gw.cert)
    for _ in range(8):  # more than the rate limit lets through
        conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=ctx, timeout=30)
        conn.request("POST", "/v1/readings", body="{}", headers={"Authorization": f"Bearer {wrong}"})
        assert conn.getresponse().status == 401
        conn.close()
    gw.wait_for_line("missing, unknown or revoked device token")
    lines = [line for line in gw.lines if line.startswith("{")]
    assert lines, gw.log()
    for line in lines:
        doc = json.loads(line)
        assert {"time", "level", "namespace", "message"} <= doc.keys()
    refusals = [json.loads(line) for line in lines if "unknown or revoked device token" in line]
    assert len(refusals) == 5  # the rest were counted, not written
    assert refusals[0]["level"] == "warn" and refusals[0]["code"] == "unauthorized"
    assert refusals[0]["source"].startswith("https 127.0.0.1:")
    assert token.split(".")[1] not in gw.log() and wrong.split(".")[1] not in gw.log()


def test_sighup_reloads_the_config_file(console):
    gw, _, _, config = console
    config.write_text('max-body = 8192\npool-size = 2\nlog-level = "info"\n')
    os.kill(gw.proc.pid, signal.SIGHUP)
    line = json.loads(gw.wait_for_line("SIGHUP: re-read"))
    assert line["applied"] == "max-body" and line["later"] == "pool-size"


def offered(gw, key) -> dict[str, list[str]]:
    """What the console offers, as OpenSSH's client reports it (ssh -vv)."""
    out = ssh(gw, key, "-o", "BatchMode=yes", "admin@127.0.0.1", "1+1", log_level="DEBUG2")
    assert out.returncode == 0, out.stderr
    lines = out.stderr.decode().splitlines()
    start = next(i for i, line in enumerate(lines) if "peer server KEXINIT proposal" in line)
    found = {}
    for line in lines[start + 1 : start + 12]:
        name, _, values = line.removeprefix("debug2: ").partition(": ")
        found[name] = [v for v in values.split(",") if v]
    return found


def test_the_console_offers_only_modern_algorithms(console):
    """Checked as ssh-audit would: from a real OpenSSH client's view of the server's KEXINIT."""
    gw, key, _, _ = console
    got = offered(gw, key)
    kex = [k for k in got["KEX algorithms"] if k != "ext-info-s"]
    assert kex[:2] == ["curve25519-sha256", "curve25519-sha256@libssh.org"]
    assert set(kex) <= {
        "curve25519-sha256",
        "curve25519-sha256@libssh.org",
        "ecdh-sha2-nistp256",
        "ecdh-sha2-nistp384",
        "ecdh-sha2-nistp521",
        "diffie-hellman-group-exchange-sha256",
    }
    assert got["host key algorithms"] == ["ssh-ed25519"]
    for way in ("ctos", "stoc"):
        assert got[f"ciphers {way}"] == ["aes256-ctr", "aes192-ctr", "aes128-ctr"]
        assert got[f"MACs {way}"] == ["hmac-sha2-512", "hmac-sha2-256"]
        assert got[f"compression {way}"] == ["none"]


@pytest.mark.parametrize(
    "weak",
    [
        ("Ciphers", "aes128-cbc,3des-cbc"),
        ("Ciphers", "chacha20-poly1305@openssh.com"),
        ("KexAlgorithms", "diffie-hellman-group14-sha1,diffie-hellman-group1-sha1"),
        ("MACs", "hmac-sha1,hmac-md5"),
        ("MACs", "hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com"),
    ],
)
def test_a_client_limited_to_weak_algorithms_is_refused(console, weak):
    gw, key, _, _ = console
    out = ssh(gw, key, "-o", f"{weak[0]}={weak[1]}", "-o", "BatchMode=yes", "admin@127.0.0.1", "1", log_level="INFO")
    assert out.returncode == 255 and b"Unable to negotiate" in out.stderr, out.stderr


def test_console_connections_are_capped(console):
    """Four connections may be open at once (logged in or not); a fifth is closed at once, then room returns."""
    import socket

    from gateway.ops.manhole import MAX_SESSIONS

    gw = console[0]
    held = [socket.create_connection(("127.0.0.1", gw.manhole_port), timeout=10) for _ in range(MAX_SESSIONS)]
    try:
        for sock in held:
            assert sock.recv(256).startswith(b"SSH-2.0-")  # accepted: the server speaks first
        extra = socket.create_connection(("127.0.0.1", gw.manhole_port), timeout=10)
        assert extra.recv(256) == b""  # closed without a word
        extra.close()
    finally:
        for sock in held:
            sock.close()
    out = ssh(gw, console[1], "-o", "BatchMode=yes", "-o", "ConnectionAttempts=3", "admin@127.0.0.1", "1+1")
    assert out.returncode == 0 and out.stdout.strip() == b"2", out.stderr


def test_an_idle_console_is_closed_and_input_keeps_it_open(tmp_path):
    """On task.Clock: every byte from the client restarts the idle timer; silence closes the connection."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from gateway.ops.manhole import console_factory

    clock = Clock()
    (tmp_path / "authorized_keys").write_text("")
    factory = console_factory(tmp_path / "keys", tmp_path / "authorized_keys", dict, "", clock)
    factory.login_timeout = 10_000  # not the timer under test
    factory.startFactory()
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    proto.makeConnection(transport)
    assert factory.open == 1
    clock.advance(factory.idle_timeout - 1)
    proto.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n")
    clock.advance(factory.idle_timeout - 1)
    assert not transport.disconnecting  # the client's bytes counted
    clock.advance(1)
    assert transport.disconnecting
    proto.connectionLost(None)
    assert factory.open == 0 and clock.getDelayedCalls() == []
