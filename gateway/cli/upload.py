"""``gatewayctl upload``: the sinks' cursors, lag and parked batches."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.storage.sinkstatus import RETRY_DEAD, STATUS, STATUS_FIELDS, sink_doc
from gateway.storage.positions import at, params
from gateway.cli.common import CommandError, database, note, when
from gateway.readings import counted, format_ts


def _sink_rows(conn: Any) -> list[dict[str, Any]]:

    with conn.cursor() as cur:
        cur.execute(STATUS)
        rows = [dict(zip(STATUS_FIELDS, row)) for row in cur.fetchall()]
    conn.rollback()
    return rows


# The time partition of this sink's oldest unsent reading: retention drops no partition holding one.
OLDEST_UNSENT = f"""
SELECT r.tableoid::regclass::text FROM readings r
WHERE r.tx >= %(after_tx)s AND (r.tx, r.device_id, r.metric_id, r.ts) > {at("after")} ORDER BY r.ts LIMIT 1
"""


def cmd_upload_status(args: argparse.Namespace) -> None:
    with database(args) as conn:
        rows = _sink_rows(conn)
        with conn.cursor() as cur:
            for row in rows:
                cur.execute(OLDEST_UNSENT, params("after", (row["cursor_tx"], *row["cursor_key"].split("/", 2))))
                found = cur.fetchone()
                row["oldest_unsent_partition"] = found[0] if found else None
        conn.rollback()
    if args.json:
        json.dump([sink_doc(row) for row in rows], sys.stdout, indent=2)
        print()
        return
    if not rows:
        note("no sinks: give the gateway --upload-url or [[sink]] tables")
    for row in rows:
        lag = row["unbatched_readings"] + row["pending_readings"]
        behind = f"{row['lag_seconds']:.1f}s"
        print(f"sink {row['name']}  {row['url']}")
        device, metric, _ = row["cursor_key"].split("/", 2)
        if row["cursor_time"] is None:
            print(f"  cursor        transaction {row['cursor_tx']} (nothing sent yet)")
        else:
            time = format_ts(row["cursor_time"])
            print(f"  cursor        transaction {row['cursor_tx']}, device {device}, metric {metric}, time {time}")
        in_flight = counted(row["pending_batches"], "batch", "batches")
        print(f"  lag           {counted(lag, 'reading')}, {behind} behind ({in_flight} in flight)")
        sent = counted(row["batches_sent"], "batch", "batches"), counted(row["readings_sent"], "reading")
        parked = counted(row["parked_batches"], "batch", "batches"), counted(row["parked_readings"], "reading")
        print(f"  sent          {sent[0]}, {sent[1]}")
        print(f"  failed        {counted(row['failures'], 'attempt')}")
        print(f"  parked        {parked[0]}, {parked[1]}")
        print(f"  last sent     {when(row['last_sent_at']) or 'never'}")
        if row["oldest_unsent_partition"]:
            print(
                f"  holds back    partition {row['oldest_unsent_partition']} and later: retention keeps a partition "
                "until every sink has sent it"
            )
        if row["last_error"]:
            print(f"  last error    {when(row['last_error_at'])}  {row['last_error']}")


def _known_sink(conn: Any, name: str) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM upload_sinks WHERE name = %s", (name,))
        if cur.fetchone() is None:
            cur.execute("SELECT name FROM upload_sinks ORDER BY name")
            known = ", ".join(row[0] for row in cur.fetchall()) or "none"
            raise CommandError(f"no sink {name!r} (known: {known})")


def cmd_upload_retry_dead(args: argparse.Namespace) -> None:

    with database(args) as conn:
        _known_sink(conn, args.sink)
        with conn.cursor() as cur:
            cur.execute(RETRY_DEAD, (args.sink,))
            count = cur.rowcount
        conn.commit()
    note(f"{counted(count, 'parked batch', 'parked batches')} of sink {args.sink} will be sent again")


def cmd_upload_remove(args: argparse.Namespace) -> None:
    with database(args) as conn:
        _known_sink(conn, args.sink)
        with conn.cursor() as cur:
            cur.execute("DELETE FROM upload_sinks WHERE name = %s", (args.sink,))
        conn.commit()
    note(f"sink {args.sink} forgotten with its unsent batches; a gateway configured with it starts it anew")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
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
