"""The JSON body of POST /v1/readings: accepted shapes and precise errors."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.ingest.parse import parse_readings_json
from gateway.readings import InvalidInput, Reading
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
