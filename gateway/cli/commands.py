"""
``gatewayctl``: the administrator's command line. It works whether or not
the gateway runs: with ``--db`` it talks to that server, otherwise it
shares (or briefly starts) the embedded PostgreSQL of ``--data-dir``.

Results go to stdout (``device add`` prints the token alone, so
``TOKEN=$(gatewayctl device add truck-17)`` works); everything else goes to
stderr. Errors are one line and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO
from collections.abc import Iterator

import psycopg2

from gateway.storage import embedded
from gateway.storage import schema
from gateway.ingest import tokens
from gateway.config import ConfigError, load_toml
from gateway.readings import EPOCH, NAME_RULE, format_ts, is_name, parse_ts

EXPORT_BATCH = 10_000


class CommandError(Exception):
    """Ends the command with a one-line message and status 1."""


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def _file_values(args: argparse.Namespace) -> dict[str, Any]:
    """The --config file's values; {} without one."""
    if not args.config:
        return {}
    try:
        return load_toml(Path(args.config).expanduser())
    except ConfigError as e:
        raise CommandError(str(e)) from None


def _settings(args: argparse.Namespace) -> tuple[Path, str | None]:
    file_values = _file_values(args)
    data_dir = args.data_dir or file_values.get("data-dir") or "./gateway-data"
    db = args.db or file_values.get("db") or os.environ.get("GATEWAY_DB") or None
    return Path(data_dir).expanduser(), db


@contextlib.contextmanager
def database(args: argparse.Namespace) -> Iterator[Any]:
    """A migrated connection to the gateway's database."""
    data_dir, db = _settings(args)
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


# -- commands ------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> None:
    with database(args):
        _note(f"schema is at version {schema.LATEST}")


def _gateway_config(args: argparse.Namespace) -> Any:
    """The gateway's settings from --config (device types, quality rules), or the defaults."""
    from gateway.config import build_config

    try:
        return build_config({}, _file_values(args), Path(args.config) if args.config else None)
    except ConfigError as e:
        raise CommandError(f"{args.config}: {e}") from None


def _device_type(args: argparse.Namespace) -> str | None:
    kind = getattr(args, "type", None)
    if kind is None:
        return None
    if not is_name(kind):
        raise CommandError(f"--type {kind!r}: {NAME_RULE}")
    if not args.config:
        _note(f"--type {kind}: not checked against a config file (give --config to check it)")
    elif _gateway_config(args).device_type(kind) is None:
        raise CommandError(f"--type {kind!r}: {args.config} has no [device_types.{kind}] table")
    return kind


def _interval(text: str | None) -> float | None:
    if text is None:
        return None
    from gateway.config import duration

    try:
        return duration(text)
    except ValueError as e:
        raise CommandError(f"--interval: {e}") from None


def cmd_device_add(args: argparse.Namespace) -> None:
    if not is_name(args.name):
        raise CommandError(f"device name {args.name!r}: {NAME_RULE}")
    kind = _device_type(args)
    interval = _interval(args.interval)
    _add_with_token(args, "devices", {"device_type": kind, "expected_interval": interval}, "device")


def cmd_device_set(args: argparse.Namespace) -> None:
    changes: dict[str, Any] = {}
    if args.type is not None:
        changes["device_type"] = None if args.type == "" else _device_type(args)
    if args.interval is not None:
        changes["expected_interval"] = None if args.interval == "" else _interval(args.interval)
    if not changes:
        raise CommandError("nothing to set: give --type and/or --interval ('' to clear)")
    with database(args) as conn:
        with conn.cursor() as cur:
            assignments = ", ".join(f"{column} = %({column})s" for column in changes)
            cur.execute(
                f"UPDATE devices SET {assignments} WHERE name = %(name)s RETURNING 1", {**changes, "name": args.name}
            )
            if cur.fetchone() is None:
                raise CommandError(f"no device {args.name!r}")
            cur.execute(NOTIFY_DEVICE, (args.name,))
        conn.commit()
    _note(
        f"device {args.name}: "
        + ", ".join(f"{k.replace('_', ' ')} {v if v is not None else 'cleared'}" for k, v in changes.items())
    )


