"""
Versioned schema migrations, applied at start and by ``gatewayctl migrate``.

All pending migrations run in one transaction behind a transaction-level
advisory lock, so two processes migrating the same database at once queue
up and the second finds nothing left to do. The runner is synchronous
psycopg2: ``gatewayctl`` calls it directly and the server calls it in a
thread before it opens its asynchronous pool.
"""

from __future__ import annotations

from typing import Any
from gateway.storage.migrations import MIGRATIONS

MIGRATION_LOCK = 0x7467_7761_7900  # "tgway": any constant shared by all gateways

MIN_SERVER_VERSION = 140000  # extract(epoch ...) returns exact numeric from 14 on


LATEST = MIGRATIONS[-1][0]


class SchemaError(Exception):
    """The database cannot hold this gateway's schema."""


def migrate(conn: Any, upto: int = LATEST) -> list[int]:
    """
    Bring the database to the latest schema (or to version ``upto``); return the versions applied.
    ``conn`` is a synchronous psycopg2 connection; it is committed.
    """
    with conn.cursor() as cur:
        cur.execute("SHOW server_version_num")
        version = int(cur.fetchone()[0])
        if version < MIN_SERVER_VERSION:
            raise SchemaError(f"PostgreSQL {version // 10000} is too old; 14 or newer is needed")
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY,"
            " description text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in cur.fetchall()}
        newer = sorted(v for v in done if v > LATEST)
        if newer:
            conn.rollback()
            raise SchemaError(
                f"the database has schema version {newer[-1]}, newer than this gateway's {LATEST}; upgrade the gateway"
            )
        applied = []
        for number, description, sql in MIGRATIONS:
            if number in done or number > upto:
                continue
            cur.execute(sql)
            cur.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)",
                (number, description),
            )
            applied.append(number)
    conn.commit()
    return applied
