"""
A cloud endpoint for upload tests: a twisted.web site on 127.0.0.1 with a
certificate from a test CA, that follows a script of faults (status codes,
Retry-After, delays, dropped connections) and records what it accepted.

Run as a program (``python -m tests.receiver CA_DIR OUT.jsonl [ACTION ...]``)
it serves in its own process, writes its port to CA_DIR/port and appends one
JSON line per accepted batch to OUT.jsonl, for tests that kill the gateway.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import ssl
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.certs import TestCA


@dataclass
class Received:
    key: str
    lines: list[dict[str, Any]]
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class Receiver(Resource):
    """
    Actions, taken one per request in order (then "ok" for ever):
    "ok", "drop", ("status", code) or ("status", code, retry_after), ("delay", seconds)
    (answer 200 that much later), ("hold", seconds) (take the batch now, answer 200 later).
    """

    isLeaf = True

    def __init__(self, clock: Any, script: list[Any] | None = None, out: Path | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.script: deque[Any] = deque(script or [])
        self.accepted: list[Received] = []
        self.attempts: list[str] = []  # Idempotency-Key of every request, in order
        self.out = out

    @property
    def readings(self) -> list[dict[str, Any]]:
        return [line for batch in self.accepted for line in batch.lines]

    def render_POST(self, request: Any) -> Any:
        key = (request.getHeader("idempotency-key") or "").strip()
        self.attempts.append(key)
        action = self.script.popleft() if self.script else "ok"
        kind = action if isinstance(action, str) else action[0]
        if kind == "drop":
            request.channel.transport.abortConnection()
            return NOT_DONE_YET
        if kind == "status":
            request.setResponseCode(action[1])
            if len(action) > 2:
                request.setHeader("Retry-After", str(action[2]))
            return json.dumps({"error": f"scripted {action[1]}"}).encode()
        if kind in ("delay", "hold"):
            gone: list[bool] = []
            request.notifyFinish().addErrback(lambda _: gone.append(True))
            answer = self._accept(request, key) if kind == "hold" else None
            self.clock.callLater(action[1], self._answer_later, request, key, answer, gone)
            return NOT_DONE_YET
        return self._accept(request, key)

    def _answer_later(self, request: Any, key: str, answer: bytes | None, gone: list[bool]) -> None:
        if gone:  # the client gave up
            return
        request.write(answer if answer is not None else self._accept(request, key))
        request.finish()

    def _accept(self, request: Any, key: str) -> bytes:
        body = request.content.read()
        if request.getHeader("content-type") == "application/json":  # an alert notice: one JSON document
            assert request.getHeader("content-encoding") is None
            lines = [json.loads(body)]
        else:
            assert request.getHeader("content-encoding") == "gzip"
            assert request.getHeader("content-type") == "application/x-ndjson"
            text = gzip.decompress(body).decode("utf-8")
            lines = [json.loads(line) for line in text.splitlines() if line]
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.accepted.append(Received(key, lines, body, headers))
        if self.out is not None:
            with self.out.open("a") as f:
                f.write(json.dumps({"key": key, "lines": lines}) + "\n")
        request.setResponseCode(200)
        return b'{"ok":true}'


def listen(reactor: Any, receiver: Receiver, ca: TestCA, names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Any:
    """Serve ``receiver`` over TLS with a certificate for ``names`` from ``ca``; returns the port."""
    cert = ssl.PrivateCertificate.loadPEM(ca.issue(names[0], names))
    options = ssl.CertificateOptions(
        privateKey=cert.privateKey.original,
        certificate=cert.original,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    site = Site(receiver)
    site.log = lambda request: None  # type: ignore[method-assign]
    return reactor.listenSSL(0, site, options, interface="127.0.0.1")


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    where, out = Path(argv[0]), Path(argv[1])
    script: list[Any] = []
    for word in argv[2:]:  # ok | drop | 500 | 429:3 | delay:2 | hold:2
        if word in ("ok", "drop"):
            script.append(word)
        elif word.startswith(("delay:", "hold:")):
            kind, _, seconds = word.partition(":")
            script.append((kind, float(seconds)))
        else:
            code, _, after = word.partition(":")
            script.append(("status", int(code), after) if after else ("status", int(code)))
    ca = TestCA()
    ca.write(where / "ca.pem")
    port = listen(reactor, Receiver(reactor, script, out), ca)
    (where / "port.tmp").write_text(str(port.getHost().port))
    (where / "port.tmp").replace(where / "port")
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
