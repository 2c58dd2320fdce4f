"""
What a simulated device does with the commands it is sent, on every
protocol: it runs each command once (a command sent again, with an id it has
seen, is not run again; its result, if known, is reported again and the
gateway records it once), takes ``--command-delay`` seconds (or the
command's ``delay`` parameter) to run it, and reports ``succeeded`` with
what it ran, or ``failed`` when the command's parameters say ``"fail":
true``. The ``desired`` command applies its delta: the result is the delta.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

REMEMBERED = 10_000  # command ids a simulation remembers, to run each once

Report = Callable[[str, Any], None]  # report(status, result)


class CommandRunner:
    def __init__(self, clock: IReactorTime, delay: float) -> None:
        self.clock = clock
        self.delay = delay
        self.counts: Counter[str] = Counter()
        self._done: OrderedDict[tuple[str, str], tuple[str, Any] | None] = OrderedDict()

    def receive(self, device: str, id_: str, name: str, params: Any, report: Report) -> None:
        key = (device, id_)
        if key in self._done:
            self.counts["again"] += 1
            known = self._done[key]
            if known is not None:
                report(*known)
            return
        self._done[key] = None
        if len(self._done) > REMEMBERED:
            self._done.popitem(last=False)
        self.counts["received"] += 1
        params = params if isinstance(params, dict) else {}
        delay = params.get("delay", self.delay)
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= 3600:
            delay = self.delay

        def run() -> None:
            if params.get("fail") is True:
                outcome: tuple[str, Any] = ("failed", {"error": "failed on request (params.fail)"})
            elif name == "desired":
                outcome = ("succeeded", params.get("delta", {}))
            else:
                outcome = ("succeeded", {"ran": name, "params": params, "device": device})
            if key in self._done:
                self._done[key] = outcome
            self.counts[outcome[0]] += 1
            report(*outcome)

        self.clock.callLater(delay, run)
