"""
Devices for the resilience tests: plain blocking clients in threads that
behave as the SPEC and the documentation tell firmware to — keep every reading
until it is acknowledged, send again what was not — and keep a record of
every acknowledgement they received, to check against the database.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable

from gateway import tokens
from protocols import tgp
from tests.tgp_helpers import drain

BASE_US = 1_795_341_600_000_000


class Device(threading.Thread):
    """Makes readings ``per_send`` at a time with rising timestamps; ``acked`` holds their ts_us once acknowledged."""

    def __init__(self, name: str, token: str, port: Callable[[], int | None], per_send: int = 20) -> None:
        super().__init__(daemon=True, name=name)
        self.device = name
        self.token = token
        self.port = port  # asked again at every reconnect: a restarted gateway listens elsewhere
        self.per_send = per_send
        self.next_ts = BASE_US
        self.backlog: list[int] = []
        self.acked: set[int] = set()
        self.ack_events = 0
        self.sent_ts: set[int] = set()
        self.errors: dict[str, int] = {}
        self.stopping = threading.Event()
        self._ack_times: list[tuple[float, int]] = []

    def take(self) -> list[int]:
        while len(self.backlog) < self.per_send:
            self.backlog.append(self.next_ts)
            self.next_ts += 1000
        batch, self.backlog = self.backlog[: self.per_send], self.backlog[self.per_send :]
        self.sent_ts.update(batch)
        return batch

    def give_back(self, batch: list[int]) -> None:
        self.backlog[:0] = batch

    def got_ack(self, batch: list[int]) -> None:
        self.acked.update(batch)
        self.ack_events += 1
        self._ack_times.append((time.monotonic(), len(batch)))

    def acked_between(self, start: float, end: float = float("inf")) -> int:
        """Readings acknowledged between two time.monotonic() instants."""
        return sum(n for at, n in self._ack_times if start <= at < end)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


class HTTPSDevice(Device):
    def __init__(self, name, token, port, cafile: str, **kw) -> None:
        super().__init__(name, token, port, **kw)
        self.context = ssl.create_default_context(cafile=cafile)
        self.context.check_hostname = False

    def run(self) -> None:
        while not self.stopping.is_set():
            port = self.port()
            batch = self.take()
            body = json.dumps(
                {"readings": [{"metric": "oil_temp", "ts": ts // 1000, "value": ts % 997} for ts in batch]}
            )
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=self.context, timeout=15)
                conn.request(
                    "POST",
                    "/v1/readings",
                    body=body,
                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
                )
                response = conn.getresponse()
                answer = json.loads(response.read() or b"{}")
                conn.close()
            except (OSError, http.client.HTTPException, ValueError) as e:
                self.give_back(batch)
                self.error(type(e).__name__)
                time.sleep(0.1)
                continue
            if response.status == 200:
                self.got_ack(batch)
            else:
                self.give_back(batch)
                self.error(f"{response.status} {answer.get('error')}")
                time.sleep(min(0.5, float(response.getheader("retry-after") or 0.1)))


class TGPDevice(Device):
    """TGP with readings' ts in milliseconds steps; a window of 4 frames in flight."""

    window = 4

    def __init__(self, name, token, port, cafile: str | None = None, **kw) -> None:
        super().__init__(name, token, port, **kw)
        self.context = None
        if cafile:
            self.context = ssl.create_default_context(cafile=cafile)
            self.context.check_hostname = False
        self.told: list[str] = []  # codes of the BYEs and fatal NACKs the gateway sent

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.session()
            except (OSError, tgp.ProtocolError, AssertionError) as e:
                self.error(type(e).__name__)
            time.sleep(0.1)

    def session(self) -> None:
        port = self.port()
        if port is None:
            return
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        if self.context is not None:
            sock = self.context.wrap_socket(sock)
        conn = tgp.Connection(tgp.DEVICE)
        in_flight: dict[int, list[int]] = {}
        try:
            events = self._handshake(sock, conn)
            seq = 1
            while True:
                while len(in_flight) < self.window and not self.stopping.is_set():
                    seq += 1
                    batch = self.take()
                    in_flight[seq] = batch
                    readings = tuple(("oil_temp", ts, float(ts % 997)) for ts in batch)
                    sock.sendall(conn.send(tgp.Data(seq, readings)))
                if not in_flight:
                    sock.sendall(conn.send(tgp.Bye(tgp.ErrorCode.NORMAL, "done")))
                    return
                for event in events() or []:
                    if isinstance(event, tgp.Ack):
                        self.got_ack(in_flight.pop(event.seq))
                    elif isinstance(event, tgp.Nack):
                        self.give_back(in_flight.pop(event.seq, []))
                        self.error(tgp.ErrorCode(event.code).name)
                        if event.fatal:
                            self.told.append(tgp.ErrorCode(event.code).name)
                        if event.code == tgp.ErrorCode.RATE_LIMITED:
                            time.sleep(event.retry_after_s)
                        if event.fatal or event.code == tgp.ErrorCode.RETRY_LATER:
                            return
                    elif isinstance(event, tgp.Bye):
                        self.told.append(tgp.ErrorCode(event.code).name)
                        return
        finally:
            for seq in sorted(in_flight, reverse=True):
                self.give_back(in_flight[seq])
            sock.close()

    def _handshake(self, sock, conn) -> Callable[[], list]:
        def events() -> list:
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError("closed by the gateway")
            conn.receive_data(data)
            return drain(conn)

        sock.sendall(conn.send(tgp.Hello(self.device)))
        got = events()
        while not got:
            got = events()
        if not isinstance(got[0], tgp.Challenge):
            raise AssertionError(f"no challenge: {got}")
        sock.sendall(conn.send(tgp.Auth(tokens.auth_proof(self.token, got[0].nonce, self.device))))
        got = events()
        while not got:
            got = events()
        if not isinstance(got[0], tgp.Welcome):
            raise AssertionError(f"no welcome: {got}")
        sock.sendall(conn.send(tgp.Declare(1, (tgp.Metric(1, tgp.ValueType.F64, "oil_temp"),))))
        got = events()
        while not got:
            got = events()
        assert got[0] == tgp.Ack(1), got
        return events


def stored(data_dir, devices: list[Device], db: str | None = None) -> dict[str, list[int]]:
    """Each device's stored ts_us, duplicates kept, as ``gatewayctl export`` gives them."""
    from gateway.readings import parse_rfc3339
    from tests.gatewayproc import gatewayctl

    out: dict[str, list[int]] = {d.device: [] for d in devices}
    for line in gatewayctl("export", *(["--db", db] if db else []), data_dir=data_dir).stdout.splitlines():
        row = json.loads(line)
        if row["device"] in out:
            out[row["device"]].append(parse_rfc3339(row["ts"]))
    return out


def check_nothing_lost(data_dir, devices: list[Device], db: str | None = None) -> dict[str, int]:
    """Every acknowledged reading stored exactly once; nothing stored that was never sent. Returns counts."""
    found = stored(data_dir, devices, db)
    acked = 0
    for d in devices:
        rows = found[d.device]
        assert len(rows) == len(set(rows)), f"{d.device}: duplicates stored"
        missing = d.acked - set(rows)
        assert not missing, f"{d.device}: {len(missing)} acknowledged readings missing, e.g. {sorted(missing)[:3]}"
        assert set(rows) <= d.sent_ts, f"{d.device}: stored readings that were never sent"
        acked += len(d.acked)
    return {"acked": acked, "stored": sum(len(r) for r in found.values())}
