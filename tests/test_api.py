"""
The read API, the digital twin, vendor JSON, quality and quarantine, end to
end: the real service tree, HTTPS on a loopback port, a real PostgreSQL,
and gatewayctl in a subprocess for the admin's side.
"""

from __future__ import annotations

import json
import time

import pytest_twisted
from twisted.internet.threads import deferToThread

from gateway.api import read as api_module
from gateway.api import openapi
from tests.conftest import start_service
from tests.gatewayproc import gatewayctl
from tests.test_operations import scrape
from tests.test_service import Gateway
from tests.test_store import add_pg_device

NOW_MS = int(time.time() * 1000)


def reading(metric: str, ms: int, value: float) -> dict:
    return {"metric": metric, "ts": ms, "value": value}


class Client(Gateway):
    async def get(self, path: str, token: str | None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await self.http.get(self.url + path, headers=headers)
        return response.code, json.loads(await response.content())

    async def post_raw(self, token: str, body: bytes) -> tuple[int, dict]:
        response = await self.http.post(
            self.url + "/v1/readings",
            data=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        return response.code, json.loads(await response.content())


async def ctl(db_dsn: str, *args: str, config=None) -> str:
    extra = ["--config", str(config)] if config is not None else []
    proc = await deferToThread(gatewayctl, *args, "--db", db_dsn, *extra)
    return proc.stdout


async def open_gateway(tmp_path, db_dsn, tables=None, **settings):
    service = await start_service(tmp_path, db_dsn, tables, **settings)
    return service, Client(service)


async def close_gateway(service, client):
    await client.pool.closeCachedConnections()
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_api_tokens_roles_and_device_tokens(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn)
    try:
        reader = (await ctl(db_dsn, "token", "add", "dash", "--role", "reader")).strip()
        admin = (await ctl(db_dsn, "token", "add", "ops", "--role", "admin")).strip()
        assert len(reader.splitlines()) == 1 and "." in reader  # the token alone on stdout
        device = add_pg_device(sql, "truck-1")

        code, body = await gw.get("/v1/devices", reader)
        assert code == 200 and [d["name"] for d in body["devices"]] == ["truck-1"]
        assert body["next_cursor"] is None
        for name in ("truck-2", "truck-3"):
            add_pg_device(sql, name)
        code, first = await gw.get("/v1/devices?limit=2", reader)
        code, rest = await gw.get(f"/v1/devices?limit=2&cursor={first['next_cursor']}", reader)
        names = [d["name"] for d in first["devices"] + rest["devices"]]
        assert names == ["truck-1", "truck-2", "truck-3"] and rest["next_cursor"] is None
        assert await gw.get("/v1/devices", device) == (
            403,
            {"error": "forbidden", "message": "a device token cannot read; use an API token (gatewayctl token add)"},
        )
        assert (await gw.get("/v1/devices", None))[0] == 401
        assert (await gw.get("/v1/devices", "0123456789abcdef." + "A" * 43))[0] == 401
        assert (await gw.get("/v1/quarantine", reader))[1]["error"] == "forbidden"
        assert (await gw.get("/v1/quarantine", admin))[0] == 200

        await ctl(db_dsn, "device", "set", "truck-1", "--interval", "10m")
        assert (await gw.get("/v1/devices/truck-1", reader))[1]["expected_interval"] == 600
        await ctl(db_dsn, "device", "set", "truck-1", "--interval", "")
        assert (await gw.get("/v1/devices/truck-1", reader))[1]["expected_interval"] is None
        listed = await ctl(db_dsn, "token", "list")
        assert [line.split()[:2] for line in listed.splitlines()[1:]] == [["dash", "reader"], ["ops", "admin"]]
        await ctl(db_dsn, "token", "revoke", "dash")
        assert (await gw.get("/v1/devices", reader))[0] == 401
    finally:
        await close_gateway(service, gw)


@pytest_twisted.ensureDeferred
async def test_twin_latest_and_keyset_pages_stable_under_inserts(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn)
    try:
        token = (await ctl(db_dsn, "token", "add", "dash", "--role", "reader")).strip()
        device = add_pg_device(sql, "truck-1")
        t0 = NOW_MS - 3_600_000
        first = [reading("oil_temp", t0 + i * 1000, float(i)) for i in range(120)]
        first += [reading("density", t0 + i * 1000, 0.8) for i in range(0, 120, 2)]
        assert (await gw.post(device, first))[0] == 200
        # A late, older reading is stored but does not move the twin.
        assert await gw.post(device, [reading("oil_temp", t0 - 5000, -1.0)]) == (200, {"accepted": 1, "duplicates": 0})

        code, latest = await gw.get("/v1/devices/truck-1/latest", token)
        assert code == 200
        assert latest["metrics"]["oil_temp"]["value"] == 119.0
        assert latest["metrics"]["density"]["value"] == 0.8

        seen, cursor, pages = [], None, 0
        while True:
            path = "/v1/devices/truck-1/readings?limit=50" + (f"&cursor={cursor}" if cursor else "")
            code, page = await gw.get(path, token)
            assert code == 200
            seen += [(r["ts"], r["metric"]) for r in page["readings"]]
            pages += 1
            if pages == 1:
                # Stored between pages, before and after the cursor: pages neither shift nor repeat.
                more = [reading("rpm", t0 - 10_000, 1.0), reading("rpm", NOW_MS, 2.0)]
                assert (await gw.post(device, more))[0] == 200
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == len(set(seen)) == 181 + 1  # all but the rpm stored before the cursor
        assert seen == sorted(seen)

        code, page = await gw.get(
            f"/v1/devices/truck-1/readings?metric=density&since={t0 + 10_000}&until={t0 + 20_000}", token
        )
        assert [r["value"] for r in page["readings"]] == [0.8] * 5 and page["next_cursor"] is None
        assert (await gw.get("/v1/devices/nobody/latest", token))[0] == 404
        assert (await gw.get("/v1/devices/truck-1/readings?limit=0", token))[1]["error"] == "invalid_parameter"
        assert (await gw.get("/v1/devices/truck-1/readings?cursor=xyz", token))[1]["error"] == "invalid_cursor"
        assert (await gw.get("/v1/devices/truck-1/readings?colour=red", token))[1]["message"].startswith("colour")
    finally:
        await close_gateway(service, gw)


ACME = {
    "device": "SerialNo",
    "records": "Samples",
    "timestamp": "Time",
    "timestamp_format": "%Y-%m-%d %H:%M:%S",
    "timezone": "Europe/Berlin",
    "metrics": [
        {"path": "Sensors.OilTemp.Value", "name": "oil_temp", "scale": 0.5, "offset": -10},
        {"path": "Sensors.*.Value", "name": "acme_{1}"},
    ],
}


@pytest_twisted.ensureDeferred
async def test_vendor_json_through_a_device_type(tmp_path, db_dsn, sql):
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[device_types.acme-oil]\ndevice = "SerialNo"\nrecords = "Samples"\ntimestamp = "Time"\n'
        'timestamp_format = "%Y-%m-%d %H:%M:%S"\ntimezone = "Europe/Berlin"\nmetrics = [\n'
        '  { path = "Sensors.OilTemp.Value", name = "oil_temp", scale = 0.5, offset = -10 },\n'
        '  { path = "Sensors.*.Value", name = "acme_{1}" },\n]\n'
    )
    service, gw = await open_gateway(tmp_path, db_dsn, {"device-types": {"acme-oil": ACME}})
    try:
        token = (await ctl(db_dsn, "device", "add", "TRK-17", "--type", "acme-oil", config=config)).strip()
        local = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - 600 + 3600))  # Berlin in winter
        body = {"SerialNo": "TRK-17", "Samples": [{"Time": local, "Sensors": {"OilTemp": {"Value": 200}}}]}
        assert await gw.post_raw(token, json.dumps(body).encode()) == (200, {"accepted": 2, "duplicates": 0})
        assert sorted(sql("SELECT k.name, r.value FROM readings r JOIN metrics k ON k.id = r.metric_id")) == [
            ("acme_OilTemp", 200.0),
            ("oil_temp", 90.0),
        ]

        bad = json.dumps({**body, "Samples": [{"Time": local, "Sensors": {"OilTemp": {"Value": "hot"}}}]})
        code, answer = await gw.post_raw(token, bad.encode())
        assert (code, answer["error"]) == (422, "unmappable")
        assert answer["message"] == "Samples[0].Sensors.OilTemp.Value: 'hot' is not a number"
        assert [(d, bytes(raw)) for d, raw in sql("SELECT device, raw FROM rejected_input")] == [
            ("TRK-17", bad.encode())
        ]

        # A type the config file lacks: refused by gatewayctl, and 503 (sent again later) at the gateway.
        proc = await deferToThread(
            gatewayctl, "device", "add", "x", "--type", "nope", "--db", db_dsn, "--config", str(config), check=False
        )
        assert proc.returncode == 1 and "has no [device_types.nope] table" in proc.stderr
        orphan = add_pg_device(sql, "orphan")
        sql("UPDATE devices SET device_type = 'nope' WHERE name = 'orphan'")
        code, answer = await gw.post_raw(orphan, json.dumps(body).encode())
        assert (code, answer["error"]) == (503, "device_type_unknown")
    finally:
        await close_gateway(service, gw)


