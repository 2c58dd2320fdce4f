"""The type checker, the linter and the injection rule, run over the source tree as tests."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_is_clean_as_configured():
    """mypy with mypy-zope, as pyproject.toml configures it (strict on protocols/ and the ingest core)."""
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_finds_nothing_and_the_tree_is_formatted():
    """ruff as ruff.toml configures it: lint rules, and the formatting every file already has."""
    for args in (["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]):
        out = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stdout + out.stderr


def _imports_the_global_reactor(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "twisted.internet":
            found += [f"{path}:{node.lineno}" for alias in node.names if alias.name == "reactor"]
        elif isinstance(node, ast.Import):
            found += [f"{path}:{node.lineno}" for alias in node.names if alias.name == "twisted.internet.reactor"]
        elif isinstance(node, ast.ImportFrom) and node.module == "twisted.internet.threads":
            # deferToThread reaches for the global reactor itself
            found += [f"{path}:{node.lineno}" for alias in node.names if alias.name == "deferToThread"]
    return found


def test_nothing_below_the_assembler_takes_the_global_reactor():
    """Only gateway/service.py (makeService) and gatewayctl's entry points may use the global reactor."""
    allowed = {ROOT / "gateway" / "service.py", ROOT / "gateway" / "cli" / "simulate.py"}
    offenders = []
    for path in sorted([*(ROOT / "gateway").rglob("*.py"), *(ROOT / "protocols").rglob("*.py")]):
        if path not in allowed:
            offenders += _imports_the_global_reactor(path)
    assert offenders == []


def test_the_check_sees_an_import_of_the_global_reactor(tmp_path):
    """The rule above is not vacuous: each form of the import is found."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from twisted.internet import reactor\n"
        "import twisted.internet.reactor\n"
        "def f():\n    from twisted.internet.threads import deferToThread\n"
    )
    assert len(_imports_the_global_reactor(sample)) == 3
