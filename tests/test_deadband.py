"""The one deadband rule the Modbus poller and the sinks' edge reduction share."""

from __future__ import annotations

import pytest

from gateway.deadband import worth_keeping


@pytest.mark.parametrize(
    "value, ts_us, last, deadband, heartbeat, kept",
    [
        (5.0, 0, None, 1.0, None, True),  # the first is kept
        (5.0, 10, (4.5, 0), None, None, True),  # no deadband: everything
        (5.0, 10, (4.5, 0), 1.0, None, False),  # within the deadband
        (5.0, 10, (3.9, 0), 1.0, None, True),  # moved past it
        (5.0, 60_000_000, (4.5, 0), 1.0, 60.0, True),  # a heartbeat's worth of device time
        (5.0, 59_999_999, (4.5, 0), 1.0, 60.0, False),
    ],
)
def test_the_one_deadband_rule(value, ts_us, last, deadband, heartbeat, kept):
    assert worth_keeping(value, ts_us, last, deadband, heartbeat) is kept
