"""
The command ledger and the commands service on a real PostgreSQL: accepted
means committed, an id given twice is one command, a command waits for its
device's downlink and is sent again until acknowledged, a result is recorded
once, expiry and cancel, and two gateways on one database (one service
each) where only the one holding the device's downlink sends.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gateway.commands.model import CommandError, parse_request, parse_result
from gateway.commands.service import Commands, IDownlink
from tests.test_store import add_pg_device


@implementer(IDownlink)
class Downlink:
    """A device's downlink that keeps what it is sent, and can be told to have no room."""

    transport = "test"

    def __init__(self, room: int = 10) -> None:
        self.space = room
        self.got: list = []
        self.arrived: Deferred = Deferred()
        self._waiting: list[tuple[int, Deferred]] = []

    def room(self) -> int:
        return self.space - len(self.got)

    def deliver(self, command) -> None:
        self.got.append(command)
        if not self.arrived.called:
            self.arrived.callback(command)
        ready = [d for n, d in self._waiting if len(self.got) >= n]
        self._waiting = [(n, d) for n, d in self._waiting if len(self.got) < n]
        for d in ready:
            d.callback(self.got)

    def holding(self, n: int) -> Deferred:
        """Fires once ``n`` commands were delivered in all (at once if they were already)."""
        if len(self.got) >= n:
            return succeed(self.got)
        d: Deferred = Deferred()
        self._waiting.append((n, d))
        return d


async def started(db_dsn: str, name: str = "gw-1", **kw) -> Commands:
    commands = Commands(reactor, lambda: name, **kw)
    await commands.start(db_dsn)
    return commands


def within(d: Deferred, seconds: float = 20.0) -> Deferred:
    return d.addTimeout(seconds, reactor)


def test_requests_are_checked_before_anything_is_stored():
    request = parse_request({"name": "reboot", "params": {"after": 5}, "ttl": "2m", "id": "op-1"})
    assert (request.id, request.name, request.params, request.ttl) == ("op-1", "reboot", {"after": 5}, 120.0)
    assert parse_request({"name": "x"}).ttl == 600.0 and parse_request({"name": "x"}).id.startswith("c-")
    for doc, words in [
        ([], "JSON object"),
        ({"name": "bad name"}, "name:"),
        ({"name": "x", "params": [1]}, "params:"),
        ({"name": "x", "params": {"a": "b" * 20000}}, "limit is 16384"),
        ({"name": "x", "ttl": "31d"}, "ttl:"),
        ({"name": "x", "ttl": "soon"}, "ttl:"),
        ({"name": "x", "id": "no spaces"}, "id:"),
        ({"name": "x", "colour": 1}, "colour: unknown field"),
    ]:
        with pytest.raises(CommandError, match=words) as e:
            parse_request(doc)
        assert e.value.code == "invalid_command"
    assert parse_result({"status": "failed", "result": {"why": "busy"}}) == ("failed", {"why": "busy"})
    with pytest.raises(CommandError, match="succeeded"):
        parse_result({"status": "done"})


@pytest_twisted.ensureDeferred
async def test_a_command_waits_for_its_device_then_is_delivered_and_finished_once(db_dsn, sql):
    add_pg_device(sql, "truck-1")
    commands = await started(db_dsn)
    try:
        command, new = await commands.send("truck-1", parse_request({"name": "reboot", "id": "r1"}), "alice")
        assert new and command.state == "queued" and command.sender == "alice"
        # Committed before the answer: another connection sees it.
        assert sql("SELECT state, sender FROM commands WHERE id = 'r1'") == [("queued", "alice")]
        again, new = await commands.send("truck-1", parse_request({"name": "reboot", "id": "r1"}), "alice")
        assert not new and again.id == "r1" and sql("SELECT count(*) FROM commands") == [(1,)]
        with pytest.raises(CommandError) as e:
            await commands.send("truck-1", parse_request({"name": "other", "id": "r1"}), "alice")
        assert e.value.code == "id_in_use"
        with pytest.raises(CommandError) as e:
            await commands.send("nobody", parse_request({"name": "reboot"}), "alice")
        assert e.value.code == "no_such_device"

        downlink = Downlink()
        verifyObject(IDownlink, downlink)
        commands.attach("truck-1", downlink)
        sent = await within(downlink.arrived)
        assert (sent.id, sent.name, sent.attempts) == ("r1", "reboot", 1)
        assert sql("SELECT state, gateway, transport FROM commands") == [("sent", "gw-1", "test")]

        # Not acknowledged: the device comes back and gets it again, same id.
        commands.detach("truck-1", downlink)
        downlink = Downlink()
        commands.attach("truck-1", downlink)
        sent = await within(downlink.arrived)
        assert (sent.id, sent.attempts) == ("r1", 2)

        await commands.delivered("truck-1", "r1")
        waiting = Deferred.fromCoroutine(commands.wait("r1", 30))
        assert await commands.finished("truck-1", "r1", "succeeded", {"uptime": 3}, "test")
        assert not await commands.finished("truck-1", "r1", "failed", {}, "test")  # recorded once
        done = await within(waiting)
        assert done.state == "succeeded" and done.result == {"uptime": 3}
        shown = await commands.ledger.find("r1", history=True)
        assert [e["state"] for e in shown.events] == ["queued", "sent", "sent", "delivered", "succeeded"]
        assert [e["attempt"] for e in shown.events] == [0, 1, 2, 2, 2]
        assert shown.events[1]["gateway"] == "gw-1" and shown.events[1]["transport"] == "test"
    finally:
        await commands.stop()


