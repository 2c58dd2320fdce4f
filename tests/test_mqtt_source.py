"""
The consumer of a broker's stream over an in-memory transport, with
task.Clock: the persistent session and the shared subscription, PUBACK to
the broker only after the store and in arrival order, what is kept and
acknowledged, what is not acknowledged, backpressure, keepalive, the drain
on stop; and the [[mqtt_source]] settings.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.config import ConfigError, build_config
from gateway.readings import StoreUnavailable
from gateway.ingest.core import Ingest
from gateway.ops.metrics import GatewayMetrics
from gateway.net.brokers import Broker, SourceError, SourceSettings, source_from_table, source_from_url
from gateway.transports.broker_client import _ClientFactory
from gateway.transports import mqtt_source
from gateway.transports.mqtt_source import BrokerSource, BrokerSources
from protocols import mqtt
from protocols.mqtt import V5, V311, Reason
from protocols.mqtt import Property as P
from tests.test_device_adapter import NO_TIME_RULES, ManualStore
from tests import test_sparkplug_host as spb_host
from tests.test_mqtt_codec import drain

both = pytest.mark.parametrize("version", [V311, V5])


def body(*values: float, start: int = 0) -> bytes:
    readings = [{"metric": "oil_temp", "ts": 1_795_341_600_000 + start + i, "value": v} for i, v in enumerate(values)]
    return json.dumps({"readings": readings}).encode()


class Harness:
    """The gateway's client on one side, a codec playing the broker on the other."""

    def __init__(self, version=V5, store=None, now=0.0, **settings) -> None:
        self.store = store or ManualStore()
        self.store.add_device("truck-17")
        self.clock = Clock()
        self.clock.advance(now)
        broker = Broker("mqtt://127.0.0.1", "127.0.0.1", 1883, False, version=version, client_id="txgw-test")
        self.settings = SourceSettings(name="plant", broker=broker, **settings)
        ingest = Ingest(self.store, self.clock, GatewayMetrics(self.clock), quality=NO_TIME_RULES)
        self.source = BrokerSource(self.settings, ingest, reactor, clock=self.clock)
        self.proto = _ClientFactory(self.source).buildProtocol(None)
        self.transport = StringTransport()
        self.broker = mqtt.Connection(mqtt.SERVER)
        self.proto.makeConnection(self.transport)

    def events(self) -> list:
        data = self.transport.value()
        self.transport.clear()
        if data:
            self.broker.receive_data(data)
        return drain(self.broker)

    def send(self, event) -> None:
        self.proto.dataReceived(self.broker.send(event))

    def subscribe(self, present=False) -> list:
        [connect] = self.events()
        self.send(mqtt.ConnAck(Reason.SUCCESS, present))
        [subscribe] = self.events()
        self.send(mqtt.SubAck(subscribe.packet_id, tuple(1 for _ in subscribe.subscriptions)))
        return [connect, subscribe]

    def publish(self, packet_id, payload, topic="devices/truck-17/readings", qos=1) -> None:
        self.send(mqtt.Publish(topic, payload, qos, packet_id if qos else None))


@both
def test_a_persistent_session_and_a_shared_subscription(version):
    h = Harness(version)
    subscribed = []
    h.proto.subscribed.addCallback(subscribed.append)
    connect, subscribe = h.subscribe()
    assert connect.client_id == "txgw-test" and connect.clean_start is False and connect.version == version
    if version == V5:
        assert mqtt.prop(connect.properties, P.SESSION_EXPIRY_INTERVAL) == 7 * 86400
        assert mqtt.prop(connect.properties, P.RECEIVE_MAXIMUM) == 100
    assert subscribe.subscriptions == (("$share/txgateway/devices/+/+", 1),)
    assert subscribed == [None] and h.source.counters.state == "subscribed"


def test_without_a_group_the_topics_are_subscribed_alone_at_the_qos_asked():
    h = Harness(group="", topics=("plant/+/readings", "plant/+/temp"), qos=2)
    _, subscribe = h.subscribe()
    assert subscribe.subscriptions == (("plant/+/readings", 2), ("plant/+/temp", 2))


