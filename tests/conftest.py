"""
Shared fixtures. Storage tests use a real PostgreSQL: the one named by
GATEWAY_TEST_DSN (its role needs CREATEDB), or else an embedded server
started once for the session in a temporary directory. Each test that
needs a database gets a fresh one, copied from a migrated template.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import shutil
import sys
import tempfile
from pathlib import Path

import psutil
import psycopg2
import psycopg2.extensions
import pytest
import pytest_twisted
from hypothesis import HealthCheck, settings

from gateway.storage import embedded
from gateway.storage import schema

_counter = itertools.count()

# CI machines are shared and busy: a property test is judged on what it finds, never on how fast
# the machine generated its examples. Tests that set their own max_examples keep this profile's rest.
settings.register_profile("gateway", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gateway")

# Directories this session's servers live in; at the end no process may still run from one.
_OWN_DIRS: list[str] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    _OWN_DIRS.append(str(session.config._tmp_path_factory.getbasetemp()))


@pytest.fixture(autouse=True)
def no_unhandled_errors():
    """A Deferred that fails with nobody listening is a bug the test did not see: fail the test that made it."""
    from twisted.logger import formatEvent, globalLogPublisher

    seen: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_failure") is not None and "Unhandled error in Deferred" in (event.get("log_format") or ""):
            seen.append(formatEvent(event) + "\n" + event["log_failure"].getTraceback())

    globalLogPublisher.addObserver(observe)
    try:
        yield
        gc.collect()  # an unreferenced failed Deferred reports itself when collected
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not seen, "\n".join(seen)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every test stops what it starts: a gateway or PostgreSQL still running now fails the run."""
    me = psutil.Process()
    survivors = set(me.children(recursive=True))
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if proc.pid != me.pid and any(d in cmdline for d in _OWN_DIRS):
            survivors.add(proc)
    survivors = {p for p in survivors if _alive(p)}
    if not survivors:
        return
    lines = []
    for proc in survivors:
        try:
            lines.append(f"  {proc.pid}: {' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except psutil.Error:
            pass
    session.config.get_terminal_writer().line(
        "processes started by the tests were still running at the end (killed now):\n" + "\n".join(lines), red=True
    )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _admin_sql(dsn: str, statement: str) -> None:
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True  # CREATE/DROP DATABASE refuse transactions
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


@pytest.fixture(scope="session")
def pg_server_dsn():
    """DSN of a PostgreSQL server the tests may create databases on."""
    given = os.environ.get("GATEWAY_TEST_DSN")
    if given:
        yield given
        return
    tmp = Path(tempfile.mkdtemp(prefix="gw-test-pg-"))
    _OWN_DIRS.append(str(tmp))
    pg = embedded.EmbeddedPostgres(tmp / "pg")
    dsn = pg.start()
    try:
        yield dsn
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def database_at(server_dsn: str, name: str, version: int = schema.LATEST) -> str:
    """A new database ``name`` with the schema up to ``version``; its DSN."""
    _admin_sql(server_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    _admin_sql(server_dsn, f"CREATE DATABASE {name}")
    dsn = psycopg2.extensions.make_dsn(server_dsn, dbname=name)
    conn = psycopg2.connect(dsn)
    try:
        schema.migrate(conn, upto=version)
    finally:
        conn.close()
    return dsn


@pytest.fixture
def old_database(pg_server_dsn):
    """database_at for one test (at the schema version asked), dropped afterwards."""
    names = []

    def make(version: int) -> str:
        names.append(f"gw_v{version}_{os.getpid()}_{next(_counter)}")
        return database_at(pg_server_dsn, names[-1], version)

    yield make
    for name in names:
        _admin_sql(pg_server_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def template_db(pg_server_dsn):
    name = f"gw_template_{os.getpid()}"
    database_at(pg_server_dsn, name)
    yield name
    _admin_sql(pg_server_dsn, f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture
def db_dsn(pg_server_dsn, template_db):
    """A fresh, migrated database for one test."""
    name = f"gw_t{os.getpid()}_{next(_counter)}"
    _admin_sql(pg_server_dsn, f"CREATE DATABASE {name} TEMPLATE {template_db}")
    yield psycopg2.extensions.make_dsn(pg_server_dsn, dbname=name)
    _admin_sql(pg_server_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def sql(db_dsn):
    """Run one statement on the test database; returns rows (or None)."""
    conns = []

    def run(statement, params=None):
        if not conns:
            c = psycopg2.connect(db_dsn)
            c.autocommit = True
            conns.append(c)
        with conns[0].cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else None

    yield run
    for c in conns:
        c.close()


BIN = Path(sys.executable).parent


def script(name: str) -> str:
    """A console script installed beside this interpreter (twistd, gatewayctl)."""
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed beside {sys.executable}: install the project first")
    return str(path)


async def start_from_file(tmp_path: Path, config: Path):
    """The service tree with a config file (for SIGHUP), no device listeners, HTTPS on 127.0.0.1."""
    from twisted.internet import reactor

    from gateway.config import build_config, load_toml
    from gateway.service import GatewayService

    values = {"data-dir": str(tmp_path / "data"), "https": "ssl:0:interface=127.0.0.1", "device": [], "mqtt": "off"}
    service = GatewayService(build_config(values, load_toml(config), config), reactor, command_line=values)
    service.privilegedStartService()
    service.startService()
    await service.ready
    return service


async def start_service(tmp_path: Path, db_dsn: str, tables: dict | None = None, **settings):
    """The real service tree on 127.0.0.1, ports chosen by the kernel, started and ready."""
    from twisted.internet import reactor

    from gateway.config import build_config
    from gateway.service import build

    values = {
        "data-dir": str(tmp_path / "data"),
        "db": db_dsn,
        "https": "ssl:0:interface=127.0.0.1",
        "device": ["tcp:0:interface=127.0.0.1", "ssl:0:interface=127.0.0.1"],
        "mqtt": ["tcp:0:interface=127.0.0.1", "ssl:0:interface=127.0.0.1"],
    }
    values.update({key.replace("_", "-"): value for key, value in settings.items()})
    service = build(build_config(values, tables), reactor)
    service.privilegedStartService()
    service.startService()
    try:
        await service.ready
    except Exception:
        await service.stopService()
        raise
    return service


@pytest_twisted.async_yield_fixture
async def service(tmp_path, db_dsn):
    """A running gateway service with the defaults and loopback endpoints."""
    svc = await start_service(tmp_path, db_dsn)
    yield svc
    await svc.stopService()


@pytest.fixture
def workdir(tmp_path):
    os.chmod(tmp_path, 0o755)  # the embedded server's user must reach the data dir
    return tmp_path


@pytest.fixture
def outage_db(workdir):
    """A PostgreSQL the test stops and starts (tests.gatewayproc.OutageDatabase)."""
    from tests.gatewayproc import OutageDatabase

    db = OutageDatabase(workdir / "external")
    yield db
    db.close()


@contextlib.contextmanager
def log_lines():
    """Every log event's text while the block runs (the list fills as events come)."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)
