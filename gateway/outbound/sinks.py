"""
Where the uploader sends readings: sinks, from ``--upload-url`` or from
``[[sink]]`` tables in the config file, each checked before anything starts.

A sink's secrets (header values read from an environment variable or a
file) live only in ``Sink.headers``, which no repr, log line or status
output shows.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from gateway.readings import NAME_RULE, is_name
from gateway.settings import Setting, positive_int, seconds
from gateway.tables import checked_number, config_table, known_keys
from gateway.net import amqp
from gateway.net.brokers import BROKER_KEYS, SCHEMES, Broker, broker_from_table
from gateway.trust import ca_file, loopback, secret_value

# Headers the uploader sets itself; a sink may not override them.
RESERVED_HEADERS = {"content-type", "content-encoding", "content-length", "idempotency-key", "host"}
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class SinkError(Exception):
    """A sink is misconfigured; the message says which and how."""


@dataclass(frozen=True)
class Rule:
    """Edge reduction for the metrics matching ``match`` (a shell-style pattern)."""

    match: str
    deadband: float | None = None  # send only when the value moved by more than this...
    heartbeat: float | None = None  # ...or this many seconds have passed since the last one sent
    aggregate: float | None = None  # or: send min/max/mean/count per interval of this many seconds

    def matches(self, metric: str) -> bool:
        return fnmatch.fnmatchcase(metric, self.match)


@dataclass(frozen=True)
class MQTTSink:
    """What makes a sink an MQTT one: its broker, the topic template and what a message holds."""

    broker: Broker
    topic: str  # "reading": with {device} and {metric}; "batch": a plain topic
    format: str = "reading"  # "reading": one message per reading; "batch": the batch's lines in one


@dataclass(frozen=True)
class KinesisSink:
    """What makes a sink an Amazon Kinesis Data Streams one (``kind = "kinesis"``)."""

    stream: str  # a name, or an ARN (which names the region too)
    region: str
    endpoint: str  # https://kinesis.REGION.amazonaws.com, or the one given (an emulator, a VPC endpoint)
    partition_key: str = "{device}"  # "device": with {device}; "reading": {device} and {metric}
    format: str = "device"  # "device": one record of NDJSON lines per device; "reading": one per reading
    profile: str | None = None  # a profile of the shared AWS config and credentials files

    @property
    def display(self) -> str:
        """How status output names the stream."""
        return self.stream if self.stream.startswith("arn:") else f"kinesis://{self.region}/{self.stream}"


@dataclass(frozen=True)
class AmqpSink:
    """What makes a sink a RabbitMQ one (``kind = "amqp"``, or an amqp:// or amqps:// URL)."""

    broker: amqp.AmqpBroker
    exchange: str  # "" for the default exchange (the routing key names a queue)
    routing_key: str = "readings.{device}"  # "device": {device}; "reading": and {metric}; "batch": no placeholder
    format: str = "device"  # a message per device (its lines), per reading (its line), or the batch's lines in one


# The upload options: the defaults of every sink (a [[sink]] table may set its own).
UPLOAD_SETTINGS = (
    Setting(
        "upload-url",
        (),
        lambda url: check_url(url),
        "Upload stored readings to this HTTPS URL, in gzipped JSON-lines batches; repeat for several "
        "sinks (each keeps its own place). [[sink]] tables in the config file give names, headers "
        "and edge reduction.",
        multiple=True,
        live=True,
    ),
    Setting(
        "upload-ca",
        None,
        ca_file,
        "PEM CA certificates to trust for upload URLs instead of the system's (a private CA).",
        live=True,
    ),
    Setting("upload-batch", 5000, positive_int(1, 1_000_000), "Most readings in one upload batch.", live=True),
    Setting(
        "upload-batch-bytes",
        1024 * 1024,
        positive_int(1024, 256 * 1024 * 1024),
        "Most compressed bytes in one upload batch.",
        live=True,
    ),
    Setting(
        "upload-flush",
        5.0,
        seconds(0.01, 86400),
        "Seconds the oldest waiting reading may wait before a batch that is not full is sent (plus up to 20% jitter).",
        live=True,
    ),
    Setting(
        "upload-backoff",
        1.0,
        seconds(0.01, 3600),
        "First retry delay in seconds after a failed upload; doubles per failure, with full jitter.",
        live=True,
    ),
    Setting("upload-backoff-cap", 60.0, seconds(0.01, 86400), "Longest retry delay in seconds.", live=True),
    Setting("upload-timeout", 30.0, seconds(1, 3600), "Seconds one upload request may take.", live=True),
)
_DEFAULT = {s.key.removeprefix("upload_"): s.default for s in UPLOAD_SETTINGS}


@dataclass(frozen=True)
class Sink:
    name: str
    url: str
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    ca: Path | None = None
    batch: int = _DEFAULT["batch"]
    batch_bytes: int = _DEFAULT["batch_bytes"]
    flush: float = _DEFAULT["flush"]
    backoff: float = _DEFAULT["backoff"]
    backoff_cap: float = _DEFAULT["backoff_cap"]
    timeout: float = _DEFAULT["timeout"]
    gzip_level: int = 6
    rules: tuple[Rule, ...] = ()
    mqtt: MQTTSink | None = None  # set for mqtt:// and mqtts:// URLs
    kinesis: KinesisSink | None = None  # set for kind = "kinesis"; url then names the stream
    amqp: AmqpSink | None = None  # set for kind = "amqp" and amqp:// or amqps:// URLs

    @property
    def reduced(self) -> bool:
        return bool(self.rules)

    def rule_for(self, metric: str) -> Rule | None:
        for rule in self.rules:
            if rule.matches(metric):
                return rule
        return None


def check_url(url: Any) -> str:
    """An https:// URL, or http:// to a loopback address only."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"{url!r} is not a URL")
    parts = urlsplit(url)
    if parts.scheme in SCHEMES:
        raise ValueError(f"{url!r}: give an MQTT sink in a [[sink]] table of the config file")
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{url!r} is not an https:// URL")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"{url!r} has a bad port") from None
    if parts.scheme == "http" and not loopback(parts.hostname):
        raise ValueError(f"{url!r}: plain http:// is allowed to a loopback address only; use https://")
    if parts.username or parts.password:
        raise ValueError(f"{url!r}: put credentials in a header from a file or the environment, not in the URL")
    return url


def name_from_url(url: str) -> str:
    parts = urlsplit(url)
    name = parts.hostname or "sink"
    if parts.port:
        name += f":{parts.port}"
    return name[:64]


def _headers(value: Any, environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ValueError("headers: give a table of header names and values")
    out = []
    for name, raw in value.items():
        if not _TOKEN.match(name):
            raise ValueError(f"headers: {name!r} is not a header name")
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"headers: {name} is set by the uploader")
        out.append((name, secret_value(f"headers.{name}", raw, environ)))
    return tuple(out)


def _number(lo: float, hi: float, integer: bool = False) -> Callable[[Any], Any]:
    return lambda value: checked_number(value, "", lo, hi, whole=integer)


def _rule(value: Any) -> Rule:
    if not isinstance(value, dict):
        raise ValueError("reduce: each entry is a table with match and deadband or aggregate")
    try:
        known_keys(value, ("match", "deadband", "heartbeat", "aggregate"))
    except ValueError as e:
        raise ValueError(f"reduce: {e}") from None
    match = value.get("match")
    if not isinstance(match, str) or not match:
        raise ValueError("reduce: match must be a metric name pattern such as 'oil_*'")
    number = _number(0, 1e12)
    deadband = number(value["deadband"]) if "deadband" in value else None
    heartbeat = _number(1, 86400 * 365)(value["heartbeat"]) if "heartbeat" in value else None
    aggregate = _number(1, 86400)(value["aggregate"]) if "aggregate" in value else None
    if (deadband is None) == (aggregate is None):
        raise ValueError(f"reduce {match!r}: give either deadband (with an optional heartbeat) or aggregate")
    if heartbeat is not None and deadband is None:
        raise ValueError(f"reduce {match!r}: heartbeat goes with deadband")
    return Rule(match, deadband, heartbeat, aggregate)


# [[sink]] key -> (Sink field, parser)
_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "batch": ("batch", _number(1, 1_000_000, integer=True)),
    "batch-bytes": ("batch_bytes", _number(1024, 256 * 1024 * 1024, integer=True)),
    "flush": ("flush", _number(0.01, 86400)),
    "backoff": ("backoff", _number(0.01, 3600)),
    "backoff-cap": ("backoff_cap", _number(0.01, 86400)),
    "timeout": ("timeout", _number(1, 3600)),
    "gzip-level": ("gzip_level", _number(1, 9, integer=True)),
}


def sink_from_table(
    table: Any, defaults: Mapping[str, Any], environ: Mapping[str, str] | None = None, index: int = 0
) -> Sink:
    """A ``[[sink]]`` table of the config file as a Sink; ValueError names the key."""
    environ = os.environ if environ is None else environ
    if not isinstance(table, dict):
        raise SinkError(f"[[sink]] #{index + 1}: not a table")
    label = f"[[sink]] {table.get('name') or table.get('url') or table.get('stream') or '#' + str(index + 1)!r}"
    kind = table.get("kind")
    if kind == "kinesis":
        return _kinesis_sink(table, defaults, environ, label)
    url = table.get("url")
    if kind == "amqp" or (kind is None and isinstance(url, str) and urlsplit(url).scheme in ("amqp", "amqps")):
        return _amqp_sink(table, defaults, environ, label)
    try:
        if kind not in (None, "https", "mqtt"):
            raise ValueError(f"kind: {kind!r} is not https, mqtt, amqp or kinesis")
        table = {k: v for k, v in table.items() if k != "kind"}
        is_mqtt = isinstance(table.get("url"), str) and urlsplit(table["url"]).scheme in SCHEMES
        if kind is not None and (kind == "mqtt") != is_mqtt:
            raise ValueError(f"kind: {kind} does not go with url {table.get('url')!r} (MQTT's are mqtt:// or mqtts://)")
        allowed = {"name", "url", "ca", "reduce", *_FIELDS}
        if is_mqtt:  # no HTTP headers, and the messages are not compressed
            allowed = (allowed - {"gzip-level"}) | BROKER_KEYS | {"topic", "format"}
            table = config_table(table, allowed, "; an MQTT sink")
        else:
            table = config_table(table, allowed | {"headers"})
        mqtt = _mqtt_sink(table, environ) if is_mqtt else None
        url = table["url"] if is_mqtt else check_url(table.get("url"))
        name = table.get("name", name_from_url(url))
        if not is_name(name):
            raise ValueError(f"name: {NAME_RULE}")
        values: dict[str, Any] = dict(defaults)
        for key, (attr, parse) in _FIELDS.items():
            if key in table:
                values[attr] = parse(table[key])
        if "ca" in table:
            values["ca"] = _ca_path(table["ca"])
        headers = _headers(table.get("headers", {}), environ)
        reduce = table.get("reduce", [])
        if not isinstance(reduce, list):
            raise ValueError("reduce: give a list of tables ([[sink.reduce]])")
        rules = tuple(_rule(r) for r in reduce)
    except ValueError as e:
        raise SinkError(f"{label}: {e}") from None
    if mqtt is not None and mqtt.broker.ca is None and values.get("ca") is not None:
        mqtt = dataclasses.replace(mqtt, broker=dataclasses.replace(mqtt.broker, ca=values["ca"]))  # --upload-ca
    return Sink(name=name, url=url, headers=headers, rules=rules, mqtt=mqtt, **values)


KINESIS_KEYS = {"kind", "name", "stream", "region", "endpoint", "partition-key", "format", "profile", "ca"}
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_ARN = re.compile(r"^arn:aws[a-z-]*:kinesis:([a-z0-9-]+):\d{12}:stream/([A-Za-z0-9_.-]{1,128})$")
_STREAM = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def _kinesis_sink(table: dict[str, Any], defaults: Mapping[str, Any], environ: Mapping[str, str], label: str) -> Sink:
    """A [[sink]] with kind = "kinesis". Credentials come from AWS's own sources, never from this table."""
    try:
        spelled = {key.replace("_", "-") for key in table}
        for secret in ("access-key", "secret-key", "aws-access-key-id", "aws-secret-access-key", "password"):
            if secret in spelled:
                raise ValueError(
                    f"{secret}: AWS credentials are not taken from the config file; give them in the environment "
                    "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), a profile of ~/.aws/credentials, or a role"
                )
        table = config_table(table, KINESIS_KEYS | set(_FIELDS), "; a Kinesis sink")
        stream = table.get("stream")
        if not isinstance(stream, str) or not stream:
            raise ValueError("stream: give the stream's name or ARN")
        arn = _ARN.match(stream)
        if arn is None and not _STREAM.match(stream):
            raise ValueError(f"stream: {stream!r} is neither a stream name (A-Z a-z 0-9 _ . -) nor a stream ARN")
        region = table.get(
            "region", arn.group(1) if arn else environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
        )
        if not isinstance(region, str) or not _REGION.match(region):
            raise ValueError(f"region: {region!r} is not an AWS region such as eu-west-1 (give region = ...)")
        if arn is not None and arn.group(1) != region:
            raise ValueError(f"region: {region} is not the stream's ({arn.group(1)}, from its ARN)")
        endpoint = table.get("endpoint")
        if endpoint is None:
            suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
            endpoint = f"https://kinesis.{region}.{suffix}"
        else:
            endpoint = check_url(endpoint)
        kind = table.get("format", "device")
        if kind not in ("device", "reading"):
            raise ValueError(f"format: {kind!r} is not device (a record per device) or reading (one per reading)")
        key = table.get("partition-key", "{device}")
        if not isinstance(key, str) or not key:
            raise ValueError("partition-key: give a template such as '{device}'")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(key) if f is not None}
        except ValueError as e:
            raise ValueError(f"partition-key: {key!r}: {e}") from None
        allowed = {"device", "metric"} if kind == "reading" else {"device"}
        if fields - allowed:
            given = ", ".join("{" + f + "}" for f in sorted(fields - allowed))
            may = " and ".join("{" + f + "}" for f in sorted(allowed))
            raise ValueError(f"partition-key: {key!r} has {given}; it may hold {may}")
        profile = table.get("profile")
        if profile is not None and (not isinstance(profile, str) or not profile):
            raise ValueError("profile: give the name of a profile of ~/.aws/config")
        kinesis = KinesisSink(stream, region, endpoint.rstrip("/"), key, kind, profile)
        name = table.get("name", (arn.group(2) if arn else stream)[:64])
        if not is_name(name):
            raise ValueError(f"name: {NAME_RULE}")
        values: dict[str, Any] = {**defaults, "gzip_level": 1}  # the body is unpacked into records: pack it lightly
        for k, (attr, parse) in _FIELDS.items():
            if k in table:
                values[attr] = parse(table[k])
        if "ca" in table:
            values["ca"] = _ca_path(table["ca"])
    except ValueError as e:
        raise SinkError(f"{label}: {e}") from None
    return Sink(name=name, url=kinesis.display, kinesis=kinesis, **values)


