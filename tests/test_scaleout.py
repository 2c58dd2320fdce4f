"""
Three ``twistd -n gateway`` processes sharing one PostgreSQL behind a real
HAProxy (TCP mode for TGP, HTTPS readiness checks on /readyz): devices spread
over the gateways; one gateway killed with SIGKILL and its devices carry on
through HAProxy on the others; every acknowledged reading stored once; the
uploaders' batches disjoint and complete; a revocation closes the device's
session on whichever gateway holds it.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
import urllib.request

import psycopg2
import pytest

from gateway.outbound.ledger import LEASE, owner_lock_held
from tests.gatewayproc import GatewayProcess, gatewayctl
from tests.haproxy import HAProxy
from tests.loadclients import TGPDevice, check_nothing_lost
from tests.test_resilience import wait_until
from tests.test_upload_e2e import accepted, receiver_proc  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

NAMES = [f"truck-{i}" for i in range(9)]
UPLOAD_TIMEOUT = 5  # a killed gateway's batches are free at once (owner lock), at the latest LEASE + this later


def tgp_sessions(gw: GatewayProcess) -> int:
    context = ssl.create_default_context(cafile=gw.cert)
    text = urllib.request.urlopen(f"https://127.0.0.1:{gw.port}/metrics", context=context, timeout=10).read()
    found = re.search(rb'^gateway_connections\{transport="tgp"\} ([\d.]+)', text, re.M)
    return int(float(found.group(1))) if found else 0


def owner_locks_held(dsn: str, owners: list[str]) -> list[bool]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT o, {owner_lock_held('o')} FROM unnest(%s::text[]) o", (owners,))
            held = dict(cur.fetchall())
    finally:
        conn.close()
    return [held[o] for o in owners]


@pytest.fixture
def gateways(tmp_path, db_dsn, receiver_proc):  # noqa: F811
    url, ca, out = receiver_proc()
    gws = [
        GatewayProcess(
            tmp_path / f"gw{i}" / "gateway-data",
            *("--db", db_dsn, "--upload-url", url, "--upload-ca", str(ca), "--upload-flush", "0.5"),
            *("--upload-timeout", str(UPLOAD_TIMEOUT), "--device-rate", "0"),
        )
        for i in range(3)
    ]
    errors: list[BaseException] = []

    def start(gw: GatewayProcess) -> None:
        try:
            gw.start()
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    for gw in gws:
        gw.data_dir.parent.mkdir(parents=True)
    starting = [threading.Thread(target=start, args=(gw,)) for gw in gws]
    for t in starting:
        t.start()
    for t in starting:
        t.join()
    if errors:
        for gw in gws:
            gw.close()
        raise errors[0]
    yield gws, out
    for gw in gws:
        gw.close()


def test_three_gateways_behind_haproxy_lose_nothing_when_one_is_killed(tmp_path, db_dsn, gateways):
    gws, out = gateways
    assert all(gw.tgp_port and gw.port for gw in gws), [gw.log()[-2000:] for gw in gws]
    tokens = {n: gatewayctl("device", "add", n, "--db", db_dsn).stdout.strip() for n in NAMES}
    proxy = HAProxy(tmp_path / "haproxy", [(gw.tgp_port, gw.port) for gw in gws]).start()
    devices = [TGPDevice(name, tokens[name], lambda: proxy.port) for name in NAMES]
    try:
        for d in devices:
            d.start()
        started = time.monotonic()
        assert wait_until(lambda: all(d.acked_between(started) > 0 for d in devices), 60), [d.errors for d in devices]
        # Least connections: each gateway holds some of the devices.
        spread = [tgp_sessions(gw) for gw in gws]
        assert sum(spread) == len(NAMES) and all(spread), spread

        # Each uploader holds its owner lock; the killed gateway's ends with its database session, so the
        # others may take the batches it cut without waiting for their lease.
        owners = [(gw.data_dir / "gateway-id").read_text().strip() for gw in gws]
        assert owner_locks_held(db_dsn, owners) == [True, True, True]
        gws[0].kill()
        killed = time.monotonic()
        assert wait_until(lambda: owner_locks_held(db_dsn, owners) == [False, True, True], 60)
        assert wait_until(lambda: all(d.acked_between(killed + 1) > 0 for d in devices), 60), [
            d.errors for d in devices
        ]
        assert sum(tgp_sessions(gw) for gw in gws[1:]) == len(NAMES)

        # A revocation reaches the gateway holding the session, whichever that is.
        revoked = devices[-1]
        gatewayctl("device", "revoke", revoked.device, "--db", db_dsn)
        assert wait_until(lambda: "AUTH_FAILED" in revoked.told, 30), (revoked.told, revoked.errors)
    finally:
        for d in devices:
            d.stop()
        haproxy_log = proxy.stop()
    counts = check_nothing_lost(None, devices, db=db_dsn)
    assert counts["acked"] > 0, haproxy_log[-2000:]

    # The surviving uploaders send everything, the killed one's unfinished batch included; batches with
    # different keys never share a reading.
    def delivered() -> set:
        return {(line["device"], line["ts"]) for batch in accepted(out) for line in batch["lines"]}

    # The killed gateway may have held batches it had cut (and not sent): the others take them at once, its owner
    # lock being gone; the wait allows for the lease too (LEASE + UPLOAD_TIMEOUT after the kill), then a few passes.
    free_by = killed + LEASE + UPLOAD_TIMEOUT
    wait = max(0.0, free_by - time.monotonic()) + 60
    assert wait_until(lambda: len(delivered()) >= counts["stored"], wait), (len(delivered()), counts)
    by_key: dict[str, set] = {}
    for batch in accepted(out):
        by_key.setdefault(batch["key"], set()).update((line["device"], line["ts"]) for line in batch["lines"])
    seen: set = set()
    for lines in by_key.values():
        assert not seen & lines, "two batches carried the same reading"
        seen |= lines
    assert len(seen) == counts["stored"]
    status = json.loads(gatewayctl("upload", "status", "--json", "--db", db_dsn).stdout)
    assert [s["lag_readings"] for s in status] == [0]
