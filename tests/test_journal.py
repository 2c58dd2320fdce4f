"""
The outage journal on a real directory: group fsync, segments, the bound,
torn writes and damaged records. Disk work runs inline here (no threads)
so the tests need no reactor; the service runs it with deferToThread.
"""

from __future__ import annotations

import errno
import json
import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import maybeDeferred

from gateway.storage import journal as jmod
from gateway.transports.http import STATUS
from gateway.storage.journal import FILE_MAGIC, HEADER, MARK, Journal, JournalError, JournalFull, encode, scan
from gateway.readings import Quarantined, Reading, StoreUnavailable


def inline(f, *args):
    return maybeDeferred(f, *args)


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred did not fire"
    return out[0]


def record(n: int, device: str = "truck-1", count: int = 3) -> bytes:
    readings = [Reading("oil_temp", 1_700_000_000_000_000 + n * 1000 + i, 80.0 + i / 8) for i in range(count)]
    return encode(7, device, "tgp 10.0.0.5:4000", readings)


def opened(path, max_bytes=10_000_000, **kw) -> Journal:
    j = Journal(path, max_bytes, in_thread=inline, **kw)
    j.open()
    return j


def test_records_round_trip_in_order_and_each_flush_is_fsynced(tmp_path):
    j = opened(tmp_path / "journal")
    for n in range(5):
        assert result_of(j.append(record(n))) is None
    assert j.fsyncs == 5 and j.appended_records == 5
    j.seal()
    [segment] = j.sealed()
    result = result_of(j.read(segment))
    assert [r.readings[0].ts_us for r in result.records] == [1_700_000_000_000_000 + n * 1000 for n in range(5)]
    assert result.records[0].device == "truck-1" and result.records[0].device_id == 7
    assert result.records[0].readings[1] == Reading("oil_temp", 1_700_000_000_000_001, 80.125)
    assert result.damaged == [] and result.torn == 0
    assert j.size == segment.stat().st_size
    result_of(j.remove(segment))
    assert j.size == 0 and not segment.exists()


def test_appends_waiting_for_a_flush_share_one_fsync(tmp_path):
    """While one flush is in its thread, every append waits for the next one, together."""
    held = []

    def later(f, *args):
        from twisted.internet.defer import Deferred

        d = Deferred()
        held.append((d, f, args))
        return d

    j = Journal(tmp_path / "journal", 10_000_000, in_thread=later)
    j.open()
    first = j.append(record(0))
    rest = [j.append(record(n)) for n in range(1, 50)]
    assert len(held) == 1  # one flush in flight; 49 appends wait
    d, f, args = held.pop()
    d.callback(f(*args))
    assert result_of(first) is None and not any(r.called for r in rest)
    assert len(held) == 1
    d, f, args = held.pop()
    d.callback(f(*args))
    assert all(result_of(r) is None for r in rest)
    assert j.fsyncs == 2 and j.appended_records == 50


def test_segments_roll_over_at_their_size(tmp_path):
    j = opened(tmp_path / "journal", segment_bytes=1000)
    for n in range(30):
        result_of(j.append(record(n)))
    j.seal()
    segments = j.sealed()
    assert len(segments) > 3
    assert [p.name for p in segments] == sorted(p.name for p in segments)
    found = [r.readings[0].ts_us for p in segments for r in result_of(j.read(p)).records]
    assert found == [1_700_000_000_000_000 + n * 1000 for n in range(30)]


def test_at_the_bound_appends_fail_with_retry_advice(tmp_path):
    one = len(record(0))
    j = opened(tmp_path / "journal", max_bytes=len(FILE_MAGIC) + 3 * one)
    for n in range(3):
        result_of(j.append(record(n)))
    refused = result_of(j.append(record(3)))
    assert isinstance(refused.value, JournalFull) and isinstance(refused.value, StoreUnavailable)
    assert STATUS[refused.value.code] == 503 and refused.value.retry_after > 0
    assert "journal is full" in refused.value.message
    assert not j.has_room(1)
    refused.trap(JournalFull)


def test_a_second_process_cannot_open_the_same_journal(tmp_path):
    opened(tmp_path / "journal")
    with pytest.raises(JournalError, match="in use by another gateway process"):
        Journal(tmp_path / "journal", 1000, in_thread=inline).open()


def test_a_torn_last_write_is_dropped_after_a_crash(tmp_path):
    j = opened(tmp_path / "journal")
    for n in range(3):
        result_of(j.append(record(n)))
    [segment] = j.sealed() or [j._active]
    whole = segment.read_bytes()
    with open(segment, "ab") as f:  # the crash came in the middle of the next write
        f.write(record(3)[:20])
    again = opened_after_crash(tmp_path / "journal", j)
    [old] = again.sealed()
    result = result_of(again.read(old))
    assert len(result.records) == 3 and result.torn == 20 and result.damaged == []
    again.counted(result)
    assert again.torn_bytes == 20
    assert old.read_bytes() == whole + record(3)[:20]  # left as it was; removed once replayed


def opened_after_crash(path, old: Journal) -> Journal:
    os.close(old._lock_fd)  # the process is gone: its lock goes with it
    if old._fd is not None:
        os.close(old._fd)
    return opened(path)


