"""TLS settings checked by in-memory handshakes: no sockets, no reactor."""

from __future__ import annotations

import datetime
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from gateway.tls import TLSConfigError, make_self_signed, server_options


def handshake(server_ctx: SSL.Context, client_ctx: SSL.Context) -> tuple[str, str]:
    server, client = SSL.Connection(server_ctx, None), SSL.Connection(client_ctx, None)
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(20):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    return client.get_protocol_version_name(), client.get_cipher_name()


def client(max_version=None, ciphers=None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    ctx.set_cipher_list((ciphers or "DEFAULT").encode() + b":@SECLEVEL=0")
    return ctx


@pytest.fixture
def ecdsa(tmp_path):
    made = make_self_signed(tmp_path / "tls", hostname="gw.example")
    return server_options(made.cert_path, made.key_path).getContext()


@pytest.fixture
def rsa_ctx(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "rsa.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "rsa.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return server_options(tmp_path / "rsa.crt", tmp_path / "rsa.key").getContext()


def test_modern_clients_get_tls13(ecdsa):
    assert handshake(ecdsa, client())[0] == "TLSv1.3"


def test_tls12_clients_get_ecdhe_with_aead(ecdsa, rsa_ctx):
    for ctx in (ecdsa, rsa_ctx):
        version, cipher = handshake(ctx, client(max_version=SSL.TLS1_2_VERSION))
        assert version == "TLSv1.2"
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)


def test_tls11_is_refused(ecdsa):
    with pytest.raises(SSL.Error, match="unsupported protocol|protocol version"):
        handshake(ecdsa, client(max_version=SSL.TLS1_1_VERSION))


@pytest.mark.parametrize("ciphers", ["AES128-GCM-SHA256:AES256-SHA256", "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA384"])
def test_rsa_key_exchange_and_cbc_are_refused(rsa_ctx, ciphers):
    with pytest.raises(SSL.Error, match="no shared cipher|handshake failure"):
        handshake(rsa_ctx, client(max_version=SSL.TLS1_2_VERSION, ciphers=ciphers))


def test_every_offered_suite_is_tls13_or_ecdhe_aead(ecdsa):
    for name in SSL.Connection(ecdsa, None).get_cipher_list():
        assert name.startswith("TLS_") or (name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)), name


def test_self_signed_certificate_is_made_once(tmp_path):
    first = make_self_signed(tmp_path / "tls", hostname="gw.example")
    again = make_self_signed(tmp_path / "tls", hostname="gw.example")
    assert first.created and not again.created
    assert first.fingerprint == again.fingerprint and len(first.fingerprint) == 95
    cert = x509.load_pem_x509_certificate(first.cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "gw.example"} <= set(san.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert stat.S_IMODE(first.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700


def test_key_that_does_not_match_is_refused(tmp_path):
    a = make_self_signed(tmp_path / "a")
    b = make_self_signed(tmp_path / "b")
    with pytest.raises(TLSConfigError, match="does not match"):
        server_options(a.cert_path, b.key_path)


def test_garbage_files_are_named(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    good = make_self_signed(tmp_path / "tls")
    with pytest.raises(TLSConfigError, match="bad.pem.*no PEM certificate"):
        server_options(bad, good.key_path)
    with pytest.raises(TLSConfigError, match="bad.pem.*no unencrypted PEM private key"):
        server_options(good.cert_path, bad)
