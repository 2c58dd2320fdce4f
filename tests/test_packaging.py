"""The distribution as pip builds it: twistd must find the gateway plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import script

import pytest

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
