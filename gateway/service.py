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
"""

from __future__ import annotations

import os
from typing import Any

import psycopg2.extensions
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from gateway import embedded, schema
from gateway.config import GatewayConfig, Options
from gateway.device import DeviceFactory, DeviceRegistry, DeviceSettings
from gateway.endpoints import EndpointSpec
from gateway.http import GatewaySite
from gateway.ingest import Ingest
from gateway.store import PostgresStore
from gateway.stdtls import TLSServerFactory, server_context
from gateway.tls import TLSConfigError, make_self_signed, server_options
from gateway.tuning import tune_gc
from gateway.uploader import Uploader, gateway_id
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


class GatewayService(MultiService):
    def __init__(self, config: GatewayConfig, reactor: Any, *, exit_on_failure: bool = False) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.exit_on_failure = exit_on_failure
        self.embedded = None if config.db else embedded.EmbeddedPostgres(config.pg_dir)
        self.store = PostgresStore(
            reactor,
            pool_size=config.pool_size,
            max_batch=config.max_batch,
            commit_delay=config.commit_delay,
            max_queue=config.max_queue,
        )
        self.ingest = Ingest(self.store)
        self.site = GatewaySite(
            self.ingest,
            self.store,
            clock=reactor,
            max_body=config.max_body,
            request_timeout=config.request_timeout,
        )
        self.registry = DeviceRegistry()
        self.device_settings = DeviceSettings(window=config.device_window, idle_timeout=config.device_idle_timeout)
        self.https_port: Any = None
        self.device_ports: list[Any] = []
        self._announced_certificate = False
        self.device_factories: list[DeviceFactory] = []
        self.uploader: Uploader | None = None
        self.ready: Deferred = Deferred()  # fires when the store is connected
        self.failure: str | None = None

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
            if option == "device":
                # Devices idle by the thousand: the ssl module's TLS costs half the memory (gateway/stdtls.py).
                return TLSServerFactory(server_context(cert, key, spec.extra_cert_chain, client_ca), factory)
            return TLSMemoryBIOFactory(server_options(cert, key, spec.extra_cert_chain), False, factory)
        except TLSConfigError as e:
            if client_ca is not None and str(client_ca) in str(e):
                source = "device-ca"
            raise StartError(f"--{source}: {e}") from None

    def _listen(self, spec: EndpointSpec, factory: Any, option: str, client_ca: Any = None) -> Any:
        if spec.tls:
            factory = self._tls_wrapped(spec, factory, option, client_ca)
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
        Deferred.fromCoroutine(self._start()).addErrback(self._start_failed)

    async def _start(self) -> None:
        where = (
            f"embedded PostgreSQL in {self.config.pg_dir}"
            if self.embedded
            else f"PostgreSQL at {describe_dsn(self.config.db or '')}"
        )
        log.info("database: {where}", where=where)
        dsn = await deferToThread(prepare_database, self.config, self.embedded)
        up = await self.store.connect(dsn)
        if up == 0:
            raise StartError(f"database: no connection could be opened: {self.store.pool.last_error}")
        self.store.setServiceParent(self)
        if self.config.sinks or self.config.retention is not None:
            uploader = Uploader(
                self.reactor, self.config.sinks, gateway_id(self.config.data_dir), retention=self.config.retention
            )
            await uploader.connect(dsn)
            self.store.listeners.append(uploader.committed)
            uploader.setServiceParent(self)
            self.uploader = uploader
        tune_gc()
        log.info("gateway ready: {up} database connections", up=up)
        self.ready.callback(self)

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
        for port in [self.https_port, *self.device_ports]:
            if port is not None:
                await port.stopListening()
        sessions = [session for factory in self.device_factories for session in factory.connections]
        for session in sessions:
            session.stop_reading()
        # The store commits what is in flight; the devices' ACKs go out as it does.
        await super().stopService()
        for session in sessions:
            session.end(tgp.ErrorCode.SHUTTING_DOWN, "the gateway is stopping; reconnect later")
        if self.embedded is not None:
            await deferToThread(self.embedded.stop)

    def stopService(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())


def makeService(options: Options) -> GatewayService:
    from twisted.internet import reactor

    return GatewayService(options.gateway_config, reactor, exit_on_failure=True)
