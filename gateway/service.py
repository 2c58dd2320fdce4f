"""
Assembles the gateway from its options: the one module that touches the
global reactor (in ``makeService``); everything below takes it as an
argument.

Start order. ``privilegedStartService`` makes the data directory and the
TLS certificate and binds the listening ports, so a port in use or a bad
certificate stops the start at once with one line. ``startService`` then
starts the embedded PostgreSQL and applies migrations in a thread (both
block), and opens the store's connection pool. Until the pool is up,
ingest answers 503 with Retry-After: nothing is accepted that could not
be committed. Stop order is the reverse: stop listening, let the store
commit and answer what is in flight, close the pool, stop the database.

SIGHUP re-reads the config file and applies what can change while running
(sinks, limits, the log level); the log says what changed and what waits
for a restart.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg2.extensions
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.web import server

from gateway.storage import embedded
from gateway.storage import schema
from gateway.api import openapi
from gateway.outbound.alerts import AlertEngine
from gateway.outbound.notices import AlertNotifier
from gateway.api.read import ReadApi
from gateway.api.resource import ApiResource
from gateway.config import ConfigError, GatewayConfig, Options, build_config, load_toml
from gateway.ops.console import BANNER, Console
from gateway.transports.tgp_adapter import DeviceFactory, DeviceRegistry, DeviceSettings
from gateway.ops.devicewatch import DeviceWatch
from gateway.transports.endpoints import EndpointSpec
from gateway.ops.health import Health
from gateway.transports.http import GatewaySite, OperationsRoot
from gateway.ingest.core import Ingest
from gateway.storage.journal import Journal, JournalError
from gateway.ingest.rates import DeviceRates
from gateway.transports.limits import ConnectionLimits, LimitedFactory
from gateway.ops.logs import LevelFilter, make_observer, twistd_log_file
from gateway.ops.manhole import ManholeError, console_factory
from gateway.ops.metrics import GatewayMetrics, counter, gauge
from gateway.storage.pool import PgPool
from gateway.outbound.sinks import Sink
from gateway.ops.status import StatusPolicy, StatusWatch
from gateway.storage.store import PostgresStore
from gateway.transports.stdtls import TLSServerFactory, server_context
from gateway.transports.tls import TLSConfigError, make_self_signed
from gateway.ops.tuning import tune_gc
from gateway.outbound.retention import Retention
from gateway.outbound.uploader import Uploader, gateway_id
from gateway.readings import Source
from protocols import tgp

__all__ = ["Options", "makeService", "GatewayService"]

log = Logger()


class StartError(Exception):
    """The gateway cannot start; the message says why in one line."""


def describe_dsn(dsn: str) -> str:
    """A DSN fit for a log line: no password."""
    try:
        parts = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "(unparsable)"
    parts.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in sorted(parts.items()))


def prepare_database(config: GatewayConfig, embedded_pg: embedded.EmbeddedPostgres | None) -> str:
    """Start the embedded server if there is one, apply migrations; return the DSN. Blocks."""
    dsn = config.db if embedded_pg is None else embedded_pg.start()
    try:
        conn = embedded.connect(dsn, connect_timeout=10)
    except psycopg2.Error as e:
        raise StartError(f"--db: cannot connect: {str(e).strip().splitlines()[0]}") from None
    try:
        applied = schema.migrate(conn)
        with conn.cursor() as cur:
            cur.execute("SHOW fsync")
            fsync = cur.fetchone()[0]
        conn.rollback()
    except schema.SchemaError as e:
        raise StartError(f"database schema: {e}") from None
    finally:
        conn.close()
    if fsync != "on":
        log.critical(
            "the database runs with fsync={fsync}: a power cut can lose readings the gateway "
            "has acknowledged; turn fsync on in postgresql.conf",
            fsync=fsync,
        )
    if applied:
        log.info("database schema migrated to version {version}", version=applied[-1])
    return dsn


# Settings a SIGHUP applies while running; every other change waits for a restart.
LIVE_SETTINGS = frozenset(
    (
        "log_level",
        "max_body",
        "request_timeout",
        "max_queue",
        "device_window",
        "device_idle_timeout",
        "device_handshake_timeout",
        "device_rate",
        "sink_stall",
        "sinks",
        "upload_url",
        "upload_ca",
        "upload_batch",
        "upload_batch_bytes",
        "upload_flush",
        "upload_backoff",
        "upload_backoff_cap",
        "upload_timeout",
        "quality",
        "device_types",
        "status_interval",
        "alerts",
    )
)


class GatewayService(MultiService):
    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any,
        *,
        exit_on_failure: bool = False,
        command_line: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.exit_on_failure = exit_on_failure
        self.command_line = dict(command_line or {})  # kept for SIGHUP: the command line still wins
        self.log_levels = LevelFilter(config.log_level)
        self.log_observer: Any = None  # installed as the application's ILogObserver by twistd
        self.metrics = GatewayMetrics(reactor)
        self.embedded = None if config.db else embedded.EmbeddedPostgres(config.pg_dir)
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
        self.limits = ConnectionLimits(config.max_connections, config.max_connections_per_address, self._refused)
        self.health = Health(self.store, stall_after=config.sink_stall, uploader=lambda: self.uploader)
        self.reads = PgPool(reactor, 2)  # the read API and the status checks, apart from the writers
        self.status_policy = StatusPolicy(config.quality, {t.name: t for t in config.device_types})
        self.api = ReadApi(self.reads, reactor, self.status_policy, openapi.document())
        self.status = StatusWatch(
            lambda sql, params: self.reads.run(lambda c: c.runQuery(sql, params)),
            self.status_policy,
            reactor,
            config.status_interval,
        )
        self.site = GatewaySite(
            self.ingest,
            self.store,
            clock=reactor,
            max_body=config.max_body,
            request_timeout=config.request_timeout,
            health=self.health,
            metrics_here=config.metrics is None,
            api=ApiResource(self.api),
        )
        self.alerts_pool = PgPool(reactor, 1)  # alert changes and notices, off the writers' pool
        self.alerts = AlertEngine(config.alerts, self.alerts_pool, reactor, notify=config.alert_webhook is not None)
        self.ingest.observers.append(self.alerts.observe)
        self.notifier: AlertNotifier | None = None
        self.console = Console(self)
        self.watch = DeviceWatch(reactor, self.online_sessions, self._revoked, self.store.forget_credentials)
        self.metrics.live.sources.append(self._live_metrics)
        self.registry = DeviceRegistry()
        self.device_settings = DeviceSettings(
            window=config.device_window,
            idle_timeout=config.device_idle_timeout,
            handshake_timeout=config.device_handshake_timeout,
        )
        self.https_port: Any = None
        self.metrics_port: Any = None
        self.manhole_port: Any = None
        self.device_ports: list[Any] = []
        self._announced_certificate = False
        self.device_factories: list[DeviceFactory] = []
        self.uploader: Uploader | None = None
        self.ready: Deferred = Deferred()  # fires when the store is connected
        self.failure: str | None = None
        self._stopping = False

    def in_thread(self, f: Any, *args: Any, **kw: Any) -> Deferred:
        """Run blocking work (starting PostgreSQL, migrations, gzip, fsync) in the reactor's thread pool."""
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args, **kw)

    # -- start ---------------------------------------------------------

    def _credentials(self, spec: EndpointSpec, option: str) -> tuple[Any, Any, str]:
        """(certificate, key, the option they come from) for a TLS endpoint."""
        if spec.private_key is not None:
            return spec.cert_key, spec.private_key, option
        if self.config.tls_cert is not None:
            return self.config.tls_cert, self.config.tls_key, "tls-cert"
        made = make_self_signed(self.config.tls_dir)
        if made.created or not self._announced_certificate:
            self._announced_certificate = True
            log.info(
                "{what} self-signed TLS certificate {path}, SHA-256 fingerprint {fingerprint}",
                what="made" if made.created else "using",
                path=str(made.cert_path),
                fingerprint=made.fingerprint,
            )
        return made.cert_path, made.key_path, "tls-cert"

    def _tls_wrapped(self, spec: EndpointSpec, factory: Any, option: str, client_ca: Any) -> Any:
        cert, key, source = self._credentials(spec, option)
        try:
            # The ssl module's TLS: half the memory of pyOpenSSL's for idle devices,
            # and a small HTTPS request costs 13% less CPU (gateway/transports/stdtls.py).
            return TLSServerFactory(server_context(cert, key, spec.extra_cert_chain, client_ca), factory, self.reactor)
        except TLSConfigError as e:
            if client_ca is not None and str(client_ca) in str(e):
                source = "device-ca"
            raise StartError(f"--{source}: {e}") from None

    def _listen(self, spec: EndpointSpec, factory: Any, option: str, client_ca: Any = None) -> Any:
        if spec.tls:
            factory = self._tls_wrapped(spec, factory, option, client_ca)
        if option in ("https", "device"):
            # Outside TLS: a connection over the limits costs no handshake.
            factory = LimitedFactory(factory, self.limits)
        endpoint = serverFromString(self.reactor, spec.tcp_description())
        result: list[Any] = []
        endpoint.listen(factory).addBoth(result.append)  # TCP binds synchronously
        port = result[0]
        if not hasattr(port, "getHost"):
            raise StartError(f"--{option}: cannot listen on {spec}: {port.getErrorMessage()}")
        return port

    def privilegedStartService(self) -> None:
        try:
            self.config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            self._fail(f"--data-dir: cannot create {str(self.config.data_dir)!r}: {e.strerror}", startup=True)
            return
        if self.journal is not None:
            try:
                self.journal.open()
            except JournalError as e:
                self._fail(f"--data-dir: journal: {e}", startup=True)
                return
            if self.journal.bytes:
                log.info(
                    "journal: {bytes} bytes in {segments} segments from an earlier run; replayed once the "
                    "database answers",
                    bytes=self.journal.bytes,
                    segments=self.journal.segments,
                )
        try:
            spec = self.config.https
            self.https_port = self._listen(spec, self.site, "https")
            self._announce(self.https_port, "HTTPS" if spec.tls else "HTTP")
            if not spec.tls:
                log.warn("--https {spec} serves plain HTTP: device tokens cross the network in clear", spec=str(spec))
            for spec in self.config.device:
                factory = DeviceFactory(
                    self.ingest,
                    self.registry,
                    clock=self.reactor,
                    settings=self.device_settings,
                    tls=spec.tls,
                    require_client_cert=spec.tls and self.config.device_ca is not None,
                )
                client_ca = self.config.device_ca if spec.tls else None
                port = self._listen(spec, factory, "device", client_ca)
                self.device_factories.append(factory)
                self.device_ports.append(port)
                self._announce(port, "TGP over TLS" if spec.tls else "TGP")
            if self.config.metrics is not None:
                site = server.Site(OperationsRoot(self.health, self.metrics), timeout=self.config.request_timeout)
                site.displayTracebacks = False
                self.metrics_port = self._listen(self.config.metrics, site, "metrics")
                self._announce(self.metrics_port, "/metrics and /healthz (HTTP)")
            if self.config.manhole is not None:
                try:
                    factory = console_factory(
                        self.config.manhole_dir,
                        self.config.authorized_keys,
                        self.console.namespace,
                        BANNER,
                        self.reactor,
                    )
                except ManholeError as e:
                    raise StartError(f"--manhole: {e}") from None
                self.manhole_port = self._listen(self.config.manhole, factory, "manhole")
                self._announce(self.manhole_port, "the SSH console")
        except StartError as e:
            self._fail(str(e), startup=True)
            return
        super().privilegedStartService()

    @staticmethod
    def _announce(port: Any, what: str) -> None:
        host = port.getHost()
        log.info("listening for {what} on {host}:{port}", what=what, host=host.host, port=host.port)

    def startService(self) -> None:
        super().startService()
        if self.exit_on_failure:  # the real process (twistd), not a test's
            self.reactor.callWhenRunning(self._take_signals)
        Deferred.fromCoroutine(self._start()).addErrback(self._start_failed)

    def _take_signals(self) -> None:
        # twistd's own handlers stop the reactor and then kill the process
        # with the same signal, so a clean stop would end with status -15.
        # Ours stop it the same way and let the process exit 0 once done.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda number, frame: self.reactor.callFromThread(self._signalled, number))

    def _signalled(self, number: int) -> None:
        name = signal.Signals(number).name
        if self._stopping:
            log.warn("{signal} again: the gateway is already stopping", signal=name)
            return
        log.info(
            "{signal}: stopping; writes under way get up to {timeout:g}s to commit and be answered",
            signal=name,
            timeout=self.config.shutdown_timeout,
        )
        self.reactor.stop()

    async def _start(self) -> None:
        where = (
            f"embedded PostgreSQL in {self.config.pg_dir}"
            if self.embedded
            else f"PostgreSQL at {describe_dsn(self.config.db or '')}"
        )
        log.info("database: {where}", where=where)
        dsn = await self.in_thread(prepare_database, self.config, self.embedded)
        up = await self.store.connect(dsn)
        if up == 0:
            raise StartError(f"database: no connection could be opened: {self.store.pool.last_error}")
        self.store.setServiceParent(self)
        self.dsn = dsn
        if self.config.sinks:
            await self._start_uploader(self.config.sinks)
        if self.config.retention is not None:
            retention = Retention(self.reactor, self.config.retention)
            await retention.connect(dsn)
            retention.setServiceParent(self)
        await self.watch.start(dsn)
        await self.reads.start(dsn)
        self.status.setServiceParent(self)
        await self.alerts_pool.start(dsn)
        await self.alerts.load()
        if self.config.alert_webhook is not None:
            self._start_notifier(self.config)
        if self.exit_on_failure:  # the real process (twistd), not a test's
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        tune_gc()
        log.info("gateway ready: {up} database connections", up=up)
        self.ready.callback(self)

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
        self.notifier.setServiceParent(self)

    async def _start_uploader(self, sinks: tuple[Any, ...]) -> None:
        uploader = Uploader(self.reactor, sinks, gateway_id(self.config.data_dir), self.in_thread)
        await uploader.connect(self.dsn)
        self.store.listeners.append(uploader.committed)
        uploader.setServiceParent(self)
        self.uploader = uploader

    def setServiceParent(self, parent: Any) -> None:
        # twistd hands its Application here before it starts logging; an
        # ILogObserver on it replaces twistd's own (for --log-format json).
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def _start_failed(self, f: Any) -> None:
        message = str(f.value) if f.check(StartError, embedded.EmbeddedDatabaseError) else None
        if message is None:
            log.failure("gateway failed to start", f)
            message = f"{f.type.__name__}: {f.getErrorMessage()}"
        self._fail(message, startup=False)

    def _fail(self, message: str, startup: bool) -> None:
        self.failure = message
        if not self.ready.called:
            self.ready.errback(StartError(message))
            self.ready.addErrback(lambda _: None)
        if not self.exit_on_failure:
            return
        if startup:
            # Still inside twistd's start, before the reactor runs.
            raise SystemExit(f"twistd gateway: {message}")
        log.critical("gateway cannot start: {message}", message=message)
        # twistd exits 0 after a normal reactor stop; a failed start must not.
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        self.reactor.stop()

    # -- stop ----------------------------------------------------------

    async def _stop(self) -> None:
        for port in [self.https_port, *self.device_ports, self.metrics_port, self.manhole_port]:
            if port is not None:
                await port.stopListening()
        await self.watch.stop()
        sessions = [session for factory in self.device_factories for session in factory.connections]
        for session in sessions:
            session.stop_reading()
        # The store commits what is in flight; the devices' ACKs go out as it does.
        await super().stopService()
        for session in sessions:
            session.end(tgp.ErrorCode.SHUTTING_DOWN, "the gateway is stopping; reconnect later")
        await self.alerts.settled()
        await self.reads.close()
        await self.alerts_pool.close()
        if self.journal is not None:
            await self.journal.close()
        if self.embedded is not None:
            await self.in_thread(self.embedded.stop)

    def stopService(self) -> Deferred:
        """Stop as in the module's docstring; past --shutdown-timeout, cut what is left and finish."""
        self._stopping = True
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
                batches=self.store.committer.in_flight,
                queued=self.store.queue_depth,
            )
            for factory in self.device_factories:
                for session in list(factory.connections):
                    session.transport.abortConnection()
            hurry = self.in_thread(self.embedded.stop) if self.embedded is not None else succeed(None)
            hurry.addBoth(lambda _: out.called or out.callback(None))

        timer = self.reactor.callLater(timeout, too_slow)
        stopped.addBoth(finished)
        return out

    def _refused(self, address: str, why: str) -> None:
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
        for factory in self.device_factories:
            key = "tgp+tls" if factory.tls else "tgp"
            out[key] = out.get(key, 0) + len(factory.connections)
        return out

    def online_sessions(self) -> dict[str, list[Any]]:
        """TGP sessions by device name (authenticated ones)."""
        out: dict[str, list[Any]] = {}
        for factory in self.device_factories:
            for session in factory.connections:
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
        session.end(tgp.ErrorCode.AUTH_FAILED, reason)

    def _live_metrics(self) -> Iterator[Any]:
        conns = gauge("gateway_connections", "Open connections, by transport.", labels=["transport"])
        for transport, count in sorted(self.connections().items()):
            conns.add_metric([transport], count)
        yield conns
        yield gauge("gateway_store_queue_readings", "Readings waiting for COMMIT.", self.store.queue_depth)
        yield gauge(
            "gateway_store_queue_limit",
            "Readings that may wait before writers get 503.",
            self.store.committer.max_queue,
        )
        yield gauge("gateway_database_connections", "Open connections of the store's pool.", self.store.pool.up)
        yield gauge(
            "gateway_devices_silent",
            "Devices heard from longer ago than their expected interval (at the last status check).",
            len(self.status.silent),
        )
        yield gauge(
            "gateway_devices_flagged",
            "Devices over the quality failure threshold within the window (at the last status check).",
            len(self.status.flagged),
        )
        attention = gauge(
            "gateway_device_attention",
            "1 for each device that is silent or flagged, by device and reason.",
            labels=["device", "reason"],
        )
        for name in sorted(self.status.silent):
            attention.add_metric([name, "silent"], 1)
        for name in sorted(self.status.flagged):
            attention.add_metric([name, "flagged"], 1)
        yield attention
        yield gauge("gateway_alerts_open", "Edge alerts open, as this gateway knows them.", len(self.alerts.open))
        yield counter("gateway_alerts_fired", "Edge alerts this gateway recorded firing.", [], self.alerts.fired)
        yield counter("gateway_alerts_cleared", "Edge alerts this gateway recorded clearing.", [], self.alerts.cleared)
        if self.notifier is not None:
            n = self.notifier
            yield counter("gateway_alert_notices_sent", "Alert notices the webhook took.", [], n.sent)
            yield counter("gateway_alert_notices_failed", "Failed attempts to send a notice (retried).", [], n.failures)
            yield counter("gateway_alert_notices_parked", "Notices the webhook refused for good.", [], n.parked)
        yield from self._journal_metrics()
        if self.uploader is None:
            return
        status = self.uploader.sink_status()
        families = {
            "lag": gauge(
                "gateway_upload_lag_seconds", "Age of the oldest reading not yet sent to the sink.", labels=["sink"]
            ),
            "pending": gauge("gateway_upload_pending_batches", "Batches cut and not yet sent.", labels=["sink"]),
            "parked": gauge(
                "gateway_upload_parked_batches", "Batches the sink refused for good (dead letters).", labels=["sink"]
            ),
            "paused": gauge("gateway_upload_paused", "1 while the sink is paused from the console.", labels=["sink"]),
            "batches": counter("gateway_upload_batches_sent", "Batches this process sent.", ["sink"]),
            "readings": counter("gateway_upload_readings_sent", "Readings this process sent.", ["sink"]),
            "failures": counter("gateway_upload_failures", "Failed attempts (to be retried).", ["sink"]),
        }
        for name, s in status.items():
            families["lag"].add_metric([name], s.get("lag_seconds") or 0.0)
            families["pending"].add_metric([name], s.get("pending_batches") or 0)
            families["parked"].add_metric([name], s.get("parked_batches") or 0)
            families["paused"].add_metric([name], 1 if s["paused"] else 0)
            families["batches"].add_metric([name], s["batches_sent"])
            families["readings"].add_metric([name], s["readings_sent"])
            families["failures"].add_metric([name], s["failures"])
        yield from families.values()

    def _journal_metrics(self) -> Iterator[Any]:
        journal = self.journal
        if journal is None:
            return
        for name, text, value in (
            ("bytes", "Bytes in the outage journal (on disk and being written).", journal.bytes),
            ("limit_bytes", "--journal-max-bytes.", journal.max_bytes),
            ("segments", "Segment files in the outage journal.", journal.segments),
        ):
            yield gauge(f"gateway_journal_{name}", text, value)
        for name, text, value in (
            ("readings_written", "Readings acknowledged from the journal.", self.store.journaled_readings),
            ("readings_replayed", "Journal readings committed (new or found stored).", self.store.replayed_readings),
            ("fsyncs", "Journal group fsyncs.", journal.fsyncs),
            ("damaged_records", "Damaged journal regions moved aside to journal/damaged/.", journal.damaged_regions),
            ("torn_bytes", "Bytes of torn last writes dropped after a crash.", journal.torn_bytes),
        ):
            yield counter(f"gateway_journal_{name}", text, [], value)

    # -- SIGHUP ----------------------------------------------------------

    def reload(self) -> Deferred:
        """Re-read the config file; apply what can change live, log what needs a restart."""
        return Deferred.fromCoroutine(self._reload()).addErrback(lambda f: log.failure("reload failed", f))

    async def _reload(self) -> list[str]:
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
        changed = [f.name for f in dataclasses.fields(GatewayConfig) if getattr(old, f.name) != getattr(new, f.name)]
        live = [name for name in changed if name in LIVE_SETTINGS]
        later = [name for name in changed if name not in LIVE_SETTINGS]
        self.config = dataclasses.replace(old, **{name: getattr(new, name) for name in live})
        applied = [name.replace("_", "-") for name in live if name != "sinks" and not name.startswith("upload_")]
        self.log_levels.set(new.log_level)
        self.site.max_body = new.max_body
        self.site.request_timeout = new.request_timeout
        self.site.timeOut = new.request_timeout
        self.store.committer.max_queue = new.max_queue
        self.health.stall_after = new.sink_stall
        settings = dataclasses.replace(
            self.device_settings,
            window=new.device_window,
            idle_timeout=new.device_idle_timeout,
            handshake_timeout=new.device_handshake_timeout,
        )
        self.ingest.rates.rate = new.device_rate
        self.ingest.quality = self.status_policy.quality = new.quality
        self.ingest.device_types = self.status_policy.device_types = {t.name: t for t in new.device_types}
        self.alerts.rules = new.alerts
        if new.status_interval != old.status_interval:
            self.status.set_interval(new.status_interval)
        self.device_settings = settings
        for factory in self.device_factories:
            factory.settings = settings
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


def makeService(options: Options) -> GatewayService:
    from twisted.internet import reactor

    config = options.gateway_config
    service = GatewayService(config, reactor, exit_on_failure=True, command_line=options.command_line)
    twistd = options.parent
    if twistd is None or not twistd.get("syslog"):
        service.log_observer = make_observer(config.log_format, twistd_log_file(twistd), service.log_levels)
    return service
