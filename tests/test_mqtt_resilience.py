"""
MQTT under the failure users meet: ``twistd -n gateway`` killed with SIGKILL
while a paho client has QoS 1 messages in flight. The client reconnects and
sends again what was not acknowledged: every message is stored once.
"""

from __future__ import annotations

import json
import os
import signal
import threading

from paho.mqtt import client as paho

from tests.gatewayproc import gatewayctl, unread_bytes
from tests.test_resilience import make_gateway, wait_until  # noqa: F401 - a fixture

MESSAGES, PER_MESSAGE = 300, 10


def payload(m: int) -> bytes:
    base = 1_795_341_600_000 + m * PER_MESSAGE
    return json.dumps(
        {"readings": [{"metric": "oil_temp", "ts": base + i, "value": m + i / 100} for i in range(PER_MESSAGE)]}
    ).encode()


def test_kill_9_with_messages_in_flight_then_resend_stores_each_once(make_gateway):  # noqa: F811
    gw = make_gateway().start()
    token = gatewayctl("device", "add", "truck-17", data_dir=gw.data_dir).stdout.strip()
    c = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id="truck-17-a",
        protocol=paho.MQTTv311,
        clean_session=False,
        reconnect_on_failure=False,
    )
    c.username_pw_set("truck-17", token)
    c.tls_set(ca_certs=gw.cert)
    c.max_inflight_messages_set(20)
    acked: set[int] = set()
    lock = threading.Lock()

    def published(client, userdata, mid, reason_code, properties) -> None:
        with lock:
            acked.add(mid)

    c.on_publish = published
    c.connect("127.0.0.1", gw.mqtt_tls_port, keepalive=30)
    c.loop_start()
    try:
        mids = [c.publish("devices/truck-17/readings", payload(m), qos=1).mid for m in range(100)]
        assert wait_until(lambda: len(acked) == 100, 30), f"{len(acked)} of 100 acknowledged"
        # Freeze the gateway, so that what is sent now is surely in flight when it dies.
        os.kill(gw.proc.pid, signal.SIGSTOP)
        mids += [c.publish("devices/truck-17/readings", payload(m), qos=1).mid for m in range(100, MESSAGES)]
        # paho writes what its window allows into the connection, where it waits unread by the frozen gateway:
        # messages in flight, none of which can be answered.
        assert wait_until(lambda: unread_bytes(gw.mqtt_tls_port, remote=False) > 0, 30), "nothing was in flight"
        gw.kill()
        with lock:
            before = len(acked)
        assert before == 100
        c.loop_stop()
        gw.start()
        c.connect("127.0.0.1", gw.mqtt_tls_port, keepalive=30)  # the same session: paho sends its in-flight again
        c.loop_start()
        assert wait_until(lambda: len(acked) == MESSAGES, 60), f"{len(acked)} of {MESSAGES} acknowledged"
    finally:
        c.disconnect()
        c.loop_stop()
    assert set(mids) == acked
    rows = [json.loads(line) for line in gatewayctl("export", data_dir=gw.data_dir).stdout.splitlines()]
    stamps = [row["ts"] for row in rows]
    assert len(stamps) == len(set(stamps)) == MESSAGES * PER_MESSAGE  # every reading once
    print(f"mqtt kill -9: {before} of {MESSAGES} messages acknowledged before the kill, all {MESSAGES} after")
