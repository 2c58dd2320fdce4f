"""
The settings of an OPC UA server the gateway subscribes to: an ``[[opcua]]``
table of the config file with its ``[[opcua.node]]`` and ``[[opcua.browse]]``
tables, checked at start (and at SIGHUP) so that a mistake stops the start
with one line naming the table and the key. See ``opcua.py``.

Nodes are named by NodeId with the namespace URI (``nsu=urn:plant;s=Press4.T``):
a namespace index may change when the server restarts, its URI does not. The
index is looked up in the server's namespace array at every session.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gateway.readings import NAME_RULE, is_name
from gateway.tables import checked_number, config_table

KEYS = {
    "name", "device", "endpoint", "security", "server-certificate", "user", "password-env", "certificate",
    "private-key", "publishing", "sampling", "queue-size", "max-items-per-subscription", "max-subscriptions",
    "backoff", "backoff-cap", "timeout", "node", "browse",
}  # fmt: skip
NODE_KEYS = {"node", "metric", "device", "sampling", "queue-size", "deadband", "scale", "offset", "writable"}
BROWSE_KEYS = {"under", "match", "device", "prefix", "depth", "sampling", "queue-size", "deadband", "writable"}
POLICIES = {
    "basic256sha256": "Basic256Sha256",
    "aes128sha256rsaoaep": "Aes128Sha256RsaOaep",
    "aes256sha256rsapss": "Aes256Sha256RsaPss",
}
MODES = {"sign": "Sign", "signandencrypt": "SignAndEncrypt"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_NODE = re.compile(r"^(nsu=[^;]+;|ns=\d+;)?[isgb]=.+$", re.S)


class OpcuaConfigError(ValueError):
    """An [[opcua]] table is wrong; the message says which table and key, and how."""


@dataclass(frozen=True)
class Item:
    """One node the gateway monitors (or writes): where its value goes and how it is asked for."""

    node: str  # NodeId as text, with nsu= (or ns=, or namespace 0)
    metric: str
    device: str
    sampling: float  # seconds
    queue_size: int
    deadband: float = 0.0  # absolute; 0: every change
    scale: float = 1.0
    offset: float = 0.0
    writable: bool = False


@dataclass(frozen=True)
class Browse:
    """Nodes found at each session under ``under`` whose browse name matches ``match`` (a glob)."""

    under: str
    match: str
    device: str
    prefix: str
    depth: int
    sampling: float
    queue_size: int
    deadband: float
    writable: bool


@dataclass(frozen=True)
class OpcuaSource:
    name: str
    endpoint: str
    items: tuple[Item, ...]
    browse: tuple[Browse, ...] = ()
    policy: str | None = None  # asyncua's SecurityPolicy name; None: no security
    mode: str | None = None  # "Sign" | "SignAndEncrypt"
    server_certificate: str | None = None  # pinned: only this server is talked to
    user: str | None = None
    password: str | None = None
    certificate: str | None = None  # X.509 user identity
    private_key: str | None = None
    publishing: float = 1.0
    max_items: int = 1000
    max_subscriptions: int = 10
    backoff: float = 1.0
    backoff_cap: float = 5.0
    timeout: float = 10.0

    @property
    def security(self) -> str:
        return f"{self.mode}:{self.policy}" if self.policy else "None"

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(sorted({i.device for i in self.items} | {b.device for b in self.browse}))


def _security(value: Any) -> tuple[str | None, str | None]:
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None, None
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(
            f"security: {value!r}: give None, or MODE:POLICY with MODE Sign or SignAndEncrypt and POLICY "
            "Basic256Sha256, Aes128_Sha256_RsaOaep or Aes256_Sha256_RsaPss"
        )
    mode, policy = value.split(":", 1)
    m, p = MODES.get(mode.lower()), POLICIES.get(policy.replace("_", "").lower())
    if m is None:
        raise ValueError(f"security: mode {mode!r} is not Sign or SignAndEncrypt")
    if p is None:
        raise ValueError(
            f"security: policy {policy!r} is not Basic256Sha256, Aes128_Sha256_RsaOaep or Aes256_Sha256_RsaPss"
        )
    return p, m


def _file(table: Mapping[str, Any], key: str) -> str | None:
    path = table.get(key)
    if path is None:
        return None
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ValueError(f"{key}: {path!r} is not a readable file")
    return path


def whole(table: Mapping[str, Any], key: str, default: int, hi: int) -> int:
    return int(checked_number(table.get(key, default), key, 1, hi, whole=True))


def check_node(text: Any, key: str = "node") -> str:
    if not isinstance(text, str) or not _NODE.match(text.strip()):
        raise ValueError(
            f"{key}: {text!r} is not a NodeId such as nsu=urn:plant:press;s=Press4.Temperature (or i=2258)"
        )
    return text.strip()


def source_from_table(
    table: Any, index: int, duration: Callable[[Any], float], environ: Mapping[str, str] | None = None
) -> OpcuaSource:
    """An ``[[opcua]]`` table; OpcuaConfigError names the table and the key."""
    environ = os.environ if environ is None else environ
    if not isinstance(table, dict):
        raise OpcuaConfigError(f"[[opcua]] #{index + 1}: not a table")
    label = f"[[opcua]] {table.get('name') or table.get('device') or table.get('endpoint') or '#' + str(index + 1)!r}"
    try:
        table = config_table(table, KEYS, "; an OPC UA server")
        endpoint = table.get("endpoint")
        parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
        if parts is None or parts.scheme != "opc.tcp" or not parts.hostname:
            raise ValueError(f"endpoint: {endpoint!r} is not an opc.tcp://host:port URL")
        if parts.username or parts.password:
            raise ValueError("endpoint: give the user as user and the password by password-env, not in the URL")
        name = table.get("name", table.get("device") or f"{parts.hostname}:{parts.port or 4840}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"name: {name!r}: letters, digits and _ . : - (64 at most)")
        policy, mode = _security(table.get("security"))
        user = table.get("user")
        password = None
        if user is not None:
            env = table.get("password-env")
            if not isinstance(user, str) or not user or not isinstance(env, str) or env not in environ:
                raise ValueError("user: give password-env too, the environment variable holding the password")
            password = environ[env]
        elif "password-env" in table:
            raise ValueError("password-env: give user too")
        certificate, private_key = _file(table, "certificate"), _file(table, "private-key")
        if (certificate is None) != (private_key is None):
            raise ValueError("certificate and private-key go together (the X.509 identity the session activates with)")
        if certificate is not None and user is not None:
            raise ValueError("user and certificate: the session has one identity; give one of them")

        def seconds(t: Mapping[str, Any], key: str, default: float, lo: float = 0.0) -> float:
            raw = t.get(key, default)
            try:
                value = duration(raw)
            except ValueError:
                raise ValueError(f"{key}: {raw!r} is not a duration such as 500ms, 2s or 1m") from None
            if value < lo:
                raise ValueError(f"{key}: {value:g}s is shorter than {lo:g}s")
            return value

        publishing = seconds(table, "publishing", 1.0, 0.05)
        sampling = seconds(table, "sampling", publishing)
        default_queue = table.get("queue-size", 10)  # values a node keeps between two publishes, server side
        device = table.get("device")
        if device is not None and (not isinstance(device, str) or not device):
            raise ValueError("device: give the name of a registered device")

        def common(t: Mapping[str, Any], what: str) -> dict[str, Any]:
            dev = t.get("device", device)
            if not isinstance(dev, str) or not dev:
                raise ValueError(f"{what}: give device (here or in the [[opcua]] table)")
            writable = t.get("writable", False)
            if not isinstance(writable, bool):
                raise ValueError(f"{what}: writable: true or false")
            return {
                "device": dev,
                "sampling": seconds(t, "sampling", sampling),
                "queue_size": int(checked_number(t.get("queue-size", default_queue), "queue-size", 1, 10000, True)),
                "deadband": float(checked_number(t.get("deadband", 0.0), "deadband", 0.0)),
                "writable": writable,
            }

        items: list[Item] = []
        nodes = table.get("node", [])
        if not isinstance(nodes, list):
            raise ValueError("node: give each node as an [[opcua.node]] table")
        seen: set[tuple[str, str]] = set()
        for n, raw in enumerate(nodes):
            if not isinstance(raw, dict):
                raise ValueError(f"node #{n + 1}: not a table")
            t = config_table(raw, NODE_KEYS, "; an [[opcua.node]]")
            what = f"node {t.get('node')!r}"
            node = check_node(t.get("node"), f"node #{n + 1}")
            metric = t.get("metric")
            if not is_name(metric):
                raise ValueError(f"{what}: metric: {metric!r} is not a metric name ({NAME_RULE})")
            scale = float(checked_number(t.get("scale", 1.0), "scale"))
            if scale == 0:
                raise ValueError(f"{what}: scale: 0 would make every value 0")
            item = Item(
                node=node,
                metric=metric,
                scale=scale,
                offset=float(checked_number(t.get("offset", 0.0), "offset")),
                **common(t, what),
            )
            if (item.device, item.metric) in seen:
                raise ValueError(f"{what}: metric {metric!r} of {item.device} is given by two nodes")
            seen.add((item.device, item.metric))
            items.append(item)
        browses: list[Browse] = []
        raw_browse = table.get("browse", [])
        if not isinstance(raw_browse, list):
            raise ValueError("browse: give each as an [[opcua.browse]] table")
        for n, raw in enumerate(raw_browse):
            if not isinstance(raw, dict):
                raise ValueError(f"browse #{n + 1}: not a table")
            t = config_table(raw, BROWSE_KEYS, "; an [[opcua.browse]]")
            match = t.get("match", "*")
            prefix = t.get("prefix", "")
            if not isinstance(match, str) or not match or not isinstance(prefix, str):
                raise ValueError(f"browse #{n + 1}: match is a glob of browse names (Temp*), prefix a text")
            browses.append(
                Browse(
                    under=check_node(t.get("under"), f"browse #{n + 1}: under"),
                    match=match,
                    prefix=prefix,
                    depth=int(checked_number(t.get("depth", 1), "depth", 1, 8, True)),
                    **common(t, f"browse #{n + 1}"),
                )
            )
        if not items and not browses:
            raise ValueError("give the nodes to monitor: [[opcua.node]] or [[opcua.browse]] tables")
        return OpcuaSource(
            name=name,
            endpoint=endpoint,
            items=tuple(items),
            browse=tuple(browses),
            policy=policy,
            mode=mode,
            server_certificate=_file(table, "server-certificate"),
            user=user,
            password=password,
            certificate=certificate,
            private_key=private_key,
            publishing=publishing,
            max_items=int(
                checked_number(
                    table.get("max-items-per-subscription", 1000), "max-items-per-subscription", 1, 100000, True
                )
            ),
            max_subscriptions=int(
                checked_number(table.get("max-subscriptions", 10), "max-subscriptions", 1, 1000, True)
            ),
            backoff=seconds(table, "backoff", 1.0, 0.01),
            backoff_cap=seconds(table, "backoff-cap", 5.0, 0.01),
            timeout=seconds(table, "timeout", 10.0, 0.5),
        )
    except ValueError as e:
        raise OpcuaConfigError(f"{label}: {e}") from None
