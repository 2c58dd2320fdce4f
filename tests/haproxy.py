"""
HAProxy in front of gateways, for the scale-out tests: TCP mode for TGP,
an HTTPS readiness check of each gateway's ``/readyz``, least connections.

HAProxy cannot bind port 0, so the test binds the listening socket itself
(port 0, the kernel's choice: no race) and hands it over as ``fd@N``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

CONFIG = """
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch
frontend tgp
    bind fd@{fd}
    default_backend gateways
backend gateways
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    default-server inter 300ms fall 2 rise 2 check-ssl verify none
{servers}
"""


def need_haproxy() -> str:
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)
    if found is None:
        pytest.fail("haproxy is needed by the scale-out test: install it (scripts/test does: apt-get install haproxy)")
    return found


class HAProxy:
    def __init__(self, where: Path, backends: list[tuple[int, int]]) -> None:
        """``backends``: (TGP port, HTTPS port) of each gateway."""
        self.where = where
        self.backends = backends
        self.proc: subprocess.Popen | None = None
        self.listener: socket.socket | None = None
        self.port = 0

    def start(self) -> HAProxy:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1024)
        self.port = self.listener.getsockname()[1]
        servers = "\n".join(
            f"    server gw{i} 127.0.0.1:{tgp} check port {https}" for i, (tgp, https) in enumerate(self.backends)
        )
        self.where.mkdir(parents=True, exist_ok=True)
        config = self.where / "haproxy.cfg"
        config.write_text(CONFIG.format(fd=self.listener.fileno(), servers=servers))
        self.proc = subprocess.Popen(
            [need_haproxy(), "-f", str(config), "-db"],
            pass_fds=(self.listener.fileno(),),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return self

    def stop(self) -> str:
        out = ""
        if self.proc is not None:
            self.proc.kill()
            out = self.proc.communicate(timeout=10)[0]
        if self.listener is not None:
            self.listener.close()
        return out