QUALITY = {
    "flag_failures": 3,
    "flag_window": "1h",
    "latitude": {"min": -90, "max": 90},
    "oil_temp": {"min": -40, "max": 200},
}


@pytest_twisted.ensureDeferred
async def test_quarantine_keeps_bad_readings_out_and_release_puts_them_in(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn, {"quality": QUALITY})
    try:
        token = (await ctl(db_dsn, "token", "add", "ops", "--role", "admin")).strip()
        device = add_pg_device(sql, "truck-1")
        readings = [
            reading("latitude", NOW_MS, 45.0),
            reading("latitude", NOW_MS + 1, 91.0),
            reading("oil_temp", NOW_MS, 250.0),
            reading("oil_temp", 946684800000, 80.0),  # 2000-01-01: a reset clock
        ]
        code, body = await gw.post(device, readings)
        assert code == 200 and (body["accepted"], body["duplicates"]) == (1, 0)
        assert [(q["index"], q["rule"].split(":")[0]) for q in body["quarantined"]] == [
            (1, "latitude.max"),
            (2, "oil_temp.max"),
            (3, "max_past"),
        ]
        # Sent again: nothing new anywhere.
        assert (await gw.post(device, readings))[1]["duplicates"] == 1
        assert sql("SELECT count(*) FROM quarantine")[0][0] == 3
        assert sql("SELECT k.name FROM readings r JOIN metrics k ON k.id = r.metric_id") == [("latitude",)]
        assert sql("SELECT metric FROM twin") == [("latitude",)]

        code, held = await gw.get("/v1/quarantine?device=truck-1", token)
        assert [q["rule"] for q in held["quarantine"]][0] == "latitude.max: 91 is above 90"

        code, status = await gw.get("/v1/devices/truck-1", token)
        assert status["quality"] == {"flagged": True, "failures": 3, "window": 3600.0, "threshold": 3}
        await service.status.check()
        assert "truck-1" in service.status.flagged
        shown = service.console.namespace()["attention"]()
        assert [(r["device"], r["flagged"], r["failures"]) for r in shown] == [("truck-1", True, 3)]
        assert "FLAGGED" in repr(shown).upper()
        m = await scrape(gw)
        assert m[("gateway_devices_flagged", ())] == 1
        assert m[("gateway_device_attention", (("device", "truck-1"), ("reason", "flagged")))] == 1
        assert m[("gateway_readings_quarantined_total", (("transport", "https"),))] == 6
        config = tmp_path / "gateway.toml"
        config.write_text('[quality]\nflag_failures = 3\nflag_window = "1h"\n')
        listed = json.loads(await ctl(db_dsn, "device", "list", "--json", config=config))
        assert listed[0]["quality"]["flagged"] is True
        assert json.loads(await ctl(db_dsn, "device", "list", "--json"))[0]["quality"]["flagged"] is False

        shown = await ctl(db_dsn, "quarantine", "list", "--rule", "oil_temp")
        assert len(shown.splitlines()) == 2 and "oil_temp.max: 250 is above 200" in shown
        await ctl(db_dsn, "quarantine", "release", "--rule", "oil_temp.max")
        assert sorted(sql("SELECT k.name, r.value FROM readings r JOIN metrics k ON k.id = r.metric_id")) == [
            ("latitude", 45.0),
            ("oil_temp", 250.0),
        ]
        assert sorted(sql("SELECT metric, value FROM twin")) == [("latitude", 45.0), ("oil_temp", 250.0)]
        assert sql("SELECT count(*) FROM quarantine")[0][0] == 2
    finally:
        await close_gateway(service, gw)


