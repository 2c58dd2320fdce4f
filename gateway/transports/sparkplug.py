"""
The gateway as a Sparkplug B host application: what an ``[[mqtt_source]]``
with ``format = "sparkplug"`` does with each message of ``spBv1.0/#``. No
reactor and no socket here: ``SparkplugHost.message`` takes a topic and a
payload and says what to store, what to keep aside and whom to ask for a
rebirth; ``broker_client.py`` does the MQTT and the acknowledgements (PUBACK
only after COMMIT, as for any broker source).

The payloads are Tahu's protobuf (``protocols/sparkplug_b.py``, over
Google's protobuf runtime).

What the host keeps per edge node (``group/node``): the ``bdSeq`` of its
last NBIRTH, the ``seq`` of its last message, and the births (NBIRTH, and
DBIRTH per device) that give each alias its name and type. Then:

- NBIRTH starts the node over: new bdSeq, seq, aliases; its devices are
  offline until their DBIRTH; the birth's values are readings too;
- DBIRTH, NDATA, DDATA, DDEATH must come with the next ``seq`` (mod 256); a
  gap means a message was lost, so the host asks for a rebirth (an NCMD
  ``Node Control/Rebirth``, at most one per node every ``rebirth_interval``
  seconds) and stores what it can read of the message;
- data before its birth, or an alias no birth named, cannot be read without
  guessing: the message is kept in rejected_input with the reason, and a
  rebirth is asked for;
- NDEATH with the bdSeq of the node's current birth marks the node and its
  devices offline; an NDEATH with another bdSeq is a Will that overtook a
  newer NBIRTH (the broker sends the old session's Will late) and changes
  nothing;
- ``is_historical`` metrics are stored at their own time like any late
  reading; transient, null, text and array metrics are counted, not stored.

Device names: a device's messages go to the registered device named by
``device_name`` (``{group}``, ``{node}``, ``{device}``), a node's own
metrics to ``node_name``. Metric names keep their Sparkplug names, with
the characters a metric name cannot hold (``/``, spaces) as ``.`` and ``_``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from gateway.readings import Reading, metric_name
from protocols import sparkplug_b as spb

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
MAX_NODES = 100_000  # edge nodes remembered; one not born yet is not remembered beyond it
MAX_NAMES = 100_000  # Sparkplug metric names whose stored name is kept


class Birth:
    """A birth's metrics: each alias's name, each name's type."""

    def __init__(self, message: spb.Message) -> None:
        self.message = message
        self.names: dict[int, str] = {}
        self.types: dict[str, spb.DataType] = {}
        for m in message.metrics:
            if m.name is None or m.datatype == spb.DataType.UNKNOWN:
                raise ValueError(f"a birth's metric {m.name or m.alias!r} has no name or no datatype")
            if m.alias is not None:
                self.names[m.alias] = m.name
            self.types[m.name] = m.datatype


@dataclass
class EdgeDevice:
    birth: Birth
    online: bool = True


@dataclass
class EdgeNode:
    group: str
    node: str
    bd_seq: int | None = None
    seq: int | None = None  # of the last message; None: not known (a birth read back after a restart)
    birth: Birth | None = None
    online: bool = False
    devices: dict[str, EdgeDevice] = field(default_factory=dict)
    rebirth_at: float | None = None  # when a rebirth was last asked for


@dataclass
class Outcome:
    """What to do with one message."""

    device: str | None = None  # the registered device its readings belong to
    readings: list[Reading] = field(default_factory=list)
    keep: tuple[str, str] | None = None  # (reason, message): kept in rejected_input, not stored
    rebirth: tuple[str, str] | None = None  # (group, node): publish an NCMD Node Control/Rebirth
    birth: tuple[str, str, str | None] | None = None  # (group, node, device): a birth to keep across restarts
    kind: str = ""  # the message type, or what it was taken for ("stale_death", "state", "other")


