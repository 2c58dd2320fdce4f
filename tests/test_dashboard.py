"""
The dashboard's server side, end to end: sign-in sessions (cookie, CSRF,
expiry, revocation), the page's headers and files, and the API routes the
page uses (series, rejected input, release, sinks), against the real
service tree, HTTPS on a loopback port and a real PostgreSQL.
"""

from __future__ import annotations

import gzip
import json
import re
import time
from http.cookies import SimpleCookie

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.ssl import Certificate
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, readBody
from twisted.web.http_headers import Headers

from gateway.api.sessions import COOKIE
from gateway.ui.resource import plotly_file
from tests.test_api import Client, close_gateway, ctl, open_gateway
from tests.test_store import add_pg_device

NOW_MS = int(time.time() * 1000)
COOKIE_NAME = COOKIE.decode()


class Browser(Client):
    """A client that keeps the session cookie and CSRF token, as the page does."""

    cookie: str | None = None
    csrf: str | None = None

    def _headers(self, extra: dict | None = None) -> dict:
        headers = {"Accept": "application/json", **(extra or {})}
        if self.cookie:
            headers["Cookie"] = f"{COOKIE_NAME}={self.cookie}"
        return headers

    async def sign_in(self, token: str) -> tuple[int, dict, SimpleCookie]:
        response = await self.http.post(
            self.url + "/ui/session",
            data=json.dumps({"token": token}).encode(),
            headers={"Content-Type": "application/json"},
        )
        body = json.loads(await response.content())
        jar: SimpleCookie = SimpleCookie()
        for header in response.headers.getRawHeaders("set-cookie", []):
            jar.load(header)
        if response.code == 200:
            self.cookie = jar[COOKIE_NAME].value
            self.csrf = body["csrf"]
        return response.code, body, jar

    async def call(self, method: str, path: str, csrf: bool = True, headers: dict | None = None) -> tuple[int, dict]:
        extra = {"X-CSRF-Token": self.csrf} if csrf and self.csrf and method != "GET" else {}
        extra.update(headers or {})
        response = await self.http.request(method, self.url + path, headers=self._headers(extra))
        return response.code, json.loads(await response.content())


def reading(metric: str, ms: int, value: float) -> dict:
    return {"metric": metric, "ts": ms, "value": value}


@pytest_twisted.ensureDeferred
async def test_sign_in_gives_a_strict_cookie_and_the_api_answers_to_it(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn)
    browser = Browser(service)
    try:
        reader = (await ctl(db_dsn, "token", "add", "lead", "--role", "reader")).strip()
        add_pg_device(sql, "truck-1")

        code, body, _ = await browser.sign_in("0123456789abcdef." + "A" * 43)
        assert (code, body["error"]) == (401, "unauthorized")
        device = add_pg_device(sql, "truck-2")
        assert (await browser.sign_in(device))[0] == 403  # a device token cannot sign in

        code, body, jar = await browser.sign_in(reader)
        assert code == 200 and body["role"] == "reader" and body["subject"] == "lead"
        morsel = jar[COOKIE_NAME]
        assert morsel["httponly"] and morsel["secure"] and morsel["path"] == "/"
        assert morsel["samesite"].lower() == "strict"
        assert 0 < int(morsel["max-age"]) <= 12 * 3600
        assert len(body["csrf"]) >= 40 and body["csrf"] not in morsel.value
        # Only a hash of the cookie's secret is stored.
        (stored,) = sql("SELECT secret_hash FROM ui_sessions")
        assert browser.cookie is not None and browser.cookie.split(".")[1].encode() not in bytes(stored[0])

        code, page = await browser.call("GET", "/v1/devices")
        assert code == 200 and [d["name"] for d in page["devices"]] == ["truck-1", "truck-2"]
        assert (await browser.call("GET", "/ui/session"))[1]["subject"] == "lead"
        assert (await browser.call("GET", "/v1/quarantine"))[0] == 403  # a reader's session is a reader

        # Revoking the API token ends the sessions it opened, at once.
        await ctl(db_dsn, "token", "revoke", "lead")
        code, body = await browser.call("GET", "/v1/devices")
        assert (code, body["error"]) == (401, "unauthorized")
        assert "sign in again" in body["message"]
    finally:
        await browser.pool.closeCachedConnections()
        await close_gateway(service, gw)