AMQP_KEYS = amqp.BROKER_KEYS | {"kind", "name", "exchange", "routing-key", "format"}


def _amqp_sink(table: dict[str, Any], defaults: Mapping[str, Any], environ: Mapping[str, str], label: str) -> Sink:
    """A [[sink]] that publishes to a RabbitMQ exchange, persistent, with publisher confirms."""
    try:
        table = config_table(table, AMQP_KEYS | (set(_FIELDS) - {"gzip-level"}), "; an AMQP sink")
        broker = amqp.broker_from_table(table, environ)
        exchange = table.get("exchange", "amq.topic")
        if not isinstance(exchange, str) or len(exchange.encode()) > 255:
            raise ValueError("exchange: give an exchange's name ('' for the default exchange)")
        kind = table.get("format", "device")
        if kind not in ("device", "reading", "batch"):
            raise ValueError(
                f"format: {kind!r} is not device (a message per device), reading (per reading) or batch (one)"
            )
        default_key = {"device": "readings.{device}", "reading": "readings.{device}.{metric}", "batch": "readings"}
        key = table.get("routing-key", default_key[kind])
        if not isinstance(key, str) or len(key.encode()) > 255:
            raise ValueError("routing-key: give a routing key template such as 'readings.{device}.{metric}'")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(key) if f is not None}
        except ValueError as e:
            raise ValueError(f"routing-key: {key!r}: {e}") from None
        allowed = {"device": {"device"}, "reading": {"device", "metric"}, "batch": set()}[kind]
        if fields - allowed:
            given = ", ".join("{" + f + "}" for f in sorted(fields - allowed))
            may = {"device": "{device}", "reading": "{device} and {metric}", "batch": "no placeholder"}[kind]
            raise ValueError(f"routing-key: {key!r} has {given}; it may hold {may} (format = {kind})")
        name = table.get("name", f"{broker.host}-{exchange or 'default'}"[:64])
        if not is_name(name):
            raise ValueError(f"name: {NAME_RULE}")
        values: dict[str, Any] = dict(defaults)
        for k, (attr, parse) in _FIELDS.items():
            if k in table:
                values[attr] = parse(table[k])
    except ValueError as e:
        raise SinkError(f"{label}: {e}") from None
    shown = f"{broker.url.rstrip('/')}/exchange/{exchange or '(default)'}"
    return Sink(name=name, url=shown, amqp=AmqpSink(broker, exchange, key, kind), **values)


