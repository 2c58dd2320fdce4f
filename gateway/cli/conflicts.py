"""``gatewayctl conflicts list``: readings sent again with another value than the one stored."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gateway.cli.common import database, note, print_table
from gateway.readings import format_ts

CONFLICTS = """
SELECT c.id, d.name, c.metric, (extract(epoch FROM c.ts) * 1000000)::bigint, c.stored_value, c.sent_value, c.source,
       (extract(epoch FROM c.received_at) * 1000000)::bigint
FROM conflicts c JOIN devices d ON d.id = c.device_id
WHERE (%(device)s::text IS NULL OR d.name = %(device)s)
ORDER BY c.id LIMIT %(limit)s
"""


def cmd_conflicts_list(args: argparse.Namespace) -> None:
    with database(args) as conn, conn.cursor() as cur:
        cur.execute(CONFLICTS, {"device": args.device, "limit": args.limit})
        rows = cur.fetchall()
    docs = [
        {
            "id": id_,
            "device": device,
            "metric": metric,
            "ts": format_ts(ts),
            "stored_value": stored,
            "sent_value": sent,
            "source": source,
            "received_at": format_ts(received),
        }
        for id_, device, metric, ts, stored, sent, source, received in rows
    ]
    if args.json:
        for doc in docs:
            print(json.dumps(doc))
        return
    print_table(
        ("ID", "DEVICE", "METRIC", "TS", "STORED", "SENT", "RECEIVED"),
        [
            (
                d["id"],
                d["device"],
                d["metric"],
                d["ts"],
                repr(d["stored_value"]),
                repr(d["sent_value"]),
                d["received_at"],
            )
            for d in docs
        ],
    )
    if len(docs) == args.limit:
        note(f"(the first {args.limit}; --limit shows more)")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    conflicts = sub.add_parser("conflicts", parents=[common], help="readings sent again with another value")
    csub = conflicts.add_subparsers(dest="conflicts_command", required=True, metavar="ACTION")
    p = csub.add_parser("list", parents=[common], help="the other values sent, oldest first; the first value is kept")
    p.add_argument("--device", help="only this device's")
    p.add_argument("--limit", type=int, default=100, help="at most this many [default: 100]")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_conflicts_list)
