"""
The gateway consuming from a real Mosquitto broker (started by the test on
127.0.0.1 with its own config, persistence and password file), with a real
PostgreSQL and paho-mqtt publishing as the devices would:

- over verified TLS with credentials: readings stored once, refused input
  kept, the state in /healthz, /metrics and ``gatewayctl mqtt status``;
- messages published while the gateway is stopped are delivered when it
  comes back (the persistent session);
- two gateways on one shared subscription: disjoint and complete;
- ``twistd -n gateway`` killed with SIGKILL while it holds unacknowledged
  messages: the broker delivers them again, each reading is stored once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import pytest_twisted
from paho.mqtt import client as paho
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from gateway.ops.console import Console
from tests.broker import PASSWORD, USER, Mosquitto
from tests.conftest import start_from_file, start_service
from tests.gatewayproc import gatewayctl, unread_bytes
from tests.test_resilience import make_gateway, wait_until  # noqa: F401 - a fixture
from tests.test_store import add_pg_device

BASE_TS = 1_795_341_600_000


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "broker", tls=True).start()
    yield b
    b.stop()


def payload(m: int, per_message: int = 5) -> bytes:
    base = BASE_TS + m * per_message
    readings = [{"metric": "oil_temp", "ts": base + i, "value": m + i / 100} for i in range(per_message)]
    return json.dumps({"readings": readings}).encode()


def publish(port: int, messages: list[tuple[str, bytes]], version=paho.MQTTv5) -> None:
    """Publish at QoS 1 and wait until the broker has every message (blocks: run it in a thread)."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"pub-{time.monotonic_ns()}", protocol=version)
    c.max_inflight_messages_set(100)
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    try:
        infos = [c.publish(topic, body, qos=1) for topic, body in messages]
        for info in infos:
            info.wait_for_publish(timeout=60)
            assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


