"""``gatewayctl mqtt status``: each gateway's subscriptions to MQTT brokers, as they last reported them."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.cli.common import CommandError, database, note, reported_state, reports, when
from gateway.cli.common import seconds as _seconds


def cmd_mqtt_status(args: argparse.Namespace) -> None:
    rows = reports(args, "mqtt_sources", "source")
    if not rows and not args.json:
        note("no MQTT sources: give the gateway --mqtt-source or [[mqtt_source]] tables")
    for gateway, source, s, at, age in rows:
        state = reported_state(s, age)
        print(f"source {source}  {s['url']}  on gateway {gateway}")
        print(f"  state         {state} for {_seconds(s['state_seconds'])}  (reported {when(at)})")
        print(f"  subscribed to {', '.join(s['filters'])}  as client {s['client_id']}")
        print(f"  messages      {s['messages']} taken, {s['acked']} acknowledged, {s['in_flight']} in flight")
        print(f"  readings      {s['readings']} stored new, {s['duplicates']} duplicates")
        print(f"  rejected      {s['rejected']} messages (kept in rejected_input)")
        print(
            f"  lag           oldest unacknowledged {_seconds(s['oldest_unacked_seconds'])}, "
            f"last message {_seconds(s['last_message_seconds'])} ago, reading to commit {_seconds(s['delay_seconds'])}"
        )
        spb = s.get("sparkplug")
        if spb:
            kinds = ", ".join(f"{n} {kind}" for kind, n in spb["messages"].items())
            print(f"  sparkplug     host {spb['host_id']}: {kinds or 'no messages yet'}")
            print(f"  online        {', '.join(spb['online']) or '-'}")
            print(f"  offline       {', '.join(spb['offline']) or '-'}")
        if s["last_error"]:
            print(f"  last error    {s['last_error']}")


def cmd_mqtt_forget(args: argparse.Namespace) -> None:
    """The rows gateways wrote for a source they no longer have: /healthz stops naming it as gone."""
    with database(args) as conn:
        with conn.cursor() as cur:
            where = "source = %s" + (" AND gateway = %s" if args.gateway else "")
            params = (args.name, args.gateway) if args.gateway else (args.name,)
            cur.execute(
                f"DELETE FROM mqtt_sources WHERE {where} RETURNING gateway, status->>'client_id', status->>'url'",
                params,
            )
            rows = cur.fetchall()
        conn.commit()
    if not rows:
        raise CommandError(
            f"no MQTT source {args.name!r} was reported" + (f" by {args.gateway}" if args.gateway else "")
        )
    for gateway, client_id, url in rows:
        note(
            f"forgot source {args.name} of gateway {gateway} (client id {client_id} on {url}); if that broker still "
            "holds the session, end it there, or it keeps taking a share of the group's messages"
        )


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    mqtt = sub.add_parser("mqtt", parents=[common], help="the gateways' subscriptions to MQTT brokers")
    msub = mqtt.add_subparsers(dest="mqtt_command", required=True, metavar="ACTION")
    p = msub.add_parser("status", parents=[common], help="per source and gateway: state, messages, lag, last error")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_mqtt_status)
    p = msub.add_parser(
        "forget",
        parents=[common],
        help="forget a source no gateway has any more (after its session on the broker was ended)",
    )
    p.add_argument("name", help="the source's name, as mqtt status shows it")
    p.add_argument("--gateway", help="only the row of this gateway id")
    p.set_defaults(func=cmd_mqtt_forget)
