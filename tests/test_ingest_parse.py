"""The JSON body of POST /v1/readings: accepted shapes and precise errors."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ingest.parse import _readings, parse_reading, parse_readings_json
from gateway.readings import InvalidInput, Reading, is_name, parse_rfc3339
from gateway.transports.http import STATUS


def body(*readings, **extra):
    return json.dumps({"readings": list(readings), **extra}).encode()


def test_parses_readings_in_order():
    got = parse_readings_json(
        body(
            {"metric": "oil_temp", "ts": "2026-11-22T10:00:00.250Z", "value": 81.5},
            {"metric": "density", "ts": 1763805600000, "value": 870},
        )
    )
    assert got == [
        Reading("oil_temp", 1795341600250000, 81.5),
        Reading("density", 1763805600000000, 870.0),
    ]


def test_empty_list_is_fine():
    assert parse_readings_json(body()) == []


@pytest.mark.parametrize(
    "raw,code,message",
    [
        (b"{", "invalid_json", "not valid JSON"),
        (b"\xff\xfe", "invalid_json", "not UTF-8"),
        (b"[]", "invalid_body", '"readings" list'),
        (b'{"readings": {}}', "invalid_body", "readings: must be a list"),
        (b'{"readings": [], "device": "x"}', "invalid_body", "device: unknown field"),
        (b"[" * 100_000, "invalid_json", "not valid JSON"),  # deeper than any parser's stack
        (b'{"readings": [{"metric": "a", "ts": 1, "value": 1}]', "invalid_json", "not valid JSON"),
    ],
)
def test_body_errors(raw, code, message):
    with pytest.raises(InvalidInput) as e:
        parse_readings_json(raw)
    assert e.value.code == code
    assert message in e.value.message
    assert STATUS[e.value.code] == 400  # what the HTTPS adapter answers


@pytest.mark.parametrize(
    "reading,where",
    [
        ({"metric": "a", "ts": 1}, "readings[1].value: missing"),
        ({"metric": "a", "ts": 1, "value": 1, "unit": "C"}, "readings[1].unit: unknown field"),
        ({"metric": "a b", "ts": 1, "value": 1}, "readings[1].metric: must be"),
        ({"metric": "a", "ts": "noon", "value": 1}, "readings[1].ts: is not an RFC 3339"),
        ({"metric": "a", "ts": 1, "value": "1"}, "readings[1].value: must be a number"),
        ({"metric": "a", "ts": 1, "value": None}, "readings[1].value: must be a number"),
        ("a", "readings[1]: must be an object"),
    ],
)
def test_first_bad_reading_is_named_by_index_and_field(reading, where):
    good = {"metric": "a", "ts": 1, "value": 1}
    with pytest.raises(InvalidInput) as e:
        parse_readings_json(body(good, reading, reading))
    assert e.value.message.startswith(where)
    assert e.value.code == "invalid_reading"


def test_nan_literal_is_refused():
    with pytest.raises(InvalidInput, match="must be finite"):
        parse_readings_json(b'{"readings": [{"metric": "a", "ts": 1, "value": NaN}]}')


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@given(st.binary(max_size=200))
def test_random_bytes_give_invalid_input_or_readings(raw):
    try:
        result = parse_readings_json(raw)
    except InvalidInput as e:
        assert STATUS[e.code] == 400
    else:
        assert all(isinstance(r, Reading) for r in result)


@given(st.lists(st.dictionaries(st.sampled_from(["metric", "ts", "value", "x"]), json_values, max_size=4), max_size=4))
def test_random_documents_give_invalid_input_or_readings(items):
    raw = json.dumps({"readings": items}).encode()
    try:
        result = parse_readings_json(raw)
    except InvalidInput as e:
        assert e.message.startswith("readings[")
    else:
        assert len(result) == len(items)


# Times the fast loop takes (a remembered second, every length of fraction) and times near them: a bad
# character in each place, other separators and zones, seconds that do not exist.
near_times = st.builds(
    lambda second, frac: f"2026-11-22T10:00:{second}{frac}Z",
    st.sampled_from(["00", "59"]),
    st.sampled_from(["", ".2", ".25", ".250", ".123456", ".1234567", ".123456789"]),
) | st.builds(
    lambda second, sep, frac, zone: f"2026-11-22{sep}10:00:{second}{frac}{zone}",
    st.sampled_from(["00", "59", "60", "5", "0a"]),
    st.sampled_from(["T", "t", " ", "x"]),
    st.sampled_from(["", ".", ".2", ".123456", ".1234567890", ".2x", ".٣", "٣", "x25", "025"]),
    st.sampled_from(["Z", "z", "+00:00", "+01:30", ""]),
)
near_readings = st.fixed_dictionaries(
    {
        "metric": st.sampled_from(["oil_temp", "density", "oil_temp", "density", "bad name", ""]),
        "ts": near_times | st.integers(-(2**63), 2**63),
        "value": st.sampled_from([math.inf, -math.inf, math.nan, 0.0, -0.0, 81.5, 1e308])
        | st.floats()
        | st.integers(-(2**70), 2**70)
        | st.booleans(),
    },
    optional={"x": st.none()},
)


def outcome(parse, items):
    try:
        return parse(items)
    except InvalidInput as e:
        return e.message


def one_at_a_time(items):
    return [parse_reading(item, "readings", i) for i, item in enumerate(items)]


@settings(max_examples=500)
@given(st.lists(near_readings, max_size=6))
def test_the_fast_loop_agrees_with_the_careful_one(items):
    """With the names and seconds remembered, so that the fast loop is tried, each list parses as one at a time."""
    for sep in "Tt ":
        for second in ("00", "59"):
            parse_rfc3339(f"2026-11-22{sep}10:00:{second}Z")
    assert is_name("oil_temp") and is_name("density")
    for item in items:  # each alone: most lists hold a bad reading, which ends the list's parse
        assert outcome(_readings, [item]) == outcome(one_at_a_time, [item])
    got = outcome(_readings, items)
    assert got == outcome(one_at_a_time, items)
    assert isinstance(got, str) or all(type(r) is Reading for r in got)