def _device_statuses(args: argparse.Namespace, conn: Any, name: str | None = None) -> list[dict[str, Any]]:
    import time

    from gateway.ops.status import StatusPolicy

    config = _gateway_config(args)
    policy = StatusPolicy(config.quality, {t.name: t for t in config.device_types})
    now = time.time()
    with conn.cursor() as cur:
        cur.execute(*policy.query(now, name))
        rows = cur.fetchall()
    conn.rollback()
    return [policy.describe(row, now) for row in rows]


def cmd_device_list(args: argparse.Namespace) -> None:
    with database(args) as conn:
        devices = _device_statuses(args, conn)
    if args.json:
        print(json.dumps(devices))
        return
    rows = [
        (
            d["name"],
            d["type"] or "-",
            d["created"],
            d["last_seen"] or "never",
            "revoked" if d["status"] == "revoked" else ("SILENT" if d["silent"] else "ok"),
            f"FLAGGED ({d['quality']['failures']})" if d["quality"]["flagged"] else str(d["quality"]["failures"]),
        )
        for d in devices
    ]
    _print_table(("NAME", "TYPE", "CREATED", "LAST SEEN", "STATE", "FAILURES"), rows)


def _print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def _add_with_token(args: argparse.Namespace, table: str, columns: dict[str, Any], what: str) -> None:
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
        conn.commit()
    print(new.token)
    _note(f"{what} {args.name} added; the token above is shown only once")


def _revoke(conn: Any, table: str, name: str, what: str) -> None:
    """Set revoked_at (once) on the named row of devices or api_tokens; CommandError if there is none."""
    with conn.cursor() as cur:
        cur.execute(f"UPDATE {table} SET revoked_at = coalesce(revoked_at, now()) WHERE name = %s RETURNING 1", (name,))
        if cur.fetchone() is None:
            raise CommandError(f"no {what} {name!r}")


def _when(value: Any) -> str:
    return value.astimezone().isoformat(timespec="seconds") if value is not None else ""


# Every gateway sharing the database LISTENs on this channel and closes the
# device's sessions whose credentials are no longer valid (gateway/devicewatch.py).
NOTIFY_DEVICE = "SELECT pg_notify('gateway_devices', %s)"


def cmd_device_revoke(args: argparse.Namespace) -> None:
    with database(args) as conn:
        _revoke(conn, "devices", args.name, "device")
        with conn.cursor() as cur:
            cur.execute(NOTIFY_DEVICE, (args.name,))
        conn.commit()
    _note(f"device {args.name} revoked; its token is refused and its open connections are closed")


def cmd_device_rotate(args: argparse.Namespace) -> None:
    new = tokens.new_token()
    with database(args) as conn:
        with conn.cursor() as cur:
            cur.execute(
                "UPDATE devices SET token_id = %s, token_hash = %s, revoked_at = NULL WHERE name = %s RETURNING 1",
                (new.token_id, new.digest, args.name),
            )
            if cur.fetchone() is None:
                raise CommandError(f"no device {args.name!r}")
            cur.execute(NOTIFY_DEVICE, (args.name,))
        conn.commit()
    print(new.token)
    _note(
        f"device {args.name} has a new token (above, shown only once); the old one is refused "
        "and connections made with it are closed"
    )


DEVICE_SHOW = """
SELECT d.id, d.name, d.created_at, d.last_seen, d.last_source, d.revoked_at,
       (SELECT count(*) FROM readings r WHERE r.device_id = d.id),
       (SELECT count(DISTINCT r.metric) FROM readings r WHERE r.device_id = d.id),
       (SELECT max(r.ts) FROM readings r WHERE r.device_id = d.id),
       (SELECT count(*) FROM rejected_input j WHERE j.device = d.name),
       (SELECT j.reason FROM rejected_input j WHERE j.device = d.name ORDER BY j.received_at DESC LIMIT 1),
       (SELECT max(j.received_at) FROM rejected_input j WHERE j.device = d.name)
FROM devices d WHERE d.name = %s
"""


