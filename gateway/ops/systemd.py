"""
systemd's service notification protocol (``sd_notify``), which is one
datagram to the socket named by ``$NOTIFY_SOCKET``, so no library is needed.

``READY=1`` goes out once the gateway accepts devices and requests (a
``Type=notify`` unit counts as started only then), ``STOPPING=1`` when it
begins to stop, and ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` while the
reactor runs: with ``WatchdogSec=`` systemd restarts a gateway whose event
loop is stuck. Without ``$NOTIFY_SOCKET`` (not under systemd) it does
nothing. A send is one non-blocking local datagram; a full queue drops it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


class SystemdNotifier:
    def __init__(self, environ: Mapping[str, str], clock: IReactorTime) -> None:
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]  # the abstract namespace
        self.address = address
        watchdog_usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        mine = not watchdog_pid.isdigit() or int(watchdog_pid) == os.getpid()
        self.watchdog = int(watchdog_usec) / 1e6 if watchdog_usec.isdigit() and mine and address else None
        self._loop = LoopingCall(self.notify, "WATCHDOG=1")
        self._loop.clock = clock
        self.sent: list[str] = []  # what went out, for the console and tests
        self._warned = False

    def notify(self, *fields: str) -> None:
        if self.address is None:
            return
        message = "\n".join(fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(message.encode(), self.address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warn("systemd notification not sent to {socket}: {error}", socket=self.address, error=str(e))
            return
        self.sent.append(message)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")
        if self.watchdog is not None and not self._loop.running:
            self._loop.start(self.watchdog / 2, now=True)

    def stopping(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self.notify("STOPPING=1")
