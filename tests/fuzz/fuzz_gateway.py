"""
Coverage-guided fuzzing of everything that parses bytes from the network or
the disk, with atheris (libFuzzer), for long runs outside the test suite::

    .venv/bin/pip install -e '.[fuzz]'
    .venv/bin/python tests/fuzz/fuzz_gateway.py tgp -max_total_time=600
    .venv/bin/python tests/fuzz/fuzz_gateway.py http -max_total_time=600 corpus/http/

Targets: ``tgp`` (the gateway's side of the device codec, fed in random
slices), ``json`` (the readings body parser), ``http`` (a whole HTTP
exchange through the real site and ingest path, MemoryStore behind it,
on task.Clock), ``journal`` (the journal segment reader). Each target may
only raise what it documents; anything else, a hang or a crash is a finding
(libFuzzer writes the input to ``crash-*``). Extra arguments go to libFuzzer.
"""

from __future__ import annotations

import sys

from protocols import tgp


def tgp_target(data: bytes) -> None:
    """Random bytes, handed over in random slices: only RemoteProtocolError may come out."""
    if not data:
        return
    conn = tgp.Connection(tgp.GATEWAY, max_frame=4096, max_metrics=64)
    step = data[0] % 16 + 1
    rest = data[1:]
    for i in range(0, len(rest), step):
        conn.receive_data(rest[i : i + step])
        try:
            while True:
                event = conn.next_event()
                if event is tgp.NEED_DATA or event is tgp.CONNECTION_CLOSED:
                    break
        except tgp.RemoteProtocolError:
            return


def json_target(data: bytes) -> None:
    from gateway.ingest.parse import parse_readings_json
    from gateway.readings import InvalidInput

    try:
        readings = parse_readings_json(data)
    except InvalidInput:
        return
    for metric, ts_us, value in readings:
        assert isinstance(metric, str) and isinstance(ts_us, int) and value == value


_SITE: list = []  # one site per process, as in the gateway; a new connection per input


def _site():
    if not _SITE:
        from twisted.internet.task import Clock

        from gateway.transports.http import ingest_site
        from gateway.ingest.core import Ingest
        from gateway.ops.metrics import GatewayMetrics
        from gateway.ingest.quality import QualityRules
        from gateway.storage.memory import MemoryStore

        store = MemoryStore()
        token = store.add_device("truck-1").encode()
        clock = Clock()
        site = ingest_site(
            Ingest(store, clock, GatewayMetrics(clock), quality=QualityRules(max_future=None, max_past=None)),
            store,
            clock=clock,
            max_body=4096,
            request_timeout=5,
        )
        _SITE.append((site, clock, token))
    return _SITE[0]


def http_target(data: bytes) -> None:
    """The bytes as what a client sends on one connection; the gateway must answer or close, never fail."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionDone

    site, clock, token = _site()
    channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 4000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 4000))
    channel.makeConnection(transport)
    # Let the fuzzer find valid tokens: 'TOKEN' in its input becomes the device's.
    channel.dataReceived(data.replace(b"TOKEN", token))
    clock.advance(10)  # every deadline passes
    assert transport.disconnecting or transport.value().startswith(b"HTTP/1.1 ") or not transport.value()
    channel.connectionLost(Failure(ConnectionDone()))
    assert not clock.getDelayedCalls() or all(c.getTime() > clock.seconds() + 5 for c in clock.getDelayedCalls())


def journal_target(data: bytes) -> None:
    from gateway.storage.journal import FILE_MAGIC, scan

    for last in (False, True):
        result = scan(FILE_MAGIC + data, last_write=last)
        accounted = sum(len(r) for _, r in result.damaged) + result.torn
        accounted += sum(len(r.payload) + 12 for r in result.records)
        assert accounted == len(data)


TARGETS = {"tgp": tgp_target, "json": json_target, "http": http_target, "journal": journal_target}


def main() -> None:
    import atheris

    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus dir]")
    target = TARGETS[sys.argv.pop(1)]
    # Twisted keeps log events in memory until logging begins; throw them away instead.
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([], redirectStandardIO=False)
    atheris.instrument_all()
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