def test_a_damaged_record_in_the_middle_is_moved_aside_and_the_rest_replayed(tmp_path):
    j = opened(tmp_path / "journal")
    for n in range(5):
        result_of(j.append(record(n)))
    j.seal()
    [segment] = j.sealed()
    data = bytearray(segment.read_bytes())
    one = len(record(0))
    at = len(FILE_MAGIC) + 2 * one + 30  # inside the third record's payload
    data[at] ^= 0xFF
    segment.write_bytes(bytes(data))
    result = result_of(j.read(segment))
    assert [r.readings[0].ts_us % 100_000 for r in result.records] == [0, 1000, 3000, 4000]
    assert [(offset, len(region)) for offset, region in result.damaged] == [(len(FILE_MAGIC) + 2 * one, one)]
    aside = tmp_path / "journal" / "damaged" / f"{segment.stem}-{len(FILE_MAGIC) + 2 * one}.bad"
    assert aside.read_bytes() == bytes(data[len(FILE_MAGIC) + 2 * one : len(FILE_MAGIC) + 3 * one])


def test_damage_at_the_end_of_an_older_segment_is_not_taken_for_a_torn_write(tmp_path):
    j = opened(tmp_path / "journal", segment_bytes=200)
    for n in range(4):
        result_of(j.append(record(n)))
    first = j.sealed()[0]
    first.write_bytes(first.read_bytes()[:-5])
    again = opened_after_crash(tmp_path / "journal", j)
    result = result_of(again.read(first))
    assert result.torn == 0 and len(result.damaged) == 1


def test_a_failed_write_acknowledges_nothing_and_leaves_no_half_record(tmp_path, monkeypatch):
    j = opened(tmp_path / "journal")
    result_of(j.append(record(0)))
    size = j.size

    def disk_full(fd, data):
        os.write(fd, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jmod, "_write_all", disk_full)
    failed = result_of(j.append(record(1)))
    assert isinstance(failed.value, JournalFull) and "disk is full" in failed.value.message
    assert failed.value.code == "journal_full" and failed.value.retry_after == 30
    failed.trap(StoreUnavailable)
    assert j.size == size and j.full  # /healthz says so until a write fits again
    monkeypatch.undo()
    result_of(j.append(record(2)))
    assert not j.full
    j.seal()
    found = [r.readings[0].ts_us % 100_000 for p in j.sealed() for r in result_of(j.read(p)).records]
    assert found == [0, 2000]
    assert all(result_of(j.read(p)).damaged == [] for p in j.sealed())


RECORDS = [record(n, count=1 + n % 4) for n in range(6)]
SEGMENT = FILE_MAGIC + b"".join(RECORDS)


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, len(SEGMENT)), last=st.booleans())
def test_any_truncation_keeps_every_whole_record(cut, last):
    result = scan(SEGMENT[:cut], last_write=last)
    whole = 0
    end = len(FILE_MAGIC)
    for r in RECORDS:
        if end + len(r) > cut:
            break
        whole += 1
        end += len(r)
    assert len(result.records) == whole
    leftover = max(0, cut - end) if cut >= len(FILE_MAGIC) else cut
    if last:
        assert result.torn == leftover and result.damaged == []
    else:
        assert sum(len(region) for _, region in result.damaged) == leftover and result.torn == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.integers(0, len(SEGMENT)), st.booleans())
def test_random_bytes_anywhere_never_crash_the_scan_or_invent_records(garbage, at, last):
    data = SEGMENT[:at] + garbage + SEGMENT[at:]
    result = scan(data, last_write=last)
    payloads = {r.payload for r in result.records}
    original = {r[jmod.HEADER.size :] for r in RECORDS}
    assert payloads <= original | {p for p in payloads if p in garbage}
    accounted = sum(len(region) for _, region in result.damaged) + result.torn
    accounted += sum(len(r.payload) + jmod.HEADER.size for r in result.records)
    assert accounted + (len(FILE_MAGIC) if data.startswith(FILE_MAGIC) else 0) == len(data)


def test_quarantined_readings_travel_in_the_record_and_older_records_still_read():
    held = (Quarantined(0, Reading("oil_temp", 1_700_000_000_000_000, 900.0), "oil_temp.max: 900 is above 200"),)
    readings = [Reading("oil_temp", 1_700_000_000_000_001, 80.0)]
    new = scan(FILE_MAGIC + encode(7, "truck-1", "tgp 10.0.0.5:4000", readings, held), last_write=True).records
    assert [(r.readings, r.quarantined) for r in new] == [(tuple(readings), held)]
    older = FILE_MAGIC + encode(7, "truck-1", "tgp 10.0.0.5:4000", readings)  # no "q": as earlier gateways wrote
    assert b'"q"' not in older
    assert [(r.readings, r.quarantined) for r in scan(older, last_write=True).records] == [(tuple(readings), ())]


@pytest.mark.parametrize(
    "held",
    [
        [["oil_temp", 1, 1.0]],  # no rule
        [["oil_temp", 1, 1.0, ""]],  # an empty rule
        [["oil_temp", "1", 1.0, "max"]],  # a time that is not a number
        "not a list",
    ],
)
def test_a_record_with_a_malformed_quarantine_is_not_one_of_ours(held):
    payload = json.dumps({"d": 7, "n": "truck-1", "s": "tgp x:1", "r": [], "q": held}).encode()
    data = FILE_MAGIC + HEADER.pack(MARK, len(payload), zlib.crc32(payload)) + payload
    result = scan(data, last_write=False)
    assert result.records == [] and len(result.damaged) == 1
