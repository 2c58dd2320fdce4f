"""The worked session of protocols/SPEC.rst, rebuilt from fixed inputs."""

from __future__ import annotations

from gateway import tokens
from protocols import tgp

TOKEN = "0123456789abcdef.QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZn"
DEVICE = "truck-17"
NONCE = bytes(range(0x20, 0x40))
SERVER_TIME_US = 1_795_341_600_000_000  # 2026-11-22T10:00:00Z
T0 = 1_795_341_590_000_000  # 2026-11-22T09:59:50Z


def session() -> list[tuple[str, str, bytes]]:
    """[(sender, message name, frame bytes)] in the order they cross the wire."""
    gw, dev = tgp.Connection(tgp.GATEWAY), tgp.Connection(tgp.DEVICE)
    out = []

    def send(sender: str, event) -> None:
        conn, other = (dev, gw) if sender == "device" else (gw, dev)
        data = conn.send(event)
        other.receive_data(data)
        assert other.next_event() is not tgp.NEED_DATA
        out.append((sender, type(event).__name__.upper(), data))

    send("device", tgp.Hello(DEVICE, (1, 2), "fw-2.1"))
    send("gateway", tgp.Challenge(2, NONCE))
    send("device", tgp.Auth(tokens.auth_proof(TOKEN, NONCE, DEVICE)))
    send("gateway", tgp.Welcome(2, SERVER_TIME_US, 65536, 32, 30, 120))
    send(
        "device",
        tgp.Declare(1, (tgp.Metric(1, tgp.ValueType.F32, "oil_temp"), tgp.Metric(2, tgp.ValueType.F64, "density"))),
    )
    send("gateway", tgp.Ack(1, 0, 0, 0))
    send("device", tgp.Data(2, (("oil_temp", T0, 81.5), ("oil_temp", T0 + 1_000_000, 81.75), ("density", T0, 0.8712))))
    send("device", tgp.Data(3, (("oil_temp", T0 + 2_000_000, float("inf")),)))
    send("gateway", tgp.Ack(2, 3, 0, 0))
    send("gateway", tgp.Nack(3, tgp.ErrorCode.INVALID_READING, "readings[0].value: must be finite"))
    send("device", tgp.Bye(tgp.ErrorCode.NORMAL, ""))
    return out


COMMAND_ID = "rate-7"
EXPIRES_US = SERVER_TIME_US + 600_000_000  # 2026-11-22T10:10:00Z


def command_session() -> list[tuple[str, str, bytes]]:
    """The version 3 command exchange, after a handshake that chose version 3: [(sender, name, bytes)]."""
    gw, dev = tgp.Connection(tgp.GATEWAY), tgp.Connection(tgp.DEVICE)
    out = []

    def send(sender: str, event, keep: bool = True) -> None:
        conn, other = (dev, gw) if sender == "device" else (gw, dev)
        data = conn.send(event)
        other.receive_data(data)
        assert other.next_event() is not tgp.NEED_DATA
        if keep:
            out.append((sender, type(event).__name__.upper(), data))

    send("device", tgp.Hello(DEVICE, (1, 2, 3), "fw-3.0"), keep=False)
    send("gateway", tgp.Challenge(3, NONCE), keep=False)
    send("device", tgp.Auth(tokens.auth_proof(TOKEN, NONCE, DEVICE)), keep=False)
    send("gateway", tgp.Welcome(3, SERVER_TIME_US, 65536, 32, 30, 120), keep=False)
    send("gateway", tgp.Command(COMMAND_ID, EXPIRES_US, "sample-rate", '{"hz":5}'))
    send("device", tgp.Received(COMMAND_ID))
    send("device", tgp.Result(1, COMMAND_ID, tgp.CommandStatus.SUCCEEDED, '{"hz":5}'))
    send("gateway", tgp.Ack(1, 1, 0, 0))
    return out


if __name__ == "__main__":
    k = tokens.client_key(TOKEN)
    print("client_key", k.hex())
    print("stored_key", tokens.stored_key(k).hex())
    print("proof", tokens.auth_proof(TOKEN, NONCE, DEVICE).hex())
    for sender, name, data in session() + command_session():
        print(sender, name, len(data), data.hex(" "))
