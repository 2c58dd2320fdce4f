"""
GT06 trackers end to end: the real service and PostgreSQL on a loopback
--gt06 endpoint, and a tracker written here from Concox's protocol document
(struct and the CRC; not the gateway's codec).
"""

from __future__ import annotations

import calendar
import socket
import struct

import pytest_twisted
from twisted.internet.threads import deferToThread

from gateway.commands.model import parse_request
from tests.conftest import start_service
from tests.gatewayproc import gatewayctl
from tests.test_gt06_codec import LOGIN, LOGIN_ANSWER
from tests.test_teltonika_e2e import until

IMEI = "123456789012345"  # the terminal of Concox's login example


def crc_x25(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc ^ 0xFFFF


def frame(protocol: int, info: bytes, serial: int) -> bytes:
    body = bytes([1 + len(info) + 4, protocol]) + info + struct.pack(">H", serial)
    return b"\x78\x78" + body + struct.pack(">H", crc_x25(body)) + b"\r\n"


def location(serial: int, when: tuple, lat: float, lon: float, fixed: bool = True) -> bytes:
    flags = 90 | (0x1000 if fixed else 0) | 0x0400  # course 90, north, east
    info = bytes([when[0] - 2000, *when[1:]]) + bytes([0xC9])  # GPS info length 12, 9 satellites
    info += struct.pack(">IIBH", round(lat * 1_800_000), round(lon * 1_800_000), 55, flags) + bytes(8)
    return frame(0x12, info, serial)


class Tracker:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def packet(self) -> bytes:
        """The next whole packet the server sent (b"" when it closed)."""
        while True:
            if len(self.buffer) >= 3:
                total = 3 + self.buffer[2] + 2
                if len(self.buffer) >= total:
                    out, self.buffer = self.buffer[:total], self.buffer[total:]
                    return out
            chunk = self.sock.recv(4096)
            if not chunk:
                return b""
            self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def port_of(service) -> int:
    return service.listeners.ports("gt06")[0].getHost().port


@pytest_twisted.ensureDeferred
async def test_a_gt06_tracker_logs_in_and_its_positions_are_answered_after_commit(tmp_path, db_dsn, sql):
    await deferToThread(gatewayctl, "device", "add", "van-1", "--imei", IMEI, "--db", db_dsn)
    service = await start_service(tmp_path, db_dsn, gt06=["tcp:0:interface=127.0.0.1"])
    tracker = None
    try:
        tracker = await deferToThread(Tracker, port_of(service))
        await deferToThread(tracker.send, LOGIN)
        assert await deferToThread(tracker.packet) == LOGIN_ANSWER  # Concox's example answer
        when = (2026, 11, 22, 10, 0, 0)
        await deferToThread(tracker.send, location(2, when, 54.6872, 25.2797))
        answer = await deferToThread(tracker.packet)
        assert answer == frame(0x12, b"", 2)  # the protocol number and the serial
        rows = dict(sql("SELECT k.name, r.value FROM readings r JOIN metrics k ON k.id = r.metric_id"))
        assert rows["lat"] == 54.6872 and rows["lon"] == 25.2797 and rows["speed"] == 55 and rows["heading"] == 90
        assert sql("SELECT DISTINCT extract(epoch FROM ts)::bigint FROM readings") == [(calendar.timegm(when),)]
        # Without a fix: answered, no position stored. The same location again: stored once.
        await deferToThread(
            tracker.send, location(3, when, 0.0, 0.0, fixed=False) + location(4, when, 54.6872, 25.2797)
        )
        assert await deferToThread(tracker.packet) == frame(0x12, b"", 3)
        assert await deferToThread(tracker.packet) == frame(0x12, b"", 4)
        assert sql("SELECT count(*) FROM readings") == [(5,)]
        # Heartbeat (status 0x13): ACC on, charging, voltage 4, GSM 3.
        await deferToThread(tracker.send, frame(0x13, bytes([0x46, 4, 3, 0, 2]), 5))
        assert await deferToThread(tracker.packet) == frame(0x13, b"", 5)
        status = dict(sql("SELECT k.name, r.value FROM readings r JOIN metrics k ON k.id = r.metric_id "
                          "WHERE k.name IN ('ignition', 'charging', 'voltage_level', 'gsm_signal')"))  # fmt: skip
        assert status == {"ignition": 1.0, "charging": 1.0, "voltage_level": 4.0, "gsm_signal": 3.0}

        # An online command, answered by the tracker with its server flag.
        await service.commands.send(
            "van-1", parse_request({"name": "RELAY", "params": {"args": "1"}, "id": "r1"}), "ops"
        )
        command = await deferToThread(tracker.packet)
        assert command[3] == 0x80 and command[9 : 9 + command[4] - 4] == b"RELAY,1#"
        flag = command[5:9]
        text = b"RELAY:OK"
        await deferToThread(tracker.send, frame(0x15, bytes([4 + len(text)]) + flag + text + b"\x00\x02", 6))
        await until(lambda: sql("SELECT state, result FROM commands") == [("succeeded", {"response": "RELAY:OK"})])
    finally:
        if tracker is not None:
            await deferToThread(tracker.close)
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_an_unknown_gt06_tracker_gets_no_answer_and_is_kept(tmp_path, db_dsn, sql):
    service = await start_service(tmp_path, db_dsn, gt06=["tcp:0:interface=127.0.0.1"])
    tracker = None
    try:
        tracker = await deferToThread(Tracker, port_of(service))
        await deferToThread(tracker.send, LOGIN)
        assert await deferToThread(tracker.packet) == b""  # closed, unanswered
        await until(lambda: sql("SELECT count(*) FROM rejected_input") == [(1,)])
        assert "unknown or revoked IMEI 123456789012345" in sql("SELECT reason FROM rejected_input")[0][0]
    finally:
        if tracker is not None:
            await deferToThread(tracker.close)
        await service.stopService()
