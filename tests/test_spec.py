"""protocols/SPEC.rst says what the codec does: its worked session and test vector decode."""

from __future__ import annotations

import re
from pathlib import Path

import docutils.core

from gateway import tokens
from protocols import tgp
from tests import spec_example

SPEC = (Path(__file__).resolve().parent.parent / "protocols" / "SPEC.rst").read_text()
HEADING = re.compile(r"^(device|gateway) → (device|gateway), ([A-Z]+) \((\d+) bytes\)::$")


COMMANDS = "A worked command exchange\n"


def spec_frames(text: str = SPEC.split(COMMANDS)[0]) -> list[tuple[str, str, bytes]]:
    """The frames dumped in ``text``: by default the worked session (version 2)."""
    frames, current = [], None
    for line in text.splitlines():
        m = HEADING.match(line)
        if m:
            current = [m.group(1), m.group(3), int(m.group(4)), bytearray()]
            frames.append(current)
        elif current is not None and line.startswith("    "):
            current[3] += bytes.fromhex(line[4:52])
    for _, name, size, data in frames:
        assert len(data) == size, f"{name}: the heading says {size} bytes, the dump has {len(data)}"
    return [(sender, name, bytes(data)) for sender, name, _, data in frames]


def test_the_worked_session_is_what_the_codec_sends():
    assert spec_frames() == spec_example.session()


def test_the_worked_command_exchange_is_what_the_codec_sends():
    assert spec_frames(SPEC.split(COMMANDS)[1]) == spec_example.command_session()


def test_the_worked_command_exchange_decodes_on_both_ends():
    gateway, device = tgp.Connection(tgp.GATEWAY), tgp.Connection(tgp.DEVICE)
    for sender, event in [
        ("device", tgp.Hello("truck-17", (1, 2, 3))),
        ("gateway", tgp.Challenge(3, bytes(32))),
        ("device", tgp.Auth(bytes(32))),
        ("gateway", tgp.Welcome(3, 0, 65536, 32, 30, 120)),
    ]:
        sending, receiving = (device, gateway) if sender == "device" else (gateway, device)
        receiving.receive_data(sending.send(event))
        receiving.next_event()
    seen = []
    for sender, name, data in spec_frames(SPEC.split(COMMANDS)[1]):
        receiver, sending_end = (gateway, device) if sender == "device" else (device, gateway)
        receiver.receive_data(data)
        event = receiver.next_event()
        assert type(event).__name__.upper() == name
        assert sending_end.send(event) == data, f"{name} re-encodes differently"
        seen.append(event)
    command, received, result, ack = seen
    assert (command.id, command.name, command.params) == ("rate-7", "sample-rate", '{"hz":5}')
    assert command.expires_us == spec_example.EXPIRES_US and received.id == "rate-7"
    assert result == tgp.Result(1, "rate-7", tgp.CommandStatus.SUCCEEDED, '{"hz":5}') and ack == tgp.Ack(1, 1)


def test_the_worked_session_decodes_on_both_ends():
    gateway, device = tgp.Connection(tgp.GATEWAY), tgp.Connection(tgp.DEVICE)
    seen = []
    for sender, name, data in spec_frames():
        receiver = gateway if sender == "device" else device
        receiver.receive_data(data)
        event = receiver.next_event()
        assert type(event).__name__.upper() == name
        seen.append(event)
        # the sending end encodes what was decoded to the very same bytes
        sending_end = device if sender == "device" else gateway
        assert sending_end.send(event) == data, f"{name} re-encodes differently"
    hello, challenge, auth, welcome, declare, ack1, data2, data3, ack2, nack3, bye = seen
    assert hello.device == "truck-17" and challenge.nonce == spec_example.NONCE
    assert welcome.server_time_us == 1_795_341_600_000_000
    assert [m.name for m in declare.metrics] == ["oil_temp", "density"]
    assert data2.readings == (
        ("oil_temp", spec_example.T0, 81.5),
        ("oil_temp", spec_example.T0 + 1_000_000, 81.75),
        ("density", spec_example.T0, 0.8712),
    )
    assert data3.readings[0][2] == float("inf")
    assert ack2 == tgp.Ack(2, 3, 0) and nack3.code == tgp.ErrorCode.INVALID_READING
    assert bye.code == tgp.ErrorCode.NORMAL
    # the proof in the example authenticates against the stored key
    stored = tokens.stored_key(tokens.client_key(spec_example.TOKEN))
    assert tokens.proof_matches(auth.proof, stored, challenge.nonce, "truck-17")


def test_the_test_vector():
    key = tokens.client_key(spec_example.TOKEN)
    vector = dict(re.findall(r"^    (client_key|stored_key|proof) +([0-9a-f]{64})$", SPEC, re.M))
    assert vector == {
        "client_key": key.hex(),
        "stored_key": tokens.stored_key(key).hex(),
        "proof": tokens.auth_proof(spec_example.TOKEN, spec_example.NONCE, spec_example.DEVICE).hex(),
    }
    assert spec_example.TOKEN in SPEC


def test_every_message_type_and_error_code_is_in_the_spec():
    for kind in tgp.MessageType:
        assert re.search(rf"^0x{kind.value:02x}\s+{kind.name}\b", SPEC, re.M), kind
    for code in tgp.ErrorCode:
        assert re.search(rf"^{code.value}\s+{code.name}\b", SPEC, re.M), code


def test_spec_is_valid_restructuredtext():
    docutils.core.publish_string(SPEC, writer="null", settings_overrides={"halt_level": 2, "report_level": 2})


def test_the_worked_sessions_time_comments_say_the_time_of_their_bytes():
    import datetime

    found = re.findall(r"base time (\d+) s \((\S+)\)", SPEC)
    found += [(int(us) // 1_000_000, text) for us, text in re.findall(r"expires (\d+) µs \((\S+)\)", SPEC)]
    assert len(found) == 3
    for seconds, text in found:
        when = datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc)
        assert when.strftime("%Y-%m-%dT%H:%M:%SZ") == text


def test_every_fatal_code_says_which_message_carries_it():
    table = SPEC.split("Which message carries a fatal code::", 1)[1].split("\n\n", 2)[1]
    for code in tgp.ErrorCode:
        if code < 20 and code is not tgp.ErrorCode.NORMAL:
            assert re.search(rf"^    {code.value} {code.name} +(NACK|REJECT|BYE)\b", table, re.M), code
