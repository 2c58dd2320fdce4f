"""
Uploads as users run them: ``twistd -n gateway --upload-url …`` in a
subprocess, a receiver in another, kill -9 in the middle of a batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gatewayproc import gatewayctl
from tests.test_e2e import gateway, post  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def receiver_proc(tmp_path):
    procs = []

    def start(*script: str) -> tuple[str, Path, Path]:
        where = tmp_path / "receiver"
        where.mkdir(exist_ok=True)
        out = where / "accepted.jsonl"
        procs.append(
            subprocess.Popen([sys.executable, "-m", "tests.receiver", str(where), str(out), *script], cwd=ROOT)
        )
        deadline = time.monotonic() + 30
        while not (where / "port").exists():
            if time.monotonic() > deadline or procs[-1].poll() is not None:
                pytest.fail("the receiver did not start")
            time.sleep(0.05)
        return f"https://localhost:{(where / 'port').read_text()}/in", where / "ca.pem", out

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)


def accepted(out: Path) -> list[dict]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]


def wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached in {timeout:g}s")
        time.sleep(0.1)


def body(start: int, count: int) -> str:
    readings = [
        {"metric": "oil_temp", "ts": 1_790_000_000_000 + i * 1000, "value": i} for i in range(start, start + count)
    ]
    return json.dumps({"readings": readings})


def test_kill_9_mid_batch_then_restart_sends_that_batch_again_and_skips_nothing(gateway, receiver_proc):  # noqa: F811
    # the first batch is taken but its 200 comes too late: the gateway dies first
    url, ca, out = receiver_proc("hold:30")
    gateway.extra = ["--upload-url", url, "--upload-ca", str(ca), "--upload-flush", "0.2", "--upload-batch", "100"]
    gateway.start()
    assert "uploading to sink localhost:" in gateway.log()
    token = gatewayctl("device", "add", "truck-17", data_dir=gateway.data_dir).stdout.strip()
    for start in range(0, 300, 50):
        assert post(gateway, token, body(start, 50))[0] == 200
    wait_for(lambda: len(accepted(out)) == 1, what="the first batch at the receiver")
    held = accepted(out)[0]["key"]
    gateway.kill()

    gateway.start()
    for start in range(300, 400, 50):
        assert post(gateway, token, body(start, 50))[0] == 200

    def values() -> set[float]:
        return {line["value"] for batch in accepted(out) for line in batch["lines"]}

    wait_for(lambda: values() == set(range(400)), what="all 400 readings at the receiver")
    batches = accepted(out)
    keys = [batch["key"] for batch in batches]
    assert keys.count(held) == 2, "the unfinished batch went again, with its key"
    assert batches[0]["lines"] == batches[1]["lines"], "and with its contents"
    assert len(set(keys)) == len(keys) - 1

    status = json.loads(gatewayctl("upload", "status", "--json", data_dir=gateway.data_dir).stdout)
    assert len(status) == 1
    sink = status[0]
    assert (sink["lag_readings"], sink["pending_batches"], sink["parked_batches"]) == (0, 0, 0)
    assert sink["oldest_unsent_partition"] is None  # all sent: retention may drop any partition
    assert sink["readings_sent"] == 400 - 100 + 100  # the resent batch counts once, when its 200 came
    text = gatewayctl("upload", "status", data_dir=gateway.data_dir).stdout
    assert f"sink {sink['name']}  {url}" in text and "lag           0 readings" in text
    assert "Traceback" not in gateway.log()