@pytest_twisted.ensureDeferred
async def test_openapi_documents_every_route_and_every_answer_given(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn)
    try:
        reader = (await ctl(db_dsn, "token", "add", "dash", "--role", "reader")).strip()
        device = add_pg_device(sql, "truck-1")
        code, doc = await gw.get("/v1/openapi.json", None)
        assert code == 200 and doc == json.loads(json.dumps(openapi.document()))
        paths = doc["paths"]
        assert {r.template for r in api_module.ROUTES} <= set(paths)
        for route in api_module.ROUTES:
            op = paths[route.template][route.method.lower()]
            assert ("security" in op) == (route.role is not None), route
            documented = {p["name"] for p in op.get("parameters", [])}
            assert documented == set(route.params), route

        given = {
            ("/v1/devices", "/v1/devices", reader): 200,
            ("/v1/devices", "/v1/devices?x=1", reader): 400,
            ("/v1/devices", "/v1/devices", None): 401,
            ("/v1/devices", "/v1/devices", device): 403,
            ("/v1/devices/{name}", "/v1/devices/truck-1", reader): 200,
            ("/v1/devices/{name}", "/v1/devices/nobody", reader): 404,
            ("/v1/devices/{name}/latest", "/v1/devices/truck-1/latest", reader): 200,
            ("/v1/devices/{name}/latest", "/v1/devices/nobody/latest", reader): 404,
            ("/v1/devices/{name}/readings", "/v1/devices/truck-1/readings", reader): 200,
            ("/v1/devices/{name}/readings", "/v1/devices/truck-1/readings?since=noon", reader): 400,
            ("/v1/devices/{name}/readings", "/v1/devices/nobody/readings", reader): 404,
            ("/v1/alerts", "/v1/alerts?state=open", reader): 200,
            ("/v1/alerts", "/v1/alerts?state=shut", reader): 400,
            ("/v1/quarantine", "/v1/quarantine", reader): 403,
            ("/v1/openapi.json", "/v1/openapi.json", None): 200,
            ("/healthz", "/healthz", None): 200,
        }
        for (template, path, token), expected in given.items():
            code, _ = await gw.get(path, token)
            assert code == expected, path
            assert str(code) in paths[template]["get"]["responses"], (template, code)
        response = await gw.http.delete(gw.url + "/v1/devices")
        assert response.code == 405 and "405" in paths["/v1/devices"]["get"]["responses"]
        await response.content()
        # The database away: 503, documented.
        await service.reads.close()
        code, body = await gw.get("/v1/devices", reader)
        assert (code, body["error"]) == (503, "database_unavailable")
        assert "503" in paths["/v1/devices"]["get"]["responses"]
    finally:
        await close_gateway(service, gw)


