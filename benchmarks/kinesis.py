"""
The Kinesis sink against the HTTPS sink, in the same run.

    python benchmarks/kinesis.py [--backlog-seconds 10] [--devices 100] [--db DSN] [--json FILE]

A backlog is stored first (``gatewayctl simulate`` over TGP at the most the
gateway takes, for ``--backlog-seconds``). Then, on that database, one
gateway at a time with one sink: the HTTPS sink to a local receiver
(``upload_load.py``'s, which decompresses and counts), then a Kinesis sink to
moto's emulator of the Kinesis API (a stream of four shards) on loopback.
For each: readings a second delivered from the backlog (from the first batch
to the last reading counted by the sink's ledger) and the gateway's CPU
seconds per million readings. The emulator is a Python program sharing the
two cores: its own cost is in the Kinesis figures' wall time, not in the
gateway's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import threading
from pathlib import Path


from common import BIN, Gateway, drop_database, fresh_database, machine, workspace
from upload_load import drain, https_drain, sent, tgp_backlog

REGION = "eu-west-1"


class Moto:
    """moto's server on a port of the kernel's choosing, with a stream."""

    def __init__(self, where: Path) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", "0"],
            cwd=where, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        port = None
        for line in self.proc.stdout:
            m = re.search(r"Running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        if port is None:
            raise SystemExit("moto_server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"
        import boto3

        client = boto3.client("kinesis", region_name=REGION, endpoint_url=self.url,
                              aws_access_key_id="bench", aws_secret_access_key="bench")  # fmt: skip
        client.create_stream(StreamName="bench", ShardCount=4)
        client.get_waiter("stream_exists").wait(StreamName="bench", WaiterConfig={"Delay": 0.2})

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog-seconds", type=float, default=10.0, help="seconds of TGP load stored first [10]")
    parser.add_argument("--devices", type=int, default=100, help="devices of the backlog [100]")
    parser.add_argument("--db", help="a PostgreSQL server DSN (default: an embedded one)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    figures: dict = {}
    with workspace(args.db) as (tmp, server):
        figures["machine"] = machine(server)
        dsn = fresh_database(server, "bench_kinesis")
        try:
            backlog = figures["backlog"] = tgp_backlog(tmp, dsn, args.devices, args.backlog_seconds)
            figures["https"] = https_drain(tmp, dsn, backlog)

            moto = Moto(tmp)
            config = tmp / "kinesis.toml"
            config.write_text(
                f'[[sink]]\nkind = "kinesis"\nname = "bench"\nstream = "bench"\nregion = "{REGION}"\n'
                f'endpoint = "{moto.url}"\n'
            )
            os.environ.update(
                AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_EC2_METADATA_DISABLED="true"
            )
            try:
                gateway = Gateway(dsn, tmp / "gw-kinesis", "--config", str(config))
                figures["kinesis"] = drain(gateway, dsn, "bench", backlog, lambda: sent(dsn, "bench"))
            finally:
                moto.stop()
        finally:
            drop_database(server, "bench_kinesis")
    https, kinesis = figures["https"], figures["kinesis"]
    figures["kinesis_over_https"] = round(kinesis["rate"] / https["rate"], 3)
    print(
        f"backlog of {backlog:,} readings: HTTPS sink {https['rate']:,.0f} readings/s "
        f"({https['gateway_cpu_s_per_million']:.2f} gateway CPU s per million); Kinesis sink (moto's emulator) "
        f"{kinesis['rate']:,.0f} readings/s ({kinesis['gateway_cpu_s_per_million']:.2f} CPU s per million), "
        f"{figures['kinesis_over_https']:.2f} of HTTPS"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
