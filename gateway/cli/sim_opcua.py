"""
``gatewayctl simulate --protocol opcua``: a simulated OPC UA server (asyncua's
server) whose values change, to try ``[[opcua]]`` tables against.

The address space, in namespace ``urn:txgateway:simulator``:

- ``Press4.Temperature``, ``Press4.Pressure`` (Double), ``Press4.Running``
  (Boolean), ``Press4.Strokes`` (UInt32), changing every period;
  ``Press4.Setpoint`` (Double), writable, changed only by writes;
  ``Press4.Recipe`` (String), which is not a number;
- ``Types.<Type>``: one variable of every scalar numeric type;
- with ``--items N``: ``Bench.Tag00000`` … (Double), all changing every period.

With ``--security-dir`` it offers only Sign and SignAndEncrypt (Basic256Sha256,
Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss), with a certificate made there.
With ``--user`` (and ``--password-env``) or ``--user-certificate`` a session
needs that identity: that user and password, or an X.509 identity signed
with that certificate's key; anonymous sessions are refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

NAMESPACE = "urn:txgateway:simulator"
NUMERIC = (
    "Boolean", "SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float", "Double",
)  # fmt: skip


def typed(name: str, k: int) -> Any:
    """The k-th value of a variable of type ``name``."""
    if name == "Boolean":
        return k % 2 == 1
    if name in ("Float", "Double"):
        return k + 0.5
    if name == "SByte":
        return k % 100 - 50
    return k % 100 if name == "Byte" else k


async def serve(args: argparse.Namespace) -> None:
    from asyncua import Server, ua
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from asyncua.crypto.permission_rules import User, UserRole
    from asyncua.crypto.uacrypto import der_from_x509, load_certificate
    from asyncua.server.user_managers import UserManager

    class Users(UserManager):
        """The user (name and password) and the X.509 user identity the simulated server knows."""

        def __init__(self, name: str | None, password: str | None, certificate: bytes | None) -> None:
            self.name, self.password, self.certificate = name, password, certificate

        def get_user(self, iserver: Any, username: Any = None, password: Any = None, certificate: Any = None) -> Any:
            if self.name is not None and username == self.name and password == self.password:
                return User(role=UserRole.User, name=username)
            if self.certificate is not None and certificate == self.certificate:  # its signature checked by asyncua
                return User(role=UserRole.User, name="x509")
            return None

    users = None
    tokens: list[Any] = []
    password = None
    if args.user:
        password = os.environ.get(args.password_env or "")
        if password is None:
            raise SystemExit("--user: give --password-env, the environment variable holding the password")
        tokens.append(ua.UserNameIdentityToken)
    trusted = None
    if getattr(args, "user_certificate", None):
        if not args.security_dir:
            raise SystemExit("--user-certificate: give --security-dir too (an X.509 identity is signed)")
        trusted = der_from_x509(await load_certificate(args.user_certificate))
        tokens.append(ua.X509IdentityToken)
    if tokens:
        users = Users(args.user, password, trusted)
    server = Server(user_manager=users)
    await server.init()
    if tokens:  # these identities, and no anonymous session
        server.set_identity_tokens(tokens)
    host, _, port = args.target.rpartition(":")
    server.set_endpoint(f"opc.tcp://{host or '127.0.0.1'}:{port}/")
    server.set_server_name("txgateway simulator")
    if args.security_dir:
        folder = Path(args.security_dir)
        folder.mkdir(parents=True, exist_ok=True)
        uri = "urn:txgateway:simulator:server"
        await server.set_application_uri(uri)
        await setup_self_signed_certificate(
            folder / "server-key.pem", folder / "server.der", uri, host or "localhost",
            [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH], {},
        )  # fmt: skip
        await server.load_certificate(str(folder / "server.der"))
        await server.load_private_key(str(folder / "server-key.pem"))
        P = ua.SecurityPolicyType
        server.set_security_policy(
            [
                P.Basic256Sha256_SignAndEncrypt, P.Basic256Sha256_Sign,
                P.Aes128Sha256RsaOaep_SignAndEncrypt, P.Aes256Sha256RsaPss_SignAndEncrypt,
            ]
        )  # fmt: skip
    for n in range(args.shift):  # namespaces before ours: its index differs from the last run's
        await server.register_namespace(f"urn:txgateway:simulator:other:{n}")
    ns = await server.register_namespace(NAMESPACE)
    objects = server.nodes.objects
    variables: dict[str, Any] = {}

    async def variable(parent: Any, path: str, value: Any, vtype: Any) -> Any:
        node = await parent.add_variable(
            ua.NodeId.from_string(f"ns={ns};s={path}"), ua.QualifiedName(path.split(".")[-1], ns), value, vtype
        )
        variables[path] = node
        return node

    press = await objects.add_object(ua.NodeId.from_string(f"ns={ns};s={'Press4'}"), ua.QualifiedName("Press4", ns))
    await variable(press, "Press4.Temperature", 20.0, ua.VariantType.Double)
    await variable(press, "Press4.Pressure", 1.0, ua.VariantType.Double)
    await variable(press, "Press4.Running", True, ua.VariantType.Boolean)
    await variable(press, "Press4.Strokes", 0, ua.VariantType.UInt32)
    await (await variable(press, "Press4.Setpoint", 50.0, ua.VariantType.Double)).set_writable()
    await variable(press, "Press4.Recipe", "B-17", ua.VariantType.String)
    types = await objects.add_object(ua.NodeId.from_string(f"ns={ns};s={'Types'}"), ua.QualifiedName("Types", ns))
    for name in NUMERIC:
        await (await variable(types, f"Types.{name}", typed(name, 0), getattr(ua.VariantType, name))).set_writable()
    bench = []
    if args.items:
        folder_node = await objects.add_object(
            ua.NodeId.from_string(f"ns={ns};s={'Bench'}"), ua.QualifiedName("Bench", ns)
        )
        for i in range(args.items):
            bench.append(await variable(folder_node, f"Bench.Tag{i:05d}", 0.0, ua.VariantType.Double))
    bad: set[str] = set()
    async with server:
        actual = server.bserver.port if server.bserver is not None else port
        print(f"ready opc.tcp://{host or '127.0.0.1'}:{actual}/ {NAMESPACE}", flush=True)
        if args.control:
            asyncio.get_running_loop().create_task(_control(variables, bad, ua))
        loop = asyncio.get_running_loop()
        end = loop.time() + args.duration if args.duration else math.inf
        k = 0
        due = loop.time()
        while loop.time() < end:
            due += args.period  # a fixed rate: a round that took long shortens the wait for the next
            await asyncio.sleep(max(0.0, due - loop.time()))
            k += 1
            for path, node in variables.items():
                if path in bad or path in ("Press4.Setpoint", "Press4.Recipe") or path.startswith("Bench."):
                    continue
                name = path.split(".")[-1]
                if path.startswith("Types."):
                    value = typed(name, k)
                elif name == "Running":
                    value = k % 10 != 0
                elif name == "Strokes":
                    value = k
                else:
                    value = round(20 + 5 * math.sin(k / 10) if name == "Temperature" else 1 + k % 7 / 10, 3)
                await node.write_value(value, await node.read_data_type_as_variant_type())
            if bench:
                now = datetime.now(timezone.utc)
                value = ua.DataValue(ua.Variant(float(k), ua.VariantType.Double), SourceTimestamp=now)  # type: ignore[arg-type]
                for n in bench:  # the server's direct write: a round of 10,000 in well under a second
                    await server.write_attribute_value(n.nodeid, value)


async def _control(variables: dict[str, Any], bad: set[str], ua: Any) -> None:
    """Test hooks on stdin, one JSON object a line: {"bad": PATH} makes a node's status Bad, {"good": PATH}."""
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return
        order = json.loads(line)
        if "bad" in order:
            node = variables[order["bad"]]
            bad.add(order["bad"])
            vtype = await node.read_data_type_as_variant_type()
            status = ua.StatusCode(ua.StatusCodes.BadSensorFailure)
            await node.write_value(ua.DataValue(ua.Variant(await node.read_value(), vtype), StatusCode=status))
        elif "good" in order:
            bad.discard(order["good"])
        print(f"done {line.strip()}", flush=True)


def run(args: argparse.Namespace) -> None:
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
