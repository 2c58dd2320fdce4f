"""
``gatewayctl storage``: where the readings are on disk — each time partition
with its range, its size (indexes included), how many readings it holds
(PostgreSQL's estimate, kept by ANALYZE) and what one costs, whether every
sink has sent it (what retention waits for) and whether its indexes were
packed once it closed; then the compressed cold tier
(its readings counted exactly), and last the quarantine's partitions
together (quarantined readings are never uploaded).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.cli.common import database, note, when
from gateway.storage.positions import UNSENT_IN, UPLOADED_FRONTIER, params
from gateway.storage.cold import SIZES
from gateway.storage.partitions import BOUNDS

PARTITIONS = f"""
SELECT p.name, p.lo, p.hi, pg_total_relation_size(p.name::regclass), greatest(c.reltuples, 0)::bigint,
       EXISTS (SELECT 1 FROM readings_packed k WHERE k.lo = p.lo)
FROM ({BOUNDS}) p(name, lo, hi) JOIN pg_class c ON c.oid = p.name::regclass
UNION ALL
SELECT 'readings_default', NULL, NULL, pg_total_relation_size('readings_default'),
       greatest(c.reltuples, 0)::bigint, false
FROM pg_class c WHERE c.oid = 'readings_default'::regclass
ORDER BY 2 NULLS FIRST
"""
# The quarantine's partitions together (the default one included): their range, bytes and estimated rows.
QUARANTINE = f"""
SELECT min(b.lo), max(b.hi), coalesce(sum(pg_total_relation_size(i.inhrelid)), 0)::bigint,
       coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
LEFT JOIN ({BOUNDS}) b(name, lo, hi) ON b.name = c.relname
WHERE i.inhparent = 'quarantine'::regclass
"""
# Whether every reading of a partition is at or below the frontier every sink has passed.
SENT = f"SELECT %(sent_tx)s IS NULL OR NOT {UNSENT_IN}"


def cmd_storage(args: argparse.Namespace) -> None:
    with database(args) as conn:
        with conn.cursor() as cur:
            cur.execute("SET LOCAL DateStyle = 'ISO'")
            cur.execute(PARTITIONS, ("readings",))
            rows = cur.fetchall()
            cur.execute(UPLOADED_FRONTIER)
            frontier = cur.fetchone() or (None, None, None, None)
            out = []
            for name, lo, hi, size, estimate, packed in rows:
                cur.execute(SENT.format(name=f'"{name}"'), params("sent", frontier))
                out.append(_line(name, lo, hi, size, estimate, cur.fetchone()[0], packed))
            cur.execute(SIZES)
            cold, size, oldest, horizon = cur.fetchone()
            if cold or horizon is not None:
                out.append(_line("readings_cold", oldest, horizon, size, cold, True))
            cur.execute(QUARANTINE, ("quarantine",))
            lo, hi, size, held = cur.fetchone()
            out.append(_line("quarantine", lo, hi, size, held, None))  # never uploaded
        conn.rollback()
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return
    total = sum(p["bytes"] for p in out)
    readings = sum(p["readings_estimate"] for p in out)
    for p in out:
        span = f"{p['from']} .. {p['to']}" if p["from"] else "(readings outside every partition)"
        if p["partition"] == "readings_cold":
            span = f"{p['from'] or '-'} .. {p['to']} (compressed)"
        if p["partition"] == "quarantine":
            span = f"{p['from'] or '-'} .. {p['to'] or '-'} (every partition)"
        cost = f"{p['bytes_per_reading']:.0f} B each" if p["bytes_per_reading"] else "-"
        sent = {True: "sent", False: "NOT YET SENT to every sink", None: "held, never uploaded"}[
            p["sent_to_every_sink"]
        ]
        packed = ", indexes packed" if p["packed"] else ""
        print(
            f"{p['partition']:<28} {span:<50} {p['bytes'] / 2**20:>10.1f} MB "
            f"{p['readings_estimate']:>14,} {cost:>12}  {sent}{packed}"
        )
    note(f"{len(out)} lines, {total / 2**30:.2f} GB, about {readings:,} readings (estimates from ANALYZE)")


def _line(
    name: str, lo: Any, hi: Any, size: int, readings: int, sent: bool | None, packed: bool | None = None
) -> dict[str, Any]:
    """
    One line of the listing: where, from and to, bytes, readings (estimated), whether every sink has them,
    and (a partition of readings) whether its indexes were packed once it closed (--pack-after).
    """
    return {
        "partition": name,
        "from": when(lo) if lo else None,
        "to": when(hi) if hi else None,
        "bytes": size,
        "readings_estimate": readings,
        "bytes_per_reading": round(size / readings, 1) if readings else None,
        "sent_to_every_sink": sent,
        "packed": packed,
    }


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "storage", parents=[common], help="the readings' time partitions: range, size, readings, sent or not"
    )
    p.add_argument("--json", action="store_true", help="print the partitions as JSON")
    p.set_defaults(func=cmd_storage)
