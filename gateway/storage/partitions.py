"""
The time partitions of ``readings`` and ``quarantine``.

Both tables are range-partitioned by ``ts`` (schemas 8 and 11). Partitions
are ``--partition`` wide (a day by default), aligned to multiples of that
width since 1970-01-01 UTC, and named after their table and start
(``readings_20261127``, or ``readings_20261127_060000`` when narrower than
a day; ``quarantine_20261127``). Every
``CHECK_INTERVAL`` seconds, and at start, the gateway makes sure that the
current partition and the next ``AHEAD`` exist; gateways sharing the
database do this under one advisory lock, so they agree.

A reading outside every partition (a device whose clock is years off, a
backlog from before the gateway ran) is never refused: it lands in
``readings_default`` (or ``quarantine_default``). The passes after the one
at start move such readings out into partitions of their own (at most
``SPLIT_SLOTS`` ranges a pass and table), so a large backlog never delays
the start: the new partition is created apart, filled from the default
partition and attached, while inserts into the default partition wait a
moment.

When the width changes, partitions already made stay as they are; new ones
fill the time not yet covered, cut at the new width's boundaries.
"""

from __future__ import annotations

import datetime
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gateway.reactor import Reactor
from gateway.storage.pool import PeriodicWork, PgPool, first_line

log = Logger()

PARTITION_LOCK = 0x7467_7761_7901  # shared by every gateway on the database
CHECK_INTERVAL = 600.0
AHEAD = 2  # partitions made beyond the current one
SPLIT_SLOTS = 20  # ranges moved out of a default partition in one pass
TABLES = ("readings", "quarantine")  # partitioned alike


def upload_index(name: str) -> str:
    """
    A readings partition's own btree index on tx, made with the partition. Every partition has the BRIN index
    on tx, a few bytes per thousands of readings, but BRIN knows nothing of the pages filled since it was last
    summarized (by autovacuum, a minute or more behind): the uploader reads the newest readings through this
    btree instead. Packing drops it once the partition is closed and its BRIN index is rebuilt whole.
    """
    return f'CREATE INDEX IF NOT EXISTS "{name}_upload_tx" ON "{name}" (tx)'


EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)

# The partitions of a table with their bounds ('DEFAULT' has none and is left out).
BOUNDS = r"""
SELECT c.relname, b[1]::timestamptz, b[2]::timestamptz
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''([^'']+)''\) TO \(''([^'']+)''\)') b
WHERE i.inhparent = %s::regclass AND b IS NOT NULL
ORDER BY 2
"""
# Ranges (slot numbers) that rows in a table's default partition fall on.
DEFAULT_SLOTS = """
SELECT DISTINCT floor(extract(epoch FROM ts) / %s)::bigint AS slot FROM {table}_default ORDER BY slot LIMIT %s
"""


