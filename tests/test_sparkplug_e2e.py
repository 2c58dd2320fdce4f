"""
The gateway as a Sparkplug B host application on a real Mosquitto, against
edge nodes whose payloads are written byte by byte from the specification
(``tests/sparkplug_wire.py``, no protobuf library) and whose MQTT is
paho-mqtt's:

- STATE online (retained) while the gateway runs, offline once it stops; an
  offline STATE of its own seen while it runs answered by online again;
- births then data stored with the Sparkplug names and the metrics' times;
- a seq gap → an NCMD Node Control/Rebirth on the broker → the node's births
  again; a stale Will (another bdSeq) changes nothing; NDEATH marks the
  node's devices offline (``gatewayctl mqtt status`` says so);
- a write command becomes a DCMD and succeeds when the device reports it;
- ``twistd -n gateway`` killed with SIGKILL mid-stream (QoS 1): every
  reading is stored once, those sent again after the restart read with the
  births kept in the database.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import paho.mqtt.client as paho
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from gateway.cli.sim_sparkplug import EdgeNode
from gateway.commands.model import parse_request
from tests import sparkplug_wire as wire
from tests.broker import Mosquitto
from tests.conftest import start_service
from tests.gatewayproc import gatewayctl
from tests.test_commands_modbus import finished
from tests.test_resilience import make_gateway, wait_until  # noqa: F401 - a fixture
from tests.test_store import add_pg_device

CODEC = (wire.encode, wire.decode_command)


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


class Watcher:
    """A paho client subscribed to ``filters``, keeping the last payload of each topic."""

    def __init__(self, port: int, *filters: str) -> None:
        self.seen: dict[str, list[bytes]] = {}
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"watch-{time.monotonic_ns()}")
        self.client.on_message = lambda c, u, m: self.seen.setdefault(m.topic, []).append(m.payload)
        self.client.on_connect = lambda c, u, f, r, p=None: c.subscribe([(t, 1) for t in filters])
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def state(self, host_id: str) -> dict | None:
        got = self.seen.get(f"spBv1.0/STATE/{host_id}")
        return json.loads(got[-1]) if got else None

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def table(broker: Mosquitto, **more) -> dict:
    url = f"mqtt://127.0.0.1:{broker.port}"
    return {"name": "plant", "url": url, "format": "sparkplug", "host-id": "scada-1", "backoff": 0.2, **more}


async def until(what, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not what() and time.monotonic() < deadline:
        await deferLater(reactor, 0.1, lambda: None)
    return what()


def readings(sql, device: str) -> dict[str, list[tuple[float, float]]]:
    rows = sql(
        "SELECT k.name, r.value, extract(epoch FROM r.ts)::float8 FROM readings r JOIN metrics k ON k.id = r.metric_id "
        "JOIN devices d ON d.id = r.device_id WHERE d.name = %s ORDER BY r.ts",
        (device,),
    )
    out: dict[str, list[tuple[float, float]]] = {}
    for metric, value, ts in rows:
        out.setdefault(metric, []).append((value, ts))
    return out


@pytest_twisted.ensureDeferred
async def test_births_data_rebirth_commands_deaths_and_state(tmp_path, db_dsn, sql, broker):
    for name in ("line-1-press", "line-1-pump"):
        add_pg_device(sql, name)
    watcher = Watcher(broker.port, "spBv1.0/STATE/#", "spBv1.0/plant/NCMD/#")
    svc = await start_service(tmp_path, db_dsn, {"mqtt-source": [table(broker)]})
    node = None
    try:
        source = svc.transport("mqtt_source").sources.sources["plant"]
        assert await until(lambda: (watcher.state("scada-1") or {}).get("online") is True)
        node = await deferToThread(
            EdgeNode("127.0.0.1", broker.port, "line-1", ["press", "pump"], 3, 1, "plant", 4, CODEC).start
        )
        assert await until(
            lambda: source.sparkplug.online() == {"line-1": True, "line-1-press": True, "line-1-pump": True}
        )
        sent_at = time.time()
        for k in range(1, 4):
            node.data("press", k)
        assert await until(lambda: len(readings(sql, "line-1-press").get("Running", [])) >= 4)  # birth + 3
        got = readings(sql, "line-1-press")
        assert set(got) == {"Temperature", "Motor.RPM", "Running"}
        assert got["Motor.RPM"][-1][0] == node.values["press"]["Motor/RPM"] == 1003
        assert got["Temperature"][-1][0] == node.values["press"]["Temperature"]
        assert abs(got["Temperature"][-1][1] - sent_at) < 10  # the metric's own time

        # A lost message: the next one skips a seq; the host asks for a rebirth and the node gives it.
        node.data("press", 4, skip_seq=True)
        assert await until(lambda: node.rebirths == 1), source.sparkplug.counts
        assert "spBv1.0/plant/NCMD/line-1" in watcher.seen
        assert source.sparkplug.counts["seq_gaps"] == 1
        node.data("press", 5)
        assert await until(lambda: len(readings(sql, "line-1-press")["Running"]) >= 7)  # 4 + data 4 + birth + 5
        assert source.sparkplug.counts["seq_gaps"] == 1, "the rebirth started the seq over"

        # A write: a DCMD, successful once the device reports the value.
        request = parse_request({"name": "write", "params": {"metric": "Motor.RPM", "value": 1234}, "id": "w1"})
        await svc.commands.send("line-1-press", request, "operator-1")
        done = await finished(svc, "w1")
        assert (done["state"], done["result"]) == ("succeeded", {"metric": "Motor.RPM", "value": 1234.0})
        assert node.writes == 1 and node.values["press"]["Motor/RPM"] == 1234

        # A Will of an older session (another bdSeq) overtaking this one's NBIRTH changes nothing.
        stale = wire.payload(int(time.time() * 1000), None, [wire.metric("bdSeq", None, None, 4, 3)])
        await deferToThread(publish, broker.port, "spBv1.0/plant/NDEATH/line-1", stale)
        assert await until(lambda: source.sparkplug.counts["stale_death"] == 1)
        assert source.sparkplug.online()["line-1-press"] is True

        # This host's own STATE said offline while it runs (an earlier session's Will come late): the host
        # says online again at once, with this session's timestamp.
        topic = "spBv1.0/STATE/scada-1"
        online = watcher.state("scada-1")
        seen = len(watcher.seen[topic])
        late = json.dumps({"online": False, "timestamp": online["timestamp"] - 60_000}).encode()
        await deferToThread(publish, broker.port, topic, late, True)
        assert await until(lambda: len(watcher.seen[topic]) >= seen + 2), watcher.seen[topic][seen:]
        assert [json.loads(p) for p in watcher.seen[topic][seen:]] == [json.loads(late), online]

        # NDEATH of this session: the node and its devices are offline.
        await deferToThread(node.death)
        node = None
        assert await until(lambda: not any(source.sparkplug.online().values())), source.sparkplug.online()
        await svc.transport("mqtt_source").sources.reporter.write()
        text = (await deferToThread(gatewayctl, "mqtt", "status", "--db", db_dsn)).stdout
        assert "sparkplug     host scada-1" in text and "offline       line-1, line-1-press, line-1-pump" in text
    finally:
        if node is not None:
            node.stop()
        await svc.stopService()
        try:
            assert await until(lambda: (watcher.state("scada-1") or {}).get("online") is False)
        finally:
            watcher.stop()


def publish(port: int, topic: str, payload: bytes, retain: bool = False) -> None:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"pub-{time.monotonic_ns()}")
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(30)
    finally:
        c.disconnect()
        c.loop_stop()


def test_kill_9_mid_stream_then_every_reading_stored_once(make_gateway, broker, tmp_path):  # noqa: F811
    config = tmp_path / "gateway.toml"
    lines = ["[[mqtt_source]]"] + [f"{k} = {json.dumps(v)}" for k, v in table(broker).items()]
    config.write_text("\n".join(lines) + "\n")
    gw = make_gateway("--config", str(config)).start()
    gatewayctl("device", "add", "line-1-press", data_dir=gw.data_dir)
    gw.wait_for_line(r"MQTT source .*subscribed to spBv1.0/#")

    def stored() -> tuple[int, int]:
        out = gatewayctl("export", "--device", "line-1-press", data_dir=gw.data_dir).stdout.splitlines()
        return len(out), len({tuple(json.loads(line)[k] for k in ("metric", "ts")) for line in out})

    node = EdgeNode("127.0.0.1", broker.port, "line-1", ["press"], 10, 1, "plant", 0, CODEC).start()
    try:
        messages = 300
        done = threading.Event()

        def stream() -> None:
            for k in range(1, messages + 1):
                node.data("press", k)
                time.sleep(0.01)  # a pace for the kill to land mid-stream; the totals do not depend on it
            done.set()

        threading.Thread(target=stream, daemon=True).start()
        assert wait_until(lambda: stored()[0] >= 500, 60)
        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait()
        assert done.wait(60)
        gw.start()
        expected = 10 * (messages + 1)  # the DBIRTH's values, then every DDATA's
        assert wait_until(lambda: stored()[0] >= expected, 90), (stored(), "".join(gw.lines[-60:]))
        total, distinct = stored()
        assert total == distinct == expected
    finally:
        node.stop()
        gw.stop()
