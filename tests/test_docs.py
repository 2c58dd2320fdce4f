"""README.rst and the documentation under docs/ say what the code does: the test command, options, errors, examples."""

import re
import subprocess
import sys
from pathlib import Path

import docutils.core
import pytest

from gateway.api import openapi
from gateway.config import SETTINGS
from gateway.transport import transports

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.rst").read_text()
DOCS = {
    path.relative_to(ROOT / "docs").as_posix(): path.read_text()
    for path in (ROOT / "docs").rglob("*.rst")
    if "_build" not in path.parts
}


def page(name: str) -> str:
    return DOCS[name]


def test_ci_runs_the_readme_test_command():
    """README's one test command is what .ci/run executes, and that command ends in pytest."""
    intro = README.split("runs the whole test suite::", 1)[1]
    command = next(line.strip() for line in intro.splitlines() if line.strip())
    assert command == "scripts/test"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert f"exec {command}" in ci_lines
    script = (ROOT / command).read_text()
    assert script.rstrip().splitlines()[-1] == 'exec .venv/bin/python -m pytest -n 2 --dist worksteal "$@"'
    for package in ("openssh-client", "wrk", "curl", "mosquitto", "haproxy", "rabbitmq-server"):
        assert package in script, package


def test_readme_is_the_front_door_valid_restructuredtext_and_short():
    docutils.core.publish_string(README, writer="null", settings_overrides={"halt_level": 2, "report_level": 2})
    assert len(README.splitlines()) < 300
    for link in re.findall(r"<(docs/[^>]+)>`_", README):
        assert (ROOT / link).is_file(), link
    linked = set(re.findall(r"<docs/([^>]+)>`_", README))
    assert linked == {name for name in DOCS if name != "index.rst"}, "every page is linked from the README"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The site as HTML, and the gatewayctl man page, built with warnings as errors."""
    out = tmp_path_factory.mktemp("docs")
    for builder in ("html", "man"):
        run = subprocess.run(
            [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder, "docs", str(out / builder)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr
    return out


def test_the_documentation_builds_and_lists_every_option_command_and_path(built):
    options = (built / "html" / "configuration.html").read_text()
    built_in = [s for p in transports() if type(p).__module__.startswith("gateway.") for s in p.settings]
    for setting in (*SETTINGS, *built_in):
        assert (f"--{setting.name}" if setting.option else f"[[{setting.key}]]") in options, setting.name
    man = (built / "man" / "gatewayctl.1").read_text()
    for command in ("device add", "token add", "upload status", "tls new-layout", "mqtt forget"):
        assert f"gatewayctl {command}" in man.replace("\\-", "-").replace("\\", ""), command
    api = (built / "html" / "api.html").read_text()
    for path in openapi.document()["paths"]:
        assert path in api, path


def test_every_error_code_is_documented():
    codes = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        codes |= set(re.findall(r'code = "([a-z_]+)"', path.read_text()))
        codes |= set(re.findall(r'IngestError\([^)]*?"([a-z_]+)"\)', path.read_text()))
        codes |= set(re.findall(r'_refuse\(\d+, "([a-z_]+)"', path.read_text()))
    codes.discard("bad_request")  # the base class's placeholder
    assert codes, "no error codes found"
    documented = "".join(DOCS.values())
    for code in codes:
        assert f"``{code}``" in documented, code


def test_the_modbus_example_is_a_valid_config():
    import textwrap
    import tomllib

    from gateway.config import build_config

    block = page("transports/modbus.rst").split("and a status bit::", 1)[1].split("\nTypes: ", 1)[0]
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

    block = page("dashboard.rst").split("Describe the provider in the config file::", 1)[1].split("\nRegister ", 1)[0]
    oidc = build_config({}, tomllib.loads(textwrap.dedent(block))).oidc
    assert oidc is not None and oidc.signs_in and oidc.name == "Plant SSO"
    assert (oidc.roles_claim, oidc.admin, oidc.reader) == (
        "realm_access.roles",
        ("gateway-admins",),
        ("gateway-readers", "maintenance"),
    )


def test_the_opcua_and_sparkplug_examples_are_valid_configs(monkeypatch):
    import textwrap
    import tomllib

    from gateway.config import build_config

    block = page("transports/opcua.rst").split("rules, quarantine, the twin, alerts, upload)::", 1)[1]
    block = block.split("\nA node is named", 1)[0]
    [press] = build_config({}, tomllib.loads(textwrap.dedent(block))).opcua
    assert (press.name, press.security) == ("press-4", "None")
    pressure = press.items[1]
    assert (pressure.metric, pressure.scale, pressure.deadband, pressure.sampling, pressure.queue_size) == (
        "pressure_kpa", 100.0, 0.5, 0.1, 10
    )  # fmt: skip
    assert press.items[2].writable and press.browse[0].match == "Motor*" and press.browse[0].depth == 2

    monkeypatch.setenv("BROKER_PASSWORD", "x")
    block = page("transports/sparkplug.rst").split('``format = "sparkplug"``::', 1)[1].split("\n``device-name``", 1)[0]
    doc = {key.replace("_", "-"): value for key, value in tomllib.loads(textwrap.dedent(block)).items()}
    doc["mqtt-source"][0].pop("ca")  # a file of the example's machine
    [plant] = build_config({}, doc).mqtt_source
    assert (plant.format, plant.host_id, plant.group, plant.topics) == ("sparkplug", "txgateway-1", "", ("spBv1.0/#",))
    assert (plant.device_name, plant.node_name, plant.rebirth_interval) == ("{node}-{device}", "{node}", 10.0)
