"""
OPC UA sessions, run by asyncua (the maintained Python OPC UA stack, on
asyncio) on an event loop in a thread of its own.

Why a thread and not ``twistd --reactor=asyncio``: the gateway runs on
whatever reactor twistd gives it (epoll by default), and an OPC UA server on
the plant network must not decide the reactor of every other transport. The
loop thread does the OPC UA work (secure channel, publish requests, decoding
notifications); what it hands the reactor is one ``callFromThread`` per
publish response, carrying every value of it, so a server sending 10,000
values a second costs the reactor a few calls a second, not 10,000.

One ``UaSession`` per ``[[opcua]]`` table: connect (security, identity),
look the namespace URIs up in the server's namespace array (indexes change
when a server restarts; URIs do not), expand ``[[opcua.browse]]`` tables,
create the monitored items in few subscriptions within the server's limits,
and wait for the session to be lost. Then the same again, with backoff: a
restarted server gets new subscriptions on a new session, with its new
namespace array.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from asyncua import Client, Node, ua
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gateway.net.opcua_ids import with_index, with_uri
from gateway.reactor import Reactor
from gateway.readings import metric_name
from gateway.transports.opcua_settings import Item, OpcuaSource

APPLICATION_URI = "urn:txgateway:client"
MAX_HANDED = 100_000  # values on their way from the OPC UA thread to the reactor (Handler)
# asyncua logs every reconnect attempt at WARNING with a traceback; the gateway counts and logs them itself.
logging.getLogger("asyncua").setLevel(logging.CRITICAL)


class Listener(Protocol):
    """The reactor side of a session (``opcua.py``); each is called in the reactor thread."""

    def session(self, items: tuple[Item, ...], refused: dict[int, str], info: dict[str, Any]) -> None: ...
    def values(self, batch: list[tuple[int, Any, float, int, str]], dropped: dict[int, int], arrived: float) -> None:
        """A publish response's values (handle, value, time, status code, status name when not Good), and
        how many values of each handle were dropped before it (``Handler``)."""

    def lost(self, reason: str, message: str) -> None: ...
    def certificate(self, path: str, thumbprint: str) -> None: ...


class UaLoop:
    """One asyncio loop in one thread for every OPC UA session of the gateway."""

    def __init__(self, reactor: Reactor) -> None:
        self.reactor = reactor
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="opcua", daemon=True)
        self.tasks: set[Any] = set()  # concurrent futures of the calls not finished
        self.pki_lock = asyncio.Lock()  # the sessions share the client certificate in the data directory

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    def start(self) -> None:
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any]) -> Deferred:
        """Run ``coro`` on the loop; its result (or failure) fires the Deferred in the reactor thread."""
        d: Deferred = Deferred()
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self.tasks.add(future)

        def done(f: Any) -> None:
            self.tasks.discard(f)
            if f.cancelled():
                self.reactor.callFromThread(d.errback, Failure(asyncio.CancelledError()))
            elif f.exception() is not None:
                self.reactor.callFromThread(d.errback, Failure(f.exception()))
            else:
                self.reactor.callFromThread(d.callback, f.result())

        future.add_done_callback(done)
        return d

    def stop(self) -> Deferred:
        """Cancel every session (each closes its session politely, 2 s at most), then end the thread."""

        async def wind_down() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=3.0)

        d = self.call(wind_down())
        d.addBoth(lambda _: self.loop.call_soon_threadsafe(self.loop.stop))
        return d


def timestamp(value: datetime | None) -> float | None:
    if value is None or value.year < 1700:  # OPC UA's "no time" (1601-01-01)
        return None
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()


def number(value: Any) -> float | None:
    """A reading's value from a scalar OPC UA value; None for what is not a number (text, arrays…)."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    return None


async def node_id(client: Client, text: str, namespaces: list[str]) -> ua.NodeId:
    """A NodeId from its text; ``nsu=URI;`` is looked up in this session's namespace array."""
    return ua.NodeId.from_string(with_index(text, namespaces))


