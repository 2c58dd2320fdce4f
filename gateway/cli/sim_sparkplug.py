"""
``gatewayctl simulate --protocol sparkplug``: Sparkplug B edge nodes on a
broker, as the specification has them (paho-mqtt for MQTT,
``protocols/sparkplug_b.py`` for Tahu's protobuf, or another codec given
to ``EdgeNode``), for a gateway's ``[[mqtt_source]]``
with ``format = "sparkplug"`` to consume.

Each edge node ``sim-node-K`` of group ``sim`` connects with its NDEATH as
the Will (its ``bdSeq``), publishes its NBIRTH (``seq`` 0, ``bdSeq``, ``Node
Control/Rebirth``), then a DBIRTH for each of its devices (``sim-0`` …, at
most 100 a node) naming every metric with an alias, then DDATA with aliases
only and the next ``seq`` each. It answers an NCMD ``Node Control/Rebirth``
with its births again, and a DCMD by setting the metric and reporting it.
"""

from __future__ import annotations

import argparse
import itertools
import random
import threading
import time
from collections.abc import Callable
from typing import Any

DEVICES_PER_NODE = 100
GROUP = "sim"
DOUBLE, INT32, INT64, BOOLEAN = 10, 3, 4, 11  # Sparkplug B datatypes


def encode(timestamp: int | None, seq: int | None, metrics: list[dict[str, Any]]) -> bytes:
    """A payload of metrics given as dicts (name, alias, datatype, value, timestamp), by protocols/sparkplug_b.py."""
    from protocols import sparkplug_b as spb

    out = [
        spb.Metric(m.get("name"), m.get("alias"), m.get("timestamp"), spb.DataType(m["datatype"]), m.get("value"))
        for m in metrics
    ]
    return spb.encode(spb.Message(timestamp, seq, out))


def decode_command(payload: bytes) -> list[tuple[str | None, Any]]:
    from protocols import sparkplug_b as spb

    return [(m.name, m.value) for m in spb.decode(payload).metrics]


def now_ms() -> int:
    return int(time.time() * 1000)


