"""
Options of the gateway: one table of settings, read from the command line
and from an optional TOML file with the same keys (the command line wins).

Every value goes through the parser named in its table row, so a bad value
from either source stops the start with one line that names the option and
what was wrong with it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping

from twisted.logger import Logger
from twisted.python import usage

from gateway.commands.model import COMMAND_SETTINGS
from gateway.errors import StartError
from gateway.outbound.alerts import AlertError, AlertRule, rules_from_tables
from gateway.net.endpoints import EndpointSpec
from gateway.storage.journal import parse_size
from gateway.ops.logs import FORMATS, LEVELS
from gateway.ingest.vendor import DeviceType, DeviceTypeError, device_type_from_table
from gateway.ingest.quality import QualityError, QualityRules, rules_from_table
from gateway.outbound.sinks import (
    UPLOAD_SETTINGS,
    Sink,
    SinkError,
    check_unique,
    check_url,
    name_from_url,
    sink_from_table,
)
from gateway.settings import (
    Setting,
    age,
    choice,
    directory,
    dsn,
    duration,
    local_endpoint,
    off_or,
    parse_setting,
    positive_int,
    rate,
    readable_file,
    seconds,
    server_endpoint,
)
from gateway.transport import transport_settings
from gateway.tables import known_keys
from gateway.api.oidc import OidcSettings, oidc_from_table
from gateway.ui.tiles import TILE_SETTINGS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


log = Logger()


class ConfigError(Exception):
    """A setting has a bad value; the message names the option."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"--{option}: {message}" if option else message)
        self.option = option


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "data-dir",
        "./gateway-data",
        directory,
        "Directory for everything the gateway keeps (embedded database, TLS certificate); created mode 0700.",
    ),
    Setting(
        "db",
        None,
        dsn,
        "PostgreSQL connection string of an external server. Without it an embedded PostgreSQL runs in DATA_DIR/pg.",
    ),
    Setting(
        "https",
        "ssl:8443",
        server_endpoint(("ssl", "tcp")),
        "Endpoint of the HTTPS API, as a Twisted endpoint string. An ssl: "
        "endpoint without privateKey= uses --tls-cert/--tls-key or the data "
        "directory's certificate; tcp: serves plain HTTP (behind a TLS proxy).",
    ),
    Setting(
        "device-ca",
        None,
        readable_file,
        "PEM CA certificates: ssl: device endpoints then require a client certificate "
        "signed by one of them, naming the device (CN or DNS SAN).",
    ),
    Setting(
        "device-window",
        32,
        positive_int(1, 1024),
        "DATA frames a device may have unacknowledged before the gateway stops reading from it.",
        live=True,
    ),
    Setting(
        "device-idle-timeout",
        120.0,
        seconds(5, 86400),
        "Seconds of silence after which a device session is closed (devices ping to stay open).",
        live=True,
    ),
    Setting(
        "device-handshake-timeout",
        10.0,
        seconds(1, 600),
        "Seconds from a device connection's accept (TLS handshake included) to the end of its TGP handshake.",
        live=True,
    ),
    Setting("tls-cert", None, readable_file, "PEM certificate (with its chain) for ssl: endpoints."),
    Setting("tls-key", None, readable_file, "PEM private key of --tls-cert."),
    Setting(
        "max-body",
        1024 * 1024,
        positive_int(1024, 64 * 1024 * 1024),
        "Largest request body in bytes, enforced while reading.",
        live=True,
    ),
    Setting(
        "request-timeout",
        30.0,
        seconds(1, 3600),
        "Seconds a client may stay silent mid-request or idle between requests.",
        live=True,
    ),
    Setting("pool-size", 4, positive_int(1, 64), "Database connections the store keeps open."),
    Setting("max-batch", 5000, positive_int(1, 100_000), "Most readings committed in one transaction."),
    Setting(
        "commit-delay",
        0.0,
        seconds(0, 1),
        "Seconds a batch waits for more readings before it commits when a connection is free. "
        "Writes that arrive while every connection is busy are grouped anyway.",
    ),
    Setting(
        "max-queue",
        100_000,
        positive_int(1, 10_000_000),
        "Most readings waiting for COMMIT; past it writers get 503 + Retry-After.",
        live=True,
    ),
    Setting(
        "journal-max-bytes",
        "1G",
        parse_size,
        "Most bytes of readings kept in DATA_DIR/journal while the database cannot take them (512M, 2G); "
        "past it writers get 503 + Retry-After. 0 turns the journal off: writers get 503 while the database is away.",
    ),
    Setting(
        "db-wait",
        30.0,
        seconds(1, 3600),
        "Seconds to wait at start for a database that does not answer before opening the ports anyway: "
        "devices known from the last run are then acknowledged into the journal until it answers.",
    ),
    Setting(
        "shutdown-timeout",
        30.0,
        seconds(1, 3600),
        "Seconds SIGTERM/SIGINT may take to finish in-flight commits and answer them before the gateway "
        "closes what is left and exits.",
    ),
    Setting(
        "max-connections",
        20_000,
        positive_int(1, 1_000_000),
        "Most open client connections (HTTPS and devices together); past it new ones are closed at once.",
    ),
    Setting(
        "max-connections-per-address",
        1000,
        positive_int(1, 1_000_000),
        "Most open connections from one IP address (devices behind one NAT share an address).",
    ),
    Setting(
        "device-rate",
        5000.0,
        rate,
        "Readings per second one device may send, averaged over 10 seconds (bursts up to 10 seconds' worth); "
        "past it HTTPS answers 429 and TGP a RATE_LIMITED NACK. 0: no limit.",
        live=True,
    ),
    *UPLOAD_SETTINGS,
    *COMMAND_SETTINGS,
    *TILE_SETTINGS,
    Setting(
        "sink-stall",
        300.0,
        seconds(10, 7 * 86400),
        "Seconds a sink may have readings waiting without sending a batch before /healthz answers 503.",
        live=True,
    ),
    Setting(
        "metrics",
        None,
        local_endpoint,
        "Serve /metrics and /healthz as plain HTTP on this endpoint (a bare port number listens on 127.0.0.1 "
        "only) instead of /metrics on the HTTPS port.",
    ),
    Setting(
        "manhole",
        None,
        local_endpoint,
        "Serve an SSH console (a Python prompt in the running gateway) on this endpoint; a bare port number "
        "listens on 127.0.0.1 only. Public keys only, from DATA_DIR/manhole/authorized_keys.",
    ),
    Setting(
        "manhole-keys",
        None,
        readable_file,
        "OpenSSH authorized_keys file for the console instead of DATA_DIR/manhole/authorized_keys.",
    ),
    Setting("log-format", "text", choice(*FORMATS), "Log lines as text, or as one JSON object per line (json)."),
    Setting(
        "log-level", "info", choice(*LEVELS), "Least important log level written: " + ", ".join(LEVELS) + ".", live=True
    ),
    Setting(
        "alert-webhook",
        None,
        check_url,
        "POST each edge alert that fires or clears ([[alert]] tables in the config file) to this HTTPS URL "
        "as JSON, with the uploader's retry policy (--upload-backoff, --upload-backoff-cap, --upload-timeout, "
        "--upload-ca).",
    ),
    Setting(
        "status-interval",
        30.0,
        seconds(1, 3600),
        "Seconds between checks of every device for silence (nothing heard for longer than its "
        "expected interval) and for quality flags.",
        live=True,
    ),
    Setting(
        "partition",
        86400.0,
        lambda value: duration(value, lo=3600, hi=366 * 86400),
        "Width of the time partitions of readings and quarantine (3600, 6h, 1d, 7d): retention drops whole "
        "partitions, so a narrower one frees space sooner; partitions already made keep their width.",
    ),
    Setting(
        "retention",
        None,
        age,
        "Delete readings older than this (3600, 90m, 12h, 30d) once every sink has uploaded them, and "
        "quarantined readings older than this. Without it readings are kept.",
    ),
    Setting(
        "compress-after",
        604800.0,
        off_or(lambda value: duration(value, lo=3600)),
        "Fold time partitions older than this (12h, 7d), once every sink has uploaded them, into the compressed "
        "cold tier: one row per device, metric and hour, about 12 bytes a reading; off keeps every reading in "
        "the hot table.",
    ),
    Setting(
        "pack-after",
        3600.0,
        off_or(lambda value: duration(value, lo=0)),
        "Rebuild a time partition's indexes, pages full, once its range is this far in the past (0, 1h, 1d): "
        "about 20 bytes less a stored reading; off leaves them as ingest made them.",
    ),
)

