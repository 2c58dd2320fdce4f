"""
A real RabbitMQ node for tests (Debian's rabbitmq-server): its own node
name, Erlang port mapper, ports on 127.0.0.1, data and logs under the test's
directory, no plugins. ``stop()`` ends the node and its port mapper; the
fixture always calls it. A restart keeps the node's data (durable queues and
persistent messages) and its AMQP port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # runs as the calling user (/usr/sbin's wrapper switches)


def need_rabbitmq() -> None:
    if not Path(SERVER).exists() or shutil.which("epmd") is None:
        import pytest  # here, not above: benchmarks/amqp.py starts nodes too, without the test extra

        pytest.fail("these tests need RabbitMQ: install it (Debian: apt-get install rabbitmq-server)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rabbit:
    def __init__(self, root: Path, tls: bool = False) -> None:
        need_rabbitmq()
        self.root = Path(root)
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        (self.root / "enabled_plugins").write_text("[].\n")
        self.node = f"gwtest{os.getpid()}x{id(self) % 100000}@localhost"
        self.port = 0
        self.tls_port = 0  # AMQP over TLS (with tls): a certificate for localhost from the test CA in ca.pem
        self.ca: Path | None = None
        if tls:
            from tests.certs import TestCA

            ca = TestCA("rabbit test CA")
            self.ca = ca.write(self.root / "ca.pem")
            (self.root / "server.pem").write_bytes(ca.issue("localhost", ("localhost", "127.0.0.1")))
        self.proc: subprocess.Popen | None = None
        self.epmd: subprocess.Popen | None = None
        self.epmd_port = 0

    @property
    def url(self) -> str:
        return f"amqp://127.0.0.1:{self.port}/"

    def _env(self, dist_port: int) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.root / "home"),  # the Erlang cookie
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_PID_FILE": str(self.root / "pid"),
            "RABBITMQ_DIST_PORT": str(dist_port),
        }

    def start(self) -> Rabbit:
        """Start on the AMQP port it had (a restart) or on free ones, trying others while a port is taken."""
        keep = bool(self.port)
        for _ in range(10):
            if self.epmd is None:
                self.epmd_port = _free_port()
                self.epmd = subprocess.Popen(
                    ["epmd", "-port", str(self.epmd_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            if not keep:
                self.port = _free_port()
                self.tls_port = _free_port() if self.ca else 0
            conf = f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users = none\n"
            conf += "log.console = true\nlog.file = false\n"
            if self.ca:
                pem = self.root / "server.pem"
                conf += (
                    f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}\nssl_options.cacertfile = {self.ca}\n"
                    f"ssl_options.certfile = {pem}\nssl_options.keyfile = {pem}\nssl_options.verify = verify_none\n"
                    "ssl_options.fail_if_no_peer_cert = false\n"
                )
            (self.root / "rabbitmq.conf").write_text(conf)
            out = (self.root / "server.log").open("ab")
            self.proc = subprocess.Popen(
                [SERVER], env=self._env(_free_port()), stdout=out, stderr=out, start_new_session=True
            )
            out.close()
            if self._listening():
                return self
            self._end()
            if self.epmd is not None and self.epmd.poll() is not None:
                self.epmd = None  # its port was taken
            time.sleep(0.5)
        raise AssertionError("rabbitmq-server did not start:\n" + (self.root / "server.log").read_text()[-3000:])

    def _listening(self, timeout: float = 60.0) -> bool:
        """The AMQP port accepts connections and the broker answers a connection's handshake."""
        import pika

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                connection = pika.BlockingConnection(
                    pika.ConnectionParameters("127.0.0.1", self.port, connection_attempts=1, socket_timeout=2)
                )
            except Exception:
                time.sleep(0.2)
                continue
            connection.close()
            return True
        return False

    def connection(self):
        import pika

        return pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", self.port, heartbeat=0))

    def _end(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # RabbitMQ stops cleanly on SIGTERM
        except ProcessLookupError:
            return
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for child in psutil.process_iter(["environ"]):  # a helper that outlived the node (erl_child_setup)
            try:
                if (child.info["environ"] or {}).get("RABBITMQ_NODENAME") == self.node:
                    child.kill()
            except psutil.Error:
                pass

    def stop(self) -> None:
        self._end()
        if self.epmd is not None:
            self.epmd.terminate()
            try:
                self.epmd.wait(10)
            except subprocess.TimeoutExpired:
                self.epmd.kill()
                self.epmd.wait(10)
            self.epmd = None

    def restart(self) -> None:
        """Stop the node and start it again: same data, same AMQP port."""
        self._end()
        self.start()