def _mqtt_sink(table: Mapping[str, Any], environ: Mapping[str, str]) -> MQTTSink:
    broker = broker_from_table(table, environ)
    kind = table.get("format", "reading")
    if kind not in ("reading", "batch"):
        raise ValueError(f"format: {kind!r} is not reading (one message per reading) or batch")
    topic = table.get("topic", "txgateway/{device}/{metric}" if kind == "reading" else "txgateway/readings")
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic or len(topic.encode()) > 1024:
        raise ValueError(f"topic: {topic!r} is not a topic name (no wildcards)")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(topic) if f is not None}
    except ValueError as e:
        raise ValueError(f"topic: {topic!r}: {e}") from None
    allowed = {"device", "metric"} if kind == "reading" else set()
    if fields - allowed:
        given = ", ".join("{" + f + "}" for f in sorted(fields - allowed))
        what = "{device} and {metric}" if kind == "reading" else "no placeholder (format = batch)"
        raise ValueError(f"topic: {topic!r} has {given}; a topic may hold {what}")
    return MQTTSink(broker, topic, kind)


def _ca_path(value: Any) -> Path:
    try:
        return ca_file(value)
    except ValueError as e:
        raise ValueError(f"ca: {e}") from None


def check_unique(sinks: list[Sink]) -> None:
    seen: set[str] = set()
    for sink in sinks:
        if sink.name in seen:
            raise SinkError(
                f"two sinks are named {sink.name!r}; give each a distinct name in a [[sink]] table of the config file"
            )
        seen.add(sink.name)
