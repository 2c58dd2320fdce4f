"""
Edge alerts: rules from the config file, evaluated on the gateway as
readings are committed, so a truck overheating is known without a round
trip to the cloud.

    [[alert]]
    name = "oil-hot"
    metric = "oil_temp"
    above = 120          # fires when a reading is above this (or: below = ...)
    clear = 110          # clears at or below this: hysteresis [default: the threshold]
    devices = "truck-*"  # which devices (a shell pattern) [default: all]

    [[alert]]
    name = "reboot-lost"
    command = "reboot*"  # fires when a command of this name (a shell pattern) expires unfinished;
    devices = "truck-*"  # clears when one to the same device succeeds

    [[alert]]
    name = "oil-climbing"
    metric = "oil_temp"
    rise = 15            # fires when the value rose by more than this (or: fall = ...)
    window = "5m"        # within this window
    clear = 5            # clears when the rise within the window is at most this [default: rise]

Theory of operation. ``AlertEngine.observe`` gets each write's readings
after COMMIT. Per (rule, device) it keeps the newest time evaluated (a
late, older reading is not evaluated, as it does not move the twin) and,
for rate rules, the readings within the window. A change of state is one
statement: the alert row (fired, or cleared) and, when a webhook is
configured, a notice row in the same transaction. The database decides:
a unique index allows one open alert per rule and device, so two gateways
seeing the same condition record it once. Changes of one (rule, device)
are written in order.

``outbound.notices`` sends the notices to ``--alert-webhook``.

An alert is evaluated after the device's ack, not before: a crash between
the two loses the change, and the next reading of the device (or the rule
still holding) records it.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.families import counter, gauge
from gateway.storage.pool import PgPool
from gateway.readings import NAME_RULE, Device, Reading, format_ts, is_name
from gateway.tables import known_keys, table_number

log = Logger()

KEYS = 100_000  # (rule, device) states kept; the least recently used go first
# A rate rule keeps at most one reading per 1/WINDOW_STEPS of its window for each
# device: the change is measured from a reading at most that much later than the
# window's start, and memory stays bounded however fast a device sends.
WINDOW_STEPS = 64


class AlertError(Exception):
    """An [[alert]] table is wrong; the message names it."""


@dataclass(frozen=True)
class AlertRule:
    name: str
    metric: str
    devices: str = "*"
    above: float | None = None
    below: float | None = None
    rise: float | None = None
    fall: float | None = None
    window: float | None = None
    clear: float | None = None
    command: str | None = None  # a command rule: the command names it watches (a shell pattern)

    @property
    def rate(self) -> bool:
        return self.rise is not None or self.fall is not None

    def applies(self, device: str, metric: str) -> bool:
        return self.command is None and metric == self.metric and fnmatch.fnmatchcase(device, self.devices)

    def watches(self, device: str, command: str) -> bool:
        return (
            self.command is not None
            and fnmatch.fnmatchcase(command, self.command)
            and (fnmatch.fnmatchcase(device, self.devices))
        )

    def fires(self, x: float) -> bool:
        """x: the value (threshold) or its change within the window (rate)."""
        if self.above is not None:
            return x > self.above
        if self.below is not None:
            return x < self.below
        if self.rise is not None:
            return x > self.rise
        assert self.fall is not None
        return -x > self.fall

    def clears(self, x: float) -> bool:
        limit = self.clear
        if self.above is not None:
            return x <= (self.above if limit is None else limit)
        if self.below is not None:
            return x >= (self.below if limit is None else limit)
        if self.rise is not None:
            return x <= (self.rise if limit is None else limit)
        assert self.fall is not None
        return -x <= (self.fall if limit is None else limit)

    def describe(self, x: float) -> str:
        if self.above is not None:
            return f"{self.metric} {x:g} is above {self.above:g}"
        if self.below is not None:
            return f"{self.metric} {x:g} is below {self.below:g}"
        window = f"{self.window:g}s"
        if self.rise is not None:
            return f"{self.metric} rose {x:g} within {window} (more than {self.rise:g})"
        return f"{self.metric} fell {-x:g} within {window} (more than {self.fall:g})"


def rules_from_tables(tables: Any, parse_age: Callable[[Any], float]) -> tuple[AlertRule, ...]:
    """[[alert]] tables → rules, or AlertError naming the table and key."""
    if not isinstance(tables, list):
        raise AlertError("[[alert]]: give alert rules as an array of tables ([[alert]] headings)")
    rules: list[AlertRule] = []
    known = {"name", "metric", "devices", "above", "below", "rise", "fall", "window", "clear", "command"}
    for i, table in enumerate(tables):
        where = f"[[alert]] #{i + 1}"
        if not isinstance(table, dict):
            raise AlertError(f"{where}: must be a table")
        name = table.get("name")
        if not is_name(name):
            raise AlertError(f"{where}.name: {NAME_RULE}")
        where = f"[[alert]] {name}"
        try:
            known_keys(table, known)
        except ValueError as e:
            raise AlertError(f"{where}: {e}") from None
        if any(r.name == name for r in rules):
            raise AlertError(f"{where}: another rule has this name")
        if "command" in table:
            rules.append(_command_rule(table, name, where))
            continue
        metric = table.get("metric")
        if not is_name(metric):
            raise AlertError(f"{where}.metric: {NAME_RULE}")
        devices = table.get("devices", "*")
        if not isinstance(devices, str) or not devices:
            raise AlertError(f"{where}.devices: {devices!r} is not a pattern such as truck-*")
        values = {k: table_number(table, k, where, AlertError) for k in ("above", "below", "rise", "fall", "clear")}
        kinds = [k for k in ("above", "below", "rise", "fall") if values[k] is not None]
        if len(kinds) != 1:
            raise AlertError(f"{where}: give exactly one of above, below, rise or fall")
        kind = kinds[0]
        window = None
        if kind in ("rise", "fall"):
            if "window" not in table:
                raise AlertError(f"{where}.window: needed by {kind} (how long the change may take: 5m)")
            try:
                window = parse_age(table["window"])
            except ValueError as e:
                raise AlertError(f"{where}.window: {e}") from None
            if values[kind] <= 0:  # type: ignore[operator]
                raise AlertError(f"{where}.{kind}: must be above 0")
        elif "window" in table:
            raise AlertError(f"{where}.window: only rise and fall take a window")
        clear = values["clear"]
        if clear is not None:
            limit = values[kind]
            assert limit is not None
            bad = clear < limit if kind == "below" else clear > limit
            if bad:
                side = "below" if kind == "below" else "above"
                raise AlertError(f"{where}.clear: {clear:g} must not be {side} {kind} ({values[kind]:g})")
        rules.append(
            AlertRule(
                name,
                metric,
                devices,
                values["above"],
                values["below"],
                values["rise"],
                values["fall"],
                window,
                clear,
            )
        )
    return tuple(rules)


def _command_rule(table: dict[str, Any], name: str, where: str) -> AlertRule:
    pattern, devices = table["command"], table.get("devices", "*")
    if not isinstance(pattern, str) or not pattern:
        raise AlertError(f"{where}.command: {pattern!r} is not a command name or pattern such as reboot*")
    if not isinstance(devices, str) or not devices:
        raise AlertError(f"{where}.devices: {devices!r} is not a pattern such as truck-*")
    extra = sorted(set(table) - {"name", "command", "devices"})
    if extra:
        raise AlertError(f"{where}.{extra[0]}: a command rule takes only command and devices")
    return AlertRule(name, f"command:{pattern}", devices, command=pattern)


FIRE = """
WITH fired AS (
    INSERT INTO alerts (rule, device_id, metric, message, fired_ts, fired_value)
    VALUES (%(rule)s, %(device)s, %(metric)s, %(message)s,
            timestamptz 'epoch' + %(ts)s * interval '1 microsecond', %(value)s)
    ON CONFLICT (rule, device_id) WHERE cleared_at IS NULL DO NOTHING
    RETURNING id
), notice AS (
    INSERT INTO alert_notices (alert_id, event) SELECT id, 'fired' FROM fired WHERE %(notify)s
)
SELECT id FROM fired
"""

CLEAR = """
WITH cleared AS (
    UPDATE alerts SET cleared_at = now(), cleared_ts = timestamptz 'epoch' + %(ts)s * interval '1 microsecond',
                      cleared_value = %(value)s
    WHERE rule = %(rule)s AND device_id = %(device)s AND cleared_at IS NULL
    RETURNING id
), notice AS (
    INSERT INTO alert_notices (alert_id, event) SELECT id, 'cleared' FROM cleared WHERE %(notify)s
)
SELECT id FROM cleared
"""

OPEN_ALERTS = """
SELECT a.rule, a.device_id, d.name, a.metric, a.message, (extract(epoch FROM a.fired_at) * 1000000)::bigint
FROM alerts a JOIN devices d ON d.id = a.device_id WHERE a.cleared_at IS NULL
"""


class _State:
    __slots__ = ("last_ts", "points")

    def __init__(self) -> None:
        self.last_ts = -(2**63)
        self.points: deque[tuple[int, float]] = deque(maxlen=WINDOW_STEPS + 2)


class AlertEngine:
    """Evaluates rules on committed readings; records changes; wakes the notifier."""

    def __init__(self, rules: Sequence[AlertRule], pool: PgPool, clock: IReactorTime, notify: bool = False) -> None:
        self.rules = tuple(rules)
        self.pool = pool
        self.clock = clock
        self.notify = notify  # a webhook is configured: write notices
        self.on_change: list[Callable[[], None]] = []
        self.open: dict[tuple[str, int], dict[str, Any]] = {}
        self.fired = 0
        self.cleared = 0
        self._states: OrderedDict[tuple[str, int], _State] = OrderedDict()
        self._tails: dict[tuple[str, int], Deferred] = {}

    def reconfigure(self, rules: Sequence[AlertRule]) -> None:
        """New rules (SIGHUP): they apply from the next committed reading."""
        self.rules = tuple(rules)

    def live_metrics(self) -> Iterator[Any]:
        yield gauge("gateway_alerts_open", "Edge alerts open, as this gateway knows them.", len(self.open))
        yield counter("gateway_alerts_fired", "Edge alerts this gateway recorded firing.", [], self.fired)
        yield counter("gateway_alerts_cleared", "Edge alerts this gateway recorded clearing.", [], self.cleared)

    def load(self) -> Deferred:
        """Learn the alerts open in the database (fired earlier, or by another gateway)."""

        def got(rows: list[tuple]) -> None:
            for rule, device_id, name, metric, message, fired_at in rows:
                self.open[(rule, device_id)] = {
                    "rule": rule,
                    "device": name,
                    "metric": metric,
                    "message": message,
                    "since": format_ts(fired_at),
                }

        return self.pool.run(lambda c: c.runQuery(OPEN_ALERTS)).addCallback(got)

    def observe(self, device: Device, readings: Sequence[Reading]) -> None:
        for rule in self.rules:
            mine = [r for r in readings if rule.applies(device.name, r[0])]
            if mine:
                self._evaluate(rule, device, sorted(mine, key=lambda r: r[1]))

    def command_finished(self, device_id: int, device: str, command: str, id_: str, state: str, at_us: int) -> None:
        """A command ended: expired fires the command rules watching it; succeeded clears them."""
        for rule in self.rules:
            if not rule.watches(device, command):
                continue
            key, who = (rule.name, device_id), Device(device_id, device)
            if state == "expired" and key not in self.open:
                self._change(FIRE, rule, who, at_us, 0.0, f"command {id_} ({command}) expired unfinished")
            elif state == "succeeded" and key in self.open:
                self._change(CLEAR, rule, who, at_us, 0.0, "")

    def _state(self, key: tuple[str, int]) -> _State:
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _State()
            if len(self._states) > KEYS:
                self._states.popitem(last=False)
        else:
            self._states.move_to_end(key)
        return state

    def _evaluate(self, rule: AlertRule, device: Device, readings: list[Reading]) -> None:
        key = (rule.name, device.id)
        state = self._state(key)
        for _, ts, value in readings:
            if ts <= state.last_ts:
                continue  # late and older: it does not change the present
            state.last_ts = ts
            x = value
            if rule.rate:
                points = state.points
                span = int(rule.window * 1_000_000)  # type: ignore[operator]
                while points and points[0][0] < ts - span:
                    points.popleft()
                if not points or ts - points[-1][0] >= span // WINDOW_STEPS:
                    points.append((ts, value))
                x = value - points[0][1]
            if key not in self.open and rule.fires(x):
                self._change(FIRE, rule, device, ts, value, rule.describe(x))
            elif key in self.open and rule.clears(x):
                self._change(CLEAR, rule, device, ts, value, "")

    def _change(self, sql: str, rule: AlertRule, device: Device, ts: int, value: float, message: str) -> None:
        key = (rule.name, device.id)
        before = self.open.get(key)
        if sql is FIRE:
            self.open[key] = {
                "rule": rule.name,
                "device": device.name,
                "metric": rule.metric,
                "message": message,
                "since": format_ts(ts),
            }
            log.warn(
                "alert {rule} fired for device {device}: {message}", rule=rule.name, device=device.name, message=message
            )
        else:
            self.open.pop(key, None)
            log.info("alert {rule} cleared for device {device}", rule=rule.name, device=device.name)
        params = {
            "rule": rule.name,
            "device": device.id,
            "metric": rule.metric,
            "message": message,
            "ts": ts,
            "value": value,
            "notify": self.notify,
        }
        previous = self._tails.get(key) or succeed(None)

        def write(_: Any) -> Deferred:
            return self.pool.run(lambda c: c.runQuery(sql, params))

        def done(result: Any) -> None:
            if self._tails.get(key) is d:
                del self._tails[key]
            if isinstance(result, Failure):
                # Back to what the database holds, so the next reading tries the change again.
                if before is None:
                    self.open.pop(key, None)
                else:
                    self.open[key] = before
                log.warn(
                    "alert {rule} for device {device} not recorded (the next reading tries again): {error}",
                    rule=rule.name,
                    device=device.name,
                    error=str(result.value).strip().splitlines()[0] if str(result.value).strip() else result.type,
                )
                return
            if result:
                if sql is FIRE:
                    self.fired += 1
                else:
                    self.cleared += 1
                for wake in self.on_change:
                    wake()

        d = previous.addCallback(write)
        d.addBoth(done)
        self._tails[key] = d

    def settled(self) -> Deferred:
        """Fires when every change so far is written (for tests and shutdown)."""
        return DeferredList(list(self._tails.values()))

    def open_alerts(self) -> list[dict[str, Any]]:
        return [self.open[k] for k in sorted(self.open)]
