"""
Secrets and trust in the settings: values read from the environment or a
file (which no log line or status shows), CA files, and which hosts are
loopback (where connections without TLS are allowed).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.internet import ssl


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def secret_value(key: str, value: Any, environ: Mapping[str, str]) -> str:
    """A secret from the config file: a string, ``{ env = "VAR" }`` or ``{ file = "/path" }``; one line."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict) and set(value) == {"env"}:
        if value["env"] not in environ:
            raise ValueError(f"{key}: environment variable {value['env']} is not set")
        text = environ[value["env"]]
    elif isinstance(value, dict) and set(value) == {"file"}:
        path = Path(str(value["file"])).expanduser()
        try:
            text = path.read_text().strip()
        except OSError as e:
            raise ValueError(f"{key}: {str(path)!r} cannot be read: {e.strerror}") from None
    else:
        raise ValueError(f'{key}: give a string, {{ env = "VAR" }} or {{ file = "/path" }}')
    if not text or "\r" in text or "\n" in text:
        raise ValueError(f"{key}: the value is empty or spans lines")
    return text


def ca_certificates(path: Path) -> list[bytes]:
    """The PEM certificates of a CA file; ValueError when it holds none."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{str(path)!r} cannot be read: {e.strerror}") from None
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.S)
    if not blocks:
        raise ValueError(f"{str(path)!r} holds no PEM certificate")
    return blocks


def ca_file(value: Any) -> Path:
    path = Path(str(value)).expanduser()
    ca_certificates(path)
    return path


def trust_root(ca: Path | None) -> Any:
    """The CA certificates of a PEM file as a trust root; the platform's when None."""
    if ca is None:
        return None  # optionsForClientTLS then uses the platform's trust store
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(block) for block in ca_certificates(ca)])
