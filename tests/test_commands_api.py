"""
The commands API end to end: the real service tree on a loopback HTTPS port,
a real PostgreSQL, tokens made by gatewayctl, and a device that speaks HTTPS
(it gets its commands on the answer to its readings or by long poll, and
reports results).
"""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.gatewayproc import gatewayctl
from tests.test_api import close_gateway, ctl, open_gateway
from tests.test_store import add_pg_device


async def call(gw, method: str, path: str, token: str | None, body=None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    response = await gw.http.request(method, gw.url + path, data=data, headers=headers)
    return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_an_operator_sends_a_command_and_an_https_device_runs_it(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn)
    try:
        reader = (await ctl(db_dsn, "token", "add", "dash", "--role", "reader")).strip()
        operator = (await ctl(db_dsn, "token", "add", "ops-desk", "--role", "operator")).strip()
        device = add_pg_device(sql, "truck-1")
        command = {"name": "sample-rate", "params": {"hz": 5}, "ttl": "5m", "id": "rate-1"}

        # A reader and a device token may not send; nothing is queued.
        assert (await call(gw, "POST", "/v1/devices/truck-1/commands", reader, command))[0] == 403
        assert (await call(gw, "POST", "/v1/devices/truck-1/commands", device, command))[0] == 403
        assert sql("SELECT count(*) FROM commands") == [(0,)]
        code, body = await call(gw, "POST", "/v1/devices/nobody/commands", operator, command)
        assert (code, body["error"]) == (404, "no_such_device")
        code, body = await call(gw, "POST", "/v1/devices/truck-1/commands", operator, {"name": "x", "ttl": "40d"})
        assert (code, body["error"]) == (400, "invalid_command") and "ttl" in body["message"]

        code, body = await call(gw, "POST", "/v1/devices/truck-1/commands", operator, command)
        assert code == 202 and (body["id"], body["state"], body["sender"]) == ("rate-1", "queued", "ops-desk")
        code, again = await call(gw, "POST", "/v1/devices/truck-1/commands", operator, command)
        assert code == 200 and again["id"] == "rate-1" and sql("SELECT count(*) FROM commands") == [(1,)]
        code, body = await call(gw, "POST", "/v1/devices/truck-1/commands", operator, {**command, "name": "y"})
        assert (code, body["error"]) == (409, "id_in_use")

        # The device posts readings: the answer carries its command.
        code, body = await gw.post(device, [{"metric": "oil_temp", "ts": 1763805600000, "value": 80.5}])
        assert code == 200 and body["accepted"] == 1
        assert body["commands"] == [
            {"id": "rate-1", "name": "sample-rate", "params": {"hz": 5}, "expires": body["commands"][0]["expires"]}
        ]
        # An operator waits for the result while the device runs it.
        waiting = Deferred.fromCoroutine(call(gw, "GET", "/v1/commands/rate-1?wait=30", reader))
        code, body = await call(
            gw, "POST", "/v1/commands/rate-1/result", device, {"status": "succeeded", "result": {"hz": 5}}
        )
        assert (code, body) == (200, {"id": "rate-1", "state": "succeeded", "recorded": True})
        code, body = await call(gw, "POST", "/v1/commands/rate-1/result", device, {"status": "failed"})
        assert (code, body["recorded"], body["state"]) == (200, False, "succeeded")  # recorded once
        code, shown = await waiting
        assert code == 200 and shown["state"] == "succeeded" and shown["result"] == {"hz": 5}
        assert [e["state"] for e in shown["history"]] == ["queued", "sent", "succeeded"]
        assert shown["history"][1]["transport"] == "https"

        # Long poll: answered when a command comes.
        polled = Deferred.fromCoroutine(call(gw, "GET", "/v1/commands?wait=30", device))
        code, body = await call(gw, "POST", "/v1/devices/truck-1/commands", operator, {"name": "reboot"})
        assert code == 202
        code, got = await polled
        assert code == 200 and [c["name"] for c in got["commands"]] == ["reboot"]
        # Not sent again to the next poll (it is unanswered, but younger than --command-resend).
        assert await call(gw, "GET", "/v1/commands?wait=0", device) == (200, {"commands": []})

        code, listed = await call(gw, "GET", "/v1/devices/truck-1/commands?limit=1", reader)
        assert code == 200 and [c["name"] for c in listed["commands"]] == ["reboot"] and listed["next_cursor"]
        code, rest = await call(gw, "GET", f"/v1/devices/truck-1/commands?cursor={listed['next_cursor']}", reader)
        assert [c["id"] for c in rest["commands"]] == ["rate-1"]

        # Cancel: an operator may, a reader may not; a finished command cannot be.
        reboot = got["commands"][0]["id"]
        assert (await call(gw, "POST", f"/v1/commands/{reboot}/cancel", reader))[0] == 403
        code, body = await call(gw, "POST", f"/v1/commands/{reboot}/cancel", operator)
        assert (code, body["state"]) == (200, "canceled")
        code, body = await call(gw, "POST", "/v1/commands/rate-1/cancel", operator)
        assert (code, body["error"]) == (409, "not_cancelable")
        # A device cannot report on another device's command, nor read the API.
        other = add_pg_device(sql, "truck-2")
        code, body = await call(gw, "POST", "/v1/commands/rate-1/result", other, {"status": "failed"})
        assert code == 404
        assert (await call(gw, "GET", "/v1/commands", None))[0] == 401
        assert (await call(gw, "GET", "/v1/commands/rate-1", device))[0] == 403
    finally:
        await close_gateway(service, gw)


@pytest_twisted.ensureDeferred
async def test_gatewayctl_sends_lists_shows_waits_for_and_cancels_commands(tmp_path, db_dsn, sql):
    service, gw = await open_gateway(tmp_path, db_dsn)
    try:
        device = add_pg_device(sql, "truck-1")
        proc = await deferToThread(
            gatewayctl, "command", "send", "truck-1", "sample-rate", "--param", "hz=5", "--param", "unit=Hz",
            "--ttl", "2m", "--id", "cli-1", "--db", db_dsn,
        )  # fmt: skip
        assert proc.stdout.strip() == "cli-1" and "queued" in proc.stderr
        assert sql("SELECT params, sender FROM commands")[0][0] == {"hz": 5, "unit": "Hz"}
        assert sql("SELECT sender FROM commands")[0][0].startswith("gatewayctl:")
        listing = (await deferToThread(gatewayctl, "command", "list", "--db", db_dsn)).stdout.splitlines()
        assert listing[0].split()[:4] == ["ID", "DEVICE", "NAME", "STATE"]
        assert listing[1].split()[:4] == ["cli-1", "truck-1", "sample-rate", "queued"]

        # --wait: the device takes the command on its next post and reports; gatewayctl prints the result.
        waiting = deferToThread(
            gatewayctl, "command", "send", "truck-1", "reboot", "--id", "cli-2", "--wait", "30", "--db", db_dsn
        )
        # Until the gateway has heard of it (the ledger's notice, or its next look).
        for _ in range(1500):
            if sql("SELECT 1 FROM commands WHERE id = 'cli-2'") and "truck-1" in service.commands.waiting:
                break
            await deferLater(reactor, 0.02, lambda: None)
        code, body = await gw.post(device, [{"metric": "t", "ts": 1763805600000, "value": 1}])
        assert {c["id"] for c in body["commands"]} == {"cli-1", "cli-2"}
        await call(gw, "POST", "/v1/commands/cli-2/result", device, {"status": "succeeded", "result": {"up": 1}})
        proc = await waiting
        assert json.loads(proc.stdout.splitlines()[-1]) == {"up": 1} and "succeeded" in proc.stderr

        shown = json.loads((await deferToThread(gatewayctl, "command", "show", "cli-2", "--db", db_dsn)).stdout)
        assert [e["state"] for e in shown["history"]] == ["queued", "sent", "succeeded"]
        proc = await deferToThread(gatewayctl, "command", "cancel", "cli-2", "--db", db_dsn, check=False)
        assert proc.returncode == 1 and "succeeded already" in proc.stderr
        # A command nobody answers: --wait gives up with status 2.
        proc = await deferToThread(
            gatewayctl, "command", "send", "truck-1", "x", "--id", "cli-3", "--wait", "0.5", "--db", db_dsn,
            check=False,
        )  # fmt: skip
        assert proc.returncode == 2 and "cli-3: queued" in proc.stderr
        await deferToThread(gatewayctl, "command", "cancel", "cli-3", "--db", db_dsn)
        assert sql("SELECT state FROM commands WHERE id = 'cli-3'") == [("canceled",)]
        proc = await deferToThread(gatewayctl, "command", "send", "nobody", "x", "--db", db_dsn, check=False)
        assert proc.returncode == 1 and "no device 'nobody'" in proc.stderr
    finally:
        await close_gateway(service, gw)


@pytest_twisted.ensureDeferred
async def test_an_expired_command_fires_the_alert_rule_watching_it_and_a_success_clears_it(tmp_path, db_dsn, sql):
    rules = [{"name": "reboot-lost", "command": "reboot*", "devices": "truck-*"}]
    service, gw = await open_gateway(tmp_path, db_dsn, {"alert": rules})
    try:
        device = add_pg_device(sql, "truck-1")
        add_pg_device(sql, "pump-1")
        operator = (await ctl(db_dsn, "token", "add", "desk", "--role", "operator")).strip()
        for name, command, id_ in [
            ("truck-1", "reboot", "lost"),
            ("truck-1", "sample", "other"),
            ("pump-1", "reboot", "p"),
        ]:
            await call(gw, "POST", f"/v1/devices/{name}/commands", operator, {"name": command, "id": id_})
        sql("UPDATE commands SET expires_at = now()")
        await service.commands.tick()
        await service.alerts.settled()
        assert sql("SELECT state FROM commands ORDER BY id") == [("expired",), ("expired",), ("expired",)]
        alerts = sql(
            "SELECT a.rule, d.name, a.message, a.cleared_at IS NULL FROM alerts a JOIN devices d ON d.id = a.device_id"
        )
        assert alerts == [("reboot-lost", "truck-1", "command lost (reboot) expired unfinished", True)]
        await call(gw, "POST", "/v1/devices/truck-1/commands", operator, {"name": "reboot-now", "id": "ok"})
        await call(gw, "GET", "/v1/commands?wait=10", device)
        await call(gw, "POST", "/v1/commands/ok/result", device, {"status": "succeeded"})
        await service.alerts.settled()
        assert sql("SELECT cleared_at IS NOT NULL FROM alerts") == [(True,)]
    finally:
        await close_gateway(service, gw)
