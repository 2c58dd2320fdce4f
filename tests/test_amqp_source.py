"""
RabbitMQ queues as a source of readings ([[amqp_source]]): the tables, and
against a real RabbitMQ node (tests/rabbit.py) with pika's own blocking
client publishing on the other side: persistent messages stored then
acknowledged, a message that cannot be stored dead-lettered and kept, the
device named by a header, a routing key word or a field, the node restarted
mid-stream with nothing lost, two gateways sharing a queue, and kill -9 of
the gateway with messages unacknowledged.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from gateway.config import ConfigError, build_config
from tests.conftest import start_service
from tests.rabbit import Rabbit
from tests.test_mqtt_broker import until
from tests.test_store import add_pg_device

T0 = 1_795_341_600_000  # 2026-11-22T10:00:00Z, ms


def sources(table: dict) -> tuple:
    return build_config({}, {"amqp-source": [table]}).amqp_source


def test_amqp_source_tables_are_read(monkeypatch):
    monkeypatch.setenv("AMQP_PASSWORD", "s3cret")
    [s] = sources({"name": "plant", "url": "amqps://gateway@rabbit.example/iot", "password": {"env": "AMQP_PASSWORD"},
                   "queue": "readings", "device_header": "device"})  # fmt: skip
    b = s.broker
    assert (s.name, b.host, b.port, b.vhost, b.username, b.tls, s.queue, s.prefetch, s.format) == (
        "plant", "rabbit.example", 5671, "iot", "gateway", True, "readings", 200, "json",
    )  # fmt: skip
    assert b.password == "s3cret" and "s3cret" not in repr(s)
    [s] = sources({"url": "amqp://127.0.0.1", "queue": "q", "declare": True, "exchange": "iot",
                   "routing-keys": ["devices.#"], "dead-letter-exchange": "dlx", "device-routing-level": 1,
                   "format": "number", "prefetch": 50})  # fmt: skip
    assert (s.name, s.broker.port, s.broker.vhost, s.broker.username, s.device_header, s.device_routing_level) == (
        "q", 5672, "/", "guest", None, 1,
    )  # fmt: skip
    assert (s.exchange, s.routing_keys, s.dead_letter_exchange, s.prefetch) == ("iot", ("devices.#",), "dlx", 50)


@pytest.mark.parametrize(
    "table, message",
    [
        ({"url": "amqp://rabbit.example", "queue": "q"}, "allowed to a loopback address only"),
        ({"url": "amqps://u:pw@rabbit.example", "queue": "q"}, "not in the URL"),
        ({"url": "http://rabbit.example", "queue": "q"}, "is not an amqp:// or amqps:// URL"),
        ({"url": "amqps://h"}, "queue: give the name"),
        ({"url": "amqps://h", "queue": "q", "format": "xml"}, "format: 'xml' is not json"),
        ({"url": "amqps://h", "queue": "q", "device-header": "d", "device-field": "d"}, "the device is named one way"),
        ({"url": "amqps://h", "queue": "q", "format": "number", "device-field": "d"}, "a bare number has no fields"),
        ({"url": "amqps://h", "queue": "q", "declare": True, "exchange": "x"}, "go together"),
        ({"url": "amqps://h", "queue": "q", "prefetch": 0}, "prefetch"),
        ({"url": "amqps://h", "queue": "q", "colour": "blue"}, "unknown key 'colour'"),
    ],
)
def test_amqp_source_mistakes_name_the_source_and_the_key(table, message):
    with pytest.raises(ConfigError) as e:
        sources(table)
    assert message in str(e.value) and "[[amqp_source]]" in str(e.value)


def test_a_message_names_its_device_by_header_routing_key_word_or_field():
    [by_header] = sources({"url": "amqp://127.0.0.1", "queue": "q"})
    assert by_header.device_of("x.y", {"device": b"truck-1"}, b"{}") == "truck-1"
    assert by_header.device_of("x.y", None, b"{}") is None
    [by_key] = sources({"url": "amqp://127.0.0.1", "queue": "q", "device-routing-level": -2})
    assert by_key.device_of("plant.press-4.temperature", None, b"1") == "press-4"
    assert by_key.device_of("temperature", None, b"1") is None
    [by_field] = sources({"url": "amqp://127.0.0.1", "queue": "q", "device-field": "truck"})
    assert by_field.device_of("k", None, b'{"truck": "truck-9", "readings": []}') == "truck-9"
    assert by_field.device_of("k", None, b"not json") is None


# -- against RabbitMQ -------------------------------------------------------------


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory):
    node = Rabbit(tmp_path_factory.mktemp("rabbit")).start()
    yield node
    node.stop()


def publish(
    rabbit: Rabbit, exchange: str, key: str, bodies: list[bytes], headers: list[dict] | None = None, confirm=True
) -> None:
    """Persistent messages, each confirmed by the broker (publisher confirms) unless told not to wait."""
    import pika

    connection = rabbit.connection()
    channel = connection.channel()
    if confirm:
        channel.confirm_delivery()
    for i, body in enumerate(bodies):
        props = pika.BasicProperties(delivery_mode=2, headers=(headers[i] if headers else None))
        channel.basic_publish(exchange, key, body, props, mandatory=True)
    connection.close()


def declare(rabbit: Rabbit, *statements) -> None:
    connection = rabbit.connection()
    channel = connection.channel()
    for name, kwargs in statements:
        getattr(channel, name)(**kwargs)
    connection.close()


def depth(rabbit: Rabbit, queue: str) -> int:
    connection = rabbit.connection()
    count = connection.channel().queue_declare(queue, passive=True).method.message_count
    connection.close()
    return count


def body(device_values: list[int]) -> bytes:
    return json.dumps({"readings": [{"metric": "oil_temp", "ts": T0 + v, "value": v} for v in device_values]}).encode()


def table(rabbit: Rabbit, queue: str, **more) -> dict:
    return {"name": queue, "url": rabbit.url, "queue": queue, "backoff": 0.2, "backoff-cap": 1, **more}


@pytest_twisted.ensureDeferred
async def test_persistent_messages_are_stored_then_acknowledged_and_bad_ones_dead_lettered(
    tmp_path, db_dsn, sql, rabbit
):
    await deferToThread(
        declare,
        rabbit,
        ("exchange_declare", {"exchange": "iot", "exchange_type": "topic", "durable": True}),
    )  # fmt: skip  (the gateway declares the queue, its bindings, the dead-letter exchange and readings.dead)
    add_pg_device(sql, "truck-1")
    add_pg_device(sql, "truck-2")
    source = table(rabbit, "readings", declare=True, exchange="iot", **{"routing-keys": ["readings.#"],
                   "dead-letter-exchange": "dlx", "prefetch": 20})  # fmt: skip
    svc = await start_service(tmp_path, db_dsn, {"amqp-source": [source]})
    try:
        consumer = svc.transport("amqp_source").sources.sources["readings"]
        assert await until(lambda: consumer.counters.state == "consuming", 30), consumer.counters
        bodies = [body([i * 10 + j for j in range(10)]) for i in range(50)]
        heads = [{"device": "truck-1" if i % 2 else "truck-2"} for i in range(50)]
        await deferToThread(publish, rabbit, "iot", "readings.oil", bodies, heads)
        assert await until(lambda: consumer.counters.acked == 50, 30), consumer.counters
        assert sql("SELECT count(*) FROM readings") == [(500,)]
        assert await deferToThread(depth, rabbit, "readings") == 0  # every message acknowledged
        assert consumer.counters.in_flight == 0

        # Not JSON; an unknown device; no device header: each kept with its reason, then dead-lettered.
        await deferToThread(publish, rabbit, "iot", "readings.oil", [b"{not json", body([1]), body([2])],
                            [{"device": "truck-1"}, {"device": "truck-99"}, {}])  # fmt: skip
        assert await until(lambda: consumer.counters.rejected == 3, 30), consumer.counters
        reasons = sorted(r for (r,) in sql("SELECT reason FROM rejected_input"))
        assert len(reasons) == 3 and any("truck-99" in r and "gatewayctl device add" in r for r in reasons)
        assert any("names no device (header 'device')" in r for r in reasons), reasons
        assert await until(lambda: depth(rabbit, "readings.dead") == 3, 30)
        assert sql("SELECT count(*) FROM readings") == [(500,)]

        # A message stored already (published again, as after a lost acknowledgement) stores nothing new.
        await deferToThread(publish, rabbit, "iot", "readings.oil", [bodies[1]], [heads[1]])
        assert await until(lambda: consumer.counters.acked == 51, 30)
        assert consumer.counters.duplicates == 10 and sql("SELECT count(*) FROM readings") == [(500,)]
        health = svc.transport("amqp_source").health()["amqp_sources"]
        assert health[1] is True and health[0]["readings"]["consumed"] == 54
        sample = svc.metrics.registry.get_sample_value
        assert sample("gateway_amqp_source_rejected_total", {"source": "readings"}) == 3
        from tests.gatewayproc import gatewayctl

        def reported() -> list:
            return json.loads(gatewayctl("amqp", "status", "--json", "--db", db_dsn).stdout)

        for _ in range(60):  # the gateways write their status every few seconds
            rows = await deferToThread(reported)
            if rows and rows[0]["acked"] == 51:
                break
            await deferLater(reactor, 0.5)
        [row] = rows
        assert (row["source"], row["queue"], row["state"], row["rejected"]) == ("readings", "readings", "consuming", 3)
        text = (await deferToThread(gatewayctl, "amqp", "status", "--db", db_dsn)).stdout
        assert "source readings" in text and "51 acknowledged" in text and "3 messages (kept" in text
    finally:
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_a_routing_key_names_device_and_metric_of_bare_numbers(tmp_path, db_dsn, sql, rabbit):
    await deferToThread(
        declare, rabbit,
        ("exchange_declare", {"exchange": "plant", "exchange_type": "topic", "durable": True}),
    )  # fmt: skip
    add_pg_device(sql, "press-4")
    source = table(rabbit, "numbers", declare=True, exchange="plant", format="number",
                   **{"routing-keys": ["plant.*.*"], "device-routing-level": 1})  # fmt: skip
    svc = await start_service(tmp_path, db_dsn, {"amqp-source": [source]})
    try:
        consumer = svc.transport("amqp_source").sources.sources["numbers"]
        assert await until(lambda: consumer.counters.state == "consuming", 30)
        await deferToThread(publish, rabbit, "plant", "plant.press-4.temperature", [b"81.5"])
        await deferToThread(publish, rabbit, "plant", "plant.press-4.pressure", [b" 2.5 "])
        assert await until(lambda: consumer.counters.acked == 2, 30), consumer.counters
        rows = sql("SELECT k.name, r.value FROM readings r JOIN metrics k ON k.id = r.metric_id ORDER BY r.value")
        assert rows == [("pressure", 2.5), ("temperature", 81.5)]
    finally:
        await svc.stopService()


class Publisher(threading.Thread):
    """Publishes one reading a message, persistent, with confirms; counts what the broker confirmed."""

    def __init__(self, rabbit: Rabbit, queue: str, device: str) -> None:
        super().__init__(daemon=True)
        self.rabbit, self.queue, self.device = rabbit, queue, device
        self.confirmed: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        import pika

        i = 0
        while not self.halt.is_set():
            try:
                connection = self.rabbit.connection()
                channel = connection.channel()
                channel.confirm_delivery()
                while not self.halt.is_set():
                    props = pika.BasicProperties(delivery_mode=2, headers={"device": self.device})
                    channel.basic_publish("", self.queue, body([i]), props, mandatory=True)
                    self.confirmed.append(i)  # basic_publish returned: the broker confirmed it
                    i += 1
                    time.sleep(0.005)
                connection.close()
            except Exception:  # the node is restarting: the message not confirmed is sent again
                time.sleep(0.2)


@pytest_twisted.ensureDeferred
async def test_rabbitmq_restarted_mid_stream_loses_nothing_confirmed(tmp_path, db_dsn, sql):
    node = await deferToThread(lambda: Rabbit(tmp_path / "node").start())
    add_pg_device(sql, "truck-1")
    svc = None
    publisher = Publisher(node, "stream", "truck-1")
    try:
        await deferToThread(declare, node, ("queue_declare", {"queue": "stream", "durable": True}))
        svc = await start_service(tmp_path, db_dsn, {"amqp-source": [table(node, "stream")]})
        consumer = svc.transport("amqp_source").sources.sources["stream"]
        publisher.start()
        assert await until(lambda: consumer.counters.acked >= 100, 30), consumer.counters
        await deferToThread(node.restart)
        assert await until(lambda: consumer.counters.connections >= 2 and consumer.counters.acked >= 300, 60)
        publisher.halt.set()
        await deferToThread(publisher.join, 30)
        wanted = set(publisher.confirmed)
        stored = lambda: {int(v) for (v,) in sql("SELECT value FROM readings")}  # noqa: E731
        assert await until(lambda: wanted <= stored(), 60), sorted(wanted - stored())[:10]
        assert sql("SELECT count(*) FROM readings")[0][0] == len(stored())  # each once
    finally:
        publisher.halt.set()
        if svc is not None:
            await svc.stopService()
        await deferToThread(node.stop)


@pytest_twisted.ensureDeferred
async def test_two_gateways_consuming_one_queue_share_it(tmp_path, db_dsn, sql, rabbit):
    await deferToThread(declare, rabbit, ("queue_declare", {"queue": "shared", "durable": True}))
    add_pg_device(sql, "truck-1")
    source = table(rabbit, "shared", prefetch=5)
    first = await start_service(tmp_path / "a", db_dsn, {"amqp-source": [source]})
    second = await start_service(tmp_path / "b", db_dsn, {"amqp-source": [source]})
    try:
        consumers = [svc.transport("amqp_source").sources.sources["shared"] for svc in (first, second)]
        assert await until(lambda: all(c.counters.state == "consuming" for c in consumers), 30)
        await deferToThread(
            publish, rabbit, "", "shared", [body([i]) for i in range(200)], [{"device": "truck-1"}] * 200
        )
        assert await until(lambda: sum(c.counters.acked for c in consumers) == 200, 60), [c.counters for c in consumers]
        assert all(c.counters.acked > 0 for c in consumers)  # both took a share
        assert sql("SELECT count(*) FROM readings") == [(200,)]
    finally:
        await first.stopService()
        await second.stopService()


MESSAGES = 10_000


def test_kill_9_with_messages_unacknowledged_then_each_is_stored_once(workdir, rabbit):
    """twistd consuming a backlog, killed with SIGKILL: RabbitMQ delivers what was not acknowledged again (to the
    restarted gateway), and every message is stored once."""
    from tests.gatewayproc import GatewayProcess, gatewayctl
    from tests.test_e2e import post

    declare(rabbit, ("queue_declare", {"queue": "backlog", "durable": True}))
    config = workdir / "gateway.toml"
    config.write_text(
        f'[[amqp_source]]\nname = "backlog"\nurl = "{rabbit.url}"\nqueue = "backlog"\nprefetch = 100\n'
        "backoff = 0.2\nbackoff-cap = 1\n"
    )
    gw = GatewayProcess(workdir / "gateway-data", "--config", str(config), "--device-rate", "0", cwd=workdir)
    try:
        gw.start()
        gatewayctl("device", "add", "truck-1", data_dir=gw.data_dir)
        assert gw.stop() == 0
        publish(rabbit, "", "backlog", [body(list(range(i * 10, i * 10 + 10))) for i in range(MESSAGES)],
                [{"device": "truck-1"}] * MESSAGES, confirm=False)  # fmt: skip
        deadline = time.monotonic() + 30
        while depth(rabbit, "backlog") < MESSAGES and time.monotonic() < deadline:  # all enqueued
            time.sleep(0.05)
        assert depth(rabbit, "backlog") == MESSAGES
        gw.start()
        deadline = time.monotonic() + 60
        while depth(rabbit, "backlog") > MESSAGES - 1000 and time.monotonic() < deadline:  # it is consuming
            time.sleep(0.02)
        gw.kill()
        left = depth(rabbit, "backlog")
        assert 0 < left < MESSAGES, left
        gw.start()
        deadline = time.monotonic() + 120
        while depth(rabbit, "backlog") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert depth(rabbit, "backlog") == 0  # every message delivered (and being stored, or stored)

        def stored() -> list[float]:
            rows = gatewayctl("export", "--format", "csv", data_dir=gw.data_dir).stdout.splitlines()[1:]
            return [float(r.split(",")[3]) for r in rows]

        deadline = time.monotonic() + 60
        while len(values := stored()) < MESSAGES * 10 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(values) == len(set(values)) == MESSAGES * 10  # every reading, once
        status, _, health = post(gw, None, None, "/healthz")
        source = health["amqp_sources"]["backlog"]
        assert source["redelivered"] > 0 and source["rejected"] == 0, source
        print(f"kill -9 with {left} messages back in the queue: {source['redelivered']} redelivered, all stored once")
    finally:
        gw.close()


@pytest.fixture(scope="module")
def tls_rabbit(tmp_path_factory):
    node = Rabbit(tmp_path_factory.mktemp("tls-rabbit"), tls=True).start()
    yield node
    node.stop()


@pytest_twisted.ensureDeferred
async def test_amqps_verifies_the_brokers_certificate_and_consumes(tmp_path, db_dsn, sql, tls_rabbit):
    node = tls_rabbit
    add_pg_device(sql, "truck-1")
    svc = None
    try:
        await deferToThread(declare, node, ("queue_declare", {"queue": "secure", "durable": True}))
        source = {"name": "secure", "url": f"amqps://localhost:{node.tls_port}/", "queue": "secure",
                  "ca": str(node.ca), "backoff": 0.2, "backoff-cap": 1}  # fmt: skip
        svc = await start_service(tmp_path, db_dsn, {"amqp-source": [source]})
        consumer = svc.transport("amqp_source").sources.sources["secure"]
        assert await until(lambda: consumer.counters.state == "consuming", 30), consumer.counters
        assert consumer.origin.transport == "amqps" and consumer.origin.tls
        await deferToThread(publish, node, "", "secure", [body([7])], [{"device": "truck-1"}])
        assert await until(lambda: consumer.counters.acked == 1, 30), consumer.counters
        assert sql("SELECT value FROM readings") == [(7.0,)]
    finally:
        if svc is not None:
            await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_amqps_refuses_a_broker_its_ca_does_not_vouch_for(tmp_path, db_dsn, sql, tls_rabbit):
    from tests.certs import TestCA

    node = tls_rabbit
    other = TestCA("another CA").write(tmp_path / "other-ca.pem")
    svc = None
    try:
        source = {"name": "secure", "url": f"amqps://localhost:{node.tls_port}/", "queue": "secure",
                  "ca": str(other), "backoff": 0.2, "backoff-cap": 1}  # fmt: skip
        svc = await start_service(tmp_path, db_dsn, {"amqp-source": [source]})
        consumer = svc.transport("amqp_source").sources.sources["secure"]
        assert await until(lambda: consumer.counters.last_error != "", 30), consumer.counters
        assert consumer.counters.state != "consuming" and consumer.counters.connections == 0
        assert "certificate" in consumer.counters.last_error.lower(), consumer.counters.last_error
    finally:
        if svc is not None:
            await svc.stopService()


def test_a_broker_that_never_finishes_the_handshake_is_cut_off_and_said_so():
    """No heartbeat runs before the AMQP handshake ends: the source's own timer (on a task.Clock) ends the wait."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from gateway.transports.amqp_source import CONNECT_TIMEOUT, AmqpSource

    [settings] = sources({"url": "amqp://127.0.0.1", "queue": "q"})
    clock = Clock()
    source = AmqpSource(settings, None, reactor)  # type: ignore[arg-type]  (nothing is stored here)
    source.clock = clock  # its timers

    class Silent:
        ready: Deferred = Deferred()
        transport = StringTransport()

    connection = Silent()
    outcome = []
    source._ready(connection).addErrback(outcome.append)
    clock.advance(CONNECT_TIMEOUT - 1)
    assert not connection.transport.disconnecting and outcome == []
    clock.advance(1)
    assert connection.transport.disconnecting  # aborted; pika then fails the handshake
    connection.ready.errback(ConnectionError("1"))
    assert len(outcome) == 1 and source.counters.state == "reconnecting"
    assert (
        source.counters.last_error == f"the broker did not finish the AMQP handshake within {CONNECT_TIMEOUT:g} seconds"
    )
    assert clock.getDelayedCalls() == []
