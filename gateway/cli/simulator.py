"""
``gatewayctl simulate``: devices that behave like real ones, for trying a
gateway out and for load tests.

Theory of operation. Each simulated device makes readings at its share of
``--rate`` (or, with ``--rate 0``, as fast as the gateway acknowledges
them), keeps every reading until it is acknowledged, and sends them in
frames (TGP over TCP or TLS), requests (HTTPS) or messages (MQTT, over TCP
or TLS: ``sim_mqtt.py``) of ``--batch`` readings.
When a connection drops, whatever was in flight goes back to the front of
its queue and is sent again after a reconnect with exponential backoff and
jitter; the gateway reports those as duplicates. The readings a device
keeps are bounded (``MAX_BACKLOG``); past that the oldest are counted as
"dropped_by_simulator" (a real device's buffer overflowing), never silently.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

from gateway.reactor import Reactor
from gateway.backoff import Backoff
from gateway import tokens
from gateway.readings import format_ts
from gateway.net.tcp import no_delay
from gateway.cli.sim_commands import CommandRunner
from gateway.ops.tuning import tune_gc
from protocols import tgp

METRIC = "sim.temp"
MAX_BACKLOG = 100_000  # readings a simulated device keeps
BACKOFF_FIRST, BACKOFF_CAP = 0.2, 10.0
LATENCY_SAMPLES = 200_000


@dataclass
class Stats:
    acked: int = 0
    duplicates: int = 0
    conflicts: int = 0
    sent: int = 0
    reconnects: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, a bounded sample
    seen: int = 0
    connected: int = 0
    measure_from: float = 0.0  # clock time before which latencies are not sampled (warm-up)

    def latency(self, seconds: float, now: float) -> None:
        if now < self.measure_from:
            return
        self.seen += 1
        if len(self.latencies) < LATENCY_SAMPLES:
            self.latencies.append(seconds)
        else:  # reservoir sampling keeps the sample fair over a long run
            i = random.randrange(self.seen)
            if i < LATENCY_SAMPLES:
                self.latencies[i] = seconds

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


class SimDevice:
    """One device: its readings, its connection, its backoff."""

    def __init__(self, sim: Simulation, name: str, token: str) -> None:
        self.sim = sim
        self.name = name
        self.unreported: list[tuple[str, str, Any]] = []  # command results waiting for a connection
        self.token = token
        self.backlog: deque[tuple[str, int, float]] = deque()
        self.last_ts = 0
        self.backoff = Backoff(BACKOFF_FIRST, BACKOFF_CAP, "equal")
        self.client: Any = None
        self.stopped = False

    def report(self, id_: str, status: str, result: Any) -> None:
        """Report a command's result over this device's connection (or requests); kept until one is up."""
        client = self.client
        if client is not None and getattr(client, "ready", True) and hasattr(client, "send_result"):
            client.send_result(id_, status, result)
        else:
            self.unreported.append((id_, status, result))

    def report_waiting(self) -> None:
        waiting, self.unreported = self.unreported, []
        for item in waiting:
            self.report(*item)

    def make_readings(self, n: int) -> None:
        step = self.sim.step_us  # a tracker's records are timed in milliseconds (Teltonika) or seconds (GT06)
        now_us = int(self.sim.clock.seconds() * 1_000_000) // step * step
        for _ in range(n):
            self.last_ts = max(now_us, self.last_ts + step)
            self.backlog.append((METRIC, self.last_ts, round(random.uniform(60, 90), 3)))
        overflow = len(self.backlog) - MAX_BACKLOG
        for _ in range(max(0, overflow)):
            self.backlog.popleft()
            self.sim.stats.errors["dropped_by_simulator"] += 1
        if self.client is not None:
            self.client.pump()

    def take(self, n: int) -> list[tuple[str, int, float]]:
        if self.sim.rate == 0 and len(self.backlog) < n:
            self.make_readings(n - len(self.backlog))
        return [self.backlog.popleft() for _ in range(min(n, len(self.backlog)))]

    def give_back(self, readings: list[tuple[str, int, float]]) -> None:
        self.backlog.extendleft(reversed(readings))

    def connect(self) -> None:
        if self.stopped:
            return
        d = self.sim.connect(self)

        def failed(f: Any) -> None:
            self.sim.stats.errors[f"connect: {f.getErrorMessage()[:60]}"] += 1
            self.retry()

        d.addErrback(failed)

    def retry(self, delay: float | None = None) -> None:
        if self.stopped:
            return
        if delay is None:
            delay = self.backoff.failed()
        self.sim.stats.reconnects += 1
        self.sim.clock.callLater(delay, self.connect)


class TGPClient(protocol.Protocol):
    """The device end of TGP, around the same codec the gateway uses."""

    transport: Any  # set by makeConnection before any event; Twisted types it Optional

    def __init__(self, device: SimDevice) -> None:
        self.device = device
        self.sim = device.sim
        self.conn = tgp.Connection(tgp.DEVICE)
        self.in_flight: dict[int, tuple[list[tuple[str, int, float]], float]] = {}
        self.seq = 0
        self.window = 1
        self.ready = False
        self.retry_after: float | None = None
        self._last_sent = 0.0
        self._last_heard = 0.0
        self._idle_timeout = 0.0
        self._heartbeat: Any = None
        self._quiet_until = 0.0  # rate-limited: send nothing before then
        self.results: set[int] = set()  # seqs of RESULT frames not yet acknowledged

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.device.client = self
        self.transport.write(self.conn.send(tgp.Hello(self.device.name, tgp.VERSIONS, "txgateway-simulator")))

    def dataReceived(self, data: bytes) -> None:
        self._last_heard = self.sim.clock.seconds()
        self.conn.receive_data(data)
        while True:
            try:
                event = self.conn.next_event()
            except tgp.RemoteProtocolError as e:
                self.sim.stats.errors[f"protocol: {e.code.name}"] += 1
                self.transport.loseConnection()
                return
            if event is tgp.NEED_DATA or event is tgp.CONNECTION_CLOSED:
                return
            self.handle(event)

    def handle(self, event: object) -> None:
        stats = self.sim.stats
        if isinstance(event, tgp.Ack):
            readings, sent_at = self.in_flight.pop(event.seq, ([], 0.0))
            if event.seq in self.results:
                self.results.discard(event.seq)
                self.sim.commands.counts["recorded"] += 1
            if readings:
                stats.acked += len(readings)
                stats.duplicates += event.duplicates
                stats.conflicts += event.conflicts
                now = self.sim.clock.seconds()
                stats.latency(now - sent_at, now)
            self.device.backoff.succeeded()
            self.pump()
        elif isinstance(event, tgp.Nack):
            name = _code_name(event.code)
            readings, _ = self.in_flight.pop(event.seq, ([], 0.0))
            if event.code == tgp.ErrorCode.RATE_LIMITED:  # SPEC: send them again after retry_after_s
                stats.errors[name] += 1
                self.device.give_back(readings)
                self._quiet_until = self.sim.clock.seconds() + event.retry_after_s
                self.sim.clock.callLater(event.retry_after_s, self.pump)
                return
            if event.fatal or event.code == tgp.ErrorCode.RETRY_LATER:
                stats.errors[name] += 1
                if readings:
                    self.device.give_back(readings)
                if event.retry_after_s:
                    self.retry_after = float(event.retry_after_s)
            else:  # the gateway refused these readings for good
                stats.errors[name] += len(readings) or 1
            self.pump()
        elif isinstance(event, tgp.Challenge):
            proof = tokens.auth_proof(self.device.token, event.nonce, self.device.name)
            self.transport.write(self.conn.send(tgp.Auth(proof)))
        elif isinstance(event, tgp.Welcome):
            self.window = max(1, event.window)
            self._idle_timeout = float(event.idle_timeout_s or 120)
            self.seq = 1
            self.transport.write(self.conn.send(tgp.Declare(1, (tgp.Metric(1, tgp.ValueType.F64, METRIC),))))
            self.in_flight[1] = ([], self.sim.clock.seconds())
            self.ready = True
            self.device.report_waiting()
            self.sim.stats.connected += 1
            if event.heartbeat_s:
                self._heartbeat = task.LoopingCall(self.ping)
                self._heartbeat.clock = self.sim.clock
                self._heartbeat.start(event.heartbeat_s, now=False)
            self.pump()
        elif isinstance(event, tgp.Ping):
            self.transport.write(self.conn.send(tgp.Pong(event.payload)))
        elif isinstance(event, tgp.Command):
            self.transport.write(self.conn.send(tgp.Received(event.id)))
            params = _json(event.params)
            report = lambda status, result: self.device.report(event.id, status, result)  # noqa: E731
            self.sim.commands.receive(self.device.name, event.id, event.name, params, report)
        elif isinstance(event, (tgp.Reject, tgp.Bye)):
            stats.errors[_code_name(event.code)] += 1
            if event.code in (tgp.ErrorCode.RETRY_LATER, tgp.ErrorCode.SHUTTING_DOWN):
                self.retry_after = 1.0
            elif event.code == tgp.ErrorCode.AUTH_FAILED:
                self.retry_after = BACKOFF_CAP
            self.transport.loseConnection()

    def send_result(self, id_: str, status: str, result: Any) -> None:
        """A command's result, as a numbered RESULT frame (acknowledged like DATA)."""
        self.seq += 1
        self.in_flight[self.seq] = ([], self.sim.clock.seconds())
        self.results.add(self.seq)
        code = tgp.CommandStatus.SUCCEEDED if status == "succeeded" else tgp.CommandStatus.FAILED
        self.transport.write(self.conn.send(tgp.Result(self.seq, id_, code, json.dumps(result))))

    def ping(self) -> None:
        now = self.sim.clock.seconds()
        if self.ready and now - self._last_heard > self._idle_timeout:
            # SPEC: silence for idle_timeout_s means the connection is dead; reconnect and resend.
            self.sim.stats.errors["gateway silent"] += 1
            self.transport.abortConnection()
        elif self.ready and now - self._last_sent >= 1:
            self.transport.write(self.conn.send(tgp.Ping(0)))

    def pump(self) -> None:
        """Send frames while the window has room and readings wait."""
        if not self.ready or self.sim.clock.seconds() < self._quiet_until:
            return
        while len(self.in_flight) < self.window and (self.device.backlog or self.sim.rate == 0):
            if self.sim.stopping:
                return
            readings = self.device.take(self.sim.batch)
            if not readings:
                return
            self.seq += 1
            now = self.sim.clock.seconds()
            self.in_flight[self.seq] = (readings, now)
            self._last_sent = now
            self.sim.stats.sent += len(readings)
            self.transport.write(self.conn.send(tgp.Data(self.seq, tuple(readings))))

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        if self.ready:
            self.sim.stats.connected -= 1
        self.ready = False
        self.device.client = None
        for seq in sorted(self.in_flight, reverse=True):
            readings, _ = self.in_flight[seq]
            self.device.give_back(readings)
        self.in_flight.clear()
        self.device.retry(self.retry_after)


