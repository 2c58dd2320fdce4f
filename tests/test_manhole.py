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

# A public key for the authorized_keys parser tests (its private half was never kept).
PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFnAYVHytgc/LeCqtwtxPO27ADVaVA7U09OYMBHnC9jY fixture"
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
    # Through a pipe a script gets the answers alone: no banner, no prompts, no control sequences.
    assert out.stdout.decode() == "42\nline 0\nline 1\n[]\n0\n"


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


def test_idle_connections_that_never_log_in_cannot_lock_an_administrator_out(console):
    """Twenty connections held before the login: the administrator still logs in (they are not sessions)."""
    import socket

    gw = console[0]
    held = [socket.create_connection(("127.0.0.1", gw.manhole_port), timeout=10) for _ in range(20)]
    try:
        for sock in held[-5:]:
            assert sock.recv(256).startswith(b"SSH-2.0-")  # the newest are accepted: the server speaks first
        out = ssh(gw, console[1], "-o", "BatchMode=yes", "admin@127.0.0.1", "1+1")
        assert out.returncode == 0 and out.stdout.strip() == b"2", out.stderr
    finally:
        for sock in held:
            sock.close()
    gw.wait_for_line("not logged in yet, to make room")


def test_rsa_keys_log_in_with_sha2_and_from_restricts_where_keys_work(console, tmp_path):
    """An RSA key logs in (server-sig-algs names rsa-sha2-*); from= is honoured; each login names its key."""
    gw, admin, _, _ = console
    rsa = tmp_path / "rsa"
    subprocess.run(
        [need("ssh-keygen"), "-q", "-t", "rsa", "-b", "3072", "-N", "", "-C", "ops-rsa", "-f", str(rsa)], check=True
    )
    here, elsewhere, odd = keypair(tmp_path / "here"), keypair(tmp_path / "elsewhere"), keypair(tmp_path / "odd")
    listed = gw.data_dir / "manhole" / "authorized_keys"
    before = listed.read_text()
    listed.write_text(
        before
        + (tmp_path / "rsa.pub").read_text()
        + 'from="127.0.0.0/8,!10.0.0.1",no-port-forwarding '
        + (tmp_path / "here.pub").read_text()
        + 'from="10.0.0.0/8" '
        + (tmp_path / "elsewhere.pub").read_text()
        + 'command="/bin/true" '
        + (tmp_path / "odd.pub").read_text()
    )
    try:
        for key in (rsa, here):
            out = ssh(gw, key, "-o", "BatchMode=yes", "admin@127.0.0.1", "6*7")
            assert out.returncode == 0 and out.stdout.strip() == b"42", (key.name, out.stderr)
        for key in (elsewhere, odd):
            out = ssh(gw, key, "-o", "BatchMode=yes", "admin@127.0.0.1", "6*7")
            assert out.returncode == 255 and b"Permission denied" in out.stderr, (key.name, out.stderr)
        fingerprint = subprocess.run(
            [need("ssh-keygen"), "-l", "-f", str(tmp_path / "rsa.pub")], capture_output=True, text=True, check=True
        ).stdout.split()[1]
        assert fingerprint.startswith("SHA256:")
        gw.wait_for_line(re.escape(fingerprint))
        gw.wait_for_line("does not allow 127.0.0.1")
        gw.wait_for_line("option 'command' is not supported")
    finally:
        listed.write_text(before)


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
    assert factory.open == 1 and factory.sessions == 0
    clock.advance(factory.idle_timeout - 1)
    proto.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n")
    clock.advance(factory.idle_timeout - 1)
    assert not transport.disconnecting  # the client's bytes counted
    clock.advance(1)
    assert transport.disconnecting
    proto.connectionLost(None)
    assert factory.open == 0 and clock.getDelayedCalls() == []


def console_connections(tmp_path, count: int):
    """A console factory on task.Clock and ``count`` connections to it over in-memory transports."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from gateway.ops.manhole import console_factory

    clock = Clock()
    (tmp_path / "authorized_keys").write_text("")
    factory = console_factory(tmp_path / "keys", tmp_path / "authorized_keys", dict, "", clock)
    factory.startFactory()
    made = []
    for port in range(5000, 5000 + count):
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        proto.makeConnection(transport)
        made.append((proto, transport))
    return factory, clock, made


def test_connections_waiting_to_log_in_are_bounded_by_dropping_the_longest_waiting(tmp_path):
    from gateway.ops.manhole import MAX_UNAUTHENTICATED

    factory, clock, transports = console_connections(tmp_path, MAX_UNAUTHENTICATED + 3)
    assert [t.disconnecting for _, t in transports[:3]] == [True] * 3  # the three waiting longest, dropped
    assert not any(t.disconnecting for _, t in transports[3:])
    assert len(factory.waiting) == MAX_UNAUTHENTICATED and factory.sessions == 0
    clock.advance(factory.login_timeout)  # the grace time: every one still waiting is closed
    assert all(t.disconnecting for _, t in transports)
    for proto, _ in transports:
        proto.connectionLost(None)
    assert factory.open == 0


@pytest.mark.parametrize(
    "line, peer, allowed",
    [
        ('from="127.0.0.1" KEY', "127.0.0.1", True),
        ('from="127.0.0.1" KEY', "10.0.0.1", False),
        ('from="10.0.0.0/8,!10.0.0.7" KEY', "10.9.8.7", True),
        ('from="10.0.0.0/8,!10.0.0.7" KEY', "10.0.0.7", False),
        ('from="192.168.1.*" KEY', "192.168.1.20", True),
        ('no-agent-forwarding,from="::1" KEY', "::1", True),
        ('expiry-time="20000101" KEY', "127.0.0.1", False),
        ('expiry-time="29990101Z" KEY', "127.0.0.1", True),
        ("KEY comment with spaces", "10.1.1.1", True),
    ],
)
def test_authorized_keys_options_are_honoured(line, peer, allowed):
    import time

    from gateway.ops.authorized_keys import parse_authorized_key

    entry = parse_authorized_key(line.replace("KEY", PUBLIC))
    assert (entry.allows(peer, time.time()) is None) is allowed


@pytest.mark.parametrize("option", ['command="ls"', "no-pty", "restrict", 'permitopen="x:1"', 'from="a'])
def test_an_authorized_keys_option_the_console_cannot_honour_makes_the_line_unusable(option):
    from gateway.ops.authorized_keys import parse_authorized_key

    with pytest.raises(ValueError):
        parse_authorized_key(f"{option} {PUBLIC}")


def test_logged_in_consoles_are_capped_and_a_login_past_the_cap_is_told_why(tmp_path):
    from twisted.conch.ssh.connection import SSHConnection

    from gateway.ops.manhole import MAX_SESSIONS

    factory, clock, made = console_connections(tmp_path, MAX_SESSIONS + 1)
    for proto, transport in made:
        transport.clear()
        proto.setService(SSHConnection())  # what a successful login does
    assert factory.sessions == MAX_SESSIONS and not factory.waiting
    assert [t.disconnecting for _, t in made] == [False] * MAX_SESSIONS + [True]
    assert made[-1][1].value()  # a DISCONNECT saying why went out
    made[0][0].connectionLost(None)
    assert factory.sessions == MAX_SESSIONS - 1
    for proto, _ in made[1:]:
        proto.connectionLost(None)
    assert factory.open == 0 and clock.getDelayedCalls() == []