def cmd_device_show(args: argparse.Namespace) -> None:
    with database(args) as conn, conn.cursor() as cur:
        cur.execute(DEVICE_SHOW, (args.name,))
        row = cur.fetchone()
    if row is None:
        raise CommandError(f"no device {args.name!r}")
    _, name, created, seen, source, revoked, readings, metrics, newest, rejected, reason, rejected_at = row
    transport, _, address = (source or "").partition(" ")
    doc = {
        "name": name,
        "status": "revoked" if revoked else "active",
        "created": _when(created),
        "revoked": _when(revoked) or None,
        "last_seen": _when(seen) or None,
        "transport": transport or None,
        "address": address or None,
        "readings": readings,
        "metrics": metrics,
        "newest_reading": format_ts(_epoch_us(newest)) if newest is not None else None,
        "rejected_inputs": rejected,
        "last_rejected": _when(rejected_at) or None,
        "last_rejection": reason,
    }
    if args.json:
        print(json.dumps(doc))
        return
    width = max(len(k) for k in doc)
    for key, value in doc.items():
        print(f"{key.replace('_', ' ').ljust(width)}  {'-' if value is None else value}")


def _epoch_us(ts: Any) -> int:
    delta = ts - EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


EXPORT_SQL = """
SELECT d.name, r.metric, (extract(epoch FROM r.ts) * 1000000)::bigint, r.value,
       (extract(epoch FROM r.received_at) * 1000000)::bigint
FROM readings r JOIN devices d ON d.id = r.device_id
WHERE ({device} IS NULL OR d.name = {device})
  AND ({since} IS NULL OR r.ts >= timestamptz 'epoch' + {since} * interval '1 microsecond')
  AND ({until} IS NULL OR r.ts < timestamptz 'epoch' + {until} * interval '1 microsecond')
ORDER BY r.id
""".format(device="%(device)s::text", since="%(since)s::bigint", until="%(until)s::bigint")


def _time_arg(option: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_ts(int(text) if text.lstrip("-").isdigit() else text)
    except ValueError as e:
        raise CommandError(f"{option} {text!r} {e}") from None


def cmd_export(args: argparse.Namespace) -> None:
    params = {
        "device": args.device,
        "since": _time_arg("--since", args.since),
        "until": _time_arg("--until", args.until),
    }
    out = sys.stdout
    with database(args) as conn:
        if args.device is not None:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM devices WHERE name = %s", (args.device,))
                if cur.fetchone() is None:
                    raise CommandError(f"no device {args.device!r}")
        # A named cursor streams rows from the server in batches: constant
        # memory however many millions of rows there are.
        with conn.cursor(name="export") as cur:
            cur.itersize = EXPORT_BATCH
            cur.execute(EXPORT_SQL, params)
            count = _write_rows(cur, args.format, out)
        conn.rollback()
    _note(f"exported {count} readings")


def _write_rows(rows: Any, fmt: str, out: TextIO) -> int:
    count = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(("device", "metric", "ts", "value", "received_at"))
        for device, metric, ts, value, received in rows:
            writer.writerow((device, metric, format_ts(ts), repr(value), format_ts(received)))
            count += 1
    else:
        dumps = json.JSONEncoder(separators=(",", ":")).encode
        for device, metric, ts, value, received in rows:
            out.write(
                dumps(
                    {
                        "device": device,
                        "metric": metric,
                        "ts": format_ts(ts),
                        "value": value,
                        "received_at": format_ts(received),
                    }
                )
                + "\n"
            )
            count += 1
    out.flush()
    return count


def provision_simulated(conn: Any, count: int) -> list[tuple[str, str]]:
    """Devices sim-0 … sim-N-1, made or given fresh tokens (the simulator owns them)."""
    devices = [(f"sim-{i}", tokens.new_token()) for i in range(count)]
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO devices (name, token_id, token_hash) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::bytea[]) "
            "ON CONFLICT (name) DO UPDATE SET token_id = EXCLUDED.token_id, "
            "token_hash = EXCLUDED.token_hash, revoked_at = NULL",
            ([n for n, _ in devices], [t.token_id for _, t in devices], [t.digest for _, t in devices]),
        )
    conn.commit()
    return [(name, t.token) for name, t in devices]


