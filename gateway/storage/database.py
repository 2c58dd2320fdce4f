"""Getting the database ready before the gateway serves: the embedded server started, migrations applied."""

from __future__ import annotations

import psycopg2
import psycopg2.extensions
from twisted.logger import Logger

from gateway.errors import StartError
from gateway.storage import embedded, schema

log = Logger()

# Connection failures that waiting will not mend: the start stops with one line.
_FOR_GOOD = ("password authentication failed", "does not exist", "no pg_hba.conf entry", "invalid dsn", "SSL")


class DatabaseAway(StartError):
    """The database does not answer (yet): worth waiting for, unlike a wrong password or schema."""


def describe_dsn(dsn: str) -> str:
    """A DSN fit for a log line: no password."""
    try:
        parts = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "(unparsable)"
    parts.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in sorted(parts.items()))


def prepare_database(db: str | None, embedded_pg: embedded.EmbeddedPostgres | None) -> str:
    """Start the embedded server if there is one, apply migrations; return the DSN. Blocks: run it in a thread."""
    dsn = db if embedded_pg is None else embedded_pg.start()
    assert dsn is not None
    try:
        conn = embedded.connect(dsn, connect_timeout=10)
    except psycopg2.Error as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if any(word in text for word in _FOR_GOOD):
            raise StartError(f"--db: cannot connect: {text}") from None
        raise DatabaseAway(f"--db: cannot connect: {text}") from None
    try:
        applied = schema.migrate(conn)
        with conn.cursor() as cur:
            cur.execute("SHOW fsync")
            fsync = cur.fetchone()[0]
        conn.rollback()
    except schema.SchemaError as e:
        raise StartError(f"database schema: {e}") from None
    finally:
        conn.close()
    if fsync != "on":
        log.critical(
            "the database runs with fsync={fsync}: a power cut can lose readings the gateway "
            "has acknowledged; turn fsync on in postgresql.conf",
            fsync=fsync,
        )
    if applied:
        log.info("database schema migrated to version {version}", version=applied[-1])
    return dsn
