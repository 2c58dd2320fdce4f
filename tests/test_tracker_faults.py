"""
Trackers through ``twistd -n gateway`` when things go wrong: the gateway
killed with SIGKILL mid-stream, and the journal full while the database is
away. The trackers here behave as Teltonika's do: a record is deleted from
the tracker's memory only when the server's answer counts it; anything
unanswered is sent again, over a new connection (TCP) or as the same
datagram (UDP). They are written from Teltonika's documentation with struct
(tests.test_teltonika_e2e), not with the gateway's codec.
"""

from __future__ import annotations

import collections
import random
import socket
import struct
import threading
import time
from collections.abc import Callable


from tests.gatewayproc import GatewayProcess, gatewayctl
from tests.test_resilience import health, make_gateway, wait_until  # noqa: F401 (a fixture)
from tests.test_teltonika_e2e import T0, packet

TCP_IMEI = "356307042441013"
UDP_IMEI = "352093086403655"
PER_PACKET = 10
READINGS_PER_RECORD = 7  # lat, lon, alt, speed, heading, satellites, and IO 66


def datagram(packet_id: int, avl_id: int, imei: str, records: list[tuple[int, float, float, int]]) -> bytes:
    """Teltonika's UDP channel: length, packet id, 0x01, AVL packet id, IMEI, then the AVL data with no CRC."""
    avl = packet(records)[8:-4]  # the TCP packet without its preamble, length and CRC
    body = struct.pack(">HBBH", packet_id, 0x01, avl_id, len(imei)) + imei.encode() + avl
    return struct.pack(">H", len(body)) + body


