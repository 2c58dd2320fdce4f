"""Vendor JSON mappings ([device_types.NAME]): the config table, and bodies read through it."""

from __future__ import annotations

import json

import pytest

from gateway.config import ConfigError, build_config, duration
from gateway.transports.http import STATUS
from gateway.readings import InvalidInput, Reading, parse_rfc3339
from gateway.ingest.vendor import DeviceTypeError, Unmappable, device_type_from_table, parse_time

ACME = {
    "device": "SerialNo",
    "records": "Samples",
    "timestamp": "Time",
    "timestamp_format": "%d/%m/%Y %H:%M:%S",
    "timezone": "Australia/Perth",
    "expected_interval": "10m",
    "metrics": [
        {"path": "Sensors.OilTemp.Value", "name": "oil_temp", "scale": 0.5, "offset": -10},
        {"path": "Sensors.*.Value", "name": "acme_{1}"},
    ],
}

BODY = {
    "SerialNo": "TRK-17",
    "Samples": [
        {
            "Time": "22/11/2026 18:00:00",
            "Sensors": {"OilTemp": {"Value": 200, "Unit": "F"}, "Density": {"Value": "0.87"}},
        },
        {"Time": "22/11/2026 18:00:05", "Sensors": {"OilTemp": {"Value": 202}}},
    ],
}


def acme():
    return device_type_from_table("acme-oil", ACME, duration)


def test_reads_records_local_time_nested_sensors_and_scales_units():
    readings = acme().read(json.dumps(BODY).encode(), "TRK-17")
    t0 = parse_rfc3339("2026-11-22T10:00:00Z")  # Perth is UTC+8
    assert readings == [
        Reading("oil_temp", t0, 90.0),
        Reading("acme_OilTemp", t0, 200.0),
        Reading("acme_Density", t0, 0.87),
        Reading("oil_temp", t0 + 5_000_000, 91.0),
        Reading("acme_OilTemp", t0 + 5_000_000, 202.0),
    ]
    assert acme().expected_interval == 600


@pytest.mark.parametrize(
    "change, message",
    [
        ({"SerialNo": "TRK-18"}, "SerialNo: names device 'TRK-18', but the token is device 'TRK-17'"),
        ({"Samples": {}}, "Samples: must be a list of records"),
        ({"Samples": [{"Sensors": {}}]}, r"Samples\[0\].Time: missing"),
        ({"Samples": [{"Time": "2026-11-22", "Sensors": {}}]}, r"Samples\[0\].Time: '2026-11-22' does not match"),
        (
            {"Samples": [{"Time": "22/11/2026 18:00:00", "Sensors": {"OilTemp": {"Value": "hot"}}}]},
            r"Samples\[0\].Sensors.OilTemp.Value: 'hot' is not a number",
        ),
        (
            {"Samples": [{"Time": "22/11/2026 18:00:00", "Sensors": {"Oil Temp": {"Value": 1}}}]},
            r"Samples\[0\].Sensors.OilTemp.Value: matches nothing",
        ),
        (
            {"Samples": [{"Time": "22/11/2026 18:00:00", "Sensors": {"OilTemp": {"Value": 1}, "A B": {"Value": 1}}}]},
            r"Samples\[0\].Sensors.A B.Value: metric name 'acme_A B' must be",
        ),
    ],
)
def test_input_that_cannot_be_mapped_names_the_path(change, message):
    with pytest.raises(Unmappable, match=message) as caught:
        acme().map({**BODY, **change}, "TRK-17")
    assert STATUS[caught.value.code] == 422  # what the HTTPS adapter answers


@pytest.mark.parametrize(
    "body,message",
    [(b"{", "not valid JSON"), (b"\xff", "not UTF-8"), (b"[" * 100_000, "not valid JSON")],
)
def test_a_body_that_is_not_json_is_refused_as_such(body, message):
    with pytest.raises(InvalidInput, match=message) as caught:
        acme().read(body, "TRK-17")
    assert caught.value.code == "invalid_json"


def test_optional_metric_missing_is_skipped_and_a_plain_document_is_one_record():
    t = device_type_from_table(
        "plain",
        {
            "timestamp": "ts",
            "timestamp_format": "epoch_s",
            "metrics": [{"path": "rpm"}, {"path": "speed", "optional": True}],
        },
        duration,
    )
    assert t.map({"ts": 1700000000.5, "rpm": 900}, "x") == [Reading("rpm", 1_700_000_000_500_000, 900.0)]


def test_time_formats():
    assert parse_time(1700000000000, "epoch_ms", None) == 1_700_000_000_000_000
    assert parse_time("2026-11-22T10:00:00+01:00", "rfc3339", None) == parse_rfc3339("2026-11-22T09:00:00Z")
    assert parse_time("2026-11-22 10:00 +0100", "%Y-%m-%d %H:%M %z", None) == parse_rfc3339("2026-11-22T09:00:00Z")
    with pytest.raises(ValueError, match="is not a number"):
        parse_time("soon", "epoch_s", None)


@pytest.mark.parametrize(
    "table, message",
    [
        ({"metrics": [{"path": "a"}]}, r"\[device_types.t\]: timestamp is missing"),
        ({"timestamp": "t", "metrics": []}, r"\[device_types.t\].metrics: give a list"),
        ({"timestamp": "t", "timestamp_format": "%H:%M", "metrics": [{"path": "a"}]}, "timezone: needed"),
        ({"timestamp": "t", "timezone": "Mars/Olympus", "metrics": [{"path": "a"}]}, "'Mars/Olympus' is not known"),
        ({"timestamp": "t", "metrics": [{"path": "a..b"}]}, r"metrics\[0\].path: 'a..b' is not a dotted path"),
        ({"timestamp": "t", "metrics": [{"path": "a.*", "name": "{2}"}]}, r"\{2\} names no '\*'"),
        ({"timestamp": "t", "metrics": [{"path": "a", "scale": "x"}]}, r"metrics\[0\].scale: 'x' is not a number"),
        ({"timestamp": "t", "colour": 1, "metrics": [{"path": "a"}]}, "unknown key 'colour'"),
    ],
)
def test_config_errors_name_the_key(table, message):
    with pytest.raises(DeviceTypeError, match=message):
        device_type_from_table("t", table, duration)


def test_config_file_tables_reach_the_gateway_config():
    config = build_config({}, {"device-types": {"acme-oil": ACME}, "quality": {"oil_temp": {"max": 200}}})
    assert config.device_type("acme-oil") == acme()
    assert config.quality.ranges[0].max == 200
    with pytest.raises(ConfigError, match=r"^\[device_types.bad\]: timestamp is missing"):
        build_config({}, {"device-types": {"bad": {"metrics": [{"path": "a"}]}}})
