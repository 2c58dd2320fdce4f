"""
The assembler: options in, the gateway's service tree out. ``build(config,
reactor)`` wires the components and returns the tree without touching the
process; ``makeService`` (twistd's entry point) is the only place that uses
the global reactor, and wraps the tree in ``GatewayProcess``
(``ops/process.py``), which alone installs signal handlers, tunes the
garbage collector, notifies systemd and sets the exit status.

Start order. ``privilegedStartService`` makes the data directory, opens
the journal, and binds every listening port (a ``Listener`` each, children
of one ``Listeners`` service), so a port in use or a bad certificate stops
the start at once with one line. ``startService`` then starts the embedded
PostgreSQL and applies migrations in a thread (both block), and opens the
store's connection pool. Only then do the HTTPS and device ports accept
connections: until the gateway can answer, connections wait in the kernel's
queue (the listen backlog) rather than get 503. Stop order is
the reverse: stop listening, let the store commit and answer what is in
flight, close the pools, stop the database.

SIGHUP re-reads the config file; each component applies its own part
through its ``reconfigure``, and the log says what changed and what waits
for a restart. Each component that has live figures for /metrics yields
them from its own ``live_metrics``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from gateway.api import openapi
from gateway.api.read import ReadApi
from gateway.api.resource import ApiResource
from gateway.api.oidc import Oidc
from gateway.api.sessions import Sessions
from gateway.ui.resource import UiResource
from gateway.backoff import Backoff
from gateway.config import LIVE_TABLES, ConfigError, GatewayConfig, Options, all_settings, build_config, load_toml
from gateway.errors import StartError
from gateway.ingest.core import Ingest
from gateway.ingest.rates import DeviceRates
from gateway.ops.console import BANNER, Console
from gateway.ops.devicewatch import DeviceWatch
from gateway.ops.health import Health
from gateway.ops.logs import LevelFilter, make_observer, twistd_log_file
from gateway.ops.manhole import ManholeError, console_factory
from gateway.families import gauge
from gateway.ops.metrics import GatewayMetrics
from gateway.ops.process import GatewayProcess
from gateway.ops.status import StatusPolicy, StatusWatch
from gateway.outbound.alerts import AlertEngine
from gateway.outbound.notices import AlertNotifier
from gateway.outbound.retention import Retention
from gateway.storage.cold import Compressor
from gateway.storage.partitions import PartitionKeeper
from gateway.storage.packing import Packer
from gateway.outbound.sinks import Sink
from gateway.outbound.uploader import Uploader, gateway_id, warn_unconfigured
from gateway.readings import CloseReason, Source, counted
from gateway.storage import embedded
from gateway.storage.database import DatabaseAway, describe_dsn, prepare_database
from gateway.storage.known import KnownDevices
from gateway.storage.journal import Journal, JournalError
from gateway.storage.pool import PgPool
from gateway.storage.store import PostgresStore
from gateway.storage.supervisor import DatabaseSupervisor
from gateway.transport import DeviceRegistry, Port, Transport, TransportContext, transports
from gateway.web.site import GatewaySite, OperationsRoot
from gateway.net.limits import ConnectionLimits, LimitedFactory
from gateway.net.listeners import Listener, Listeners, TLSWrapper

__all__ = ["Options", "makeService", "build", "GatewayService", "GatewayProcess"]

log = Logger()

# Settings a SIGHUP applies while running; every other change waits for a restart.
TLS_RENEWAL_CHECK = 6 * 3600.0  # seconds between looks at whether the data directory's certificate is due


def build(config: GatewayConfig, reactor: Any, *, command_line: Mapping[str, Any] | None = None) -> GatewayService:
    """The gateway's service tree for ``config``, on ``reactor``; the caller starts and stops it."""
    return GatewayService(config, reactor, command_line=command_line)


