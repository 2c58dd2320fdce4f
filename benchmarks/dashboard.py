"""
What the dashboard costs the gateway, in one run on one machine.

    python benchmarks/dashboard.py [--devices 10000] [--days 7] [--duration 5] [--json FILE] [--db DSN]

1. The fleet page's data: every page of ``GET /v1/devices?limit=100`` over
   ``--devices`` devices, a few times over, signed in with a session cookie
   as the page is: answer time p50/p99 (loopback, so nearly all of it is the
   gateway's) and bytes per page.
2. A device chart: ``GET /v1/devices/{name}/series`` over a week of one
   reading a second (604,800 readings, in daily partitions), for 1,000
   buckets (a wide chart) and 300: answer time p50/p99 and bytes; beside it
   what the same week costs through the readings pages (their count, and the
   time of the first).
3. What a dashboard's refresh costs: CPU seconds of the gateway and of
   PostgreSQL per refresh (every request the fleet page and a device page
   make), with nothing else running; and so the share of the machine ten
   dashboards take.
4. Ingest while dashboards watch: TGP over TCP at the most the gateway
   acknowledges (``gatewayctl simulate``), with no dashboard open and with
   ``--dashboards`` (10) open, each refreshing every 5 s what the fleet page
   and a device page ask for; alternated ``--rounds`` times (3) on fresh
   gateways, so that the ratio compares runs made moments apart on this
   noisy machine. Target: the dashboards take at most 5% of the ingest rate.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import ssl
import statistics
import threading
import time
from pathlib import Path

import psycopg2

from common import BIN, Gateway, drop_database, fresh_database, make_partitions, simulate, workspace
from http_load import provision

import subprocess

REFRESH = 5.0  # seconds between a page's refreshes, as app.js does


class Dashboard:
    """One browser tab's requests, over one keep-alive HTTPS connection, with the session cookie."""

    def __init__(self, gateway: Gateway, token: str) -> None:
        context = ssl.create_default_context(cafile=str(gateway.data_dir / "tls" / "ca.crt"))
        context.check_hostname = False
        self.conn = http.client.HTTPSConnection("127.0.0.1", gateway.ports["https"], context=context, timeout=30)
        status, _, headers = self._request("POST", "/ui/session", json.dumps({"token": token}).encode())
        assert status == 200, status
        cookie = next(v for k, v in headers if k.lower() == "set-cookie")
        self.cookie = cookie.split(";", 1)[0]

    def _request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, list]:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if getattr(self, "cookie", None):
            headers["Cookie"] = self.cookie
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        return response.status, data, response.getheaders()

    def get(self, path: str) -> tuple[float, int]:
        """(seconds, bytes) of one GET; fails on anything but 200."""
        started = time.perf_counter()
        status, data, _ = self._request("GET", path)
        elapsed = time.perf_counter() - started
        if status != 200:
            raise SystemExit(f"GET {path}: {status} {data[:200]!r}")
        return elapsed, len(data)

    def refresh(self, device: str) -> None:
        """What the fleet page and a device page ask for in one refresh."""
        self.get("/v1/devices?limit=100")
        self.get(f"/v1/devices/{device}")
        status, data, _ = self._request("GET", f"/v1/devices/{device}/latest")
        metrics = sorted(json.loads(data)["metrics"]) if status == 200 else []
        self.get(f"/v1/alerts?device={device}&limit=50")
        self.get(f"/v1/devices/{device}/rejected?limit=20")
        self.get(f"/v1/quarantine?device={device}&limit=100")
        self.get("/healthz")
        until = int(time.time() * 1000)
        for metric in metrics:
            self.get(f"/v1/devices/{device}/series?metric={metric}&since={until - 86_400_000}&until={until}&points=600")

    def close(self) -> None:
        self.conn.close()


def percentiles(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "requests": len(ordered),
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
    }


