"""TCP connections as the gateway sets them up."""

from __future__ import annotations

from typing import Any


def no_delay(transport: Any) -> None:
    """Send small frames (ACKs) at once: Nagle's algorithm would hold them for the peer's delayed ACK."""
    while transport is not None:
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
            return
        transport = getattr(transport, "transport", None)
