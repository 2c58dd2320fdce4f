"""
``benchmarks/faults.py`` in its short form (four faults, the next 4 s after the last is survived, each
survived within 20 s): the gateway, its embedded
PostgreSQL and an upload receiver under steady HTTPS and TGP load, with each
of the four faults injected once, and the record of acknowledgements checked
against the database and the receiver at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gatewayproc import postmaster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_four_faults_each_within_20_seconds_of_the_last_lose_nothing(tmp_path):
    where = tmp_path / "soak"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "faults.py"), "--minutes", "1.34", "--every", "20", "--settle", "4",
         "--rate", "4000", "--workdir", str(where), "--json", str(tmp_path / "report.json")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:  # stopped by the timeout: it stops what it started on SIGTERM
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
        pm = postmaster(where / "gateway-data")
        if pm is not None:
            pm.send_signal(signal.SIGINT)
            pm.wait(30)
    assert proc.returncode == 0, output[-5000:]
    report = json.loads((tmp_path / "report.json").read_text())
    summary = report["summary"]
    assert summary["problems"] == []
    assert [f["fault"] for f in report["faults"]] == ["gateway", "postmaster", "pg-stop", "receiver"]
    assert summary["faults_injected"] == summary["faults_survived"] == 4
    for fault in report["faults"]:
        assert fault["all_acking_s"] is not None, fault
    assert report["faults"][1]["healthz_200_s"] < 30 and report["faults"][2]["healthz_200_s"] < 30
    assert report["faults"][3]["uploads_caught_up_s"] is not None
    # Readings were acknowledged across the faults, and every one of them is stored once and was delivered.
    assert summary["acked"] == summary["stored"] > 4000 * 30
    assert report["receiver"]["distinct_readings"] >= summary["acked"]
    assert all(d["acked"] > 0 and d["lost_to_full_buffer"] == 0 for d in report["devices"])
    assert len(report["samples"]) == 5 and all(s["fds"] > 0 and s["rss_mb"] > 0 for s in report["samples"])
    assert report["gateway_exit"] == 0
