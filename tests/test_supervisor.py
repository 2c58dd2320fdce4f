"""The embedded PostgreSQL's supervisor, its timing on task.Clock: restart when dead, back off when it fails."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from gateway.storage.embedded import EmbeddedDatabaseError
from gateway.storage.supervisor import DatabaseSupervisor


class Postmaster:
    """Stands in for EmbeddedPostgres: a postmaster that can die and refuse to start again."""

    pg_dir = Path("/var/lib/txgateway/pg")

    def __init__(self) -> None:
        self.pid: int | None = 100
        self.refusals = 0
        self.starts = 0

    def postmaster(self):
        return self.pid

    def restart(self):
        if self.refusals:
            self.refusals -= 1
            raise EmbeddedDatabaseError("could not create shared memory segment")
        self.starts += 1
        self.pid = 200 + self.starts
        return "host=/var/lib/txgateway/pg dbname=postgres"


def supervised():
    clock, pg = Clock(), Postmaster()
    supervisor = DatabaseSupervisor(pg, clock, maybeDeferred, interval=2.0, backoff_cap=30.0)
    supervisor.startService()
    return supervisor, clock, pg


def test_a_living_postmaster_is_left_alone():
    supervisor, clock, pg = supervised()
    clock.advance(60)
    assert (pg.starts, supervisor.restarts, supervisor.status()) == (0, 0, {"restarts": 0, "ok": True})


def test_a_dead_postmaster_is_started_again_within_one_interval():
    supervisor, clock, pg = supervised()
    pg.pid = None
    clock.advance(2)
    assert pg.starts == 1 and supervisor.restarts == 1
    assert supervisor.status() == {"restarts": 1, "ok": True}


def test_failed_restarts_back_off_and_healthz_says_why_after_three():
    supervisor, clock, pg = supervised()
    pg.pid, pg.refusals = None, 4
    clock.advance(2)  # the first try fails: next in 2 s
    assert supervisor.status()["ok"] and supervisor.failures == 1
    clock.advance(1.9)
    assert supervisor.failures == 1  # the check loop does not cut the backoff short
    clock.advance(0.1)  # second failure: next in 4 s
    clock.advance(4)  # third failure: next in 8 s
    status = supervisor.status()
    assert not status["ok"] and status["failed_restarts"] == 3
    assert status["last_error"] == "could not create shared memory segment" and status["down_seconds"] == 6.0
    clock.advance(8)  # the fourth fails too: next in 16 s
    clock.advance(15.9)
    assert pg.starts == 0
    clock.advance(0.1)
    assert pg.starts == 1 and supervisor.status() == {"restarts": 1, "ok": True}


def test_the_backoff_stops_at_its_cap():
    supervisor, clock, pg = supervised()
    pg.pid, pg.refusals = None, 7
    clock.advance(2)
    for delay in (2, 4, 8, 16, 30, 30):  # after each failure in turn
        clock.advance(delay)
    assert pg.starts == 0 and supervisor.failures == 7
    clock.advance(30)
    assert pg.starts == 1


def test_no_restart_once_stopping():
    supervisor, clock, pg = supervised()
    supervisor.stopService()
    pg.pid = None
    clock.advance(60)
    assert pg.starts == 0 and clock.getDelayedCalls() == []