def cmd_simulate(args: argparse.Namespace) -> None:
    from twisted.internet import ssl

    from gateway.cli import simulator as simulate

    host, _, port = args.target.rpartition(":")
    if not port.isdigit():
        raise CommandError(f"--target {args.target!r}: give HOST:PORT")
    if args.devices < 1:
        raise CommandError("--devices must be at least 1")
    if args.batch < 1 or args.batch > 10_000:
        raise CommandError("--batch must be within 1..10000")
    trust = None
    if args.protocol in ("tls", "https"):
        data_dir, _ = _settings(args)
        ca = Path(args.ca) if args.ca else data_dir / "tls" / "gateway.crt"
        try:
            trust = ssl.Certificate.loadPEM(ca.read_bytes())
        except (OSError, ssl.SSL.Error) as e:
            raise CommandError(f"--ca {str(ca)!r}: cannot load a certificate to trust ({e})") from None
    with database(args) as conn:
        devices = provision_simulated(conn, args.devices)
    _note(f"simulating {len(devices)} devices over {args.protocol} against {args.target} for {args.duration:g}s")
    result: dict[str, Any] = {}

    def go(reactor: Any) -> Any:
        return simulate.run(reactor, args, devices, trust).addCallback(result.update)

    _react(go)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"acked {result['acked']:,} readings in {result['duration']:.1f}s: {result['rate']:,.0f} readings/s; "
            f"ack latency p50 {result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms, "
            f"p99 {result['p99_ms']:.1f} ms; "
            f"duplicates {result['duplicates']:,}; reconnects {result['reconnects']}; "
            f"errors {result['errors'] or 'none'}"
        )
    if result["acked"] == 0:
        raise CommandError("no reading was acknowledged")


def _react(main: Any) -> None:
    """Run the reactor until main's Deferred fires (task.react without its sys.exit)."""
    from twisted.internet import reactor

    outcome: list[Any] = []

    def start() -> None:
        d = main(reactor)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if outcome and hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()


# -- API tokens ----------------------------------------------------------


def cmd_token_add(args: argparse.Namespace) -> None:
    if not is_name(args.name):
        raise CommandError(f"token name {args.name!r}: {NAME_RULE}")
    _add_with_token(args, "api_tokens", {"role": args.role}, f"API token ({args.role})")


def cmd_token_list(args: argparse.Namespace) -> None:
    with database(args) as conn, conn.cursor() as cur:
        cur.execute("SELECT name, role, created_at, revoked_at FROM api_tokens ORDER BY name")
        rows = [(name, role, _when(created), _when(revoked) or "-") for name, role, created, revoked in cur.fetchall()]
    _print_table(("NAME", "ROLE", "CREATED", "REVOKED"), rows)


def cmd_token_revoke(args: argparse.Namespace) -> None:
    with database(args) as conn:
        _revoke(conn, "api_tokens", args.name, "API token")
        conn.commit()
    _note(f"API token {args.name} revoked; it is refused from now on")


# -- quarantine ----------------------------------------------------------

QUARANTINE_WHERE = """
FROM quarantine q JOIN devices d ON d.id = q.device_id
WHERE (%(ids)s::bigint[] IS NULL OR q.id = ANY(%(ids)s))
  AND (%(device)s::text IS NULL OR d.name = %(device)s)
  AND (%(rule)s::text IS NULL OR q.rule LIKE %(rule)s || '%%')
"""

