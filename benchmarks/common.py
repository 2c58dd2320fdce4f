"""What every benchmark here needs: a PostgreSQL, the ceiling, a gateway process."""

from __future__ import annotations

import collections
import contextlib
import datetime
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg2
import psycopg2.extensions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.storage import embedded  # noqa: E402
from gateway.storage import schema  # noqa: E402
from gateway.storage.partitions import make_partitions  # noqa: E402
from gateway.storage.writes import EXECUTE_WRITE_BATCH, PREPARE_WRITE_BATCH, array_literals  # noqa: E402

BIN = Path(sys.executable).parent


@contextlib.contextmanager
def workspace(db: str | None) -> Iterator[tuple[Path, str]]:
    """A temporary directory and a PostgreSQL server DSN (embedded unless given)."""
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    os.chmod(tmp, 0o755)
    pg = None
    try:
        if db is None:
            pg = embedded.EmbeddedPostgres(tmp / "pg")
            db = pg.start()
        yield tmp, db
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def fresh_database(server_dsn: str, name: str) -> str:
    admin = psycopg2.connect(server_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {name}")
    admin.close()
    dsn = psycopg2.extensions.make_dsn(server_dsn, dbname=name)
    conn = psycopg2.connect(dsn)
    schema.migrate(conn)
    conn.close()
    return dsn


def drop_database(server_dsn: str, name: str) -> None:
    admin = psycopg2.connect(server_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def server_version(dsn: str) -> int:
    conn = psycopg2.connect(dsn)
    try:
        return conn.server_version
    finally:
        conn.close()


def _insert_for(dsn: str, device: int, offset_us: int, duration: float, batch: int, counts: list, i: int) -> None:
    """One connection storing batches of one device with the gateway's statement for ``duration`` s."""
    conn = psycopg2.connect(dsn)  # each batch its own transaction, as in the gateway
    n = 0
    try:
        with conn.cursor() as cur:
            cur.execute(PREPARE_WRITE_BATCH)  # prepared once per connection, as the gateway does
            start = time.perf_counter()
            while time.perf_counter() - start < duration:
                ts = range(offset_us + n * 1000, offset_us + (n + batch) * 1000, 1000)
                rows = [(device, "oil_temp", t, 1.5) for t in ts]
                cur.execute(EXECUTE_WRITE_BATCH, array_literals(rows))
                assert cur.fetchone()[0] == batch
                conn.commit()
                n += batch
    finally:
        conn.close()
    counts[i] = n


def ceiling(dsn: str, duration: float, batch: int = 5000, connections: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """
    The database alone, the gateway's schema and batch statement, no protocol, on 1, 2, 4 and 8 parallel
    connections (each its own device, so that no two wait on the same keys): the best is the ceiling. COPY
    of the same rows (no duplicate check, no twin) is reported beside it as a reference.
    """
    now_us = int(time.time() * 1_000_000)
    conn = psycopg2.connect(dsn)
    make_partitions(conn, 86400.0)
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO devices (name, token_id, token_hash) SELECT 'ceiling-' || i, 'c' || i, '\\x00' "
            "FROM generate_series(1, %s) i RETURNING id",
            (sum(connections) + 1,),
        )
        devices = [row[0] for row in cur.fetchall()]
        cur.execute("SELECT metric_id_of('oil_temp')")  # in the dictionary, as the gateway adds a new name first
        oil_temp = cur.fetchone()[0]
    conn.commit()
    runs = {}
    used = 0
    each = max(1.0, duration / 2)  # per number of connections: five runs in about three durations
    for n in connections:
        counts = [0] * n
        threads = [
            threading.Thread(
                target=_insert_for, args=(dsn, devices[used + i], now_us, each, batch, counts, i), daemon=True
            )
            for i in range(n)
        ]
        used += n
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        runs[n] = {"readings": sum(counts), "seconds": elapsed, "readings_per_s": sum(counts) / elapsed}
    best = max(runs, key=lambda n: runs[n]["readings_per_s"])
    copy_device = devices[-1]
    copied = 0
    started = time.perf_counter()
    with conn.cursor() as cur:
        while time.perf_counter() - started < each:
            first = datetime.datetime.fromtimestamp(now_us / 1e6, datetime.timezone.utc)
            rows = "".join(
                f"{copy_device}\t{oil_temp}\t{first + datetime.timedelta(milliseconds=copied + k)}\t1.5\n"
                for k in range(batch)
            )
            cur.copy_expert("COPY readings (device_id, metric_id, ts, value) FROM STDIN", io.StringIO(rows))
            conn.commit()
            copied += batch
    copy_s = time.perf_counter() - started
    conn.close()
    return {
        **runs[best],
        "connections": best,
        "by_connections": {str(n): r["readings_per_s"] for n, r in runs.items()},
        "copy_readings_per_s": copied / copy_s,
    }


class CpuSplit:
    """
    CPU seconds (user + system) spent by PostgreSQL, Mosquitto and this script's finished children (the
    load generators) from when it is made to ``spent()``: where the time of a run went besides the
    gateway's own. PostgreSQL and Mosquitto are every process of that name on the machine, so this is for
    runs on a machine doing nothing else.
    """

    NAMES = {"postgres": "postgres", "mosquitto": "broker"}

    def __init__(self) -> None:
        self.before = self._now()

    @classmethod
    def _now(cls) -> dict[str, float]:
        import resource

        seen: dict[str, float] = collections.defaultdict(float)
        for p in psutil.process_iter(["name", "cpu_times"]):
            what, times = cls.NAMES.get(p.info["name"] or ""), p.info["cpu_times"]
            if what is not None and times is not None:
                seen[f"{what}:{p.pid}"] = times.user + times.system
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        seen["load"] = children.ru_utime + children.ru_stime
        return seen

    def spent(self) -> dict[str, float]:
        """Seconds by ``postgres``, ``broker`` and ``load`` (a process gone before now is not counted)."""
        out = {"postgres": 0.0, "broker": 0.0, "load": 0.0}
        for key, seconds in self._now().items():
            out[key.split(":")[0]] += seconds - self.before.get(key, 0.0)
        return out


LISTENING = re.compile(r"listening for (HTTPS|TGP|TGP over TLS|MQTT|Teltonika|Teltonika over UDP|GT06) on [\d.]+:(\d+)")


class Gateway:
    """``twistd -n gateway`` on loopback ports chosen by the kernel."""

    def __init__(self, dsn: str, data_dir: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [
                str(BIN / "twistd"),
                "-n",
                "--pidfile=",
                "gateway",
                "--db",
                dsn,
                "--data-dir",
                str(data_dir),
                "--https",
                "ssl:0:interface=127.0.0.1",
                "--device",
                "tcp:0:interface=127.0.0.1",
                "--device",
                "ssl:0:interface=127.0.0.1",
                "--mqtt",
                "tcp:0:interface=127.0.0.1",
                # Every simulated device connects from 127.0.0.1 as fast as it can: measure
                # the gateway's own limits, not the per-device and per-address allowances.
                "--device-rate",
                "0",
                "--max-connections-per-address",
                "1000000",
                "--max-connections",
                "1000000",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.ports: dict[str, int] = {}
        self.data_dir = data_dir
        seen: collections.deque[str] = collections.deque(maxlen=30)
        for line in self.proc.stdout:
            seen.append(line)
            m = LISTENING.search(line)
            if m:
                names = {"HTTPS": "https", "TGP": "tcp", "TGP over TLS": "tls", "MQTT": "mqtt"}
                names.update({"Teltonika": "teltonika", "Teltonika over UDP": "teltonika-udp", "GT06": "gt06"})
                self.ports[names[m.group(1)]] = int(m.group(2))
            if "gateway ready" in line:
                break
        else:
            self.proc.wait(30)
            raise SystemExit(
                f"the gateway did not start (exit status {self.proc.returncode}); its last lines:\n" + "".join(seen)
            )
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def simulate_argv(
    gateway: Gateway, dsn: str, protocol: str, devices: int, rate: float, duration: float, batch: int = 100
) -> list[str]:
    """``gatewayctl simulate`` against ``gateway`` (or any server given as its data_dir and ports)."""
    return [
        str(BIN / "gatewayctl"), "simulate", "--db", dsn, "--data-dir", str(gateway.data_dir),
        "--target", f"localhost:{gateway.ports[protocol]}", "--protocol", protocol, "--devices", str(devices),
        "--rate", str(rate), "--duration", str(duration), "--batch", str(batch), "--quiet",
    ]  # fmt: skip


def simulate(
    gateway: Gateway, dsn: str, protocol: str, devices: int, rate: float, duration: float, batch: int = 100
) -> dict:
    """Run ``gatewayctl simulate`` to the end; its JSON summary."""
    import json

    argv = simulate_argv(gateway, dsn, protocol, devices, rate, duration, batch) + ["--json"]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"simulate failed: {out.stderr}")
    return json.loads(out.stdout)


def machine(server_dsn: str) -> dict:
    import os
    import platform

    return {"cores": os.cpu_count(), "python": platform.python_version(), "postgresql": server_version(server_dsn)}


def raise_fd_limit() -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def idle(tmp: Path, dsn: str, protocol: str, devices: int, *extra: str) -> dict:
    """The gateway's RSS once ``devices`` devices are connected, each sending one reading a minute (``extra``:
    the gateway's options for the protocol's endpoint, when it has none by default)."""
    gateway = Gateway(dsn, tmp / f"gw-idle-{protocol}", *extra)  # fresh: RSS not inflated by the load runs
    process = psutil.Process(gateway.proc.pid)
    before = process.memory_info().rss
    sim = subprocess.Popen(
        simulate_argv(gateway, dsn, protocol, devices, rate=devices / 60, duration=3600, batch=1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = time.monotonic()
    try:
        connected = 0
        while time.monotonic() - started < 300:
            port = gateway.ports[protocol]
            connected = sum(
                1
                for c in process.net_connections("tcp")
                if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
            )
            if connected >= devices:
                break
            time.sleep(1)
        all_in = time.monotonic() - started
        time.sleep(3)  # the last handshakes finished, the declarations acknowledged
        rss = process.memory_info().rss
    finally:
        stop(sim)
        gateway.stop()
    return {
        "protocol": protocol,
        "devices": devices,
        "connected": connected,
        "connect_s": all_in,
        "rss_mb": rss / 2**20,
        "rss_before_mb": before / 2**20,
        "kb_per_device": (rss - before) / 1024 / max(1, connected),
    }
