"""The line protocol's codec with no reactor: whole lines, split lines, and random or cut bytes."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linegw.codec import Auth, Bad, LineCodec, Value


def test_lines_become_events_however_the_bytes_are_split():
    data = b"AUTH abc.def\nflow 12.5 1795000000000\r\npressure -3 1795000000001\n"
    expected = [Auth("abc.def"), Value("flow", 12.5, 1795000000000), Value("pressure", -3.0, 1795000000001)]
    for cut in range(len(data) + 1):
        codec = LineCodec()
        assert codec.receive(data[:cut]) + codec.receive(data[cut:]) == expected


def test_a_bad_or_over_long_line_ends_the_stream():
    codec = LineCodec(max_line=16)
    assert codec.receive(b"flow x 1\nflow 1 2\n") == [Bad("'x' '1': the value is a number and ts_ms a whole number")]
    assert codec.receive(b"flow 1 2\n") == []  # nothing after a Bad
    codec = LineCodec(max_line=16)
    assert codec.receive(b"a" * 17) == [Bad("a line is longer than 16 bytes")]
    assert LineCodec().receive(b"flow nan 1\n") == [Bad("'nan': the value must be finite")]


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # a busy machine must not fail it
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=600))
def test_random_and_cut_bytes_give_events_or_one_bad_never_an_exception(data, cut):
    codec = LineCodec(max_line=64)
    events = codec.receive(data[:cut]) + codec.receive(data[cut:])
    assert all(isinstance(e, (Auth, Value, Bad)) for e in events)
    assert [e for e in events if isinstance(e, Bad)] in ([], events[-1:])  # a Bad is the last event
    assert codec.broken or len(codec._buffer) <= 64  # what waits for its newline is bounded
