"""
What belongs to the gateway's process alone, not to its service tree: the
signals, the garbage collector's settings, systemd's notifications and the
exit status. ``makeService`` (twistd's entry point) wraps the tree in it;
tests start the tree without it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure

from gateway.reactor import Reactor
from gateway.errors import StartError
from gateway.ops.systemd import SystemdNotifier
from gateway.ops.tuning import tune_gc

log = Logger()


class GatewayProcess(MultiService):
    """
    The gateway as twistd runs it: the service tree, plus what belongs to the
    process alone. SIGTERM and SIGINT stop it with exit status 0 (twistd's own
    handlers would end it with -15); SIGHUP reloads the config file; once
    ready, the garbage collector is tuned for a long-running server and
    systemd is told (``Type=notify``, with watchdog pings); a failed start
    exits non-zero with one line.
    """

    def __init__(
        self,
        gateway: Any,  # gateway.service.GatewayService
        reactor: Reactor,
        log_observer: Any = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.gateway = gateway
        self.reactor = reactor
        self.log_observer = log_observer  # installed as the application's ILogObserver
        self.systemd = SystemdNotifier(environ or {}, reactor)
        self._reload_when_ready = False  # a SIGHUP came while starting
        gateway.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        # twistd hands its Application here before it starts logging; an
        # ILogObserver on it replaces twistd's own (for --log-format json).
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except StartError as e:
            # Still inside twistd's start, before the reactor runs.
            raise SystemExit(f"twistd gateway: {e}") from None

    def startService(self) -> None:
        super().startService()
        # SIGHUP's default action ends the process: it is taken from the start, and one that comes before
        # the gateway is ready re-reads the file once it is.
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self._reload))
        self.reactor.callWhenRunning(self._take_signals)
        self.gateway.ready.addCallbacks(self._ready, self._failed)
        self.gateway.listening.addCallback(lambda _: self.systemd.ready("accepting devices and requests"))

    def _take_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda number, frame: self.reactor.callFromThread(self._signalled, number))

    def _signalled(self, number: int) -> None:
        name = signal.Signals(number).name
        if self.gateway.stopping:
            log.warn("{signal} again: the gateway is already stopping", signal=name)
            return
        log.info(
            "{signal}: stopping; writes under way get up to {timeout:g}s to commit and be answered",
            signal=name,
            timeout=self.gateway.config.shutdown_timeout,
        )
        self.reactor.stop()

    def _reload(self) -> None:
        ready = self.gateway.ready
        if ready.called:
            self.gateway.reload()
        elif not self._reload_when_ready:
            self._reload_when_ready = True
            log.info("SIGHUP while starting: the config file is re-read once the gateway is ready")
            ready.addCallback(self._reload_now)

    def _reload_now(self, result: Any) -> Any:
        self._reload_when_ready = False
        self.gateway.reload()
        return result

    def _ready(self, _: Any) -> None:
        tune_gc()

    def stopService(self) -> Deferred:
        self.systemd.stopping()
        return super().stopService() or succeed(None)

    def _failed(self, f: Failure) -> None:
        log.critical("gateway cannot start: {message}", message=str(f.value))
        # twistd exits 0 after a normal reactor stop; a failed start must not.
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        self.reactor.stop()
