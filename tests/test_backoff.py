"""The one retry policy: doubling from ``first`` up to ``cap``, jitter from an injected source."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.backoff import Backoff, backoff_delay


def test_the_delay_doubles_from_first_up_to_the_cap():
    assert [backoff_delay(0.5, 10.0, n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff_delay(1.0, 60.0, 10_000) == 60.0  # no overflow however long it fails


@pytest.mark.parametrize("drawn, equal, full", [(0.0, 2.0, 0.0), (0.5, 3.0, 2.0), (0.999, 3.998, 3.996)])
def test_jitter_spreads_the_delay_with_the_injected_source(drawn, equal, full):
    assert backoff_delay(1.0, 60.0, 2, "equal", lambda: drawn) == pytest.approx(equal)
    assert backoff_delay(1.0, 60.0, 2, "full", lambda: drawn) == pytest.approx(full)


@given(st.floats(0.01, 10), st.floats(0.01, 100), st.integers(0, 200), st.integers(0, 2**32))
def test_a_delay_is_never_negative_nor_past_the_cap(first, cap, attempt, seed):
    rnd = random.Random(seed)
    for jitter in ("none", "equal", "full"):
        delay = backoff_delay(first, cap, attempt, jitter, rnd.random)
        assert 0 <= delay <= cap


def test_backoff_counts_failures_in_a_row_and_starts_over_after_a_success():
    b = Backoff(0.2, 5.0, "equal", random.Random(7).random)
    delays = [b.failed() for _ in range(8)]
    assert b.failures == 8
    assert all(min(5.0, 0.2 * 2**n) / 2 <= d <= min(5.0, 0.2 * 2**n) for n, d in enumerate(delays))
    b.succeeded()
    assert b.failures == 0 and 0.1 <= b.failed() <= 0.2
    again = Backoff(0.2, 5.0, "equal", random.Random(7).random)
    assert [again.failed() for _ in range(8)] == delays  # seeded: the same delays