class Handler:
    """
    asyncua's subscription handler: values of one publish response go to the reactor together. At most
    ``MAX_HANDED`` values are on their way to the reactor (a reactor held up must not let the handoff grow
    at the server's rate): past it a batch is dropped, and its values are counted by item and told with
    the next batch that goes, as ``overflow`` gaps.
    """

    def __init__(self, session: UaSession) -> None:
        self.session = session
        self.pending: list[tuple[int, Any, float, int, str]] = []
        self.lock = threading.Lock()  # over what follows, which the reactor's thread changes too
        self.handed = 0  # values handed to the reactor and not yet taken
        self.dropped: collections.Counter[int] = collections.Counter()  # item handle → values dropped

    def datachange_notification(self, node: Node, val: Any, data: Any) -> None:
        dv = data.monitored_item.Value
        status = dv.StatusCode if dv is not None and dv.StatusCode is not None else ua.StatusCode()
        ts = timestamp(dv.SourceTimestamp) or timestamp(dv.ServerTimestamp) or time.time()
        if not self.pending:
            self.session.loop.call_soon(self.flush)
        self.pending.append(
            (data.subscription_data.client_handle, val, ts, status.value, status.name if not status.is_good() else "")
        )

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return
        with self.lock:
            if self.handed + len(batch) > MAX_HANDED:
                self.dropped.update(handle for handle, *_ in batch)
                return
            self.handed += len(batch)
            dropped, self.dropped = self.dropped, collections.Counter()
        self.session.reactor.callFromThread(self.taken, batch, dropped, time.time())

    def taken(self, batch: list[tuple[int, Any, float, int, str]], dropped: dict[int, int], arrived: float) -> None:
        """In the reactor's thread."""
        with self.lock:
            self.handed -= len(batch)
        self.session.listener.values(batch, dropped, arrived)

    def status_change_notification(self, status: Any) -> None:
        self.session.lost_event.set()