class SparkplugHost:
    def __init__(
        self,
        host_id: str,
        device_name: str = "{node}-{device}",
        node_name: str = "{node}",
        rebirth_interval: float = 10.0,
    ) -> None:
        self.host_id = host_id
        self.device_name = device_name
        self.node_name = node_name
        self.rebirth_interval = rebirth_interval
        self.nodes: dict[tuple[str, str], EdgeNode] = {}
        self.counts: collections.Counter[str] = collections.Counter()  # message kinds, gaps, rebirths, not stored
        self._names: dict[str, str] = {}  # Sparkplug name → metric name ("" for control metrics): _metric

    # -- births kept across restarts ----------------------------------------

    def restore(self, group: str, node: str, device: str | None, payload: bytes) -> None:
        """A birth kept before a restart: its aliases read the data sent again after it; seq is not known."""
        edge = self.nodes.setdefault((group, node), EdgeNode(group, node))
        birth = Birth(spb.decode(payload))
        if device is None:
            edge.birth, edge.bd_seq, edge.online, edge.seq = birth, _bd_seq(birth.message), True, None
        else:
            edge.devices[device] = EdgeDevice(birth)

    # -- messages -------------------------------------------------------------

    def message(self, topic: str, payload: bytes, now: float) -> Outcome:
        levels = topic.split("/")
        if len(levels) < 3 or levels[0] != NAMESPACE:
            return self._kind(Outcome(keep=("not_sparkplug", f"topic {topic!r} is not in {NAMESPACE}")), "other")
        if levels[1] == "STATE":
            return self._kind(Outcome(), "state")  # host applications' own state, ours included
        if len(levels) not in (4, 5):
            return self._kind(Outcome(keep=("not_sparkplug", f"topic {topic!r} is not a Sparkplug topic")), "other")
        group, kind, node = levels[1], levels[2], levels[3]
        device = levels[4] if len(levels) == 5 else None
        edge = self.nodes.get((group, node))
        if kind in ("NCMD", "DCMD"):
            return self._kind(Outcome(), kind)  # commands to edge nodes, ours or another host's
        if kind not in ("NBIRTH", "NDEATH", "DBIRTH", "NDATA", "DDATA", "DDEATH"):
            return self._kind(Outcome(keep=("not_sparkplug", f"{kind} is not a Sparkplug message type")), "other")
        if (device is None) != kind.startswith("N"):
            return self._kind(
                Outcome(keep=("not_sparkplug", f"{kind} on {topic!r}: a device is named wrongly")), "other"
            )
        try:
            if kind in ("NDATA", "DDATA"):
                return self._kind(self._data(edge, group, node, kind, device, spb.parse(payload), now), kind)
            message = spb.decode(payload)
            if kind == "NBIRTH":
                return self._kind(self._nbirth(group, node, message), kind)
            if kind == "NDEATH":
                return self._kind(self._ndeath(edge, message), kind)
            if edge is None or edge.birth is None:
                return self._kind(self._unborn(group, node, kind, now, "before the node's NBIRTH"), kind)
            return self._kind(self._after_birth(edge, kind, device, message, now), kind)
        except ValueError as e:
            return self._kind(Outcome(keep=("invalid_payload", f"{kind}: {e}")), kind)

    def _kind(self, outcome: Outcome, kind: str) -> Outcome:
        outcome.kind = outcome.kind or kind
        self.counts[outcome.kind] += 1
        if outcome.rebirth is not None:
            self.counts["rebirth_requests"] += 1
        return outcome

    def _nbirth(self, group: str, node: str, message: spb.Message) -> Outcome:
        birth = Birth(message)
        edge = self.nodes.setdefault((group, node), EdgeNode(group, node))
        edge.birth, edge.bd_seq, edge.seq, edge.online = birth, _bd_seq(message), message.seq, True
        edge.devices.clear()  # every device is born again after its node
        name = self.node_name.format(group=group, node=node, device="")
        return Outcome(device=name, readings=self._readings(message), birth=(group, node, None))

    def _ndeath(self, edge: EdgeNode | None, message: spb.Message) -> Outcome:
        bd_seq = _bd_seq(message)
        if (
            edge is None
            or not edge.online
            or (bd_seq is not None and edge.bd_seq is not None and bd_seq != edge.bd_seq)
        ):
            return Outcome(kind="stale_death")  # a Will overtaking the NBIRTH of a newer session
        edge.online = False
        for d in edge.devices.values():
            d.online = False
        return Outcome()

    def _unborn(self, group: str, node: str, kind: str, now: float, why: str) -> Outcome:
        self.counts["before_birth"] += 1
        keep = ("no_birth", f"{kind} {why}: its aliases cannot be read")
        edge = self.nodes.get((group, node))
        if edge is None:
            if len(self.nodes) >= MAX_NODES:  # names made up by a publisher on the broker: not remembered
                return Outcome(keep=keep)
            edge = self.nodes[(group, node)] = EdgeNode(group, node)
        return Outcome(keep=keep, rebirth=self._ask(edge, now))

    def _data(
        self, edge: EdgeNode | None, group: str, node: str, kind: str, device: str | None, pb: Any, now: float
    ) -> Outcome:
        """NDATA and DDATA: the stream, read in one pass (``spb.numbers``)."""
        if edge is None or edge.birth is None:
            return self._unborn(group, node, kind, now, "before the node's NBIRTH")
        birth = edge.birth
        if device is not None:
            dev = edge.devices.get(device)
            if dev is None:
                return self._unborn(group, node, kind, now, f"of device {device} before its DBIRTH")
            birth = dev.birth
        try:
            values, skipped = spb.numbers(pb, birth.names, birth.types)
        except KeyError as e:
            return Outcome(keep=("unknown_alias", f"{kind}: {e} is in no birth"), rebirth=self._ask(edge, now))
        rebirth = None
        if not self._seq(edge, pb.seq if pb.HasField("seq") else None):
            self.counts["seq_gaps"] += 1
            rebirth = self._ask(edge, now)
        if skipped:
            self.counts["metrics_not_stored"] += skipped
        readings = []
        names = self._names
        for name, ts_ms, value in values:
            metric = names.get(name)
            if metric is None:
                metric = self._metric(name)
            if metric:
                readings.append(Reading(metric, ts_ms * 1000, float(value)))
        fields = {"group": group, "node": node, "device": device or ""}
        return Outcome(
            device=(self.device_name if device else self.node_name).format(**fields), readings=readings, rebirth=rebirth
        )

    def _after_birth(self, edge: EdgeNode, kind: str, device: str | None, message: spb.Message, now: float) -> Outcome:
        """DBIRTH and DDEATH (a DDEATH's metrics, if any, are not read)."""
        if kind == "DBIRTH":
            born = Birth(message)
        elif device not in edge.devices:
            return self._unborn(edge.group, edge.node, kind, now, f"of device {device} before its DBIRTH")
        rebirth = None
        if not self._seq(edge, message.seq):
            self.counts["seq_gaps"] += 1
            rebirth = self._ask(edge, now)
        if kind == "DDEATH":
            if device in edge.devices:
                edge.devices[device].online = False
            return Outcome(rebirth=rebirth)
        if kind == "DBIRTH":
            assert device is not None
            edge.devices[device] = EdgeDevice(born)
        names = {"group": edge.group, "node": edge.node, "device": device or ""}
        name = (self.device_name if device else self.node_name).format(**names)
        outcome = Outcome(device=name, readings=self._readings(message), rebirth=rebirth)
        if kind == "DBIRTH":
            outcome.birth = (edge.group, edge.node, device)
        return outcome

    def _seq(self, edge: EdgeNode, seq: int | None) -> bool:
        """Take the message's seq; False when it is not the one after the last (a message was lost)."""
        expected = None if edge.seq is None else (edge.seq + 1) % 256
        if seq is not None:
            edge.seq = seq
        return expected is None or seq is None or seq == expected

    def _ask(self, edge: EdgeNode, now: float) -> tuple[str, str] | None:
        if edge.rebirth_at is not None and now - edge.rebirth_at < self.rebirth_interval:
            return None
        edge.rebirth_at = now
        return (edge.group, edge.node)

    def _readings(self, message: spb.Message) -> list[Reading]:
        out = []
        for m in message.metrics:
            name = m.name or f"alias_{m.alias}"
            metric = self._names.get(name)
            if metric is None:
                metric = self._metric(name)
            if not metric:
                continue
            value = m.value
            if m.is_null or value is None or m.is_transient or m.datatype not in spb.NUMERIC:
                self.counts["metrics_not_stored"] += 1
                continue
            ts_ms = m.timestamp if m.timestamp is not None else message.timestamp
            if ts_ms is None:
                self.counts["metrics_not_stored"] += 1
                continue
            number = (1.0 if value else 0.0) if isinstance(value, bool) else float(value)
            out.append(Reading(metric, int(ts_ms) * 1000, number))
        return out

    def _metric(self, name: str) -> str:
        """
        The metric a Sparkplug name is stored as, kept for the next message (every message repeats them,
        at most ``MAX_NAMES`` kept); "" for the node's own control metrics (bdSeq, Node Control/…), which
        are not readings.
        """
        if len(self._names) >= MAX_NAMES:
            self._names.clear()
        control = name == "bdSeq" or name.startswith("Node Control/")
        metric = self._names[name] = "" if control else metric_name(name)
        return metric

    # -- what goes out ----------------------------------------------------------

    @staticmethod
    def rebirth_message(group: str, node: str, now: float) -> tuple[str, bytes]:
        """The NCMD that asks an edge node for its births again."""
        metric = spb.Metric(name=REBIRTH, datatype=spb.DataType.BOOLEAN, value=True)
        payload = spb.encode(spb.Message(timestamp=int(now * 1000), metrics=[metric]))
        return f"{NAMESPACE}/{group}/NCMD/{node}", payload

    def command(self, device: str, metric: str, value: float, now: float) -> tuple[str, bytes]:
        """The NCMD or DCMD that writes ``metric`` (a metric of the registered ``device``) to ``value``."""
        for edge in self.nodes.values():
            names = {"group": edge.group, "node": edge.node}
            targets: list[tuple[str | None, Birth]] = []
            if self.node_name.format(device="", **names) == device and edge.birth is not None:
                targets.append((None, edge.birth))
            for child, dev in edge.devices.items():
                if self.device_name.format(device=child, **names) == device:
                    targets.append((child, dev.birth))
            for dev_id, birth in targets:
                for name, datatype in birth.types.items():
                    if metric_name(name) != metric or datatype not in spb.NUMERIC:
                        continue
                    typed: Any = value
                    if datatype == spb.DataType.BOOLEAN:
                        typed = bool(value)
                    elif datatype not in (spb.DataType.FLOAT, spb.DataType.DOUBLE):
                        if value != int(value):
                            raise ValueError(f"{metric} holds whole numbers; {value!r} is not one")
                        typed = int(value)
                    cmd = spb.Metric(name=name, timestamp=int(now * 1000), datatype=datatype, value=typed)
                    payload = spb.encode(spb.Message(timestamp=int(now * 1000), metrics=[cmd]))
                    kind = "DCMD" if dev_id else "NCMD"
                    topic = f"{NAMESPACE}/{edge.group}/{kind}/{edge.node}" + (f"/{dev_id}" if dev_id else "")
                    return topic, payload
        raise LookupError(f"{metric!r} is no numeric metric in the births of {device}")

    def online(self) -> dict[str, bool]:
        """Registered device name → online, for every node and device born."""
        out = {}
        for edge in self.nodes.values():
            names = {"group": edge.group, "node": edge.node}
            out[self.node_name.format(device="", **names)] = edge.online
            for dev_id, dev in edge.devices.items():
                out[self.device_name.format(device=dev_id, **names)] = edge.online and dev.online
        return out


def _bd_seq(message: spb.Message) -> int | None:
    for m in message.metrics:
        if m.name == "bdSeq" and isinstance(m.value, int) and not isinstance(m.value, bool):
            return m.value
    return None