class StreamingTracker(threading.Thread):
    """Makes a record a tenth of a second, sends them ten to a packet, and forgets only what the server counts."""

    def __init__(self, imei: str, port: Callable[[], int | None], udp: bool, first: int) -> None:
        super().__init__(daemon=True)
        self.imei, self.port, self.udp = imei, port, udp
        self.first = first  # the first record's number: its time is T0 + first seconds
        self.made = 0
        self.unanswered: collections.deque[tuple[int, float, float, int]] = collections.deque()
        self.answered = 0
        self.resent = 0  # sends that got no answer (the gateway gone, or not answering): sent again
        self.making = threading.Event()
        self.making.set()
        self.quit = threading.Event()
        self.lock = threading.Lock()

    def make(self) -> None:
        while self.making.is_set() and len(self.unanswered) < 5 * PER_PACKET:
            n = self.first + self.made
            self.unanswered.append((T0 + n * 1000, 54.6 + n * 1e-5, 25.28, 9))
            self.made += 1

    def run(self) -> None:
        sock: socket.socket | None = None
        packet_id = 0
        while not self.quit.is_set() and (self.making.is_set() or self.unanswered):
            self.make()
            records = list(self.unanswered)[:PER_PACKET]
            port = self.port()
            try:
                if port is None:
                    raise OSError("not listening yet")
                if self.udp:
                    packet_id = (packet_id + 1) % 0x10000
                    counted = self._send_datagram(packet_id, records, port)
                else:
                    if sock is None:
                        sock = self._sign_in(port)
                    sock.sendall(packet(records))
                    answer = _read(sock, 4)
                    if len(answer) < 4:
                        raise OSError("closed without an answer")
                    counted = struct.unpack(">I", answer)[0]
            except OSError:
                self.resent += 1
                if sock is not None:
                    sock.close()
                    sock = None
                time.sleep(0.2)
                continue
            assert counted <= len(records), (counted, records)
            with self.lock:
                for _ in range(counted):
                    self.unanswered.popleft()
                self.answered += counted
            time.sleep(0.1)
        if sock is not None:
            sock.close()

    def _sign_in(self, port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(struct.pack(">H", len(self.imei)) + self.imei.encode())
        if sock.recv(1) != b"\x01":
            sock.close()
            raise OSError("not accepted")
        return sock

    def _send_datagram(self, packet_id: int, records: list, port: int) -> int:
        """The same datagram until it is answered: the gateway stores it once however often it comes."""
        data = datagram(packet_id, packet_id % 256, self.imei, records)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            for _ in range(30):
                port = self.port() or port
                sock.sendto(data, ("127.0.0.1", port))
                try:
                    answer, _ = sock.recvfrom(64)
                except OSError:
                    self.resent += 1
                    continue
                length, answered_id, _, avl_id, count = struct.unpack(">HHBBB", answer)
                assert (length, answered_id, avl_id) == (5, packet_id, packet_id % 256), answer.hex()
                return count
        raise OSError("no answer")

    def finish(self, timeout: float) -> bool:
        """Stop making records; True once everything made is answered."""
        self.making.clear()
        self.join(timeout)
        return not self.is_alive() and not self.unanswered


def _read(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def stored(gw: GatewayProcess, *where: str) -> dict[str, collections.Counter]:
    """Per device, how often each record time has a latitude, and the device's count of readings."""
    rows = gatewayctl("export", "--format", "csv", *where, data_dir=gw.data_dir).stdout.splitlines()[1:]
    lats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    readings: collections.Counter = collections.Counter()
    for row in rows:
        device, metric, ts = row.split(",")[:3]
        readings[device] += 1
        if metric == "lat":
            lats[device][ts] += 1
    return {"lat": lats, "readings": readings}  # type: ignore[dict-item]


def test_kill_9_mid_stream_every_answered_record_is_stored_once(make_gateway, outage_db):  # noqa: F811
    """A TCP and a UDP tracker stream while the gateway is killed four times at random instants: every record
    they were answered for is stored, once; the rest are sent again and stored once too."""
    gw = make_gateway(
        "--db", outage_db.dsn, "--teltonika", "tcp:0:interface=127.0.0.1", "--teltonika", "udp:0:interface=127.0.0.1"
    )
    gw.start()
    gatewayctl("device", "add", "truck-9", "--imei", TCP_IMEI, "--db", outage_db.dsn)
    gatewayctl("device", "add", "van-3", "--imei", UDP_IMEI, "--db", outage_db.dsn)
    trackers = [
        StreamingTracker(TCP_IMEI, lambda: gw.teltonika_port, udp=False, first=0),
        StreamingTracker(UDP_IMEI, lambda: gw.teltonika_udp_port, udp=True, first=0),
    ]
    rng = random.Random(37)
    replayed: list[str] = []
    try:
        for t in trackers:
            t.start()
        for i in range(4):
            before = [t.answered for t in trackers]
            assert wait_until(lambda b=before: all(t.answered > n for t, n in zip(trackers, b)), 60), before
            if i == 2:  # once answered from the journal, the database away: replayed after the restart
                outage_db.stop()
                before = [t.answered for t in trackers]
                assert wait_until(lambda b=before: all(t.answered > n for t, n in zip(trackers, b)), 60), before
            time.sleep(rng.uniform(0.05, 1.0))
            gw.kill()
            gw.teltonika_port = gw.teltonika_udp_port = None
            if i == 2:
                outage_db.start()
            gw.start()
            if i == 2:
                replayed.append(gw.wait_for_line(r"journal: replayed .*readings stored", timeout=60).split("] ")[-1])
        for t in trackers:
            assert t.finish(120), (t.imei, len(t.unanswered))
    finally:
        for t in trackers:
            t.quit.set()
    got = stored(gw, "--db", outage_db.dsn)
    for t, name in zip(trackers, ("truck-9", "van-3")):
        assert t.made > 4 * PER_PACKET and t.answered == t.made
        assert len(got["lat"][name]) == t.made, (name, t.made, len(got["lat"][name]))  # every record
        assert set(got["lat"][name].values()) == {1}  # once
        assert got["readings"][name] == t.made * READINGS_PER_RECORD
    print(f"kill -9 four times mid-stream: {[t.made for t in trackers]} records made and stored once; "
          f"{[t.resent for t in trackers]} sends unanswered and sent again; {replayed}")  # fmt: skip


def test_a_full_journal_answers_nothing_and_the_records_sent_again_are_stored_once(make_gateway, outage_db):  # noqa: F811
    """The database away and the journal full: neither tracker gets an answer, so both keep their records;
    the database back, the journal replays and every record is stored once."""
    gw = make_gateway(
        "--db", outage_db.dsn, "--journal-max-bytes", "64K",
        "--teltonika", "tcp:0:interface=127.0.0.1", "--teltonika", "udp:0:interface=127.0.0.1",
    )  # fmt: skip
    gw.start()
    gatewayctl("device", "add", "truck-9", "--imei", TCP_IMEI, "--db", outage_db.dsn)
    gatewayctl("device", "add", "van-3", "--imei", UDP_IMEI, "--db", outage_db.dsn)
    tcp = StreamingTracker(TCP_IMEI, lambda: gw.teltonika_port, udp=False, first=0)
    udp = StreamingTracker(UDP_IMEI, lambda: gw.teltonika_udp_port, udp=True, first=0)
    try:
        # Both sign in and are answered while the database is up, so their IMEIs are known.
        for t in (tcp, udp):
            t.start()
        assert wait_until(lambda: tcp.answered and udp.answered, 30)
        outage_db.stop()
        gw.wait_for_line("journal|database connection")
        # Answered from the journal until it is full; then nothing more is answered.
        assert wait_until(lambda: health(gw)[1]["journal"]["ok"] is False, 60), health(gw)
        time.sleep(3)  # an answer already on its way when the journal filled has arrived
        stalled = [tcp.answered, udp.answered]
        time.sleep(3)
        assert [tcp.answered, udp.answered] == stalled  # no answer while it is full
        assert health(gw)[1]["journal"]["ok"] is False
        assert len(tcp.unanswered) and len(udp.unanswered)  # the trackers keep what was not answered
        outage_db.start()
        for t in (tcp, udp):
            assert t.finish(120), (t.imei, len(t.unanswered))
    finally:
        for t in (tcp, udp):
            t.quit.set()
    got = stored(gw, "--db", outage_db.dsn)
    for t, name in ((tcp, "truck-9"), (udp, "van-3")):
        assert len(got["lat"][name]) == t.made == t.answered
        assert set(got["lat"][name].values()) == {1}
        assert got["readings"][name] == t.made * READINGS_PER_RECORD
    print(f"journal full: answers stalled at {stalled} records, then {[tcp.made, udp.made]} stored once")
