"""
MQTT brokers the gateway connects to as a client: where (an ``mqtt://`` or
``mqtts://`` URL), as whom (user name, and a password read from the
environment or a file, which no repr, log line or status shows), and with
which trust (the system's CAs, or ``ca``). The consumer of a broker's stream
(``[[mqtt_source]]``, ``mqtt_source.py``) and the uploader's MQTT sink
(``[[sink]]`` with an MQTT URL) both start from a ``Broker``.

Secure by default: ``mqtt://`` (no TLS) is accepted to a loopback address,
and elsewhere only with ``plaintext = true`` in the table, which the log
repeats at every start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

from gateway.reactor import Reactor
from gateway.trust import ca_file, loopback, secret_value, trust_root
from gateway.readings import NAME_RULE, is_name
from gateway.tables import checked_number, config_table
from protocols import mqtt

IN_FLIGHT_MAX = 10_000  # messages a source may hold unacknowledged (at most a device session's largest window)

SCHEMES = {"mqtt": (False, 1883), "mqtts": (True, 8883)}
VERSIONS = {"5.0": mqtt.V5, "5": mqtt.V5, "3.1.1": mqtt.V311}
# Keys of a broker's table, beside those of what uses it.
BROKER_KEYS = {"url", "ca", "username", "password", "version", "keepalive", "client-id", "plaintext", "max-packet"}
_FILTER_LEVEL = re.compile(r"^[^+#]*$|^\+$|^#$")


class BrokerError(Exception):
    """A broker table is misconfigured; the message names the table and key."""


@dataclass(frozen=True)
class Broker:
    url: str
    host: str
    port: int
    tls: bool
    ca: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    version: int = mqtt.V5
    keepalive: int = 60
    client_id: str = ""  # empty: made from the gateway's id (stable across restarts)
    plaintext: bool = False  # mqtt:// to a host other than loopback, asked for
    max_packet: int = 1024 * 1024

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def with_client_id(self, owner: str, name: str) -> Broker:
        """The configured client id, or one made from the gateway's id and the table's name."""
        if self.client_id:
            return self
        digest = hashlib.sha256(f"{owner}\0{name}".encode()).hexdigest()[:12]
        return dataclasses.replace(self, client_id=f"txgw-{digest}")


def parse_url(url: Any, plaintext: bool = False) -> tuple[str, int, bool]:
    """(host, port, tls) of an mqtt:// or mqtts:// URL; ValueError says what is wrong."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"url: {url!r} is not a URL")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ValueError(f"url: {url!r} is not an mqtts:// (or mqtt://) URL")
    if parts.username or parts.password:
        raise ValueError(f"url: {url!r}: give username, and the password from a file or the environment")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"url: {url!r}: an MQTT URL names a host and port only")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"url: {url!r} has a bad port") from None
    tls, default_port = SCHEMES[parts.scheme]
    if not tls and not plaintext and not loopback(parts.hostname):
        raise ValueError(
            f"url: {url!r}: mqtt:// (no TLS) is allowed to a loopback address only; use mqtts://, or set "
            "plaintext = true in the config file to send credentials and readings in clear"
        )
    return parts.hostname, port or default_port, tls


