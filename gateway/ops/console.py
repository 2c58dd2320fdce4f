"""
What an administrator finds at the console's prompt: the live service
objects and a few helpers that answer the usual questions at a glance.
Results are dicts and lists (easy to pick apart at the prompt) whose repr
is laid out for reading.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.readings import CloseReason

BANNER = """txgateway console: a Python prompt inside the running gateway. Careful: it is live.
  status()              uptime, connections, readings/s, store queue and commit time, sinks, MQTT sources,
                        polled Modbus devices
  devices()             devices online: address, transport, since, readings, last error (also those
                        heard lately over HTTPS or through an MQTT broker, and polled Modbus devices)
  attention()           devices silent or flagged for quality failures (as of the last status check)
  alerts()              open edge alerts
  commands()            commands not finished (oldest first): device, state, sends, whether its device is here
  kick(name)            close a device's connections (it may reconnect)
  sinks()               the uploader's sinks; pause(sink), resume(sink), flush(sink) (no name: all)
  gateway, store, uploader, metrics, config   the live objects
  help()                this text; help(obj) for any object's documentation
Ctrl-D (or closing the input) ends the session."""


def _family(transport: str) -> str:
    """A transport label without its TLS or state ("mqtt+tls" and "modbus (reading)" are mqtt and modbus)."""
    return transport.split("+")[0].split(" ")[0].replace("https", "http")


class Report(dict):
    """A dict shown as aligned 'key: value' lines."""

    def __repr__(self) -> str:
        return "\n".join(_lines(self, 0))


class Table(list):
    """A list of dicts shown as a table."""

    def __repr__(self) -> str:
        if not self:
            return "(none)"
        columns = list(self[0].keys())
        rows = [[_show(row.get(c)) for c in columns] for row in self]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        head = "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()
        return "\n".join([head] + ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows])


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 1e6 else f"{value:.0f}"
    return str(value)


def _lines(doc: dict, depth: int) -> list[str]:
    out = []
    for key, value in doc.items():
        if isinstance(value, dict):
            out.append("  " * depth + f"{key}:" + ("" if value else " (none)"))
            out.extend(_lines(value, depth + 1))
        else:
            out.append("  " * depth + f"{key}: {_show(value)}")
    return out


def _database_state(gateway: Any) -> str:
    if gateway.failure is not None:
        return gateway.failure
    if not gateway.ready.called:
        return "starting"
    pool = gateway.store.pool
    return "up" if pool.up else f"down: {pool.last_error}"


def _ago(clock_now: float, then: float | None) -> str:
    if then is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(then)) + f" ({clock_now - then:.0f}s ago)"


class Console:
    """The helpers, bound to one GatewayService."""

    ACTIVE_HTTP = 120.0  # an HTTPS device counts as online this long after its last request

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway

    def namespace(self) -> dict[str, Any]:
        g = self.gateway
        return {
            "gateway": g,
            "store": g.store,
            "uploader": g.uploader,
            "metrics": g.metrics,
            "config": g.config,
            "status": self.status,
            "devices": self.devices,
            "attention": self.attention,
            "alerts": self.alerts,
            "commands": self.commands,
            "kick": self.kick,
            "sinks": self.sinks,
            "pause": self.pause,
            "resume": self.resume,
            "flush": self.flush,
            "help": self.help,
        }

    def help(self, obj: Any = None) -> None:
        """This console's helpers; help(obj) shows obj's documentation."""
        if obj is None:
            print(BANNER)
        else:
            import pydoc

            print(pydoc.plain(pydoc.render_doc(obj)))

    def attention(self) -> Table:
        """Devices silent for longer than expected or flagged for quality failures, from the last status check."""
        watch = self.gateway.status
        rows = []
        for name in sorted(watch.silent.keys() | watch.flagged.keys()):
            doc = watch.silent.get(name) or watch.flagged[name]
            rows.append(
                {
                    "device": name,
                    "silent": name in watch.silent,
                    "silent_for": doc["silent_for"],
                    "flagged": name in watch.flagged,
                    "failures": doc["quality"]["failures"],
                    "last_seen": doc["last_seen"],
                }
            )
        return Table(rows)

    def alerts(self) -> Table:
        """Edge alerts open now, as this gateway knows them."""
        alerts = getattr(self.gateway, "alerts", None)
        return Table(alerts.open_alerts() if alerts is not None else [])

    def commands(self) -> Table:
        """Commands not finished, oldest first, as of the commands service's last look (every few seconds)."""
        service = getattr(self.gateway, "commands", None)
        if service is None:
            return Table([])
        now = self.gateway.reactor.seconds()
        return Table(
            {
                "id": c.id,
                "device": c.device,
                "name": c.name,
                "state": c.state,
                "sent": c.attempts,
                "transport": c.transport,
                "age": _ago(now, c.created),
                "expires_in": f"{max(0.0, c.expires - now):.0f}s",
                "here": c.device in service.downlinks,
            }
            for c in service.pending
        )

    def status(self) -> Report:
        """Uptime, connections per transport, readings/s over the last minute, store, sinks."""
        g = self.gateway
        m = g.metrics
        now = g.reactor.seconds()
        commit = m.commit_window.mean()
        report = Report(
            uptime_seconds=round(now - m.started, 1),
            database=_database_state(g),
            connections=Report(g.connections()),
            readings_per_second=round(m.accepted_window.per_second(), 1),
            store=Report(
                queue_depth=g.store.queue_depth,
                commit_ms=None if commit is None else round(commit * 1000, 2),
                batches_per_second=round(m.commit_window.per_second(), 1),
                database_connections=g.store.pool.up,
            ),
            journal=Report(g.store.journal_status() or {"off": True}),
            sinks=Report(
                {
                    name: Report(
                        lag_seconds=s.get("lag_seconds"),
                        paused=s["paused"],
                        pending_batches=s.get("pending_batches"),
                        parked_batches=s.get("parked_batches"),
                        sent=s["readings_sent"],
                        last_error=s["last_error"] or None,
                    )
                    for name, s in (g.uploader.sink_status() if g.uploader else {}).items()
                }
            ),
        )
        for t in g.transports:
            for key, rows in t.report().items():
                report[key] = Report({name: Report(fields) for name, fields in rows.items()})
        return report

    def devices(self) -> Table:
        """
        Devices online: TGP and MQTT sessions, devices heard from in the last two minutes over HTTPS or
        through an MQTT broker the gateway consumes from, and every polled Modbus device with its state.
        """
        g = self.gateway
        now = g.reactor.seconds()
        rows = []
        for session in g.transports.sessions():
            if session.device is not None:
                rows.append(
                    {
                        "device": session.device.name,
                        "transport": session.source.transport,
                        "address": session.source.address,
                        "since": _ago(now, session.since),
                        "readings": session.readings,
                        "last_error": session.last_error or None,
                    }
                )
        for t in g.transports:
            rows.extend(t.devices())
        # Devices with no session of their own (HTTPS, a broker's stream, a plugin's) as heard lately.
        listed = {(r["device"], _family(r["transport"])) for r in rows}
        for seen in reversed(g.metrics.activity.values()):
            if now - seen.last > self.ACTIVE_HTTP:
                break
            if (seen.name, _family(seen.transport)) not in listed:
                rows.append(
                    {
                        "device": seen.name,
                        "transport": seen.transport,
                        "address": seen.address,
                        "since": _ago(now, seen.since),
                        "readings": seen.readings,
                        "last_error": seen.last_error or None,
                    }
                )
        return Table(sorted(rows, key=lambda r: (r["device"], r["transport"])))

    def kick(self, name: str) -> int:
        """
        Close a device's TGP and MQTT connections (TGP: BYE NORMAL; MQTT 5.0: DISCONNECT 0x98); it may
        reconnect. Returns how many were closed.
        """
        return self.gateway.transports.close(name, CloseReason.NORMAL, "closed by an administrator")

    def sinks(self) -> list[str]:
        """The names of the uploader's sinks."""
        uploader = self.gateway.uploader
        return sorted(uploader.loops) if uploader else []

    def _loops(self, sink: str | None) -> list[Any]:
        uploader = self.gateway.uploader
        loops = uploader.loops if uploader else {}
        if sink is None:
            return list(loops.values())
        if sink not in loops:
            raise KeyError(f"no sink {sink!r}; sinks: {', '.join(sorted(loops)) or '(none)'}")
        return [loops[sink]]

    def pause(self, sink: str | None = None) -> list[str]:
        """Stop sending to a sink (all with no name) until resume(); readings wait in the database."""
        loops = self._loops(sink)
        for loop in loops:
            loop.pause()
        return [loop.sink.name for loop in loops]

    def resume(self, sink: str | None = None) -> list[str]:
        """Start sending to a paused sink (all with no name) again."""
        loops = self._loops(sink)
        for loop in loops:
            loop.resume()
        return [loop.sink.name for loop in loops]

    def flush(self, sink: str | None = None) -> list[str]:
        """Send what waits for a sink now, without waiting for a full batch or the flush interval."""
        loops = self._loops(sink)
        for loop in loops:
            loop.flush()
        return [loop.sink.name for loop in loops]
