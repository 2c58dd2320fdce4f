"""
The cold tier: old readings kept as one row per (device, metric, hour).

A time partition of ``readings`` whose whole range is older than
``--compress-after`` (7 days by default), and whose every reading each sink
has sent, is folded into ``readings_cold``: one row per device, metric and
hour holding the readings' times (microseconds into the hour, less 2^31, so
that an hour fits an ``integer``) and values as two arrays, sorted by time.
A reading costs 12 bytes there (4 for its time, 8 for its value) and the
row's overhead is shared by up to 3,600 readings an hour, against about 180
bytes in the hot table with its indexes. The partition is then emptied
(TRUNCATE: its space is back at once, with no dead rows for VACUUM) but
kept, so a late reading for that range still has a place to go; the next
pass folds it in too, once it has been uploaded.

The natural key holds across both tiers: a reading whose time is below the
cold horizon (the end of the newest range folded) is stored only if the
cold row of its hour does not hold its time already (the store's batch
statement, and quarantine release, check), and folding keeps the first
value of a time, as the hot table does. (One window: a batch statement
that began before a fold committed, and waited for its lock, checks the
cold tier with the snapshot it began with; a retransmission of a folded
reading in that batch is stored hot again, and the next pass folds it away,
keeping the first value.) Reads (the read API's pages and series,
``gatewayctl export``) see both tiers.

The pass runs on its own connection, partition by partition, oldest first,
each in one transaction: lock the partition against late writes (waiting at
most a second: queries of the whole table queue behind a waiting lock),
check it was uploaded, fold, empty. It stops at the first partition that is
not uploaded yet, so the folded ranges are contiguous and the horizon is
their end.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gateway.reactor import Reactor
from gateway.storage.partitions import BOUNDS
from gateway.storage.positions import UNSENT_IN, UPLOADED_FRONTIER, params
from gateway.storage.pool import PeriodicWork, first_line

log = Logger()

COMPRESS_INTERVAL = 60.0
SHIFT = 2147483648  # 2^31: offsets are µs into the hour less this, so 0 .. 3.6e9 µs fits an integer

HOUR_OF = "date_bin('1 hour', {ts}, timestamptz 'epoch')"
# Microseconds into the hour, shifted into an integer's range; float seconds below 60 are exact to the µs.
OFFSET_OF = (
    "(round((date_part('minute', {ts} - {hour}) * 60 + date_part('second', {ts} - {hour})) * 1000000)"
    f" - {SHIFT})::integer"
)


def offset_of(ts: str) -> str:
    return OFFSET_OF.format(ts=ts, hour=HOUR_OF.format(ts=ts))


# The time below which readings may be in the cold tier (-infinity: none folded yet), once per statement.
HORIZON = "(SELECT coalesce(max(hi), '-infinity') FROM readings_cold_ranges)"


def already_cold(row: str) -> str:
    """SQL true when the cold tier holds ``row``'s (device_id, metric, ts) already."""
    return (
        f"({row}.ts < {HORIZON} AND EXISTS (SELECT 1 FROM readings_cold c WHERE c.device_id = {row}.device_id"
        f" AND c.metric = {row}.metric AND c.hour = {HOUR_OF.format(ts=row + '.ts')}"
        f" AND {offset_of(row + '.ts')} = ANY (c.offsets)))"
    )


