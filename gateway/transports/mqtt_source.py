"""
The gateway as a consumer of an MQTT broker's stream: how a fleet too large
for one gateway is served. A broker cluster (EMQX, HiveMQ, Mosquitto, AWS
IoT Core) holds the devices' connections; N gateways subscribe to the same
topics in one shared subscription group (``$share/<group>/<filter>``) and
the broker splits the stream between them.

Theory of operation. Each ``[[mqtt_source]]`` is a ``BrokerSource``
service: a ``ClientService`` keeps one connection to the broker, reconnecting
with exponential backoff and jitter. The session is persistent (3.1.1: clean
session off; 5.0: clean start off and a session expiry), under a client id
that stays the same across restarts, so what the broker delivered and the
gateway did not acknowledge is delivered again after a crash or restart.

A message's device is named by one level of its topic (``device-level``).
With ``payload = "auto"`` a topic ending in ``readings`` carries the HTTPS
JSON body (or one reading, or the device type's vendor JSON), and any other
last level is a metric whose payload is a bare number, timed when it
arrives; with ``payload = "json"`` every message is a JSON body. The device
must be registered (``gatewayctl device add``); the broker has already
authenticated the sender, so no token is asked for.

Acknowledgement. The gateway sends PUBACK (QoS 1) or PUBREC (QoS 2) to the
broker only after the message's readings are committed (or journaled), in
the order the messages arrived, as MQTT requires. A message that can never
be stored (unknown device, a payload that cannot be read, a rate limit, a
refusal of the database) is kept in rejected_input with its reason first,
then acknowledged: nothing is dropped without a trace, and a poison message
does not block the stream. With the database away and the journal full,
nothing is acknowledged and the connection closes; the broker keeps the
messages in the session and delivers them again on the next connection.

Sessions no longer used. A source removed or renamed (or given another
client id) leaves its persistent session on the broker, still a member of
the shared group: the broker would go on queueing its share of the stream
there, for nobody. So the gateway retires it: it connects once more under
the old client id, takes and stores what the session holds (acknowledged
after COMMIT, as always), unsubscribes, and when nothing more comes for a
moment ends the session (5.0: DISCONNECT with Session Expiry Interval 0;
3.1.1: one more connection with clean session). It does so on SIGHUP with
the settings it had, and at start for every source it reported before in
``mqtt_sources`` whose broker is still configured (a rename, or a move from
``--mqtt-source`` to a table). A source seen before whose broker is no longer
configured cannot be reached: ``/healthz`` names it until ``gatewayctl mqtt
forget NAME`` says it was dealt with.

Backpressure. At most ``window`` messages are unacknowledged (5.0: the
Receive Maximum told to the broker); at that bound, or while the store's
queue is full, the gateway stops reading the socket and the broker holds
the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from gateway.backoff import Backoff
from gateway.reactor import Clock, Reactor
from gateway.ingest.core import Ingest
from gateway.families import counter, gauge
from gateway.ops.reports import StatusReport
from gateway.readings import (
    Device,
    Source,
)
from gateway.net.brokers import SourceSettings, endpoint
from gateway.transports.devices import DeviceNames, source_health
from gateway.transports.broker_commands import FIRST_ID, BrokerDownlink
from gateway.transports.sparkplug import SparkplugHost
from gateway.transports.sparkplug_link import SparkplugDownlink
from gateway.transports.broker_client import CONNACK_TIMEOUT, SourceCounters, BrokerClient, _ClientFactory

log = Logger()


GONE_CHECK = 30.0  # seconds between looks for sources this gateway reported before and no longer has
READ_BACK_RETRY, READ_BACK_RETRY_CAP = 1.0, 10.0  # seconds: rows kept before a restart asked for again
HEARD_WITHIN = 7 * 86400.0  # seconds: devices heard on a broker this recently get its commands after a restart
HEARD_EVERY = 3600.0  # seconds: how often a device's heard_at is written again while it is heard
HEARD_FLUSH = 5.0  # seconds: devices newly heard are written together after this

# -- the state a source reports ----------------------------------------------


class BrokerSource(ClientService):
    """One [[mqtt_source]]: a persistent, reconnecting subscription feeding the ingest path."""

    def __init__(
        self,
        settings: SourceSettings,
        ingest: Ingest,
        reactor: Reactor,
        clock: Clock | None = None,
        retire: tuple[str, ...] | None = None,
        commands: Any = None,
    ) -> None:
        self.settings = settings
        # Commands to the devices heard from on this broker (with command-topic): their downlinks, and the
        # packet ids of commands published and not yet acknowledged by the broker.
        sparkplug = settings.format == "sparkplug"
        self.commands: Any = commands if (settings.command_topic or sparkplug) and retire is None else None
        self.downlinks: dict[str, Any] = {}  # BrokerDownlink, or SparkplugDownlink
        # A Sparkplug B host application (sparkplug.py): its births, read back from the database before the
        # first message is taken (births_ready), so that data sent again after a restart can be read.
        self.sparkplug = (
            SparkplugHost(settings.host_id, settings.device_name, settings.node_name, settings.rebirth_interval)
            if sparkplug and retire is None
            else None
        )
        self.run: Callable[..., Any] | None = None  # the read pool, for births
        self.owner = ""
        self.births_ready: Deferred | None = None
        self._waits: set[Deferred] = set()  # pauses before rows kept before a restart are asked for again
        # The devices heard here: when each was last written to broker_devices, those to write, the write's call.
        self._heard_written: dict[str, float] = {}
        self._heard_pending: set[str] = set()
        self._heard_flush: Any = None
        self.state_ts = 0  # the timestamp of this connection's STATE (the Will's and the online message's)
        self.command_ids: dict[int, BrokerDownlink] = {}
        self._last_packet_id = FIRST_ID - 1
        self.ingest = ingest
        self.clock = clock or reactor
        # Retiring a session no longer used: the filters it was subscribed to (to unsubscribe), else None.
        self.retire_filters = retire
        self.clean_pass = False
        self.retired: Deferred = Deferred()  # fires once the retired session has been ended
        self.counters = SourceCounters(since=self.clock.seconds())
        self.client: BrokerClient | None = None
        broker = settings.broker
        self.origin = Source("broker+tls" if broker.tls else "broker", broker.host, broker.port, broker.tls)
        self.devices = DeviceNames(ingest, self.clock)
        policy = backoffPolicy(initialDelay=settings.backoff, maxDelay=settings.backoff_cap, factor=2.0)
        super().__init__(
            endpoint(reactor, broker, timeout=CONNACK_TIMEOUT),
            _ClientFactory(self),
            retryPolicy=policy,
            clock=self.clock,
            prepareConnection=lambda p: p.subscribed,  # type: ignore[attr-defined]
        )

    @property
    def retiring(self) -> bool:
        return self.retire_filters is not None

    def retired_now(self) -> None:
        log.info(
            "MQTT source {source}: the session {client_id} on {broker} is ended ({messages} messages it held were "
            "taken)",
            source=self.settings.name,
            client_id=self.settings.broker.client_id,
            broker=self.settings.broker.address,
            messages=self.counters.messages,
        )
        if not self.retired.called:
            self.retired.callback(self.counters.messages)

    def set_state(self, state: str, error: str) -> None:
        c = self.counters
        if state != c.state:
            c.state, c.since = state, self.clock.seconds()
        if error:
            c.last_error = error

    @property
    def subscribed_now(self) -> bool:
        return self.counters.state == "subscribed"

    def reachable(self, name: str, heard: bool = True) -> None:
        """
        A registered device was heard from on this broker (or was, before a restart: ``heard`` false):
        commands to it go out here from now on.
        """
        if self.commands is None:
            return
        if heard:
            self._heard(name)
        if name not in self.downlinks:
            kind = SparkplugDownlink if self.sparkplug is not None else BrokerDownlink
            downlink = self.downlinks[name] = kind(self, name, self.commands)
            self.commands.attach(name, downlink, back=False)

    def sparkplug_offline(self) -> None:
        """After an NDEATH or DDEATH: commands to devices now offline wait for their rebirth."""
        assert self.sparkplug is not None
        for name, online in self.sparkplug.online().items():
            downlink = self.downlinks.get(name)
            if not online and downlink is not None:
                downlink.gone()
                self.commands.detach(name, self.downlinks.pop(name))

    def load_births(self) -> Deferred:
        """
        The births kept before a restart (never errbacks). Without them the data the broker sends again
        could not be read, so the messages wait at the broker, unacknowledged, until they are read back.
        """
        return Deferred.fromCoroutine(self._load_births())

    async def _load_births(self) -> None:
        host = self.sparkplug
        if host is None:
            return
        sql = "SELECT group_id, node, device, payload FROM sparkplug_births WHERE gateway = %s AND source = %s"
        for group, node, device, payload in await self._read_back(sql, "Sparkplug births"):
            try:
                host.restore(group, node, device or None, bytes(payload))
            except Exception as e:  # noqa: BLE001 - a birth that no longer decodes: the node is asked again
                log.warn("Sparkplug birth of {group}/{node} not read back: {e}", group=group, node=node, e=e)

    def load_heard(self) -> Deferred:
        """
        The devices heard on this broker within ``HEARD_WITHIN`` before a restart (never errbacks): commands
        go out to them at once, as to the devices heard since, without waiting for them to publish first.
        """
        return Deferred.fromCoroutine(self._load_heard())

    async def _load_heard(self) -> None:
        if self.commands is None:
            return
        if self.births_ready is not None:  # a Sparkplug device's command is typed from its birth
            await self.births_ready
        sql = (
            "SELECT device FROM broker_devices WHERE gateway = %s AND source = %s "
            f"AND heard_at > now() - interval '{int(HEARD_WITHIN)} seconds' ORDER BY device"
        )
        for (name,) in await self._read_back(sql, "the devices heard on this broker"):
            self.reachable(name, heard=False)

    async def _read_back(self, sql: str, what: str) -> list[tuple]:
        """
        Rows this gateway kept for this source, asked for again (1 s doubling to 10 s) while the database
        does not answer; none once the source stops.
        """
        run = self.run
        if run is None:
            return []
        backoff = Backoff(READ_BACK_RETRY, READ_BACK_RETRY_CAP)
        while True:
            try:
                rows: list[tuple] = await run(lambda c: c.runQuery(sql, (self.owner, self.settings.name)))
                return rows
            except Exception as e:  # noqa: BLE001 - the database away: asked again
                delay = backoff.failed()
                log.warn(
                    "MQTT source {source}: {what} not read back yet ({error}); asking again in {delay} s",
                    source=self.settings.name,
                    what=what,
                    error=str(e),
                    delay=delay,
                )
            wait = deferLater(self.clock, delay, lambda: None)
            self._waits.add(wait)
            try:
                await wait
            except CancelledError:
                return []  # the source stopped
            finally:
                self._waits.discard(wait)

    def _heard(self, name: str) -> None:
        """Note that ``name`` was heard here (written with others heard meanwhile, at most hourly each)."""
        now = self.clock.seconds()
        last = self._heard_written.get(name)
        if self.run is None or (last is not None and now - last < HEARD_EVERY):
            return
        self._heard_written[name] = now
        self._heard_pending.add(name)
        if self._heard_flush is None:
            self._heard_flush = self.clock.callLater(HEARD_FLUSH, self._write_heard)

    def _write_heard(self) -> Deferred:
        self._heard_flush = None
        names, self._heard_pending = sorted(self._heard_pending), set()
        if not names or self.run is None:
            return succeed(None)
        sql = (
            "INSERT INTO broker_devices (gateway, source, device, heard_at) "
            "SELECT %s, %s, d, now() FROM unnest(%s::text[]) AS d "
            "ON CONFLICT (gateway, source, device) DO UPDATE SET heard_at = EXCLUDED.heard_at"
        )
        d: Deferred = self.run(lambda c: c.runOperation(sql, (self.owner, self.settings.name, names)))

        def failed(f: Any) -> None:
            for name in names:  # written again when next heard
                self._heard_written.pop(name, None)
            log.warn(
                "MQTT source {source}: the devices heard not kept ({error}); their commands wait for them after "
                "a restart",
                source=self.settings.name,
                error=str(f.value),
            )

        return d.addErrback(failed)

    def save_birth(self, group: str, node: str, device: str | None, payload: bytes) -> Deferred:
        """Keep a birth for after a restart (the message is acknowledged once it is kept)."""
        if self.run is None:
            return succeed(None)
        sql = (
            "INSERT INTO sparkplug_births (gateway, source, group_id, node, device, payload, updated_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, now()) ON CONFLICT (gateway, source, group_id, node, device) "
            "DO UPDATE SET payload = EXCLUDED.payload, updated_at = now()"
        )
        args = (self.owner, self.settings.name, group, node, device or "", payload)
        if device is None:  # a node's birth starts it over: its devices' births are of its last life
            clear = "DELETE FROM sparkplug_births WHERE gateway = %s AND source = %s AND group_id = %s AND node = %s"
            return self.run(lambda c: c.runOperation(clear, args[:4])).addCallback(
                lambda _: self.run(lambda c: c.runOperation(sql, args))
            )
        return self.run(lambda c: c.runOperation(sql, args))

    def command_packet_id(self) -> int:
        while True:
            self._last_packet_id = max(FIRST_ID, (self._last_packet_id + 1) % 65536)
            if self._last_packet_id not in self.command_ids:
                return self._last_packet_id

    def command_acked(self, ack: Any) -> None:
        downlink = self.command_ids.pop(ack.packet_id, None)
        if downlink is not None:
            downlink.acked(ack)

    def connection_ended(self) -> None:
        self.command_ids.clear()  # sent again on the next connection, after --command-resend

    def device(self, name: str) -> tuple[bool, Device | None]:
        return self.devices.get(name)

    def look_up(self, name: str) -> Deferred:
        return self.devices.look_up(name)

    def forget(self, names: list[str] | None = None) -> None:
        self.devices.forget(names)

    def startService(self) -> None:
        self.set_state("connecting", "")
        if self.retiring:
            ClientService.startService(self)
            return
        log.info(
            "MQTT source {source}: consuming {filters} from {url}",
            source=self.settings.name,
            filters=", ".join(self.settings.filters),
            url=self.settings.broker.url,
        )
        if not self.settings.broker.tls:
            log.warn(
                "MQTT source {source}: {url} is not TLS: credentials and readings cross the network in clear",
                source=self.settings.name,
                url=self.settings.broker.url,
            )
        super().startService()

    def stopService(self) -> Deferred:
        for wait in list(self._waits):
            wait.cancel()
        kept = succeed(None)
        if self._heard_flush is not None:
            self._heard_flush.cancel()
            kept = self._write_heard()
        for name, downlink in self.downlinks.items():
            self.commands.detach(name, downlink)
        self.downlinks.clear()
        client = self.client
        drained = client.stop() if client is not None else succeed(None)
        self.set_state("stopped", "")
        drained.addCallback(lambda _: kept)
        return drained.addCallback(lambda _: super(BrokerSource, self).stopService())

    def status(self) -> dict[str, Any]:
        c = self.counters
        now = self.clock.seconds()
        client = self.client
        oldest = client.session.oldest_arrival if client is not None else None
        return {
            "url": self.settings.broker.url,
            "client_id": self.settings.broker.client_id,
            "filters": list(self.settings.filters),
            "state": c.state,
            "state_seconds": now - c.since,
            "last_error": c.last_error,
            "connections": c.connections,
            "messages": c.messages,
            "readings": c.readings,
            "duplicates": c.duplicates,
            "rejected": c.rejected,
            "acked": c.acked,
            "in_flight": c.in_flight,
            "oldest_unacked_seconds": None if oldest is None else now - oldest,
            "last_message_seconds": None if c.last_message_at is None else now - c.last_message_at,
            "delay_seconds": c.delay,
            **(self._sparkplug_status() if self.sparkplug is not None else {}),
        }

    def _sparkplug_status(self) -> dict[str, Any]:
        host = self.sparkplug
        assert host is not None
        online = host.online()
        return {
            "sparkplug": {
                "host_id": host.host_id,
                "messages": dict(sorted(host.counts.items())),
                "online": sorted(n for n, up in online.items() if up),
                "offline": sorted(n for n, up in online.items() if not up),
            }
        }


class BrokerSources(MultiService):
    """Every [[mqtt_source]], their health, their /metrics and their state in the database."""

    def __init__(
        self,
        sources: tuple[SourceSettings, ...],
        ingest: Ingest,
        reactor: Reactor,
        owner: str,
        run: Callable[..., Any],
        commands: Any = None,
    ) -> None:
        super().__init__()
        self.commands = commands  # the gateway's commands service, for sources with a command-topic
        self.reactor = reactor
        self.ingest = ingest
        self.owner = owner  # this gateway's id, the row's key in mqtt_sources
        self.run = run
        self.sources: dict[str, BrokerSource] = {}
        self.retiring: dict[tuple[str, str], BrokerSource] = {}  # (name, client id) -> its last connection
        # Sources this gateway reported before that it can no longer reach: name -> (client id, URL).
        self.gone: dict[str, tuple[str, str]] = {}
        for settings in self._own(sources).values():
            self._add(settings)
        self.reporter = StatusReport("mqtt_sources", owner, self.status, run, reactor)
        self._gone_check = LoopingCall(self.look_for_retired)
        self._gone_check.clock = reactor

    def _own(self, sources: tuple[SourceSettings, ...]) -> dict[str, SourceSettings]:
        """The settings by name, each with this gateway's client id unless the table gives one."""
        return {s.name: dataclasses.replace(s, broker=s.broker.with_client_id(self.owner, s.name)) for s in sources}

    def _add(self, settings: SourceSettings) -> None:
        source = self.sources[settings.name] = BrokerSource(settings, self.ingest, self.reactor, commands=self.commands)
        source.run, source.owner = self.run, self.owner
        if source.sparkplug is not None:
            source.births_ready = source.load_births()
        source.load_heard()
        source.setServiceParent(self)  # started at once when this service runs

    async def reconfigure(self, sources: tuple[SourceSettings, ...]) -> list[str]:
        """
        New [[mqtt_source]] tables (SIGHUP): stop removed and changed ones, start new and changed ones; the
        session of one removed, or now under another client id, is retired.
        """
        new = self._own(sources)
        old = set(self.sources)
        changes = []
        for name in sorted(self.sources):
            if new.get(name) != self.sources[name].settings:
                stopped = self.sources.pop(name)
                await stopped.disownServiceParent()
                kept = new.get(name)
                if kept is None or kept.broker.client_id != stopped.settings.broker.client_id:
                    self._retire(stopped.settings, stopped.settings.filters)
                if name not in new:
                    changes.append(f"MQTT source {name} removed")
        for name, settings in new.items():
            if name not in self.sources:
                changes.append(f"MQTT source {name} {'changed' if name in old else 'added'}")
                self._add(settings)
        return changes

    def _retire(self, settings: SourceSettings, filters: tuple[str, ...]) -> None:
        """End a session no longer used, after taking what it holds (see the module's docstring)."""
        key = (settings.name, settings.broker.client_id)
        if key in self.retiring:
            return
        source = self.retiring[key] = BrokerSource(settings, self.ingest, self.reactor, retire=filters)
        source.setServiceParent(self)

        def ended(messages: Any) -> Deferred:
            d = self.run(
                lambda c: c.runOperation(
                    "DELETE FROM mqtt_sources WHERE gateway = %s AND source = %s AND status->>'client_id' = %s",
                    (self.owner, settings.name, settings.broker.client_id),
                )
            )
            d.addErrback(lambda f: log.warn("MQTT source {source}: its old row stays: {e}", source=key[0], e=f.value))

            def done(_: Any) -> Any:
                self.retiring.pop(key, None)  # retired once its row is gone too, so it is never retired twice
                return source.disownServiceParent()

            return d.addBoth(done)

        source.retired.addCallback(ended)

    def look_for_retired(self) -> Deferred:
        """
        Sources this gateway reported before and no longer has (renamed, removed while it was down, another
        client id): retired when their broker is still configured, else named as gone. Never errbacks.
        """
        sql = (
            "SELECT source, status->>'client_id', status->>'url', status->'filters' FROM mqtt_sources "
            "WHERE gateway = %s"
        )
        d = self.run(lambda c: c.runQuery(sql, (self.owner,)))

        def found(rows: list[tuple]) -> None:
            gone = {}
            current = {(s.settings.name, s.settings.broker.client_id) for s in self.sources.values()}
            for name, client_id, url, filters in rows:
                if (name, client_id) in current or (name, client_id) in self.retiring or not client_id:
                    continue
                same_broker = [s.settings for s in self.sources.values() if s.settings.broker.url == url]
                if same_broker:
                    base = next((s for s in same_broker if s.name == name), same_broker[0])
                    settings = dataclasses.replace(
                        base, name=name, broker=dataclasses.replace(base.broker, client_id=client_id)
                    )
                    self._retire(settings, tuple(filters or base.filters))
                else:
                    gone[name] = (client_id, url)
            for name, (client_id, url) in gone.items():
                if name not in self.gone:
                    log.warn(
                        "MQTT source {source} (client id {client_id} on {url}) is configured no more, and no source "
                        "names that broker: its session there may still take a share of the group's messages. "
                        "Configure that broker again for a moment (the gateway then ends the session), or end it on "
                        "the broker, then run 'gatewayctl mqtt forget {source}'",
                        source=name,
                        client_id=client_id,
                        url=url,
                    )
            self.gone = gone

        return d.addCallbacks(found, lambda f: log.debug("MQTT sources not checked: {e}", e=f.getErrorMessage()))

    def startService(self) -> None:
        super().startService()
        self.reporter.start()
        self._gone_check.start(GONE_CHECK, now=True)

    def stopService(self) -> Deferred:
        if self._gone_check.running:
            self._gone_check.stop()
        d = super().stopService()
        return d.addCallback(lambda _: self.reporter.stop())

    def forget(self, names: list[str] | None = None) -> None:
        for source in self.sources.values():
            source.forget(names)

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: source.status() for name, source in sorted(self.sources.items())}

    def health(self) -> dict[str, dict[str, Any]]:
        """Each source's status, ``ok`` and, when not ok, the problem in words."""
        out = {}
        for name, (client_id, url) in sorted(self.gone.items()):
            out[name] = {
                "state": "gone",
                "client_id": client_id,
                "url": url,
                "ok": False,
                "problem": f"configured no more, and its session {client_id} on {url} may still take messages; "
                f"end it, then run gatewayctl mqtt forget {name}",
            }
        for name, source in sorted(self.sources.items()):
            out[name] = source_health(source.status(), "subscribed", source.settings.stall)
        return out

    def live_metrics(self) -> Iterator[Any]:
        families = {
            "subscribed": gauge(
                "gateway_mqtt_source_subscribed", "1 while the source's subscription is up.", labels=["source"]
            ),
            "in_flight": gauge(
                "gateway_mqtt_source_in_flight",
                "Messages taken from the broker and not yet acknowledged.",
                labels=["source"],
            ),
            "oldest": gauge(
                "gateway_mqtt_source_oldest_unacked_seconds",
                "Age of the oldest message not yet acknowledged to the broker.",
                labels=["source"],
            ),
            "delay": gauge(
                "gateway_mqtt_source_delay_seconds",
                "From the newest reading's time to its commit, for the last message (grows while a backlog drains).",
                labels=["source"],
            ),
            "messages": counter("gateway_mqtt_source_messages", "Messages taken from the broker.", ["source"]),
            "rejected": counter(
                "gateway_mqtt_source_rejected", "Messages kept in rejected_input, then acknowledged.", ["source"]
            ),
            "connections": counter(
                "gateway_mqtt_source_connections", "Connections accepted by the broker.", ["source"]
            ),
        }
        for name, s in self.status().items():
            families["subscribed"].add_metric([name], 1 if s["state"] == "subscribed" else 0)
            families["in_flight"].add_metric([name], s["in_flight"])
            families["oldest"].add_metric([name], s["oldest_unacked_seconds"] or 0.0)
            families["delay"].add_metric([name], s["delay_seconds"] or 0.0)
            families["messages"].add_metric([name], s["messages"])
            families["rejected"].add_metric([name], s["rejected"])
            families["connections"].add_metric([name], s["connections"])
        yield from families.values()
