"""``gatewayctl session``: the dashboard's sign-ins, listed and revoked."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gateway.cli.common import CommandError, database, note, print_table, when

LIST = """
SELECT s.id, s.subject, s.role, s.address, s.created_at, s.last_used, s.expires_at, s.revoked_at,
       CASE WHEN s.revoked_at IS NOT NULL THEN 'revoked'
            WHEN s.expires_at <= now() THEN 'expired'
            WHEN t.revoked_at IS NOT NULL THEN 'token revoked'
            ELSE 'active' END
FROM ui_sessions s LEFT JOIN api_tokens t ON t.id = s.token_id
WHERE %(all)s OR (s.revoked_at IS NULL AND s.expires_at > now() AND t.revoked_at IS NULL)
ORDER BY s.created_at
"""
FIELDS = ("id", "subject", "role", "address", "created_at", "last_used", "expires_at", "revoked_at", "state")


def cmd_session_list(args: argparse.Namespace) -> None:
    with database(args) as conn, conn.cursor() as cur:
        cur.execute(LIST, {"all": args.all})
        rows = [dict(zip(FIELDS, row)) for row in cur.fetchall()]
    for row in rows:
        for key in ("created_at", "last_used", "expires_at", "revoked_at"):
            row[key] = when(row[key]) or None
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print_table(
        ("ID", "SIGNED IN WITH", "ROLE", "FROM", "SINCE", "LAST USED", "EXPIRES", "STATE"),
        [
            (r["id"], r["subject"], r["role"], r["address"] or "-", r["created_at"], r["last_used"], r["expires_at"],
             r["state"])
            for r in rows
        ],
    )  # fmt: skip


def cmd_session_revoke(args: argparse.Namespace) -> None:
    if not (args.ids or args.token):
        raise CommandError("say which sessions: IDs, or --token NAME for every session signed in with that API token")
    with database(args) as conn:
        with conn.cursor() as cur:
            cur.execute(
                "UPDATE ui_sessions SET revoked_at = now() WHERE revoked_at IS NULL AND expires_at > now() "
                "AND (id = ANY(%s) OR subject = %s) RETURNING id",
                (args.ids, args.token),
            )
            ended = [row[0] for row in cur.fetchall()]
        conn.commit()
    if not ended:
        raise CommandError("no such active session")
    note(f"{len(ended)} dashboard sessions ended; their next request is refused")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    session = sub.add_parser("session", parents=[common], help="dashboard sign-ins")
    ssub = session.add_subparsers(dest="session_command", required=True, metavar="ACTION")
    p = ssub.add_parser("list", parents=[common], help="list active dashboard sessions")
    p.add_argument("--all", action="store_true", help="also the expired and revoked ones")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_session_list)
    p = ssub.add_parser("revoke", parents=[common], help="end dashboard sessions at once")
    p.add_argument("ids", nargs="*", metavar="ID", help="session ids (gatewayctl session list)")
    p.add_argument("--token", metavar="NAME", help="every session signed in with this API token")
    p.set_defaults(func=cmd_session_revoke)
