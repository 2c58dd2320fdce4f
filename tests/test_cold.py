"""
The cold tier against a real PostgreSQL: a partition past --compress-after
and uploaded is folded into one row per (device, metric, hour); the read
API's pages and series, gatewayctl export and quarantine release see the
same readings as before; the natural key holds across the tiers; a late
reading lands in the emptied partition and is folded by the next pass; a
partition not yet uploaded is not folded.
"""

from __future__ import annotations

import datetime
import json
import time

import pytest_twisted
from twisted.internet import reactor

from gateway.storage.cold import Compressor, hours_for_page
from gateway.storage.partitions import Partitions
from tests.gatewayproc import gatewayctl
from tests.test_api import close_gateway, ctl, open_gateway
from tests.test_store import add_pg_device

DAY = 86400.0
NOW = datetime.datetime.now(datetime.timezone.utc)
# Three days ago at 06:00 UTC, whatever the time now: two hours of readings every 10 s for two metrics, all in
# that day's partition.
START = (NOW - datetime.timedelta(days=3)).replace(hour=6, minute=0, second=0, microsecond=0)
START_MS = int(START.timestamp() * 1000)


def old_readings() -> list[dict]:
    out = []
    for i in range(720):
        out.append({"metric": "oil_temp", "ts": START_MS + i * 10_000 + 7, "value": 60.0 + i % 37})
        if i % 2 == 0:
            out.append({"metric": "density", "ts": START_MS + i * 10_000 + 500, "value": 0.8 + i / 10_000})
    return out