# Released readings go where they would have gone: into readings (once each),
# into the twin if newer, and so to the sinks, in one transaction with their removal.
RELEASE = f"""
WITH moved AS (
    DELETE FROM quarantine q USING devices d
    WHERE d.id = q.device_id AND q.id IN (SELECT q.id {QUARANTINE_WHERE})
    RETURNING q.device_id, q.metric, q.ts, q.value
), stored AS (
    INSERT INTO readings (device_id, metric, ts, value)
    SELECT device_id, metric, ts, value FROM moved ORDER BY device_id, metric, ts
    ON CONFLICT (device_id, metric, ts) DO NOTHING
    RETURNING 1
), latest AS (
    INSERT INTO twin AS t (device_id, metric, ts, value)
    SELECT DISTINCT ON (device_id, metric) device_id, metric, ts, value FROM moved
    ORDER BY device_id, metric, ts DESC
    ON CONFLICT (device_id, metric) DO UPDATE SET ts = EXCLUDED.ts, value = EXCLUDED.value, updated_at = now()
    WHERE t.ts < EXCLUDED.ts
)
SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM stored)
"""


def _quarantine_filter(args: argparse.Namespace) -> dict[str, Any]:
    return {"ids": getattr(args, "ids", None) or None, "device": args.device, "rule": args.rule}


def cmd_quarantine_list(args: argparse.Namespace) -> None:
    from gateway.api.read import quarantined_doc

    with database(args) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT q.id, d.name, q.metric, (extract(epoch FROM q.ts) * 1000000)::bigint, q.value, q.rule, q.source, "
            f"(extract(epoch FROM q.received_at) * 1000000)::bigint {QUARANTINE_WHERE} ORDER BY q.id LIMIT %(limit)s",
            {**_quarantine_filter(args), "limit": args.limit},
        )
        docs = [quarantined_doc(row) for row in cur.fetchall()]
    if args.json:
        for doc in docs:
            print(json.dumps(doc))
        return
    _print_table(
        ("ID", "DEVICE", "METRIC", "TS", "VALUE", "RULE"),
        [(d["id"], d["device"], d["metric"], d["ts"], repr(d["value"]), d["rule"]) for d in docs],
    )
    if len(docs) == args.limit:
        _note(f"(the first {args.limit}; --limit shows more)")


def cmd_quarantine_release(args: argparse.Namespace) -> None:
    if not (args.ids or args.device or args.rule or args.all):
        raise CommandError("say which readings: IDs, --device, --rule, or --all")
    with database(args) as conn:
        with conn.cursor() as cur:
            cur.execute(RELEASE, _quarantine_filter(args))
            moved, stored = cur.fetchone()
        conn.commit()
    _note(f"released {moved} readings: {stored} stored, {moved - stored} were stored already")


# -- upload ------------------------------------------------------------


def _sink_rows(conn: Any) -> list[dict[str, Any]]:
    from gateway.outbound.ledger import STATUS, STATUS_FIELDS

    with conn.cursor() as cur:
        cur.execute(STATUS)
        rows = [dict(zip(STATUS_FIELDS, row)) for row in cur.fetchall()]
    conn.rollback()
    return rows


def cmd_upload_status(args: argparse.Namespace) -> None:
    with database(args) as conn:
        rows = _sink_rows(conn)
    if args.json:
        for row in rows:
            for key in ("last_sent_at", "last_error_at"):
                row[key] = row[key].isoformat() if row[key] is not None else None
            row["lag_readings"] = row["unbatched_readings"] + row["pending_readings"]
        json.dump(rows, sys.stdout, indent=2)
        print()
        return
    if not rows:
        _note("no sinks: give the gateway --upload-url or [[sink]] tables")
    for row in rows:
        lag = row["unbatched_readings"] + row["pending_readings"]
        behind = f"{row['lag_seconds']:.1f}s" if row["lag_seconds"] is not None else "0s"
        print(f"sink {row['name']}  {row['url']}")
        print(f"  cursor        reading {row['cursor_id']} (transaction {row['cursor_tx']})")
        print(f"  lag           {lag} readings, {behind} behind ({row['pending_batches']} batches in flight)")
        print(f"  sent          {row['batches_sent']} batches, {row['readings_sent']} readings")
        print(f"  failed        {row['failures']} attempts")
        print(f"  parked        {row['parked_batches']} batches, {row['parked_readings']} readings")
        print(f"  last sent     {_when(row['last_sent_at']) or 'never'}")
        if row["last_error"]:
            print(f"  last error    {_when(row['last_error_at'])}  {row['last_error']}")