class UaSession:
    """One ``[[opcua]]`` table's session, kept up for as long as the gateway runs."""

    def __init__(
        self,
        source: OpcuaSource,
        listener: Listener,
        reactor: Reactor,
        loop: asyncio.AbstractEventLoop,
        pki: Path,
        pki_lock: asyncio.Lock,
    ) -> None:
        self.source = source
        self.listener = listener
        self.reactor = reactor
        self.loop = loop
        self.pki = pki  # the gateway's client certificate and key live here
        self.pki_lock = pki_lock
        self.client: Client | None = None
        self.nodes: dict[str, Node] = {}  # metric key (device/metric) → node, for writes
        self.lost_event = asyncio.Event()
        self._told = False

    def tell(self, method: Callable[..., Any], *args: Any) -> None:
        self.reactor.callFromThread(method, *args)

    async def run(self) -> None:
        """Sessions, one after another, until cancelled."""
        delay = self.source.backoff
        while True:
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                reason = "refused" if isinstance(e, ua.UaStatusCodeError) else "unreachable"
                if self.client is not None and getattr(self, "_up", False):
                    reason = "session_lost"
                self.tell(self.listener.lost, reason, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            if time.monotonic() - started > 30:
                delay = self.source.backoff  # it ran a while: start the backoff over
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.source.backoff_cap)

    async def _client(self) -> Client:
        s = self.source
        # The watchdog reads the server's state every 5 s and gives it 5 s to answer: a busy server is not
        # taken for a dead one (a closed connection is seen at once, without it).
        client = Client(s.endpoint, timeout=s.timeout, watchdog_intervall=5.0)
        client.application_uri = APPLICATION_URI
        client.name = client.description = "txgateway"
        if s.policy is not None:
            async with self.pki_lock:  # one certificate for every session: made once, not by two at a time
                cert, key = await client.setup_self_signed_certificate(
                    self.pki / "client-key.pem", self.pki / "client.der"
                )
            if not self._told:  # once: the server's administrator trusts this certificate
                self._told = True
                thumbprint = hashlib.sha1(Path(cert).read_bytes()).hexdigest()  # noqa: S324 - OPC UA's thumbprint
                self.tell(self.listener.certificate, str(cert), thumbprint)
            await client.set_security_string(
                ",".join(
                    [s.policy, s.mode or "SignAndEncrypt", str(cert), str(key)]
                    + ([s.server_certificate] if s.server_certificate else [])
                )
            )
        if s.user is not None:
            client.set_user(s.user)
            client.set_password(s.password or "")
        if s.certificate is not None and s.private_key is not None:
            await client.load_client_certificate(s.certificate)
            await client.load_private_key(Path(s.private_key))
        return client

    async def _session(self) -> None:
        self._up = False
        self.lost_event = asyncio.Event()
        client = self.client = await self._client()
        lost: list[Exception] = []

        async def on_lost(exc: Exception) -> None:
            lost.append(exc)
            self.lost_event.set()

        client.connection_lost_callback = on_lost
        await client.connect()
        try:
            self._up = True
            namespaces = await client.get_namespace_array()
            items = list(self.source.items) + await self._browse(client, namespaces)
            refused: dict[int, str] = {}
            nodes: list[tuple[int, Item, ua.NodeId]] = []
            for handle, item in enumerate(items):
                try:
                    nodes.append((handle, item, await node_id(client, item.node, namespaces)))
                except (LookupError, ValueError, ua.UaError) as e:
                    refused[handle] = str(e)
            self.nodes = {f"{item.device}/{item.metric}": client.get_node(nid) for _, item, nid in nodes}
            per_sub, subs = await self._limits(client)
            info = {"namespaces": len(namespaces), "subscriptions": 0, "items": 0}
            self.tell(self.listener.session, tuple(items), {}, info)
            handler = Handler(self)
            for start in range(0, len(nodes), per_sub):
                if info["subscriptions"] >= subs:
                    for handle, _, _ in nodes[start:]:
                        refused[handle] = f"the server allows {subs} subscriptions of {per_sub} items a session"
                    break
                group = nodes[start : start + per_sub]
                sub = await client.create_subscription(self.source.publishing * 1000, handler)
                info["subscriptions"] += 1
                results = await sub.create_monitored_items([self._request(h, i, n) for h, i, n in group])
                for (handle, _, _), result in zip(group, results):
                    if isinstance(result, ua.StatusCode):
                        refused[handle] = result.name
                    else:
                        info["items"] += 1
            self.tell(self.listener.session, tuple(items), refused, info)
            await self.lost_event.wait()
            raise ConnectionError(str(lost[0]) if lost else "the server ended the subscriptions")
        finally:
            self.nodes = {}
            try:
                await asyncio.wait_for(client.disconnect(), 2.0)
            except BaseException:  # noqa: BLE001 - a lost session may not close politely; nothing to add
                pass

    def _request(self, handle: int, item: Item, nid: ua.NodeId) -> ua.MonitoredItemCreateRequest:
        params = ua.MonitoringParameters()
        params.ClientHandle = handle
        params.SamplingInterval = item.sampling * 1000
        params.QueueSize = item.queue_size
        params.DiscardOldest = True
        if item.deadband > 0:
            f = ua.DataChangeFilter()
            f.Trigger = ua.DataChangeTrigger.StatusValue
            f.DeadbandType = ua.DeadbandType.Absolute
            f.DeadbandValue = item.deadband / abs(item.scale)  # the server compares raw values
            params.Filter = f
        request = ua.MonitoredItemCreateRequest()
        request.ItemToMonitor = ua.ReadValueId(NodeId=nid, AttributeId=ua.AttributeIds.Value)
        request.MonitoringMode = ua.MonitoringMode.Reporting
        request.RequestedParameters = params
        return request

    async def _limits(self, client: Client) -> tuple[int, int]:
        """Items per subscription and subscriptions per session: the table's, or the server's if lower."""
        per_sub, subs = self.source.max_items, self.source.max_subscriptions
        caps = client.nodes.server.get_child
        for name, current in (("MaxMonitoredItemsPerSubscription", per_sub), ("MaxSubscriptionsPerSession", subs)):
            try:
                value = await (await caps(["0:ServerCapabilities", f"0:{name}"])).read_value()
            except Exception:  # noqa: BLE001 - an older server does not say; the table's limit holds
                continue
            if isinstance(value, int) and 0 < value < current:
                if name.startswith("MaxMonitored"):
                    per_sub = value
                else:
                    subs = value
        return per_sub, subs

    async def _browse(self, client: Client, namespaces: list[str]) -> list[Item]:
        found: list[Item] = []
        for b in self.source.browse:
            try:
                start = client.get_node(await node_id(client, b.under, namespaces))
                variables = await _variables(start, b.depth)
            except Exception as e:  # noqa: BLE001 - the table's other nodes still go on
                self.tell(self.listener.lost, "browse", f"browse under {b.under}: {e}")
                continue
            for node, name in variables:
                if fnmatch.fnmatchcase(name, b.match):
                    text = with_uri(node.nodeid.to_string(), node.nodeid.NamespaceIndex, namespaces)
                    found.append(
                        Item(
                            text,
                            metric_name(b.prefix + name),
                            b.device,
                            b.sampling,
                            b.queue_size,
                            b.deadband,
                            writable=b.writable,
                        )
                    )
        return found

    async def write(self, item: Item, value: float) -> Any:
        """Write ``value`` (scale and offset undone, in the node's own type) and read it back."""
        node = self.nodes.get(f"{item.device}/{item.metric}")
        if node is None:
            raise ConnectionError("no session with the server now")
        raw = (value - item.offset) / item.scale
        vtype = await node.read_data_type_as_variant_type()
        if vtype == ua.VariantType.Boolean:
            typed: Any = bool(raw)
        elif vtype in (ua.VariantType.Float, ua.VariantType.Double):
            typed = raw
        else:
            if raw != int(raw):
                raise ValueError(f"{item.metric} holds whole numbers ({vtype.name}); {value!r} is not one")
            typed = int(raw)
        await node.write_value(ua.DataValue(ua.Variant(typed, vtype)))
        held = await node.read_value()
        return held


async def _variables(start: Node, depth: int) -> list[tuple[Node, str]]:
    out: list[tuple[Node, str]] = []
    level: Iterable[Node] = [start]
    for _ in range(depth):
        below: list[Node] = []
        for node in level:
            for child in await node.get_children():
                cls = await child.read_node_class()
                if cls == ua.NodeClass.Variable:
                    out.append((child, (await child.read_browse_name()).Name))
                elif cls == ua.NodeClass.Object:
                    below.append(child)
        level = below
    return out
