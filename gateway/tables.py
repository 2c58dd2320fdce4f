"""
Tables of the config file ([[sink]], [[modbus]], [[mqtt_source]], [quality], [[alert]], [device_types]):
the one check of their keys and of the numbers in them, so that every mistake is named the same way.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any


def known_keys(table: Collection[str], known: Collection[str], note: str = "") -> None:
    """ValueError naming the first key of ``table`` not in ``known``, and the known ones (then ``note``)."""
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))}{note})")


def config_table(table: dict[str, Any], allowed: Collection[str], what: str = "") -> dict[str, Any]:
    """
    A config file's table with its keys spelled with ``-`` (TOML files use either ``-`` or ``_``);
    ValueError names the first key not in ``allowed``, and the allowed ones (then ``what``).
    """
    out = {key.replace("_", "-"): value for key, value in table.items()}
    known_keys(out, allowed, what)
    return out


def table_number(
    table: Any, key: str, where: str, error: type[Exception], default: float | None = None
) -> float | None:
    """A finite number from a config file's table (``default`` when absent), or ``error`` naming where.key."""
    value = table.get(key, default)
    if value is None:
        return None
    try:
        return float(checked_number(value))
    except ValueError as e:
        raise error(f"{where}.{key}: {e}") from None


def checked_number(value: Any, key: str = "", lo: float = -math.inf, hi: float = math.inf, whole: bool = False) -> Any:
    """
    A number as a config file's table gives it (TOML types its values): finite, whole when asked, within
    lo..hi; ValueError otherwise, '<key>: ' first when a key is given. The one check of numbers in tables.
    """
    prefix = f"{key}: " if key else ""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (whole and not isinstance(value, int))
        or not math.isfinite(value)
    ):
        raise ValueError(f"{prefix}{value!r} is not a {'whole ' if whole else ''}number")
    if not lo <= value <= hi:
        raise ValueError(f"{prefix}{value:g} is outside {lo:g}..{hi:g}")
    return value