class GatewayService(MultiService):
    def __init__(self, config: GatewayConfig, reactor: Any, *, command_line: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.command_line = dict(command_line or {})  # kept for SIGHUP: the command line still wins
        self.log_levels = LevelFilter(config.log_level)
        self.metrics = GatewayMetrics(reactor)
        self.embedded = None if config.db else embedded.EmbeddedPostgres(config.pg_dir)
        self.supervisor = DatabaseSupervisor(self.embedded, reactor, self.in_thread) if self.embedded else None
        self.journal = (
            Journal(config.journal_dir, config.journal_max_bytes, in_thread=self.in_thread)
            if config.journal_max_bytes
            else None
        )
        self.store = PostgresStore(
            reactor,
            pool_size=config.pool_size,
            max_batch=config.max_batch,
            commit_delay=config.commit_delay,
            max_queue=config.max_queue,
            journal=self.journal,
        )
        self.store.batch_observers.append(self.metrics.committed)
        self.ingest = Ingest(
            self.store,
            reactor,
            self.metrics,
            DeviceRates(config.device_rate, reactor),
            quality=config.quality,
            device_types=config.device_types,
        )
        self.limits = ConnectionLimits(
            config.max_connections, config.max_connections_per_address, self._connection_refused
        )
        self.health = Health(
            self.store,
            stall_after=config.sink_stall,
            uploader=lambda: self.uploader,
            transports=lambda: self.transports,
            retention=lambda: self.retention,
            compressor=lambda: self.compressor,
            packer=lambda: self.packer,
            oidc=lambda: self.oidc,
            embedded=self.supervisor.status if self.supervisor else None,
        )
        self.reads = PgPool(reactor, 2)  # the read API and the status checks, apart from the writers
        self.status_policy = StatusPolicy(config.quality, {t.name: t for t in config.device_types})
        self.sessions = Sessions(self.reads, reactor)
        self.oidc = Oidc(config.oidc, reactor) if config.oidc is not None else None
        self.api = ReadApi(
            self.reads,
            reactor,
            self.status_policy,
            openapi.document(),
            self.sessions,
            self.oidc.verifier if self.oidc is not None else None,
        )
        self.status = StatusWatch(
            lambda sql, params: self.reads.run(lambda c: c.runQuery(sql, params)),
            self.status_policy,
            reactor,
            config.status_interval,
        )
        # The device transports: every installed plugin that has something to do with this configuration.
        self.registry = DeviceRegistry()
        context = TransportContext(
            self.ingest, reactor, self.registry, lambda: gateway_id(self.config.data_dir), self.reads.run
        )
        self.transports: list[Transport] = [
            t for t in (plugin.build(config, context) for plugin in transports()) if t is not None
        ]
        self.site = GatewaySite(
            self.ingest,
            self.store,
            clock=reactor,
            max_body=config.max_body,
            request_timeout=config.request_timeout,
            health=self.health,
            metrics_here=config.metrics is None,
            api=ApiResource(self.api),
            ui=UiResource(self.api, self.sessions, self.metrics, self.in_thread, self.oidc),
            v1={name: r for t in self.transports for name, r in t.resources().items()},
        )
        self.alerts_pool = PgPool(reactor, 1)  # alert changes and notices, off the writers' pool
        self.alerts = AlertEngine(config.alerts, self.alerts_pool, reactor, notify=config.alert_webhook is not None)
        self.ingest.observers.append(self.alerts.observe)
        self.notifier: AlertNotifier | None = None
        self.uploader: Uploader | None = None
        self.partitions: PartitionKeeper | None = None
        self.retention: Retention | None = None
        self.compressor: Compressor | None = None
        self.packer: Packer | None = None
        self.console = Console(self)
        # Devices known from the last run answer while the database is away (only a journal can take their writes).
        self.known = (
            KnownDevices(
                config.known_devices_file,
                self.store.credentials,
                lambda sql, params: self.store.pool.run(lambda c: c.runQuery(sql, params)),
                reactor,
                self.in_thread,
            )
            if self.journal is not None
            else None
        )
        self.watch = DeviceWatch(reactor, self.online_sessions, self._revoked, self._devices_changed)
        for source in (self._connection_metrics, self.store.live_metrics, self.status.live_metrics):
            self.metrics.live.sources.append(source)
        self.metrics.live.sources.append(self.alerts.live_metrics)
        for t in self.transports:
            self.metrics.live.sources.append(t.live_metrics)
        self.listeners = Listeners()
        self.tls = TLSWrapper(reactor, config.tls_dir, config.tls_cert, config.tls_key)
        self.listeners.setServiceParent(self)
        self.ready: Deferred = Deferred()  # fires when the store is connected
        self.listening: Deferred = Deferred()  # fires when the ports take connections (ready, or serving without it)
        self.failure: str | None = None
        self.stopping = False

    def in_thread(self, f: Any, *args: Any, **kw: Any) -> Deferred:
        """Run blocking work (starting PostgreSQL, migrations, gzip, fsync) in the reactor's thread pool."""
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args, **kw)

    # -- the ports, as the tests and the console see them ---------------------

    def _port(self, option: str) -> Any:
        return next((s.port for s in self.listeners if s.option == option), None)

    @property
    def https_port(self) -> Any:
        return self._port("https")

    @property
    def metrics_port(self) -> Any:
        return self._port("metrics")

    @property
    def manhole_port(self) -> Any:
        return self._port("manhole")

    def transport(self, name: str) -> Any:
        """The running transport of that name (None when this gateway has none)."""
        return next((t for t in self.transports if t.name == name), None)

    @property
    def device_ports(self) -> list[Any]:
        return [s.port for s in self.listeners if s.option == "device"]

    @property
    def mqtt_ports(self) -> list[Any]:
        return [s.port for s in self.listeners if s.option == "mqtt"]

    # -- start ---------------------------------------------------------

    def _listeners(self) -> list[Listener]:
        """A Listener for every configured endpoint (TLS certificates made here if need be)."""
        config, reactor = self.config, self.reactor
        tls = self.tls

        def listener(port: Port) -> Listener:
            factory = port.factory
            if port.spec.tls:
                factory = tls.wrap(port.spec, factory, port.option, port.client_ca)
            if port.devices:
                # Outside TLS: a connection over the limits costs no handshake.
                factory = LimitedFactory(factory, self.limits)
            # The ports that take readings open only once the gateway can answer.
            return Listener(reactor, port.spec, factory, port.option, port.what, held=port.devices)

        out = [listener(Port(config.https, self.site, "https", "HTTPS" if config.https.tls else "HTTP"))]
        if not config.https.tls:
            log.warn("--https {spec} serves plain HTTP: device tokens cross the network in clear", spec=config.https)
        out += [listener(port) for t in self.transports for port in t.ports()]
        if config.metrics is not None:
            site = server.Site(OperationsRoot(self.health, self.metrics), timeout=config.request_timeout)
            site.displayTracebacks = False
            what = "/metrics and /healthz (HTTP)"
            out.append(listener(Port(config.metrics, site, "metrics", what, devices=False)))
        if config.manhole is not None:
            try:
                console = console_factory(
                    config.manhole_dir, config.authorized_keys, self.console.namespace, BANNER, reactor
                )
            except ManholeError as e:
                raise StartError(f"--manhole: {e}") from None
            out.append(listener(Port(config.manhole, console, "manhole", "the SSH console", devices=False)))
        return out

    def privilegedStartService(self) -> None:
        """Data directory, journal, ports; raises StartError (one line) when one of them cannot be had."""
        try:
            self.config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise self._failed(
                f"--data-dir: cannot create {str(self.config.data_dir)!r}: {e.strerror}", ready=False
            ) from None
        if self.journal is not None:
            try:
                self.journal.open()
            except JournalError as e:
                raise self._failed(f"--data-dir: journal: {e}", ready=False) from None
            if self.journal.size:
                log.info(
                    "journal: {bytes} bytes in {segments} segments from an earlier run; replayed once the "
                    "database answers",
                    bytes=self.journal.size,
                    segments=self.journal.segments,
                )
        try:
            for one in self._listeners():
                one.setServiceParent(self.listeners)
            if self.tls.local is not None:
                # The data directory's certificate is renewed before it expires, without a restart.
                renewal = TimerService(TLS_RENEWAL_CHECK, self.tls.renew)
                renewal.clock = self.reactor
                renewal.setServiceParent(self)
            super().privilegedStartService()
        except StartError as e:
            raise self._failed(str(e), ready=False) from None

    def startService(self) -> None:
        super().startService()
        if self.oidc is not None:
            # The provider's keys, fetched while the rest starts (a failure is logged; a token fetches them again).
            Deferred.fromCoroutine(self.oidc.keys.fetch())
        # Fires when the start has finished, failed or given up (a stop while it waited).
        self.starting = Deferred.fromCoroutine(self._start()).addErrback(self._start_failed)

    async def _start(self) -> None:
        config = self.config
        if self.known is not None:
            await self.known.load()
        where = (
            f"embedded PostgreSQL in {config.pg_dir}"
            if self.embedded
            else f"PostgreSQL at {describe_dsn(config.db or '')}"
        )
        log.info("database: {where}", where=where)
        dsn = await self._wait_for_database()
        up = await self.store.connect(dsn)
        if up == 0:
            raise StartError(f"database: no connection could be opened: {self.store.pool.last_error}")
        self.store.setServiceParent(self)
        if self.known is not None:
            self.known.setServiceParent(self)
        self.dsn = dsn
        if self.supervisor is not None:
            self.metrics.live.sources.append(self.supervisor.live_metrics)
            self.supervisor.setServiceParent(self)
        if config.sinks:
            await self._start_uploader(config.sinks)
        self.partitions = PartitionKeeper(self.reactor, config.partition)
        await self.partitions.start(dsn)
        self.partitions.setServiceParent(self)
        if config.compress_after is not None:
            compressor = Compressor(self.reactor, config.compress_after)
            await compressor.connect(dsn)
            compressor.setServiceParent(self)
            self.compressor = compressor
        if config.pack_after is not None:
            packer = Packer(self.reactor, config.pack_after)
            await packer.connect(dsn)
            packer.setServiceParent(self)
            self.packer = packer
        if config.retention is not None:
            retention = Retention(self.reactor, config.retention)
            await retention.connect(dsn)
            if not config.sinks:  # no uploader to say which sinks hold retention back
                warn_unconfigured(await retention.sinks())
            retention.setServiceParent(self)
            self.retention = retention
        await self.watch.start(dsn)
        await self.reads.start(dsn)
        self.status.setServiceParent(self)
        for t in self.transports:
            await t.prepare()
            t.setServiceParent(self)
        await self.alerts_pool.start(dsn)
        await self.alerts.load()
        if config.alert_webhook is not None:
            self._start_notifier(config)
        self._open()
        log.info("gateway ready: {up} database connections", up=up)
        self.ready.callback(self)

    async def _wait_for_database(self) -> str:
        """
        Start the embedded server / reach the external one and migrate; while it
        does not answer, try again with backoff, and after ``--db-wait`` seconds
        open the ports anyway: known devices are then acknowledged into the journal.
        """
        backoff, opener = Backoff(first=1.0, cap=10.0), None
        try:
            while True:
                try:
                    dsn: str = await self.in_thread(prepare_database, self.config.db, self.embedded)
                except (DatabaseAway, embedded.EmbeddedDatabaseError) as e:
                    if self.stopping:
                        raise
                    if opener is None:
                        log.warn(
                            "the database does not answer: {error}; trying again, and opening the ports in "
                            "{wait:g}s anyway",
                            error=str(e),
                            wait=self.config.db_wait,
                        )
                        opener = self.reactor.callLater(self.config.db_wait, self._open_without_database)
                    await deferLater(self.reactor, backoff.failed(), lambda: None)
                    if self.stopping:
                        raise StartError("the gateway stopped before the database answered") from None
                    continue
                if self.stopping:
                    # Stopped while the database was being started: stopping has already let go of it.
                    if self.embedded is not None:
                        await self.in_thread(self.embedded.stop)
                    raise StartError("the gateway stopped before the database answered")
                return dsn
        finally:
            if opener is not None and opener.active():
                opener.cancel()

    def _open_without_database(self) -> None:
        if self.journal is None:
            log.warn("serving without the database: without a journal every write gets 503 until it answers")
        else:
            log.warn(
                "serving without the database: {devices} known from the last run are acknowledged into "
                "the journal; others get 503 until it answers",
                devices=counted(self.store.credentials.known, "device"),
                known=self.store.credentials.known,
            )
        self._open()

    def _open(self) -> None:
        for listener in self.listeners:
            listener.open()
        if not self.listening.called:
            self.listening.callback(self)

    def _devices_changed(self, names: list[str] | None) -> None:
        self.store.forget_credentials(names)
        for t in self.transports:
            t.forget(names)
        if self.known is not None:
            self.known.changed()

    def _start_notifier(self, config: GatewayConfig) -> None:
        sink = Sink(
            name="alert-webhook",
            url=config.alert_webhook or "",
            ca=config.upload_ca,
            backoff=config.upload_backoff,
            backoff_cap=config.upload_backoff_cap,
            timeout=config.upload_timeout,
        )
        self.notifier = AlertNotifier(sink, self.alerts_pool, self.reactor, gateway_id(config.data_dir))
        self.alerts.on_change.append(self.notifier.wake)
        self.metrics.live.sources.append(self.notifier.live_metrics)
        self.notifier.setServiceParent(self)

    async def _start_uploader(self, sinks: tuple[Any, ...]) -> None:
        uploader = Uploader(self.reactor, sinks, gateway_id(self.config.data_dir), self.in_thread)
        await uploader.connect(self.dsn)
        self.store.listeners.append(uploader.committed)
        self.metrics.live.sources.append(uploader.live_metrics)
        uploader.setServiceParent(self)
        self.uploader = uploader

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
        """
        Record why the start failed. Past ``privilegedStartService`` (which raises
        to its caller instead) ``ready`` errbacks with it.
        """
        self.failure = message
        error = StartError(message)
        if ready and not self.ready.called:
            self.ready.errback(error)
        return error

    # -- stop ----------------------------------------------------------

    async def _stop(self) -> None:
        await self.listeners.stopService()
        await self.watch.stop()
        sessions = self.device_sessions()
        for session in sessions:
            session.stop_reading()
        # The store commits what is in flight; the devices' ACKs go out as it does.
        await super().stopService()
        for session in sessions:
            session.end(CloseReason.SHUTTING_DOWN, "the gateway is stopping; reconnect later")
        await self.alerts.settled()
        await self.reads.close()
        await self.alerts_pool.close()
        if self.journal is not None:
            await self.journal.close()
        if self.embedded is not None:
            await self.in_thread(self.embedded.stop)

    def stopService(self) -> Deferred:
        """Stop as in the module's docstring; past --shutdown-timeout, cut what is left and finish."""
        self.stopping = True
        stopped = Deferred.fromCoroutine(self._stop())
        timeout = self.config.shutdown_timeout
        out: Deferred = Deferred()

        def finished(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if not out.called:
                out.callback(None)
            if isinstance(result, Failure):
                log.failure("stopping the gateway failed", result)

        def too_slow() -> None:
            log.warn(
                "stopping took over {timeout:g}s; closing what is left (unanswered writes are not acknowledged: "
                "devices send them again): {batches} transactions under way, {queued} readings queued",
                timeout=timeout,
                batches=self.store.batches_in_flight,
                queued=self.store.queue_depth,
            )
            for session in self.device_sessions():
                session.transport.abortConnection()
            hurry = self.in_thread(self.embedded.stop) if self.embedded is not None else succeed(None)

            def done(_: Any) -> None:
                if not out.called:
                    out.callback(None)

            hurry.addBoth(done)

        timer = self.reactor.callLater(timeout, too_slow)
        stopped.addBoth(finished)
        return out

    def _connection_refused(self, address: str, why: str) -> None:
        limit = self.limits.max_total if why == "total" else self.limits.max_per_address
        count = self.limits.total if why == "total" else self.limits.by_address.get(address, 0)
        scope = "in all" if why == "total" else "from this address"
        self.ingest.refuse(
            Source("tcp", address),
            f"connection_limit_{why}",
            f"{count} open connections {scope} (limit {limit})",
            closing=True,
        )

    # -- what the console, /metrics and the device watch read ------------

    def connections(self) -> dict[str, int]:
        """Open connections by transport."""
        out = {("https" if self.config.https.tls else "http"): self.site.open_connections}
        for t in self.transports:
            for label, count in t.connections().items():
                out[label] = out.get(label, 0) + count
        return out

    def device_sessions(self) -> list[Any]:
        """Every device session open now, of every transport."""
        return [session for t in self.transports for session in t.sessions()]

    def _connection_metrics(self) -> Iterator[Any]:
        conns = gauge("gateway_connections", "Open connections, by transport.", labels=["transport"])
        for transport, count in sorted(self.connections().items()):
            conns.add_metric([transport], count)
        yield conns

    def online_sessions(self) -> dict[str, list[Any]]:
        """Device sessions by device name (authenticated ones)."""
        out: dict[str, list[Any]] = {}
        for session in self.device_sessions():
            if session.device is not None:
                out.setdefault(session.device.name, []).append(session)
        return out

    def close_device(self, name: str, code: Any, reason: str) -> int:
        sessions = self.online_sessions().get(name, [])
        for session in sessions:
            session.end(code, reason)
        return len(sessions)

    def _revoked(self, session: Any, reason: str) -> None:
        log.info(
            "closing device {device} at {source}: {reason}",
            device=session.device.name,
            source=session.source,
            reason=reason,
        )
        session.end(CloseReason.NOT_AUTHORIZED, reason)

    # -- SIGHUP ----------------------------------------------------------

    def reload(self) -> Deferred:
        """Re-read the config file; apply what can change live, log what needs a restart."""
        return Deferred.fromCoroutine(self._reload()).addErrback(lambda f: log.failure("reload failed", f))

    async def _reload(self) -> list[str]:
        if self.tls.renew():  # a certificate renewed or moved to the new layout by gatewayctl: taken now
            log.info("SIGHUP: the data directory's TLS certificate was taken up")
        path = self.config.config_file
        if path is None:
            log.info("SIGHUP: the gateway was started without --config; nothing to re-read")
            return []
        try:
            new = build_config(self.command_line, load_toml(path), path)
        except ConfigError as e:
            log.error("SIGHUP: {path} not applied, the running settings stay: {error}", path=str(path), error=str(e))
            return []
        old = self.config
        before, after = old.values(), new.values()
        changed = [name for name in after if before.get(name) != after[name]]
        live_now = {s.key for s in all_settings() if s.live} | LIVE_TABLES
        live = [name for name in changed if name in live_now]
        later = [name for name in changed if name not in live_now]
        self.config = dataclasses.replace(
            old,
            **{name: after[name] for name in live if name not in old.transport},
            transport={**old.transport, **{name: after[name] for name in live if name in old.transport}},
        )
        # Sinks and the transports' own settings are reported by what they changed.
        applied = [
            name.replace("_", "-")
            for name in live
            if name != "sinks" and name not in old.transport and not name.startswith("upload_")
        ]
        self.log_levels.set(new.log_level)
        self.site.reconfigure(new.max_body, new.request_timeout)
        self.store.reconfigure(new.max_queue)
        self.health.reconfigure(new.sink_stall)
        self.ingest.reconfigure(new.device_rate, new.quality, new.device_types)
        self.status_policy.reconfigure(new.quality, new.device_types)
        self.alerts.reconfigure(new.alerts)
        self.status.set_interval(new.status_interval)
        for t in self.transports:
            applied += await t.reconfigure(self.config)
        if new.sinks != old.sinks:
            if self.uploader is not None:
                applied += await self.uploader.reconfigure(new.sinks)
            elif new.sinks:
                await self._start_uploader(new.sinks)
                applied += [f"sink {sink.name} added" for sink in new.sinks]
        log.info(
            "SIGHUP: re-read {path}; applied: {applied}; needs a restart: {later}",
            path=str(path),
            applied=", ".join(applied) or "nothing",
            later=", ".join(n.replace("_", "-") for n in later) or "nothing",
        )
        return applied + [f"restart: {n.replace('_', '-')}" for n in later]


def makeService(options: Options) -> GatewayProcess:
    from twisted.internet import reactor

    config = options.gateway_config
    gateway = build(config, reactor, command_line=options.command_line)
    twistd = options.parent
    observer = None
    if twistd is None or not twistd.get("syslog"):
        observer = make_observer(config.log_format, twistd_log_file(twistd), gateway.log_levels)
    return GatewayProcess(gateway, reactor, observer, os.environ)