class EdgeNode:
    """One edge node and its devices (paho runs its network loop in a thread of its own)."""

    def __init__(
        self,
        host: str,
        port: int,
        node: str,
        devices: list[str],
        metrics: int,
        qos: int = 0,
        group: str = GROUP,
        bd_seq: int = 0,
        codec: tuple[Callable[..., bytes], Callable[[bytes], list[tuple[str | None, Any]]]] = (encode, decode_command),
    ) -> None:
        import paho.mqtt.client as paho

        self.encode, self.decode_command = codec
        self.group, self.node, self.devices, self.qos = group, node, devices, qos
        self.names = ["Temperature", "Motor/RPM", "Running"] + [f"Sensor {i}" for i in range(max(0, metrics - 3))]
        self.types = [DOUBLE, INT32, BOOLEAN] + [DOUBLE] * (len(self.names) - 3)
        self.values: dict[str, dict[str, Any]] = {d: {} for d in devices}
        self.seq = itertools.count()
        self.bd_seq = bd_seq
        self.lock = threading.Lock()
        self.last_ms = 0
        self.rebirths = 0
        self.writes = 0
        self.published = 0  # readings in DDATA
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{group}-{node}", clean_session=True)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(100_000)
        self.client.on_connect = self._connected
        self.client.on_message = self._message
        self.host, self.port = host, port
        self.connected = threading.Event()

    def stamp(self) -> int:
        """Now in ms, always later than the last stamp (two messages of one metric never share a time)."""
        self.last_ms = max(now_ms(), self.last_ms + 1)
        return self.last_ms

    def topic(self, kind: str, device: str | None = None) -> str:
        return f"spBv1.0/{self.group}/{kind}/{self.node}" + (f"/{device}" if device else "")

    def alias(self, device: str, i: int) -> int:
        return (self.devices.index(device) + 1) * 10_000 + i

    def _death(self) -> bytes:
        return self.encode(now_ms(), None, [{"name": "bdSeq", "datatype": INT64, "value": self.bd_seq}])

    def start(self) -> EdgeNode:
        self.client.will_set(self.topic("NDEATH"), self._death(), qos=1, retain=False)
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(30):
            raise ConnectionError(f"edge node {self.node}: no CONNACK from {self.host}:{self.port}")
        return self

    def _connected(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        client.subscribe([(self.topic("NCMD"), 1), (self.topic("DCMD") + "/+", 1)])
        self.births()
        self.connected.set()

    def births(self) -> None:
        with self.lock:
            self.seq = itertools.count()
            now = self.stamp()
            node_metrics = [
                {"name": "bdSeq", "datatype": INT64, "value": self.bd_seq, "timestamp": now},
                {"name": "Node Control/Rebirth", "datatype": BOOLEAN, "value": False, "timestamp": now},
            ]
            self._publish(self.topic("NBIRTH"), self.encode(now, next(self.seq), node_metrics))
            for device in self.devices:
                values = self.values[device] or {n: self._value(t, 0) for n, t in zip(self.names, self.types)}
                self.values[device] = values
                metrics = [
                    {"name": n, "alias": self.alias(device, i), "datatype": t, "value": values[n], "timestamp": now}
                    for i, (n, t) in enumerate(zip(self.names, self.types))
                ]
                self._publish(self.topic("DBIRTH", device), self.encode(now, next(self.seq) % 256, metrics))

    def _value(self, datatype: int, k: int) -> Any:
        if datatype == BOOLEAN:
            return k % 2 == 1
        if datatype == INT32:
            return 1000 + k % 500
        return round(20 + random.random() * 10, 3)

    def data(self, device: str, k: int, skip_seq: bool = False) -> None:
        """DDATA of every metric of ``device`` (aliases only); ``skip_seq``: as if one message were lost."""
        with self.lock:
            now = self.stamp()
            if skip_seq:
                next(self.seq)
            metrics = []
            for i, t in enumerate(self.types):
                value = self.values[device][self.names[i]] = self._value(t, k)
                metrics.append({"alias": self.alias(device, i), "datatype": t, "value": value, "timestamp": now})
            self._publish(self.topic("DDATA", device), self.encode(now, next(self.seq) % 256, metrics))
            self.published += len(metrics)

    def _publish(self, topic: str, payload: bytes) -> Any:
        return self.client.publish(topic, payload, qos=self.qos)

    def _message(self, client: Any, userdata: Any, message: Any) -> None:
        kind = message.topic.split("/")[2]
        try:
            metrics = self.decode_command(message.payload)
        except Exception:  # noqa: BLE001 - a command this node cannot read is ignored, as a device would
            return
        for name, value in metrics:
            if kind == "NCMD" and name == "Node Control/Rebirth" and value:
                self.rebirths += 1
                self.births()
            elif kind == "DCMD" and name in self.names:
                device = message.topic.split("/")[-1]
                if device not in self.values:
                    continue
                with self.lock:
                    self.values[device][name] = value
                    i = self.names.index(name)
                    metric = {"alias": self.alias(device, i), "datatype": self.types[i], "value": value}
                    self._publish(
                        self.topic("DDATA", device), self.encode(self.stamp(), next(self.seq) % 256, [metric])
                    )
                    self.writes += 1

    def death(self) -> None:
        """A clean end: NDEATH with this session's bdSeq, then DISCONNECT."""
        self.client.publish(self.topic("NDEATH"), self._death(), qos=1).wait_for_publish(10)
        self.stop()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    host, _, port = args.target.rpartition(":")
    nodes = [
        EdgeNode(host, int(port), f"sim-node-{k}", names[i : i + DEVICES_PER_NODE], args.batch, args.qos)
        for k, i in enumerate(range(0, len(names), DEVICES_PER_NODE))
    ]
    for node in nodes:
        node.start()
    started = time.monotonic()
    messages_per_second = args.rate / args.batch if args.rate else 0.0
    k = 0
    sent = 0
    try:
        while time.monotonic() - started < args.duration:
            k += 1
            for node in nodes:
                for device in node.devices:
                    node.data(device, k)
                    sent += 1
                    if messages_per_second:
                        ahead = sent / messages_per_second - (time.monotonic() - started)
                        if ahead > 0:
                            time.sleep(ahead)
    finally:
        for node in nodes:
            node.death()
    elapsed = time.monotonic() - started
    readings = sum(n.published for n in nodes)
    return {
        "nodes": len(nodes),
        "messages": sent,
        "readings": readings,
        "duration": elapsed,
        "rate": readings / elapsed if elapsed else 0.0,
        "rebirths": sum(n.rebirths for n in nodes),
        "writes": sum(n.writes for n in nodes),
    }
