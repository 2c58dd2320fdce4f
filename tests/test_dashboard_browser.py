"""
The dashboard in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium), against the real service tree over
HTTPS: sign in, watch a device appear without a reload, read its chart,
release a quarantined reading as admin, be refused as a reader, and break
the Content-Security-Policy nowhere. Each step saves a screenshot in the
test's temporary directory.

The browser runs in a thread (Selenium blocks); the gateway runs on the
reactor, as in production.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from tests.test_api import close_gateway, ctl, open_gateway
from tests.test_store import add_pg_device

WAIT = 45.0  # seconds a step may take on a busy machine: the page refreshes every 5 s
NOW_MS = int(time.time() * 1000)


def need(program: str, package: str) -> str:
    found = shutil.which(program) or (f"/usr/bin/{program}" if Path(f"/usr/bin/{program}").exists() else None)
    if found is None:
        pytest.fail(f"the browser tests need {program}: install it (scripts/test does: apt-get install {package})")
    return found


class Browser:
    """Chromium, headless, with its own profile; the gateway's self-signed certificate accepted."""

    def __init__(self, profile: Path, shots: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        os.environ["SE_OFFLINE"] = "true"  # never let Selenium fetch a browser or a driver
        options = Options()
        options.binary_location = need("chromium", "chromium")
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--ignore-certificate-errors",
            "--window-size=1280,1100",
            f"--user-data-dir={profile}",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(executable_path=need("chromedriver", "chromium-driver"), log_output=str(shots / "driver.log"))
        self.driver = webdriver.Chrome(options=options, service=service)
        self.shots = shots
        self.taken: list[str] = []

    def shot(self, name: str) -> None:
        path = self.shots / f"{len(self.taken) + 1:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        self.taken.append(path.name)

    def until(self, what: str, check) -> object:
        """Wait for check to hold; an element the page re-rendered meanwhile is looked up again."""
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        wait = WebDriverWait(
            self.driver,
            WAIT,
            poll_frequency=0.2,
            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
        )
        try:
            return wait.until(lambda d: check(d))
        except Exception as e:
            self.shot(f"failed-{what}")
            raise AssertionError(f"waited for {what}: {type(e).__name__}: {e}; screenshots in {self.shots}") from None

    def js(self, script: str, *args: object) -> object:
        return self.driver.execute_script(script, *args)

    def sign_in(self, url: str, token: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.get(url + "/ui/")
        field = self.until("the sign-in form", lambda d: d.find_element(By.ID, "token"))
        self.until("the sign-in form to show", lambda d: field.is_displayed())
        field.send_keys(token)
        self.driver.find_element(By.CSS_SELECTOR, "#signin-form button[type=submit]").click()
        self.until("the fleet page", lambda d: d.find_elements(By.ID, "fleet"))

    def close(self) -> None:
        self.driver.quit()


@pytest_twisted.ensureDeferred
async def test_sign_in_watch_a_device_appear_chart_it_release_as_admin_and_be_refused_as_reader(tmp_path, db_dsn, sql):
    from selenium.webdriver.common.by import By

    service, gw = await open_gateway(tmp_path, db_dsn, {"quality": {"oil_temp": {"min": -40, "max": 200}}})
    shots = tmp_path / "screenshots"
    shots.mkdir()
    browser: Browser | None = None
    try:
        admin = (await ctl(db_dsn, "token", "add", "ops", "--role", "admin")).strip()
        reader = (await ctl(db_dsn, "token", "add", "lead", "--role", "reader")).strip()
        browser = await deferToThread(Browser, tmp_path / "profile", shots)
        b = browser

        def signed_in_and_empty() -> None:
            b.sign_in(gw.url, admin)
            b.js("window.stillTheSamePage = true")
            b.shot("fleet-empty")

        await deferToThread(signed_in_and_empty)

        # A device posts over HTTPS while the page is open: it appears by itself.
        device = add_pg_device(sql, "truck-17")
        t0 = (NOW_MS // 60_000) * 60_000 - 3_600_000
        readings = [{"metric": "oil_temp", "ts": t0 + i * 10_000, "value": 60.0 + (i % 30)} for i in range(300)]
        assert (await gw.post(device, readings))[0] == 200
        assert (await gw.post(device, [{"metric": "oil_temp", "ts": t0 + 5, "value": 900.0}]))[0] == 200
        await service.store.last_seen.flush()

        def device_appears_and_its_chart_draws() -> dict:
            link = b.until("truck-17 in the fleet", lambda d: d.find_elements(By.LINK_TEXT, "truck-17"))[0]
            assert b.js("return window.stillTheSamePage") is True  # no reload
            row = link.find_element(By.XPATH, "./ancestor::tr")
            assert "online" in row.text and "300" in row.text  # readings today
            b.shot("fleet-truck-17")
            link.click()
            b.until(
                "the oil_temp chart",
                lambda d: b.js(
                    "const g = document.getElementById('chart-oil_temp'); return g && g.data && g.data.length"
                ),
            )
            drawn = b.js(
                "const g = document.getElementById('chart-oil_temp');"
                "return {buckets: Number(g.dataset.buckets), readings: Number(g.dataset.readings),"
                " mean: g.data[2].y, min: g.data[1].y, max: g.data[0].y,"
                " path: (g.querySelector('.scatterlayer .trace:last-child path.js-line') || {}).getAttribute"
                "   ? g.querySelector('.scatterlayer .trace:last-child path.js-line').getAttribute('d') : ''}"
            )
            b.until(
                "the quarantined reading's release button", lambda d: d.find_elements(By.CSS_SELECTOR, "[data-release]")
            )
            b.shot("device-truck-17")
            return drawn

        drawn = await deferToThread(device_appears_and_its_chart_draws)
        assert drawn["readings"] == 300 and 0 < drawn["buckets"] == len(drawn["mean"])
        assert min(drawn["min"]) == 60.0 and max(drawn["max"]) == 89.0
        assert all(lo <= m <= hi for lo, m, hi in zip(drawn["min"], drawn["mean"], drawn["max"]))
        assert drawn["path"].count("L") == drawn["buckets"] - 1  # a line through every bucket, drawn in SVG

        (held,) = sql("SELECT id FROM quarantine")

        def release_as_admin() -> None:
            button = b.driver.find_element(By.CSS_SELECTOR, f"[data-release='{held[0]}']")
            b.js("arguments[0].scrollIntoView({block: 'center'})", button)
            button.click()
            b.until(
                "the released reading to leave the table",
                lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-release]"),
            )
            b.shot("released")

        await deferToThread(release_as_admin)
        assert sql("SELECT value FROM readings WHERE value = 900") == [(900.0,)]
        assert sql("SELECT count(*) FROM quarantine") == [(0,)]

        def refused_as_reader() -> str:
            b.driver.find_element(By.ID, "signout").click()
            b.until("the sign-in form after signing out", lambda d: d.find_element(By.ID, "token").is_displayed())
            b.sign_in(gw.url, reader)
            b.driver.get(gw.url + "/ui/#/quarantine")
            text = b.until("the refusal", lambda d: d.find_elements(By.ID, "refused"))[0].text
            b.shot("reader-refused")
            return text

        assert "admin role" in await deferToThread(refused_as_reader)
        assert sql("SELECT role FROM ui_sessions WHERE revoked_at IS NULL") == [("reader",)]

        # Nothing the page did broke its Content-Security-Policy (each violation is reported to the gateway) ...
        reports = lambda: service.metrics.registry.get_sample_value("gateway_ui_csp_reports_total")  # noqa: E731
        assert reports() == 0.0
        logged = await deferToThread(b.driver.get_log, "browser")
        # Refusals the page asked for (401 before signing in, 403 to the reader) are logged as network errors.
        severe = [e for e in logged if e["level"] == "SEVERE" and e["source"] != "network"]
        assert severe == []

        # ... and a violation is reported: an inline script, as an injection would add, is refused and counted.
        def inject() -> object:
            return b.js(
                "const s = document.createElement('script'); s.textContent = 'window.injected = 1';"
                "document.body.append(s); return window.injected === undefined"
            )

        assert await deferToThread(inject) is True
        for _ in range(int(WAIT * 10)):
            if reports():
                break
            await task.deferLater(reactor, 0.1)
        assert reports() == 1.0
    finally:
        if browser is not None:
            await deferToThread(browser.close)
        await close_gateway(service, gw)


BROKEN_TEXT = ("[object", "undefined", "NaN")


@pytest_twisted.ensureDeferred
async def test_every_page_in_the_navigation_shows_what_it_holds_and_nothing_broken(tmp_path, db_dsn, sql):
    """
    A bad token's refusal, then Fleet (names in natural order), a device, Alerts, Quarantine, Sinks and
    Health: no page shows "[object", "undefined" or "NaN", and the console logs no error.
    """
    from selenium.webdriver.common.by import By

    tables = {
        "quality": {"oil_temp": {"min": -40, "max": 200}},
        "alert": [{"name": "hot", "metric": "oil_temp", "above": 150}],
    }
    service, gw = await open_gateway(tmp_path, db_dsn, tables)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    browser: Browser | None = None
    try:
        admin = (await ctl(db_dsn, "token", "add", "ops", "--role", "admin")).strip()
        names = ["sim-10", "sim-2", "sim-1", "sim-11"]
        tokens = {name: add_pg_device(sql, name) for name in names}
        t0 = NOW_MS - 600_000
        for token in tokens.values():
            assert (
                await gw.post(token, [{"metric": "oil_temp", "ts": t0 + i * 1000, "value": 70.0 + i} for i in range(5)])
            )[0] == 200
        assert (await gw.post(tokens["sim-2"], [{"metric": "oil_temp", "ts": t0 + 9000, "value": 900.0}]))[0] == 200
        await service.store.last_seen.flush()
        browser = await deferToThread(Browser, tmp_path / "profile", shots)
        b = browser

        def page_text(what: str) -> str:
            text = b.driver.find_element(By.ID, "main").text
            broken = [word for word in BROKEN_TEXT if word in text]
            if broken:
                b.shot(f"broken-{what}")
            assert not broken, f"{what} shows {broken}: {text[:2000]}"
            b.shot(what)
            return text

        def bad_token_then_every_page() -> dict:
            seen = {}
            b.driver.get(gw.url + "/ui/")
            field = b.until("the sign-in form", lambda d: d.find_element(By.ID, "token"))
            b.until("the sign-in form to show", lambda d: field.is_displayed())
            field.send_keys("not-a-token")
            b.driver.find_element(By.CSS_SELECTOR, "#signin-form button[type=submit]").click()
            seen["refusal"] = b.until(
                "the refusal of a bad token", lambda d: d.find_element(By.ID, "signin-error").text
            )
            field.clear()
            b.sign_in(gw.url, admin)
            b.until("every device in the fleet", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#fleet tbody a")) == 4)
            seen["fleet order"] = [a.text for a in b.driver.find_elements(By.CSS_SELECTOR, "#fleet tbody a")]
            page_text("fleet")
            b.driver.find_element(By.LINK_TEXT, "sim-2").click()
            b.until(
                "sim-2's chart",
                lambda d: b.js("const g = document.getElementById('chart-oil_temp'); return g && g.data"),
            )
            page_text("device")
            for page, ready in (
                ("alerts", "h1"),
                ("quarantine", "[data-release]"),
                ("sinks", "h1"),
                ("health", "dl.tree"),
            ):
                b.driver.find_element(By.CSS_SELECTOR, f"#nav a[href='#/{page}']").click()
                b.until(
                    f"the {page} page",
                    lambda d, ready=ready, page=page: (
                        b.js("return location.hash") == f"#/{page}"
                        and d.find_elements(By.CSS_SELECTOR, f"#main {ready}")
                    ),
                )
                b.until(f"the {page} page's data", lambda d: "updated" in d.find_element(By.ID, "status").text)
                seen[page] = page_text(page)
            seen["log"] = b.driver.get_log("browser")
            return seen

        seen = await deferToThread(bad_token_then_every_page)
        assert "not an API token" in seen["refusal"] and "Bearer" not in seen["refusal"]
        assert seen["fleet order"] == ["sim-1", "sim-2", "sim-10", "sim-11"]
        assert "database" in seen["health"] and "journal" in seen["health"]
        severe = [e for e in seen["log"] if e["level"] == "SEVERE" and e["source"] != "network"]
        assert severe == []
    finally:
        if browser is not None:
            await deferToThread(browser.close)
        await close_gateway(service, gw)


@pytest_twisted.ensureDeferred
async def test_sign_in_through_the_provider_in_the_browser(tmp_path, db_dsn):
    from selenium.webdriver.common.by import By

    from tests.idp import Provider

    provider = Provider()
    service, gw = await open_gateway(tmp_path, db_dsn, {"oidc": provider.settings()})
    shots = tmp_path / "screenshots"
    shots.mkdir()
    browser: Browser | None = None
    try:
        browser = await deferToThread(Browser, tmp_path / "profile", shots)
        b = browser

        def through_the_provider() -> str:
            b.driver.get(gw.url + "/ui/")
            link = b.until("the provider's button", lambda d: d.find_element(By.ID, "provider-link"))
            b.until("the provider's button to show", lambda d: link.is_displayed() and "Plant SSO" in link.text)
            b.shot("sign-in-choices")
            link.click()  # to the provider, which signs maria in at once, and back with a code
            b.until("the fleet page", lambda d: d.find_elements(By.ID, "fleet"))
            b.shot("signed-in-through-the-provider")
            return b.driver.find_element(By.ID, "who").text

        assert await deferToThread(through_the_provider) == "maria (admin)"
        assert provider.token_requests[-1]["code_verifier"]
    finally:
        if browser is not None:
            await deferToThread(browser.close)
        await close_gateway(service, gw)
        await provider.close()


@pytest_twisted.ensureDeferred
async def test_an_operator_sends_a_command_from_the_device_page_and_watches_it_succeed(tmp_path, db_dsn, sql):
    from selenium.webdriver.common.by import By

    service, gw = await open_gateway(tmp_path, db_dsn)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    browser: Browser | None = None
    try:
        operator = (await ctl(db_dsn, "token", "add", "desk", "--role", "operator")).strip()
        device = add_pg_device(sql, "truck-17")
        assert (await gw.post(device, [{"metric": "oil_temp", "ts": NOW_MS, "value": 80.0}]))[0] == 200
        browser = await deferToThread(Browser, tmp_path / "profile", shots)
        b = browser

        def send_from_the_page() -> None:
            b.sign_in(gw.url, operator)
            b.driver.get(gw.url + "/ui/#/device/truck-17")
            field = b.until("the command form", lambda d: d.find_elements(By.ID, "command-name"))[0]
            field.send_keys("sample-rate")
            b.driver.find_element(By.ID, "command-params").send_keys('{"hz": 5}')
            b.driver.find_element(By.CSS_SELECTOR, "#command-form button[type=submit]").click()
            b.until(
                "the command in the table",
                lambda d: d.find_elements(By.CSS_SELECTOR, "#device-commands [data-command]"),
            )
            b.shot("command-queued")

        await deferToThread(send_from_the_page)
        ((id_, params, sender),) = sql("SELECT id, params, sender FROM commands")
        assert params == {"hz": 5} and sender == "desk"
        # The device takes it on its next post, and reports.
        for _ in range(50):
            code, body = await gw.post(device, [{"metric": "oil_temp", "ts": NOW_MS + 1, "value": 81.0}])
            if body.get("commands"):
                break
            await task.deferLater(reactor, 0.2)
        assert [c["id"] for c in body["commands"]] == [id_]
        response = await gw.http.post(
            gw.url + f"/v1/commands/{id_}/result",
            data=b'{"status": "succeeded", "result": {"hz": 5}}',
            headers={"Authorization": f"Bearer {device}", "Content-Type": "application/json"},
        )
        assert response.code == 200
        await response.content()

        def watch_it_succeed() -> str:
            # The table is drawn again every few seconds: read it in one step inside the page.
            row = f"const r = document.querySelector(\"[data-command='{id_}']\"); return r ? r.innerText : ''"
            b.until("the command to show succeeded", lambda d: "succeeded" in b.js(row))
            b.shot("command-succeeded")
            return b.js("return document.getElementById('device-commands').innerText")

        text = await deferToThread(watch_it_succeed)
        assert '{"hz":5}' in text and "https" in text
    finally:
        if browser is not None:
            await deferToThread(browser.close)
        await close_gateway(service, gw)


@pytest_twisted.ensureDeferred
async def test_a_trackers_page_draws_its_track_from_its_positions(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    browser: Browser | None = None
    try:
        reader = (await ctl(db_dsn, "token", "add", "lead", "--role", "reader")).strip()
        device = add_pg_device(sql, "van-1")
        t0 = (NOW_MS // 60_000) * 60_000 - 1_800_000
        readings = []
        for i in range(30):  # a quarter circle, a fix a minute
            angle = i / 29 * 1.5708
            when = t0 + i * 60_000
            readings += [
                {"metric": "lat", "ts": when, "value": 54.68 + 0.01 * math.sin(angle)},
                {"metric": "lon", "ts": when, "value": 25.27 + 0.01 * math.cos(angle)},
            ]
        assert (await gw.post(device, readings))[0] == 200
        browser = await deferToThread(Browser, tmp_path / "profile", shots)
        b = browser

        def the_track() -> dict:
            b.sign_in(gw.url, reader)
            b.driver.get(gw.url + "/ui/#/device/van-1")
            b.until("the track", lambda d: b.js("const g = document.getElementById('chart-track'); "
                                                 "return g && g.data && g.data.length"))  # fmt: skip
            b.shot("track")
            return b.js(
                "const g = document.getElementById('chart-track');"
                "return {points: Number(g.dataset.points), x: g.data[0].x, y: g.data[0].y}"
            )

        track = await deferToThread(the_track)
        assert track["points"] == len(track["x"]) == len(track["y"]) > 10
        assert min(track["y"]) >= 54.68 - 1e-9 and max(track["x"]) <= 25.28 + 1e-9
    finally:
        if browser is not None:
            await deferToThread(browser.close)
        await close_gateway(service, gw)


def one_tile() -> bytes:
    """A 256×256 PNG of one colour, made here (zlib and struct), as a tile server would send."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xdd\xe8\xd0" * 256 for _ in range(256))
    header = struct.pack(">IIBBBBB", 256, 256, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest_twisted.ensureDeferred
async def test_with_a_tile_server_the_track_is_drawn_on_its_tiles_and_nothing_else_is_fetched(tmp_path, db_dsn, sql):
    """--ui-tiles: the page's policy allows that origin (and the map's worker), the map fetches its tiles, and
    the browser reports no violation; without the option the policy is the plain one (the test above)."""
    from twisted.internet import ssl
    from twisted.web import resource, server

    asked: list[str] = []
    png = one_tile()

    class Tiles(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            asked.append(request.path.decode())
            request.setHeader(b"content-type", b"image/png")
            request.setHeader(b"access-control-allow-origin", b"*")  # as public tile servers answer
            return png

    # The tile server gets a certificate of its own making (the browser here accepts any).
    key = ssl.KeyPair.generate(size=2048)
    cert = key.selfSignedCert(1, CN="tiles")
    tiles_port = reactor.listenSSL(0, server.Site(Tiles()), cert.options(), interface="127.0.0.1")
    url = f"https://127.0.0.1:{tiles_port.getHost().port}/osm/{{z}}/{{x}}/{{y}}.png"
    service, gw = await open_gateway(tmp_path, db_dsn, ui_tiles=url, ui_tiles_attribution="© test tiles")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    browser: Browser | None = None
    try:
        reader = (await ctl(db_dsn, "token", "add", "lead", "--role", "reader")).strip()
        device = add_pg_device(sql, "van-2")
        t0 = (NOW_MS // 60_000) * 60_000 - 1_200_000
        readings = []
        for i in range(20):
            readings += [
                {"metric": "lat", "ts": t0 + i * 60_000, "value": 54.68 + 0.0005 * i},
                {"metric": "lon", "ts": t0 + i * 60_000, "value": 25.27 + 0.0005 * i},
            ]
        assert (await gw.post(device, readings))[0] == 200
        browser = await deferToThread(Browser, tmp_path / "profile", shots)
        b = browser

        def the_map() -> dict:
            b.sign_in(gw.url, reader)
            b.driver.get(gw.url + "/ui/#/device/van-2")
            b.until("the track on a map", lambda d: b.js(
                "const g = document.getElementById('chart-track');"
                "return g && g.dataset.map === 'tiles' && g.data && g.data[0].type === 'scattermap'"))  # fmt: skip
            b.until("a tile fetched", lambda d: asked)
            b.until("the tiles drawn", lambda d: b.js("return !!document.querySelector('#chart-track canvas')"))
            b.shot("track-on-tiles")
            return b.js(
                "const g = document.getElementById('chart-track');"
                "return {points: Number(g.dataset.points), lat: g.data[0].lat, zoom: g._fullLayout.map.zoom}"
            )

        drawn = await deferToThread(the_map)
        assert drawn["points"] == len(drawn["lat"]) >= 5 and 10 <= drawn["zoom"] <= 16, drawn
        assert all(path.startswith("/osm/") and path.endswith(".png") for path in asked), asked
        zoom = round(drawn["zoom"])
        assert any(path.startswith(f"/osm/{z}/") for path in asked for z in (zoom - 1, zoom, zoom + 1)), (zoom, asked)

        # The page's policy names the tile server and nothing else new; no violation was reported.
        response = await gw.http.get(gw.url + "/ui/")
        policy = response.headers.getRawHeaders(b"content-security-policy")[0].decode()
        await response.content()
        origin = url.split("/osm/")[0]
        assert f"img-src 'self' data: blob: {origin};" in policy and f"connect-src 'self' {origin};" in policy
        assert "worker-src blob:" in policy and policy.count(origin) == 2
        assert service.metrics.registry.get_sample_value("gateway_ui_csp_reports_total") == 0.0
        logged = await deferToThread(b.driver.get_log, "browser")
        assert [e for e in logged if e["level"] == "SEVERE" and e["source"] != "network"] == []
    finally:
        if browser is not None:
            await deferToThread(browser.close)
        await close_gateway(service, gw)
        await tiles_port.stopListening()
