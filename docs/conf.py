"""Sphinx configuration of the txgateway documentation (sphinx-build -W docs OUT)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "txgateway"
author = "txgateway"
extensions = ["sphinx.ext.autosectionlabel", "gatewaydocs"]
autosectionlabel_prefix_document = False
suppress_warnings = ["autosectionlabel.*"]  # the same heading on two pages is fine; refs name unique ones
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = "txgateway"
man_pages = [
    ("gatewayctl", "gatewayctl", "administer a txgateway: devices, tokens, sinks, storage", [], 1),
]
