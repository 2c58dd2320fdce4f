"""
Commands over TGP version 3, end to end: the real service and PostgreSQL,
and a device written here from protocols/SPEC.rst alone (struct, zlib,
hmac; not the gateway's codec) that offers version 3, answers COMMAND with
RECEIVED and reports a RESULT. A version 2 device beside it is untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import struct
import zlib

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from gateway.commands.model import parse_request
from tests.test_store import add_pg_device

HEADER = struct.Struct(">2sBBI")


class SpecDevice:
    """A blocking TGP device from the SPEC: frames, the proof, HELLO … RESULT."""

    def __init__(self, port: int, name: str, token: str, versions: bytes = b"\x01\x02\x03") -> None:
        self.name, self.token, self.versions = name, token, versions
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buffer = b""

    def send(self, kind: int, payload: bytes) -> None:
        head = HEADER.pack(b"TG", kind, 0, len(payload))
        self.sock.sendall(head + payload + struct.pack(">I", zlib.crc32(head + payload)))

    def receive(self) -> tuple[int, bytes]:
        while True:
            if len(self.buffer) >= HEADER.size:
                magic, kind, flags, length = HEADER.unpack_from(self.buffer)
                assert magic == b"TG" and flags == 0
                total = HEADER.size + length + 4
                if len(self.buffer) >= total:
                    frame, self.buffer = self.buffer[:total], self.buffer[total:]
                    assert zlib.crc32(frame[:-4]) == struct.unpack(">I", frame[-4:])[0]
                    return kind, frame[HEADER.size : -4]
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the gateway closed the connection")
            self.buffer += data

    def handshake(self) -> int:
        name = self.name.encode()
        self.send(0x01, bytes([len(self.versions)]) + self.versions + bytes([len(name)]) + name + b"\x06fw-3.0")
        kind, payload = self.receive()
        assert kind == 0x02, kind
        version, nonce = payload[0], payload[1:33]
        client_key = hmac.new(self.token.encode(), b"txgateway client key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        mac = hmac.new(stored_key, b"txgateway auth v1\x00" + nonce + name, hashlib.sha256).digest()
        self.send(0x03, bytes(a ^ b for a, b in zip(client_key, mac)))
        kind, payload = self.receive()
        assert kind == 0x04 and payload[0] == version, (kind, payload)
        return version

    def command(self) -> tuple[str, int, str, dict]:
        kind, payload = self.receive()
        assert kind == 0x40, kind
        n = payload[0]
        id_ = payload[1 : 1 + n].decode()
        pos = 1 + n
        (expires,) = struct.unpack_from(">q", payload, pos)
        pos += 8
        n = payload[pos]
        name = payload[pos + 1 : pos + 1 + n].decode()
        pos += 1 + n
        (n,) = struct.unpack_from(">H", payload, pos)
        params = json.loads(payload[pos + 2 : pos + 2 + n])
        assert pos + 2 + n == len(payload)
        return id_, expires, name, params

    def received(self, id_: str) -> None:
        self.send(0x41, bytes([len(id_)]) + id_.encode())

    def result(self, seq: int, id_: str, failed: bool, result: dict) -> tuple[int, int, int, int]:
        """Send RESULT; the gateway's answer: (kind, seq, first count or code, second count)."""
        body = json.dumps(result).encode()
        self.send(
            0x14,
            struct.pack(">I", seq)
            + bytes([len(id_)])
            + id_.encode()
            + bytes([failed])
            + struct.pack(">H", len(body))
            + body,
        )
        kind, payload = self.receive()
        if kind == 0x12:  # ACK: seq, accepted, duplicates, conflicts
            got_seq, accepted, duplicates, _ = struct.unpack(">IHHH", payload)
            return kind, got_seq, accepted, duplicates
        got_seq, code, _ = struct.unpack_from(">IHH", payload)  # NACK
        return kind, got_seq, code, 0

    def close(self) -> None:
        self.send(0x30, struct.pack(">H", 15) + b"\x00\x00")
        self.sock.close()


async def state_of(sql, id_: str, want: str) -> None:
    for _ in range(1000):
        if sql("SELECT state FROM commands WHERE id = %s", (id_,)) == [(want,)]:
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"command {id_}: {sql('SELECT state FROM commands WHERE id = %s', (id_,))}, not {want}")


