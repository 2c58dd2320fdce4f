"""``gatewayctl token``: API tokens for the read API."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.readings import NAME_RULE, is_name
from gateway.cli.common import CommandError, add_with_token, database, note, print_table, revoke, when


def cmd_token_add(args: argparse.Namespace) -> None:
    if not is_name(args.name):
        raise CommandError(f"token name {args.name!r}: {NAME_RULE}")
    add_with_token(args, "api_tokens", {"role": args.role}, f"API token ({args.role})")


def cmd_token_list(args: argparse.Namespace) -> None:
    with database(args) as conn, conn.cursor() as cur:
        cur.execute("SELECT name, role, created_at, revoked_at FROM api_tokens ORDER BY name")
        rows = [(name, role, when(created), when(revoked) or "-") for name, role, created, revoked in cur.fetchall()]
    print_table(("NAME", "ROLE", "CREATED", "REVOKED"), rows)


def cmd_token_revoke(args: argparse.Namespace) -> None:
    with database(args) as conn:
        revoke(conn, "api_tokens", args.name, "API token")
        conn.commit()
    note(f"API token {args.name} revoked; it is refused from now on")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    token = sub.add_parser("token", parents=[common], help="API tokens for the read API")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    p = tsub.add_parser("add", parents=[common], help="make an API token; prints it on stdout")
    p.add_argument("name")
    p.add_argument(
        "--role",
        choices=("reader", "operator", "admin"),
        required=True,
        help="reader reads; operator also sends commands and sets desired configuration; admin may do all of it "
        "and read the quarantine",
    )
    p.set_defaults(func=cmd_token_add)
    p = tsub.add_parser("list", parents=[common], help="list API tokens")
    p.set_defaults(func=cmd_token_list)
    p = tsub.add_parser("revoke", parents=[common], help="refuse an API token from now on")
    p.add_argument("name")
    p.set_defaults(func=cmd_token_revoke)
