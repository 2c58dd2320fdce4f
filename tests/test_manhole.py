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
    gw: GatewayProcess, key: Path, *args: str, stdin: bytes = b"", timeout: float = 30
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
        "LogLevel=ERROR",
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