@pytest_twisted.ensureDeferred
async def test_changes_need_the_csrf_token_the_admin_role_and_the_gateways_own_page(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn, {"quality": {"oil_temp": {"min": -40, "max": 200}}})
    admin, reader = Browser(service), Browser(service)
    try:
        device = add_pg_device(sql, "truck-1")
        assert (await gw.post(device, [reading("oil_temp", NOW_MS - 1000, 900.0)]))[0] == 200
        (held,) = sql("SELECT id FROM quarantine")
        await admin.sign_in((await ctl(db_dsn, "token", "add", "ops", "--role", "admin")).strip())
        await reader.sign_in((await ctl(db_dsn, "token", "add", "lead", "--role", "reader")).strip())
        release = f"/v1/quarantine/{held[0]}/release"

        code, body = await admin.call("POST", release, csrf=False)
        assert (code, body["error"]) == (403, "forbidden") and "X-CSRF-Token" in body["message"]
        code, body = await admin.call("POST", release, headers={"X-CSRF-Token": "x" * 43})
        assert code == 403
        code, body = await admin.call("POST", release, headers={"Origin": "https://evil.example"})
        assert code == 403
        code, body = await reader.call("POST", release)
        assert (code, body["message"]) == (403, "this needs an API token with the admin role")
        assert sql("SELECT count(*) FROM readings")[0][0] == 0

        code, body = await admin.call("POST", release)
        assert (code, body) == (200, {"released": 1, "stored": 1})
        assert sql("SELECT value FROM readings") == [(900.0,)]
        code, body = await admin.call("POST", release)
        assert (code, body["error"]) == (404, "not_found")
        assert (await admin.call("GET", release))[0] == 405

        # Signing out ends the session; the cookie is refused afterwards.
        assert (await admin.call("DELETE", "/ui/session"))[0] == 200
        assert (await admin.call("GET", "/v1/devices"))[0] == 401
    finally:
        for b in (admin, reader):
            await b.pool.closeCachedConnections()
        await close_gateway(service, gw)


@pytest_twisted.ensureDeferred
async def test_sessions_expire_and_gatewayctl_lists_and_revokes_them(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn)
    first, second = Browser(service), Browser(service)
    try:
        token = (await ctl(db_dsn, "token", "add", "lead", "--role", "reader")).strip()
        await first.sign_in(token)
        await second.sign_in(token)
        listed = json.loads(await ctl(db_dsn, "session", "list", "--json"))
        assert [(s["subject"], s["role"], s["state"]) for s in listed] == [("lead", "reader", "active")] * 2
        assert first.cookie is not None and first.cookie.split(".")[0] == listed[0]["id"]

        await ctl(db_dsn, "session", "revoke", listed[0]["id"])
        assert (await first.call("GET", "/v1/devices"))[0] == 401
        assert (await second.call("GET", "/v1/devices"))[0] == 200

        sql("UPDATE ui_sessions SET expires_at = now() - interval '1 second'")
        assert (await second.call("GET", "/v1/devices"))[0] == 401
        assert json.loads(await ctl(db_dsn, "session", "list", "--json")) == []
        states = [s["state"] for s in json.loads(await ctl(db_dsn, "session", "list", "--all", "--json"))]
        assert states == ["revoked", "expired"]
    finally:
        for b in (first, second):
            await b.pool.closeCachedConnections()
        await close_gateway(service, gw)


@pytest.mark.filterwarnings("ignore:Using readBody with a transport")
@pytest_twisted.ensureDeferred
async def test_the_page_and_plotly_come_from_the_gateway_with_strict_headers_and_caching(tmp_path, db_dsn):
    service, gw = await open_gateway(tmp_path, db_dsn)
    try:
        response = await gw.http.get(gw.url + "/ui/")
        page = await response.content()
        assert response.code == 200
        headers = response.headers
        csp = headers.getRawHeaders("content-security-policy")[0]
        assert "script-src 'self';" in csp and "unsafe-eval" not in csp and "frame-ancestors 'none'" in csp
        assert "default-src 'none'" in csp and "report-uri /ui/csp-report" in csp
        assert headers.getRawHeaders("x-frame-options") == ["DENY"]
        assert headers.getRawHeaders("x-content-type-options") == ["nosniff"]
        assert headers.getRawHeaders("referrer-policy") == ["no-referrer"]
        assert headers.getRawHeaders("strict-transport-security")[0].startswith("max-age=")
        # No inline script, no inline handlers: the page's script is app.js.
        assert b"<script>" not in page and not re.search(rb"\son[a-z]+=", page)
        _, version = plotly_file()
        src = f"/ui/vendor/plotly-{version}.min.js"
        assert src.encode() in page

        # A plain Agent: treq would undo the gzip.
        cert = Certificate.loadPEM(gw.cert_path.read_bytes())
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=cert), pool=gw.pool)
        raw = await agent.request(b"GET", (gw.url + src).encode(), Headers({b"accept-encoding": [b"gzip"]}))
        body = await readBody(raw)
        assert raw.code == 200 and raw.headers.getRawHeaders(b"content-encoding") == [b"gzip"]
        assert b"immutable" in raw.headers.getRawHeaders(b"cache-control")[0]
        original = plotly_file()[0].read_bytes()
        assert gzip.decompress(body) == original and len(body) < len(original) / 2
        etag = raw.headers.getRawHeaders(b"etag")[0].decode()
        again = await gw.http.get(gw.url + src, headers={"If-None-Match": etag})
        assert again.code == 304 and await again.content() == b""

        response = await gw.http.get(gw.url + "/ui/app.js")
        assert response.code == 200 and response.headers.getRawHeaders("cache-control") == ["no-cache"]
        assert b"use strict" in await response.content()
        redirect = await gw.http.get(gw.url + "/ui", allow_redirects=False)
        assert redirect.code == 302 and redirect.headers.getRawHeaders("location") == ["/ui/"]
        await redirect.content()
        missing = await gw.http.get(gw.url + "/ui/nothing.js")
        assert missing.code == 404
        await missing.content()
    finally:
        await close_gateway(service, gw)


