"""
The Sparkplug B host application's rules, with no reactor and no broker:
payloads written byte by byte from the specification (``tests/sparkplug_wire.py``),
fed to ``SparkplugHost.message``; the codec (``protocols/sparkplug_b.py``) read against the same bytes.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.readings import metric_name
from gateway.transports.sparkplug import SparkplugHost
from protocols import sparkplug_b
from tests import sparkplug_wire as wire
from tests.sparkplug_wire import metric as m

NOW = 1_800_000_000.0
TS = 1_765_000_000_000  # ms
INT32, INT64, UINT64, DOUBLE, BOOLEAN, STRING = 3, 4, 8, 10, 11, 12


def nbirth(bd_seq=0, seq=0) -> bytes:
    metrics = [m("bdSeq", None, None, INT64, bd_seq), m("Node Control/Rebirth", None, None, BOOLEAN, False)]
    return wire.payload(TS, seq, [*metrics, m("Uptime", 1, None, UINT64, 7)])


def dbirth(seq: int) -> bytes:
    metrics = [
        m("Temperature", 100, None, DOUBLE, 21.5),
        m("Motor/RPM", 101, None, INT32, -12),
        m("Running", 102, None, BOOLEAN, True),
        m("Recipe", 103, None, STRING, "B-17"),
    ]
    return wire.payload(TS, seq, metrics)


def ddata(seq: int, temperature=22.0, ts=TS + 1000, **more) -> bytes:
    metrics = [m(None, 100, ts, DOUBLE, temperature, typed=False, **more), m(None, 101, None, INT32, 1500, typed=False)]
    return wire.payload(TS + 1000, seq, metrics)


def ndeath(bd_seq: int) -> bytes:
    return wire.payload(TS, None, [m("bdSeq", None, None, INT64, bd_seq)])


def topic(kind: str, device: str | None = None) -> str:
    return f"spBv1.0/plant/{kind}/line-1" + (f"/{device}" if device else "")


def born(host: SparkplugHost) -> None:
    out = host.message(topic("NBIRTH"), nbirth(), NOW)
    assert out.device == "line-1" and [tuple(r) for r in out.readings] == [("Uptime", TS * 1000, 7.0)]
    assert out.birth == ("plant", "line-1", None)
    out = host.message(topic("DBIRTH", "press"), dbirth(1), NOW)
    assert out.device == "line-1-press" and out.keep is None and out.rebirth is None
    assert {r.metric: r.value for r in out.readings} == {"Temperature": 21.5, "Motor.RPM": -12.0, "Running": 1.0}


def test_births_then_data_give_readings_named_as_born_at_their_own_time():
    host = SparkplugHost("scada")
    born(host)
    out = host.message(topic("DDATA", "press"), ddata(2, ts=TS + 5000), NOW)
    assert out.device == "line-1-press" and out.keep is None and out.rebirth is None
    assert [tuple(r) for r in out.readings] == [
        ("Temperature", (TS + 5000) * 1000, 22.0),
        ("Motor.RPM", (TS + 1000) * 1000, 1500.0),
    ]
    assert host.counts["metrics_not_stored"] == 1  # the text metric of the birth
    assert host.online() == {"line-1": True, "line-1-press": True}


def test_a_historical_metric_is_stored_at_its_own_time():
    host = SparkplugHost("scada")
    born(host)
    out = host.message(topic("DDATA", "press"), ddata(2, ts=TS - 3_600_000, is_historical=True), NOW)
    assert out.readings[0] == ("Temperature", (TS - 3_600_000) * 1000, 22.0)


def test_a_seq_gap_asks_for_a_rebirth_at_most_once_an_interval_and_keeps_what_it_can_read():
    host = SparkplugHost("scada", rebirth_interval=10)
    born(host)
    out = host.message(topic("DDATA", "press"), ddata(4), NOW)  # 2 and 3 were lost
    assert out.rebirth == ("plant", "line-1") and len(out.readings) == 2
    out = host.message(topic("DDATA", "press"), ddata(6), NOW + 1)
    assert out.rebirth is None, "asked again within the interval"
    out = host.message(topic("DDATA", "press"), ddata(8), NOW + 11)
    assert out.rebirth == ("plant", "line-1")
    assert host.counts["seq_gaps"] == 3 and host.counts["rebirth_requests"] == 2
    assert host.message(topic("DDATA", "press"), ddata(9), NOW + 12).rebirth is None


def test_seq_wraps_at_256():
    host = SparkplugHost("scada")
    host.message(topic("NBIRTH"), nbirth(seq=254), NOW)
    assert host.message(topic("DBIRTH", "press"), dbirth(255), NOW).rebirth is None
    assert host.message(topic("DDATA", "press"), ddata(0), NOW).rebirth is None


def test_data_before_any_birth_is_kept_aside_and_a_rebirth_asked_for():
    host = SparkplugHost("scada")
    out = host.message(topic("DDATA", "press"), ddata(5), NOW)
    assert out.keep is not None and out.keep[0] == "no_birth" and out.rebirth == ("plant", "line-1")
    host.message(topic("NBIRTH"), nbirth(), NOW)
    out = host.message(topic("DDATA", "other"), ddata(1), NOW)  # a device of the node not born
    assert out.keep is not None and "before its DBIRTH" in out.keep[1]


def test_an_alias_no_birth_named_is_not_guessed():
    host = SparkplugHost("scada")
    born(host)
    payload = wire.payload(TS, 2, [m(None, 999, None, DOUBLE, 1.0)])
    out = host.message(topic("DDATA", "press"), payload, NOW)
    assert out.keep is not None and out.keep[0] == "unknown_alias" and out.rebirth == ("plant", "line-1")


def test_ndeath_of_the_current_birth_marks_the_node_and_its_devices_offline_a_stale_will_does_not():
    host = SparkplugHost("scada")
    host.message(topic("NBIRTH"), nbirth(bd_seq=4), NOW)
    host.message(topic("DBIRTH", "press"), dbirth(1), NOW)
    # The Will of the session before (bdSeq 3) arrives after this session's NBIRTH: nothing changes.
    assert host.message(topic("NDEATH"), ndeath(3), NOW).kind == "stale_death"
    assert host.online() == {"line-1": True, "line-1-press": True}
    assert host.message(topic("NDEATH"), ndeath(4), NOW).kind == "NDEATH"
    assert host.online() == {"line-1": False, "line-1-press": False}
    # Born again: online; its devices come back with their DBIRTH.
    host.message(topic("NBIRTH"), nbirth(bd_seq=5), NOW)
    assert host.online() == {"line-1": True}


def test_ddeath_marks_one_device_offline():
    host = SparkplugHost("scada")
    born(host)
    host.message(topic("DDEATH", "press"), wire.payload(TS, 2, []), NOW)
    assert host.online() == {"line-1": True, "line-1-press": False}


def test_births_read_back_after_a_restart_read_the_data_sent_again():
    host = SparkplugHost("scada")
    host.restore("plant", "line-1", None, nbirth())
    host.restore("plant", "line-1", "press", dbirth(1))
    out = host.message(topic("DDATA", "press"), ddata(37), NOW)  # seq unknown after a restart: no gap
    assert out.keep is None and out.rebirth is None and out.readings[0].metric == "Temperature"


def test_a_write_becomes_a_dcmd_typed_as_born():
    host = SparkplugHost("scada")
    born(host)
    t, payload = host.command("line-1-press", "Motor.RPM", 1200, NOW)
    assert t == "spBv1.0/plant/DCMD/line-1/press"
    (cmd,) = wire.decode(payload)["metrics"]
    assert (cmd["name"], cmd["datatype"], cmd["value"]) == ("Motor/RPM", INT32, 1200)
    host.command("line-1-press", "Motor.RPM", -5, NOW)  # negative: two's complement in the uint32
    assert wire.decode(host.command("line-1-press", "Motor.RPM", -5, NOW)[1])["metrics"][0]["value"] == -5
    t, payload = SparkplugHost.rebirth_message("plant", "line-1", NOW)
    assert t == "spBv1.0/plant/NCMD/line-1"
    assert wire.decode_command(payload) == [("Node Control/Rebirth", True)]


def test_state_and_commands_are_taken_without_storing_and_other_topics_are_kept():
    host = SparkplugHost("scada")
    assert host.message("spBv1.0/STATE/scada", b'{"online":true}', NOW).keep is None
    assert host.message(topic("NCMD"), b"", NOW).keep is None
    assert host.message("devices/x/readings", b"{}", NOW).keep[0] == "not_sparkplug"
    assert host.message(topic("DDATA"), b"", NOW).keep[0] == "not_sparkplug"  # DDATA without a device


def test_metric_names_keep_their_sparkplug_names_as_far_as_a_metric_name_can():
    assert metric_name("Motor/RPM") == "Motor.RPM"
    assert metric_name("Node Control/Rebirth") == "Node_Control.Rebirth"
    assert metric_name("Température") == "Temp_rature"
    assert len(metric_name("x" * 100)) == 64


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["NBIRTH", "DBIRTH", "NDATA", "DDATA", "NDEATH", "DDEATH"]), data=st.binary(max_size=200))
def test_random_and_cut_payloads_are_kept_aside_never_raised(kind, data):
    host = SparkplugHost("scada")
    born(host)
    device = None if kind.startswith("N") else "press"
    for payload in (data, ddata(2)[: len(data) % 40], nbirth()[: len(data) % 30]):
        out = host.message(topic(kind, device), payload, NOW)
        assert out.keep is None or out.keep[0] in ("invalid_payload", "unknown_alias", "no_birth", "not_sparkplug")


VALUES = {
    1: st.integers(-128, 127), 2: st.integers(-(2**15), 2**15 - 1), 3: st.integers(-(2**31), 2**31 - 1),
    4: st.integers(-(2**63), 2**63 - 1), 5: st.integers(0, 255), 6: st.integers(0, 2**16 - 1),
    7: st.integers(0, 2**32 - 1), 8: st.integers(0, 2**64 - 1), 10: st.floats(allow_nan=False),
    11: st.booleans(), 12: st.text(max_size=20),
}  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(data=st.data(), datatype=st.sampled_from(sorted(VALUES)), ts=st.integers(0, 2**64 - 1), seq=st.integers(0, 255))
def test_the_codec_reads_what_the_specification_writes_and_writes_what_it_reads(data, datatype, ts, seq):
    value = data.draw(VALUES[datatype])
    raw = wire.payload(ts, seq, [m("x/y z", 7, ts, datatype, value)])
    message = sparkplug_b.decode(raw)
    (got,) = message.metrics
    assert (message.timestamp, message.seq, got.name, got.alias, got.timestamp) == (ts, seq, "x/y z", 7, ts)
    assert got.datatype == datatype and got.value == value
    assert wire.decode(sparkplug_b.encode(message)) == wire.decode(raw)


def test_a_float_keeps_its_32_bits():
    (got,) = sparkplug_b.decode(wire.payload(TS, 0, [m("f", 1, None, 9, 0.1)])).metrics
    assert got.value == wire.decode(wire.payload(TS, 0, [m("f", 1, None, 9, 0.1)]))["metrics"][0]["value"]
    assert math.isclose(got.value, 0.1, rel_tol=1e-7)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_and_cut_bytes_decode_or_raise_value_error(data):
    for raw in (data, dbirth(1)[: len(data) % 80]):
        try:
            sparkplug_b.decode(raw)
        except ValueError:
            pass
