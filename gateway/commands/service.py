"""
The commands service of one gateway: it LISTENs for the ledger's notices,
sends each device's commands over the downlink that device has here, and
finishes what the devices answer (see the package's theory of operation).

A downlink is whatever a transport gives for a device that can take
commands now: an object providing ``IDownlink``. A transport ``attach``es
it when the device can take commands (subscribed to its command topic,
signed in with a protocol version that has them, polled by this gateway)
and ``detach``es it when the device goes; the service then sends the
device's waiting commands, oldest first, as many as the downlink has room
for, and the rest as room comes back (``flush``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from gateway.commands.desired import NAME as DESIRED, Twin
from gateway.commands.ledger import Ledger
from gateway.commands.model import FINAL, Command, CommandError, Request
from gateway.reactor import Reactor
from gateway.storage.pool import PgPool, first_line

log = Logger()

CHANNEL = "gateway_commands"
TICK = 5.0  # seconds between looks for expired commands and sends due again
PURGE_EVERY = 720  # ticks (an hour) between deletions of finished commands past retention
MAX_WAIT = 60.0  # seconds a caller may wait for a command to finish
CONSOLE_ROWS = 50  # commands not finished the console lists
BACK = -1.0  # flush's resend for a device back on line: what was sent before its downlink came


class IDownlink(Interface):
    """How a command reaches one device now, over one transport."""

    transport = Attribute("The transport's name, as the ledger records it ('mqtt', 'tgp', …).")

    def room() -> int:
        """How many more commands it takes now (0: wait until it acknowledges some)."""

    def deliver(command: Command) -> None:
        """Send it. The transport reports the device's answers: ``Commands.delivered`` and ``finished``."""