# The config file's tables that a SIGHUP applies while running ([[sink]], [quality], [device_types], [[alert]]).
LIVE_TABLES = frozenset(("sinks", "quality", "device_types", "alerts"))


@dataclass(frozen=True)
class GatewayConfig:
    data_dir: Path
    db: str | None
    https: EndpointSpec
    device_ca: Path | None
    device_window: int
    device_idle_timeout: float
    tls_cert: Path | None
    tls_key: Path | None
    max_body: int
    request_timeout: float
    pool_size: int
    max_batch: int
    commit_delay: float
    max_queue: int
    journal_max_bytes: int
    device_handshake_timeout: float
    shutdown_timeout: float
    db_wait: float
    max_connections: int
    max_connections_per_address: int
    device_rate: float
    upload_url: tuple[str, ...]
    upload_ca: Path | None
    upload_batch: int
    upload_batch_bytes: int
    upload_flush: float
    upload_backoff: float
    upload_backoff_cap: float
    upload_timeout: float
    retention: float | None
    command_retention: float
    command_resend: float
    ui_tiles: str | None
    ui_tiles_attribution: str | None
    compress_after: float | None
    pack_after: float | None
    partition: float
    sink_stall: float
    metrics: EndpointSpec | None
    manhole: EndpointSpec | None
    manhole_keys: Path | None
    log_format: str
    log_level: str
    sinks: tuple[Sink, ...]
    config_file: Path | None
    status_interval: float
    alert_webhook: str | None
    alerts: tuple[AlertRule, ...]
    device_types: tuple[DeviceType, ...]
    quality: QualityRules
    oidc: OidcSettings | None
    # The transports' settings, by Setting.key; read as attributes (config.modbus) like the rest.
    transport: Mapping[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "transport":
            raise AttributeError(name)
        try:
            return self.transport[name]
        except KeyError:
            raise AttributeError(f"the configuration has no setting {name!r}") from None

    def values(self) -> dict[str, Any]:
        """Every setting's value by key, the transports' included."""
        out = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "transport"}
        return {**out, **self.transport}

    def device_type(self, name: str | None) -> DeviceType | None:
        for t in self.device_types:
            if t.name == name:
                return t
        return None

    @property
    def pg_dir(self) -> Path:
        return self.data_dir / "pg"

    @property
    def known_devices_file(self) -> Path:
        return self.data_dir / "known-devices.json"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def journal_dir(self) -> Path:
        return self.data_dir / "journal"

    @property
    def manhole_dir(self) -> Path:
        return self.data_dir / "manhole"

    @property
    def authorized_keys(self) -> Path:
        return self.manhole_keys or self.manhole_dir / "authorized_keys"


