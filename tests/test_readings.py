"""Normalisation of what devices send: timestamps, values, names."""

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.readings import (
    MAX_TS_US,
    MIN_TS_US,
    format_ts,
    is_name,
    parse_rfc3339,
    parse_ts,
    parse_value,
)


def test_rfc3339_utc_with_milliseconds():
    assert parse_rfc3339("2026-11-22T10:00:00.250Z") == 1795341600250000


def test_rfc3339_offset_is_applied():
    assert parse_rfc3339("2026-11-22T11:00:00+01:00") == parse_rfc3339("2026-11-22T10:00:00Z")
    assert parse_rfc3339("2026-11-22T09:30:00-00:30") == parse_rfc3339("2026-11-22T10:00:00Z")


def test_rfc3339_nanoseconds_are_cut_to_microseconds():
    assert parse_rfc3339("1970-01-01T00:00:00.123456789Z") == 123456


@given(
    st.datetimes(min_value=datetime.datetime(1, 1, 1), max_value=datetime.datetime(9999, 12, 31, 23, 59, 59)),
    st.sampled_from(["", ".5", ".25", ".250", ".123456", ".1234567", ".000000001"]),
)
def test_rfc3339_in_utc_agrees_with_the_standard_library_whether_its_second_was_seen_or_not(when, fraction):
    text = when.strftime("%Y-%m-%dT%H:%M:%S").zfill(19) + fraction + "Z"
    expected = datetime.datetime.fromisoformat(text[:19] + (fraction[:7] if fraction else "") + "+00:00")
    us = (expected - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)) // datetime.timedelta(microseconds=1)
    assert parse_rfc3339(text) == us  # a second maybe new
    assert parse_rfc3339(text) == us  # and now seen


def test_the_seconds_remembered_are_bounded(monkeypatch):
    from gateway import readings

    monkeypatch.setattr(readings, "SECONDS_US", {})
    for minute in range(readings.SECONDS_SEEN_MAX + 10):
        parse_rfc3339(f"2026-11-22T{minute // 3600 % 24:02d}:{minute // 60 % 60:02d}:{minute % 60:02d}.5Z")
    assert 0 < len(readings.SECONDS_US) <= readings.SECONDS_SEEN_MAX


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-22T10:00:00",  # no zone: ambiguous, refused
        "2026-11-22",
        "2026-13-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "2026-11-22T24:00:00Z",
        "2026-11-22T10:00:60Z",
        "2026-11-22T10:00:00+25:00",
        "yesterday",
        "",
    ],
)
def test_rfc3339_refuses(text):
    with pytest.raises(ValueError):
        parse_rfc3339(text)


def test_epoch_milliseconds():
    assert parse_ts(1763805600000) == 1763805600000 * 1000


@pytest.mark.parametrize("value", [True, 1.5e12, None, [1], {"a": 1}])
def test_ts_refuses_other_types(value):
    with pytest.raises(ValueError, match="RFC 3339 string or whole epoch milliseconds"):
        parse_ts(value)


def test_ts_range_is_years_1_to_9999():
    with pytest.raises(ValueError, match="outside years"):
        parse_ts(10**15)
    assert parse_ts("9999-12-31T23:59:59.999999Z") == MAX_TS_US
    assert parse_ts("0001-01-01T00:00:00Z") == MIN_TS_US


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "1", None, 10**400])
def test_value_refuses(value):
    with pytest.raises(ValueError):
        parse_value(value)


def test_value_accepts_ints_and_floats():
    assert parse_value(3) == 3.0
    assert parse_value(-1.25) == -1.25


@pytest.mark.parametrize(
    "name,ok",
    [
        ("oil_temp", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("", False),
        ("oil temp", False),
        ("temp/1", False),
        ("engine.rpm:avg-1", True),
        ("é", False),
        (3, False),
    ],
)
def test_names(name, ok):
    assert is_name(name) is ok


@given(st.integers(min_value=MIN_TS_US, max_value=MAX_TS_US))
def test_format_ts_round_trips(ts_us):
    assert parse_rfc3339(format_ts(ts_us)) == ts_us


@given(st.datetimes(timezones=st.timezones()))
def test_rfc3339_agrees_with_datetime(dt):
    expected = (dt - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)) // datetime.timedelta(microseconds=1)
    offset = dt.utcoffset()
    if offset is None or offset.seconds % 60 or offset.microseconds:
        return  # RFC 3339 offsets are whole minutes
    text = dt.isoformat()
    if ":" not in text[-6:]:
        text += "Z"
    assert parse_rfc3339(text) == expected


def test_counts_read_as_english():
    from gateway.readings import counted

    assert [counted(n, "device") for n in (0, 1, 2)] == ["0 devices", "1 device", "2 devices"]
    assert counted(1, "parked batch", "parked batches") == "1 parked batch"
    assert counted(3, "parked batch", "parked batches") == "3 parked batches"