@both
def test_puback_goes_to_the_broker_only_after_commit_and_in_arrival_order(version):
    h = Harness(version)
    h.subscribe()
    h.publish(1, body(1.0, 2.0))
    h.publish(2, body(3.0, start=10))
    assert h.events() == [] and len(h.store.pending) == 2
    h.store.finish(1)  # the second commits first: its PUBACK waits for the first's
    assert h.events() == []
    h.store.finish(0)
    assert [(type(e), e.packet_id) for e in h.events()] == [(mqtt.PubAck, 1), (mqtt.PubAck, 2)]
    assert len(h.store.readings) == 3
    assert h.source.counters.acked == 2 and h.source.counters.readings == 3


def test_qos2_gets_pubrec_after_commit_and_pubcomp_for_pubrel():
    h = Harness(qos=2)
    h.subscribe()
    h.publish(7, body(1.0), qos=2)
    assert h.events() == []
    h.store.finish(0)
    assert [type(e) for e in h.events()] == [mqtt.PubRec]
    h.send(mqtt.PubRel(7))
    assert [(type(e), e.packet_id) for e in h.events()] == [(mqtt.PubComp, 7)]


@both
def test_unknown_devices_and_bad_payloads_are_kept_then_acknowledged(version):
    h = Harness(version)
    h.subscribe()
    h.publish(1, body(1.0), topic="devices/nobody/readings")
    h.publish(2, b"{not json", topic="devices/truck-17/readings")
    h.publish(3, b"warm", topic="devices/truck-17/oil_temp")
    acks = h.events()
    assert [(type(e), e.packet_id) for e in acks] == [(mqtt.PubAck, 1), (mqtt.PubAck, 2), (mqtt.PubAck, 3)]
    expected = [Reason.NOT_AUTHORIZED, Reason.PAYLOAD_FORMAT_INVALID, Reason.PAYLOAD_FORMAT_INVALID]
    assert [a.reason for a in acks] == (expected if version == V5 else [Reason.SUCCESS] * 3)
    kept = h.store.rejected
    assert [(device, raw) for _, device, _, raw in kept] == [
        (None, body(1.0)),
        ("truck-17", b"{not json"),
        ("truck-17", b"warm"),
    ]
    assert "nobody" in kept[0][2] and "gatewayctl device add nobody" in kept[0][2]
    assert all(source.startswith("broker 127.0.0.1:1883") for source, *_ in kept)
    assert h.store.pending == [] and h.source.counters.rejected == 3


def test_a_bare_number_is_a_reading_of_the_topics_metric_timed_on_arrival():
    h = Harness(now=1_795_341_600)
    h.subscribe()
    h.publish(1, b" 81.5 ", topic="devices/truck-17/oil_temp")
    h.store.finish(0)
    assert [type(e) for e in h.events()] == [mqtt.PubAck]
    assert h.store.readings == {(1, "oil_temp", 1_795_341_600_000_000): 81.5}


def test_payload_json_reads_every_message_as_a_body_whatever_the_last_level():
    h = Harness(topics=("tele/+/SENSOR",), payload="json")
    h.subscribe()
    h.publish(1, body(5.0), topic="tele/truck-17/SENSOR")
    h.store.finish(0)
    assert [type(e) for e in h.events()] == [mqtt.PubAck] and len(h.store.readings) == 1


def test_with_storage_away_nothing_is_acknowledged_and_the_connection_closes():
    h = Harness()
    h.subscribe()
    h.store.available = False
    h.store.write = lambda *a, **k: type(h.store).__mro__[1].write(h.store, *a, **k)  # fail at once
    h.publish(1, body(1.0))
    assert [e for e in h.events() if isinstance(e, mqtt.PubAck)] == []
    assert h.transport.disconnecting
    assert h.source.counters.state == "disconnected" and "storage cannot take" in h.source.counters.last_error


def test_at_the_window_the_socket_is_paused_and_resumed_when_half_is_answered():
    h = Harness(window=4)
    h.subscribe()
    for i in range(4):
        h.publish(i + 1, body(1.0, start=i))
    assert h.transport.producerState == "paused"
    h.store.finish(0)
    assert h.transport.producerState == "paused"
    h.store.finish(1)
    assert h.transport.producerState == "producing"
    assert len([e for e in h.events() if isinstance(e, mqtt.PubAck)]) == 2


def test_a_device_is_looked_up_once_and_again_after_a_while_or_when_it_changes():
    h = Harness()
    h.subscribe()
    lookups = []
    real = h.store.device_key
    h.store.device_key = lambda name: lookups.append(name) or real(name)
    for i in range(3):
        h.publish(i + 1, body(1.0, start=i))
    assert lookups == ["truck-17"]
    h.clock.advance(31)
    h.publish(4, body(1.0, start=4))
    h.source.forget(["truck-17"])
    h.publish(5, body(1.0, start=5))
    assert lookups == ["truck-17"] * 3


