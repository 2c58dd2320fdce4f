"""
RabbitMQ, in and out, against the MQTT broker source and the HTTPS sink in the same run.

    python benchmarks/amqp.py [--readings 1000000] [--devices 100] [--db DSN] [--json FILE]

1. Source: a RabbitMQ node of its own (tests/rabbit.py) holds a backlog of
   ``--readings`` readings in a durable queue, as persistent messages of 100
   readings, then (a tenth as many readings) of 1 reading; a gateway with an
   ``[[amqp_source]]`` drains it: readings a second stored, from the first
   to the last, and the gateway's CPU per million readings. Beside it, the
   gateway consuming from Mosquitto (``--mqtt-source``, the same measure as
   ``run.py``'s: simulated devices publish 100 readings a message as fast as
   the broker takes them, and the figure is what the gateway stored per
   second until it had every reading the broker took).
2. Sink: a backlog stored first (TGP at the most for ``--backlog-seconds``),
   delivered by one gateway with the HTTPS sink to a local receiver, then by
   one with an AMQP sink to the node (an exchange with one bound queue,
   publisher confirms): readings a second and CPU per million readings.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import psutil

from common import Gateway, drop_database, fresh_database, machine, workspace
from upload_load import drain, https_drain, sent, stored, tgp_backlog

from tests.rabbit import Rabbit


def backlog(node: Rabbit, queue: str, devices: int, readings: int, per_message: int) -> int:
    """Publish ``readings`` readings in persistent messages of ``per_message``; returns the messages."""
    import pika

    connection = node.connection()
    channel = connection.channel()
    channel.queue_delete(queue)
    channel.queue_declare(queue, durable=True)
    messages = readings // per_message
    t0 = 1_795_341_600_000  # ms: each device's readings a millisecond apart
    for m in range(messages):
        device = f"sim-{m % devices}"
        base = t0 + (m // devices) * per_message
        doc = {"readings": [{"metric": "temp", "ts": base + i, "value": i} for i in range(per_message)]}
        channel.basic_publish(
            "", queue, json.dumps(doc), pika.BasicProperties(delivery_mode=2, headers={"device": device})
        )
    connection.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        connection = node.connection()
        count = connection.channel().queue_declare(queue, passive=True).method.message_count
        connection.close()
        if count >= messages:
            return messages
        time.sleep(0.2)
    raise SystemExit(f"RabbitMQ took {count} of {messages} messages")


def devices_named(dsn: str, count: int) -> None:
    """The schema made and sim-0 … sim-N-1 registered, as the simulator names them."""
    import psycopg2

    from gateway.cli.simulate import provision_simulated
    from gateway.storage import schema

    conn = psycopg2.connect(dsn)
    try:
        schema.migrate(conn)
        provision_simulated(conn, count)
        conn.commit()
    finally:
        conn.close()


def source(tmp: Path, server: str, node: Rabbit, name: str, readings: int, per_message: int, devices: int) -> dict:
    dsn = fresh_database(server, f"bench_{name}")
    try:
        config = tmp / f"{name}.toml"
        config.write_text(f'[[amqp_source]]\nname = "bench"\nurl = "{node.url}"\nqueue = "{name}"\nprefetch = 1000\n')
        devices_named(dsn, devices)
        messages = backlog(node, name, devices, readings, per_message)
        gateway = Gateway(dsn, tmp / f"gw-{name}", "--config", str(config))
        process = psutil.Process(gateway.proc.pid)
        before = process.cpu_times()
        try:
            while stored(dsn) == 0:
                time.sleep(0.01)
            began = time.perf_counter()
            while (count := stored(dsn)) < messages * per_message:
                time.sleep(0.05)
            done = time.perf_counter()
            after = process.cpu_times()
        finally:
            gateway.stop()
        cpu = (after.user + after.system) - (before.user + before.system)
        return {
            "messages": messages,
            "readings": count,
            "readings_per_s": round(count / (done - began), 1),
            "messages_per_s": round(messages / (done - began), 1),
            "gateway_cpu_s_per_million": round(cpu / count * 1e6, 3),
        }
    finally:
        drop_database(server, f"bench_{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readings", type=int, default=1_000_000, help="readings of the source's backlog [1e6]")
    parser.add_argument("--devices", type=int, default=100, help="devices [100]")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of the MQTT source's load [10]")
    parser.add_argument("--backlog-seconds", type=float, default=10.0, help="seconds of TGP load for the sink [10]")
    parser.add_argument("--db", help="a PostgreSQL server DSN (default: an embedded one)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    from run import mqtt_source

    figures: dict = {}
    with workspace(args.db) as (tmp, server):
        figures["machine"] = machine(server)
        node = Rabbit(Path(tempfile.mkdtemp(prefix="rabbit-", dir=tmp))).start()
        try:
            figures["amqp100"] = source(tmp, server, node, "amqp100", args.readings, 100, args.devices)
            figures["amqp1"] = source(tmp, server, node, "amqp1", max(1000, args.readings // 10), 1, args.devices)
            figures["mqtt_source"] = mqtt_source(tmp, server, args.duration, args.devices, 0)

            dsn = fresh_database(server, "bench_amqp_sink")
            try:
                count = figures["sink_backlog"] = tgp_backlog(tmp, dsn, args.devices, args.backlog_seconds)
                figures["https_sink"] = https_drain(tmp, dsn, count)
                connection = node.connection()
                channel = connection.channel()
                channel.exchange_declare("out", "topic", durable=True)
                channel.queue_declare("out.all", durable=True)
                channel.queue_bind("out.all", "out", "#")
                connection.close()
                config = tmp / "sink.toml"
                config.write_text(f'[[sink]]\nkind = "amqp"\nname = "rabbit"\nurl = "{node.url}"\nexchange = "out"\n')
                gateway = Gateway(dsn, tmp / "gw-amqp-sink", "--config", str(config))
                figures["amqp_sink"] = drain(gateway, dsn, "rabbit", count, lambda: sent(dsn, "rabbit"))
            finally:
                drop_database(server, "bench_amqp_sink")
        finally:
            node.stop()
    a100, a1, mq = figures["amqp100"], figures["amqp1"], figures["mqtt_source"]
    https, sink = figures["https_sink"], figures["amqp_sink"]
    figures["amqp100_over_mqtt_source"] = round(a100["readings_per_s"] / mq["readings_per_s"], 3)
    figures["amqp_sink_over_https"] = round(sink["rate"] / https["rate"], 3)
    print(
        f"AMQP source: {a100['readings_per_s']:,.0f} readings/s at 100 a message "
        f"({figures['amqp100_over_mqtt_source']:.2f} of the MQTT source's {mq['readings_per_s']:,.0f}), "
        f"{a1['readings_per_s']:,.0f} at 1 a message ({a1['messages_per_s']:,.0f} messages/s); "
        f"AMQP sink {sink['rate']:,.0f} readings/s against HTTPS {https['rate']:,.0f} "
        f"({figures['amqp_sink_over_https']:.2f}); CPU s per million: source {a100['gateway_cpu_s_per_million']}, "
        f"sink {sink['gateway_cpu_s_per_million']}, HTTPS sink {https['gateway_cpu_s_per_million']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
