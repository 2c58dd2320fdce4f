"""
What a Sparkplug B host application sends, over a broker source's
connection (``broker_client.py``): its STATE (online, retained, with the
offline Will of the same timestamp), rebirth requests, and commands.

A command ``write`` with ``{"metric", "value"}`` to a Sparkplug device is an
NCMD (the node's own metric) or DCMD metric write, typed as the birth typed
the metric, at QoS 0 as Sparkplug has them. Sparkplug has no answer to a
command: the edge node reports the new value in its next NDATA/DDATA. So
the command is ``delivered`` and ``succeeded`` when the device reports the
metric at the written value; until then it is written again every
``--command-resend`` (writing a value twice is writing it once) until it
expires. A device offline (its node's NDEATH, its DDEATH) gets nothing: its
commands wait for its rebirth.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from gateway.commands.model import Command
from gateway.commands.service import IDownlink
from gateway.readings import Reading
from protocols import mqtt

log = Logger()


def state_payload(online: bool, timestamp_ms: int) -> bytes:
    """Sparkplug 3.0's STATE payload: JSON, the same timestamp in the Will and in the online message."""
    return json.dumps({"online": online, "timestamp": timestamp_ms}, separators=(",", ":")).encode()


def state_online(payload: bytes) -> bool | None:
    """A STATE payload's ``online``; None when it is not a STATE payload."""
    try:
        online = json.loads(payload).get("online")
    except (ValueError, AttributeError):
        return None
    return online if isinstance(online, bool) else None


def will(settings: Any, timestamp_ms: int) -> mqtt.Will:
    return mqtt.Will(settings.state_topic, state_payload(False, timestamp_ms), qos=1, retain=True)


@implementer(IDownlink)
class SparkplugDownlink:
    """A device of an edge node on the broker of one source: writes go out as NCMD/DCMD."""

    transport = "sparkplug"

    def __init__(self, source: Any, device: str, commands: Any) -> None:
        self.source = source  # a mqtt_source.BrokerSource with a SparkplugHost
        self.device = device
        self.commands = commands
        self.pending: dict[str, tuple[str, float]] = {}  # command id → (metric, value) written, not yet reported

    def room(self) -> int:
        client = self.source.client
        up = client is not None and not client.closing and self.source.subscribed_now
        return 1 if up else 0

    def deliver(self, command: Command) -> None:
        client = self.source.client
        if client is None or client.closing:
            return  # written again after --command-resend
        metric, value = command.params.get("metric"), command.params.get("value")
        if command.name != "write" or not isinstance(metric, str):
            self._fail(command.id, f"a Sparkplug device takes write with metric and value, not {command.name!r}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(command.id, f"value: {value!r} is not a number")
            return
        try:
            topic, payload = self.source.sparkplug.command(
                self.device, metric, float(value), self.source.clock.seconds()
            )
        except (LookupError, ValueError) as e:
            self._fail(command.id, str(e))
            return
        self.pending[command.id] = (metric, float(value))
        client.send_command(mqtt.Publish(topic, payload, qos=0))

    def reported(self, readings: list[Reading]) -> None:
        """The device's readings just stored: a write whose value it now reports has succeeded."""
        for id_, (metric, value) in list(self.pending.items()):
            if any(r.metric == metric and r.value == value for r in readings):
                del self.pending[id_]
                d = Deferred.fromCoroutine(self._succeeded(id_, metric, value))
                d.addErrback(self._not_recorded, id_)

    async def _succeeded(self, id_: str, metric: str, value: float) -> None:
        await self.commands.delivered(self.device, id_)
        await self.commands.finished(self.device, id_, "succeeded", {"metric": metric, "value": value}, "sparkplug")
        self.commands.flush(self.device)

    def _fail(self, id_: str, error: str) -> None:
        d = Deferred.fromCoroutine(self.commands.finished(self.device, id_, "failed", {"error": error}, "sparkplug"))
        d.addErrback(self._not_recorded, id_)

    @staticmethod
    def _not_recorded(f: Any, id_: str) -> None:
        log.warn("command {id} not recorded: {e}", id=id_, e=f.value)

    def gone(self) -> None:
        """The device went offline: what was written and not reported is written again after its rebirth."""
        self.pending.clear()
