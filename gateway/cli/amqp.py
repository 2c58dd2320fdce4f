"""``gatewayctl amqp status``: each gateway's RabbitMQ consumers, as they last reported them."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.cli.common import note, reported_state, reports, when
from gateway.cli.common import seconds as _seconds


def cmd_amqp_status(args: argparse.Namespace) -> None:
    rows = reports(args, "amqp_sources", "source")
    if not rows and not args.json:
        note("no AMQP sources: give the gateway [[amqp_source]] tables")
    for gateway, source, s, at, age in rows:
        state = reported_state(s, age)
        print(f"source {source}  {s['url']}  queue {s['queue']}  on gateway {gateway}")
        print(f"  state         {state} for {_seconds(s['state_seconds'])}  (reported {when(at)})")
        print(
            f"  messages      {s['consumed']} delivered ({s['redelivered']} redelivered), {s['acked']} acknowledged, "
            f"{s['in_flight']} unacknowledged"
        )
        print(f"  readings      {s['readings']} stored new, {s['duplicates']} duplicates")
        print(f"  rejected      {s['rejected']} messages (kept in rejected_input, dead-lettered)")
        print(f"  last message  {_seconds(s['last_message_seconds'])} ago")
        if s["last_error"]:
            print(f"  last error    {s['last_error']}")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    amqp = sub.add_parser("amqp", parents=[common], help="the gateways' consumers of RabbitMQ queues")
    asub = amqp.add_subparsers(dest="amqp_command", required=True, metavar="ACTION")
    p = asub.add_parser("status", parents=[common], help="per source and gateway: state, messages, last error")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_amqp_status)