# One partition's readings into the cold tier, merged with what the cold rows of those hours hold already
# (late readings): the first value of a time stays.
FOLD = f"""
INSERT INTO readings_cold AS c (device_id, metric, hour, received_at, readings, offsets, vals)
SELECT device_id, metric, hour, max(received_at), count(*), array_agg(o ORDER BY o), array_agg(value ORDER BY o)
FROM (
    SELECT p.device_id, k.name AS metric, {HOUR_OF.format(ts="p.ts")} AS hour,
           coalesce(a.received_at, p.ts) AS received_at, p.value, {offset_of("p.ts")} AS o
    FROM {{name}} p JOIN metrics k ON k.id = p.metric_id LEFT JOIN readings_arrivals a ON a.tx = p.tx
) r
GROUP BY device_id, metric, hour
ON CONFLICT (device_id, metric, hour) DO UPDATE SET
    (offsets, vals, readings) = (
        SELECT m.offsets, m.vals, cardinality(m.offsets)
        FROM readings_cold_merge(c.offsets, c.vals, EXCLUDED.offsets, EXCLUDED.vals) m
    ),
    received_at = GREATEST(c.received_at, EXCLUDED.received_at),
    folded_at = now()
"""

# Partitions whose whole range is older than the limit, oldest first; whether each was folded before.
FOLDABLE = f"""
SELECT p.name, p.lo, p.hi, r.lo IS NOT NULL
FROM ({BOUNDS}) p(name, lo, hi) LEFT JOIN readings_cold_ranges r ON r.lo = p.lo
WHERE p.hi <= now() - make_interval(secs => %s) ORDER BY p.lo
"""

# The cold rows of one device (and metric) by hour, with their reading counts: which hours a page needs (each
# holds a reading at least, so the hour of the start and as many after it as the page has readings suffice).
COLD_HOURS = """
SELECT (extract(epoch FROM hour) * 1000000)::bigint, sum(readings)
FROM readings_cold
WHERE device_id = %(device)s AND (%(metric)s::text IS NULL OR metric = %(metric)s)
  AND (%(start)s::bigint IS NULL OR hour > timestamptz 'epoch' + (%(start)s - 3600000000) * interval '1 microsecond')
  AND (%(until)s::bigint IS NULL OR hour < timestamptz 'epoch' + %(until)s * interval '1 microsecond')
GROUP BY hour ORDER BY hour
LIMIT %(hours)s
"""
# Their readings (metric, µs, value) in the hours chosen, filtered and ordered as the read API's page.
COLD_READINGS = f"""
SELECT metric, us, value FROM (
    SELECT c.metric, h.us + x.o + {SHIFT} AS us, x.v AS value
    FROM readings_cold c
    CROSS JOIN LATERAL (SELECT (extract(epoch FROM c.hour) * 1000000)::bigint AS us) h
    CROSS JOIN LATERAL unnest(c.offsets, c.vals) AS x(o, v)
    WHERE c.device_id = %(device)s AND (%(metric)s::text IS NULL OR c.metric = %(metric)s)
      AND c.hour = ANY (%(hours)s::timestamptz[])
) r
WHERE (%(since)s::bigint IS NULL OR us >= %(since)s) AND (%(until)s::bigint IS NULL OR us < %(until)s)
  AND (%(after_ts)s::bigint IS NULL OR (us, metric) > (%(after_ts)s, %(after_metric)s::text))
ORDER BY us, metric
LIMIT %(limit)s
"""

# The cold tier as gatewayctl storage shows it: readings, bytes, the oldest hour and the horizon.
SIZES = """
SELECT coalesce(sum(readings), 0)::bigint, pg_total_relation_size('readings_cold'), min(hour),
       (SELECT max(hi) FROM readings_cold_ranges)
FROM readings_cold
"""


# Every reading of the cold tier as (device_id, metric, ts, value, received_at, hour): for queries over both
# tiers (a condition on hour narrows the rows unnested).
COLD_ROWS = f"""
SELECT c.device_id, c.metric, timestamptz 'epoch' + (h.us + x.o + {SHIFT}) * interval '1 microsecond' AS ts,
       x.v AS value, c.received_at, c.hour
FROM readings_cold c
CROSS JOIN LATERAL (SELECT (extract(epoch FROM c.hour) * 1000000)::bigint AS us) h
CROSS JOIN LATERAL unnest(c.offsets, c.vals) AS x(o, v)
"""


