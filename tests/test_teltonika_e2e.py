"""
Teltonika trackers end to end: the real service and PostgreSQL on a
loopback --teltonika endpoint, and a tracker written here from Teltonika's
documentation (struct and the CRC; not the gateway's codec), sending
Teltonika's own example packet and packets of positions.
"""

from __future__ import annotations

import datetime
import socket
import struct

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from gateway.commands.model import parse_request
from tests.conftest import start_service
from tests.gatewayproc import gatewayctl
from tests.test_teltonika_codec import CODEC_8, GETINFO, GETINFO_ANSWER

IMEI = "356307042441013"
T0 = 1_795_341_600_000  # 2026-11-22T10:00:00Z, ms


def crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def packet(records: list[tuple[int, float, float, int]]) -> bytes:
    """A Codec 8 packet of (ms, lat, lon, satellites) records, each with IO 66 (external voltage) = 12600 mV."""
    body = b"".join(
        struct.pack(">qBiihHBH", ms, 0, round(lon * 1e7), round(lat * 1e7), 250, 90, sats, 42)
        + bytes([0, 1, 0, 1]) + bytes([66]) + struct.pack(">H", 12600) + bytes([0, 0])
        for ms, lat, lon, sats in records
    )  # fmt: skip
    data = bytes([8, len(records)]) + body + bytes([len(records)])
    return struct.pack(">II", 0, len(data)) + data + struct.pack(">I", crc16(data))


class Tracker:
    """A blocking tracker: IMEI, packets, and the server's four-byte answers."""

    def __init__(self, port: int, imei: str = IMEI) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock.sendall(struct.pack(">H", len(imei)) + imei.encode())

    def accepted(self) -> bytes:
        return self.sock.recv(1)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                break
            out += chunk
        return out

    def close(self) -> None:
        self.sock.close()


async def started(tmp_path, db_dsn):
    return await start_service(tmp_path, db_dsn, teltonika=["tcp:0:interface=127.0.0.1"])


def port_of(service) -> int:
    return service.listeners.ports("teltonika")[0].getHost().port


async def until(check, seconds: float = 30.0):
    for _ in range(int(seconds / 0.02)):
        if check():
            return
        await deferLater(reactor, 0.02, lambda: None)
    assert check(), "not in time"