async def all_pages(gw, token: str, query: str, limit: int) -> list[tuple]:
    seen, cursor = [], None
    while True:
        code, page = await gw.get(
            f"/v1/devices/truck-1/readings?limit={limit}&{query}" + (f"&cursor={cursor}" if cursor else ""), token
        )
        assert code == 200, page
        seen += [(r["metric"], r["ts"], r["value"]) for r in page["readings"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


async def fold(db_dsn: str) -> Compressor:
    compressor = Compressor(reactor, DAY)
    await compressor.connect(db_dsn)
    try:
        await compressor.run_pass()
    finally:
        await compressor.pool.close()
    return compressor


def export(db_dsn: str) -> list[tuple]:
    """gatewayctl export's readings, sorted; received_at apart (the cold tier keeps the latest of an hour's)."""
    out = gatewayctl("export", "--device", "truck-1", "--db", db_dsn).stdout
    return sorted((r["metric"], r["ts"], r["value"]) for r in map(json.loads, out.splitlines()))


@pytest_twisted.ensureDeferred
async def test_a_folded_partition_reads_the_same_and_keeps_the_natural_key(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn, {"quality": {"max_past": "30d"}}, compress_after="off")
    try:
        await Partitions(service.reads, DAY).maintain(START)
        token = (await ctl(db_dsn, "token", "add", "ops", "--role", "admin")).strip()
        device = add_pg_device(sql, "truck-1")
        readings = old_readings()
        for i in range(0, len(readings), 500):
            assert (await gw.post(device, readings[i : i + 500]))[0] == 200
        recent = [{"metric": "oil_temp", "ts": int(time.time() * 1000) - 1000, "value": 70.5}]
        assert (await gw.post(device, recent))[0] == 200
        name = f"readings_{START:%Y%m%d}"
        assert sql(f'SELECT count(*) FROM "{name}"') == [(len(readings),)]

        until = START_MS + 2 * 3_600_000
        series = f"/v1/devices/truck-1/series?metric=oil_temp&since={START_MS}&until={until}&points=50"
        before = {
            "pages": await all_pages(gw, token, "", 250),
            "oil": await all_pages(gw, token, f"metric=oil_temp&since={START_MS + 3_000_000}", 100),
            "series": (await gw.get(series, token))[1],
            "export": export(db_dsn),
        }
        assert len(before["pages"]) == len(readings) + 1

        compressor = await fold(db_dsn)
        assert compressor.folded[0] == name and compressor.held == {}  # and the empty partitions after it
        assert sql(f'SELECT count(*) FROM "{name}"') == [(0,)]  # emptied, kept for late readings
        cold = sql("SELECT metric, hour, readings FROM readings_cold ORDER BY metric, hour")
        assert [(m, n) for m, _, n in cold] == [
            ("density", 180),
            ("density", 180),
            ("oil_temp", 360),
            ("oil_temp", 360),
        ]
        listed = json.loads(gatewayctl("storage", "--json", "--db", db_dsn).stdout)
        cold_line = listed[-2]  # the quarantine's line comes last
        assert cold_line["partition"] == "readings_cold" and cold_line["readings_estimate"] == len(readings)

        after = {
            "pages": await all_pages(gw, token, "", 250),
            "oil": await all_pages(gw, token, f"metric=oil_temp&since={START_MS + 3_000_000}", 100),
            "series": (await gw.get(series, token))[1],
            "export": export(db_dsn),
        }
        assert after == before  # the same readings, in the same order, through every way of reading them
        # Pages cut anywhere come out the same over the tiers' boundary.
        assert await all_pages(gw, token, "", 7) == before["pages"]

        # The natural key holds across the tiers: sent again, a cold reading is a duplicate; with another
        # value, a conflict (the first value stays).
        code, body = await gw.post(device, readings[:3])
        assert (code, body) == (200, {"accepted": 0, "duplicates": 3})
        changed = {**readings[0], "value": -1.0}
        code, body = await gw.post(device, [changed])
        assert code == 200 and body["accepted"] == 0 and body.get("conflicts") == 1
        assert sql("SELECT stored_value, sent_value FROM conflicts") == [(readings[0]["value"], -1.0)]
        assert sql(f'SELECT count(*) FROM "{name}"') == [(0,)]

        # A late reading for a folded hour is stored in the emptied partition, read at once, and folded next time.
        late = {"metric": "oil_temp", "ts": START_MS + 5 * 60_000 + 3, "value": 99.25}
        assert await gw.post(device, [late]) == (200, {"accepted": 1, "duplicates": 0})
        assert sql(f'SELECT count(*) FROM "{name}"') == [(1,)]
        pages = await all_pages(gw, token, "", 250)
        assert len(pages) == len(before["pages"]) + 1 and ("oil_temp", _ts(late["ts"]), 99.25) in pages
        # A series bucket over that hour counts the hot late reading with the cold ones.
        code, mixed = await gw.get(series, token)
        assert sum(mixed["count"]) == sum(before["series"]["count"]) + 1 and max(mixed["max"]) == 99.25
        compressor = await fold(db_dsn)
        assert compressor.late == 1 and compressor.folded == []
        assert sql(f'SELECT count(*) FROM "{name}"') == [(0,)]
        assert await all_pages(gw, token, "", 250) == pages
        assert await gw.post(device, [late]) == (200, {"accepted": 0, "duplicates": 1})
    finally:
        await close_gateway(service, gw)


def _ts(ms: int) -> str:
    from gateway.readings import format_ts

    return format_ts(ms * 1000)


@pytest_twisted.ensureDeferred
async def test_a_partition_not_yet_uploaded_is_not_folded(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn, {"quality": {"max_past": "30d"}}, compress_after="off")
    try:
        await Partitions(service.reads, DAY).maintain(START)
        device = add_pg_device(sql, "truck-1")
        assert (await gw.post(device, old_readings()[:10]))[0] == 200
        sql("INSERT INTO upload_sinks (name, url) VALUES ('cloud', 'https://cloud.example/')")  # has sent nothing
        compressor = await fold(db_dsn)
        name = f"readings_{START:%Y%m%d}"
        assert compressor.folded == [] and compressor.held == {name: "not yet sent to every sink"}
        assert sql(f'SELECT count(*) FROM "{name}"') == [(10,)] and sql("SELECT count(*) FROM readings_cold") == [(0,)]
    finally:
        await close_gateway(service, gw)


def test_a_page_takes_the_hour_of_its_start_then_whole_hours_until_it_is_full():
    h = 3_600_000_000
    hours = [(0, 3600), (h, 10), (2 * h, 10), (3 * h, 10)]
    assert hours_for_page(hours, None, 100) == [0]
    assert hours_for_page(hours, h // 2, 15) == [0, h, 2 * h]  # the start's hour may hold none after it
    assert hours_for_page(hours, h + 5, 5) == [h, 2 * h]
    assert hours_for_page(hours, 4 * h, 5) == []


@pytest_twisted.ensureDeferred
async def test_retention_removes_cold_hours_past_the_limit_once_folded_before_it(tmp_path, db_dsn, sql):
    from gateway.outbound.retention import Retention

    service, gw = await open_gateway(tmp_path, db_dsn, compress_after="off")
    try:
        await Partitions(service.reads, DAY).maintain(START)
        device = add_pg_device(sql, "truck-1")
        assert (await gw.post(device, old_readings()))[0] == 200
        await fold(db_dsn)
        retention = Retention(reactor, 2 * DAY)
        await retention.connect(db_dsn)
        try:
            await retention.sweep()
            assert sql("SELECT count(*) FROM readings_cold") == [(4,)]  # folded just now: kept
            sql("UPDATE readings_cold SET folded_at = now() - interval '3 days'")
            await retention.sweep()
            assert sql("SELECT count(*) FROM readings_cold") == [(0,)] and retention.deleted == len(old_readings())
        finally:
            await retention.pool.close()
    finally:
        await close_gateway(service, gw)
