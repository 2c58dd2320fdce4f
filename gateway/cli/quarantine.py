"""``gatewayctl quarantine``: list and release readings that failed a quality rule."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gateway.storage.queries import (
    QUARANTINE_WHERE,
    RELEASE,
    RELEASE_CHUNK,
    RELEASE_METRICS,
    quarantined_doc,
    QUARANTINE_COLUMNS,
)
from gateway.cli.common import CommandError, database, note, print_table
from gateway.readings import counted


def _quarantine_filter(args: argparse.Namespace) -> dict[str, Any]:
    return {"ids": getattr(args, "ids", None) or None, "device": args.device, "rule": args.rule}


def cmd_quarantine_list(args: argparse.Namespace) -> None:
    with database(args) as conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT {QUARANTINE_COLUMNS} {QUARANTINE_WHERE} ORDER BY q.id LIMIT %(limit)s",
            {**_quarantine_filter(args), "limit": args.limit},
        )
        docs = [quarantined_doc(row) for row in cur.fetchall()]
    if args.json:
        for doc in docs:
            print(json.dumps(doc))
        return
    print_table(
        ("ID", "DEVICE", "METRIC", "TS", "VALUE", "RULE"),
        [(d["id"], d["device"], d["metric"], d["ts"], repr(d["value"]), d["rule"]) for d in docs],
    )
    if len(docs) == args.limit:
        note(f"(the first {args.limit}; --limit shows more)")


def cmd_quarantine_release(args: argparse.Namespace) -> None:
    if not (args.ids or args.device or args.rule or args.all):
        raise CommandError("say which readings: IDs, --device, --rule, or --all")
    moved = stored = 0
    with database(args) as conn:
        with conn.cursor() as cur:
            while True:  # RELEASE_CHUNK readings a transaction, each committed with its removal from quarantine
                cur.execute(RELEASE_METRICS, _quarantine_filter(args))
                cur.execute(RELEASE, _quarantine_filter(args))
                chunk_moved, chunk_stored = cur.fetchone()
                conn.commit()
                moved, stored = moved + chunk_moved, stored + chunk_stored
                if chunk_moved < RELEASE_CHUNK:
                    break
    note(f"released {counted(moved, 'reading')}: {stored} stored, {moved - stored} stored already")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
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
