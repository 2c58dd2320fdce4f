"""
The atheris targets (tests/fuzz/fuzz_gateway.py) run on hypothesis input in
the normal suite, so they keep working between long fuzzing runs.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.fuzz.fuzz_gateway import http_target, journal_target, json_target, tgp_target

HTTP_START = st.sampled_from(
    [
        b"",
        b"POST /v1/readings HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer TOKEN\r\nContent-Type: application/json\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), start=HTTP_START)
# An answer, then a malformed request closing the connection, then the idle timeout on the closing connection.
@example(data=b"+L\r\n\xab\xc2\x98\x83\xb3t\xa1\xbf\xcd\xd1 ", start=b"GET /healthz HTTP/1.1\r\n\r\n")
def test_http_target(data, start):
    http_target(start + data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_tgp_target(data):
    tgp_target(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_json_target(data):
    json_target(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_journal_target(data):
    journal_target(data)
