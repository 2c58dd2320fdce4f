"""Group commit policy, driven by task.Clock and a commit function we control."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from gateway.storage.groupcommit import Closed, GroupCommit, Overloaded


class Commits:
    """Records each batch handed to commit; the test fires them."""

    def __init__(self):
        self.batches: list[tuple[list, Deferred]] = []

    def __call__(self, items):
        d = Deferred()
        self.batches.append((list(items), d))
        return d

    def finish(self, index=0, outcomes=None):
        items, d = self.batches[index]
        d.callback(outcomes if outcomes is not None else [f"ok:{i}" for i in items])


def make(slots=1, max_batch=10, max_delay=0.005, max_queue=100):
    clock, commits = Clock(), Commits()
    gc = GroupCommit(clock, commits, slots=slots, max_batch=max_batch, max_delay=max_delay, max_queue=max_queue)
    return gc, clock, commits


def results(d):
    out = []
    d.addBoth(out.append)
    return out


def test_a_lone_write_waits_the_delay_then_commits():
    gc, clock, commits = make()
    r = results(gc.submit("a", 1))
    assert commits.batches == []
    clock.advance(0.004)
    assert commits.batches == []
    clock.advance(0.001)
    assert [b for b, _ in commits.batches] == [["a"]]
    assert r == []  # not before the commit returns
    commits.finish()
    assert r == ["ok:a"]


def test_writes_arriving_within_the_delay_share_one_transaction():
    gc, clock, commits = make()
    ra, rb = results(gc.submit("a", 2)), results(gc.submit("b", 3))
    clock.advance(0.005)
    assert [b for b, _ in commits.batches] == [["a", "b"]]
    commits.finish()
    assert ra == ["ok:a"] and rb == ["ok:b"]


def test_a_full_batch_goes_without_waiting():
    gc, clock, commits = make(max_batch=5)
    gc.submit("a", 3)
    gc.submit("b", 2)
    assert [b for b, _ in commits.batches] == [["a", "b"]]


def test_batches_are_bounded_by_count():
    gc, clock, commits = make(max_batch=5, slots=1)
    for name in "abcd":
        gc.submit(name, 2)
    clock.advance(0.005)
    assert [b for b, _ in commits.batches] == [["a", "b"]]
    commits.finish(0)
    # what waited during the first commit goes at once, as a group
    assert [b for b, _ in commits.batches] == [["a", "b"], ["c", "d"]]


def test_writes_during_a_commit_are_coalesced_into_the_next():
    gc, clock, commits = make(slots=1, max_delay=0)
    gc.submit("a", 1)
    assert len(commits.batches) == 1
    for name in "bcd":
        gc.submit(name, 1)
    assert len(commits.batches) == 1  # the only slot is busy
    commits.finish(0)
    assert [b for b, _ in commits.batches] == [["a"], ["b", "c", "d"]]


def test_slots_bound_concurrent_transactions():
    gc, clock, commits = make(slots=2, max_delay=0, max_batch=1)
    for name in "abc":
        gc.submit(name, 1)
    assert len(commits.batches) == 2
    assert gc.in_flight == 2 and gc.queued == 1


def test_full_queue_refuses_at_once():
    gc, clock, commits = make(slots=1, max_delay=0, max_queue=5, max_batch=1)
    gc.submit("a", 1)  # in flight, no longer queued
    gc.submit("b", 4)
    r = results(gc.submit("c", 2))
    assert isinstance(r[0].value, Overloaded)
    assert "limit 5" in str(r[0].value)


def test_one_oversized_write_is_still_taken_when_the_queue_is_empty():
    gc, clock, commits = make(max_queue=5, max_batch=5, max_delay=0)
    r = results(gc.submit("big", 50))
    assert r == []
    assert [b for b, _ in commits.batches] == [["big"]]


def test_each_writer_gets_its_own_outcome():
    gc, clock, commits = make(max_delay=0, slots=1)
    gc.submit("x", 1)
    ra, rb = results(gc.submit("a", 1)), results(gc.submit("b", 1))
    commits.finish(0)
    commits.finish(1, outcomes=[ValueError("refused a"), "ok:b"])
    assert isinstance(ra[0].value, ValueError)
    assert rb == ["ok:b"]


def test_a_failed_commit_fails_every_writer_in_it():
    gc, clock, commits = make(max_delay=0, slots=1)
    gc.submit("x", 1)
    ra, rb = results(gc.submit("a", 1)), results(gc.submit("b", 1))
    commits.finish(0)
    commits.batches[1][1].errback(RuntimeError("connection lost"))
    assert isinstance(ra[0].value, RuntimeError) and isinstance(rb[0].value, RuntimeError)
    assert gc.in_flight == 0


def test_close_commits_what_waits_then_refuses():
    gc, clock, commits = make(max_delay=10)
    r = results(gc.submit("a", 1))
    closed = results(gc.close())
    assert [b for b, _ in commits.batches] == [["a"]]  # no waiting for the delay
    assert closed == []
    commits.finish()
    assert r == ["ok:a"] and closed == [None]
    late = results(gc.submit("b", 1))
    assert isinstance(late[0].value, Closed)


def test_a_newcomer_does_not_pass_writers_waiting_for_room():
    gc, clock, commits = make(slots=1, max_delay=0, max_queue=10, max_batch=100)
    gc.submit("a", 1)  # in flight
    gc.submit("b", 8)  # waiting
    assert gc.admits(2) and not gc.admits(3)
    woken = []
    gc.wait_for_room().addCallback(lambda _: woken.append("held first"))
    # Room for 2 more, but a writer waits already: a newcomer waits behind it, and is woken after it.
    assert gc.has_room(2) and not gc.admits(2)
    gc.wait_for_room().addCallback(lambda _: woken.append("newcomer"))
    assert woken == []
    commits.finish(0)  # b goes into a transaction: the queue is empty
    assert woken == ["held first", "newcomer"]
    assert gc.admits(10)


def test_room_for_backpressure():
    gc, clock, commits = make(slots=1, max_delay=0, max_queue=10, max_batch=100)
    gc.submit("a", 1)  # in flight
    gc.submit("b", 8)
    assert gc.has_room(2) and not gc.has_room(3)
    room = results(gc.wait_for_room())
    assert room == []  # 8 waiting, more than half of 10
    commits.finish(0)  # b goes into a transaction: the queue is empty
    assert room == [None]
    assert results(gc.wait_for_room()) == [None]


def test_a_devices_next_write_waits_for_the_transaction_holding_its_previous_one():
    """Two slots: device 1's second write does not pass its first; device 2 is not held back by it."""
    clock, commits = Clock(), Commits()
    gc = GroupCommit(clock, commits, slots=2, max_batch=10, max_delay=0, max_queue=100, keys=lambda item: [item[0]])
    r1 = results(gc.submit((1, "first"), 1))
    assert [b for b, _ in commits.batches] == [[(1, "first")]]
    r2 = results(gc.submit((1, "second"), 1))
    r3 = results(gc.submit((2, "other"), 1))
    assert [b for b, _ in commits.batches] == [[(1, "first")], [(2, "other")]]
    commits.finish(1)
    assert r3 and not r2
    assert len(commits.batches) == 2  # device 1's second write still waits for its first
    commits.finish(0)
    assert r1 and [b for b, _ in commits.batches][2] == [(1, "second")]
    commits.finish(2)
    assert r2 == ["ok:(1, 'second')"]


