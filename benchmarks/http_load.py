"""
HTTPS ingest load against the database ceiling, measured in one run.

    python benchmarks/http_load.py [--duration 10] [--connections 64] [--db DSN] [--json FILE]

1. Ceiling: one process inserts rows into the gateway's schema with the
   gateway's own batch statement, 5,000 readings per statement, no network
   protocol, no HTTP: the most this database takes on this machine.
2. The gateway (``twistd -n gateway`` in a subprocess) under ``wrk`` over
   HTTPS with keep-alive, every request carrying new readings (1 and then
   100 per request) for many devices, each acknowledged after COMMIT.

Needs ``wrk`` (Debian: ``apt-get install wrk``). Uses the embedded
PostgreSQL in a temporary directory unless ``--db`` names a server whose
role may create databases.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import psutil
import psycopg2

from common import Gateway, ceiling, fresh_database, machine, workspace

from gateway import tokens

WRK_SCRIPT = r"""
local tokens = {}
for line in io.lines("%(tokens)s") do tokens[#tokens + 1] = line end
local per_request = %(per_request)d
local counter = 0
local thread_base = 0
local threads = {}

function setup(thread)
  thread:set("base", #threads)
  table.insert(threads, thread)
end

function init(args)
  thread_base = base * 10000000000 + %(run)d * 1000000000
end

function request()
  counter = counter + 1
  local parts = {}
  local first = thread_base + counter * per_request
  for i = 0, per_request - 1 do
    parts[#parts + 1] = string.format('{"metric":"oil_temp","ts":%%d,"value":%%d.5}', first + i, i)
  end
  local token = tokens[(counter %% #tokens) + 1]
  return wrk.format("POST", "/v1/readings", {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
  }, '{"readings":[' .. table.concat(parts, ",") .. ']}')
end
"""


def parse_wrk(out: str) -> dict:
    def duration_ms(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(us|ms|s|m)", text).groups()
        return float(value) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]

    result = {
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "errors": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0,
    }
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        result[f"p{pct}_ms"] = duration_ms(m.group(1))
    return result


def http_run(
    port: int, tokens_file: Path, per_request: int, connections: int, duration: float, run: int, gateway: psutil.Process
) -> dict:
    script = tokens_file.parent / f"post{per_request}.lua"
    script.write_text(WRK_SCRIPT % {"tokens": tokens_file, "per_request": per_request, "run": run})
    cpu_before = sum(gateway.cpu_times()[:2])
    proc = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{int(duration)}s",
            "--latency",
            "-s",
            str(script),
            f"https://127.0.0.1:{port}/v1/readings",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed: {proc.stdout}{proc.stderr}")
    out = proc.stdout
    cpu = sum(gateway.cpu_times()[:2]) - cpu_before
    result = parse_wrk(out)
    result["readings_per_s"] = result["requests_per_s"] * per_request
    result["gateway_cpu_s_per_million"] = cpu / max(1, result["requests"] * per_request) * 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--db", help="PostgreSQL server DSN (default: embedded, in a temporary directory)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("http_load: wrk is needed (Debian: apt-get install wrk)")

    with workspace(args.db) as (tmp, server_dsn):
        figures: dict = {
            "machine": machine(server_dsn),
            "ceiling": ceiling(fresh_database(server_dsn, "bench_ceiling"), args.duration),
        }
        dsn = fresh_database(server_dsn, "bench_gateway")
        conn = psycopg2.connect(dsn)
        lines = []
        with conn, conn.cursor() as cur:
            for i in range(args.devices):
                new = tokens.new_token()
                cur.execute(
                    "INSERT INTO devices (name, token_id, token_hash) VALUES (%s, %s, %s)",
                    (f"bench-{i}", new.token_id, new.digest),
                )
                lines.append(new.token)
        conn.close()
        tokens_file = tmp / "tokens.txt"
        tokens_file.write_text("\n".join(lines) + "\n")

        gateway = Gateway(dsn, tmp / "gw")
        try:
            process = psutil.Process(gateway.proc.pid)
            for run, per_request in enumerate((1, 100)):
                figures[f"https{per_request}"] = http_run(
                    gateway.ports["https"], tokens_file, per_request, args.connections, args.duration, run, process
                )
            figures["gateway_rss_mb"] = process.memory_info().rss / 2**20
        finally:
            gateway.stop()

        conn = psycopg2.connect(dsn)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM readings")
            stored = cur.fetchone()[0]
        conn.close()
        acked = sum((figures[k]["requests"] - figures[k]["errors"]) * n for k, n in (("https1", 1), ("https100", 100)))
        figures["stored"], figures["acked"] = stored, acked

    ceiling_rps = figures["ceiling"]["readings_per_s"]
    print(
        textwrap.dedent(f"""
        machine: {figures["machine"]}
        {"run":<28}{"req/s":>10}{"readings/s":>13}{"x ceiling":>11}{"p50 ms":>9}{"p99 ms":>9}{"errors":>8}{"cpu s/M":>9}
        {"database ceiling":<28}{"":>10}{ceiling_rps:>13,.0f}{1:>11.2f}
    """).strip()
    )
    for key, label in (("https1", "HTTPS, 1 reading/request"), ("https100", "HTTPS, 100 readings/request")):
        f = figures[key]
        print(
            f"{label:<28}{f['requests_per_s']:>10,.0f}{f['readings_per_s']:>13,.0f}"
            f"{f['readings_per_s'] / ceiling_rps:>11.2f}{f['p50_ms']:>9.1f}{f['p99_ms']:>9.1f}{f['errors']:>8}"
            f"{f['gateway_cpu_s_per_million']:>9.1f}"
        )
    print(
        f"gateway RSS {figures['gateway_rss_mb']:.0f} MB; readings acknowledged {figures['acked']:,}, "
        f"stored {figures['stored']:,} (stored >= acknowledged: nothing acked was lost)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
