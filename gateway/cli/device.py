"""``gatewayctl device``: add, set, list, show, revoke and rotate devices."""

from __future__ import annotations

import argparse
import getpass
import json

import psycopg2
import psycopg2.errors
from psycopg2.extensions import AsIs
from typing import Any

from gateway import tokens
from gateway.commands import desired
from gateway.commands.model import CommandError as Refused
from gateway.readings import Source, NAME_RULE, is_name
from gateway.net.ranges import network
from gateway.cli.common import (
    CommandError,
    add_with_token,
    database,
    device_type,
    gateway_config,
    interval,
    key_value,
    note,
    print_table,
    revoke,
    when,
)


def _imei(text: str) -> str:
    if not (len(text) == 15 and text.isdigit() and text.isascii()):
        raise CommandError(f"--imei {text!r}: an IMEI is 15 digits (the tracker's label or *#06# on a phone)")
    return text


def _networks(given: list[str]) -> AsIs | None:
    """--allow, as many as given: address ranges, as a cidr[] value; '' or 'any' alone clears them."""
    if given in ([""], ["any"]):
        return None
    if len(given) > 64:
        raise CommandError(f"--allow: {len(given)} ranges; 64 at most (give wider ones)")
    try:
        ranges = [str(network(text)) for text in given]
    except ValueError as e:
        raise CommandError(f"--allow: {e}") from None
    # Each is an address range as ipaddress writes it (hex digits, '.', ':' and '/'): safe between quotes.
    return AsIs("ARRAY[" + ",".join(f"'{r}'" for r in ranges) + "]::cidr[]")


def cmd_device_add(args: argparse.Namespace) -> None:
    if not is_name(args.name):
        raise CommandError(f"device name {args.name!r}: {NAME_RULE}")
    kind = device_type(args)
    expected = interval(args.interval)
    columns: dict[str, Any] = {"device_type": kind, "expected_interval": expected}
    if args.imei is not None:
        columns["imei"] = _imei(args.imei)
    if args.allow:
        columns["allow"] = _networks(args.allow)
    try:
        add_with_token(args, "devices", columns, "device")
    except psycopg2.errors.UniqueViolation:
        raise CommandError(f"IMEI {args.imei} is bound to another device already") from None


def cmd_device_set(args: argparse.Namespace) -> None:
    changes: dict[str, Any] = {}
    if args.type is not None:
        changes["device_type"] = None if args.type == "" else device_type(args)
    if args.interval is not None:
        changes["expected_interval"] = None if args.interval == "" else interval(args.interval)
    if args.imei is not None:
        changes["imei"] = None if args.imei == "" else _imei(args.imei)
    if args.allow:
        changes["allow"] = _networks(args.allow)
    if not changes:
        raise CommandError("nothing to set: give --type, --interval, --imei and/or --allow ('' to clear)")
    with database(args) as conn:
        with conn.cursor() as cur:
            assignments = ", ".join(f"{column} = %({column})s" for column in changes)
            try:
                cur.execute(
                    f"UPDATE devices SET {assignments} WHERE name = %(name)s RETURNING 1",
                    {**changes, "name": args.name},
                )
            except psycopg2.errors.UniqueViolation:
                raise CommandError(f"IMEI {args.imei} is bound to another device already") from None
            if cur.fetchone() is None:
                raise CommandError(f"no device {args.name!r}")
            cur.execute(NOTIFY_DEVICE, (args.name,))
        conn.commit()
    note(
        f"device {args.name}: "
        + ", ".join(
            f"{k.replace('_', ' ')} {'cleared' if v is None else ' '.join(args.allow) if k == 'allow' else v}"
            for k, v in changes.items()
        )
    )


def _device_statuses(args: argparse.Namespace, conn: Any, name: str | None = None) -> list[dict[str, Any]]:
    import time

    from gateway.ops.status import StatusPolicy

    config = gateway_config(args)
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
    print_table(("NAME", "TYPE", "CREATED", "LAST SEEN", "STATE", "FAILURES"), rows)


# Every gateway sharing the database LISTENs on this channel and closes the
# device's sessions whose credentials are no longer valid (gateway/ops/devicewatch.py).
NOTIFY_DEVICE = "SELECT pg_notify('gateway_devices', %s)"


def cmd_device_revoke(args: argparse.Namespace) -> None:
    with database(args) as conn:
        revoke(conn, "devices", args.name, "device")
        with conn.cursor() as cur:
            cur.execute(NOTIFY_DEVICE, (args.name,))
        conn.commit()
    note(f"device {args.name} revoked; its token is refused and its open connections are closed")


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
    note(
        f"device {args.name} has a new token (above, shown only once); the old one is refused "
        "and connections made with it are closed"
    )


DEVICE_SHOW = """
SELECT d.id, d.name, d.created_at, d.last_seen, d.last_source, d.revoked_at,
       (SELECT count(*) FROM readings r WHERE r.device_id = d.id),
       (SELECT count(DISTINCT r.metric_id) FROM readings r WHERE r.device_id = d.id),
       (SELECT max(r.ts) FROM readings r WHERE r.device_id = d.id),
       (SELECT count(*) FROM rejected_input j WHERE j.device = d.name),
       (SELECT j.reason FROM rejected_input j WHERE j.device = d.name ORDER BY j.received_at DESC LIMIT 1),
       (SELECT max(j.received_at) FROM rejected_input j WHERE j.device = d.name),
       d.imei, d.allow::text[]
FROM devices d WHERE d.name = %s
"""