@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4)), min_size=1, max_size=40),
    st.integers(1, 3),
    st.randoms(use_true_random=False),
)
@settings(max_examples=200, deadline=None)
def test_each_keys_items_commit_in_arrival_order_whatever_order_transactions_finish(writes, slots, rnd):
    """Random writers, slots and finishing order: per key, commits follow arrival; every item commits once."""
    clock, commits = Clock(), Commits()
    gc = GroupCommit(clock, commits, slots=slots, max_batch=6, max_delay=0, max_queue=1000, keys=lambda i: [i[0]])
    finished: list = []
    for n, (key, size) in enumerate(writes):
        gc.submit((key, n), size).addCallback(lambda _, item=(key, n): finished.append(item))
        while rnd.random() < 0.5:
            open_ = [i for i, (_, d) in enumerate(commits.batches) if not d.called]
            if not open_:
                break
            commits.finish(rnd.choice(open_))
    while True:
        open_ = [i for i, (_, d) in enumerate(commits.batches) if not d.called]
        if not open_:
            break
        commits.finish(rnd.choice(open_))
    assert sorted(finished, key=lambda i: i[1]) == [(k, n) for n, (k, _) in enumerate(writes)]
    for key in {k for k, _ in writes}:
        order = [n for k, n in finished if k == key]
        assert order == sorted(order), (key, order)
    assert gc.queued == 0 and gc.in_flight == 0


def test_a_flood_from_one_device_costs_no_pass_over_the_queue_per_write():
    """While every waiting item is held behind its device's transaction, a newcomer of that device is not a look."""
    clock, commits = Clock(), Commits()
    gc = GroupCommit(clock, commits, slots=4, max_batch=10, max_delay=0, max_queue=10_000, keys=lambda item: [item[0]])
    gc.submit((1, 0), 1)
    looks = []
    take = gc._take_batch
    gc._take_batch = lambda: looks.append(1) or take()
    for n in range(1, 1001):
        gc.submit((1, n), 1)
    assert len(looks) == 1  # the first found all held; the other 999 were not looked at again
    gc.submit((2, 0), 1)  # another device's write may go: it is looked at, and goes
    assert [b for b, _ in commits.batches][-1] == [(2, 0)]
    commits.finish(0)  # device 1's transaction ends: its writes go, in order, ten at a time
    assert [b for b, _ in commits.batches][2] == [(1, n) for n in range(1, 11)]
