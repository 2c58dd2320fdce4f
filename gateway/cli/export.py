"""``gatewayctl export``: stream stored readings as JSON lines or CSV, in constant memory."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Any

import csv
from typing import TextIO

from gateway.readings import counted, format_ts, parse_ts
from gateway.storage.cold import SHIFT
from gateway.cli.common import CommandError, database, note


EXPORT_BATCH = 10_000

EXPORT_SQL = """
SELECT d.name, k.name, (extract(epoch FROM r.ts) * 1000000)::bigint, r.value,
       (extract(epoch FROM coalesce(a.received_at, r.ts)) * 1000000)::bigint
FROM readings r JOIN devices d ON d.id = r.device_id JOIN metrics k ON k.id = r.metric_id
LEFT JOIN readings_arrivals a ON a.tx = r.tx
WHERE ({device} IS NULL OR d.name = {device})
  AND ({since} IS NULL OR r.ts >= timestamptz 'epoch' + {since} * interval '1 microsecond')
  AND ({until} IS NULL OR r.ts < timestamptz 'epoch' + {until} * interval '1 microsecond')
ORDER BY r.device_id, r.metric_id, r.ts
""".format(device="%(device)s::text", since="%(since)s::bigint", until="%(until)s::bigint")

# The cold tier's readings (older than --compress-after), by device, metric and time, before the hot ones.
EXPORT_COLD_SQL = f"""
SELECT d.name, c.metric, h.us + x.o + {SHIFT} AS us, x.v, h.received
FROM readings_cold c JOIN devices d ON d.id = c.device_id
CROSS JOIN LATERAL (SELECT (extract(epoch FROM c.hour) * 1000000)::bigint AS us,
                           (extract(epoch FROM c.received_at) * 1000000)::bigint AS received) h
CROSS JOIN LATERAL unnest(c.offsets, c.vals) AS x(o, v)
WHERE (%(device)s::text IS NULL OR d.name = %(device)s)
  AND (%(since)s::bigint IS NULL OR
       (c.hour > timestamptz 'epoch' + (%(since)s - 3600000000) * interval '1 microsecond'
        AND h.us + x.o + {SHIFT} >= %(since)s))
  AND (%(until)s::bigint IS NULL OR
       (c.hour < timestamptz 'epoch' + %(until)s * interval '1 microsecond' AND h.us + x.o + {SHIFT} < %(until)s))
ORDER BY c.device_id, c.metric, c.hour
"""


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
        # Named cursors stream rows from the server in batches: constant
        # memory however many millions of rows there are.
        with conn.cursor(name="export_cold") as cold, conn.cursor(name="export") as hot:
            cold.itersize = hot.itersize = EXPORT_BATCH
            cold.execute(EXPORT_COLD_SQL, params)
            hot.execute(EXPORT_SQL, params)
            count = _write_rows(itertools.chain(cold, hot), args.format, out)
        conn.rollback()
    note(f"exported {counted(count, 'reading')}")


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


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[common], help="stream stored readings to stdout")
    p.add_argument("--device", help="only this device")
    p.add_argument("--since", help="only readings at or after this time (RFC 3339 or epoch ms)")
    p.add_argument("--until", help="only readings before this time (RFC 3339 or epoch ms)")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="[default: jsonl]")
    p.set_defaults(func=cmd_export)
