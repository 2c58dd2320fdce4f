"""Two TGP connections joined by an in-memory link: no sockets, no reactor."""

from __future__ import annotations

from protocols import tgp


def drain(conn: tgp.Connection) -> list:
    events = []
    while True:
        event = conn.next_event()
        if event is tgp.NEED_DATA or event is tgp.CONNECTION_CLOSED:
            return events
        events.append(event)


class Pair:
    def __init__(self, **limits) -> None:
        self.gateway = tgp.Connection(tgp.GATEWAY, **limits)
        self.device = tgp.Connection(tgp.DEVICE, **limits)
        self.wire: list[tuple[str, bytes]] = []  # everything sent, in order

    def send(self, sender: str, event) -> list:
        """Send from 'device' or 'gateway'; return what the other side decodes."""
        ours, theirs = (self.device, self.gateway) if sender == "device" else (self.gateway, self.device)
        data = ours.send(event)
        self.wire.append((sender, data))
        theirs.receive_data(data)
        return drain(theirs)

    def handshake(self, name: str = "truck-17", version: int = tgp.VERSIONS[-1]) -> None:
        hello = tgp.Hello(name, tgp.VERSIONS, "fw 1.0")
        assert self.send("device", hello) == [hello]
        nonce = bytes(range(32))
        assert self.send("gateway", tgp.Challenge(version, nonce)) == [tgp.Challenge(version, nonce)]
        assert self.send("device", tgp.Auth(b"p" * 32)) == [tgp.Auth(b"p" * 32)]
        welcome = tgp.Welcome(version, 1_795_341_600_000_000, 65536, 32, 30, 120)
        assert self.send("gateway", welcome) == [welcome]
        assert self.gateway.state == self.device.state == tgp.READY
