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

from gateway.net.stdtls import server_context
from gateway.net.tls import TLSConfigError, fingerprint_of, local_credentials, new_layout
from tests.certs import make_self_signed


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
    made = local_credentials(tmp_path / "tls", hostname="gw.example")
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


def strictly_verified(made, name: str = "localhost") -> None:
    """What strict verifiers (webpki, cryptography's) require of a server certificate and its CA."""
    from cryptography.x509 import DNSName
    from cryptography.x509.verification import PolicyBuilder, Store

    ca = x509.load_pem_x509_certificate(made.ca_path.read_bytes())
    leaf = x509.load_pem_x509_certificate(made.cert_path.read_bytes())
    PolicyBuilder().store(Store([ca])).build_server_verifier(DNSName(name)).verify(leaf, [])


def test_the_local_ca_signs_a_server_certificate_strict_verifiers_accept(tmp_path):
    first = local_credentials(tmp_path / "tls", hostname="gw.example")
    again = local_credentials(tmp_path / "tls", hostname="gw.example")
    assert first.created and not again.created and not first.legacy
    assert first.fingerprint == again.fingerprint and len(first.fingerprint) == 95
    strictly_verified(first)
    strictly_verified(first, "gw.example")
    ca = x509.load_pem_x509_certificate(first.ca_path.read_bytes())
    leaf = x509.load_pem_x509_certificate(first.cert_path.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days <= 398
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3649
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "gw.example"} <= set(san.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    for name in ("gateway.key", "ca.key"):
        assert stat.S_IMODE((tmp_path / "tls" / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700


def test_the_server_certificate_is_renewed_by_the_same_ca_30_days_before_it_expires(tmp_path):
    first = local_credentials(tmp_path / "tls")
    assert first.not_after is not None
    before = first.not_after - datetime.timedelta(days=31)
    assert local_credentials(tmp_path / "tls", now=before).fingerprint == first.fingerprint
    renewed = local_credentials(tmp_path / "tls", now=first.not_after - datetime.timedelta(days=29))
    assert renewed.created and renewed.fingerprint != first.fingerprint
    assert renewed.ca_fingerprint == first.ca_fingerprint  # devices pinned to the CA notice nothing
    assert renewed.not_after > first.not_after


def test_a_data_directory_of_the_old_layout_keeps_its_certificate_until_moved(tmp_path):
    from cryptography.x509.verification import VerificationError

    old = make_self_signed(tmp_path / "tls")
    kept = local_credentials(tmp_path / "tls")
    assert kept.legacy and not kept.created and kept.fingerprint == old.fingerprint
    with pytest.raises(VerificationError):  # why it has to move: a CA certificate serving as the server's
        from cryptography.x509 import DNSName
        from cryptography.x509.verification import PolicyBuilder, Store

        cert = x509.load_pem_x509_certificate(old.cert_path.read_bytes())
        PolicyBuilder().store(Store([cert])).build_server_verifier(DNSName("localhost")).verify(cert, [])
    moved = new_layout(tmp_path / "tls")
    assert not moved.legacy and moved.fingerprint != old.fingerprint
    strictly_verified(moved)
    legacy = x509.load_pem_x509_certificate((tmp_path / "tls" / "legacy-gateway.crt").read_bytes())
    assert fingerprint_of(legacy) == old.fingerprint  # kept aside, not lost


def test_key_that_does_not_match_is_refused(tmp_path):
    a = local_credentials(tmp_path / "a")
    b = local_credentials(tmp_path / "b")
    with pytest.raises(TLSConfigError, match="cannot be used together"):
        server_context(a.cert_path, b.key_path)


def test_garbage_files_are_named(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    good = local_credentials(tmp_path / "tls")
    with pytest.raises(TLSConfigError, match="bad.pem"):
        server_context(bad, good.key_path)
    with pytest.raises(TLSConfigError, match="bad.pem"):
        server_context(good.cert_path, bad)
    with pytest.raises(TLSConfigError, match="bad.pem.*no PEM certificate"):
        server_context(good.cert_path, good.key_path, client_ca=bad)
