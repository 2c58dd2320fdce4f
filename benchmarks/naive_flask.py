"""
The HTTP baseline a user would otherwise write: a small Flask app under
gunicorn's sync workers, each request's readings inserted and committed with
psycopg2 before the answer.

    GATEWAY_BENCH_DSN=DSN gunicorn -w 5 -b 127.0.0.1:PORT naive_flask:app

It accepts the gateway's own body (``{"readings": [{"metric", "ts", "value"}]}``)
and device tokens (``Authorization: Bearer``), checked against the same
``devices`` table, so the same load drives both. Each worker holds one
database connection, opened after the fork.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import psycopg2
from flask import Flask, jsonify, request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import tokens  # noqa: E402

INSERT = (
    "INSERT INTO readings (device_id, metric_id, ts, value) "
    "VALUES (%s, coalesce((SELECT id FROM metrics WHERE name = %s), metric_id_of(%s)), %s, %s) "
    "ON CONFLICT (device_id, metric_id, ts) DO NOTHING"
)

app = Flask(__name__)
_conn = None


def database():
    global _conn
    if _conn is None or _conn.closed:
        _conn = psycopg2.connect(os.environ["GATEWAY_BENCH_DSN"])
    return _conn


@app.post("/v1/readings")
def readings():
    auth = request.headers.get("Authorization", "")
    token = auth.removeprefix("Bearer ")
    parts = tokens.split_token(token)
    if parts is None:
        return jsonify(error="unauthorized"), 401
    conn = database()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, token_hash FROM devices WHERE token_id = %s AND revoked_at IS NULL", (parts[0],))
            row = cur.fetchone()
            if row is None or not tokens.token_matches(token, bytes(row[1])):
                conn.rollback()
                return jsonify(error="unauthorized"), 401
            body = request.get_json()
            accepted = 0
            for r in body["readings"]:
                ts = r["ts"]
                when = (
                    datetime.fromisoformat(ts)
                    if isinstance(ts, str)
                    else datetime.fromtimestamp(ts / 1000, timezone.utc)
                )
                cur.execute(INSERT, (row[0], r["metric"], r["metric"], when, float(r["value"])))
                accepted += cur.rowcount
        conn.commit()
    except (KeyError, TypeError, ValueError) as e:
        conn.rollback()
        return jsonify(error=f"bad reading: {e}"), 400
    return jsonify(accepted=accepted, duplicates=len(body["readings"]) - accepted)