def admin_token(dsn: str, data_dir: Path) -> str:
    argv = [str(BIN / "gatewayctl"), "token", "add", f"bench-{time.monotonic_ns()}", "--role", "admin", "--db", dsn]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def fleet_and_chart(tmp: Path, server_dsn: str, devices: int, days: int) -> dict:
    dsn = fresh_database(server_dsn, "bench_dashboard")
    provision(dsn, devices, tmp / "dash-tokens.txt")
    conn = psycopg2.connect(dsn)
    now = datetime.datetime.now(datetime.timezone.utc)
    for back in range(days + 1):
        make_partitions(conn, 86400.0, now - datetime.timedelta(days=back))
    seconds = days * 86400
    started = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO readings (device_id, metric_id, ts, value) "
            "SELECT (SELECT id FROM devices WHERE name = 'sim-0'), (SELECT metric_id_of('oil_temp')), "
            "now() - i * interval '1 second', "
            "80 + 10 * sin(i / 3600.0) + random() FROM generate_series(1, %s) AS i",
            (seconds,),
        )
    conn.commit()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE readings")
    conn.close()
    loaded_s = time.perf_counter() - started
    gateway = Gateway(dsn, tmp / "gw-dashboard")
    try:
        tab = Dashboard(gateway, admin_token(dsn, gateway.data_dir))
        out: dict = {"devices": devices, "readings_in_chart": seconds, "load_seconds": loaded_s}
        times, sizes = [], []
        for _ in range(3):
            cursor = None
            while True:
                path = "/v1/devices?limit=100" + (f"&cursor={cursor}" if cursor else "")
                elapsed, size = tab.get(path)
                times.append(elapsed)
                sizes.append(size)
                status, data, _ = tab._request("GET", path)
                cursor = json.loads(data)["next_cursor"]
                if cursor is None:
                    break
        out["fleet_page"] = {**percentiles(times), "bytes": statistics.mean(sizes)}
        times = [tab.get("/v1/devices?limit=100&match=sim-99")[0] for _ in range(20)]
        out["fleet_search"] = percentiles(times)
        until = int(time.time() * 1000)
        since = until - seconds * 1000
        for points in (1000, 300):
            runs = [
                tab.get(f"/v1/devices/sim-0/series?metric=oil_temp&since={since}&until={until}&points={points}")
                for _ in range(20)
            ]
            out[f"chart_{points}"] = {**percentiles([t for t, _ in runs]), "bytes": runs[0][1]}
        elapsed, size = tab.get(f"/v1/devices/sim-0/readings?metric=oil_temp&since={since}&limit=1000")
        out["readings_pages"] = {"pages_for_the_week": -(-seconds // 1000), "first_page_ms": 1000 * elapsed,
                                 "bytes_per_page": size}  # fmt: skip
        tab.close()
    finally:
        gateway.stop()
        drop_database(server_dsn, "bench_dashboard")
    return out


def ingest(tmp: Path, server_dsn: str, name: str, watchers: int, duration: float, sim_devices: int) -> dict:
    dsn = fresh_database(server_dsn, f"bench_{name}")
    provision(dsn, sim_devices, tmp / f"{name}-tokens.txt")
    gateway = Gateway(dsn, tmp / f"gw-{name}")
    stop = threading.Event()
    refreshes = [0]
    threads = []
    try:
        token = admin_token(dsn, gateway.data_dir)

        def watch(i: int) -> None:
            tab = Dashboard(gateway, token)
            try:
                stop.wait(REFRESH * i / max(1, watchers))  # the tabs were opened at different times
                while not stop.is_set():
                    tab.refresh(f"sim-{i % sim_devices}")
                    refreshes[0] += 1
                    stop.wait(REFRESH)
            finally:
                tab.close()

        for i in range(watchers):
            t = threading.Thread(target=watch, args=(i,), daemon=True)
            t.start()
            threads.append(t)
        result = simulate(gateway, dsn, "tcp", sim_devices, 0, duration, 100)
        result["dashboard_refreshes"] = refreshes[0]
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        gateway.stop()
        drop_database(server_dsn, f"bench_{name}")
    return result


def refresh_cost(tmp: Path, server_dsn: str, watchers: int, seconds: float, sim_devices: int) -> dict:
    """
    CPU seconds the gateway and PostgreSQL spend per dashboard refresh, with nothing else running (after a
    short ingest so the devices have data): a figure the machine's noise hardly moves, unlike ingest rates.
    """
    import psutil

    dsn = fresh_database(server_dsn, "bench_refresh")
    provision(dsn, sim_devices, tmp / "refresh-tokens.txt")
    gateway = Gateway(dsn, tmp / "gw-refresh")
    try:
        simulate(gateway, dsn, "tcp", sim_devices, 20_000, 3, 100)
        token = admin_token(dsn, gateway.data_dir)
        tabs = [Dashboard(gateway, token) for _ in range(watchers)]
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("SHOW data_directory")
            data_directory = cur.fetchone()[0]
        postgres = [
            p
            for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and data_directory in " ".join(p.info["cmdline"])
        ]
        postgres = [*postgres, *[c for p in postgres for c in p.children(recursive=True)]]
        me = psutil.Process(gateway.proc.pid)

        def cpu() -> float:
            total = sum(me.cpu_times()[:2])
            for p in postgres:
                try:
                    total += sum(p.cpu_times()[:2])
                except psutil.Error:
                    pass
            return total

        before, started, count = cpu(), time.monotonic(), 0
        while time.monotonic() - started < seconds:
            for i, tab in enumerate(tabs):
                tab.refresh(f"sim-{i % sim_devices}")
                count += 1
        spent = cpu() - before
        for tab in tabs:
            tab.close()
    finally:
        gateway.stop()
        drop_database(server_dsn, "bench_refresh")
    per_refresh = spent / max(1, count)
    # Ten dashboards refresh twice a second between them.
    return {"refreshes": count, "cpu_ms_per_refresh": 1000 * per_refresh,
            "share_of_machine_for_10": per_refresh * 10 / REFRESH / (psutil.cpu_count() or 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000, help="devices in the fleet page [10000]")
    parser.add_argument("--days", type=int, default=7, help="days of 1 Hz readings in the chart [7]")
    parser.add_argument("--dashboards", type=int, default=10, help="dashboards open during ingest [10]")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of each ingest run [8]")
    parser.add_argument("--rounds", type=int, default=3, help="ingest runs without and with dashboards, each [3]")
    parser.add_argument("--sim-devices", type=int, default=100, help="simulated TGP devices [100]")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--db", help="PostgreSQL server DSN (default: embedded, in a temporary directory)")
    args = parser.parse_args()
    with workspace(args.db) as (tmp, server_dsn):
        figures = fleet_and_chart(tmp, server_dsn, args.devices, args.days)
        figures["refresh_cost"] = refresh_cost(tmp, server_dsn, args.dashboards, 10.0, args.sim_devices)
        runs: dict[str, list[float]] = {"without": [], "with": []}
        refreshes = 0
        for round_ in range(args.rounds):
            for label, watchers in (("without", 0), ("with", args.dashboards)):
                r = ingest(tmp, server_dsn, f"ingest_{label}_{round_}", watchers, args.duration, args.sim_devices)
                runs[label].append(r["rate"])
                refreshes += r["dashboard_refreshes"]
        figures["ingest"] = {
            "without_dashboards": runs["without"],
            "with_dashboards": runs["with"],
            "dashboards": args.dashboards,
            "refreshes": refreshes,
            "ratio": statistics.mean(runs["with"]) / statistics.mean(runs["without"]),
            "ratios_by_round": [w / wo for w, wo in zip(runs["with"], runs["without"])],
        }
    f = figures
    print(f"fleet page (100 of {f['devices']:,} devices): p50 {f['fleet_page']['p50_ms']:.1f} ms, "
          f"p99 {f['fleet_page']['p99_ms']:.1f} ms, {f['fleet_page']['bytes']:,.0f} bytes "
          f"({f['fleet_page']['requests']} pages)")  # fmt: skip
    print(f"fleet search: p50 {f['fleet_search']['p50_ms']:.1f} ms, p99 {f['fleet_search']['p99_ms']:.1f} ms")
    for points in (1000, 300):
        c = f[f"chart_{points}"]
        print(f"chart of {f['readings_in_chart']:,} readings in {points} buckets: p50 {c['p50_ms']:.0f} ms, "
              f"p99 {c['p99_ms']:.0f} ms, {c['bytes']:,} bytes")  # fmt: skip
    r = f["readings_pages"]
    print(f"the same week as readings pages: {r['pages_for_the_week']} pages of {r['bytes_per_page']:,} bytes "
          f"(the first in {r['first_page_ms']:.0f} ms)")  # fmt: skip
    c = f["refresh_cost"]
    print(f"a dashboard refresh costs {c['cpu_ms_per_refresh']:.1f} ms of CPU (gateway and PostgreSQL): "
          f"10 dashboards take {100 * c['share_of_machine_for_10']:.2f}% of the machine")  # fmt: skip
    i = f["ingest"]
    print(f"TGP ingest without dashboards {[round(x) for x in i['without_dashboards']]}/s, with {i['dashboards']} "
          f"{[round(x) for x in i['with_dashboards']]}/s ({i['refreshes']} refreshes)")  # fmt: skip
    print(f"  with/without: {i['ratio']:.3f} (by round: {', '.join(f'{r:.3f}' for r in i['ratios_by_round'])})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