async def until(what, timeout: float = 60.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() > deadline:
            return value
        await deferLater(reactor, every, lambda: None)


def source_table(broker: Mosquitto, **more) -> dict:
    return {
        "name": "plant",
        "url": f"mqtts://localhost:{broker.tls_port}",
        "ca": str(broker.ca),
        "username": USER,
        "password": {"env": "TEST_BROKER_PASSWORD"},
        "backoff": 0.2,
        "backoff-cap": 1,
        **more,
    }


@pytest_twisted.ensureDeferred
async def test_readings_from_a_broker_are_stored_once_and_refusals_kept(tmp_path, db_dsn, sql, broker, monkeypatch):
    monkeypatch.setenv("TEST_BROKER_PASSWORD", PASSWORD)
    add_pg_device(sql, "truck-17")
    svc = await start_service(tmp_path, db_dsn, {"mqtt-source": [source_table(broker)]})
    try:
        source = svc.transport("mqtt_source").sources.sources["plant"]
        assert await until(lambda: source.counters.state == "subscribed"), source.counters.last_error
        messages = [("devices/truck-17/readings", payload(m)) for m in range(20)]
        messages += [
            ("devices/truck-17/readings", payload(0)),  # sent twice
            ("devices/nobody/readings", payload(99)),
            ("devices/truck-17/readings", b"{not json"),
            ("devices/truck-17/coolant_temp", b"88.25"),
        ]
        await deferToThread(publish, broker.port, messages)
        assert await until(lambda: source.counters.acked == len(messages)), source.status()
        rows = sql(
            "SELECT k.name, count(*), count(DISTINCT r.ts) FROM readings r JOIN metrics k ON k.id = r.metric_id "
            "GROUP BY k.name ORDER BY k.name"
        )
        assert rows == [("coolant_temp", 1, 1), ("oil_temp", 100, 100)]
        # Kept in whatever order their writes commit.
        rejected = sql("SELECT device, raw, source, reason FROM rejected_input ORDER BY device NULLS FIRST")
        assert [(r[0], bytes(r[1])) for r in rejected] == [(None, payload(99)), ("truck-17", b"{not json")]
        assert all(r[2] == f"broker+tls localhost:{broker.tls_port}" for r in rejected)
        assert "device 'nobody' is not registered" in rejected[0][3]
        assert source.counters.duplicates == 5 and source.counters.readings == 101

        console = Console(svc)
        [row] = [r for r in console.devices() if r["device"] == "truck-17"]
        assert row["transport"] == "broker+tls" and row["readings"] == 101
        assert console.status()["mqtt_sources"]["plant"]["state"] == "subscribed"

        ok, doc = await svc.health.check()
        assert ok and doc["mqtt_sources"]["plant"]["state"] == "subscribed"
        metrics = svc.metrics.render().decode()
        assert 'gateway_mqtt_source_subscribed{source="plant"} 1.0' in metrics
        assert 'gateway_mqtt_source_messages_total{source="plant"} 24.0' in metrics
        await svc.transport("mqtt_source").sources.reporter.write()
        out = await deferToThread(gatewayctl, "mqtt", "status", "--json", "--db", db_dsn)
        [status] = json.loads(out.stdout)
        assert status["source"] == "plant" and status["state"] == "subscribed" and status["acked"] == 24
        assert status["filters"] == ["$share/txgateway/devices/+/+"] and PASSWORD not in out.stdout
        text = (await deferToThread(gatewayctl, "mqtt", "status", "--db", db_dsn)).stdout
        assert "source plant  mqtts://localhost:" in text and "24 taken, 24 acknowledged" in text

        # The broker goes away: the state says so, and the source is back once the broker is.
        await deferToThread(broker.stop)
        assert await until(lambda: source.counters.state == "disconnected")
        await deferToThread(broker.start)
        assert await until(lambda: source.counters.state == "subscribed", 30), source.counters.last_error
    finally:
        await svc.stopService()

    # Stopped, the gateway's session stays with the broker: what is published meanwhile comes when it is back.
    await deferToThread(publish, broker.port, [("devices/truck-17/readings", payload(m)) for m in range(100, 110)])
    svc = await start_service(tmp_path, db_dsn, {"mqtt-source": [source_table(broker)]})
    try:
        assert await until(lambda: sql("SELECT count(*) FROM readings")[0][0] == 151), sql(
            "SELECT count(*) FROM readings"
        )
    finally:
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_two_gateways_on_one_shared_subscription_split_the_stream(tmp_path, db_dsn, sql, broker, monkeypatch):
    monkeypatch.setenv("TEST_BROKER_PASSWORD", PASSWORD)
    add_pg_device(sql, "truck-17")
    add_pg_device(sql, "truck-18")
    gateways = []
    try:
        for name in ("a", "b"):
            gateways.append(await start_service(tmp_path / name, db_dsn, {"mqtt-source": [source_table(broker)]}))
        sources = [gw.transport("mqtt_source").sources.sources["plant"] for gw in gateways]
        assert sources[0].settings.broker.client_id != sources[1].settings.broker.client_id
        assert await until(lambda: all(s.counters.state == "subscribed" for s in sources))
        count = 400
        messages = [(f"devices/truck-{17 + m % 2}/readings", payload(m)) for m in range(count)]
        await deferToThread(publish, broker.port, messages)
        assert await until(lambda: sum(s.counters.acked for s in sources) >= count)
        taken = [s.counters.messages for s in sources]
        assert sum(taken) == count and all(taken), taken  # each message to one gateway, both working
        assert [s.counters.duplicates for s in sources] == [0, 0]  # disjoint: no reading came twice
        assert sql("SELECT count(*), count(DISTINCT (device_id, ts)) FROM readings") == [(count * 5, count * 5)]
    finally:
        for gw in gateways:
            await gw.stopService()


def test_kill_9_while_holding_unacknowledged_messages_then_each_reading_stored_once(
    make_gateway,  # noqa: F811
    broker,
    monkeypatch,
):
    messages, per_message = 600, 10
    monkeypatch.setenv("TEST_BROKER_PASSWORD", PASSWORD)
    gw = make_gateway("--mqtt-source", f"mqtt://127.0.0.1:{broker.port}").start()
    gatewayctl("device", "add", "truck-17", data_dir=gw.data_dir)
    gw.wait_for_line(r"MQTT source .*subscribed to \$share/txgateway/devices/\+/\+")

    def stored() -> int:
        out = gatewayctl("export", data_dir=gw.data_dir).stdout
        return len(out.splitlines())

    def publish_some(first: int, last: int) -> None:
        publish(broker.port, [("devices/truck-17/readings", payload(m, per_message)) for m in range(first, last)])

    publish_some(0, 100)
    assert wait_until(lambda: stored() == 100 * per_message, 60)
    # Frozen, the gateway holds what the broker sends now (up to its window) and acknowledges none of it.
    os.kill(gw.proc.pid, signal.SIGSTOP)
    publishing = threading.Thread(target=publish_some, args=(100, messages))
    publishing.start()
    publishing.join(60)
    # The broker writes what the gateway's window allows into its connection, where it waits unread:
    # messages in flight, none of which can be acknowledged.
    assert wait_until(lambda: unread_bytes(broker.port, remote=True) > 0, 30), "nothing was in flight"
    assert stored() == 100 * per_message
    gw.kill()
    gw.start()
    gw.wait_for_line(r"MQTT source .*connected to .* \(session resumed\)")
    assert wait_until(lambda: stored() >= messages * per_message, 90), stored()
    rows = [json.loads(line) for line in gatewayctl("export", data_dir=gw.data_dir).stdout.splitlines()]
    stamps = [row["ts"] for row in rows]
    assert len(stamps) == len(set(stamps)) == messages * per_message


@pytest_twisted.ensureDeferred
async def test_sighup_adds_changes_and_removes_sources(tmp_path, db_dsn, broker, monkeypatch):

    monkeypatch.setenv("TEST_BROKER_PASSWORD", PASSWORD)
    config = tmp_path / "gateway.toml"
    config.write_text(f'db = "{db_dsn}"\n')
    service = await start_from_file(tmp_path, config)

    def toml(value) -> str:
        if isinstance(value, dict):  # an inline table: { env = "VAR" }
            return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"
        return json.dumps(value)

    def write(**table) -> None:
        lines = [f'db = "{db_dsn}"', "[[mqtt_source]]"]
        lines += [f"{key} = {toml(value)}" for key, value in {**source_table(broker), **table}.items()]
        config.write_text("\n".join(lines) + "\n")

    try:
        assert service.transport("mqtt_source").sources is None
        write()
        assert await service.reload() == ["MQTT source plant added"]
        plant = service.transport("mqtt_source").sources.sources["plant"]
        assert await until(lambda: plant.counters.state == "subscribed"), plant.counters.last_error
        write(topics=["fleet/+/readings"])
        assert await service.reload() == ["MQTT source plant changed"]
        assert (
            plant.counters.state == "stopped" and service.transport("mqtt_source").sources.sources["plant"] is not plant
        )
        assert await until(
            lambda: service.transport("mqtt_source").sources.sources["plant"].counters.state == "subscribed"
        )
        config.write_text(f'db = "{db_dsn}"\n')
        assert await service.reload() == ["MQTT source plant removed"]
        assert service.transport("mqtt_source").sources.sources == {}
    finally:
        await service.stopService()


@pytest.mark.parametrize("version", ["5.0", "3.1.1"])
@pytest_twisted.ensureDeferred
async def test_a_renamed_source_retires_its_old_session_after_taking_what_it_held(
    tmp_path, db_dsn, sql, broker, monkeypatch, version
):
    """
    Renamed across a restart, a source gets another client id; the old persistent session would stay in
    the shared group and take a share of the stream for nobody. The gateway takes what it holds, then ends it.
    """
    monkeypatch.setenv("TEST_BROKER_PASSWORD", PASSWORD)
    add_pg_device(sql, "truck-17")
    first = await start_service(tmp_path, db_dsn, {"mqtt-source": [source_table(broker, version=version)]})
    plant = first.transport("mqtt_source").sources.sources["plant"]
    try:
        assert await until(lambda: plant.counters.state == "subscribed"), plant.counters.last_error
    finally:
        await first.stopService()
    old_client = plant.settings.broker.client_id
    # Published while no gateway runs: the broker keeps them in the old session.
    await deferToThread(publish, broker.port, [("devices/truck-17/readings", payload(m)) for m in range(10)])
    renamed = await start_service(
        tmp_path, db_dsn, {"mqtt-source": [source_table(broker, name="line-1", version=version)]}
    )
    try:
        sources = renamed.transport("mqtt_source").sources
        line = sources.sources["line-1"]
        assert line.settings.broker.client_id != old_client
        assert await until(lambda: line.counters.state == "subscribed"), line.counters.last_error
        await sources.look_for_retired()
        assert [key[1] for key in sources.retiring] == [old_client]
        assert await until(lambda: not sources.retiring, 60), "the old session was not ended"
        assert sql("SELECT count(*) FROM readings")[0][0] == 10 * 5  # what the old session held is stored
        assert sql("SELECT source FROM mqtt_sources") == [("line-1",)]
        # Now every message goes to the one session left in the group.
        await deferToThread(publish, broker.port, [("devices/truck-17/readings", payload(m)) for m in range(10, 20)])
        assert await until(lambda: line.counters.acked >= 10), line.counters.acked
        assert line.counters.messages == 10
        assert sql("SELECT count(*) FROM readings")[0][0] == 20 * 5
    finally:
        await renamed.stopService()


@pytest_twisted.ensureDeferred
async def test_a_source_removed_by_sighup_has_its_session_ended(tmp_path, db_dsn, sql, broker, monkeypatch):
    monkeypatch.setenv("TEST_BROKER_PASSWORD", PASSWORD)
    add_pg_device(sql, "truck-17")
    config = tmp_path / "gateway.toml"
    lines = [f'db = "{db_dsn}"', "[[mqtt_source]]"]
    for key, value in source_table(broker).items():
        value = '{ env = "TEST_BROKER_PASSWORD" }' if isinstance(value, dict) else json.dumps(value)
        lines.append(f"{key} = {value}")
    config.write_text("\n".join(lines) + "\n")
    service = await start_from_file(tmp_path, config)
    try:
        plant = service.transport("mqtt_source").sources.sources["plant"]
        assert await until(lambda: plant.counters.state == "subscribed"), plant.counters.last_error
        config.write_text(f'db = "{db_dsn}"\n')
        assert await service.reload() == ["MQTT source plant removed"]
        assert await until(lambda: not service.transport("mqtt_source").sources.retiring, 60)
        # The session is gone from the broker: a client resuming it under that id finds none.
        present = await deferToThread(_session_present, broker, plant.settings.broker.client_id)
        assert present is False
    finally:
        await service.stopService()


def _session_present(broker: Mosquitto, client_id: str) -> bool:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    seen: list = []
    done = threading.Event()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    c.username_pw_set(USER, PASSWORD)

    def on_connect(client, userdata, flags, reason_code, properties):
        seen.append(flags.session_present)
        done.set()

    c.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    c.connect("127.0.0.1", broker.port, keepalive=30, clean_start=False, properties=props)
    c.loop_start()
    try:
        assert done.wait(20)
    finally:
        c.disconnect()
        c.loop_stop()
    return seen[0]


@pytest_twisted.ensureDeferred
async def test_a_source_seen_before_whose_broker_is_gone_is_named_in_healthz_until_forgotten(
    tmp_path, db_dsn, sql, broker, monkeypatch
):
    monkeypatch.setenv("TEST_BROKER_PASSWORD", PASSWORD)
    first = await start_service(tmp_path, db_dsn, {"mqtt-source": [source_table(broker)]})
    try:
        plant = first.transport("mqtt_source").sources.sources["plant"]
        assert await until(lambda: plant.counters.state == "subscribed"), plant.counters.last_error
    finally:
        await first.stopService()
    again = await start_service(tmp_path, db_dsn)  # no source configured now
    try:
        assert again.transport("mqtt_source").sources is not None
        await again.transport("mqtt_source").sources.look_for_retired()
        _, doc = await again.health.check()
        gone = doc["mqtt_sources"]["plant"]
        assert gone["state"] == "gone" and not gone["ok"] and "gatewayctl mqtt forget plant" in gone["problem"]
        out = await deferToThread(gatewayctl, "mqtt", "forget", "plant", "--db", db_dsn)
        assert "forgot source plant" in out.stderr
        await again.transport("mqtt_source").sources.look_for_retired()
        _, doc = await again.health.check()
        assert "plant" not in doc.get("mqtt_sources", {})
    finally:
        await again.stopService()