@pytest_twisted.ensureDeferred
async def test_series_buckets_min_max_mean_in_postgresql(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn)
    try:
        token = (await ctl(db_dsn, "token", "add", "lead", "--role", "reader")).strip()
        device = add_pg_device(sql, "truck-1")
        t0 = (NOW_MS // 1000 - 3600) * 1000
        values = [float((i * 37) % 100) for i in range(1200)]  # one a second for 20 minutes
        for start in range(0, 1200, 400):
            batch = [reading("oil_temp", t0 + i * 1000, values[i]) for i in range(start, start + 400)]
            assert (await gw.post(device, batch))[0] == 200

        code, s = await gw.get(
            f"/v1/devices/truck-1/series?metric=oil_temp&since={t0}&until={t0 + 1_200_000}&points=10", token
        )
        assert code == 200 and s["bucket_seconds"] == 120.0
        assert len(s["t"]) == 10 and s["count"] == [120] * 10
        for k in range(10):
            chunk = values[k * 120 : (k + 1) * 120]
            assert (s["min"][k], s["max"][k]) == (min(chunk), max(chunk))
            assert abs(s["mean"][k] - sum(chunk) / 120) < 1e-9
            assert t0 + k * 120_000 <= s["t"][k] < t0 + (k + 1) * 120_000
        # A range with no readings, and the limits.
        code, empty = await gw.get(f"/v1/devices/truck-1/series?metric=density&since={t0}&until={t0 + 1000}", token)
        assert code == 200 and empty["t"] == [] and empty["count"] == []
        for bad in ("metric=oil_temp&points=0", "metric=oil_temp&points=4001", "points=10",
                    f"metric=oil_temp&since={t0}&until={t0}"):  # fmt: skip
            code, body = await gw.get(f"/v1/devices/truck-1/series?{bad}", token)
            assert (code, body["error"]) == (400, "invalid_parameter"), bad
        assert (await gw.get("/v1/devices/nobody/series?metric=oil_temp", token))[0] == 404
    finally:
        await close_gateway(service, gw)


@pytest_twisted.ensureDeferred
async def test_fleet_fields_rejected_input_and_sinks(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn)
    try:
        token = (await ctl(db_dsn, "token", "add", "ops", "--role", "admin")).strip()
        device = add_pg_device(sql, "truck-1")
        add_pg_device(sql, "loader-7")
        assert (await gw.post(device, [reading("oil_temp", NOW_MS - i, 80.0) for i in range(25)]))[0] == 200
        assert (await gw.post(device, [reading("oil_temp", NOW_MS - i, 80.0) for i in range(5)]))[0] == 200
        code, _ = await gw.post_raw(device, b'{"readings": [{"metric": "oil_temp", "ts": "noon", "value": 1}]}')
        assert code == 400
        await service.store.last_seen.flush()

        code, page = await gw.get("/v1/devices?match=TRUCK", token)
        (truck,) = page["devices"]
        assert truck["name"] == "truck-1" and truck["online"] is True and truck["readings_today"] == 25
        code, page = await gw.get("/v1/devices/loader-7", token)
        assert page["online"] is False and page["readings_today"] == 0
        assert (await gw.get("/v1/devices?match=" + "x" * 65, token))[0] == 400

        code, rejected = await gw.get("/v1/devices/truck-1/rejected", token)
        (one,) = rejected["rejected"]
        assert one["reason"].startswith("invalid_reading: readings[0].ts") and '"ts": "noon"' in one["sample"]
        assert one["source"].startswith("https") and one["bytes"] == len(one["sample"])

        assert await gw.get("/v1/sinks", token) == (200, {"sinks": []})
        code, body = await gw.get("/v1/sinks", None)
        assert code == 401
    finally:
        await close_gateway(service, gw)
