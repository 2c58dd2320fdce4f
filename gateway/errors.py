"""Errors every layer may raise and the assembler reports: the model's, so that no layer imports another for them."""

from __future__ import annotations


class StartError(Exception):
    """The gateway cannot start; the message says why in one line, naming the option when one is at fault."""