def test_a_refused_connection_or_subscription_is_an_error_the_status_shows():
    h = Harness()
    failed = []
    h.proto.subscribed.addErrback(failed.append)
    h.events()
    h.send(mqtt.ConnAck(Reason.BAD_USER_NAME_OR_PASSWORD, properties=((P.REASON_STRING, "who are you"),)))
    assert h.transport.disconnecting and len(failed) == 1
    assert "bad user name or password (0x86): who are you" in h.source.counters.last_error

    h = Harness()
    h.proto.subscribed.addErrback(failed.append)
    h.events()
    h.send(mqtt.ConnAck(Reason.SUCCESS))
    [subscribe] = h.events()
    h.send(mqtt.SubAck(subscribe.packet_id, (Reason.NOT_AUTHORIZED,)))
    assert h.transport.disconnecting and len(failed) == 2
    assert "refused the subscription to $share/txgateway/devices/+/+" in h.source.counters.last_error


def test_no_answer_to_connect_or_a_silent_broker_closes_the_connection():
    h = Harness()
    failed = []
    h.proto.subscribed.addErrback(failed.append)
    h.clock.advance(30)
    assert h.transport.disconnecting and failed and "no CONNACK" in h.source.counters.last_error

    h = Harness()
    h.subscribe()
    h.clock.advance(30)  # keepalive 60: a PINGREQ every 30 seconds
    assert [type(e) for e in h.events()] == [mqtt.PingReq]
    h.send(mqtt.PingResp())
    h.clock.advance(90)
    assert not h.transport.disconnecting  # heard 90 s ago: not more than 1.5 times the keepalive
    h.clock.advance(30)
    assert h.transport.disconnecting and "said nothing for 90 seconds" in h.source.counters.last_error


def test_a_pause_for_backpressure_is_not_taken_for_a_silent_broker():
    h = Harness(window=2)
    h.subscribe()
    h.publish(1, body(1.0))
    h.publish(2, body(2.0, start=1))
    assert h.transport.producerState == "paused"
    h.clock.advance(300)  # the store holds both for five minutes: the broker's PINGRESPs wait unread
    assert not h.transport.disconnecting
    h.store.finish(0)
    h.store.finish(1)
    assert [type(e) for e in h.events() if not isinstance(e, mqtt.PingReq)] == [mqtt.PubAck, mqtt.PubAck]


def test_stopping_waits_for_the_messages_taken_then_disconnects():
    h = Harness()
    h.subscribe()
    h.publish(1, body(1.0))
    stopped = []
    h.proto.stop().addCallback(stopped.append)
    assert h.transport.producerState == "paused" and stopped == [] and not h.transport.disconnecting
    h.store.finish(0)
    assert [type(e) for e in h.events()] == [mqtt.PubAck, mqtt.Disconnect]
    assert stopped == [None] and h.transport.disconnecting


def test_stopping_gives_up_waiting_after_its_timeout():
    h = Harness()
    h.subscribe()
    h.publish(1, body(1.0))
    stopped = []
    h.proto.stop(timeout=10).addCallback(stopped.append)
    h.clock.advance(10)
    assert stopped == [None] and [type(e) for e in h.events()] == [mqtt.Disconnect]


def test_status_and_metrics_name_the_lag():
    h = Harness()
    sources = BrokerSources((h.settings,), h.source.ingest, reactor, "gw-1", run=None)
    sources.sources["plant"] = h.source
    h.subscribe()
    h.publish(1, body(1.0))
    h.clock.advance(3)
    status = sources.status()["plant"]
    assert status["state"] == "subscribed" and status["in_flight"] == 1
    assert status["oldest_unacked_seconds"] == 3 and status["messages"] == 1
    families = {f.name: f for f in sources.live_metrics()}
    assert families["gateway_mqtt_source_oldest_unacked_seconds"].samples[0].value == 3
    assert families["gateway_mqtt_source_subscribed"].samples[0].value == 1
    assert sources.health()["plant"]["ok"]
    h.send(mqtt.Disconnect(Reason.SERVER_SHUTTING_DOWN))
    h.proto.connectionLost()
    h.clock.advance(121)
    health = sources.health()["plant"]
    assert (
        not health["ok"]
        and "not subscribed for 121s: the broker disconnected: server shutting down" in health["problem"]
    )


