"""
What the HTTPS port serves besides ingest, as the assembler builds it: the
read API (API tokens, dashboard sessions, single sign-on), the dashboard,
the operations resources, on one site with the transports' resources
(``POST /v1/readings``) under ``/v1/``; and the operators' own ports, the
``--metrics`` site and the SSH console.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import server

from gateway.reactor import Reactor
from gateway.api.commands import CommandsApi
from gateway.api import openapi
from gateway.api.oidc import Oidc
from gateway.api.read import ReadApi
from gateway.api.resource import ApiResource
from gateway.api.sessions import Sessions
from gateway.errors import StartError
from gateway.net.listeners import Port
from gateway.ops.console import BANNER
from gateway.ops.manhole import ManholeError, console_factory
from gateway.ops.status import StatusPolicy
from gateway.ui.resource import UiResource
from gateway.web.site import GatewaySite, OperationsRoot

log = Logger()


class Surfaces:
    def __init__(
        self,
        config: Any,
        reactor: Reactor,
        reads: Any,
        ingest: Any,
        health: Any,
        metrics: Any,
        in_thread: Callable[..., Deferred],
        v1: Mapping[bytes, Any],
        commands: Any,
    ) -> None:
        self.label = "https" if config.https.tls else "http"  # its connections' transport label
        self.oidc = Oidc(config.oidc, reactor) if config.oidc is not None else None
        self.status_policy = StatusPolicy(config.quality, {t.name: t for t in config.device_types})
        self.sessions = Sessions(reads, reactor)
        verifier = self.oidc.verifier if self.oidc is not None else None
        orders = CommandsApi(commands, ingest.authenticate, reactor)
        self.api = ReadApi(reads, reactor, self.status_policy, openapi.document(), self.sessions, verifier, orders)
        self.site = GatewaySite(
            ingest,
            None,
            clock=reactor,
            max_body=config.max_body,
            request_timeout=config.request_timeout,
            health=health,
            metrics_here=config.metrics is None,
            api=ApiResource(self.api),
            ui=UiResource(
                self.api, self.sessions, metrics, in_thread, self.oidc, (config.ui_tiles, config.ui_tiles_attribution)
            ),
            v1=v1,
        )

    def port(self, config: Any) -> Port:
        """The HTTPS port (plain HTTP behind a TLS proxy, with a warning)."""
        if not config.https.tls:
            log.warn("--https {spec} serves plain HTTP: device tokens cross the network in clear", spec=config.https)
        return Port(config.https, self.site, "https", "HTTPS" if config.https.tls else "HTTP")

    def connections(self) -> dict[str, int]:
        """Open connections of the HTTPS port (http when it serves plain HTTP)."""
        return {self.label: self.site.open_connections}

    def start(self) -> None:
        if self.oidc is not None:
            # The provider's keys, fetched while the rest starts (a failure is logged; a token fetches them again).
            Deferred.fromCoroutine(self.oidc.keys.fetch())

    def reconfigure(self, config: Any) -> None:
        self.site.reconfigure(config.max_body, config.request_timeout)
        self.status_policy.reconfigure(config.quality, config.device_types)


def operations_ports(
    config: Any, health: Any, metrics: Any, namespace: Callable[[], Any], reactor: Reactor
) -> list[Port]:
    """The --metrics endpoint (/metrics, /healthz) and the SSH console (--manhole), when given."""
    out = []
    if config.metrics is not None:
        site = server.Site(OperationsRoot(health, metrics), timeout=config.request_timeout)
        site.displayTracebacks = False
        out.append(Port(config.metrics, site, "metrics", "/metrics and /healthz (HTTP)", devices=False))
    if config.manhole is not None:
        try:
            console = console_factory(config.manhole_dir, config.authorized_keys, namespace, BANNER, reactor)
        except ManholeError as e:
            raise StartError(f"--manhole: {e}") from None
        out.append(Port(config.manhole, console, "manhole", "the SSH console", devices=False))
    return out
