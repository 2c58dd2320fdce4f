"""
Times at the edges of what the gateway stores (years 1 and 9999) render
everywhere a person reads them: the command line, the read API, exports. A
client in a zone far from UTC must not turn 9999-12-31T23:59:59Z into a
year 10000 that Python cannot hold.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.threads import deferToThread

from gateway.cli.common import epoch_us, when
from gateway.ops.status import StatusPolicy
from gateway.readings import EPOCH, MAX_TS_US, MIN_TS_US, format_ts, parse_ts
from gateway.storage.queries import quarantined_doc
from tests.test_api import ctl, open_gateway, close_gateway
from tests.test_store import add_pg_device

EXTREMES = [MIN_TS_US, MIN_TS_US + 1, 0, MAX_TS_US - 1, MAX_TS_US]
instants = st.one_of(st.sampled_from(EXTREMES), st.integers(MIN_TS_US, MAX_TS_US))
FAR_EAST = "Pacific/Kiritimati"  # UTC+14: the zone that pushes 9999-12-31 furthest into year 10000


@given(instants)
def test_format_ts_covers_the_whole_range_and_parses_back(ts_us):
    text = format_ts(ts_us)
    assert parse_ts(text) == ts_us
    assert text.endswith("Z") and len(text.split("T")[0]) == 10


@given(instants)
def test_the_command_lines_times_are_rfc3339_utc(ts_us):
    stored = EPOCH + datetime.timedelta(microseconds=ts_us)  # what a UTC session hands back
    assert epoch_us(stored) == ts_us
    assert when(stored) == format_ts(ts_us)


@given(instants, instants)
def test_quarantine_rows_and_device_statuses_render_at_the_edges(ts_us, seen_us):
    doc = quarantined_doc((1, "truck-1", "oil_temp", ts_us, 1.5, "max_future: x", "tgp 10.0.0.5:1", seen_us))
    assert (doc["ts"], doc["received_at"]) == (format_ts(ts_us), format_ts(seen_us))
    status = StatusPolicy().describe(("truck-1", None, 60.0, MIN_TS_US, seen_us, None, False, 0, 0), now=0.0)
    assert status["last_seen"] == format_ts(seen_us)
    json.dumps(status)


@pytest.mark.parametrize("ts_us", [MIN_TS_US, MAX_TS_US])
@pytest_twisted.ensureDeferred
async def test_extreme_times_through_the_command_line_and_the_api(tmp_path, db_dsn, sql, ts_us):
    """Readings, the twin, the quarantine and last-seen at year 1 or 9999: every view shows them, in UTC."""
    add_pg_device(sql, "truck-1")
    at = format_ts(ts_us)
    sql(
        "INSERT INTO readings (device_id, metric_id, ts, value) "
        "SELECT id, metric_id_of('oil_temp'), %s, 1.5 FROM devices",
        (at,),
    )
    sql("INSERT INTO twin (device_id, metric, ts, value) SELECT id, 'oil_temp', %s, 1.5 FROM devices", (at,))
    sql(
        "INSERT INTO quarantine (device_id, metric, ts, value, rule, source) "
        "SELECT id, 'density', %s, 2.5, 'max_past: x', 'tgp 10.0.0.5:1' FROM devices",
        (at,),
    )
    sql("UPDATE devices SET last_seen = %s", (at,))
    env = {"TZ": FAR_EAST, "PGTZ": FAR_EAST}

    def run(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "gateway.cli.main", *args, "--db", db_dsn],
            capture_output=True,
            text=True,
            timeout=120,
            env={**__import__("os").environ, **env},
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    shown = json.loads(await deferToThread(run, "device", "show", "truck-1", "--json"))
    assert (shown["last_seen"], shown["newest_reading"]) == (at, at)
    listed = json.loads(await deferToThread(run, "device", "list", "--json"))
    assert listed[0]["last_seen"] == at
    held = [json.loads(line) for line in (await deferToThread(run, "quarantine", "list", "--json")).splitlines()]
    assert [q["ts"] for q in held] == [at]
    exported = (await deferToThread(run, "export", "--format", "csv")).splitlines()
    assert exported[1].split(",")[2] == at
    assert at in await deferToThread(run, "quarantine", "list")

    service, gw = await open_gateway(tmp_path, db_dsn)
    try:
        admin = (await ctl(db_dsn, "token", "add", "ops", "--role", "admin")).strip()
        assert (await gw.get("/v1/devices/truck-1", admin))[1]["last_seen"] == at
        assert (await gw.get("/v1/devices/truck-1/latest", admin))[1]["metrics"]["oil_temp"]["ts"] == at
        code, page = await gw.get("/v1/devices/truck-1/readings", admin)
        assert code == 200 and [r["ts"] for r in page["readings"]] == [at]
        assert [q["ts"] for q in (await gw.get("/v1/quarantine", admin))[1]["quarantine"]] == [at]
    finally:
        await close_gateway(service, gw)