class Commands(Service):
    def __init__(
        self,
        reactor: Reactor,
        gateway_id: Callable[[], str],
        config: Any = None,
        observers: Sequence[Callable[..., None]] = (),
    ) -> None:
        self.reactor = reactor
        self.gateway_id = gateway_id
        self.resend = config.command_resend if config is not None else 30.0
        self.retention = config.command_retention if config is not None else 30 * 86400.0
        # Told when a command ends expired or succeeded: observer(device_id, device, name, id, state, at_us)
        # (the edge alerts' command rules).
        self.observers = list(observers)
        self.pool = PgPool(reactor, 2)
        self.ledger = Ledger(self.pool.run)
        self.twin = Twin(self.pool.run)
        self.listener = PgPool(reactor, 1)
        self.listener.on_connect = self._listen
        self.downlinks: dict[str, Any] = {}  # device -> its downlink on this gateway
        self._attached: dict[str, float] = {}  # device -> when its downlink came back (attach with back)
        self.waiting: set[str] = set()  # devices with commands to send (a hint: the ledger decides)
        self._flushing: dict[str, list[Any]] = {}  # device -> [resend, waiters] of a flush to do after this one
        self._waiters: dict[str, list[Deferred]] = {}
        self.sent: Counter[str] = Counter()  # by transport, resends included
        self.results: Counter[tuple[str, str]] = Counter()  # (transport, state)
        self.counts: list[tuple[str, str, int, int]] = []  # (state, transport, commands, past half their expiry)
        self.pending: list[Command] = []  # the oldest commands not finished, as of the last tick (the console)
        self._ticks = 0
        self._loop = LoopingCall(self.tick)
        self._loop.clock = reactor

    def reconfigure(self, config: Any) -> None:
        self.resend, self.retention = config.command_resend, config.command_retention

    # -- start and stop ------------------------------------------------

    async def start(self, dsn: str) -> None:
        await self.pool.start(dsn)
        await self.listener.start(dsn)
        self._loop.start(TICK, now=True).addErrback(lambda f: log.failure("command ticks stopped", f))

    async def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        for waiters in self._waiters.values():
            for d in waiters:
                if not d.called:
                    d.callback(None)
        await self.listener.close()
        await self.pool.close()

    def _listen(self, conn: Any) -> Deferred:
        conn.addNotifyObserver(self._notified)
        d = conn.runOperation(f"LISTEN {CHANNEL}")
        # Notices sent while no connection listened are lost: look at the ledger now.
        d.addCallback(lambda _: self.reactor.callLater(0, self.tick))
        return d

    def _notified(self, notify: Any) -> None:
        if notify.channel != CHANNEL:
            return
        parts = notify.payload.split(" ")
        if len(parts) != 3:
            return
        state, device, id_ = parts
        if state == "queued":
            self.waiting.add(device)
            if device in self.downlinks:
                self.flush(device)
        if state in FINAL:
            for d in self._waiters.pop(id_, []):
                if not d.called:
                    d.callback(None)

    def tick(self) -> Deferred:
        """Expire what is past its expiry, send again what is due, count; every hour, purge."""
        return Deferred.fromCoroutine(self._tick()).addErrback(
            lambda f: log.warn("commands not checked: {error}", error=first_line(f.value))
        )

    async def _tick(self) -> None:
        self._ticks += 1
        for id_, device, name, device_id, at_us, transport in await self.ledger.expire():
            log.info("command {id} ({name}) to {device} expired", id=id_, name=name, device=device)
            self.results[(transport, "expired")] += 1
            self._tell(device_id, device, name, id_, "expired", at_us)
        self.waiting = await self.ledger.waiting_devices()
        for device in sorted(self.waiting & set(self.downlinks)):
            self.flush(device)
        self.counts = await self.ledger.counts()
        self.pending = await self.ledger.waiting(CONSOLE_ROWS)
        if self._ticks % PURGE_EVERY == 1:
            purged = await self.ledger.purge(self.retention)
            if purged:
                log.info("deleted {n} finished commands past --command-retention", n=purged)

    # -- downlinks -----------------------------------------------------

    def attach(self, device: str, downlink: Any, back: bool = True) -> None:
        """``device`` takes commands over ``downlink`` now: send it what waits, and (``back``: a device back on
        line) what was sent to it before and not acknowledged, whenever that was."""
        self.downlinks[device] = downlink
        if not back:
            self.flush(device)
            return
        self._attached[device] = self.reactor.seconds()
        # A desired delta it acknowledged without a matching report goes again too.
        d = self.twin.again(device)
        d.addErrback(lambda f: log.warn("desired of {device} not looked at: {e}", device=device, e=f.value))
        d.addCallback(lambda _: self.flush(device, resend=BACK))

    def detach(self, device: str, downlink: Any) -> None:
        if self.downlinks.get(device) is downlink:
            del self.downlinks[device]
            self._attached.pop(device, None)

    def flush(self, device: str, resend: float | None = None) -> Deferred:
        """Send ``device``'s due commands over its downlink, as many as it has room for; sends younger than
        ``resend`` seconds (by default the service's) are left alone. Fires when they are sent: a flush
        asked for while one is under way is done after it (with the smaller resend of the two)."""
        wanted = self.resend if resend is None else resend
        waiting = self._flushing.get(device)
        if waiting is not None:
            d: Deferred = Deferred()
            waiting[1].append(d)
            waiting[0] = wanted if waiting[0] is None else min(waiting[0], wanted)
            return d
        self._flushing[device] = [None, []]
        done = Deferred.fromCoroutine(self._flush(device, wanted))

        def failed(f: Any) -> None:
            log.warn("commands to {device} not sent yet: {error}", device=device, error=first_line(f.value))

        def next_one(_: Any) -> None:
            again, waiters = self._flushing.pop(device)
            if again is None:
                return
            if device not in self.downlinks:
                for w in waiters:
                    w.callback(None)
                return

            def release(_: Any) -> None:
                for w in waiters:
                    w.callback(None)

            self.flush(device, again).addCallback(release)

        return done.addErrback(failed).addCallback(next_one)

    async def _flush(self, device: str, resend: float) -> None:
        downlink: Any = self.downlinks.get(device)
        if downlink is None:
            return
        if resend == BACK:  # what was sent before the downlink came (not what was sent over it since)
            resend = max(0.0, self.reactor.seconds() - self._attached.get(device, self.reactor.seconds()))
        room = downlink.room()
        if room <= 0:
            return
        commands = await self.ledger.claim(device, self.gateway_id(), downlink.transport, resend, room)
        if len(commands) < room:
            self.waiting.discard(device)  # nothing more due now: its next notice (or the next tick) says when
        else:
            self.waiting.add(device)  # more may wait: taken as the device makes room
        for command in commands:
            if not self._holds(device, downlink):
                return  # gone meanwhile: sent again when it is back
            self.sent[downlink.transport] += 1
            downlink.deliver(command)

    def _holds(self, device: str, downlink: Any) -> bool:
        return self.downlinks.get(device) is downlink

    async def take(self, device: str, transport: str, limit: int, wait: bool = False) -> list[Command]:
        """Claim ``device``'s due commands for a transport that answers with them (HTTPS)."""
        if device not in self.waiting:
            return []
        commands = await self.ledger.claim(device, self.gateway_id(), transport, self.resend, limit)
        self.sent[transport] += len(commands)
        return commands

    # -- what people and devices say -------------------------------------

    async def send(self, device: str, request: Request, sender: str) -> tuple[Command, bool]:
        command, new = await self.ledger.accept(device, request, sender)
        if new:
            log.info(
                "command {id} ({name}) to {device} from {sender}, expires in {ttl:g} s",
                id=command.id,
                name=command.name,
                device=device,
                sender=sender,
                ttl=request.ttl,
            )
        return command, new

    async def delivered(self, device: str, id_: str) -> None:
        """The device has the command (MQTT PUBACK, TGP's acknowledgement)."""
        await self.ledger.delivered(device, id_)
        if device in self.waiting and device in self.downlinks:
            self.flush(device)  # room again for what waits

    async def finished(self, device: str, id_: str, status: str, result: Any, transport: str) -> bool:
        """Record a device's result; False when it is not the device's command or it was finished before."""
        recorded = await self.ledger.finish(device, id_, status, result)
        if recorded is not None:
            self.results[(transport, status)] += 1
            log.info("command {id} to {device} {status}", id=id_, device=device, status=status)
            if status == "succeeded":
                device_id, name, at_us = recorded
                self._tell(device_id, device, name, id_, status, at_us)
                command = await self.ledger.find(id_) if name == DESIRED else None
                if command is not None:
                    # What the device says it applied (or, saying nothing, the delta it was sent) is reported.
                    applied = result if isinstance(result, dict) and result else command.params.get("delta", {})
                    await self.twin.report(device, applied)
        return recorded is not None

    def _tell(self, *event: Any) -> None:
        for observe in self.observers:
            try:
                observe(*event)
            except Exception:  # noqa: BLE001 - an observer's failure is its own
                log.failure("a command observer failed")

    async def wait(self, id_: str, timeout: float) -> Command | None:
        """The command once finished, or as it is after ``timeout`` seconds."""
        d: Deferred = Deferred()
        self._waiters.setdefault(id_, []).append(d)
        try:
            command = await self.ledger.find(id_)
            if command is None or command.finished or timeout <= 0:
                return command
            call = self.reactor.callLater(min(timeout, MAX_WAIT), d.callback, None)
            await d
            if call.active():
                call.cancel()
            return await self.ledger.find(id_)
        finally:
            waiters = self._waiters.get(id_, [])
            if d in waiters:
                waiters.remove(d)
            if not waiters:
                self._waiters.pop(id_, None)

    async def cancel(self, id_: str, who: str) -> Command:
        return await self.ledger.cancel(id_, who)

    # -- /metrics and /healthz -------------------------------------------

    def live_metrics(self) -> Any:
        by_state = GaugeMetricFamily(
            "gateway_commands",
            "Commands not finished (queued, sent, delivered) by state and the transport that last sent them",
            labels=["state", "transport"],
        )
        for state, transport, count, _ in self.counts:
            by_state.add_metric([state, transport], count)
        yield by_state
        sent = CounterMetricFamily(
            "gateway_commands_sent", "Commands sent by this gateway (resends included)", labels=["transport"]
        )
        for transport, count in sorted(self.sent.items()):
            sent.add_metric([transport], count)
        yield sent
        results = CounterMetricFamily(
            "gateway_command_results",
            "Commands this gateway finished: results devices reported (succeeded, failed), and those it expired",
            labels=["transport", "state"],
        )
        for (transport, state), count in sorted(self.results.items()):
            results.add_metric([transport, state], count)
        yield results

    def health(self) -> dict[str, tuple[Any, bool | None]]:
        """/healthz: commands not finished, and of those how many waited past half their expiry (a device
        away, a transport that cannot reach it): told, not judged, like a silent field device."""
        late = sum(c[3] for c in self.counts)
        waiting = sum(c[2] for c in self.counts)
        doc = {"waiting": waiting, "past_half_expiry": late, "devices_reachable_here": len(self.downlinks)}
        return {"commands": (doc, None)}


__all__ = ["Commands", "CommandError", "IDownlink"]
