"""``gatewayctl command``: send a command to a device, follow it, cancel it."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from typing import Any

from gateway.cli.common import CommandError, database, key_value, note, print_table
from gateway.commands import ledger
from gateway.commands.model import FINAL, STATES, Command, CommandError as Refused, parse_request

POLL = 0.2  # seconds between looks at a command being waited for


def _find(cur: Any, id_: str, history: bool = False) -> Command | None:
    cur.execute(ledger.FIND, (id_,))
    row = cur.fetchone()
    if row is None:
        return None
    events: list[Any] = []
    if history:
        cur.execute(ledger.EVENTS, (id_,))
        events = cur.fetchall()
    return ledger.command_of(row, events)


def cmd_command_send(args: argparse.Namespace) -> None:
    params: dict[str, Any] = json.loads(args.params) if args.params else {}
    if not isinstance(params, dict):
        raise CommandError("--params: give a JSON object")
    params.update(key_value(p) for p in args.param)
    doc: dict[str, Any] = {"name": args.name, "params": params, "ttl": args.ttl}
    if args.id:
        doc["id"] = args.id
    try:
        request = parse_request(doc)
    except Refused as e:
        raise CommandError(e.message) from None
    sender = f"gatewayctl:{getpass.getuser()}"
    values = {
        "id": request.id,
        "device": args.device,
        "name": request.name,
        "params": json.dumps(request.params, separators=(",", ":")),
        "sender": sender,
        "ttl": request.ttl,
    }
    with database(args) as conn, conn.cursor() as cur:
        cur.execute(ledger.ACCEPT, values)
        row = cur.fetchone()
        conn.commit()
        command = ledger.command_of(row) if row is not None else _find(cur, request.id)
        if command is None:
            raise CommandError(f"no device {args.device!r} (or it is revoked)")
        if row is None and (command.device != args.device or command.name != request.name):
            raise CommandError(f"id {request.id!r} names another command ({command.name} to {command.device})")
        print(command.id)
        note(f"command {command.id} ({command.name}) to {command.device}: {command.state}")
        if args.wait:
            _wait(conn, cur, command.id, args.wait)


def _wait(conn: Any, cur: Any, id_: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        conn.rollback()  # a new snapshot each look
        command = _find(cur, id_)
        assert command is not None
        if command.state in FINAL or time.monotonic() >= deadline:
            break
        time.sleep(POLL)
    note(f"command {id_}: {command.state}")
    if command.result is not None:
        print(json.dumps(command.result))
    if command.state != "succeeded":
        sys.exit(1 if command.state in FINAL else 2)


def cmd_command_list(args: argparse.Namespace) -> None:
    with database(args) as conn, conn.cursor() as cur:
        if args.device:
            cur.execute(
                ledger.OF_DEVICE, {"device": args.device, "state": args.state, "limit": args.limit, "before": None}
            )
        else:
            cur.execute(ledger.LIST, {"state": args.state, "limit": args.limit})
        commands = [ledger.command_of(row) for row in cur.fetchall()]
    rows = [
        (c.id, c.device, c.name, c.state, c.doc()["created"], c.sender, c.attempts, c.transport or "-")
        for c in commands
    ]
    print_table(("ID", "DEVICE", "NAME", "STATE", "CREATED", "SENDER", "SENT", "TRANSPORT"), rows)


def cmd_command_show(args: argparse.Namespace) -> None:
    with database(args) as conn, conn.cursor() as cur:
        command = _find(cur, args.id, history=True)
    if command is None:
        raise CommandError(f"no command {args.id!r}")
    print(json.dumps(command.doc(), indent=2))


def cmd_command_cancel(args: argparse.Namespace) -> None:
    with database(args) as conn, conn.cursor() as cur:
        cur.execute(ledger.CANCEL, {"id": args.id, "note": f"canceled by gatewayctl:{getpass.getuser()}"})
        row = cur.fetchone()
        conn.commit()
        if row is None:
            command = _find(cur, args.id)
            if command is None:
                raise CommandError(f"no command {args.id!r}")
            why = "the device has it" if command.state == "delivered" else f"it is {command.state} already"
            raise CommandError(f"command {args.id} cannot be canceled: {why}")
    note(f"command {args.id} canceled")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    command = sub.add_parser("command", parents=[common], help="commands to devices: send, list, show, cancel")
    csub = command.add_subparsers(dest="command_action", required=True, metavar="ACTION")
    p = csub.add_parser("send", parents=[common], help="send a command to a device; prints its id")
    p.add_argument("device")
    p.add_argument("name", help="what to do: the device's protocol says which names it takes (Modbus: write)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a parameter; repeat")
    p.add_argument("--params", help="the parameters as one JSON object (--param adds to it)")
    p.add_argument("--ttl", default="10m", help="expire it if not finished within this (90s, 10m, 12h; at most 30d)")
    p.add_argument("--id", help="an idempotency key: sending the same id again sends nothing new")
    p.add_argument(
        "--wait", type=float, nargs="?", const=60.0, metavar="SECONDS",
        help="wait for the result (60 s unless given); exit 1 unless it succeeded, 2 if still waiting",
    )  # fmt: skip
    p.set_defaults(func=cmd_command_send)
    p = csub.add_parser("list", parents=[common], help="commands, newest first")
    p.add_argument("--device", help="only this device's")
    p.add_argument("--state", choices=STATES, help="only commands in this state")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_command_list)
    p = csub.add_parser("show", parents=[common], help="a command, its result and its history, as JSON")
    p.add_argument("id")
    p.set_defaults(func=cmd_command_show)
    p = csub.add_parser("cancel", parents=[common], help="cancel a command the device does not have yet")
    p.add_argument("id")
    p.set_defaults(func=cmd_command_cancel)
