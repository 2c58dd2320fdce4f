"""
OPC UA NodeIds as text with the namespace URI (``nsu=URI;s=…``), the form
``[[opcua.node]]`` takes and ``gatewayctl opcua browse`` prints: a server
numbers its namespaces at start, so only the URI names a node across restarts.
"""

from __future__ import annotations


def with_index(text: str, namespaces: list[str]) -> str:
    """``nsu=URI;rest`` as ``ns=INDEX;rest`` for this session's namespace array; other texts unchanged.
    LookupError when the URI is not in the array."""
    if not text.startswith("nsu="):
        return text
    uri, _, rest = text[4:].partition(";")
    if uri not in namespaces:
        raise LookupError(f"namespace {uri!r} is not in the server's namespace array")
    return f"ns={namespaces.index(uri)};{rest}"


def with_uri(text: str, index: int, namespaces: list[str]) -> str:
    """A NodeId's text (``ns=INDEX;rest``, as the stack writes it) with its namespace URI instead of its index."""
    if not index or index >= len(namespaces):
        return text
    return f"nsu={namespaces[index]};{text.split(';', 1)[1]}"