def test_the_client_id_is_made_from_the_gateway_id_and_stays_the_same():
    broker = source_from_url("mqtt://127.0.0.1:1883").broker
    assert broker.client_id == ""
    one = broker.with_client_id("host/1234", "plant").client_id
    assert one == broker.with_client_id("host/1234", "plant").client_id and one.startswith("txgw-")
    assert one != broker.with_client_id("host/5678", "plant").client_id


# -- settings ------------------------------------------------------------------


def test_source_tables_are_read_with_every_key():
    s = source_from_table(
        {
            "name": "plant",
            "url": "mqtts://broker.example:8884",
            "username": "gw",
            "password": {"env": "BROKER_PASSWORD"},
            "topics": ["site/+/readings"],
            "device_level": 1,
            "group": "fleet",
            "qos": 2,
            "window": 50,
            "version": "3.1.1",
            "client_id": "gw-a",
            "keepalive": 30,
        },
        environ={"BROKER_PASSWORD": "s3cret"},
    )
    assert (s.broker.host, s.broker.port, s.broker.tls, s.broker.version) == ("broker.example", 8884, True, V311)
    assert s.broker.password == "s3cret" and "s3cret" not in repr(s)
    assert s.filters == ("$share/fleet/site/+/readings",) and s.qos == 2 and s.window == 50


@pytest.mark.parametrize(
    "table, message",
    [
        ({"url": "mqtt://broker.example"}, "url: 'mqtt://broker.example': mqtt:// (no TLS) is allowed to a loopback"),
        ({"url": "https://broker.example"}, "is not an mqtts:// (or mqtt://) URL"),
        ({"url": "mqtts://u:p@broker.example"}, "give username, and the password from a file or the environment"),
        ({"url": "mqtts://b", "username": "u", "password": "x"}, "password: read it from the environment or a file"),
        ({"url": "mqtts://b", "password": {"env": "NOPE_NOT_SET"}}, "password: environment variable NOPE_NOT_SET"),
        ({"url": "mqtts://b", "topics": ["$share/g/a/+"]}, "topics: '$share/g/a/+': give the filter without $share"),
        ({"url": "mqtts://b", "topics": ["a/b+/c"]}, "+ and # stand alone in a level"),
        ({"url": "mqtts://b", "topics": ["a/#"], "device_level": 1}, "has no level 1 to name the device"),
        ({"url": "mqtts://b", "qos": 0}, "qos: 0: give 1 or 2"),
        ({"url": "mqtts://b", "window": 0}, "window: 0 is outside 1..10000"),
        ({"url": "mqtts://b", "payload": "xml"}, "payload: 'xml' is not auto or json"),
        ({"url": "mqtts://b", "version": "4"}, "version: '4' is not 5.0 or 3.1.1"),
        ({"url": "mqtts://b", "topic": "a"}, "unknown key 'topic'"),
    ],
)
def test_source_table_mistakes_name_the_table_and_the_key(table, message):
    with pytest.raises(SourceError) as e:
        source_from_table(table, environ={})
    assert message in str(e.value) and str(e.value).startswith("[[mqtt_source]] ")


def test_plain_mqtt_elsewhere_than_loopback_needs_plaintext():
    s = source_from_table({"url": "mqtt://broker.plant.lan", "plaintext": True})
    assert s.broker.port == 1883 and not s.broker.tls


def test_the_config_takes_urls_and_tables_and_refuses_two_sources_of_one_name():
    config = build_config({"mqtt-source": ["mqtt://127.0.0.1:1884"]})
    assert [s.broker.port for s in config.mqtt_source] == [1884]
    config = build_config({}, {"mqtt-source": [{"url": "mqtts://a", "name": "a"}, {"url": "mqtts://b", "name": "b"}]})
    assert [s.name for s in config.mqtt_source] == ["a", "b"]
    with pytest.raises(ConfigError) as e:
        build_config({}, {"mqtt-source": [{"url": "mqtts://a", "name": "x"}, {"url": "mqtts://b", "name": "x"}]})
    assert str(e.value) == "--mqtt-source: two MQTT sources are named 'x'; give each a distinct name"
    with pytest.raises(ConfigError) as e:
        build_config({"mqtt-source": ["mqtt://broker.example"]})
    assert str(e.value).startswith("--mqtt-source: url: 'mqtt://broker.example': mqtt:// (no TLS)")


