"""
The embedded PostgreSQL: a server from the ``pgserver`` package living in
``DATA_DIR/pg``, reached over a Unix socket inside that directory (no TCP
port), with fsync and synchronous_commit at their safe defaults.

pgserver counts the processes using one data directory in a file and stops
the server when the last one lets go, so ``gatewayctl`` shares the server of
a running gateway and starts (then stops) its own when none runs. A process
killed with SIGKILL never removes itself from that count; stale entries are
pruned before each start, so the server still stops with the last live user.

Started as root, pgserver runs PostgreSQL as a ``pgserver`` system user and
opens every directory above ``DATA_DIR/pg`` for reading by anyone (0755) so
that user can reach it. Traversal is all it needs: each of those directories
gets back the mode it had, plus search (x) for group and others, so the data
directory is 0711, its names are not listed and ``/root`` stays closed.

Every call here blocks (initdb, pg_ctl): the server runs them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import Any
import warnings
from pathlib import Path

import psycopg2


class EmbeddedDatabaseError(Exception):
    """The embedded PostgreSQL could not be started."""


TRAVERSE = stat.S_IXGRP | stat.S_IXOTH


@contextlib.contextmanager
def traversal_only(path: Path) -> Iterator[None]:
    """
    Around a pgserver start: the directories above ``path`` end with the modes they had, plus search
    permission for group and others (what pgserver's own user needs), not the read permission pgserver adds.
    """
    modes = {}
    for parent in path.parents:
        try:
            modes[parent] = stat.S_IMODE(parent.stat().st_mode)
        except OSError:
            pass
    try:
        yield
    finally:
        if os.geteuid() == 0:  # only then does pgserver change them (it runs PostgreSQL as another user)
            for parent, mode in modes.items():
                try:
                    now = stat.S_IMODE(parent.stat().st_mode)
                    if now != mode:
                        parent.chmod(mode | TRAVERSE)
                except OSError:
                    pass


def _pgserver():
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (services, CI).
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver.postgres_server
    return pgserver


def _prune_dead_users(pg_dir: Path) -> None:
    import psutil

    pgserver = _pgserver()
    from pgserver.utils import DiskList

    with pgserver.postgres_server.PostgresServer._lock:
        users = DiskList(pg_dir / ".handle_pids.json")
        pids = users.get()
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        if alive != pids:
            users.put(alive)


class EmbeddedPostgres:
    """Start, share and stop the data directory's PostgreSQL."""

    def __init__(self, pg_dir: Path) -> None:
        self.pg_dir = Path(pg_dir).resolve()
        self._server: Any = None  # a pgserver PostgresServer once started

    def start(self) -> str:
        """Start (or join) the server; return a libpq connection string."""
        pgserver = _pgserver()
        self.pg_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            if self.pg_dir.exists():
                _prune_dead_users(self.pg_dir)
            with traversal_only(self.pg_dir):
                self._server = pgserver.get_server(self.pg_dir, cleanup_mode="stop")
            dsn = self._server.get_uri()
        except Exception as e:
            log = self.pg_dir / "log"
            hint = f"; see {log}" if log.exists() else ""
            raise EmbeddedDatabaseError(f"embedded PostgreSQL in {self.pg_dir} did not start: {e}{hint}") from e
        return dsn

    def _pid_file(self) -> tuple[int, bool] | None:
        """(pid, whether that process still runs) from postmaster.pid; None without one."""
        import psutil

        try:
            pid = int((self.pg_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        try:
            return pid, psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return pid, False

    def _remove_locks_of(self, pid: int) -> None:
        """Remove postmaster.pid and the socket's lock file where they name ``pid`` (a postmaster gone)."""
        for lock in (self.pg_dir / "postmaster.pid", *self.pg_dir.glob(".s.PGSQL.*.lock")):
            try:
                if int(lock.read_text().split("\n", 1)[0]) == pid:
                    lock.unlink()
            except (OSError, ValueError):
                continue  # gone meanwhile, or not a lock file PostgreSQL wrote

    def postmaster(self) -> int | None:
        """The running postmaster's pid, or None when none runs (an exited one's pid file does not count)."""
        found = self._pid_file()
        return found[0] if found is not None and found[1] else None

    def restart(self) -> str:
        """Start the server again after it died (PostgreSQL's crash recovery runs); the connection string."""
        if self._server is None:
            return self.start()
        pgserver = _pgserver()
        found = self._pid_file()
        if found is not None and not found[1]:
            # The postmaster has exited (a zombie not yet reaped still holds its pid): its lock files, of
            # the data directory and of the socket beside it, are stale, and PostgreSQL would not start
            # while that pid exists. Its backends, if still attached to shared memory, make the start fail
            # instead, and it is tried again.
            self._remove_locks_of(found[0])
        try:
            with pgserver.postgres_server.PostgresServer._lock, traversal_only(self.pg_dir):
                self._server.ensure_postgres_running()
            dsn: str = self._server.get_uri()
        except Exception as e:
            raise EmbeddedDatabaseError(f"embedded PostgreSQL in {self.pg_dir} did not restart: {e}") from e
        if self.postmaster() is None:
            raise EmbeddedDatabaseError(f"embedded PostgreSQL in {self.pg_dir} did not come up")
        return dsn

    def stop(self) -> None:
        """Let go of the server; it stops if no other process uses it."""
        if self._server is not None:
            server, self._server = self._server, None
            server.cleanup()


def connect(dsn: str, **extra: Any) -> psycopg2.extensions.connection:
    """
    A synchronous connection, for the command line and start-up work. Its
    session time zone is UTC: a time stored as 9999-12-31T23:59:59Z is a year
    10000 in a zone east of UTC, which Python's datetime cannot hold.
    """
    conn = psycopg2.connect(dsn, application_name=os.environ.get("PGAPPNAME", "txgateway"), **extra)
    with conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")  # over PGTZ and the server's own setting
    conn.commit()
    return conn
