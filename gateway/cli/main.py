"""
``gatewayctl``: the administrator's command line. It works whether or not
the gateway runs: with ``--db`` it talks to that server, otherwise it
shares (or briefly starts) the embedded PostgreSQL of ``--data-dir``.

Results go to stdout (``device add`` prints the token alone, so
``TOKEN=$(gatewayctl device add truck-17)`` works); everything else goes to
stderr. Errors are one line and a non-zero exit status. Each noun is a
module of this package with a ``register(sub, common)`` for its commands.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import psycopg2

from gateway.cli import (
    amqp,
    command,
    conflicts,
    device,
    export,
    modbus,
    mqtt,
    opcua,
    quarantine,
    session,
    simulate,
    storage,
    tls,
    token,
    upload,
)
from gateway.cli.common import CommandError, database, note
from gateway.storage import schema


def cmd_migrate(args: argparse.Namespace) -> None:
    with database(args):
        note(f"schema is at version {schema.LATEST}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="the gateway's data directory [default: ./gateway-data]")
    common.add_argument("--db", help="PostgreSQL connection string of an external server (or $GATEWAY_DB)")
    common.add_argument("--config", "-c", help="the gateway's TOML config file (data-dir and db are read from it)")

    parser = argparse.ArgumentParser(
        prog="gatewayctl", description="Administer a txgateway and its database.", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", parents=[common], help="apply schema migrations")
    p.set_defaults(func=cmd_migrate)
    nouns = (
        device,
        command,
        export,
        token,
        session,
        quarantine,
        conflicts,
        upload,
        storage,
        mqtt,
        amqp,
        modbus,
        opcua,
        simulate,
        tls,
    )
    for noun in nouns:
        noun.register(sub, common)
    return parser


def _merge_common(args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    # Common options may stand before or after the command; argparse gives
    # the sub-parser's default (None) precedence, so re-read them from the top.
    top = argparse.ArgumentParser(add_help=False)
    top.add_argument("--data-dir")
    top.add_argument("--db")
    top.add_argument("--config", "-c")
    known, _ = top.parse_known_args(argv)
    for key in ("data_dir", "db", "config"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(known, key))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _merge_common(build_parser().parse_args(argv), argv)
    try:
        args.func(args)
    except CommandError as e:
        print(f"gatewayctl: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (| head); not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except psycopg2.Error as e:
        print(f"gatewayctl: database error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def run() -> int:
    """The ``gatewayctl`` command: ``main``, then an exit that does not collect what the process drops anyway."""
    code = main()
    # The interpreter's last garbage collections would walk every object the imports made, a fifth of a
    # second of each command; frozen, they are left to the exit. Nothing of ours waits on a collection.
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(run())
