"""TLS settings checked by in-memory handshakes: no sockets, no reactor."""

from __future__ import annotations

import datetime
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from gateway.transports.stdtls import server_context
from gateway.transports.tls import TLSConfigError, make_self_signed


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[str, str]:
    """Both ends over memory BIOs: (version, cipher) the client got, or ssl.SSLError."""
    pipes = [(ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(2)]
    server = server_ctx.wrap_bio(pipes[0][0], pipes[1][0], server_side=True)
    client = client_ctx.wrap_bio(pipes[1][1], pipes[0][1], server_side=False, server_hostname="gw.example")
    done = {id(server): False, id(client): False}
    for _ in range(20):
        for end in (client, server):
            if not done[id(end)]:
                try:
                    end.do_handshake()
                    done[id(end)] = True
                except ssl.SSLWantReadError:
                    pass
        # the client writes into pipes[0][1] → server reads pipes[0][0]; and back through pipes[1]
        for src, dst in ((pipes[0][1], pipes[0][0]), (pipes[1][0], pipes[1][1])):
            if src.pending:
                dst.write(src.read())
        if all(done.values()):
            break
    return client.version(), client.cipher()[0]


def client(max_version=None, ciphers=None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    if max_version is not None:
        ctx.maximum_version = max_version
    ctx.set_ciphers((ciphers or "DEFAULT") + ":@SECLEVEL=0")
    return ctx


@pytest.fixture
def ecdsa(tmp_path):
    made = make_self_signed(tmp_path / "tls", hostname="gw.example")
    return server_context(made.cert_path, made.key_path)


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
    return server_context(tmp_path / "rsa.crt", tmp_path / "rsa.key")


def test_modern_clients_get_tls13(ecdsa):
    assert handshake(ecdsa, client())[0] == "TLSv1.3"


def test_tls12_clients_get_ecdhe_with_aead(ecdsa, rsa_ctx):
    for ctx in (ecdsa, rsa_ctx):
        version, cipher = handshake(ctx, client(max_version=ssl.TLSVersion.TLSv1_2))
        assert version == "TLSv1.2"
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls11_is_refused(ecdsa):
    with pytest.raises(ssl.SSLError, match="UNSUPPORTED_PROTOCOL|PROTOCOL_VERSION|NO_PROTOCOLS"):
        handshake(ecdsa, client(max_version=ssl.TLSVersion.TLSv1_1))


@pytest.mark.parametrize("ciphers", ["AES128-GCM-SHA256:AES256-SHA256", "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA384"])
def test_rsa_key_exchange_and_cbc_are_refused(rsa_ctx, ciphers):
    with pytest.raises(ssl.SSLError, match="NO_SHARED_CIPHER|HANDSHAKE_FAILURE"):
        handshake(rsa_ctx, client(max_version=ssl.TLSVersion.TLSv1_2, ciphers=ciphers))


def test_every_offered_suite_is_tls13_or_ecdhe_aead(ecdsa):
    for name in (c["name"] for c in ecdsa.get_ciphers()):
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
    with pytest.raises(TLSConfigError, match="cannot be used together"):
        server_context(a.cert_path, b.key_path)


def test_garbage_files_are_named(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    good = make_self_signed(tmp_path / "tls")
    with pytest.raises(TLSConfigError, match="bad.pem"):
        server_context(bad, good.key_path)
    with pytest.raises(TLSConfigError, match="bad.pem"):
        server_context(good.cert_path, bad)
    with pytest.raises(TLSConfigError, match="bad.pem.*no PEM certificate"):
        server_context(good.cert_path, good.key_path, client_ca=bad)
