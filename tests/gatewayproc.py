"""A gateway run as users run it: ``twistd -n gateway`` in a subprocess."""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil

from tests.conftest import script

LISTENING = re.compile(
    r"listening for (HTTPS|TGP|TGP over TLS|MQTT|MQTT over TLS|Teltonika|Teltonika over UDP|GT06|the SSH console"
    r"|/metrics and /healthz \(HTTP\)) "
    r"on [\d.]+:(\d+)"
)
PORTS = {
    "HTTPS": "port",
    "TGP": "tgp_port",
    "TGP over TLS": "tgp_tls_port",
    "MQTT": "mqtt_port",
    "MQTT over TLS": "mqtt_tls_port",
    "Teltonika": "teltonika_port",
    "Teltonika over UDP": "teltonika_udp_port",
    "GT06": "gt06_port",
    "the SSH console": "manhole_port",
    "/metrics and /healthz (HTTP)": "metrics_port",
}


class GatewayProcess:
    def __init__(
        self,
        data_dir: Path,
        *extra: str,
        cwd: Path | None = None,
        env: dict | None = None,
        twistd: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.twistd = twistd or script("twistd")  # another installation's, to run the gateway as pip installed it
        self.trusted: Path | None = None
        self.extra = list(extra)
        self.env = dict(env or {})  # added to this process's environment
        self.cwd = cwd or self.data_dir.parent
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None  # HTTPS
        self.tgp_port: int | None = None
        self.tgp_tls_port: int | None = None
        self.mqtt_port: int | None = None
        self.mqtt_tls_port: int | None = None
        self.teltonika_port: int | None = None
        self.teltonika_udp_port: int | None = None
        self.gt06_port: int | None = None
        self.manhole_port: int | None = None
        self.metrics_port: int | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._new_line = threading.Condition()

    def start(self, timeout: float = 60.0, until: str = "gateway ready") -> GatewayProcess:
        """Start twistd and wait for a log line matching ``until`` (by default: ready)."""
        self.lines = []
        self._until = until
        self._ready.clear()
        self.proc = subprocess.Popen(
            [
                self.twistd,
                "-n",
                "--pidfile=",
                "gateway",
                "--data-dir",
                str(self.data_dir),
                "--https",
                "ssl:0:interface=127.0.0.1",
                "--device",
                "tcp:0:interface=127.0.0.1",
                "--device",
                "ssl:0:interface=127.0.0.1",
                "--mqtt",
                "ssl:0:interface=127.0.0.1",
                *self.extra,
            ],
            cwd=self.cwd,
            env={**os.environ, **self.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        if not self._ready.wait(timeout):
            self.kill()
            raise AssertionError("gateway did not become ready:\n" + "".join(self.lines[-40:]))
        return self

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()
            m = LISTENING.search(line)
            if m:
                setattr(self, PORTS[m.group(1)], int(m.group(2)))
            if re.search(self._until, line):
                self._ready.set()

    @property
    def cert(self) -> str:
        if self.trusted is not None:  # a copy, where the data directory is not visible to the test
            return str(self.trusted)
        return str(self.data_dir / "tls" / "ca.crt")  # the local CA that signs the server certificate

    def stop(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        """Stop the gateway, and the embedded PostgreSQL a killed gateway leaves behind."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        pm = postmaster(self.data_dir)
        if pm is not None:
            pm.send_signal(signal.SIGINT)  # fast shutdown
            pm.wait(30)

    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._new_line.wait(left)
        raise AssertionError(f"no log line matching {pattern!r}:\n" + "".join(self.lines[-40:]))


def postmaster(data_dir: Path) -> psutil.Process | None:
    """The embedded PostgreSQL's postmaster of a data directory, if it runs."""
    pid_file = Path(data_dir) / "pg" / "postmaster.pid"
    try:
        return psutil.Process(int(pid_file.read_text().split()[0]))
    except (FileNotFoundError, ValueError, IndexError, psutil.NoSuchProcess):
        return None


def gatewayctl(*args: str, data_dir: Path | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    argv = [script("gatewayctl"), *args]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, env={**os.environ, **kw.pop("env", {})}, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"gatewayctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def restart_embedded(pg_dir) -> None:
    """Start the stopped cluster again the way pgserver does (as its user when root)."""
    from gateway.storage.embedded import _pgserver

    _pgserver()
    from pgserver._commands import pg_ctl

    user = "pgserver" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    pg_ctl(
        ["-w", "-o", '-h ""', "-o", f"-k {pg_dir}", "-l", str(pg_dir / "log"), "start"],
        pgdata=pg_dir,
        user=user if os.geteuid() == 0 else None,
        timeout=30,
    )


class OutageDatabase:
    """
    A PostgreSQL that a test stops and starts at will, which the gateway reaches
    with --db: an outage of the gateway's own embedded server would not last,
    since the gateway starts it again.
    """

    def __init__(self, root: Path) -> None:
        from gateway.storage.embedded import EmbeddedPostgres

        self.root = root  # postmaster(root) finds it, as for a data directory
        self.server = EmbeddedPostgres(root / "pg")
        self.dsn = self.server.start()

    def stop(self) -> None:
        pm = postmaster(self.root)
        pm.send_signal(signal.SIGINT)  # fast shutdown: every connection is cut
        pm.wait(30)

    def start(self) -> None:
        restart_embedded(self.root / "pg")

    def close(self) -> None:
        if postmaster(self.root) is not None:
            self.stop()
        self.server.stop()


def unread_bytes(port: int, *, remote: bool) -> int:
    """
    Bytes waiting unread in this machine's TCP sockets whose remote (``remote``) or local port is ``port``,
    from /proc/net/tcp and tcp6: data a stopped process has been sent and not yet read.
    """
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, peer, queues = fields[1], fields[2], fields[4]
            address = peer if remote else local
            if int(address.rsplit(":", 1)[1], 16) == port:
                total += int(queues.split(":")[1], 16)  # tx_queue:rx_queue
    return total
