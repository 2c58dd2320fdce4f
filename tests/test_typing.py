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


def _layer(module: str) -> str | None:
    """The unit of layering a module belongs to: a package of gateway/ (storage, ingest, ...) or a top module."""
    parts = module.split(".")
    if parts[0] != "gateway" or len(parts) < 2:
        return None
    return parts[1]


def imports(root: Path):
    """(file, line, importing layer, imported module) for every import of a gateway module in gateway/,
    at any depth of the code (a function's imports too)."""
    for path in sorted(root.rglob("*.py")):
        me = _layer(".".join(path.relative_to(root.parent).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "gateway"]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                them = _layer(name)
                if me is not None and them is not None and them != me:
                    yield f"{path.relative_to(root.parent)}:{node.lineno}", me, name


def package_imports(root: Path) -> dict[tuple[str, str], list[str]]:
    """(importing layer, imported layer) -> where, for every import in gateway/, at any depth of the code."""
    edges: dict[tuple[str, str], list[str]] = {}
    for where, me, name in imports(root):
        edges.setdefault((me, _layer(name) or ""), []).append(where)
    return edges


def cycles(edges: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """The layers that import each other, directly or round about (strongly connected, more than one)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {node: reach(node) for node in graph}
    groups = {frozenset(n for n in graph if n in reachable[node] and node in reachable[n]) for node in graph}
    return sorted(sorted(g) for g in groups if len(g) > 1)


def test_no_two_layers_of_the_gateway_import_each_other():
    """storage, ingest, transports, outbound, ops, api, ui, cli and the top modules form no cycle."""
    edges = package_imports(ROOT / "gateway")
    found = cycles(edges)
    where = {f"{a} -> {b}": sites[:3] for (a, b), sites in edges.items() if any({a, b} <= set(c) for c in found)}
    assert found == [], where


def test_the_cycle_check_sees_a_cycle_round_about(tmp_path):
    """The rule above is not vacuous: a cycle through three packages, and one through a function's import."""
    root = tmp_path / "gateway"
    for package, text in {
        "storage": "from gateway.ingest import core\n",
        "ingest": "from gateway.ops import metrics\n",
        "ops": "def f():\n    from gateway.storage import store\n",
        "api": "from gateway.storage import store\n",
    }.items():
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
        (root / package / "m.py").write_text(text)
    assert cycles(package_imports(root)) == [["ingest", "ops", "storage"]]


# The layer table of ARCHITECTURE.md, by package (or top module) of gateway/. "model" is the product's words
# and the shared plumbing below every layer: readings, tokens, trust, errors, settings, the network layer (net),
# and the one copy of each policy (backoff, deadband, families, ratelimit, files).
MODEL = {
    "readings", "tokens", "trust", "errors", "settings", "tables", "net", "files", "reactor",
    "backoff", "deadband", "families", "ratelimit", "__version__",
}  # fmt: skip
LAYERS: dict[str, set[str]] = {
    **{m: MODEL for m in MODEL},
    "storage": MODEL,
    "ingest": MODEL | {"storage.interface"},
    "transport": MODEL | {"ingest", "commands"},  # the transport interface
    "transports": MODEL | {"ingest", "commands", "transport", "web", "ops.metrics", "ops.logs", "ops.reports"},
    "outbound": MODEL | {"storage"},
    "commands": MODEL | {"storage"},  # the command ledger and its delivery
    "ops": MODEL | {"storage", "ingest"},
    "web": MODEL | {"storage", "ingest", "ops"},
    "api": MODEL | {"storage", "ingest", "ops", "web", "commands"},
    "ui": MODEL | {"storage", "ingest", "ops", "web", "api", "commands"},
    # The assembler: everything, the transports only through the plugin interface (twisted/plugins/).
    "service": {"*"},
    "config": {"*"},
    # gatewayctl reads the config file and prints what the gateway's own modules compute.
    "cli": MODEL | {"storage", "config", "ops.status", "ops.tuning", "commands"},
}


def allows(me: str, name: str) -> bool:
    """Whether layer ``me`` may import module ``name`` (``*``: anything but a transport)."""
    allowed = LAYERS.get(me, set())
    them = _layer(name)
    if "*" in allowed:
        return them != "transports"
    return them in allowed or ".".join(name.split(".")[1:3]) in allowed


def forbidden_imports(root: Path) -> list[str]:
    """Imports in gateway/ that the layer table does not allow, as 'file:line importer -> imported'."""
    return [f"{where} {me} -> {name}" for where, me, name in imports(root) if not allows(me, name)]


def test_every_import_is_one_the_layer_table_allows():
    assert forbidden_imports(ROOT / "gateway") == []


def test_the_layer_check_sees_a_forbidden_import(tmp_path):
    root = tmp_path / "gateway"
    for package, text in {
        "storage": "from gateway.readings import Reading\n",
        "transports": "def f():\n    from gateway.storage.store import PostgresStore\n",
        "outbound": "from gateway.transports import http\n",
    }.items():
        (root / package).mkdir(parents=True)
        (root / package / "m.py").write_text(text)
    (root / "service.py").write_text("from gateway.transports.tgp_adapter import DeviceFactory\nimport gateway.ops\n")
    assert forbidden_imports(root) == [
        "gateway/outbound/m.py:1 outbound -> gateway.transports",
        "gateway/service.py:1 service -> gateway.transports.tgp_adapter",
        "gateway/transports/m.py:2 transports -> gateway.storage.store",
    ]


def test_the_assembler_only_assembles():
    """service.py wires subsystems that build themselves (storage, outbound, surfaces, transports)."""
    service = (ROOT / "gateway" / "service.py").read_text()
    assert len(service.splitlines()) < 300
    assert (
        "gateway.transports" not in service and "gateway.transports" not in (ROOT / "gateway" / "config.py").read_text()
    )


def test_no_module_is_over_650_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for tree in ("gateway", "protocols")
        for path in (ROOT / tree).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 650
    }
    assert long == {}


def test_the_reactor_and_clocks_are_typed():
    """Components take a Reactor or a Clock (gateway/reactor.py), never an untyped reactor."""
    untyped = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in (ROOT / "gateway").rglob("*.py")
        if path.name != "reactor.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "reactor: Any" in line or "clock: Any" in line
    ]
    assert untyped == []
