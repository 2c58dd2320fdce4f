"""gatewayctl against a real PostgreSQL (--db), as subprocesses."""

from __future__ import annotations

import csv
import io
import json
import subprocess

import psycopg2
import psycopg2.extensions

from gateway.storage import schema
from tests.conftest import _admin_sql, script
from tests.gatewayproc import gatewayctl


def ctl(db_dsn, *args, check=True):
    return gatewayctl(*args, "--db", db_dsn, check=check)


def test_device_lifecycle(db_dsn, sql):
    token = ctl(db_dsn, "device", "add", "truck-17").stdout.strip()
    token_id, secret = token.split(".")
    stored = sql("SELECT token_id, token_hash FROM devices WHERE name = 'truck-17'")[0]
    assert stored[0] == token_id and secret.encode() not in bytes(stored[1])
    assert "truck-17" in ctl(db_dsn, "device", "list").stdout
    ctl(db_dsn, "device", "revoke", "truck-17")
    assert sql("SELECT revoked_at IS NOT NULL FROM devices")[0][0] is True
    missing = ctl(db_dsn, "device", "revoke", "nobody", check=False)
    assert missing.returncode == 1 and missing.stderr == "gatewayctl: no device 'nobody'\n"
    bad = ctl(db_dsn, "device", "add", "no spaces", check=False)
    assert bad.returncode == 1 and "device name 'no spaces'" in bad.stderr


def _fill(sql, devices=("a", "b"), n=5):
    for name in devices:
        ctl_id = sql(
            "INSERT INTO devices (name, token_id, token_hash) VALUES (%s, md5(%s), '\\x00') RETURNING id", (name, name)
        )[0][0]
        sql(
            "INSERT INTO readings (device_id, metric_id, ts, value) "
            "SELECT %s, metric_id_of('m'), timestamptz '2026-01-01T00:00:00Z' + g * interval '1 hour', g "
            "FROM generate_series(0, %s) g",
            (ctl_id, n - 1),
        )