def _code_name(code: int) -> str:
    try:
        return tgp.ErrorCode(code).name
    except ValueError:
        return f"code {code}"


class HTTPSDevice:
    """A device posting JSON to /v1/readings, one request at a time."""

    def __init__(self, device: SimDevice) -> None:
        self.device = device
        self.sim = device.sim
        self.busy = False

    def pump(self) -> None:
        if self.busy or self.sim.stopping:
            return
        readings = self.device.take(self.sim.batch)
        if not readings:
            return
        self.busy = True
        self.sim.stats.sent += len(readings)
        body = readings_body(readings)
        started = self.sim.clock.seconds()
        d = self.sim.http.post(
            self.sim.url,
            data=body,
            headers={"Authorization": [f"Bearer {self.device.token}"], "Content-Type": ["application/json"]},
        )

        async def answered(response: Any) -> None:
            content = await response.content()
            stats = self.sim.stats
            if response.code == 200:
                result = json.loads(content)
                for command in result.get("commands", ()):
                    report = lambda status, outcome, i=command["id"]: self.send_result(i, status, outcome)  # noqa: E731
                    self.sim.commands.receive(
                        self.device.name, command["id"], command["name"], command["params"], report
                    )
                stats.acked += len(readings)
                stats.duplicates += result["duplicates"]
                stats.conflicts += result.get("conflicts", 0)
                now = self.sim.clock.seconds()
                stats.latency(now - started, now)
                self.busy = False
                self.pump()
                return
            try:
                code = json.loads(content)["error"]
            except (ValueError, KeyError, TypeError):
                code = f"http {response.code}"
            if response.code in (503, 429) or response.code >= 500:
                stats.errors[code] += 1
                self.device.give_back(readings)
                retry = float(response.headers.getRawHeaders(b"retry-after", [b"1"])[0])
                self.sim.clock.callLater(retry, self._again)
            else:
                stats.errors[code] += len(readings)
                self.busy = False
                self.pump()

        def failed(f: Any) -> None:
            self.sim.stats.errors[f"connection: {f.type.__name__}"] += 1
            self.device.give_back(readings)
            delay = self.device.backoff.failed()
            self.sim.clock.callLater(delay, self._again)

        d.addCallback(lambda r: defer.Deferred.fromCoroutine(answered(r)))
        d.addErrback(failed)

    def _again(self) -> None:
        self.busy = False
        self.pump()

    def send_result(self, id_: str, status: str, result: Any) -> None:
        """POST /v1/commands/{id}/result; sent again a second later until the gateway answers."""
        url = self.sim.url.replace(b"/v1/readings", f"/v1/commands/{id_}/result".encode())
        body = json.dumps({"status": status, "result": result}).encode()
        headers = {"Authorization": [f"Bearer {self.device.token}"], "Content-Type": ["application/json"]}
        d = self.sim.http.post(url, data=body, headers=headers)

        def answered(response: Any) -> Any:
            if response.code >= 500 or response.code == 429:
                self.sim.clock.callLater(1.0, self.send_result, id_, status, result)
            elif response.code == 200:
                self.sim.commands.counts["recorded"] += 1
            return response.content()

        def failed(f: Any) -> None:
            if not self.sim.stopping:
                self.sim.clock.callLater(1.0, self.send_result, id_, status, result)

        d.addCallbacks(answered, failed)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return {}


