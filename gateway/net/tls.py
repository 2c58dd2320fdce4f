"""
TLS for every listener: TLS 1.2 or newer, ECDHE key exchange with AEAD
ciphers only (Mozilla's "intermediate" list without the DHE entries), and a
local CA and a server certificate it signs, made (and renewed) in the data
directory when no certificate is given.

Twisted's default cipher list still admits RSA key exchange and CBC modes,
so the list is always set here.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.files import write_private

CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

CERT_NAME = "gateway.crt"
KEY_NAME = "gateway.key"
CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
LEGACY_PREFIX = "legacy-"  # the certificate of the old layout, kept when the data directory moves on

CA_DAYS = 3650  # the local CA: what devices pin, ten years
SERVER_DAYS = 397  # the server certificate: the most any verifier accepts
RENEW_BEFORE_DAYS = 30  # the server certificate is renewed when it has this little left


class TLSConfigError(Exception):
    """A certificate or key cannot be used."""


@dataclass(frozen=True)
class ServerCredentials:
    cert_path: Path
    key_path: Path
    fingerprint: str  # SHA-256 of the leaf certificate, colon-separated hex
    created: bool  # made on this start (or by this call)
    ca_path: Path | None = None  # the local CA devices trust; None for a data directory of the old layout
    ca_fingerprint: str | None = None
    not_after: datetime.datetime | None = None

    @property
    def legacy(self) -> bool:
        """One self-signed certificate that is its own CA, as data directories were made before."""
        return self.ca_path is None


def fingerprint_of(cert: x509.Certificate) -> str:
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _write_pair(key_path: Path, cert_path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    write_private(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def _make_ca(
    tls_dir: Path, hostname: str, now: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"txgateway local CA ({hostname})"[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "txgateway"),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(tls_dir / CA_KEY_NAME, tls_dir / CA_CERT_NAME, key, cert)
    return key, cert


def _issue_server(
    tls_dir: Path, ca_key: Any, ca_cert: x509.Certificate, hostname: str, now: datetime.datetime
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    if hostname and hostname != "localhost":
        names.append(x509.DNSName(hostname))
    names += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    public = key.public_key()
    not_after = min(now + datetime.timedelta(days=SERVER_DAYS), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname or "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
        .sign(ca_key, hashes.SHA256())
    )
    _write_pair(tls_dir / KEY_NAME, tls_dir / CERT_NAME, key, cert)
    return cert


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def local_credentials(
    tls_dir: Path, hostname: str | None = None, now: datetime.datetime | None = None
) -> ServerCredentials:
    """
    The data directory's certificate, made or renewed as needed.

    New layout: a local CA (``ca.crt``, ten years; devices pin it) and a server certificate it signs
    (``gateway.crt``: CA:FALSE, serverAuth, at most 397 days), made anew with a new key once it has
    less than 30 days left or is not the CA's. A data directory of the old layout (one self-signed
    certificate, no ``ca.crt``) keeps serving that certificate, so devices pinned to it keep working,
    until ``gatewayctl tls new-layout`` moves it on.
    """
    cert_path, key_path = tls_dir / CERT_NAME, tls_dir / KEY_NAME
    ca_path, ca_key_path = tls_dir / CA_CERT_NAME, tls_dir / CA_KEY_NAME
    if cert_path.exists() and key_path.exists() and not ca_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        return ServerCredentials(cert_path, key_path, fingerprint_of(cert), False, None, None, cert.not_valid_after_utc)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    hostname = hostname or socket.gethostname()
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    created = False
    try:
        if ca_path.exists():
            if not ca_key_path.exists():
                raise TLSConfigError(
                    f"{str(ca_path)!r} is there without {CA_KEY_NAME}: put the CA's key back, or move both aside to "
                    "make a new CA (devices must then trust the new ca.crt)"
                )
            ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
            ca_key: Any = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        else:
            ca_key, ca_cert = _make_ca(tls_dir, hostname, now)
            created = True
        server = (
            x509.load_pem_x509_certificate(cert_path.read_bytes()) if cert_path.exists() and key_path.exists() else None
        )
    except (OSError, ValueError) as e:
        raise TLSConfigError(f"{str(tls_dir)!r}: the local CA or certificate cannot be read ({e})") from None
    due = now + datetime.timedelta(days=RENEW_BEFORE_DAYS)
    if server is None or server.not_valid_after_utc <= due or not _signed_by(server, ca_cert):
        server = _issue_server(tls_dir, ca_key, ca_cert, hostname, now)
        created = True
    return ServerCredentials(
        cert_path,
        key_path,
        fingerprint_of(server),
        created,
        ca_path,
        fingerprint_of(ca_cert),
        server.not_valid_after_utc,
    )


def new_layout(tls_dir: Path, hostname: str | None = None, now: datetime.datetime | None = None) -> ServerCredentials:
    """
    Move a data directory of the old layout to the new one: the old certificate and key are kept as
    ``legacy-gateway.crt`` and ``legacy-gateway.key``, then a local CA and a server certificate are made.
    A directory already of the new layout is left as it is.
    """
    cert_path, key_path = tls_dir / CERT_NAME, tls_dir / KEY_NAME
    if cert_path.exists() and not (tls_dir / CA_CERT_NAME).exists():
        for path in (cert_path, key_path):
            if path.exists():
                os.replace(path, path.with_name(LEGACY_PREFIX + path.name))
    return local_credentials(tls_dir, hostname, now)
