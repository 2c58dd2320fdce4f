"""
A real Mosquitto broker for tests: its own config, persistence directory and
port on 127.0.0.1, plain and (optionally) TLS listeners, and a password file.
``stop()`` ends it; the test's fixture always calls it.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.certs import TestCA

USER = "gateway"
PASSWORD = "broker-secret-1"


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
    if found is None:
        pytest.fail("these tests need the mosquitto broker: install it (Debian: apt-get install mosquitto)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """One broker; ``port`` is plain MQTT, ``tls_port`` MQTT over TLS (when ``tls``), both with a password."""

    def __init__(self, root: Path, tls: bool = False, anonymous: bool = True, acl: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.anonymous = anonymous
        self.acl = acl  # an acl_file's text, when topics are to be restricted
        self.port = 0
        self.tls_port = 0
        self.proc: subprocess.Popen | None = None
        self.ca: Path | None = None
        if tls:
            ca = TestCA("broker test CA")
            self.ca = ca.write(self.root / "ca.pem")
            pem = ca.issue("localhost", ("localhost", "127.0.0.1"))
            (self.root / "broker.pem").write_bytes(pem)
        passwords = self.root / "passwords"
        passwords.write_text(f"{USER}:{PASSWORD}\n")
        subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True, capture_output=True)

    def _config(self) -> str:
        lines = [
            f"user {getpass.getuser()}",  # run as root (CI), mosquitto would become user mosquitto and lose its files
            f"persistence_location {self.root}/",
            "persistence true",
            "autosave_interval 1",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            "per_listener_settings false",
            f"allow_anonymous {'true' if self.anonymous else 'false'}",
            f"password_file {self.root / 'passwords'}",
            *([f"acl_file {self.root / 'acl'}"] if self.acl is not None else []),
            f"listener {self.port} 127.0.0.1",
        ]
        if self.tls:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"certfile {self.root / 'broker.pem'}",
                f"keyfile {self.root / 'broker.pem'}",
            ]
        return "\n".join(lines) + "\n"

    def start(self) -> Mosquitto:
        """Start on the ports it had (a restart) or on free ones, trying others while a port is taken."""
        keep = bool(self.port)
        for _ in range(20):
            if not keep:
                self.port = _free_port()
                self.tls_port = _free_port() if self.tls else 0
            if self.acl is not None:
                (self.root / "acl").write_text(self.acl)
            conf = self.root / "mosquitto.conf"
            conf.write_text(self._config())
            log = (self.root / "mosquitto.log").open("ab")
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=log)
            log.close()
            if self._listening():
                return self
            self.proc.kill()
            self.proc.wait(10)
            if keep:
                time.sleep(0.5)  # its old socket may still be closing
        raise AssertionError("mosquitto did not start:\n" + (self.root / "mosquitto.log").read_text()[-2000:])

    def _listening(self, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        ports = [p for p in (self.port, self.tls_port) if p]
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False  # exited: the port was taken, most likely
            try:
                listening = {
                    c.laddr.port for c in psutil.Process(self.proc.pid).net_connections("tcp") if c.status == "LISTEN"
                }
            except psutil.Error:
                listening = set()
            if listening >= set(ports):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