def load_toml(path: Path) -> dict[str, Any]:
    """Read a config file; keys are the long option names (``-`` or ``_``)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError("config", f"{str(path)!r} cannot be read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("config", f"{str(path)!r} is not valid TOML: {e}") from None
    return {key.replace("_", "-"): value for key, value in data.items()}


def changes(old: GatewayConfig, new: GatewayConfig) -> tuple[GatewayConfig, list[str], list[str]]:
    """
    What a SIGHUP's configuration changes: the running configuration with the live changes taken
    (the rest kept), the names of the live changes, and the names of those that wait for a restart.
    """
    before, after = old.values(), new.values()
    changed = [name for name in after if before.get(name) != after[name]]
    live_now = {s.key for s in all_settings() if s.live} | LIVE_TABLES
    live = [name for name in changed if name in live_now]
    transport = {**old.transport, **{name: after[name] for name in live if name in old.transport}}
    core = {name: after[name] for name in live if name not in old.transport}
    running = dataclasses.replace(old, **core, transport=transport)
    return running, live, [name for name in changed if name not in live_now]


def reread(config: GatewayConfig, command_line: Mapping[str, Any]) -> tuple[Path | None, GatewayConfig | None]:
    """The configuration file read again (a SIGHUP), the command line still winning; None (logged) when the
    gateway has no file or the file has a mistake, and the running settings stay."""
    path = config.config_file
    if path is None:
        log.info("SIGHUP: the gateway was started without --config; nothing to re-read")
        return None, None
    try:
        return path, build_config(command_line, load_toml(path), path)
    except ConfigError as e:
        log.error("SIGHUP: {path} not applied, the running settings stay: {error}", path=str(path), error=str(e))
        return path, None


def all_settings() -> tuple[Setting, ...]:
    """The gateway's settings and every installed transport's, in that order."""
    return SETTINGS + transport_settings(SETTINGS)


# Tables of the config file beside the options: [device_types.NAME], [quality], [[alert]], [oidc], [[sink]].
TABLES = ("device-types", "quality", "alert", "oidc", "sink")


def build_config(
    command_line: Mapping[str, Any],
    file_values: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
) -> GatewayConfig:
    """Merge defaults < config file < command line, and check every value."""
    try:
        settings = all_settings()
    except StartError as e:
        raise ConfigError("", str(e)) from None
    by_name = {s.name: s for s in settings}
    file_values = dict(file_values or {})
    tables = {key: file_values.pop(key) for key in TABLES if key in file_values}
    try:
        known_keys(file_values, [*by_name, *TABLES])
    except ValueError as e:
        raise ConfigError("config", f"{str(config_file)!r}: {e}") from None
    values: dict[str, Any] = {}
    for setting in settings:
        raw = command_line.get(setting.name) if setting.option else None
        if raw is None:
            raw = file_values.get(setting.name)
        try:
            values[setting.name] = parse_setting(setting, raw)
        except (ValueError, TypeError) as e:
            raise ConfigError(setting.name if setting.option else "", str(e)) from None
    if (values["tls-cert"] is None) != (values["tls-key"] is None):
        missing = "tls-key" if values["tls-key"] is None else "tls-cert"
        raise ConfigError(missing, "--tls-cert and --tls-key go together; give both")
    core = {s.name for s in SETTINGS}
    return GatewayConfig(
        config_file=config_file,
        sinks=_sinks(values, tables.get("sink", [])),
        device_types=_device_types(tables.get("device-types", {})),
        quality=_quality(tables.get("quality", {})),
        alerts=_alerts(tables.get("alert", [])),
        oidc=_oidc(tables["oidc"]) if "oidc" in tables else None,
        transport={s.key: values[s.name] for s in settings if s.name not in core},
        **{name.replace("-", "_"): value for name, value in values.items() if name in core},
    )


def _oidc(table: Any) -> OidcSettings:
    try:
        return oidc_from_table(table, os.environ)
    except ValueError as e:
        raise ConfigError("", f"[oidc] {e}") from None


def _device_types(tables: Any) -> tuple[DeviceType, ...]:
    if not isinstance(tables, dict):
        raise ConfigError("", "[device_types]: give each type as a [device_types.NAME] table")
    try:
        return tuple(device_type_from_table(name, table, duration) for name, table in tables.items())
    except DeviceTypeError as e:
        raise ConfigError("", str(e)) from None


def _alerts(tables: Any) -> tuple[AlertRule, ...]:
    try:
        return rules_from_tables(tables, duration)
    except AlertError as e:
        raise ConfigError("", str(e)) from None


def _quality(table: Any) -> QualityRules:
    try:
        return rules_from_table(table, duration)
    except QualityError as e:
        raise ConfigError("", str(e)) from None


def _sinks(values: Mapping[str, Any], tables: Any) -> tuple[Sink, ...]:
    """Sinks from --upload-url and from the config file's [[sink]] tables."""
    defaults = {
        "ca": values["upload-ca"],
        "batch": values["upload-batch"],
        "batch_bytes": values["upload-batch-bytes"],
        "flush": values["upload-flush"],
        "backoff": values["upload-backoff"],
        "backoff_cap": values["upload-backoff-cap"],
        "timeout": values["upload-timeout"],
    }
    sinks = [Sink(name=name_from_url(url), url=url, **defaults) for url in values["upload-url"]]
    if not isinstance(tables, list):
        raise ConfigError("", "[[sink]]: give sinks as an array of tables ([[sink]] headings)")
    try:
        sinks += [sink_from_table(table, defaults, index=i) for i, table in enumerate(tables)]
        check_unique(sinks)
    except SinkError as e:
        raise ConfigError("", str(e)) from None
    return tuple(sinks)