@pytest_twisted.ensureDeferred
async def test_a_version_3_device_runs_a_command_and_reports_once(service, sql):
    token = add_pg_device(sql, "truck-17")
    port = service.device_ports[0].getHost().port
    await service.commands.send(
        "truck-17", parse_request({"name": "sample-rate", "params": {"hz": 5}, "id": "rate-7"}), "ops"
    )
    device = SpecDevice(port, "truck-17", token)
    try:
        assert await deferToThread(device.handshake) == 3
        id_, expires, name, params = await deferToThread(device.command)
        assert (id_, name, params) == ("rate-7", "sample-rate", {"hz": 5})
        created = sql("SELECT extract(epoch FROM expires_at) FROM commands")[0][0]
        assert expires == round(float(created) * 1e6)
        await state_of(sql, "rate-7", "sent")
        await deferToThread(device.received, id_)
        await state_of(sql, "rate-7", "delivered")
        assert await deferToThread(device.result, 1, id_, False, {"hz": 5}) == (0x12, 1, 1, 0)
        assert sql("SELECT state, result, transport FROM commands") == [("succeeded", {"hz": 5}, "tgp")]
        [session] = [s for s in service.transport("tgp").sessions() if s.device and s.device.name == "truck-17"]
        assert session.readings == 0  # a result is not a reading
        # The same RESULT again (its ACK lost, say): a duplicate, recorded once.
        assert await deferToThread(device.result, 2, id_, True, {}) == (0x12, 2, 0, 1)
        assert sql("SELECT state FROM commands") == [("succeeded",)]
        # A RESULT for no command of this device: NACK 25, and the session goes on.
        assert await deferToThread(device.result, 3, "nobody", False, {}) == (0x13, 3, 25, 0)
        kept = "SELECT reason FROM rejected_input WHERE device = 'truck-17'"
        for _ in range(500):
            if sql(kept):
                break
            await deferLater(reactor, 0.02, lambda: None)
        assert sql(kept) == [("unknown_command: no command 'nobody' for this device",)]
        # A command sent while connected comes at once.
        await service.commands.send("truck-17", parse_request({"name": "reboot", "id": "rb-1"}), "ops")
        assert (await deferToThread(device.command))[:3:2] == ("rb-1", "reboot")
    finally:
        await deferToThread(device.close)


@pytest_twisted.ensureDeferred
async def test_a_command_not_received_is_sent_again_and_version_1_and_2_devices_get_none(service, sql):
    token = add_pg_device(sql, "truck-17")
    old_token = add_pg_device(sql, "truck-2")
    port = service.device_ports[0].getHost().port
    await service.commands.send("truck-17", parse_request({"name": "reboot", "id": "again"}), "ops")
    await service.commands.send("truck-2", parse_request({"name": "reboot", "id": "old"}), "ops")
    old = SpecDevice(port, "truck-2", old_token, versions=b"\x01\x02")
    oldest = SpecDevice(port, "truck-1", add_pg_device(sql, "truck-1"), versions=b"\x01")
    await service.commands.send("truck-1", parse_request({"name": "reboot", "id": "oldest"}), "ops")
    first = SpecDevice(port, "truck-17", token)
    try:
        assert await deferToThread(old.handshake) == 2
        assert await deferToThread(oldest.handshake) == 1
        assert await deferToThread(first.handshake) == 3
        assert (await deferToThread(first.command))[0] == "again"
    finally:
        await deferToThread(first.sock.close)  # gone before RECEIVED
    second = SpecDevice(port, "truck-17", token)
    try:
        await deferToThread(second.handshake)
        assert (await deferToThread(second.command))[0] == "again"  # the same id again
        await deferToThread(second.received, "again")
        await state_of(sql, "again", "delivered")
        assert sql("SELECT attempts FROM commands WHERE id = 'again'") == [(2,)]
        # The version 1 and 2 devices still speak: a PING is answered by PONG (the next frame they get), and
        # their commands wait.
        for device in (old, oldest):
            await deferToThread(device.send, 0x20, struct.pack(">Q", 9))
            assert await deferToThread(device.receive) == (0x21, struct.pack(">Q", 9))
        assert sql("SELECT id, state FROM commands WHERE id IN ('old', 'oldest') ORDER BY id") == [
            ("old", "queued"),
            ("oldest", "queued"),
        ]
    finally:
        await deferToThread(second.close)
        await deferToThread(old.close)
        await deferToThread(oldest.close)
