"""
The outbound subsystem as the assembler builds it: the uploader and its
sinks, retention, and edge alerts with their webhook notices (on a pool of
their own, off the writers').

The store tells the uploader of each commit (``committed``), and the ingest
core shows the alert engine every reading it stores (``observe``); the
assembler connects those two hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from twisted.application.service import IServiceCollection
from twisted.internet.defer import Deferred

from gateway.reactor import Reactor
from gateway.outbound.alerts import AlertEngine
from gateway.outbound.notices import AlertNotifier
from gateway.outbound.retention import Retention
from gateway.outbound.sinks import Sink
from gateway.outbound.uploader import Uploader, gateway_id, warn_unconfigured
from gateway.storage.pool import PgPool


class Outbound:
    def __init__(
        self, config: Any, reactor: Reactor, in_thread: Callable[..., Deferred], committed: list[Callable[..., Any]]
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.in_thread = in_thread
        self.pool = PgPool(reactor, 1)  # alert changes and notices, off the writers' pool
        self.alerts = AlertEngine(config.alerts, self.pool, reactor, notify=config.alert_webhook is not None)
        self.uploader: Uploader | None = None
        self.retention: Retention | None = None
        self.notifier: AlertNotifier | None = None
        self.committed = committed  # the store's commit listeners: the uploader joins them
        self.dsn = ""
        self.parent: IServiceCollection | None = None

    async def start_uploader(self, dsn: str, parent: IServiceCollection) -> None:
        """The uploader (when there are sinks), under ``parent``; it is told of each commit from now on."""
        self.dsn, self.parent = dsn, parent
        if self.config.sinks:
            await self._upload(self.config.sinks)

    async def _upload(self, sinks: tuple[Sink, ...]) -> None:
        uploader = Uploader(self.reactor, sinks, gateway_id(self.config.data_dir), self.in_thread)
        await uploader.connect(self.dsn)
        self.committed.append(uploader.committed)
        assert self.parent is not None
        uploader.setServiceParent(self.parent)
        self.uploader = uploader

    async def start_retention(self) -> None:
        config = self.config
        if config.retention is None:
            return
        retention = Retention(self.reactor, config.retention)
        await retention.connect(self.dsn)
        if not config.sinks:  # no uploader to say which sinks hold retention back
            warn_unconfigured(await retention.sinks())
        assert self.parent is not None
        retention.setServiceParent(self.parent)
        self.retention = retention

    async def start_alerts(self) -> None:
        """The alert engine's open alerts, and the webhook notifier when --alert-webhook is set."""
        config = self.config
        await self.pool.start(self.dsn)
        await self.alerts.load()
        if config.alert_webhook is None:
            return
        sink = Sink(
            name="alert-webhook",
            url=config.alert_webhook,
            ca=config.upload_ca,
            backoff=config.upload_backoff,
            backoff_cap=config.upload_backoff_cap,
            timeout=config.upload_timeout,
        )
        self.notifier = AlertNotifier(sink, self.pool, self.reactor, gateway_id(config.data_dir))
        self.alerts.on_change.append(self.notifier.wake)
        assert self.parent is not None
        self.notifier.setServiceParent(self.parent)

    def live_metrics(self) -> Iterator[Any]:
        yield from self.alerts.live_metrics()
        if self.uploader is not None:
            yield from self.uploader.live_metrics()
        if self.notifier is not None:
            yield from self.notifier.live_metrics()

    async def reconfigure(self, config: Any) -> list[str]:
        """A SIGHUP's sinks and alert rules; returns what changed."""
        old, self.config = self.config, config
        self.alerts.reconfigure(config.alerts)
        if config.sinks == old.sinks:
            return []
        if self.uploader is not None:
            return await self.uploader.reconfigure(config.sinks)
        if config.sinks and self.parent is not None:
            await self._upload(config.sinks)
            return [f"sink {sink.name} added" for sink in config.sinks]
        return []

    async def close(self) -> None:
        await self.alerts.settled()
        await self.pool.close()