def hours_for_page(hours: list[tuple[int, int]], start_us: int | None, limit: int) -> list[int]:
    """
    The cold hours (µs, readings) a keyset page starting at ``start_us`` needs for ``limit`` readings: the
    hour holding the start (part of it may lie before the start), then whole hours until they hold ``limit``.
    """
    chosen: list[int] = []
    held = 0
    for hour_us, count in hours:
        if start_us is not None and hour_us + 3_600_000_000 <= start_us:
            continue
        chosen.append(hour_us)
        if start_us is None or hour_us >= start_us or len(chosen) > 1:  # all of this hour's readings count
            held += count
        if held >= limit:
            break
    return chosen


class Compressor(PeriodicWork):
    """Folds partitions older than ``after`` seconds, uploaded to every sink, into the cold tier."""

    def __init__(self, reactor: Reactor, after: float) -> None:
        super().__init__(reactor, COMPRESS_INTERVAL, now=True)
        self.after = after
        self.folded: list[str] = []  # partitions this process folded (first time)
        self.late = 0  # late readings folded into hours already cold
        self.held: dict[str, str] = {}  # partitions old enough but not folded, and why

    def connect(self, dsn: str) -> Deferred:
        return self.pool.start(dsn)

    def tick(self) -> Deferred:
        return Deferred.fromCoroutine(self.run_pass())

    def fold_partition(self, name: str, lo: Any, hi: Any, again: bool) -> Deferred:
        """Fold one partition; fires with (readings folded, None) or (0, why it waits)."""

        async def work(cur: Any) -> tuple[int, str | None]:
            await cur.execute("SET LOCAL lock_timeout = '1s'")
            await cur.execute(f'LOCK TABLE "{name}" IN SHARE ROW EXCLUSIVE MODE')
            await cur.execute(UPLOADED_FRONTIER)
            # In the partition's transaction, after locking it: is every reading in it sent to every sink?
            frontier = cur.fetchone() or (None, None, None, None)
            unsent = UNSENT_IN.format(name=f'"{name}"')
            await cur.execute(f"SELECT %(sent_tx)s IS NOT NULL AND {unsent}", params("sent", frontier))
            if cur.fetchone()[0]:
                return 0, "not yet sent to every sink"
            await cur.execute(f'SELECT count(*) FROM "{name}"')
            count = int(cur.fetchone()[0])
            if count:
                await cur.execute(FOLD.format(name=f'"{name}"'))
                await cur.execute(f'TRUNCATE "{name}"')
            if not again:
                await cur.execute(
                    "INSERT INTO readings_cold_ranges (lo, hi) VALUES (%s, %s) ON CONFLICT (lo) DO NOTHING", (lo, hi)
                )
            return count, None

        return self.pool.run(lambda conn: conn.runInteraction(lambda cur: Deferred.fromCoroutine(work(cur))))

    async def run_pass(self) -> None:
        try:
            rows = await self.pool.run(lambda c: c.runQuery(FOLDABLE, ("readings", self.after)))
        except Exception as e:
            log.warn("compression: partitions not looked at: {error}", error=first_line(e))
            return
        held: dict[str, str] = {}
        for name, lo, hi, again in rows:
            if name == "readings_default":
                continue
            try:
                count, why = await self.fold_partition(name, lo, hi, again)
            except Exception as e:
                held[name] = first_line(e)
                break
            if why is not None:
                held[name] = why
                break  # the ranges folded stay contiguous: the horizon is their end
            if again:
                self.late += count
                if count:
                    log.info("compression: {count} late readings of {name} folded", count=count, name=name)
            else:
                self.folded.append(name)
                log.info("compression: partition {name} folded into the cold tier ({count} readings)", name=name,
                         count=count)  # fmt: skip
        self.held = held

    def status(self) -> dict[str, Any]:
        """For /healthz: partitions folded by this process, late readings folded, and what waits, with why."""
        return {"folded_partitions": len(self.folded), "late_readings_folded": self.late, "held": dict(self.held)}
