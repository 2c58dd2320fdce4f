"""
Operations on the real service tree in-process (real PostgreSQL, real
sockets, real TLS): /metrics after real traffic, /healthz turning on a
stalled sink, revoked and rotated devices closed through LISTEN/NOTIFY on
every gateway sharing the database, the console's helpers, SIGHUP reload.
"""

from __future__ import annotations

import json

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from gateway.config import ConfigError, build_config, load_toml
from protocols import tgp
from tests.conftest import start_service
from tests.gatewayproc import gatewayctl
from tests.test_device_e2e import endpoints, frame_readings, open_session
from tests.test_service import Gateway, reading
from tests.test_store import add_pg_device


async def scrape(gw: Gateway, path: str = "/metrics") -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: {(name, sorted labels): value}."""
    response = await gw.http.get(gw.url + path)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    text = (await response.content()).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def until(check, seconds: float = 5.0, step: float = 0.05):
    """Wait (on the real reactor) until check() is true; fail after ``seconds``."""
    for _ in range(int(seconds / step)):
        if check():
            return
        await deferLater(reactor, step, lambda: None)
    assert check(), "condition not met in time"


@pytest_twisted.ensureDeferred
async def test_metrics_count_what_was_sent(service, sql):
    gw = Gateway(service)
    try:
        token = add_pg_device(sql, "truck-1")
        assert await gw.post(token, [reading(i) for i in range(7)]) == (200, {"accepted": 7, "duplicates": 0})
        assert await gw.post(token, [reading(i) for i in range(9)]) == (200, {"accepted": 2, "duplicates": 7})
        code, body = await gw.post(token, [{"metric": "oil_temp", "ts": "noon", "value": 1}])
        assert (code, body["error"]) == (400, "invalid_reading")
        code, _ = await gw.post("0123456789abcdef." + "x" * 43, [reading(1)])
        assert code == 401

        device = await open_session(endpoints(service)["tcp"], "truck-1", token)
        device.send(tgp.Data(2, frame_readings(100, per_frame=25)))
        assert await device.events.get() == tgp.Ack(2, 25, 0)

        m = await scrape(gw)
        assert m[("gateway_readings_accepted_total", (("transport", "https"),))] == 9
        assert m[("gateway_readings_duplicate_total", (("transport", "https"),))] == 7
        assert m[("gateway_readings_accepted_total", (("transport", "tgp"),))] == 25
        assert m[("gateway_inputs_rejected_total", (("reason", "invalid_reading"), ("transport", "https")))] == 1
        assert m[("gateway_inputs_rejected_total", (("reason", "unauthorized"), ("transport", "https")))] == 1
        assert m[("gateway_ack_latency_seconds_count", (("transport", "https"),))] == 2
        assert m[("gateway_ack_latency_seconds_count", (("transport", "tgp"),))] == 2  # DECLARE and DATA
        # 9 + 2 new readings were committed (batches may have grouped them); the sums agree.
        assert m[("gateway_store_batch_readings_sum", ())] >= 9 + 25
        assert m[("gateway_store_commit_seconds_count", ())] >= 3
        assert m[("gateway_connections", (("transport", "tgp"),))] == 1
        assert m[("gateway_connections", (("transport", "https"),))] >= 1
        assert m[("gateway_store_queue_readings", ())] == 0
        assert m[("gateway_database_connections", ())] == service.config.pool_size
        assert m[("process_resident_memory_bytes", ())] > 0
        device.transport.loseConnection()
    finally:
        await gw.pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_metrics_on_their_own_endpoint(tmp_path, db_dsn):
    service = await start_service(tmp_path, db_dsn, metrics="tcp:0:interface=127.0.0.1")
    gw = Gateway(service)
    try:
        port = service.metrics_port.getHost().port
        import treq

        plain = await treq.get(f"http://127.0.0.1:{port}/metrics")
        assert plain.code == 200 and b"gateway_readings_accepted" in await plain.content()
        health = await treq.get(f"http://127.0.0.1:{port}/healthz")
        assert health.code == 200 and (await health.json())["status"] == "ok"
        gone = await gw.http.get(gw.url + "/metrics")  # not on the HTTPS port any more
        assert gone.code == 404
        await gone.content()
        await plain.content()
    finally:
        await gw.pool.closeCachedConnections()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_healthz_says_503_for_a_sink_that_forwards_nothing(tmp_path, db_dsn, sql):
    # A sink nobody answers at (port 9 is discard; nothing listens on it here).
    service = await start_service(
        tmp_path, db_dsn, upload_url=["http://127.0.0.1:9/readings"], sink_stall=60, upload_flush=0.05
    )
    gw = Gateway(service)
    try:
        response = await gw.http.get(gw.url + "/healthz")
        doc = await response.json()
        assert response.code == 200 and doc["sinks"]["127.0.0.1:9"]["ok"] is True
        # Readings that have waited an hour, and the sink never sent a batch: stalled.
        token = add_pg_device(sql, "truck-3")
        assert (await gw.post(token, [reading(1)]))[0] == 200
        sql("UPDATE readings_arrivals SET received_at = now() - interval '1 hour'")
        await service.uploader.look()
        response = await gw.http.get(gw.url + "/healthz")
        doc = await response.json()
        sink = doc["sinks"]["127.0.0.1:9"]
        assert response.code == 503 and doc["status"] == "unavailable" and doc["database"] == "ok"
        assert sink["ok"] is False and sink["lag_seconds"] > 3000 and "nothing was sent for ever" in sink["problem"]
        await until(lambda: service.uploader.loops["127.0.0.1:9"].counters.failures >= 1)
        m = await scrape(gw)
        assert m[("gateway_upload_lag_seconds", (("sink", "127.0.0.1:9"),))] > 3000
        assert m[("gateway_upload_failures_total", (("sink", "127.0.0.1:9"),))] >= 1
    finally:
        await gw.pool.closeCachedConnections()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_revoke_and_rotate_close_sessions_on_every_gateway(tmp_path, db_dsn, sql):
    one = await start_service(tmp_path / "one", db_dsn)
    two = await start_service(tmp_path / "two", db_dsn)
    try:
        token_a = add_pg_device(sql, "truck-a")
        token_b = add_pg_device(sql, "truck-b")
        a1 = await open_session(endpoints(one)["tcp"], "truck-a", token_a)
        a2 = await open_session(endpoints(two)["tls"], "truck-a", token_a)
        b2 = await open_session(endpoints(two)["tcp"], "truck-b", token_b)

        await deferToThread(gatewayctl, "device", "revoke", "truck-a", "--db", db_dsn)
        started = reactor.seconds()
        for device in (a1, a2):
            bye = await device.events.get()
            assert isinstance(bye, tgp.Bye) and bye.code == tgp.ErrorCode.AUTH_FAILED, bye
            assert "revoked" in bye.reason
            await device.closed
        assert reactor.seconds() - started < 1.0
        assert not b2.closed.called  # another device's session goes on

        new = (await deferToThread(gatewayctl, "device", "rotate", "truck-b", "--db", db_dsn)).stdout.strip()
        assert new != token_b and len(new.split(".")) == 2
        bye = await b2.events.get()
        assert isinstance(bye, tgp.Bye) and "token was replaced" in bye.reason
        # The new token works at once; the old one does not.
        b_new = await open_session(endpoints(one)["tcp"], "truck-b", new)
        await deferLater(reactor, 0.2, lambda: None)
        assert not b_new.closed.called
        b_new.transport.loseConnection()
        assert one.watch.closed + two.watch.closed == 3
    finally:
        await one.stopService()
        await two.stopService()


@pytest_twisted.ensureDeferred
async def test_console_helpers_show_and_control_the_live_gateway(tmp_path, db_dsn, sql):
    service = await start_service(tmp_path, db_dsn, upload_url=["http://127.0.0.1:9/readings"])
    gw = Gateway(service)
    try:
        console = service.console
        ns = console.namespace()
        token = add_pg_device(sql, "truck-7")
        device = await open_session(endpoints(service)["tcp"], "truck-7", token)
        device.send(tgp.Data(2, frame_readings(1, per_frame=10)))
        assert await device.events.get() == tgp.Ack(2, 10, 0)
        assert (await gw.post(token, [reading(1)]))[0] == 200

        status = ns["status"]()
        assert status["connections"]["tgp"] == 1 and status["database"] == "up"
        assert status["readings_per_second"] == round(11 / 60, 1)
        assert status["store"]["queue_depth"] == 0 and status["store"]["commit_ms"] > 0
        assert "127.0.0.1:9" in status["sinks"]
        assert "readings_per_second: 0.2" in repr(status)

        rows = ns["devices"]()
        assert [(r["device"], r["transport"], r["readings"]) for r in rows] == [
            ("truck-7", "https", 1),
            ("truck-7", "tgp", 10),
        ]
        assert repr(rows).splitlines()[0].split()[:3] == ["DEVICE", "TRANSPORT", "ADDRESS"]

        assert ns["pause"]("127.0.0.1:9") == ["127.0.0.1:9"]
        assert service.uploader.loops["127.0.0.1:9"].paused is True
        assert status_of(await scrape(gw), "gateway_upload_paused", "127.0.0.1:9") == 1
        ns["resume"]()
        assert service.uploader.loops["127.0.0.1:9"].paused is False
        assert ns["flush"]() == ["127.0.0.1:9"]
        try:
            ns["pause"]("nope")
        except KeyError as e:
            assert "sinks: 127.0.0.1:9" in str(e)
        else:
            raise AssertionError("an unknown sink must be named")

        # Commands: listed at the console, counted in /metrics and /healthz.
        from gateway.commands.model import parse_request

        await service.commands.send("truck-7", parse_request({"name": "reboot", "id": "c-7"}), "ops")
        await until(lambda: sql("SELECT state FROM commands") == [("sent",)], seconds=30)
        assert isinstance(await device.events.get(), tgp.Command)
        await service.commands.tick()
        rows = ns["commands"]()
        assert [(r["id"], r["device"], r["state"], r["sent"], r["here"]) for r in rows] == [
            ("c-7", "truck-7", "sent", 1, True)  # sent over the TGP (version 3) session, not yet RECEIVED
        ]
        assert repr(rows).splitlines()[0].split()[:4] == ["ID", "DEVICE", "NAME", "STATE"]
        samples = await scrape(gw)
        assert samples[("gateway_commands", (("state", "sent"), ("transport", "tgp")))] == 1
        assert samples[("gateway_commands_sent_total", (("transport", "tgp"),))] == 1
        health = json.loads(await (await gw.http.get(gw.url + "/healthz")).content())
        assert health["commands"] == {"waiting": 1, "past_half_expiry": 0, "devices_reachable_here": 1}

        assert ns["kick"]("truck-7") == 1
        bye = await device.events.get()
        assert isinstance(bye, tgp.Bye) and bye.code == tgp.ErrorCode.NORMAL
        await device.closed
        assert ns["kick"]("truck-7") == 0
    finally:
        await gw.pool.closeCachedConnections()
        await service.stopService()


def status_of(samples: dict, name: str, sink: str) -> float:
    return samples[(name, (("sink", sink),))]


@pytest_twisted.ensureDeferred
async def test_reload_applies_live_settings_and_names_the_rest(tmp_path, db_dsn):
    config = tmp_path / "gateway.toml"
    config.write_text(f'db = "{db_dsn}"\nmax-body = 4096\n')
    values = {
        "data-dir": str(tmp_path / "data"),
        "https": "ssl:0:interface=127.0.0.1",
        "device": ["tcp:0:interface=127.0.0.1"],
        "mqtt": "off",
    }
    from gateway.service import GatewayService

    service = GatewayService(
        build_config(values, load_toml(config), config), reactor, command_line={"data-dir": values["data-dir"]}
    )
    service.command_line.update(https=values["https"], device=values["device"])
    service.privilegedStartService()
    service.startService()
    await service.ready
    try:
        assert service.site.max_body == 4096 and service.uploader is None
        config.write_text(
            f'db = "{db_dsn}"\nmax-body = 8192\nlog-level = "warn"\npool-size = 2\n'
            '[[sink]]\nname = "lake"\nurl = "http://127.0.0.1:9/in"\n'
        )
        changes = await service.reload()
        assert service.site.max_body == 8192
        assert service.config.max_body == 8192 and service.config.pool_size == 4  # pool-size waits
        assert "sink lake added" in changes and "restart: pool-size" in changes
        assert sorted(service.uploader.loops) == ["lake"]
        assert service.log_levels.predicate.logLevelForNamespace("gateway.store").name == "warn"

        config.write_text(f'db = "{db_dsn}"\nmax-body = "lots"\n')
        assert await service.reload() == []  # a bad file changes nothing
        assert service.site.max_body == 8192

        config.write_text(f'db = "{db_dsn}"\nmax-body = 8192\nlog-level = "warn"\npool-size = 2\n')
        assert "sink lake removed" in await service.reload()
        assert service.uploader.loops == {}
    finally:
        await service.stopService()


def test_a_bad_value_in_a_reloaded_file_is_named(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text('log-level = "loud"\n')
    try:
        build_config({}, load_toml(config), config)
    except ConfigError as e:
        assert str(e) == "--log-level: 'loud' is not one of debug, info, warn, error, critical"
    else:
        raise AssertionError("expected a ConfigError")


def test_device_show_tells_where_and_how_much(db_dsn, sql):
    token = gatewayctl("device", "add", "truck-5", "--db", db_dsn).stdout.strip()
    assert token
    device_id = sql("SELECT id FROM devices WHERE name = 'truck-5'")[0][0]
    sql(
        "INSERT INTO readings (device_id, metric_id, ts, value) VALUES "
        "(%s, metric_id_of('oil_temp'), '2026-11-22T10:00:00Z', 1), "
        "(%s, metric_id_of('density'), '2026-11-22T10:00:01Z', 2)",
        (device_id, device_id),
    )
    sql("UPDATE devices SET last_seen = now(), last_source = 'tgp+tls 10.0.0.5:40112' WHERE id = %s", (device_id,))
    sql("INSERT INTO rejected_input (source, device, reason, raw) VALUES ('https x', 'truck-5', 'invalid_json: x', '')")
    doc = json.loads(gatewayctl("device", "show", "truck-5", "--json", "--db", db_dsn).stdout)
    assert doc["transport"] == "tgp+tls" and doc["address"] == "10.0.0.5:40112"
    assert (doc["readings"], doc["metrics"], doc["newest_reading"]) == (2, 2, "2026-11-22T10:00:01Z")
    assert (doc["rejected_inputs"], doc["last_rejection"], doc["status"]) == (1, "invalid_json: x", "active")
    text = gatewayctl("device", "show", "truck-5", "--db", db_dsn).stdout
    assert "\ntransport        tgp+tls\n" in text
    missing = gatewayctl("device", "show", "nobody", "--db", db_dsn, check=False)
    assert missing.returncode == 1 and missing.stderr == "gatewayctl: no device 'nobody'\n"


@pytest_twisted.ensureDeferred
async def test_last_source_is_stored_with_last_seen(service, sql):
    gw = Gateway(service)
    try:
        token = add_pg_device(sql, "truck-8")
        assert (await gw.post(token, [reading(1)]))[0] == 200
        await service.store.last_seen.flush()
        source = sql("SELECT last_source FROM devices WHERE name = 'truck-8'")[0][0]
        assert source.startswith("https 127.0.0.1:")
    finally:
        await gw.pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_a_revocation_missed_while_not_listening_is_caught_on_reconnect(service, sql):
    token = add_pg_device(sql, "truck-r")
    device = await open_session(endpoints(service)["tcp"], "truck-r", token)
    # Cut the LISTEN connection, then revoke with no notice reaching this gateway.
    sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%'")
    sql("UPDATE devices SET revoked_at = now() WHERE name = 'truck-r'")
    service.watch._beat()  # the heartbeat finds the connection dead; it reconnects and checks everyone
    bye = await device.events.get()
    assert isinstance(bye, tgp.Bye) and bye.code == tgp.ErrorCode.AUTH_FAILED and "revoked" in bye.reason
    await device.closed
    assert service.watch.closed == 1
