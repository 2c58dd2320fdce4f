"""Quality rules: ranges per metric, times too far ahead or behind, and the [quality] table."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, build_config, duration
from gateway.ingest.quality import QualityError, QualityRules, Range, rules_from_table
from gateway.readings import Reading, parse_rfc3339

NOW = parse_rfc3339("2026-11-22T10:00:00Z") / 1e6


def test_split_keeps_order_and_names_the_failed_rule():
    rules = QualityRules(ranges=(Range("latitude", -90, 90), Range("oil_temp", max=200)), max_past=30 * 86400)
    t = int(NOW * 1e6)
    readings = [
        Reading("latitude", t, 45.0),
        Reading("latitude", t, 91.0),
        Reading("oil_temp", t, 250.0),
        Reading("rpm", parse_rfc3339("2000-01-01T00:00:00Z"), 800.0),
        Reading("rpm", t + 2 * 86400 * 1_000_000, 800.0),
        Reading("oil_temp", t, -300.0),
    ]
    good, bad = rules.split(readings, NOW)
    assert good == [readings[0], readings[5]]
    assert [(q.index, q.rule) for q in bad] == [
        (1, "latitude.max: 91 is above 90"),
        (2, "oil_temp.max: 250 is above 200"),
        (3, "max_past: 2000-01-01T00:00:00Z is over 30d old"),
        (4, "max_future: 2026-11-24T10:00:00Z is over 1d ahead of the gateway"),
    ]


def test_all_good_returns_the_input_itself():
    readings = [Reading("rpm", int(NOW * 1e6), 1.0)]
    good, bad = QualityRules().split(readings, NOW)
    assert good is readings and bad == []


def test_time_rules_can_be_turned_off():
    rules = rules_from_table({"max_past": "off", "max_future": "off"}, duration)
    assert rules.split([Reading("rpm", 0, 1.0)], NOW)[1] == []


def test_table_parses_settings_and_ranges():
    rules = rules_from_table(
        {"max_future": "5m", "flag_failures": 3, "flag_window": "10m", "latitude": {"min": -90, "max": 90}}, duration
    )
    assert (rules.max_future, rules.flag_failures, rules.flag_window) == (300, 3, 600)
    assert rules.ranges == (Range("latitude", -90.0, 90.0),)


@pytest.mark.parametrize(
    "table, message",
    [
        ({"latitude": {"min": 90, "max": -90}}, r"\[quality.latitude\]: min 90 is above max -90"),
        ({"latitude": {}}, r"\[quality.latitude\]: give min, max or both"),
        ({"latitude": {"max": "high"}}, r"\[quality.latitude\].max: 'high' is not a number"),
        ({"latitude": {"top": 1}}, "unknown key 'top'"),
        ({"flag_failures": 0}, "flag_failures: 0 is not a whole number"),
        ({"max_past": "soon"}, r"\[quality\].max_past: 'soon' is not a duration"),
        ({"colour": 1}, r"\[quality\]: unknown key 'colour'"),
    ],
)
def test_table_errors_name_the_key(table, message):
    with pytest.raises(QualityError, match=message):
        rules_from_table(table, duration)


def test_a_bad_table_stops_the_start_with_one_line():
    with pytest.raises(ConfigError, match=r"^\[quality.latitude\]: min 90 is above max -90$"):
        build_config({}, {"quality": {"latitude": {"min": 90, "max": -90}}})
