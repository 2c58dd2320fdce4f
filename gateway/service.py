"""
The assembler: options in, the gateway's service tree out. ``build(config,
reactor)`` wires the components and returns the tree without touching the
process; ``makeService`` (twistd's entry point) is the only place that uses
the global reactor, and wraps the tree in ``GatewayProcess``
(``ops/process.py``), which alone installs signal handlers, tunes the
garbage collector, notifies systemd and sets the exit status.

Start order. ``privilegedStartService`` makes the data directory, opens the
journal, and binds every listening port (a ``Listener`` each, children of one
``Listeners`` service), so a port in use or a bad certificate stops the start
at once with one line. ``startService`` then starts the embedded PostgreSQL
and applies migrations in a thread (both block), and opens the store's pool.
Only then do the ports accept connections: until the gateway can answer,
they wait in the listen backlog rather than get 503. Stop order is the
reverse: stop listening, let the store commit and answer what is in flight,
close the pools, stop the database.

SIGHUP re-reads the config file; each component applies its own part through
its ``reconfigure``, and the log says what changed and what waits for a
restart. Each component yields its /metrics figures from ``live_metrics``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.reactor import Reactor, as_reactor
from gateway.commands.service import Commands
from gateway.config import GatewayConfig, Options, changes, reread
from gateway.errors import StartError
from gateway.ingest.core import Ingest
from gateway.ingest.rates import DeviceRates
from gateway.net.limits import ConnectionLimits
from gateway.net.listeners import Listeners, Port, TLSWrapper
from gateway.ops.console import Console
from gateway.ops.devicewatch import DeviceWatch
from gateway.ops.health import Health
from gateway.ops.logs import LevelFilter, make_observer, twistd_log_file
from gateway.ops.metrics import GatewayMetrics
from gateway.ops.process import GatewayProcess
from gateway.ops.status import StatusWatch
from gateway.ops.system import connection_metrics, stop_within
from gateway.outbound.system import Outbound
from gateway.outbound.uploader import gateway_id
from gateway.readings import CloseReason, Source
from gateway.storage import embedded
from gateway.storage.pool import PgPool
from gateway.storage.system import Storage
from gateway.transport import DeviceRegistry, TransportContext, built
from gateway.ui.system import Surfaces, operations_ports

__all__ = ["Options", "makeService", "build", "GatewayService", "GatewayProcess"]

log = Logger()

CommandLine = Mapping[str, Any] | None  # the options given on the command line, which a SIGHUP keeps
TLS_RENEWAL_CHECK = 6 * 3600.0  # seconds between looks at whether the data directory's certificate is due


def build(config: GatewayConfig, reactor: Reactor, *, command_line: CommandLine = None) -> GatewayService:
    """The gateway's service tree for ``config``, on ``reactor``; the caller starts and stops it."""
    return GatewayService(config, reactor, command_line=command_line)


