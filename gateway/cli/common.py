"""
What every ``gatewayctl`` command shares: its settings (``--data-dir``,
``--db``, ``--config``), a migrated connection to the gateway's database,
one-line errors and plain tables.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2

from gateway.config import ConfigError, build_config, duration, load_toml
from gateway import tokens
from gateway.readings import NAME_RULE, epoch_us, format_ts, is_name
from gateway.storage import embedded, schema


class CommandError(Exception):
    """Ends the command with a one-line message and status 1."""


def note(text: str) -> None:
    print(text, file=sys.stderr)


def file_values(args: argparse.Namespace) -> dict[str, Any]:
    """The --config file's values; {} without one."""
    if not args.config:
        return {}
    try:
        return load_toml(Path(args.config).expanduser())
    except ConfigError as e:
        raise CommandError(str(e)) from None


def settings(args: argparse.Namespace) -> tuple[Path, str | None]:
    values = file_values(args)
    data_dir = args.data_dir or values.get("data-dir") or "./gateway-data"
    db = args.db or values.get("db") or os.environ.get("GATEWAY_DB") or None
    return Path(data_dir).expanduser(), db


@contextlib.contextmanager
def database(args: argparse.Namespace) -> Iterator[Any]:
    """A migrated connection to the gateway's database."""
    data_dir, db = settings(args)
    pg = None
    if db is None:
        if not data_dir.exists():
            data_dir.mkdir(mode=0o700, parents=True)
        pg = embedded.EmbeddedPostgres(data_dir / "pg")
        try:
            dsn = pg.start()
        except embedded.EmbeddedDatabaseError as e:
            raise CommandError(str(e)) from None
    else:
        dsn = db
    try:
        try:
            conn = embedded.connect(dsn, connect_timeout=10)
        except psycopg2.Error as e:
            raise CommandError(f"cannot connect to the database: {str(e).strip().splitlines()[0]}") from None
        try:
            schema.migrate(conn)
            yield conn
        except schema.SchemaError as e:
            raise CommandError(str(e)) from None
        finally:
            conn.close()
    finally:
        if pg is not None:
            pg.stop()


def gateway_config(args: argparse.Namespace) -> Any:
    """The gateway's settings from --config (device types, quality rules), or the defaults."""
    try:
        return build_config({}, file_values(args), Path(args.config) if args.config else None)
    except ConfigError as e:
        raise CommandError(f"{args.config}: {e}") from None


def device_type(args: argparse.Namespace) -> str | None:
    kind = getattr(args, "type", None)
    if kind is None:
        return None
    if not is_name(kind):
        raise CommandError(f"--type {kind!r}: {NAME_RULE}")
    config = gateway_config(args)
    trackers = getattr(config, "tracker_types", {})  # the built-in models, and the config file's
    if kind in trackers:
        return kind
    if not args.config:
        note(f"--type {kind}: not checked against a config file (give --config to check it)")
    elif config.device_type(kind) is None:
        raise CommandError(
            f"--type {kind!r}: {args.config} has no [device_types.{kind}] table, and no tracker model is named so"
        )
    return kind


def interval(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return duration(text)
    except ValueError as e:
        raise CommandError(f"--interval: {e}") from None


def key_value(text: str) -> tuple[str, Any]:
    """KEY=VALUE from the command line, VALUE read as JSON when it is (5, true, [1,2]) and as text otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CommandError(f"{text!r}: give KEY=VALUE (VALUE is read as JSON when it is: 5, true, [1,2])")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def add_with_token(args: argparse.Namespace, table: str, columns: dict[str, Any], what: str) -> None:
    """Insert a named row of devices or api_tokens with a new token; print the token alone on stdout."""
    new = tokens.new_token()
    values = {"name": args.name, "token_id": new.token_id, "token_hash": new.digest, **columns}
    with database(args) as conn:
        with conn.cursor() as cur:
            cur.execute(
                f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join(f'%({k})s' for k in values)}) "
                "ON CONFLICT (name) DO NOTHING",
                values,
            )
            if cur.rowcount == 0:
                raise CommandError(f"{what.split(' (')[0]} {args.name!r} exists already")
            if table == "devices":  # gateways that looked the name up and found nothing look again
                cur.execute("SELECT pg_notify('gateway_devices', %s)", (args.name,))
        conn.commit()
    print(new.token)
    note(f"{what} {args.name} added; the token above is shown only once")


def revoke(conn: Any, table: str, name: str, what: str) -> None:
    """Set revoked_at (once) on the named row of devices or api_tokens; CommandError if there is none."""
    with conn.cursor() as cur:
        cur.execute(f"UPDATE {table} SET revoked_at = coalesce(revoked_at, now()) WHERE name = %s RETURNING 1", (name,))
        if cur.fetchone() is None:
            raise CommandError(f"no {what} {name!r}")


def when(value: datetime.datetime | None) -> str:
    """A time from the database as RFC 3339 in UTC (as the API shows it); '' for none. Years 1 to 9999."""
    return format_ts(epoch_us(value)) if value is not None else ""


REPORT_STALE = 30.0  # seconds without a report from a gateway after which it is taken for stopped


def reports(args: argparse.Namespace, table: str, key: str) -> list[tuple]:
    """
    (gateway, name, status, reported at, seconds since) from a status table the gateways write every
    few seconds (mqtt_sources by source, modbus_devices by device); with ``--json``, printed as JSON
    and [] returned.
    """
    sql = (
        f"SELECT gateway, {key}, status, updated_at, extract(epoch FROM now() - updated_at)::float8 "
        f"FROM {table} ORDER BY {key}, gateway"
    )
    with database(args) as conn:
        with conn.cursor() as cur:
            cur.execute(sql)
            rows = cur.fetchall()
        conn.rollback()
    if not args.json:
        return rows
    out = [
        {"gateway": g, key: name, **status, "reported_at": when(at), "reported_seconds_ago": age}
        for g, name, status, at, age in rows
    ]
    json.dump(out, sys.stdout, indent=2)
    print()
    return []


def reported_state(status: dict[str, Any], age: float) -> str:
    """The state a gateway reported, or that it stopped reporting."""
    return status["state"] if age <= REPORT_STALE else f"not reported for {age:.0f}s (was {status['state']})"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"
