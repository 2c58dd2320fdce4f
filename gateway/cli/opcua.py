"""
``gatewayctl opcua status``: each gateway's OPC UA sessions, as they last
reported them; ``gatewayctl opcua browse ENDPOINT``: a server's address space
(NodeId with its namespace URI, browse name, data type, current value), to
find the nodes an ``[[opcua]]`` table maps, as ``modbus read`` does for
registers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from gateway.net.opcua_ids import with_index, with_uri
from gateway.cli.common import CommandError, note, reported_state, reports, when
from gateway.cli.common import seconds as _seconds

POLICIES = ("Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss")


def cmd_opcua_status(args: argparse.Namespace) -> None:
    rows = reports(args, "opcua_sources", "source")
    if not rows and not args.json:
        note("no OPC UA servers: give the gateway [[opcua]] tables in its config file")
    for gateway, source, s, at, age in rows:
        state = reported_state(s, age)
        print(f"source {source}  {s['endpoint']}  security {s['security']}  on gateway {gateway}")
        print(f"  state         {state} for {_seconds(s['state_seconds'])}  (reported {when(at)})")
        print(f"  monitored     {s['monitored']} nodes in {s['subscriptions']} subscriptions")
        for key, why in s["refused"].items():
            print(f"  refused       {key}: {why}")
        print(f"  values        {s['values']} received, {s['readings']} readings stored new")
        p99 = s["commit_p99_seconds"]
        to_commit = "-" if p99 is None else f"{p99 * 1000:.0f} ms"
        print(f"  last value    {_seconds(s['last_value_seconds'])} ago; publish to COMMIT p99 {to_commit}")
        for key, codes in s["bad"].items():
            print(f"  not stored    {key}: " + ", ".join(f"{n} {code}" for code, n in codes.items()))
        reasons = ", ".join(f"{n} {reason}" for reason, n in s["gaps_by_reason"].items())
        print(f"  gaps          {s['gaps']}" + (f" ({reasons})" if reasons else ""))
        if s["last_error"]:
            print(f"  last error    {s['last_error']}")


async def _browse(args: argparse.Namespace) -> list[dict[str, Any]]:
    from asyncua import Client, ua

    client = Client(args.endpoint, timeout=args.timeout)
    client.application_uri = "urn:txgateway:client"
    if args.user:
        password = os.environ.get(args.password_env or "", None)
        if password is None:
            raise CommandError("--user: give --password-env, the environment variable holding the password")
        client.set_user(args.user)
        client.set_password(password)
    if args.security != "None":
        mode, _, policy = args.security.partition(":")
        folder = Path(tempfile.mkdtemp(prefix="opcua-browse-"))
        cert, key = await client.setup_self_signed_certificate(folder / "key.pem", folder / "cert.der")
        await client.set_security_string(f"{policy.replace('_', '')},{mode},{cert},{key}")
    await client.connect()
    try:
        namespaces = await client.get_namespace_array()
        try:
            start = client.get_node(with_index(args.node, namespaces)) if args.node else client.nodes.objects
        except LookupError as e:
            raise CommandError(f"--node: {e} {namespaces}") from None
        rows: list[dict[str, Any]] = []

        async def walk(node: Any, depth: int, path: str) -> None:
            for child in await node.get_children():
                name = (await child.read_browse_name()).Name
                cls = await child.read_node_class()
                nid = child.nodeid
                row: dict[str, Any] = {
                    "node": with_uri(nid.to_string(), nid.NamespaceIndex, namespaces),
                    "path": f"{path}/{name}",
                    "class": cls.name,
                }
                if cls == ua.NodeClass.Variable:
                    try:
                        row["type"] = (await child.read_data_type_as_variant_type()).name
                        value = await child.read_data_value(raise_on_bad_status=False)
                        row["value"] = value.Value.Value if value.Value is not None else None
                        row["status"] = value.StatusCode.name if value.StatusCode is not None else "Good"
                    except ua.UaError as e:
                        row["status"] = str(e)
                rows.append(row)
                if cls == ua.NodeClass.Object and depth > 1 and not (nid.NamespaceIndex == 0 and not args.node):
                    await walk(child, depth - 1, f"{path}/{name}")

        await walk(start, args.depth, "")
        return rows
    finally:
        await client.disconnect()


def cmd_opcua_browse(args: argparse.Namespace) -> None:
    if not args.endpoint.startswith("opc.tcp://"):
        raise CommandError(f"ENDPOINT {args.endpoint!r}: give opc.tcp://host:port")
    try:
        rows = asyncio.run(asyncio.wait_for(_browse(args), args.timeout * 10))
    except (OSError, asyncio.TimeoutError) as e:
        raise CommandError(f"{args.endpoint}: {type(e).__name__}: {e}") from None
    except Exception as e:
        if type(e).__module__.startswith("asyncua"):
            raise CommandError(f"{args.endpoint}: {type(e).__name__}: {e}") from None
        raise
    if args.json:
        print(json.dumps(rows, default=str))
        return
    for row in rows:
        if row["class"] != "Variable":
            print(f"{row['path']}  ({row['class']})  {row['node']}")
            continue
        value = row.get("value")
        print(f"  {row['node']}  {row['path'].rsplit('/', 1)[-1]}  {row.get('type', '?')}  = {value!r}", end="")
        print("" if row.get("status") in ("Good", None) else f"  [{row['status']}]")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    noun = sub.add_parser("opcua", parents=[common], help="OPC UA servers: the gateways' sessions; browse a server")
    osub = noun.add_subparsers(dest="opcua_command", required=True, metavar="ACTION")
    p = osub.add_parser("status", parents=[common], help="per server and gateway: state, nodes, bad values, gaps")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_opcua_status)
    p = osub.add_parser("browse", parents=[common], help="print a server's nodes: NodeId, name, type, value")
    p.add_argument("endpoint", metavar="ENDPOINT", help="opc.tcp://host:port")
    p.add_argument("--node", help="start here (a NodeId, nsu=URI;s=… or ns=2;i=…) [default: Objects]")
    p.add_argument("--depth", type=int, default=3, help="levels of objects to go down [3]")
    p.add_argument(
        "--security", default="None",
        help="None, or MODE:POLICY (Sign or SignAndEncrypt; " + ", ".join(POLICIES) + ") [None]",
    )  # fmt: skip
    p.add_argument("--user", help="user name (the password from --password-env)")
    p.add_argument("--password-env", help="environment variable holding the password")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds a request may take [5]")
    p.add_argument("--json", action="store_true", help="print the nodes as JSON")
    p.set_defaults(func=cmd_opcua_browse)
