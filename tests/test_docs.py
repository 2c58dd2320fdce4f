"""README.rst says what the code does: the test command, the options."""

import re
from pathlib import Path

import docutils.core

from gateway.config import all_settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.rst").read_text()


def test_ci_runs_the_readme_test_command():
    """README's one test command is what .ci/run executes, and that command ends in pytest."""
    intro = README.split("runs the whole test suite::", 1)[1]
    command = next(line.strip() for line in intro.splitlines() if line.strip())
    assert command == "scripts/test"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert f"exec {command}" in ci_lines
    script = (ROOT / command).read_text()
    assert script.rstrip().splitlines()[-1] == 'exec .venv/bin/python -m pytest -n 2 "$@"'
    for package in ("openssh-client", "wrk", "curl", "mosquitto", "haproxy"):
        assert package in script, package


def test_every_option_is_documented():
    for setting in all_settings():
        documented = f"``--{setting.name}``" if setting.option else f"[[{setting.key}]]"
        assert documented in README, setting.name


def test_readme_is_valid_restructuredtext():
    docutils.core.publish_string(README, writer="null", settings_overrides={"halt_level": 2, "report_level": 2})


def test_every_error_code_is_documented():
    codes = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        codes |= set(re.findall(r'code = "([a-z_]+)"', path.read_text()))
        codes |= set(re.findall(r'IngestError\([^)]*?"([a-z_]+)"\)', path.read_text()))
        codes |= set(re.findall(r'_refuse\(\d+, "([a-z_]+)"', path.read_text()))
    codes.discard("bad_request")  # the base class's placeholder
    assert codes, "no error codes found"
    for code in codes:
        assert f"``{code}``" in README, code


def test_the_modbus_example_is_a_valid_config():
    import textwrap
    import tomllib

    from gateway.config import build_config

    block = README.split("and a status bit::", 1)[1].split("\nTypes: ", 1)[0]
    config = build_config({}, tomllib.loads(textwrap.dedent(block)))
    [meter] = config.modbus
    power = meter.registers[0]
    assert (meter.device, meter.interval, power.type, power.word_order, power.scale) == (
        "meter-7",
        5.0,
        "float32",
        "little",
        0.001,
    )
    assert [r.word_order for r in meter.registers] == ["little", "little", "big", "little"]
    assert meter.registers[3].bit == 2 and power.heartbeat == 300.0


def test_the_single_sign_on_example_is_a_valid_config():
    import textwrap
    import tomllib

    from gateway.config import build_config

    block = README.split("Describe the provider in the config file::", 1)[1].split("\nRegister ", 1)[0]
    oidc = build_config({}, tomllib.loads(textwrap.dedent(block))).oidc
    assert oidc is not None and oidc.signs_in and oidc.name == "Plant SSO"
    assert (oidc.roles_claim, oidc.admin, oidc.reader) == (
        "realm_access.roles",
        ("gateway-admins",),
        ("gateway-readers", "maintenance"),
    )
