"""
A RabbitMQ broker (AMQP 0-9-1) as the config file names it, and connections
to it on the reactor with pika's ``TwistedProtocolConnection``: what the AMQP
source (``transports/amqp_source.py``) and the AMQP sink
(``outbound/amqp_sender.py``) share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet import protocol, ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.python.failure import Failure

from gateway.reactor import Reactor
from gateway.tables import checked_number
from gateway.trust import ca_file, loopback, secret_value, trust_root

# The keys of a table that name the broker and how to sign in.
BROKER_KEYS = {"url", "username", "password", "ca", "plaintext", "heartbeat"}


@dataclass(frozen=True)
class AmqpBroker:
    url: str  # as given (never with a password)
    host: str
    port: int
    vhost: str
    username: str
    password: str = field(repr=False)
    tls: bool = False
    ca: Path | None = None
    heartbeat: int = 60  # seconds; 0: none


def broker_from_table(table: Mapping[str, Any], environ: Mapping[str, str]) -> AmqpBroker:
    """The broker of a table (keys spelled with -); ValueError names the key."""
    url = table.get("url")
    if not isinstance(url, str):
        raise ValueError("url: give amqps://user@host:5671/vhost (or amqp:// to loopback)")
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError(f"url: {url!r} is not an amqp:// or amqps:// URL")
    tls = parts.scheme == "amqps"
    if not tls and not loopback(parts.hostname) and table.get("plaintext") is not True:
        raise ValueError(
            f"url: {url!r}: amqp:// (no TLS) is allowed to a loopback address only; use amqps://, "
            "or plaintext = true on a network you trust"
        )
    if parts.password:
        raise ValueError("url: put the password in password = { env = ... } or { file = ... }, not in the URL")
    try:
        port = parts.port or (5671 if tls else 5672)
    except ValueError:
        raise ValueError(f"url: {url!r} has a bad port") from None
    return AmqpBroker(
        url=url,
        host=parts.hostname,
        port=port,
        vhost=unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
        username=table.get("username", unquote(parts.username) if parts.username else "guest"),
        password=secret_value("password", table["password"], environ) if "password" in table else "guest",
        tls=tls,
        ca=ca_file(table["ca"]) if "ca" in table else None,
        heartbeat=int(checked_number(table.get("heartbeat", 60), "heartbeat", 0, 3600, whole=True)),
    )


def endpoint(reactor: Reactor, broker: AmqpBroker, timeout: float) -> Any:
    """A client endpoint to the broker: TCP, or TLS verified against ``ca`` (the platform's trust by default)."""
    plain: Any = HostnameEndpoint(reactor, broker.host, broker.port, timeout=timeout)
    if not broker.tls:
        return plain
    return wrapClientTLS(ssl.optionsForClientTLS(broker.host, trust_root(broker.ca)), plain)


def connection_factory(
    broker: AmqpBroker, name: str, lost: Callable[[Any, Failure], None] | None = None
) -> protocol.Factory:
    """A factory of pika connections (wait on a connection's ``ready`` before opening a channel); ``lost`` is told
    of each connection that ends, with why."""
    import pika
    from pika.adapters.twisted_connection import TwistedProtocolConnection

    parameters = pika.ConnectionParameters(
        virtual_host=broker.vhost,
        credentials=pika.PlainCredentials(broker.username, broker.password),
        heartbeat=broker.heartbeat,
        client_properties={"connection_name": f"txgateway {name}"},
    )

    class Factory(protocol.Factory):
        noisy = False  # the source and the sink log connections themselves

        def buildProtocol(self, addr: Any) -> Any:
            connection = TwistedProtocolConnection(parameters)
            if lost is not None:
                ended = connection.connectionLost

                def connection_lost(reason: Failure = protocol.connectionDone) -> None:
                    lost(connection, reason)  # first: pika's own answer to it (ready's errback) may ask why
                    ended(reason)

                connection.connectionLost = connection_lost
            return connection

    return Factory()