@pytest_twisted.ensureDeferred
async def test_a_downlink_is_sent_as_many_as_it_has_room_for_in_order(db_dsn, sql):
    add_pg_device(sql, "truck-1")
    commands = await started(db_dsn)
    try:
        for i in range(5):
            await commands.send("truck-1", parse_request({"name": "step", "id": f"s{i}"}), "bob")
        downlink = Downlink(room=2)
        commands.attach("truck-1", downlink)
        await within(downlink.arrived)
        await commands.flush("truck-1")
        assert [c.id for c in downlink.got] == ["s0", "s1"]
        for i in range(2):
            await commands.delivered("truck-1", f"s{i}")
        downlink.space += 2
        await commands.flush("truck-1")
        assert [c.id for c in downlink.got] == ["s0", "s1", "s2", "s3"]
    finally:
        await commands.stop()


@pytest_twisted.ensureDeferred
async def test_expired_and_canceled_commands_are_not_sent(db_dsn, sql):
    add_pg_device(sql, "truck-1")
    commands = await started(db_dsn)
    try:
        await commands.send("truck-1", parse_request({"name": "a", "id": "late", "ttl": 1}), "bob")
        await commands.send("truck-1", parse_request({"name": "b", "id": "gone"}), "bob")
        await commands.send("truck-1", parse_request({"name": "c", "id": "kept"}), "bob")
        sql("UPDATE commands SET expires_at = now() - interval '1 second' WHERE id = 'late'")
        canceled = await commands.cancel("gone", "carol")
        assert canceled.state == "canceled"
        with pytest.raises(CommandError, match="canceled already"):
            await commands.cancel("gone", "carol")
        await commands.tick()
        assert sql("SELECT id, state FROM commands ORDER BY id") == [
            ("gone", "canceled"),
            ("kept", "queued"),
            ("late", "expired"),
        ]
        downlink = Downlink()
        commands.attach("truck-1", downlink)
        await within(downlink.arrived)
        await commands.flush("truck-1")
        assert [c.id for c in downlink.got] == ["kept"]
        notes = sql("SELECT command_id, note FROM command_events WHERE note IS NOT NULL ORDER BY command_id")
        assert notes == [("gone", "canceled by carol"), ("late", "not finished within its ttl")]
    finally:
        await commands.stop()


@pytest_twisted.ensureDeferred
async def test_of_two_gateways_only_the_one_holding_the_device_sends(db_dsn, sql):
    add_pg_device(sql, "truck-1")
    first, second = await started(db_dsn, "gw-1"), await started(db_dsn, "gw-2")
    try:
        here = Downlink()
        second.attach("truck-1", here)
        for i in range(3):
            await first.send("truck-1", parse_request({"name": "ping", "id": f"p{i}"}), "dave")
            await within(here.holding(i + 1))  # it may come before send returns: count, never wait for "the next"
        assert [c.id for c in here.got] == ["p0", "p1", "p2"]
        assert sql("SELECT DISTINCT gateway FROM commands") == [("gw-2",)]
        # The first gateway's tick looks too, but has no downlink for the device, and the second's sends are
        # younger than the resend interval: nothing is sent twice.
        await first.tick()
        await second.tick()
        assert sql("SELECT sum(attempts) FROM commands") == [(3,)]
    finally:
        await first.stop()
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_retention_deletes_finished_commands_and_their_history_and_keeps_the_rest(db_dsn, sql):
    add_pg_device(sql, "truck-1")
    commands = await started(db_dsn)
    try:
        for id_ in ("old", "recent", "waiting"):
            await commands.send("truck-1", parse_request({"name": "x", "id": id_}), "ops")
        await commands.cancel("old", "ops")
        await commands.cancel("recent", "ops")
        sql("UPDATE commands SET changed_at = now() - interval '31 days' WHERE id IN ('old', 'waiting')")
        assert await commands.ledger.purge(30 * 86400) == 1
        assert sql("SELECT id FROM commands ORDER BY id") == [("recent",), ("waiting",)]
        assert sql("SELECT DISTINCT command_id FROM command_events ORDER BY 1") == [("recent",), ("waiting",)]
    finally:
        await commands.stop()