def broker_from_table(table: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Broker:
    """The broker of a table (keys with ``-``); ValueError names the key."""
    environ = os.environ if environ is None else environ
    plaintext = table.get("plaintext", False)
    if not isinstance(plaintext, bool):
        raise ValueError("plaintext: give true or false")
    host, port, tls = parse_url(table.get("url"), plaintext)
    values: dict[str, Any] = {}
    if "ca" in table:
        try:
            values["ca"] = ca_file(table["ca"])
        except ValueError as e:
            raise ValueError(f"ca: {e}") from None
    if "username" in table:
        username = table["username"]
        if not isinstance(username, str) or not username or len(username.encode()) > 65535:
            raise ValueError("username: give a non-empty string")
        values["username"] = username
    if "password" in table:
        raw = table["password"]
        if isinstance(raw, str):
            raise ValueError('password: read it from the environment or a file: { env = "VAR" } or { file = "/path" }')
        values["password"] = secret_value("password", raw, environ)
        if "username" not in table:
            raise ValueError("password: give the username too")
    if "version" in table:
        version = str(table["version"])
        if version not in VERSIONS:
            raise ValueError(f"version: {table['version']!r} is not 5.0 or 3.1.1")
        values["version"] = VERSIONS[version]
    if "keepalive" in table:
        values["keepalive"] = checked_number(table["keepalive"], "", 5, 65535, whole=True)
    if "max-packet" in table:
        values["max_packet"] = checked_number(table["max-packet"], "", 1024, 256 * 1024 * 1024, whole=True)
    if "client-id" in table:
        client_id = table["client-id"]
        if not isinstance(client_id, str) or not client_id or not is_name(client_id):
            raise ValueError(f"client-id: {NAME_RULE}")
        values["client_id"] = client_id
    return Broker(table["url"], host, port, tls, plaintext=plaintext, **values)


def name_of(table: Mapping[str, Any], host: str, port: int) -> str:
    name = table.get("name", f"{host}:{port}"[:64])
    if not isinstance(name, str) or not is_name(name):
        raise ValueError(f"name: {NAME_RULE}")
    return name


def check_filter(topic: Any) -> str:
    """An MQTT topic filter (wildcards + and # where MQTT allows them)."""
    if not isinstance(topic, str) or not topic or len(topic.encode()) > 1024 or "\0" in topic:
        raise ValueError(f"{topic!r} is not a topic filter")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if not _FILTER_LEVEL.match(level) or (level == "#" and i != len(levels) - 1):
            raise ValueError(f"{topic!r}: + and # stand alone in a level, and # only last")
    if topic.startswith("$"):
        raise ValueError(f"{topic!r}: give the filter without $share (the group key makes the shared subscription)")
    return topic


def check_command_topic(template: Any) -> str:
    """A topic template for commands: {device} and {id} each once, each a whole level, no wildcards."""
    if not isinstance(template, str) or not template or template.startswith("$") or "\0" in template:
        raise ValueError(
            f"command-topic: {template!r} is not a topic template such as devices/{{device}}/commands/{{id}}"
        )
    levels = template.split("/")
    for key in ("{device}", "{id}"):
        if levels.count(key) != 1:
            raise ValueError(f"command-topic: {template!r} must have {key} once, as a whole level")
    if any("+" in level or "#" in level or ("{" in level and level not in ("{device}", "{id}")) for level in levels):
        raise ValueError(f"command-topic: {template!r}: no wildcards, and only {{device}} and {{id}} as fields")
    return template


def endpoint(reactor: Reactor, broker: Broker, timeout: float = 30.0) -> Any:
    """A client endpoint for the broker: verified TLS 1.2+ (the host name too) for mqtts://."""
    tcp = HostnameEndpoint(reactor, broker.host, broker.port, timeout=timeout)
    if not broker.tls:
        return tcp
    options = ssl.optionsForClientTLS(
        broker.host,
        trustRoot=trust_root(broker.ca),
        extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
    )
    return wrapClientTLS(options, tcp)


# -- [[mqtt_source]]: a broker's stream consumed (mqtt_source.py) --------------

SOURCE_KEYS = {
    "name",
    "topics",
    "device-level",
    "payload",
    "group",
    "qos",
    "window",
    "session-expiry",
    "backoff",
    "backoff-cap",
    "stall",
    "command-topic",
    "format",
    "host-id",
    "device-name",
    "node-name",
    "rebirth-interval",
}
SPARKPLUG_ONLY = ("host-id", "device-name", "node-name", "rebirth-interval")


class SourceError(Exception):
    """An [[mqtt_source]] table is misconfigured; the message names it and the key."""


@dataclass(frozen=True)
class SourceSettings:
    name: str
    broker: Broker
    topics: tuple[str, ...] = ("devices/+/+",)
    device_level: int = 1  # which level of the topic (0 first) names the device
    payload: str = "auto"  # "auto": .../readings is JSON, another last level a metric; "json": all JSON
    group: str = "txgateway"  # the shared subscription group; "" subscribes alone
    qos: int = 1
    window: int = 100  # messages unacknowledged at most
    session_expiry: int = 7 * 86400  # 5.0: seconds the broker keeps the session while the gateway is away
    backoff: float = 1.0
    backoff_cap: float = 60.0
    stall: float = 120.0  # seconds without a subscription before /healthz says so
    # Where commands to the devices on this broker are published: a template with {device} and {id}. Their
    # results come back on the same topic with /result added (subscribed to as well). "": no commands.
    command_topic: str = ""
    # "gateway": the gateway's topics and payloads; "sparkplug": a Sparkplug B host application (sparkplug.py)
    format: str = "gateway"
    host_id: str = ""  # sparkplug: the host application's id (spBv1.0/STATE/<host_id>)
    device_name: str = "{node}-{device}"  # sparkplug: the registered device of a group/node/device
    node_name: str = "{node}"  # sparkplug: the registered device of an edge node's own metrics
    rebirth_interval: float = 10.0  # sparkplug: seconds between two rebirth requests to one edge node

    @property
    def state_topic(self) -> str:
        return f"spBv1.0/STATE/{self.host_id}"

    @property
    def result_filter(self) -> str:
        return self.command_topic.replace("{device}", "+").replace("{id}", "+") + "/result"

    @property
    def filters(self) -> tuple[str, ...]:
        """What is subscribed to: the topics (and the command results), in the shared group when there is one."""
        topics = (*self.topics, self.result_filter) if self.command_topic else self.topics
        return tuple(f"$share/{self.group}/{t}" if self.group else t for t in topics)


def source_from_table(
    table: Any, index: int = 0, environ: Mapping[str, str] | None = None, duration: Callable[[Any], float] = float
) -> SourceSettings:
    """An ``[[mqtt_source]]`` table as settings; SourceError names the table and the key."""
    if not isinstance(table, dict):
        raise SourceError(f"[[mqtt_source]] #{index + 1}: not a table")
    label = f"[[mqtt_source]] {table.get('name') or table.get('url') or '#' + str(index + 1)!r}"
    try:
        table = config_table(table, SOURCE_KEYS | BROKER_KEYS)
        broker = broker_from_table(table, environ)
        values: dict[str, Any] = {"name": name_of(table, broker.host, broker.port), "broker": broker}
        if "topics" in table:
            topics = table["topics"]
            if isinstance(topics, str):
                topics = [topics]
            if not isinstance(topics, list) or not topics:
                raise ValueError("topics: give a list of topic filters")
            try:
                values["topics"] = tuple(check_filter(t) for t in topics)
            except ValueError as e:
                raise ValueError(f"topics: {e}") from None
        if "device-level" in table:
            values["device_level"] = checked_number(table["device-level"], "device-level", 0, 63, whole=True)
        if table.get("format", "gateway") == "sparkplug":
            values.update(_sparkplug(table, duration))
        elif "format" in table and table["format"] != "gateway":
            raise ValueError(f"format: {table['format']!r} is not gateway or sparkplug")
        elif any(k in table for k in SPARKPLUG_ONLY):
            raise ValueError(f'{[k for k in SPARKPLUG_ONLY if k in table][0]}: only for format = "sparkplug"')
        level = values.get("device_level", 1)
        for topic in values.get("topics", SourceSettings.topics) if values.get("format") != "sparkplug" else ():
            levels = topic.split("/")
            if level >= len(levels) and levels[-1] != "#" or "#" in levels[: level + 1]:
                raise ValueError(f"device-level: topic {topic!r} has no level {level} to name the device")
            if not levels[level] == "+" and not is_name(levels[level]):
                raise ValueError(f"device-level: level {level} of {topic!r} is not a device name or +")
        if "command-topic" in table:
            values["command_topic"] = check_command_topic(table["command-topic"])
        if "payload" in table:
            if table["payload"] not in ("auto", "json"):
                raise ValueError(f"payload: {table['payload']!r} is not auto or json")
            values["payload"] = table["payload"]
        if "group" in table:
            group = table["group"]
            if not isinstance(group, str) or (group and not is_name(group)):
                raise ValueError("group: letters, digits and _.:- (or empty to subscribe alone)")
            values["group"] = group
        if "qos" in table:
            if table["qos"] not in (1, 2) or isinstance(table["qos"], bool):
                raise ValueError(f"qos: {table['qos']!r}: give 1 or 2 (QoS 0 would lose what a restart interrupts)")
            values["qos"] = table["qos"]
        if "window" in table:
            values["window"] = checked_number(table["window"], "window", 1, IN_FLIGHT_MAX, whole=True)
        for key, lo, hi in (
            ("session-expiry", 60, 0xFFFFFFFF),
            ("backoff", 0.01, 3600),
            ("backoff-cap", 0.01, 86400),
            ("stall", 1, 86400 * 7),
        ):
            if key in table:
                try:
                    seconds = duration(table[key])
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{key}: {e}") from None
                checked_number(seconds, key, lo, hi)
                values[key.replace("-", "_")] = int(seconds) if key == "session-expiry" else seconds
    except ValueError as e:
        raise SourceError(f"{label}: {e}") from None
    return SourceSettings(**values)


def _sparkplug(table: Mapping[str, Any], duration: Callable[[Any], float]) -> dict[str, Any]:
    """The settings of a Sparkplug B host application (format = "sparkplug")."""
    for key in ("device-level", "payload", "command-topic", "group"):
        if key in table:
            raise ValueError(f'{key}: not for format = "sparkplug" (Sparkplug names devices and payloads itself)')
    host_id = table.get("host-id")
    if not is_name(host_id):
        raise ValueError("host-id: give the host application's id (letters, digits and _.:-), as in spBv1.0/STATE/<id>")
    values: dict[str, Any] = {"format": "sparkplug", "host_id": host_id, "group": "", "topics": ("spBv1.0/#",)}
    if "topics" in table:
        topics = [table["topics"]] if isinstance(table["topics"], str) else table["topics"]
        if not isinstance(topics, list) or not all(isinstance(t, str) and t.startswith("spBv1.0/") for t in topics):
            raise ValueError("topics: give Sparkplug filters, such as spBv1.0/# or spBv1.0/plant-1/#")
        values["topics"] = tuple(check_filter(t) for t in topics)
    for key, needed in (("device-name", "{device}"), ("node-name", "{node}")):
        if key in table:
            template = table[key]
            try:
                sample = template.format(group="g", node="n", device="d") if isinstance(template, str) else None
            except (KeyError, IndexError, ValueError):
                sample = None
            if sample is None or needed not in template or not is_name(sample):
                raise ValueError(
                    f"{key}: {template!r}: a device name made of {{group}}, {{node}}, {{device}} and letters, "
                    f"digits and _.:-, with {needed} in it"
                )
            values[key.replace("-", "_")] = template
    if "rebirth-interval" in table:
        try:
            values["rebirth_interval"] = checked_number(
                duration(table["rebirth-interval"]), "rebirth-interval", 1, 3600
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"rebirth-interval: {e}") from None
    return values


def source_from_url(url: str) -> SourceSettings:
    """``--mqtt-source URL``: every default, no credentials (use a table for those)."""
    try:
        broker = broker_from_table({"url": url})
        return SourceSettings(name=name_of({}, broker.host, broker.port), broker=broker)
    except ValueError as e:
        raise SourceError(str(e)) from None


def check_unique(sources: list[SourceSettings]) -> None:
    seen: set[str] = set()
    for source in sources:
        if source.name in seen:
            raise SourceError(f"two MQTT sources are named {source.name!r}; give each a distinct name")
        seen.add(source.name)
