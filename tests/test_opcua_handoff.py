"""
The handoff of OPC UA values from asyncua's thread to the reactor, with no
reactor and no server: at most ``MAX_HANDED`` values on their way, what
goes past it dropped and counted as ``overflow`` gaps by device.
"""

from __future__ import annotations

import types

from twisted.internet.task import Clock

from gateway.transports import opcua_client
from gateway.transports.opcua import ServerSource
from gateway.transports.opcua_client import Handler
from gateway.transports.opcua_settings import Item, source_from_table


class Reactor:
    """callFromThread kept, to be run when the test says the reactor got to it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def callFromThread(self, f, *args) -> None:
        self.calls.append((f, args))

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


class Listener:
    def __init__(self) -> None:
        self.got: list[tuple[list, dict]] = []

    def values(self, batch, dropped, arrived) -> None:
        self.got.append(([h for h, *_ in batch], dict(dropped)))


def value(handle: int) -> tuple[int, float, float, int, str]:
    return (handle, 1.0, 1_800_000_000.0, 0, "")


def test_past_the_bound_a_batch_is_dropped_and_counted_with_the_next_that_goes(monkeypatch):
    monkeypatch.setattr(opcua_client, "MAX_HANDED", 4)
    reactor, listener = Reactor(), Listener()
    handler = Handler(types.SimpleNamespace(reactor=reactor, listener=listener))
    handler.pending = [value(0), value(1), value(0)]
    handler.flush()
    handler.pending = [value(1), value(2)]  # the reactor has not taken the first: 3 + 2 > 4
    handler.flush()
    assert len(reactor.calls) == 1 and handler.handed == 3 and handler.dropped == {1: 1, 2: 1}
    reactor.run()
    assert listener.got == [([0, 1, 0], {})] and handler.handed == 0
    handler.pending = [value(2)]
    handler.flush()
    reactor.run()
    assert listener.got[1] == ([2], {1: 1, 2: 1}) and handler.dropped == {}


def test_values_dropped_on_their_way_are_overflow_gaps_of_their_device():
    node = {"node": "ns=2;s=T", "metric": "temperature"}
    table = {"device": "press-4", "endpoint": "opc.tcp://127.0.0.1:4840", "node": [node]}
    settings = source_from_table(table, 0, float)
    owner = types.SimpleNamespace(reactor=Clock(), waiting=0)
    source = ServerSource(settings, owner)
    source.items = (
        Item("ns=2;s=T", "temperature", "press-4", 0.5, 10),
        Item("ns=2;s=P", "pressure", "press-5", 0.5, 10),
    )
    source.values_in([], 0.0, {0: 3, 1: 2, 7: 1})  # 7: no such item (a session since made again)
    assert source.gaps == {("press-4", "overflow"): 3, ("press-5", "overflow"): 2}
