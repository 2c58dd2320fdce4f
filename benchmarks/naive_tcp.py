"""
The baseline a user would otherwise write for TGP devices: a thread pool
accepting sockets, each reading inserted and committed on its own with
psycopg2 before the frame is acknowledged.

    python benchmarks/naive_tcp.py --db DSN [--threads 64] [--port-file FILE]

It uses the same sans-IO codec as the gateway (``protocols/tgp.py``), the
same schema and the same device credentials, so ``gatewayctl simulate``
drives it exactly as it drives the gateway. One thread serves one device
connection and holds one database connection; a pool with fewer threads than
devices leaves the others waiting for a free thread, as such servers do.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocols import tgp  # noqa: E402
from gateway import tokens  # noqa: E402

INSERT = (
    "INSERT INTO readings (device_id, metric_id, ts, value) "
    "VALUES (%s, coalesce((SELECT id FROM metrics WHERE name = %s), metric_id_of(%s)), "
    "timestamptz 'epoch' + %s * interval '1 microsecond', %s) "
    "ON CONFLICT (device_id, metric_id, ts) DO NOTHING"
)

local = threading.local()


def database(dsn: str):
    if getattr(local, "conn", None) is None:
        local.conn = psycopg2.connect(dsn)
    return local.conn


def serve_device(sock: socket.socket, dsn: str) -> None:
    conn = database(dsn)
    codec = tgp.Connection(tgp.GATEWAY)
    device_id = stored = name = nonce = None
    sock.settimeout(120)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            codec.receive_data(data)
            while True:
                event = codec.next_event()
                if event is tgp.NEED_DATA or event is tgp.CONNECTION_CLOSED:
                    break
                if isinstance(event, tgp.Hello):
                    name = event.device
                    with conn.cursor() as cur:
                        cur.execute("SELECT id, token_hash FROM devices WHERE name = %s", (name,))
                        row = cur.fetchone()
                    conn.commit()
                    if row is not None:
                        device_id, stored = row[0], bytes(row[1])
                    nonce = os.urandom(tgp.NONCE_SIZE)
                    sock.sendall(codec.send(tgp.Challenge(tgp.choose_version(event) or 1, nonce)))
                elif isinstance(event, tgp.Auth):
                    if not tokens.proof_matches(event.proof, stored, nonce, name):
                        sock.sendall(codec.send(tgp.Reject(tgp.ErrorCode.AUTH_FAILED, "wrong token")))
                        return
                    welcome = tgp.Welcome(codec.version or 1, int(time.time() * 1e6), 1 << 20, 1, 30, 120)
                    sock.sendall(codec.send(welcome))
                elif isinstance(event, tgp.Declare):
                    sock.sendall(codec.send(tgp.Ack(event.seq)))
                elif isinstance(event, tgp.Data):
                    accepted = 0
                    for metric, ts, value in event.readings:
                        with conn.cursor() as cur:
                            cur.execute(INSERT, (device_id, metric, metric, ts, value))
                            accepted += cur.rowcount
                        conn.commit()
                    duplicates = len(event.readings) - accepted
                    sock.sendall(codec.send(tgp.Ack(event.seq, min(accepted, 0xFFFF), min(duplicates, 0xFFFF))))
                elif isinstance(event, tgp.Ping):
                    sock.sendall(codec.send(tgp.Pong(event.payload)))
                elif isinstance(event, tgp.Bye):
                    return
    except (OSError, tgp.ProtocolError, psycopg2.Error) as e:
        print(f"naive_tcp: {name}: {e}", file=sys.stderr)
        conn.rollback()
    finally:
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--port-file", help="write the port chosen by the kernel here")
    args = parser.parse_args()
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = listener.getsockname()[1]
    if args.port_file:
        Path(args.port_file + ".tmp").write_text(str(port))
        os.replace(args.port_file + ".tmp", args.port_file)
    with ThreadPoolExecutor(args.threads) as pool:
        while True:
            sock, _ = listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pool.submit(serve_device, sock, args.db)


if __name__ == "__main__":
    main()
