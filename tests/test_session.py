"""The device session's answer order and flow control, with no reactor, no transport and no clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.transports.session import DeviceSession, Flow


def test_answers_go_out_in_arrival_order_whatever_order_they_settle_in():
    s: DeviceSession[str] = DeviceSession(window=8)
    a, b, c = s.arrived(1, 0.0), s.arrived(2, 0.1), s.arrived(3, 0.2)
    assert s.settle(c, "ack 3") == []  # 1 and 2 are not settled: nothing may go out
    assert s.settle(a, "ack 1") == [a]
    assert [t.outcome for t in s.settle(b, "ack 2")] == ["ack 2", "ack 3"]
    assert s.unanswered == 0


def test_a_ticket_is_settled_once():
    s: DeviceSession[str] = DeviceSession(window=2)
    t = s.arrived(1, 0.0)
    s.settle(t, "ack")
    with pytest.raises(ValueError, match="settled already"):
        s.settle(t, "ack")


def test_a_full_window_pauses_until_half_is_answered():
    s: DeviceSession[str] = DeviceSession(window=4)
    tickets = [s.arrived(i, 0.0) for i in range(3)]
    assert s.may_read and s.flow() is None
    tickets.append(s.arrived(3, 0.0))
    assert not s.may_read and s.flow() is Flow.PAUSE
    assert s.flow() is None  # told once
    s.settle(tickets[0], "ack")
    assert not s.may_read  # 3 unanswered: above half the window
    s.settle(tickets[1], "ack")
    assert s.may_read and s.flow() is Flow.RESUME


def test_a_held_message_a_lookup_and_a_stop_pause_reading():
    s: DeviceSession[str] = DeviceSession(window=4)
    s.held = True
    assert not s.may_read and s.flow() is Flow.PAUSE
    s.held = False
    assert s.flow() is Flow.RESUME
    s.busy = True  # the handshake's lookup: what the peer sends meanwhile waits in the kernel
    assert not s.may_read and s.flow() is Flow.PAUSE
    s.busy = False
    assert s.may_read and s.flow() is Flow.RESUME
    s.stopped = True
    assert not s.may_read and s.flow() is Flow.PAUSE


def test_a_smaller_window_applies_at_once():
    s: DeviceSession[str] = DeviceSession(window=8)
    for i in range(4):
        s.arrived(i, 0.0)
    assert s.may_read
    s.set_window(4)
    assert not s.may_read and s.flow() is Flow.PAUSE
    with pytest.raises(ValueError):
        s.set_window(0)


@given(st.integers(1, 16), st.permutations(range(20)))
def test_any_settling_order_gives_every_answer_once_in_order(window, order):
    s: DeviceSession[int] = DeviceSession(window=window)
    tickets = [s.arrived(i, float(i)) for i in range(20)]
    sent = []
    for i in order:
        sent += [t.seq for t in s.settle(tickets[i], i)]
        assert s.unanswered == 20 - len(sent)
    assert sent == list(range(20))
    assert s.may_read
