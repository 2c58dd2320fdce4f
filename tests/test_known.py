"""The known-devices snapshot: what it holds, how it is read back, and what the credentials do with it."""

from __future__ import annotations

import json
import os
import stat

import pytest
import pytest_twisted
from twisted.internet.defer import fail, maybeDeferred
from twisted.internet.task import Clock

from gateway import tokens
from gateway.readings import Device, StoreUnavailable
from gateway.storage.credentials import Credentials, KnownDevice
from gateway.storage.known import KnownDevices, read_snapshot, write_snapshot


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred did not fire"
    return out[0]


def device(id_: int, name: str, revoked: bool = False) -> tuple[KnownDevice, str]:
    new = tokens.new_token()
    return KnownDevice(id_, name, new.token_id, b"" if revoked else new.digest, None, revoked), new.token


def test_the_snapshot_round_trips_private_and_without_tokens(tmp_path):
    (a, token_a), (b, _) = device(1, "truck-1"), device(2, "truck-2", revoked=True)
    path = tmp_path / "known-devices.json"
    write_snapshot(path, [a, b])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert token_a.encode() not in path.read_bytes() and token_a.split(".")[1].encode() not in path.read_bytes()
    assert read_snapshot(path) == [a, b]
    assert read_snapshot(tmp_path / "none.json") == []


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b'{"version": 2, "devices": []}',
        json.dumps({"version": 1, "devices": [[1, "x y", "t", "", None, False]]}).encode(),
    ],
)
def test_a_damaged_snapshot_is_ignored_with_a_warning(tmp_path, content):
    path = tmp_path / "known-devices.json"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        read_snapshot(path)
    credentials = Credentials(lambda sql, params: fail(StoreUnavailable("away")), Clock(), remember=True)
    known = KnownDevices(path, credentials, lambda sql, params: fail(StoreUnavailable("away")), Clock(), maybeDeferred)
    assert result_of(known.load()) == 0 and credentials.known == 0


def test_while_the_database_is_away_known_devices_pass_and_revoked_ones_do_not(tmp_path):
    (a, token_a), (b, _) = device(1, "truck-1"), device(2, "truck-2", revoked=True)
    revoked_token = b.token_id + "." + "A" * 43  # the revoked device's token id, whatever its secret was
    path = tmp_path / "known-devices.json"
    write_snapshot(path, [a, b])
    credentials = Credentials(lambda sql, params: fail(StoreUnavailable("away")), Clock(), remember=True)
    known = KnownDevices(path, credentials, lambda sql, params: fail(StoreUnavailable("away")), Clock(), maybeDeferred)
    assert result_of(known.load()) == 2
    assert result_of(credentials.authenticate(token_a)) == Device(1, "truck-1")
    assert result_of(credentials.authenticate(revoked_token)) is None  # refused, not "retry later"
    assert result_of(credentials.device_key("truck-1")) == (Device(1, "truck-1"), a.token_hash)
    assert result_of(credentials.device_key("truck-2")).check(StoreUnavailable)  # no key kept for it
    credentials.forget(["truck-1"])  # a revocation notice: forgotten at once
    assert result_of(credentials.authenticate(token_a)).check(StoreUnavailable)


def test_looked_up_tokens_are_kept_a_second_and_then_let_go():
    """A burst of requests costs one query; an idle fleet's tokens are not held past their second."""
    (a, token_a), (b, token_b) = device(1, "truck-1"), device(2, "truck-2")
    rows = {d.token_id: (d.id, d.name, memoryview(d.token_hash), False, None) for d in (a, b)}
    queries = []

    def query(sql, params):
        queries.append(params[0])
        return maybeDeferred(lambda: [rows[params[0]]])

    clock = Clock()
    credentials = Credentials(query, clock, remember=True)
    for _ in range(3):
        assert result_of(credentials.authenticate(token_a)) == Device(1, "truck-1")
    assert queries == [a.token_id]
    assert isinstance(credentials._known_tokens[a.token_id][2], bytes)  # not a view holding psycopg2's buffer
    clock.advance(2)
    assert result_of(credentials.authenticate(token_b)) == Device(2, "truck-2")
    assert list(credentials._rows) == [b.token_id]  # truck-1's expired entries went with this lookup
    assert list(credentials._proven) == [token_b]
    assert result_of(credentials.authenticate(token_a)) == Device(1, "truck-1")
    assert queries == [a.token_id, b.token_id, a.token_id]


def test_the_token_caches_hold_at_most_their_bound(monkeypatch):
    from gateway.storage import credentials as module

    monkeypatch.setattr(module, "AUTH_CACHE_SIZE", 3)
    table: dict = {}
    for i in range(10):
        module.cache(table, f"k{i}", (100.0, i), now=0.0)
    assert list(table) == ["k7", "k8", "k9"]
    module.cache(table, "k8", (100.0, "again"), now=0.0)
    assert list(table) == ["k7", "k9", "k8"]


@pytest_twisted.ensureDeferred
async def test_simulated_devices_given_new_tokens_reach_the_known_devices_file(tmp_path, db_dsn):
    """gatewayctl simulate provisions as device rotate does: a running gateway's snapshot takes the new tokens."""
    import psycopg2
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from gateway.cli.simulate import provision_simulated
    from tests.conftest import start_service

    service = await start_service(tmp_path, db_dsn)
    try:
        known = service.config.known_devices_file

        def token_ids() -> dict:
            if not known.exists():
                return {}
            return {row[1]: row[2] for row in json.loads(known.read_bytes())["devices"]}

        conn = psycopg2.connect(db_dsn)
        try:
            provision_simulated(conn, 2)
            for _ in range(400):
                if "sim-1" in token_ids():
                    break
                await deferLater(reactor, 0.05, lambda: None)
            first = token_ids()["sim-1"]
            [(_, token0), (_, token1)] = provision_simulated(conn, 2)  # again: new tokens
        finally:
            conn.close()
        new = token1.split(".")[0]
        for _ in range(400):
            if token_ids().get("sim-1") == new:
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert token_ids()["sim-1"] == new != first
    finally:
        await service.stopService()
