"""
``GET /healthz``: is this gateway doing its job? Healthy means all of:

- the database answers a query within two seconds;
- the ingest queue has room (when it is full, writers are answered 503);
- the outage journal, if any, has room (when it is full and the database
  is away, writers are answered 503);
- every sink is moving: a sink whose oldest waiting reading is older than
  ``stall_after`` seconds and which has sent nothing for as long is
  *stalled*. A gateway that reports healthy while forwarding nothing is the
  failure that goes unnoticed longest, so a stalled sink makes the whole
  answer 503, paused or not;
- every MQTT broker source is subscribed, or has not been for less than
  its ``stall`` seconds (a broker restarting is not yet a problem).

The sinks' figures come from the uploader's last look at the database
(every few seconds, ``SinkMonitor``), so a probe never runs the slower
status queries itself.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

from twisted.internet.defer import Deferred

from gateway.readings import IngestError
from gateway.storage.interface import IStore


class Health:
    def __init__(
        self,
        store: IStore,
        *,
        stall_after: float,
        uploader: Callable[[], Any] = lambda: None,
        transports: Callable[[], Any] = lambda: (),
        retention: Callable[[], Any] = lambda: None,
        compressor: Callable[[], Any] = lambda: None,
        packer: Callable[[], Any] = lambda: None,
        oidc: Callable[[], Any] = lambda: None,
        embedded: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.store = store
        self.stall_after = stall_after
        self.uploader = uploader
        self.transports = transports  # the device transports: each may add sections (broker sources, Modbus)
        self.retention = retention  # when --retention is given
        self.compressor = compressor  # unless --compress-after off
        self.packer = packer  # unless --pack-after off
        self.oidc = oidc  # the single sign-on provider's keys, when [oidc] is set
        self.embedded = embedded  # the supervisor's status of the embedded PostgreSQL, when there is one

    def reconfigure(self, stall_after: float) -> None:
        self.stall_after = stall_after

    def check(self) -> Deferred:
        """Fires with (healthy, document); never errbacks."""

        def answer(database: str) -> tuple[bool, dict[str, Any]]:
            queue = {"depth": getattr(self.store, "queue_depth", 0), "ok": self.store.has_room(1)}
            sinks = self.sinks()
            journal = getattr(self.store, "journal_status", lambda: None)()
            sections = {key: part for t in self.transports() for key, part in t.health().items()}
            healthy = bool(
                database == "ok"
                and queue["ok"]
                and (journal is None or journal["ok"])
                and all(s["ok"] for s in sinks.values())
                and all(ok for _, ok in sections.values() if ok is not None)
            )
            # Whether what devices send is stored (or journaled): /readyz, for load balancers.
            storing = bool((database == "ok" or (journal is not None and journal["ok"])) and queue["ok"])
            doc = {
                "status": "ok" if healthy else "unavailable",
                "storing": storing,
                "database": database,
                "queue": queue,
                "sinks": sinks,
            }
            for key, (section, _) in sections.items():
                doc[key] = section
            retention = self.retention()
            if retention is not None:
                doc["retention"] = retention.status()
            compressor = self.compressor()
            if compressor is not None:
                doc["compression"] = compressor.status()
            packer = self.packer()
            if packer is not None:
                doc["packing"] = packer.status()
            oidc = self.oidc()
            if oidc is not None:
                # Named, not failing the check: devices and tokens of our own still work without the provider.
                doc["oidc"] = oidc.keys.status()
            if journal is not None:
                doc["journal"] = journal
            if self.embedded is not None:
                embedded = doc["embedded_database"] = self.embedded()
                if database != "ok" and not embedded["ok"]:
                    doc["database"] = f"{database}; the embedded PostgreSQL does not start: {embedded['last_error']}"
            return healthy, doc

        def down(f: Any) -> str:
            return f.value.message if f.check(IngestError) else str(f.value)

        return self.store.check().addCallbacks(lambda _: "ok", down).addCallback(answer)

    def sinks(self) -> dict[str, dict[str, Any]]:
        uploader = self.uploader()
        if uploader is None:
            return {}
        return {name: sink_health(status, self.stall_after) for name, status in uploader.sink_status().items()}


def sink_health(status: dict[str, Any], stall_after: float) -> dict[str, Any]:
    """One sink's entry: its figures, ``ok`` and, when not ok, the problem in words."""
    lag = status.get("lag_seconds")
    idle = status.get("idle_seconds")  # since the last batch any gateway sent
    doc = {**status, "ok": True}
    if status.get("checked_at") is None:
        doc.update(ok=False, problem="the sink's state has not been read from the database yet")
    elif lag is not None and lag > stall_after and (idle is None or idle > stall_after):
        doc.update(
            ok=False,
            problem=f"readings have waited {lag:.0f}s and nothing was sent for "
            + ("ever" if idle is None else f"{idle:.0f}s")
            + (" (the sink is paused)" if status.get("paused") else ""),
        )
    return doc