def test_a_source_never_holds_more_than_a_device_session_takes():
    from gateway.net.brokers import IN_FLIGHT_MAX
    from gateway.transports.session import WINDOW_MAX

    assert IN_FLIGHT_MAX <= WINDOW_MAX


def test_sparkplug_data_waits_unacknowledged_until_the_births_kept_are_read_back():
    # After a restart the database may not answer at once; data the broker sends again then waits (no PUBACK,
    # nothing kept aside as unreadable) and the births are asked for again until they are read.
    h = Harness(format="sparkplug", host_id="scada-1", group="", topics=("spBv1.0/#",))
    h.store.add_device("line-1-press")
    asked: list[float] = []

    def run(work):
        asked.append(h.clock.seconds())
        if len(asked) < 3:
            return fail(StoreUnavailable("database unavailable: the database system is starting up"))
        return succeed([("plant", "line-1", "", spb_host.nbirth()), ("plant", "line-1", "press", spb_host.dbirth(1))])

    h.source.run = run
    h.source.births_ready = h.source.load_births()
    h.events()
    h.send(mqtt.ConnAck(Reason.SUCCESS, True))
    subscribe = next(e for e in h.events() if isinstance(e, mqtt.Subscribe))
    h.send(mqtt.SubAck(subscribe.packet_id, (1,)))
    h.publish(1, spb_host.ddata(37), topic=spb_host.topic("DDATA", "press"))
    h.clock.pump([1.0, 1.9])
    assert asked == [0.0, 1.0] and h.store.pending == [] and h.events() == []
    assert h.transport.producerState == "paused"
    h.clock.advance(0.1)  # asked again after 1 s, then 2 s: read back, the data is read with them
    assert asked == [0.0, 1.0, 3.0]
    [(_, device, readings)] = h.store.pending
    assert device.name == "line-1-press" and [r.metric for r in readings] == ["Temperature", "Motor.RPM"]
    h.store.finish(0)
    assert [(type(e), e.packet_id) for e in h.events()] == [(mqtt.PubAck, 1)]
    assert h.store.rejected == []


def test_a_source_stopped_while_the_births_are_asked_for_again_stops_asking():
    h = Harness(format="sparkplug", host_id="scada-1", group="", topics=("spBv1.0/#",))
    asked: list[float] = []
    h.source.run = lambda work: asked.append(h.clock.seconds()) or fail(StoreUnavailable("database unavailable"))
    ready = h.source.load_births()
    h.clock.advance(1)
    waiting = len(h.clock.getDelayedCalls())
    h.source.stopService()
    assert ready.called and len(h.clock.getDelayedCalls()) == waiting - 1  # the pause before asking again
    h.clock.advance(60)
    assert asked == [0.0, 1.0]


class Commands:
    """The commands service as a broker source sees it: downlinks attached and detached."""

    def __init__(self) -> None:
        self.attached: list[str] = []

    def attach(self, name, downlink, back=True) -> None:
        self.attached.append(name)

    def detach(self, name, downlink) -> None:
        self.attached.remove(name)


def test_devices_heard_are_written_together_and_again_at_most_every_heard_every(monkeypatch):
    monkeypatch.setattr(mqtt_source, "HEARD_EVERY", 10.0)  # an hour; shorter here than the keepalive
    h = Harness(command_topic="devices/{device}/commands/{id}")
    h.store.add_device("truck-18")
    commands = Commands()
    h.source.commands = commands
    writes: list[list[str]] = []

    def run(work):
        class Conn:
            def runOperation(self, sql, params):
                assert sql.startswith("INSERT INTO broker_devices")
                writes.append(params[2])
                return succeed(None)

        return work(Conn())

    h.source.run = run
    h.subscribe()
    for i, device in enumerate(("truck-17", "truck-18", "truck-17")):
        h.publish(i + 1, body(1.0, start=i), topic=f"devices/{device}/readings")
    assert commands.attached == ["truck-17", "truck-18"] and writes == []
    h.clock.advance(mqtt_source.HEARD_FLUSH)  # both, in one statement
    assert writes == [["truck-17", "truck-18"]]
    h.clock.advance(1)
    h.publish(4, body(2.0), topic="devices/truck-17/readings")
    h.clock.advance(mqtt_source.HEARD_FLUSH)
    assert len(writes) == 1  # written 6 s ago
    h.publish(5, body(3.0), topic="devices/truck-17/readings")
    h.clock.advance(mqtt_source.HEARD_FLUSH)
    assert writes[1:] == [["truck-17"]]
