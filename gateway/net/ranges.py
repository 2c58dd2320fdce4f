"""
Address ranges a peer may come from (``--tracker-allow``, ``gatewayctl
device set --allow``): parsed once, and a peer's address checked against
them, IPv4 peers on a dual-stack socket included.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def network(value: Any) -> Network:
    """An address range such as 10.64.0.0/10 (the carrier's APN range)."""
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an address range such as 10.64.0.0/10") from None


def allowed(host: str, networks: Sequence[Network]) -> bool:
    """Whether a peer at ``host`` may connect: any address when no range is given."""
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in n for n in networks)
