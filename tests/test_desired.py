"""
Desired configuration end to end: an operator sets a device's desired
document (API and gatewayctl); the delta reaches a paho MQTT device on
devices/<device>/desired and an HTTPS device as the command ``desired``;
what they report finishes it, and only a full match does.
"""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet.threads import deferToThread

from gateway.commands.desired import delta
from tests.gatewayproc import gatewayctl
from tests.test_api import close_gateway, ctl, open_gateway
from tests.test_commands_api import call
from tests.test_commands_mqtt import Device, state_of
from tests.test_store import add_pg_device


def test_the_delta_is_what_differs_or_is_missing():
    assert delta({"a": 1, "b": [1, 2], "c": None}, {"a": 1, "b": [1], "d": 4}) == {"b": [1, 2], "c": None}
    assert delta({}, {"a": 1}) == {}


@pytest_twisted.ensureDeferred
async def test_an_mqtt_device_gets_the_delta_and_a_matching_report_finishes_it(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn)
    device = None
    try:
        reader = (await ctl(db_dsn, "token", "add", "dash", "--role", "reader")).strip()
        operator = (await ctl(db_dsn, "token", "add", "desk", "--role", "operator")).strip()
        token = add_pg_device(sql, "truck-1")
        assert (await call(gw, "PUT", "/v1/devices/truck-1/desired", reader, {"rate": 5}))[0] == 403
        code, body = await call(gw, "PUT", "/v1/devices/truck-1/desired", operator, {"rate": 5, "mode": "eco"})
        assert code == 200 and body["version"] == 1 and body["delta"] == {"rate": 5, "mode": "eco"}
        assert body["updated_by"] == "desk"

        device = Device("5.0", service.mqtt_ports[0].getHost().port, token)
        await deferToThread(device.connect)
        assert await deferToThread(device.subscribe, "devices/truck-1/desired") == [1]
        message = await deferToThread(device.next)
        got = json.loads(message.payload)
        assert message.topic == "devices/truck-1/desired"
        assert (got["version"], got["delta"]) == (1, {"rate": 5, "mode": "eco"})
        await state_of(sql, got["id"], "delivered")

        # A partial report: the delta is not done.
        await deferToThread(
            lambda: device.c.publish("devices/truck-1/reported", json.dumps({"rate": 5}), qos=1).wait_for_publish(
                timeout=20
            )
        )
        code, body = await call(gw, "GET", "/v1/devices/truck-1/desired", reader)
        assert body["reported"] == {"rate": 5} and body["delta"] == {"mode": "eco"}
        assert sql("SELECT state FROM commands WHERE id = %s", (got["id"],)) == [("delivered",)]
        await deferToThread(
            lambda: device.c.publish("devices/truck-1/reported", json.dumps({"mode": "eco"}), qos=1).wait_for_publish(
                timeout=20
            )
        )
        await state_of(sql, got["id"], "succeeded")
        code, body = await call(gw, "GET", "/v1/devices/truck-1/desired", reader)
        assert body["delta"] == {} and body["reported"] == {"rate": 5, "mode": "eco"}

        # A new version supersedes what was not done, and sends only what differs.
        code, body = await call(gw, "PUT", "/v1/devices/truck-1/desired", operator, {"rate": 10, "mode": "eco"})
        assert body["version"] == 2 and body["delta"] == {"rate": 10}
        got = json.loads((await deferToThread(device.next)).payload)
        assert (got["version"], got["delta"]) == (2, {"rate": 10})
        code, body = await call(gw, "PUT", "/v1/devices/truck-1/desired", operator, {"rate": 12, "mode": "eco"})
        newest = json.loads((await deferToThread(device.next)).payload)
        assert newest["version"] == 3
        assert sql("SELECT state, note FROM commands WHERE id = %s", (got["id"],)) == [
            ("canceled", "superseded by desired version 3")
        ]
        # Acknowledged, never reported: the device comes back and gets it again.
        await state_of(sql, newest["id"], "delivered")
        await deferToThread(device.close)
        device = Device("5.0", service.mqtt_ports[0].getHost().port, token)
        await deferToThread(device.connect)
        await deferToThread(device.subscribe, "devices/truck-1/desired")
        again = json.loads((await deferToThread(device.next)).payload)
        assert (again["id"], again["delta"]) == (newest["id"], {"rate": 12})
    finally:
        if device is not None:
            await deferToThread(device.close)
        await close_gateway(service, gw)


@pytest_twisted.ensureDeferred
async def test_an_https_device_gets_the_delta_as_a_command_and_gatewayctl_sets_and_shows_it(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn)
    try:
        token = add_pg_device(sql, "truck-1")
        proc = await deferToThread(gatewayctl, "device", "desire", "truck-1", "rate=5", "label=north", "--db", db_dsn)
        state = json.loads(proc.stdout)
        assert state["desired"] == {"rate": 5, "label": "north"} and state["version"] == 1
        assert "to be applied: label, rate" in proc.stderr
        await state_of(sql, sql("SELECT id FROM commands")[0][0], "queued")
        for _ in range(3):  # until the gateway has heard of it
            code, body = await call(gw, "GET", "/v1/commands?wait=5", token)
            if body["commands"]:
                break
        [command] = body["commands"]
        assert command["name"] == "desired" and command["params"] == {
            "version": 1,
            "delta": {"rate": 5, "label": "north"},
        }
        # A result with no object: the delta it was sent is what it applied.
        await call(gw, "POST", f"/v1/commands/{command['id']}/result", token, {"status": "succeeded"})
        shown = json.loads((await deferToThread(gatewayctl, "device", "desire", "truck-1", "--db", db_dsn)).stdout)
        assert shown["reported"] == {"rate": 5, "label": "north"} and shown["delta"] == {}
        proc = await deferToThread(gatewayctl, "device", "desire", "nobody", "x=1", "--db", db_dsn, check=False)
        assert proc.returncode == 1 and "no device 'nobody'" in proc.stderr
    finally:
        await close_gateway(service, gw)