def test_export_filters_and_formats(db_dsn, sql):
    _fill(sql)
    lines = ctl(db_dsn, "export").stdout.splitlines()
    assert len(lines) == 10
    first = json.loads(lines[0])
    assert first["device"] == "a" and first["ts"] == "2026-01-01T00:00:00Z" and first["value"] == 0.0
    only_b = ctl(
        db_dsn,
        "export",
        "--device",
        "b",
        "--since",
        "2026-01-01T01:00:00Z",
        "--until",
        "2026-01-01T03:00:00Z",
        "--format",
        "csv",
    ).stdout
    rows = list(csv.DictReader(io.StringIO(only_b)))
    assert [(r["device"], r["ts"], r["value"]) for r in rows] == [
        ("b", "2026-01-01T01:00:00Z", "1.0"),
        ("b", "2026-01-01T02:00:00Z", "2.0"),
    ]
    epoch_ms = ctl(db_dsn, "export", "--since", "1767232800000").stdout.splitlines()  # 02:00Z
    assert len(epoch_ms) == 6
    bad = ctl(db_dsn, "export", "--since", "soon", check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("gatewayctl: --since 'soon' is not an RFC 3339")
    unknown = ctl(db_dsn, "export", "--device", "zz", check=False)
    assert unknown.returncode == 1 and "no device 'zz'" in unknown.stderr


def test_export_memory_does_not_grow_with_rows(db_dsn, sql):
    """200,000 rows stream through in about the memory of 2,000."""

    def peak_rss_kb(n):
        sql("TRUNCATE readings")
        sql(
            "INSERT INTO readings (device_id, metric_id, ts, value) "
            "SELECT 1, metric_id_of('m'), timestamptz 'epoch' + g * interval '1 second', g "
            "FROM generate_series(1, %s) g",
            (n,),
        )
        proc = subprocess.run(
            [
                sys_executable(),
                "-c",
                "import resource, sys; from gateway.cli.main import main; rc = main(sys.argv[1:]); "
                "sys.stderr.write('RSS %d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)",
                "export",
                "--db",
                db_dsn,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            check=True,
        )
        assert f"exported {n} readings" in proc.stderr
        return int(proc.stderr.split("RSS ")[1].split()[0])

    sql("INSERT INTO devices (name, token_id, token_hash) VALUES ('a', 'x', '\\x00')")
    small, large = peak_rss_kb(2_000), peak_rss_kb(200_000)
    assert large < small + 20_000, (small, large)  # kilobytes: no growth with the row count


def sys_executable():
    import sys

    return sys.executable


def test_migrate_twice_and_concurrently(pg_server_dsn):
    name = "gw_migrate_race"
    _admin_sql(pg_server_dsn, f"DROP DATABASE IF EXISTS {name}")
    _admin_sql(pg_server_dsn, f"CREATE DATABASE {name}")
    dsn = psycopg2.extensions.make_dsn(pg_server_dsn, dbname=name)
    try:
        procs = [
            subprocess.Popen([script("gatewayctl"), "migrate", "--db", dsn], stderr=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        for p in procs:
            assert p.wait(60) == 0, p.stderr.read()
        assert ctl(dsn, "migrate").returncode == 0
        conn = psycopg2.connect(dsn)
        with conn, conn.cursor() as cur:
            cur.execute("SELECT version FROM schema_migrations ORDER BY version")
            assert [r[0] for r in cur.fetchall()] == [m[0] for m in schema.MIGRATIONS]
            cur.execute("INSERT INTO schema_migrations (version, description) VALUES (999, 'future')")
        conn.close()
        newer = ctl(dsn, "migrate", check=False)
        assert newer.returncode == 1 and "newer than this gateway's" in newer.stderr
    finally:
        _admin_sql(pg_server_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_unreachable_db_is_one_line(tmp_path):
    out = gatewayctl("device", "list", "--db", "host=127.0.0.1 port=1 dbname=x connect_timeout=2", check=False)
    assert out.returncode == 1
    assert out.stderr.startswith("gatewayctl: cannot connect to the database:") and out.stderr.count("\n") == 1


def test_a_tracker_is_bound_to_its_imei_once(db_dsn, sql):
    """gatewayctl device add --imei binds a tracker's IMEI to a device; one device an IMEI; set changes it."""
    from tests.gatewayproc import gatewayctl

    gatewayctl("device", "add", "truck-9", "--imei", "356307042441013", "--db", db_dsn)
    again = gatewayctl("device", "add", "truck-10", "--imei", "356307042441013", "--db", db_dsn, check=False)
    assert again.returncode == 1 and "bound to another device" in again.stderr
    bad = gatewayctl("device", "add", "truck-11", "--imei", "3563070424", "--db", db_dsn, check=False)
    assert bad.returncode == 1 and "15 digits" in bad.stderr
    gatewayctl("device", "add", "truck-10", "--db", db_dsn)
    taken = gatewayctl("device", "set", "truck-10", "--imei", "356307042441013", "--db", db_dsn, check=False)
    assert taken.returncode == 1 and "bound to another device" in taken.stderr
    gatewayctl("device", "set", "truck-9", "--imei", "", "--db", db_dsn)
    gatewayctl("device", "set", "truck-10", "--imei", "356307042441013", "--db", db_dsn)
    assert sql("SELECT name, imei FROM devices ORDER BY name") == [("truck-10", "356307042441013"), ("truck-9", None)]


def test_a_trackers_allowed_ranges_are_set_shown_and_cleared(db_dsn, sql):
    """gatewayctl device add/set --allow: address ranges (repeatable), checked; '' clears them."""
    import json

    from tests.gatewayproc import gatewayctl

    gatewayctl("device", "add", "truck-9", "--imei", "356307042441013", "--allow", "10.64.0.0/10", "--db", db_dsn)
    assert sql("SELECT allow::text[] FROM devices") == [(["10.64.0.0/10"],)]
    gatewayctl("device", "set", "truck-9", "--allow", "10.64.1.7/10", "--allow", "2001:db8::/32", "--db", db_dsn)
    shown = json.loads(gatewayctl("device", "show", "truck-9", "--json", "--db", db_dsn).stdout)
    assert shown["allowed_from"] == ["10.64.0.0/10", "2001:db8::/32"] and shown["imei"] == "356307042441013"
    bad = gatewayctl("device", "set", "truck-9", "--allow", "10.64.0.0/33", "--db", db_dsn, check=False)
    assert bad.returncode == 1 and bad.stderr.strip().endswith("is not an address range such as 10.64.0.0/10")
    gatewayctl("device", "set", "truck-9", "--allow", "", "--db", db_dsn)
    assert sql("SELECT allow FROM devices") == [(None,)]