def _known_sink(conn: Any, name: str) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM upload_sinks WHERE name = %s", (name,))
        if cur.fetchone() is None:
            cur.execute("SELECT name FROM upload_sinks ORDER BY name")
            known = ", ".join(row[0] for row in cur.fetchall()) or "none"
            raise CommandError(f"no sink {name!r} (known: {known})")


def cmd_upload_retry_dead(args: argparse.Namespace) -> None:
    from gateway.outbound.ledger import RETRY_DEAD

    with database(args) as conn:
        _known_sink(conn, args.sink)
        with conn.cursor() as cur:
            cur.execute(RETRY_DEAD, (args.sink,))
            count = cur.rowcount
        conn.commit()
    _note(f"{count} parked batches of sink {args.sink} will be sent again")


def cmd_upload_remove(args: argparse.Namespace) -> None:
    with database(args) as conn:
        _known_sink(conn, args.sink)
        with conn.cursor() as cur:
            cur.execute("DELETE FROM upload_sinks WHERE name = %s", (args.sink,))
        conn.commit()
    _note(f"sink {args.sink} forgotten with its unsent batches; a gateway configured with it starts it anew")


# -- parsing -----------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="the gateway's data directory [default: ./gateway-data]")
    common.add_argument("--db", help="PostgreSQL connection string of an external server (or $GATEWAY_DB)")
    common.add_argument("--config", "-c", help="the gateway's TOML config file (data-dir and db are read from it)")

    parser = argparse.ArgumentParser(
        prog="gatewayctl", description="Administer a txgateway and its database.", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", parents=[common], help="apply schema migrations")
    p.set_defaults(func=cmd_migrate)

    device = sub.add_parser("device", parents=[common], help="add, list, show, revoke and rotate devices")
    dsub = device.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    p = dsub.add_parser("add", parents=[common], help="register a device; prints its token on stdout")
    p.add_argument("name")
    p.add_argument("--type", help="its [device_types.NAME] in the config file: it posts that vendor JSON")
    p.add_argument("--interval", help="silent when nothing is heard for this long (90s, 10m, 1h) [default: its type's]")
    p.set_defaults(func=cmd_device_add)
    p = dsub.add_parser("set", parents=[common], help="change a device's type or expected interval")
    p.add_argument("name")
    p.add_argument("--type", help="its [device_types.NAME]; '' for none (it then posts the gateway's JSON)")
    p.add_argument("--interval", help="silent when nothing is heard for this long; '' for its type's")
    p.set_defaults(func=cmd_device_set)
    p = dsub.add_parser("list", parents=[common], help="list devices: type, last seen, silent, quality flags")
    p.add_argument("--json", action="store_true", help="print them as one JSON list (as GET /v1/devices)")
    p.set_defaults(func=cmd_device_list)
    p = dsub.add_parser("show", parents=[common], help="one device: last seen, transport, counters")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print it as one JSON object")
    p.set_defaults(func=cmd_device_show)
    p = dsub.add_parser(
        "revoke", parents=[common], help="refuse a device's token from now on and close its connections"
    )
    p.add_argument("name")
    p.set_defaults(func=cmd_device_revoke)
    p = dsub.add_parser(
        "rotate", parents=[common], help="give a device a new token (printed on stdout); the old one stops working"
    )
    p.add_argument("name")
    p.set_defaults(func=cmd_device_rotate)

    p = sub.add_parser("export", parents=[common], help="stream stored readings to stdout")
    p.add_argument("--device", help="only this device")
    p.add_argument("--since", help="only readings at or after this time (RFC 3339 or epoch ms)")
    p.add_argument("--until", help="only readings before this time (RFC 3339 or epoch ms)")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="[default: jsonl]")
    p.set_defaults(func=cmd_export)

    token = sub.add_parser("token", parents=[common], help="API tokens for the read API")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    p = tsub.add_parser("add", parents=[common], help="make an API token; prints it on stdout")
    p.add_argument("name")
    p.add_argument("--role", choices=("reader", "admin"), required=True, help="admin may also read the quarantine")
    p.set_defaults(func=cmd_token_add)
    p = tsub.add_parser("list", parents=[common], help="list API tokens")
    p.set_defaults(func=cmd_token_list)
    p = tsub.add_parser("revoke", parents=[common], help="refuse an API token from now on")
    p.add_argument("name")
    p.set_defaults(func=cmd_token_revoke)

    quarantine = sub.add_parser("quarantine", parents=[common], help="readings that failed a quality rule")
    qsub = quarantine.add_subparsers(dest="quarantine_command", required=True, metavar="ACTION")
    for action, text in (
        ("list", "show quarantined readings, oldest first"),
        ("release", "store quarantined readings as readings (twin and uploads too)"),
    ):
        p = qsub.add_parser(action, parents=[common], help=text)
        p.add_argument("ids", nargs="*", type=int, metavar="ID", help="only these (the ID column of list)")
        p.add_argument("--device", help="only this device's")
        p.add_argument("--rule", help="only those whose rule starts with this (oil_temp.max, max_past)")
        if action == "list":
            p.add_argument("--limit", type=int, default=100, help="at most this many [default: 100]")
            p.add_argument("--json", action="store_true", help="one JSON object per line")
            p.set_defaults(func=cmd_quarantine_list)
        else:
            p.add_argument("--all", action="store_true", help="every quarantined reading")
            p.set_defaults(func=cmd_quarantine_release)

    upload = sub.add_parser("upload", parents=[common], help="the uploader's sinks: status and parked batches")
    usub = upload.add_subparsers(dest="upload_command", required=True, metavar="ACTION")
    p = usub.add_parser("status", parents=[common], help="per sink: cursor, lag, batches sent/failed/parked")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_upload_status)
    p = usub.add_parser("retry-dead", parents=[common], help="send a sink's parked batches again")
    p.add_argument("sink")
    p.set_defaults(func=cmd_upload_retry_dead)
    p = usub.add_parser(
        "remove", parents=[common], help="forget a sink that is no longer configured (retention stops waiting)"
    )
    p.add_argument("sink")
    p.set_defaults(func=cmd_upload_remove)

    p = sub.add_parser(
        "simulate", parents=[common], help="simulated devices (sim-0 … sim-N-1) sending to a running gateway"
    )
    p.add_argument("--target", required=True, help="the gateway's HOST:PORT (TGP or HTTPS)")
    p.add_argument("--devices", type=int, default=10, help="how many devices [default: 10]")
    p.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="readings per second, all devices together; 0: as fast as acknowledged [default: 100]",
    )
    p.add_argument("--protocol", choices=("tcp", "tls", "https"), default="tcp", help="[default: tcp]")
    p.add_argument("--duration", type=float, default=10.0, help="seconds [default: 10]")
    p.add_argument("--batch", type=int, default=100, help="readings per frame or request [default: 100]")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.add_argument("--ca", help="certificate to trust for tls/https [default: DATA_DIR/tls/gateway.crt]")
    p.add_argument("--tls-name", help="host name the gateway's certificate must show [default: the target host]")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=cmd_simulate)
    return parser


def _merge_common(args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    # Common options may stand before or after the command; argparse gives
    # the sub-parser's default (None) precedence, so re-read them from the top.
    top = argparse.ArgumentParser(add_help=False)
    top.add_argument("--data-dir")
    top.add_argument("--db")
    top.add_argument("--config", "-c")
    known, _ = top.parse_known_args(argv)
    for key in ("data_dir", "db", "config"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(known, key))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _merge_common(build_parser().parse_args(argv), argv)
    try:
        args.func(args)
    except CommandError as e:
        print(f"gatewayctl: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (| head); not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except psycopg2.Error as e:
        print(f"gatewayctl: database error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