def _options() -> tuple[Setting, ...]:
    """The settings given on the command line: the gateway's and the installed transports'."""
    try:
        settings = all_settings()
    except StartError:
        settings = SETTINGS  # build_config names the clash in one line
    return tuple(s for s in settings if s.option)


OPTIONS = _options()


class Options(usage.Options):
    """``twistd gateway`` options."""

    synopsis = "[options]"
    longdesc = (
        "Accepts readings from field devices over HTTPS, stores each one once in "
        "PostgreSQL and acknowledges it only after COMMIT. With no options it runs "
        "an embedded PostgreSQL in ./gateway-data and serves HTTPS on port 8443."
    )
    optParameters = [["config", "c", None, "TOML file holding any of these options by their long names."]] + [
        [s.name, None, None, s.help + (f" [default: {s.default}]" if s.default is not None else "")]
        for s in OPTIONS
        if not s.multiple
    ]

    gateway_config: GatewayConfig
    command_line: dict[str, Any]
    parent: Any = None  # twistd's own options, set by twistd before parsing ours

    def __init__(self) -> None:
        super().__init__()
        for setting in OPTIONS:
            if setting.multiple:
                self[setting.name] = None

    @staticmethod
    def _repeatable(setting: Setting) -> Callable[[Options, str], None]:
        def opt(self: Options, value: str) -> None:
            self[setting.name] = [*(self[setting.name] or []), value]

        default = f" [default: {', '.join(setting.default)}]" if setting.default else ""
        opt.__doc__ = setting.help + default
        return opt

    def parseOptions(self, options: list[str] | None = None) -> None:
        # twistd answers a usage error with its whole help text; one line that
        # names the option is what an operator reading a unit's journal needs.
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"twistd gateway: {e} (see: twistd gateway --help)") from None

    def postOptions(self) -> None:
        try:
            file_values: dict[str, Any] = {}
            config_file = None
            if self["config"] is not None:
                config_file = Path(os.path.expanduser(self["config"]))
                file_values = load_toml(config_file)
            self.command_line = {s.name: self[s.name] for s in OPTIONS if self[s.name] is not None}
            self.gateway_config = build_config(self.command_line, file_values, config_file)
        except ConfigError as e:
            raise SystemExit(f"twistd gateway: {e}") from None


for _setting in OPTIONS:
    if _setting.multiple:
        setattr(Options, "opt_" + _setting.name.replace("-", "_"), Options._repeatable(_setting))
