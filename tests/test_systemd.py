"""systemd's notification protocol: READY=1, watchdog pings on the given clock, STOPPING=1, over a real socket."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.task import Clock

from gateway.ops.systemd import SystemdNotifier


@pytest.fixture
def listener(tmp_path):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    yield str(path), sock
    sock.close()


def received(sock) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_ready_then_watchdog_pings_every_half_period_then_stopping(listener):
    path, sock = listener
    clock = Clock()
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"}, clock)
    notifier.ready("accepting devices and requests")
    assert received(sock) == ["READY=1\nSTATUS=accepting devices and requests", "WATCHDOG=1"]
    clock.advance(4.9)
    assert received(sock) == []
    clock.advance(0.1)
    assert received(sock) == ["WATCHDOG=1"]
    notifier.stopping()
    clock.advance(60)
    assert received(sock) == ["STOPPING=1"]


def test_a_watchdog_meant_for_another_process_is_not_fed(listener):
    path, sock = listener
    clock = Clock()
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, clock)
    notifier.ready("up")
    clock.advance(30)
    assert received(sock) == ["READY=1\nSTATUS=up"]


def test_without_systemd_nothing_is_sent_and_nothing_fails():
    notifier = SystemdNotifier({}, Clock())
    notifier.ready("up")
    notifier.stopping()
    assert notifier.sent == []


def test_an_unreachable_socket_is_warned_about_not_raised(tmp_path):
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")}, Clock())
    notifier.ready("up")
    assert notifier.sent == []
