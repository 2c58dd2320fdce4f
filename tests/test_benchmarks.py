"""The benchmark commands of README.rst run and report what they promise (briefly: figures are not checked)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_tgp_benchmark_reports_every_figure(tmp_path):
    out = run("tgp_load.py", "--duration", "2", "--devices", "5", "--idle", "20", tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    figures = json.loads((tmp_path / "out.json").read_text())
    assert figures["ceiling"]["readings_per_s"] > 0
    for run_name in ("tcp_max", "tls_max", "tcp_half"):
        assert figures[run_name]["acked"] > 0 and figures[run_name]["errors"] == {}
    assert {(i["protocol"], i["connected"]) for i in figures["idle"]} == {("tcp", 20), ("tls", 20)}
    assert "x ceiling" in out.stdout


def test_http_benchmark_runs_or_names_what_it_needs(tmp_path):
    out = run("http_load.py", "--duration", "2", "--connections", "4", "--devices", "4", tmp_path=tmp_path)
    if shutil.which("wrk") is None:
        assert out.returncode != 0 and "wrk is needed" in out.stderr
        return
    assert out.returncode == 0, out.stdout + out.stderr
    figures = json.loads((tmp_path / "out.json").read_text())
    assert figures["https1"]["requests"] > 0 and figures["https100"]["requests"] > 0
    assert figures["stored"] >= figures["acked"]


def test_upload_benchmark_reports_every_figure(tmp_path):
    out = run(
        "upload_load.py", "--duration", "2", "--outage", "2", "--steady", "2", "--devices", "5", tmp_path=tmp_path
    )
    assert out.returncode == 0, out.stdout + out.stderr
    figures = json.loads((tmp_path / "out.json").read_text())
    assert figures["tcp_max"]["acked"] > 0
    assert figures["upload"]["readings"] >= figures["tcp_max"]["acked"] and figures["upload"]["rate"] > 0
    assert figures["outage"]["refused_requests"] > 0
    assert figures["outage"]["backlog_delivered_s"] is not None
    assert "x the ingest rate" in out.stdout
