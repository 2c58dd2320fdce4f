"""
Server endpoint strings, as ``twistd web --listen`` takes them (``tcp:9000``,
``ssl:8443:interface=127.0.0.1``), checked before anything starts.

``ssl:`` endpoints are served as ``tcp:`` plus our own TLS wrapper
(``gateway.net.tls``), so every TLS listener gets the same protocol floor and
cipher list whether or not the string names a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_TCP_KEYS = {"port", "interface", "backlog"}
_SSL_KEYS = _TCP_KEYS | {"privateKey", "certKey", "extraCertChain"}


@dataclass(frozen=True)
class EndpointSpec:
    kind: str  # "tcp" or "ssl"
    port: int
    interface: str = ""
    backlog: int | None = None
    private_key: Path | None = None
    cert_key: Path | None = None
    extra_cert_chain: Path | None = None
    text: str = ""

    @property
    def tls(self) -> bool:
        return self.kind == "ssl"

    def tcp_description(self) -> str:
        """The plain TCP endpoint underneath, for ``serverFromString``."""
        parts = [f"tcp:{self.port}"]
        if self.interface:
            parts.append("interface=" + _escape(self.interface))
        # Twisted listens with a backlog of 50; after a gateway restart a whole
        # fleet reconnects at once, so take more (the kernel caps it at somaxconn).
        parts.append(f"backlog={self.backlog if self.backlog is not None else DEFAULT_BACKLOG}")
        return ":".join(parts)

    def __str__(self) -> str:
        return self.text


DEFAULT_BACKLOG = 1024


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _split(description: str) -> list[str]:
    """Split on unescaped colons; a backslash escapes the next character."""
    parts, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append("\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if escaped:
        raise ValueError("ends with a lone backslash")
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    out, escaped = [], False
    for ch in text:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        else:
            out.append(ch)
    return "".join(out)


def _split_key(part: str) -> tuple[str | None, str]:
    i = 0
    while i < len(part):
        if part[i] == "\\":
            i += 2
            continue
        if part[i] == "=":
            return _unescape(part[:i]), _unescape(part[i + 1 :])
        i += 1
    return None, _unescape(part)


def parse_endpoint(description: str, kinds: tuple[str, ...] = ("tcp", "ssl")) -> EndpointSpec:
    """Parse and check a server endpoint string; ValueError says what is wrong."""
    try:
        parts = _split(description)
    except ValueError as e:
        raise ValueError(f"{description!r}: {e}") from None
    kind = parts[0]
    if kind not in kinds:
        raise ValueError(f"{description!r}: endpoint type must be one of {', '.join(k + ':' for k in kinds)}")
    positional: list[str] = []
    named: dict[str, str] = {}
    allowed = _SSL_KEYS if kind == "ssl" else _TCP_KEYS
    for part in parts[1:]:
        key, value = _split_key(part)
        if key is None:
            positional.append(value)
        elif key not in allowed:
            raise ValueError(f"{description!r}: unknown parameter {key!r} for {kind}:")
        else:
            named[key] = value
    if len(positional) > 1 or (positional and "port" in named):
        raise ValueError(f"{description!r}: give the port once")
    port_text = positional[0] if positional else named.get("port")
    if port_text is None:
        raise ValueError(f"{description!r}: no port")
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ValueError(f"{description!r}: port {port_text!r} is not a number in 0..65535") from None
    backlog = None
    if "backlog" in named:
        try:
            backlog = int(named["backlog"])
            if backlog < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"{description!r}: backlog must be a positive number") from None

    def path_of(key: str) -> Path | None:
        if key not in named:
            return None
        path = Path(named[key]).expanduser()
        if not path.is_file():
            raise ValueError(f"{description!r}: {key} {str(path)!r} is not a readable file")
        return path

    private_key = path_of("privateKey")
    cert_key = path_of("certKey")
    if cert_key is not None and private_key is None:
        raise ValueError(f"{description!r}: certKey needs privateKey")
    if private_key is not None and cert_key is None:
        # Twisted's ssl: endpoints accept a PEM holding both key and certificate.
        cert_key = private_key
    return EndpointSpec(
        kind=kind,
        port=port,
        interface=named.get("interface", ""),
        backlog=backlog,
        private_key=private_key,
        cert_key=cert_key,
        extra_cert_chain=path_of("extraCertChain"),
        text=description,
    )