def test_every_read_api_error_code_has_its_http_status():
    """The read API raises codes; its resource maps each to a status (a new code must be given one)."""
    import re
    from pathlib import Path

    from gateway.api.resource import STATUS

    api = Path(__file__).resolve().parent.parent / "gateway" / "api"
    source = (api / "read.py").read_text() + (api / "commands.py").read_text()
    codes = set(re.findall(r'ApiError\(\s*"([a-z_]+)"', source))
    assert codes and codes <= STATUS.keys(), codes - STATUS.keys()


@pytest_twisted.ensureDeferred
async def test_devices_are_listed_in_natural_order_across_pages(tmp_path, db_dsn, sql):
    """sim-2 before sim-10, whichever page each falls on (a fleet page is a keyset page)."""
    service, gw = await open_gateway(tmp_path, db_dsn)
    try:
        reader = (await ctl(db_dsn, "token", "add", "dash", "--role", "reader")).strip()
        for name in ("sim-10", "sim-2", "truck-9", "sim-1", "sim-002", "sim-11", "sim-100", "truck-10a", "sim-9x"):
            add_pg_device(sql, name)
        names, cursor = [], None
        while True:
            code, page = await gw.get("/v1/devices?limit=2" + (f"&cursor={cursor}" if cursor else ""), reader)
            assert code == 200
            names += [d["name"] for d in page["devices"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert names == ["sim-1", "sim-002", "sim-2", "sim-9x", "sim-10", "sim-11", "sim-100", "truck-9", "truck-10a"]
    finally:
        await close_gateway(service, gw)
