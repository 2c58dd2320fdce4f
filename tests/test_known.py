"""The known-devices snapshot: what it holds, how it is read back, and what the credentials do with it."""

from __future__ import annotations

import json
import os
import stat

import pytest
from twisted.internet.defer import fail, maybeDeferred
from twisted.internet.task import Clock

from gateway.ingest import tokens
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