def _connected(client: Any) -> bool:
    """A device on a connection of its own (TGP or MQTT), rather than HTTPS requests."""
    return isinstance(client, (protocol.Protocol, protocol.DatagramProtocol))


def readings_body(readings: list[tuple[str, int, float]]) -> bytes:
    """
    The HTTPS JSON body of (metric, ts, value) readings, as ``json.dumps`` would make it for names and finite
    floats, in a third of the time: the simulator shares the machine with the gateway it measures.
    """
    items = ",".join(f'{{"metric":"{m}","ts":"{format_ts(ts)}","value":{float(v)!r}}}' for m, ts, v in readings)
    return f'{{"readings":[{items}]}}'.encode()


class Simulation:
    def __init__(self, reactor: Reactor, args: Any, devices: list[tuple[str, str]], trust: Any) -> None:
        self.reactor = reactor
        self.clock = reactor
        self.args = args
        self.rate = args.rate
        self.batch = args.batch
        self.stats = Stats()
        self.commands = CommandRunner(reactor, getattr(args, "command_delay", 1.0))
        self.step_us = {"teltonika": 1000, "teltonika-udp": 1000, "gt06": 1_000_000}.get(args.protocol, 1)
        self.stopping = False
        host, _, port = args.target.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.trust = trust
        self.devices = [SimDevice(self, name, token) for name, token in devices]
        self.url = f"https://{self.host}:{self.port}/v1/readings".encode()
        self.http: Any = None
        self.pool: Any = None

    def connect(self, device: SimDevice) -> defer.Deferred:
        endpoint: Any = TCP4ClientEndpoint(self.reactor, self.host, self.port, timeout=10)
        if self.args.protocol in ("tls", "mqtts"):
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = wrapClientTLS(optionsForClientTLS(self.args.tls_name or self.host, self.trust), endpoint)
        if self.args.protocol in ("mqtt", "mqtts"):
            from gateway.cli.sim_mqtt import MQTTClient

            return endpoint.connect(protocol.Factory.forProtocol(lambda: MQTTClient(device)))
        if self.args.protocol == "teltonika-udp":
            from gateway.cli.sim_trackers import TeltonikaUdpTracker

            def listen(address: str) -> None:  # a UDP socket is connected to an address, not a name
                self.reactor.listenUDP(0, TeltonikaUdpTracker(device, address), "", 2048)

            return self.reactor.resolve(self.host).addCallback(listen)
        if self.args.protocol in ("teltonika", "gt06"):
            from gateway.cli.sim_trackers import Gt06Tracker, TeltonikaTracker

            tracker = TeltonikaTracker if self.args.protocol == "teltonika" else Gt06Tracker
            return endpoint.connect(protocol.Factory.forProtocol(lambda: tracker(device)))
        return endpoint.connect(protocol.Factory.forProtocol(lambda: TGPClient(device)))

    def start(self) -> None:
        if self.args.protocol == "https":
            import treq
            from twisted.internet.ssl import optionsForClientTLS
            from twisted.web.client import Agent, HTTPConnectionPool
            from twisted.web.iweb import IPolicyForHTTPS
            from zope.interface import implementer

            trust, name = self.trust, self.args.tls_name or self.host

            @implementer(IPolicyForHTTPS)
            class Policy:
                def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
                    return optionsForClientTLS(name, trust)

            self.pool = HTTPConnectionPool(self.reactor, persistent=True)
            self.pool.maxPersistentPerHost = len(self.devices) + 1
            self.http = treq.client.HTTPClient(Agent(self.reactor, contextFactory=Policy(), pool=self.pool))
            for device in self.devices:
                device.client = HTTPSDevice(device)
                if self.rate == 0:
                    device.client.pump()
        else:
            # Spread the connects (500 a second) so thousands of devices do not arrive at
            # once, as a fleet coming back after an outage does not either.
            for i, device in enumerate(self.devices):
                self.clock.callLater(i / 500, device.connect)
        if self.rate > 0:
            self._start_producing()

    def _start_producing(self) -> None:
        """
        Each device makes readings at its share of the rate and sends a frame
        when it has a batch (or a second's worth, if that is less). Devices
        start at random points of their cycle, as a real fleet would, rather
        than all sending on the same tick.
        """
        per_device = self.rate / len(self.devices)
        threshold = max(1, min(self.batch, int(per_device)))
        tick = max(0.01, min(1.0, len(self.devices) / 100_000))
        carry = [random.uniform(0, threshold) for _ in self.devices]

        def produce() -> None:
            for i, device in enumerate(self.devices):
                carry[i] += per_device * tick
                if carry[i] >= threshold:
                    # Whole batches only: the fraction left over waits for the next, rather than going
                    # out as a message of one reading behind every full one.
                    n = int(carry[i] // threshold) * threshold
                    carry[i] -= n
                    device.make_readings(n)

        self._producer = task.LoopingCall(produce)
        self._producer.clock = self.clock
        self._producer.start(tick, now=False)

    def stop(self) -> None:
        self.stopping = True
        for device in self.devices:
            device.stopped = True


def summary(sim: Simulation, elapsed: float) -> dict[str, Any]:
    s = sim.stats
    return {
        "protocol": sim.args.protocol,
        "devices": len(sim.devices),
        "batch": sim.batch,
        "target_rate": sim.rate,
        "duration": round(elapsed, 3),
        "acked": s.acked,
        "duplicates": s.duplicates,
        "conflicts": s.conflicts,
        "rate": round(s.acked / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(s.percentile(50), 3),
        "p95_ms": round(s.percentile(95), 3),
        "p99_ms": round(s.percentile(99), 3),
        "latency_samples": len(s.latencies),
        "errors": dict(s.errors),
        "reconnects": s.reconnects,
        "commands": dict(sim.commands.counts),
        "unacked": sum(len(d.backlog) for d in sim.devices)
        + sum(sum(len(r) for r, _ in d.client.in_flight.values()) for d in sim.devices if _connected(d.client)),
    }


def run(reactor: Reactor, args: Any, devices: list[tuple[str, str]], trust: Any) -> defer.Deferred:
    tune_gc()  # the load generator's own pauses would show as ack latency
    sim = Simulation(reactor, args, devices, trust)
    started = time.monotonic()
    # Connecting, authenticating and the first backlog are not the steady
    # state: ack latencies are sampled after the first fifth of the run.
    sim.stats.measure_from = reactor.seconds() + min(2.0, args.duration / 5)
    sim.start()
    progress = None
    if not args.quiet:

        def show() -> None:
            s = sim.stats
            elapsed = time.monotonic() - started
            sys.stderr.write(
                f"\r{elapsed:6.1f}s  acked {s.acked:,}  {s.acked / max(elapsed, 1e-9):,.0f}/s  "
                f"p50 {s.percentile(50):.1f} ms  p99 {s.percentile(99):.1f} ms  "
                f"errors {sum(s.errors.values())}  connected {s.connected}/{len(sim.devices)}   "
            )
            sys.stderr.flush()

        progress = task.LoopingCall(show)
        progress.clock = reactor
        progress.start(1.0, now=False)

    done: defer.Deferred = defer.Deferred()

    def finish() -> None:
        elapsed = time.monotonic() - started
        sim.stop()
        if progress is not None:
            progress.stop()
            sys.stderr.write("\n")
        result = summary(sim, elapsed)
        for device in sim.devices:
            client = device.client
            if _connected(client) and client.transport is not None:
                client.transport.loseConnection()
        if sim.pool is not None:
            sim.pool.closeCachedConnections()
        reactor.callLater(0.2, done.callback, result)

    ending = reactor.callLater(args.duration, finish)
    wanted = getattr(args, "commands", None)
    if wanted:  # done once that many command results are recorded by the gateway (--duration: at most)

        def enough() -> None:
            if sim.commands.counts["recorded"] >= wanted and ending.active():
                ending.cancel()
                watch.stop()
                finish()

        watch = task.LoopingCall(enough)
        watch.clock = reactor
        watch.start(0.1, now=False)

        def unwatched(result: Any) -> Any:
            if watch.running:
                watch.stop()
            return result

        done.addBoth(unwatched)
    return done