def slot_of(when: datetime.datetime, width: float) -> int:
    return int((when - EPOCH).total_seconds() // width)


def slot_bounds(slot: int, width: float) -> tuple[datetime.datetime, datetime.datetime]:
    return EPOCH + datetime.timedelta(seconds=slot * width), EPOCH + datetime.timedelta(seconds=(slot + 1) * width)


def uncovered(
    lo: datetime.datetime, hi: datetime.datetime, taken: list[tuple[datetime.datetime, datetime.datetime]]
) -> list[tuple[datetime.datetime, datetime.datetime]]:
    """The parts of [lo, hi) no range of ``taken`` (sorted, disjoint) covers."""
    out = []
    at = lo
    for start, end in taken:
        if end <= at or start >= hi:
            continue
        if start > at:
            out.append((at, start))
        at = max(at, end)
        if at >= hi:
            break
    if at < hi:
        out.append((at, hi))
    return out


def partition_name(lo: datetime.datetime, table: str = "readings") -> str:
    lo = lo.astimezone(datetime.timezone.utc)
    if (lo.hour, lo.minute, lo.second) == (0, 0, 0):
        return f"{table}_{lo:%Y%m%d}"
    return f"{table}_{lo:%Y%m%d_%H%M%S}"


class Partitions:
    """Keeps the partitions ahead of time and empties the default partitions; on its own pool."""

    def __init__(self, pool: PgPool, width: float) -> None:
        self.pool = pool
        self.width = width
        self.made: list[str] = []  # partitions this gateway made, latest last
        self.moved = 0  # rows moved out of the default partitions

    def maintain(self, now: datetime.datetime | None = None, move: bool = True) -> Deferred:
        """One pass (``move``: and empty the default partition); fires with the names of the partitions made."""
        when = now or datetime.datetime.now(datetime.timezone.utc)

        def interaction(cur: Any) -> Deferred:
            return Deferred.fromCoroutine(self._pass(cur, when, move))

        return self.pool.run(lambda conn: conn.runInteraction(interaction))

    async def _pass(self, cur: Any, now: datetime.datetime, move: bool = True) -> list[str]:
        await cur.execute("SET LOCAL lock_timeout = '10s'")
        await cur.execute("SET LOCAL DateStyle = 'ISO'")
        await cur.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
        current = slot_of(now, self.width)
        wanted = set(range(current, current + AHEAD + 1))
        made = []
        for table in TABLES:
            await cur.execute(BOUNDS, (table,))
            taken = [(lo, hi) for _, lo, hi in cur.fetchall()]
            stray: set[int] = set()
            if move:
                await cur.execute(DEFAULT_SLOTS.format(table=table), (self.width, SPLIT_SLOTS))
                stray = {row[0] for row in cur.fetchall()}
            for slot in sorted(wanted | stray):
                for lo, hi in uncovered(*slot_bounds(slot, self.width), taken):
                    name = partition_name(lo, table)
                    self.moved += await self._make(cur, table, name, lo, hi, with_rows=slot in stray)
                    taken = sorted([*taken, (lo, hi)])
                    made.append(name)
        self.made += made
        return made

    async def _make(
        self, cur: Any, table: str, name: str, lo: datetime.datetime, hi: datetime.datetime, with_rows: bool
    ) -> int:
        """Create a partition of ``table`` for [lo, hi), moving into it what the default partition holds of it."""
        await cur.execute(f'CREATE TABLE "{name}" (LIKE {table} INCLUDING DEFAULTS)')
        if table == "readings":
            await cur.execute(upload_index(name))
        moved = 0
        if with_rows:
            # Inserts into the default partition wait until the move commits; others go on.
            await cur.execute(f"LOCK TABLE {table}_default IN SHARE ROW EXCLUSIVE MODE")
            await cur.execute(
                f"WITH gone AS (DELETE FROM {table}_default WHERE ts >= %s AND ts < %s RETURNING *) "
                f'INSERT INTO "{name}" SELECT * FROM gone',
                (lo, hi),
            )
            moved = int(cur.rowcount)
        # A constraint proving the bounds spares ATTACH a scan of the new table.
        await cur.execute(f'ALTER TABLE "{name}" ADD CONSTRAINT "{name}_bounds" CHECK (ts >= %s AND ts < %s)', (lo, hi))
        await cur.execute(f'ALTER TABLE {table} ATTACH PARTITION "{name}" FOR VALUES FROM (%s) TO (%s)', (lo, hi))
        await cur.execute(f'ALTER TABLE "{name}" DROP CONSTRAINT "{name}_bounds"')
        return moved


class _Blocking:
    """A psycopg2 cursor with the awaitable ``execute`` of txpostgres's, for the same pass run synchronously."""

    def __init__(self, cur: Any) -> None:
        self.cur = cur

    async def execute(self, sql: str, params: Any = None) -> None:
        self.cur.execute(sql, params)

    def fetchall(self) -> list[tuple]:
        return list(self.cur.fetchall())

    def fetchone(self) -> tuple | None:
        return self.cur.fetchone()

    @property
    def rowcount(self) -> int:
        return int(self.cur.rowcount)


def make_partitions(conn: Any, width: float, now: datetime.datetime | None = None) -> list[str]:
    """The keeper's pass on a blocking psycopg2 connection (the command line, benchmarks); committed."""
    keeper = Partitions(None, width)  # type: ignore[arg-type] # no pool: the pass runs on ``conn``
    with conn.cursor() as cur:
        coroutine = keeper._pass(_Blocking(cur), now or datetime.datetime.now(datetime.timezone.utc))
        try:
            coroutine.send(None)
        except StopIteration as done:
            made: list[str] = done.value
        else:  # pragma: no cover - _Blocking never suspends
            raise RuntimeError("the partition pass waited on a blocking connection")
    conn.commit()
    return made


class PartitionKeeper(PeriodicWork):
    """Runs ``Partitions.maintain`` at start and every ``CHECK_INTERVAL`` seconds, on a connection of its own."""

    def __init__(self, reactor: Reactor, width: float) -> None:
        super().__init__(reactor, CHECK_INTERVAL, now=False)
        self.partitions = Partitions(self.pool, width)
        self.last_error = ""

    async def start(self, dsn: str) -> None:
        """
        Connect and make the partitions now, so that the first readings land in theirs; what waits in the
        default partition is moved later, in the background, not while the gateway starts.
        """
        await self.pool.start(dsn)
        await self.run(move=False)

    async def _run(self, move: bool) -> None:
        try:
            made = await self.partitions.maintain(move=move)
        except Exception as e:
            self.last_error = first_line(e)
            log.warn(
                "partitions not prepared yet: {error}; readings outside them go to readings_default",
                error=self.last_error,
            )
            return
        self.last_error = ""
        if made:
            log.info("partitions made: {names}", names=", ".join(made))

    def run(self, move: bool = True) -> Deferred:
        return Deferred.fromCoroutine(self._run(move))

    def tick(self) -> Deferred:
        return self.run()