def cmd_device_show(args: argparse.Namespace) -> None:
    with database(args) as conn, conn.cursor() as cur:
        cur.execute(DEVICE_SHOW, (args.name,))
        row = cur.fetchone()
    if row is None:
        raise CommandError(f"no device {args.name!r}")
    _, name, created, seen, source, revoked, readings, metrics, newest, rejected, reason, rejected_at, imei, allow = row
    last = Source.parse(source)
    doc = {
        "name": name,
        "status": "revoked" if revoked else "active",
        "created": when(created),
        "revoked": when(revoked) or None,
        "last_seen": when(seen) or None,
        "transport": last.transport if last else None,
        "address": last.address if last else None,
        "readings": readings,
        "metrics": metrics,
        "newest_reading": when(newest) or None,
        "rejected_inputs": rejected,
        "last_rejected": when(rejected_at) or None,
        "last_rejection": reason,
        "imei": imei,
        "allowed_from": allow,
    }
    if args.json:
        print(json.dumps(doc))
        return
    width = max(len(k) for k in doc)
    for key, value in doc.items():
        print(f"{key.replace('_', ' ').ljust(width)}  {'-' if value is None else value}")


def cmd_device_desire(args: argparse.Namespace) -> None:
    """Set (or, with no values, show) a device's desired configuration; the delta goes to the device."""
    doc: dict[str, Any] | None = None
    if args.json is not None or args.values:
        try:
            doc = json.loads(args.json) if args.json is not None else {}
        except ValueError as e:
            raise CommandError(f"--json: not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise CommandError("--json: give a JSON object")
        doc.update(key_value(text) for text in args.values)
        try:
            desired.check_document(doc, "desired")
        except Refused as e:
            raise CommandError(e.message) from None
    who = f"gatewayctl:{getpass.getuser()}"
    with database(args) as conn, conn.cursor() as cur:
        cur.execute(desired.DEVICE, (args.name,))
        row = cur.fetchone()
        if row is None:
            raise CommandError(f"no device {args.name!r} (or it is revoked)")
        device = row[0]
        if doc is not None:
            cur.execute(desired.SET, {"device": device, "doc": json.dumps(doc), "who": who})
            (version,) = cur.fetchone()
            cur.execute(desired.SUPERSEDE, {"device": device, "note": f"superseded by desired version {version}"})
        cur.execute(desired.STATE, (device,))
        state = desired.state_of(args.name, cur.fetchone())
        if doc is not None:
            queued = desired.queued_delta(args.name, version, state, who)
            if queued is not None:
                cur.execute(desired.QUEUE, {**queued, "device": device})
        conn.commit()
    print(json.dumps(state, indent=2))
    if doc is not None:
        left = ", ".join(sorted(state["delta"])) or "nothing"
        note(f"desired configuration of {args.name} is version {state['version']}; to be applied: {left}")


ALLOW_HELP = (
    "an address range its tracker may connect from (10.64.0.0/10, the carrier's APN range), repeated for several; "
    "from anywhere else its IMEI is refused"
)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    device = sub.add_parser("device", parents=[common], help="add, list, show, revoke and rotate devices")
    dsub = device.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    p = dsub.add_parser("add", parents=[common], help="register a device; prints its token on stdout")
    p.add_argument("name")
    p.add_argument("--type", help="its [device_types.NAME] in the config file: it posts that vendor JSON")
    p.add_argument("--interval", help="silent when nothing is heard for this long (90s, 10m, 1h) [default: its type's]")
    p.add_argument("--imei", help="a tracker's IMEI (15 digits): trackers sign in by it (Teltonika, GT06)")
    p.add_argument("--allow", action="append", metavar="RANGE", help=ALLOW_HELP)
    p.set_defaults(func=cmd_device_add)
    p = dsub.add_parser("set", parents=[common], help="change a device's type, expected interval or IMEI")
    p.add_argument("name")
    p.add_argument("--type", help="its [device_types.NAME]; '' for none (it then posts the gateway's JSON)")
    p.add_argument("--interval", help="silent when nothing is heard for this long; '' for its type's")
    p.add_argument("--imei", help="a tracker's IMEI (15 digits); '' to unbind it")
    p.add_argument("--allow", action="append", metavar="RANGE", help=ALLOW_HELP + "; '' for anywhere")
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
    p = dsub.add_parser(
        "desire", parents=[common], help="set a device's desired configuration (KEY=VALUE ...), or show it"
    )
    p.add_argument("name")
    p.add_argument("values", nargs="*", metavar="KEY=VALUE", help="desired values (read as JSON when they are)")
    p.add_argument("--json", help="the whole desired document, a JSON object (KEY=VALUE add to it)")
    p.set_defaults(func=cmd_device_desire)
