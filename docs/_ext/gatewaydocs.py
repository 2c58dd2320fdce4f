"""
Sphinx directives that write reference pages from the code, so that they
cannot drift from it:

``.. gateway-options::``
    the option table, from ``gateway.config.SETTINGS`` and the settings of the
    built-in transport plugins;
``.. gatewayctl-commands::``
    every ``gatewayctl`` command with its usage and help, from its argparse parser;
``.. openapi-paths::``
    every path and method of the HTTPS port, from the OpenAPI document.
"""

from __future__ import annotations

import argparse
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


def _cell(text: str) -> str:
    return " ".join(str(text).split())


def _default(setting: Any) -> str:
    value = setting.default
    if value is None:
        return "—"
    if isinstance(value, tuple):
        return ", ".join(f"``{v}``" for v in value) if value else "—"
    return f"``{value}``"


class _Rst(SphinxDirective):
    def lines(self) -> list[str]:
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        container = nodes.container()
        self.state.nested_parse(StringList(self.lines(), source="gatewaydocs"), self.content_offset, container)
        return container.children


class GatewayOptions(_Rst):
    def lines(self) -> list[str]:
        from gateway.config import SETTINGS
        from gateway.transport import transports

        built_in = [(p.name, s) for p in transports() if type(p).__module__.startswith("gateway.") for s in p.settings]
        out = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 22 18 60",
            "",
            "   * - option",
            "     - default",
            "     - what",
        ]
        rows = [(None, s) for s in SETTINGS] + built_in
        for transport, s in rows:
            name = f"``--{s.name}``" if s.option else f"``[[{s.key}]]`` (config file)"
            notes = []
            if s.multiple:
                notes.append("repeatable")
            if s.live:
                notes.append("*live*")
            if transport:
                notes.append(f"transport ``{transport}``")
            what = _cell(s.help) + (f" ({', '.join(notes)})" if notes else "")
            out += [f"   * - {name}", f"     - {_default(s)}", f"     - {what}"]
        return out


def _commands(parser: argparse.ArgumentParser, prefix: str) -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                sub.description = sub.description or helps.get(name)
                found.append((f"{prefix} {name}", sub))
                found += _commands(sub, f"{prefix} {name}")
    return found


class GatewayctlCommands(_Rst):
    def lines(self) -> list[str]:
        from gateway.cli.main import build_parser

        parser = build_parser()
        out: list[str] = []
        for name, sub in _commands(parser, "gatewayctl"):
            if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                continue  # a noun: its verbs follow
            out += [f"``{name}``", ""]
            if sub.description:
                out += ["   " + _cell(sub.description), ""]
            usage = sub.format_usage().replace("usage: ", "").strip()
            out += ["   .. code-block:: text", "", *("      " + line for line in usage.splitlines()), ""]
            for action in sub._actions:
                if action.help in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
                    continue
                flags = ", ".join(action.option_strings) or action.dest.upper()
                out += [
                    f"   ``{flags}``",
                    f"      {_cell(action.help % vars(action) if '%' in action.help else action.help)}",
                    "",
                ]
        return out


class OpenapiPaths(_Rst):
    def lines(self) -> list[str]:
        from gateway.api.openapi import document

        doc = document()
        out = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 12 28 60",
            "",
            "   * - method",
            "     - path",
            "     - what",
        ]
        for path, methods in doc["paths"].items():
            for method, op in methods.items():
                if method not in ("get", "put", "post", "delete", "patch", "head", "options"):
                    continue  # path-level parameters
                what = _cell(op.get("summary") or op.get("description") or "")
                out += [f"   * - ``{method.upper()}``", f"     - ``{path}``", f"     - {what}"]
        return out


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("gateway-options", GatewayOptions)
    app.add_directive("gatewayctl-commands", GatewayctlCommands)
    app.add_directive("openapi-paths", OpenapiPaths)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
