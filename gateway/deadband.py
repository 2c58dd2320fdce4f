"""
The one deadband rule, for the Modbus poller (what it stores) and the sinks'
edge reduction (what they send): a value is kept when it is the first, when
it moved by more than the deadband from the last one kept, or when
``heartbeat`` seconds of device time have passed since that one.
"""

from __future__ import annotations


def worth_keeping(
    value: float, ts_us: int, last: tuple[float, int] | None, deadband: float | None, heartbeat: float | None
) -> bool:
    """``last``: (value, time in µs) of the last one kept, or None; no deadband keeps everything."""
    if last is None or deadband is None:
        return True
    return abs(value - last[0]) > deadband or (heartbeat is not None and ts_us - last[1] >= heartbeat * 1_000_000)
