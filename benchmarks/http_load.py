"""
HTTP load with ``wrk``: keep-alive connections, every request carrying new
readings for many devices (``Authorization: Bearer`` device tokens).

The same script drives the gateway (HTTPS) and the Flask baseline (HTTP):
same bodies, same devices, same connections. A delay per connection gives
a lower, steady rate for latency at part load.
"""

from __future__ import annotations

import re
import time
import shutil
import subprocess
from pathlib import Path

import psycopg2

from gateway.cli.simulate import provision_simulated

WRK_SCRIPT = r"""
local tokens = {}
for line in io.lines("%(tokens)s") do tokens[#tokens + 1] = line end
local per_request = %(per_request)d
local counter = 0
local thread_base = 0
function init(args)
  -- string.format's %%d takes 32-bit integers here: 20 runs of 100M ms each, after a
  -- prefix of epoch-ms digits that puts them all within the last months (quality rules)
  thread_base = %(run)d * 100000000
end

function request()
  counter = counter + 1
  local parts = {}
  local first = thread_base + counter * per_request
  for i = 0, per_request - 1 do
    parts[#parts + 1] = string.format('{"metric":"oil_temp","ts":%(ts_prefix)s%%010d,"value":%%d.5}', first + i, i)
  end
  local token = tokens[(counter %% #tokens) + 1]
  return wrk.format("POST", "/v1/readings", {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
  }, '{"readings":[' .. table.concat(parts, ",") .. ']}')
end
"""

DELAY = """
function delay()
  return %(delay_ms)d
end
"""


def ts_prefix() -> str:
    """Leading digits of epoch ms: 10**10 ms (115 days) blocks, starting at least 30 days ago."""
    return str((int(time.time() * 1000) - 30 * 86_400_000) // 10**10)


def need_wrk() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("benchmarks: wrk is needed (Debian: apt-get install wrk)")


def provision(dsn: str, count: int, tokens_file: Path) -> None:
    """Devices sim-0 … sim-N-1, as ``gatewayctl simulate`` makes them; their tokens in ``tokens_file``."""
    conn = psycopg2.connect(dsn)
    try:
        devices = provision_simulated(conn, count)
    finally:
        conn.close()
    tokens_file.write_text("".join(token + "\n" for _, token in devices))


def parse_wrk(out: str) -> dict:
    def duration_ms(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(us|ms|s|m)", text).groups()
        return float(value) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]

    result = {
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "errors": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0,
    }
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["socket_errors"] = sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        result[f"p{pct}_ms"] = duration_ms(m.group(1))
    return result


def wrk(
    url: str,
    tokens_file: Path,
    per_request: int,
    connections: int,
    duration: float,
    run: int,
    delay_ms: int = 0,
) -> dict:
    """``wrk`` (one thread) for ``duration`` seconds; requests, rate, errors, p50/p99 (ms), readings/s."""
    assert 0 <= run < 20, "each run's timestamps have their own 100M ms"
    script = tokens_file.parent / f"post-{run}.lua"
    text = WRK_SCRIPT % {"tokens": tokens_file, "per_request": per_request, "run": run, "ts_prefix": ts_prefix()}
    if delay_ms > 0:
        text += DELAY % {"delay_ms": delay_ms}
    script.write_text(text)
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(script), url]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed: {proc.stdout}{proc.stderr}")
    result = parse_wrk(proc.stdout)
    result["readings_per_s"] = result["requests_per_s"] * per_request
    result["acked"] = (result["requests"] - result["errors"]) * per_request
    return result
