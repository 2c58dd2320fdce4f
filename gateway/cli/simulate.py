"""``gatewayctl simulate``: simulated devices sending to a running gateway, with a summary of what was acknowledged."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pathlib import Path

from gateway import tokens
from gateway.reactor import Reactor
from gateway.cli.common import CommandError, database, note, settings
from gateway.readings import counted


def provision_simulated(conn: Any, count: int) -> list[tuple[str, str]]:
    """Devices sim-0 … sim-N-1, made or given fresh tokens (the simulator owns them)."""
    devices = [(f"sim-{i}", tokens.new_token()) for i in range(count)]
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO devices (name, token_id, token_hash) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::bytea[]) "
            "ON CONFLICT (name) DO UPDATE SET token_id = EXCLUDED.token_id, "
            "token_hash = EXCLUDED.token_hash, revoked_at = NULL",
            ([n for n, _ in devices], [t.token_id for _, t in devices], [t.digest for _, t in devices]),
        )
        # As device add and rotate do: running gateways forget the old tokens and rewrite known-devices.json,
        # so during an outage the new tokens are the ones taken. Sent with the change, so seen with it.
        cur.execute("SELECT pg_notify('gateway_devices', n) FROM unnest(%s::text[]) AS n", ([n for n, _ in devices],))
    conn.commit()
    return [(name, t.token) for name, t in devices]


def bind_imeis(conn: Any, names: list[str]) -> None:
    """Simulated trackers sign in by IMEI: sim-7 is 359900000000007."""
    from gateway.cli.sim_trackers import imei_of

    with conn.cursor() as cur:
        cur.execute(
            "UPDATE devices d SET imei = v.imei FROM unnest(%s::text[], %s::text[]) AS v(name, imei) "
            "WHERE d.name = v.name",
            (names, [imei_of(n) for n in names]),
        )
    conn.commit()


def cmd_simulate(args: argparse.Namespace) -> None:
    from twisted.internet import ssl

    from gateway.cli import simulator as simulate

    host, _, port = args.target.rpartition(":")
    if not port.isdigit():
        raise CommandError(f"--target {args.target!r}: give HOST:PORT")
    if args.protocol == "opcua":
        from gateway.cli import sim_opcua

        note(f"an OPC UA server on {args.target} (namespace {sim_opcua.NAMESPACE}); Ctrl-C stops it")
        sim_opcua.run(args)
        return
    if args.duration is None:
        args.duration = 10.0
    if args.protocol == "sparkplug":
        _sparkplug(args)
        return
    if args.devices < 1:
        raise CommandError("--devices must be at least 1")
    if args.batch < 1 or args.batch > 10_000:
        raise CommandError("--batch must be within 1..10000")
    trust = None
    if args.protocol in ("tls", "https", "mqtts"):
        data_dir, _ = settings(args)
        # The local CA that signs the gateway's certificate; a data directory of the old layout has none.
        local_ca = data_dir / "tls" / "ca.crt"
        ca = Path(args.ca) if args.ca else local_ca if local_ca.exists() else data_dir / "tls" / "gateway.crt"
        try:
            trust = ssl.Certificate.loadPEM(ca.read_bytes())
        except (OSError, ssl.SSL.Error) as e:
            raise CommandError(f"--ca {str(ca)!r}: cannot load a certificate to trust ({e})") from None
    with database(args) as conn:
        devices = provision_simulated(conn, args.devices)
        if args.protocol in ("teltonika", "teltonika-udp", "gt06"):
            bind_imeis(conn, [name for name, _ in devices])
    what = counted(len(devices), "device")
    note(f"simulating {what} over {args.protocol} against {args.target} for {args.duration:g}s")
    result: dict[str, Any] = {}

    def go(reactor: Reactor) -> Any:
        return simulate.run(reactor, args, devices, trust).addCallback(result.update)

    _react(go)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"acked {result['acked']:,} readings in {result['duration']:.1f}s: {result['rate']:,.0f} readings/s; "
            f"ack latency p50 {result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms, "
            f"p99 {result['p99_ms']:.1f} ms; "
            f"duplicates {result['duplicates']:,}; reconnects {result['reconnects']}; "
            f"errors {result['errors'] or 'none'}" + (f"; commands {result['commands']}" if result["commands"] else "")
        )
    if result["acked"] == 0 and not args.commands:
        raise CommandError("no reading was acknowledged")
    if args.commands and result["commands"].get("recorded", 0) < args.commands:
        raise CommandError(f"{result['commands'].get('recorded', 0)} of {args.commands} command results recorded")


def _sparkplug(args: argparse.Namespace) -> None:
    from gateway.cli import sim_sparkplug

    with database(args) as conn:
        names = [name for name, _ in provision_simulated(conn, args.devices)]
    note(
        f"Sparkplug B edge nodes of group {sim_sparkplug.GROUP} on {args.target}: devices sim-0 … "
        f"sim-{args.devices - 1}, {args.batch} metrics a DDATA, QoS {args.qos}, for {args.duration:g}s"
    )
    try:
        result = sim_sparkplug.run(args, names)
    except (OSError, ConnectionError) as e:
        raise CommandError(f"--target {args.target}: {e}") from None
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"published {result['readings']:,} readings in {result['messages']:,} DDATA from {result['nodes']} edge "
            f"nodes in {result['duration']:.1f}s ({result['rate']:,.0f} readings/s); rebirths {result['rebirths']}, "
            f"writes {result['writes']}"
        )


def _react(main: Any) -> None:
    """Run the reactor until main's Deferred fires (task.react without its sys.exit)."""
    from twisted.internet import reactor

    outcome: list[Any] = []

    def start() -> None:
        d = main(reactor)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if outcome and hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "simulate", parents=[common], help="simulated devices (sim-0 … sim-N-1) sending to a running gateway"
    )
    p.add_argument("--target", required=True, help="the gateway's HOST:PORT (TGP, HTTPS or MQTT)")
    p.add_argument("--devices", type=int, default=10, help="how many devices [default: 10]")
    p.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="readings per second, all devices together; 0: as fast as acknowledged [default: 100]",
    )
    p.add_argument(
        "--protocol",
        choices=("tcp", "tls", "https", "mqtt", "mqtts", "teltonika", "teltonika-udp", "gt06", "opcua", "sparkplug"),
        default="tcp",
        help="TGP over tcp or tls, https, MQTT over TCP (mqtt) or TLS (mqtts), trackers (teltonika, "
        "teltonika-udp, gt06: a reading is a record), sparkplug: Sparkplug B edge nodes on the broker at "
        "--target (--batch metrics a DDATA), or opcua: serve a simulated OPC UA server on --target [default: tcp]",
    )
    p.add_argument("--items", type=int, default=0, help="opcua: also N Double tags Bench.TagNNNNN [default: 0]")
    p.add_argument("--period", type=float, default=1.0, help="opcua: seconds between value changes [default: 1]")
    p.add_argument(
        "--security-dir", metavar="DIR",
        help="opcua: offer only Sign and SignAndEncrypt, with a server certificate made in DIR",
    )  # fmt: skip
    p.add_argument("--user", help="opcua: the user name the server requires (with --password-env)")
    p.add_argument("--password-env", help="opcua: the environment variable holding that user's password")
    p.add_argument(
        "--user-certificate", metavar="FILE",
        help="opcua: a user's X.509 certificate (PEM or DER) the server takes as an identity (with --security-dir)",
    )  # fmt: skip
    p.add_argument("--shift", type=int, default=0, help=argparse.SUPPRESS)  # namespaces registered before ours
    p.add_argument("--control", action="store_true", help=argparse.SUPPRESS)  # test hooks on stdin
    p.add_argument("--mqtt-version", choices=("3.1.1", "5"), default="5", help="for mqtt/mqtts [default: 5]")
    p.add_argument("--qos", type=int, choices=(0, 1, 2), default=1, help="for mqtt/mqtts [default: 1]")
    p.add_argument(
        "--window",
        type=int,
        default=32,
        help="MQTT 3.1.1 messages in flight per device (5.0 takes the gateway's Receive Maximum) [default: 32]",
    )
    p.add_argument("--duration", type=float, help="seconds [default: 10; opcua: until stopped]")
    p.add_argument("--batch", type=int, default=100, help="readings per frame or request [default: 100]")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.add_argument("--ca", help="certificate to trust for tls/https [default: DATA_DIR/tls/ca.crt]")
    p.add_argument("--tls-name", help="host name the gateway's certificate must show [default: the target host]")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.add_argument(
        "--command-delay", type=float, default=1.0, metavar="SECONDS",
        help="how long a device takes to run a command before it reports (a command's delay param wins; "
        "params fail=true makes it fail) [default: 1]",
    )  # fmt: skip
    p.add_argument(
        "--commands", type=int, metavar="N",
        help="stop once the gateway has recorded N command results (--duration is then the longest it runs)",
    )  # fmt: skip
    p.set_defaults(func=cmd_simulate)
