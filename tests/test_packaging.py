"""The distribution as pip builds it: twistd finds the gateway plugin, and it runs with its own dependencies alone."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import script
from tests.gatewayproc import GatewayProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_plain_install_registers_the_twistd_plugin(tmp_path):
    """``pip install .`` (not editable) puts twisted/plugins/gateway_plugin.py where twistd looks."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (target / "twisted" / "plugins" / "gateway_plugin.py").exists()
    assert not (target / "twisted" / "plugins" / "__init__.py").exists()
    assert (target / "gateway" / "service.py").exists()
    # Run twistd from outside the checkout with site processing off (-S), so
    # the test environment's editable install (a .pth file pointing at the
    # checkout) is not seen: only the installed copy can provide the plugin.
    import twisted

    site_packages = str(Path(twisted.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), site_packages])}
    out = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            "import sys; sys.argv = ['twistd', '--help']; from twisted.scripts.twistd import run; run()",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "gateway" in out.stdout and "Device-to-cloud gateway" in out.stdout, out.stdout + out.stderr


def test_twistd_gateway_help_lists_every_option():
    out = subprocess.run([script("twistd"), "gateway", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for option in ("--config", "--data-dir", "--db", "--https", "--tls-cert", "--tls-key", "--max-body"):
        assert option in out.stdout


def test_gatewayctl_reads_data_dir_and_db_from_the_config_file(tmp_path, db_dsn):
    config = tmp_path / "gw.toml"
    config.write_text(f"db = {db_dsn!r}\n".replace("'", '"'))
    out = subprocess.run(
        [script("gatewayctl"), "device", "add", "from-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    listed = subprocess.run(
        [script("gatewayctl"), "--db", db_dsn, "device", "list"], capture_output=True, text=True, timeout=60
    )
    assert "from-config" in listed.stdout


TRACKED_BUNDLES = (".whl", ".tar.gz", ".tgz", ".zip", ".egg", ".min.js", ".jar")


def test_no_wheel_archive_or_third_party_bundle_is_tracked():
    """Dependencies come from their packages, never as files committed here."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    bundles = [name for name in tracked.splitlines() if name.lower().endswith(TRACKED_BUNDLES)]
    assert bundles == []


def _venv_with_the_project(tmp_path: Path) -> Path:
    """A new venv holding ``pip install .`` with its dependencies and nothing from the test extra."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], capture_output=True, text=True, timeout=900
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return venv


def _post_json(gw: GatewayProcess, path: str, doc: dict | None) -> tuple[int, dict]:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", gw.port, context=ssl.create_default_context(cafile=gw.cert), timeout=30
    )
    try:
        if doc is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, body=json.dumps(doc), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_pip_install_dot_runs_the_gateway_and_single_sign_on_works(tmp_path, db_dsn):
    """The README's ``pip install .`` in a clean venv: twistd starts, and a provider's token signs in."""
    from tests.idp import Provider

    venv = await deferToThread(_venv_with_the_project, tmp_path)
    extra = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import pytest"], capture_output=True, text=True, timeout=60
    )
    assert extra.returncode != 0, "the clean venv holds the test extra"
    provider = Provider()
    settings = provider.settings()
    roles = settings.pop("roles")
    lines = [f"db = {json.dumps(db_dsn)}", "", "[oidc]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    lines += ["", "[oidc.roles]"] + [f"{role} = {json.dumps(groups)}" for role, groups in roles.items()]
    config = tmp_path / "gateway.toml"
    config.write_text("\n".join(lines) + "\n")
    gw = GatewayProcess(tmp_path / "data", "--config", str(config), cwd=tmp_path, twistd=str(venv / "bin" / "twistd"))
    try:
        await deferToThread(gw.start)
        code, body = await deferToThread(_post_json, gw, "/ui/session", {"token": provider.token()})
        assert (code, body.get("subject"), body.get("role")) == (200, "maria", "admin"), body
        code, health = await deferToThread(_post_json, gw, "/healthz", None)
        assert health["oidc"]["last_error"] is None and health["oidc"]["keys"] == 1, health["oidc"]
    finally:
        await deferToThread(gw.close)
        await provider.close()


def test_every_package_of_the_source_tree_is_in_the_distribution():
    """setup.cfg lists packages by name: a new one left out installs a gateway that cannot import itself."""
    import configparser

    root = Path(__file__).resolve().parent.parent
    config = configparser.ConfigParser()
    config.read(root / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {
        ".".join(path.parent.relative_to(root).parts)
        for top in ("gateway", "protocols")
        for path in (root / top).rglob("__init__.py")
    }
    assert found <= listed, sorted(found - listed)