@pytest_twisted.ensureDeferred
async def test_records_are_answered_after_commit_and_stored_once_by_the_trackers_model(tmp_path, db_dsn, sql):
    await deferToThread(gatewayctl, "device", "add", "truck-9", "--imei", IMEI, "--type", "fmb920", "--db", db_dsn)
    service = await started(tmp_path, db_dsn)
    tracker = None
    try:
        tracker = await deferToThread(Tracker, port_of(service))
        assert await deferToThread(tracker.accepted) == b"\x01"
        # Teltonika's own example: one record, IO 21=3, 1=1, 66=24079, 241=24602, 78=0, and no fix.
        await deferToThread(tracker.send, CODEC_8)
        assert await deferToThread(tracker.read, 4) == b"\x00\x00\x00\x01"
        # Answered: committed already.
        rows = sql("SELECT k.name, r.value, r.ts FROM readings r JOIN metrics k ON k.id = r.metric_id ORDER BY k.name")
        when = datetime.datetime(2019, 6, 10, 10, 4, 46, tzinfo=datetime.timezone.utc)
        assert [(name, value) for name, value, _ in rows] == [
            ("active_gsm_operator", 24602.0), ("digital_input_1", 1.0), ("external_voltage", 24.079),
            ("gsm_signal", 3.0), ("ibutton", 0.0),
        ]  # fmt: skip
        assert {ts for _, _, ts in rows} == {when}  # the record's own time; no position without a fix
        # Sent again (the answer lost): answered again, nothing stored twice.
        await deferToThread(tracker.send, CODEC_8)
        assert await deferToThread(tracker.read, 4) == b"\x00\x00\x00\x01"
        assert sql("SELECT count(*) FROM readings") == [(5,)]

        # Positions: stored when fixed, at each record's time; a record without a fix keeps its IO only.
        records = [(T0, 54.6872, 25.2797, 9), (T0 + 1000, 54.6873, 25.2799, 8), (T0 + 2000, 0.0, 0.0, 0)]
        # A packet with a wrong CRC first: not answered (the tracker sends it again), kept with the reason.
        bad = bytearray(packet(records[:1]))
        bad[-1] ^= 0xFF
        await deferToThread(tracker.send, bytes(bad) + packet(records))
        assert await deferToThread(tracker.read, 4) == b"\x00\x00\x00\x03"  # the good packet's answer, alone
        positions = sql(
            "SELECT k.name, count(*) FROM readings r JOIN metrics k ON k.id = r.metric_id "
            "WHERE r.ts >= '2026-11-22' GROUP BY k.name ORDER BY k.name"
        )
        assert positions == [
            ("alt", 2), ("external_voltage", 3), ("heading", 2), ("lat", 2), ("lon", 2), ("satellites", 2), ("speed", 2)
        ]  # fmt: skip
        assert sql("SELECT value FROM twin WHERE metric = 'lat'") == [(54.6873,)]
        await until(lambda: sql("SELECT count(*) FROM rejected_input WHERE device = 'truck-9'") == [(1,)])
        assert "CRC" in sql("SELECT reason FROM rejected_input")[0][0]
    finally:
        if tracker is not None:
            await deferToThread(tracker.close)
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_an_unknown_imei_is_refused_and_kept(tmp_path, db_dsn, sql):
    service = await started(tmp_path, db_dsn)
    tracker = None
    try:
        tracker = await deferToThread(Tracker, port_of(service), "356307042441099")
        assert await deferToThread(tracker.accepted) == b"\x00"
        assert await deferToThread(tracker.read, 1) == b""  # closed
        await until(lambda: sql("SELECT count(*) FROM rejected_input") == [(1,)])
        assert "unknown or revoked IMEI 356307042441099" in sql("SELECT reason FROM rejected_input")[0][0]
    finally:
        if tracker is not None:
            await deferToThread(tracker.close)
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_codec_12_command_and_the_trackers_answer(tmp_path, db_dsn, sql):
    await deferToThread(gatewayctl, "device", "add", "truck-9", "--imei", IMEI, "--db", db_dsn)
    service = await started(tmp_path, db_dsn)
    tracker = None
    try:
        await service.commands.send("truck-9", parse_request({"name": "getinfo", "id": "info-1"}), "ops")
        tracker = await deferToThread(Tracker, port_of(service))
        assert await deferToThread(tracker.accepted) == b"\x01"
        assert await deferToThread(tracker.read, len(GETINFO)) == GETINFO  # Teltonika's example, byte for byte
        await deferToThread(tracker.send, GETINFO_ANSWER)
        await until(lambda: sql("SELECT state FROM commands") == [("succeeded",)])
        (result,) = sql("SELECT result FROM commands")[0]
        assert result["response"].startswith("INI:2019/7/22 7:22 RTC:2019/7/22 7:53")
    finally:
        if tracker is not None:
            await deferToThread(tracker.close)
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_udp_datagrams_are_answered_after_commit_and_a_resent_one_stores_nothing_new(tmp_path, db_dsn, sql):
    from tests.test_teltonika_codec import UDP

    await deferToThread(gatewayctl, "device", "add", "van-3", "--imei", "352093086403655", "--db", db_dsn)
    service = await start_service(tmp_path, db_dsn, teltonika=["udp:0:interface=127.0.0.1"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(20)
    try:
        port = service.transport("teltonika").udp_ports()[0].getHost().port
        for _ in range(2):  # the second time as after a lost answer
            await deferToThread(sock.sendto, UDP, ("127.0.0.1", port))
            answer, _ = await deferToThread(sock.recvfrom, 64)
            assert answer == bytes.fromhex("0005CAFE010501")  # Teltonika's example answer
            assert sql("SELECT count(*) FROM readings") == [(3,)]  # committed before the answer, once
        # An unknown IMEI: no answer, the datagram kept with the reason.
        stranger = UDP.replace(b"352093086403655", b"352093086403699")
        await deferToThread(sock.sendto, stranger, ("127.0.0.1", port))
        await until(lambda: sql("SELECT count(*) FROM rejected_input") == [(1,)])
        assert "unknown or revoked IMEI 352093086403699" in sql("SELECT reason FROM rejected_input")[0][0]
    finally:
        sock.close()
        await service.stopService()


def test_allowed_networks_are_ranges_and_none_means_any():
    from gateway.net.ranges import allowed, network

    apn = [network("10.64.0.0/10"), network("2001:db8::/32")]
    assert allowed("10.64.1.2", apn) and allowed("10.127.255.255", apn) and allowed("2001:db8::7", apn)
    assert allowed("::ffff:10.64.1.2", apn)  # an IPv4 peer on a dual-stack socket
    assert not allowed("10.128.0.1", apn) and not allowed("192.0.2.1", apn) and not allowed("?", apn)
    assert allowed("192.0.2.1", [])


@pytest_twisted.ensureDeferred
async def test_a_tracker_outside_the_allowed_networks_is_refused_before_its_imei(tmp_path, db_dsn, sql):
    await deferToThread(gatewayctl, "device", "add", "truck-9", "--imei", IMEI, "--db", db_dsn)
    service = await start_service(
        tmp_path, db_dsn, teltonika=["tcp:0:interface=127.0.0.1"], tracker_allow=["10.64.0.0/10"]
    )
    tracker = None
    try:
        tracker = await deferToThread(Tracker, port_of(service))
        assert await deferToThread(tracker.accepted) == b""  # closed without an answer
        labels = {"transport": "teltonika", "reason": "not_allowed"}
        refused = lambda: service.metrics.registry.get_sample_value("gateway_inputs_rejected_total", labels)  # noqa: E731
        await until(lambda: (refused() or 0) >= 1)
    finally:
        if tracker is not None:
            await deferToThread(tracker.close)
        await service.stopService()


def test_the_impossible_jump_rule_holds_a_fix_no_vehicle_could_reach_and_believes_two_that_agree():
    from gateway.transports.trackers import Jumps, speed_kmh

    hour = 3_600_000_000
    assert speed_kmh((0, 54.0, 25.0), (hour, 55.0, 25.0)) == pytest.approx(111.2, abs=0.1)  # a degree of latitude
    jumps = Jumps(300)
    assert jumps.check("t", 0, 54.0, 25.0) is None
    assert jumps.check("t", hour, 55.0, 25.0) is None  # 111 km/h
    rule = jumps.check("t", hour + 60_000_000, -33.9, 151.2)  # Sydney a minute later
    assert rule is not None and rule.startswith("jump: ") and "more than 300" in rule
    assert jumps.check("t", hour + 120_000_000, 55.001, 25.0) is None  # back where it was: believed
    # Moved for real (a ferry without a fix on board): the second fix that agrees with the first is believed.
    assert jumps.check("t", 2 * hour, 59.3, 18.1) is not None
    assert jumps.check("t", 2 * hour + 60_000_000, 59.301, 18.1) is None
    assert Jumps(None).check("t", 0, 0.5, 0.5) is None  # off


@pytest_twisted.ensureDeferred
async def test_a_jump_is_kept_in_quarantine_and_its_record_is_answered(tmp_path, db_dsn, sql):
    await deferToThread(gatewayctl, "device", "add", "truck-9", "--imei", IMEI, "--db", db_dsn)
    service = await started(tmp_path, db_dsn)
    tracker = None
    try:
        tracker = await deferToThread(Tracker, port_of(service))
        assert await deferToThread(tracker.accepted) == b"\x01"
        records = [(T0, 54.6872, 25.2797, 9), (T0 + 1000, -33.8688, 151.2093, 9)]  # Vilnius, then Sydney
        await deferToThread(tracker.send, packet(records))
        assert await deferToThread(tracker.read, 4) == b"\x00\x00\x00\x02"
        assert sql("SELECT value FROM twin WHERE metric = 'lat'") == [(54.6872,)]
        held = sql("SELECT metric, rule FROM quarantine ORDER BY metric")
        assert [m for m, _ in held] == ["alt", "heading", "lat", "lon", "satellites", "speed"]
        assert all(rule.startswith("jump: ") for _, rule in held)
    finally:
        if tracker is not None:
            await deferToThread(tracker.close)
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_record_that_cannot_be_a_reading_is_kept_then_answered(tmp_path, db_dsn, sql):
    """A time past year 9999: kept in rejected_input with the reason before the answer (sent again, it would be
    refused again)."""
    await deferToThread(gatewayctl, "device", "add", "truck-9", "--imei", IMEI, "--db", db_dsn)
    service = await started(tmp_path, db_dsn)
    tracker = None
    try:
        tracker = await deferToThread(Tracker, port_of(service))
        assert await deferToThread(tracker.accepted) == b"\x01"
        await deferToThread(tracker.send, packet([(2**62, 54.6872, 25.2797, 9)]))
        assert await deferToThread(tracker.read, 4) == b"\x00\x00\x00\x01"
        assert sql("SELECT count(*) FROM readings") == [(0,)]
        assert sql("SELECT count(*) FROM rejected_input WHERE device = 'truck-9'") == [(1,)]  # kept before the answer
    finally:
        if tracker is not None:
            await deferToThread(tracker.close)
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_device_allowed_from_its_carriers_range_alone_refuses_its_imei_from_elsewhere(tmp_path, db_dsn, sql):
    """gatewayctl device set --allow: its IMEI from 127.0.0.1 is refused (00) and the refusal says why; from
    its range (127.0.0.0/8 here) it is accepted; another device without ranges is accepted from anywhere."""
    from tests.test_teltonika_codec import UDP

    await deferToThread(gatewayctl, "device", "add", "truck-9", "--imei", IMEI, "--allow", "10.64.0.0/10",
                        "--db", db_dsn)  # fmt: skip
    await deferToThread(gatewayctl, "device", "add", "van-3", "--imei", "352093086403655", "--allow", "10.0.0.0/8",
                        "--db", db_dsn)  # fmt: skip
    service = await start_service(
        tmp_path, db_dsn, teltonika=["tcp:0:interface=127.0.0.1", "udp:0:interface=127.0.0.1"]
    )
    trackers = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tracker = await deferToThread(Tracker, port_of(service))
        trackers.append(tracker)
        assert await deferToThread(tracker.accepted) == b"\x00"  # refused: not from its range
        await until(lambda: sql("SELECT count(*) FROM rejected_input WHERE reason LIKE '%may connect only%'") == [(1,)])
        assert sql("SELECT reason FROM rejected_input")[0][0] == (
            f"not_allowed: IMEI {IMEI} is truck-9's, which may connect only from 10.64.0.0/10 "
            "(gatewayctl device set --allow)"
        )
        # A datagram from outside van-3's range: not answered, and kept with the reason.
        udp_port = service.transport("teltonika").udp_ports()[0].getHost().port
        await deferToThread(sock.sendto, UDP, ("127.0.0.1", udp_port))
        await until(lambda: sql("SELECT count(*) FROM rejected_input WHERE reason LIKE '%van-3''s%'") == [(1,)])
        assert sql("SELECT count(*) FROM readings") == [(0,)]

        await deferToThread(gatewayctl, "device", "set", "truck-9", "--allow", "127.0.0.0/8", "--db", db_dsn)
        tracker = await deferToThread(Tracker, port_of(service))
        trackers.append(tracker)
        assert await deferToThread(tracker.accepted) == b"\x01"
        await deferToThread(gatewayctl, "device", "set", "truck-9", "--allow", "", "--db", db_dsn)
        tracker = await deferToThread(Tracker, port_of(service))
        trackers.append(tracker)
        assert await deferToThread(tracker.accepted) == b"\x01"
    finally:
        sock.close()
        for tracker in trackers:
            await deferToThread(tracker.close)
        await service.stopService()