class GatewayService(MultiService):
    def __init__(self, config: GatewayConfig, reactor: Reactor, *, command_line: CommandLine = None) -> None:
        super().__init__()
        self.config, self.reactor = config, reactor
        self.command_line = dict(command_line or {})  # kept for SIGHUP: the command line still wins
        self.log_levels = LevelFilter(config.log_level)
        self.metrics = GatewayMetrics(reactor)
        self.storage = Storage(config, reactor, self.in_thread)
        self.store = self.storage.store
        self.store.batch_observers.append(self.metrics.committed)
        rates, quality, types = DeviceRates(config.device_rate, reactor), config.quality, config.device_types
        self.ingest = Ingest(self.store, reactor, self.metrics, rates, quality=quality, device_types=types)
        self.outbound = Outbound(config, reactor, self.in_thread, self.store.listeners)
        self.alerts = self.outbound.alerts
        self.ingest.observers.append(self.alerts.observe)
        self.limits = ConnectionLimits(config.max_connections, config.max_connections_per_address, self._refused)
        self.reads = PgPool(reactor, 2)  # the read API, status checks and transports, apart from the writers
        self.registry = DeviceRegistry()
        identity = lambda: gateway_id(self.config.data_dir)  # noqa: E731 - known once the data directory is
        self.commands = Commands(reactor, identity, config, [self.alerts.command_finished])
        context = TransportContext(self.ingest, reactor, self.registry, identity, self.reads.run, self.commands)
        self.transports = built(config, context)  # every installed transport this configuration uses
        self.health = Health(
            self.store,
            stall_after=config.sink_stall,
            uploader=lambda: self.outbound.uploader,
            transports=lambda: [*self.transports, self.commands],
            retention=lambda: self.outbound.retention,
            compressor=lambda: self.storage.compressor,
            packer=lambda: self.storage.packer,
            oidc=lambda: self.surfaces.oidc,
            embedded=self.storage.supervisor.status if self.storage.supervisor else None,
        )
        v1, hub = self.transports.resources(), (self.reads, self.ingest, self.health, self.metrics, self.in_thread)
        self.surfaces = Surfaces(config, reactor, *hub, v1, self.commands)
        self.site, self.api = self.surfaces.site, self.surfaces.api
        query = lambda sql, params: self.reads.run(lambda c: c.runQuery(sql, params))  # noqa: E731
        self.status = StatusWatch(query, self.surfaces.status_policy, reactor, config.status_interval)
        self.console = Console(self)
        self.watch = DeviceWatch(reactor, self.transports.online, self._revoked, self._devices_changed)
        self.metrics.live.sources += [connection_metrics(self.connections), self.storage.live_metrics]
        self.metrics.live.sources += [self.status.live_metrics, self.outbound.live_metrics]
        self.metrics.live.sources += [self.transports.live_metrics, self.commands.live_metrics]
        self.tls = TLSWrapper(reactor, config.tls_dir, config.tls_cert, config.tls_key)
        self.listeners = Listeners(reactor, self.tls, self.limits)
        self.listeners.setServiceParent(self)
        self.ready: Deferred = Deferred()  # fires when the store is connected
        self.listening: Deferred = Deferred()  # fires when the ports take connections (ready, or serving without it)
        self.failure: str | None = None
        self.stopping = False

    def in_thread(self, f: Any, *args: Any, **kw: Any) -> Deferred:
        """Run blocking work (starting PostgreSQL, migrations, gzip, fsync) in the reactor's thread pool."""
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args, **kw)

    # -- what the tests, the console and /healthz look up ------------------

    uploader = property(lambda self: self.outbound.uploader)
    notifier = property(lambda self: self.outbound.notifier)
    https_port = property(lambda self: next(iter(self.listeners.ports("https")), None))
    metrics_port = property(lambda self: next(iter(self.listeners.ports("metrics")), None))
    manhole_port = property(lambda self: next(iter(self.listeners.ports("manhole")), None))
    device_ports = property(lambda self: self.listeners.ports("device"))
    mqtt_ports = property(lambda self: self.listeners.ports("mqtt"))

    def transport(self, name: str) -> Any:
        """The running transport of that name (None when this gateway has none)."""
        return self.transports.named(name)

    # -- start ---------------------------------------------------------

    def _ports(self) -> list[Port]:
        ops = operations_ports(self.config, self.health, self.metrics, self.console.namespace, self.reactor)
        return [self.surfaces.port(self.config), *self.transports.ports(), *ops]

    def privilegedStartService(self) -> None:
        """Data directory, journal, ports; raises StartError (one line) when one of them cannot be had."""
        try:
            self.config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            message = f"--data-dir: cannot create {str(self.config.data_dir)!r}: {e.strerror}"
            raise self._failed(message, ready=False) from None
        try:
            self.storage.open()
            for port in self._ports():
                self.listeners.add(port)
            renewal = self.tls.renewal(TLS_RENEWAL_CHECK)  # the data directory's certificate, before it expires
            if renewal is not None:
                renewal.setServiceParent(self)
            super().privilegedStartService()
        except StartError as e:
            raise self._failed(str(e), ready=False) from None

    def startService(self) -> None:
        super().startService()
        self.surfaces.start()
        # Fires when the start has finished, failed or given up (a stop while it waited).
        self.starting = Deferred.fromCoroutine(self._start()).addErrback(self._start_failed)

    async def _start(self) -> None:
        dsn = await self.storage.database(lambda: self.stopping, self._open)
        up = await self.storage.connect(dsn, self)
        await self.outbound.start_uploader(dsn, self)
        await self.storage.upkeep(dsn, self)
        await self.outbound.start_retention()
        await self.watch.start(dsn)
        await self.reads.start(dsn)
        await self.commands.start(dsn)
        self.status.setServiceParent(self)
        await self.transports.start(self)
        await self.outbound.start_alerts()
        self._open()
        log.info("gateway ready: {up} database connections", up=up)
        self.ready.callback(self)

    def _open(self) -> None:
        self.listeners.open()
        if not self.listening.called:
            self.listening.callback(self)

    def _devices_changed(self, names: list[str] | None) -> None:
        self.storage.forget(names)
        self.transports.forget(names)

    def _start_failed(self, f: Failure) -> None:
        if self.stopping:
            log.info("start abandoned: the gateway is stopping ({reason})", reason=f.getErrorMessage())
            return
        message = str(f.value) if f.check(StartError, embedded.EmbeddedDatabaseError) else None
        if message is None:
            log.failure("gateway failed to start", f)
            message = f"{f.type.__name__}: {f.getErrorMessage()}"  # type: ignore[union-attr]
        self._failed(message)

    def _failed(self, message: str, ready: bool = True) -> StartError:
        """Record why the start failed; past ``privilegedStartService`` (which raises) ``ready`` errbacks."""
        self.failure = message
        error = StartError(message)
        if ready and not self.ready.called:
            self.ready.errback(error)
        return error

    # -- stop ----------------------------------------------------------

    async def _stop(self) -> None:
        await self.listeners.stopService()
        await self.watch.stop()
        sessions = self.transports.sessions()
        for session in sessions:
            session.stop_reading()
        # The store commits what is in flight; the devices' ACKs go out as it does.
        await super().stopService()
        for session in sessions:
            session.end(CloseReason.SHUTTING_DOWN, "the gateway is stopping; reconnect later")
        await self.outbound.close()
        await self.commands.stop()
        await self.reads.close()
        await self.storage.close()

    def stopService(self) -> Deferred:
        """Stop as in the module's docstring; past --shutdown-timeout, cut what is left and finish."""
        self.stopping, timeout = True, self.config.shutdown_timeout

        def cut() -> Deferred:
            for session in self.transports.sessions():
                session.transport.abortConnection()
            return self.storage.cut(timeout)

        return stop_within(Deferred.fromCoroutine(self._stop()), timeout, self.reactor, cut)

    # -- devices and connections, for the console, /metrics and the device watch --

    def _refused(self, address: str, why: str) -> None:
        code, message = self.limits.refusal(address, why)
        self.ingest.refuse(Source("tcp", address), code, message, closing=True)

    def connections(self) -> dict[str, int]:
        """Open connections by transport."""
        return {**self.surfaces.connections(), **self.transports.connections()}

    def _revoked(self, session: Any, reason: str) -> None:
        device, source = session.device.name, session.source
        log.info("closing device {device} at {source}: {reason}", device=device, source=source, reason=reason)
        session.end(CloseReason.NOT_AUTHORIZED, reason)

    # -- SIGHUP ----------------------------------------------------------

    def reload(self) -> Deferred:
        """Re-read the config file; apply what can change live, log what needs a restart."""
        return Deferred.fromCoroutine(self._reload()).addErrback(lambda f: log.failure("reload failed", f))

    async def _reload(self) -> list[str]:
        if self.tls.renew():  # a certificate renewed or moved to the new layout by gatewayctl: taken now
            log.info("SIGHUP: the data directory's TLS certificate was taken up")
        path, new = reread(self.config, self.command_line)
        if new is None:
            return []
        self.config, live, later = changes(self.config, new)
        new = self.config
        # Sinks and the transports' own settings are reported by what they changed.
        applied = [n.replace("_", "-") for n in live if n not in new.transport and n != "sinks" and "upload_" not in n]
        self.log_levels.set(new.log_level)
        self.store.reconfigure(new.max_queue)
        self.health.reconfigure(new.sink_stall)
        self.ingest.reconfigure(new.device_rate, new.quality, new.device_types)
        self.surfaces.reconfigure(new)
        self.commands.reconfigure(new)
        self.status.set_interval(new.status_interval)
        applied += await self.transports.reconfigure(new)
        applied += await self.outbound.reconfigure(new)
        waiting = ", ".join(n.replace("_", "-") for n in later) or "nothing"
        message = "SIGHUP: re-read {path}; applied: {applied}; needs a restart: {later}"
        log.info(message, path=str(path), applied=", ".join(applied) or "nothing", later=waiting)
        return applied + [f"restart: {n.replace('_', '-')}" for n in later]


def makeService(options: Options) -> GatewayProcess:
    from twisted.internet import reactor

    config = options.gateway_config
    gateway = build(config, as_reactor(reactor), command_line=options.command_line)
    twistd = options.parent
    observer = None
    if twistd is None or not twistd.get("syslog"):
        observer = make_observer(config.log_format, twistd_log_file(twistd), gateway.log_levels)
    return GatewayProcess(gateway, gateway.reactor, observer, os.environ)
