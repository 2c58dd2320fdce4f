"""``gatewayctl tls``: the data directory's certificate, shown, and moved to the layout with a local CA."""

from __future__ import annotations

import argparse
import json

from gateway.cli.common import CommandError, note, settings, when
from gateway.net.tls import CA_CERT_NAME, CERT_NAME, TLSConfigError, fingerprint_of, new_layout


def _describe(tls_dir) -> dict:
    from cryptography import x509

    doc: dict = {"directory": str(tls_dir)}
    for key, name in (("server", CERT_NAME), ("ca", CA_CERT_NAME)):
        path = tls_dir / name
        if path.exists():
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            doc[key] = {
                "path": str(path),
                "sha256": fingerprint_of(cert),
                "not_after": when(cert.not_valid_after_utc),
            }
    doc["layout"] = "local CA" if "ca" in doc else "self-signed (old)" if "server" in doc else "none yet"
    return doc


def cmd_tls_show(args: argparse.Namespace) -> None:
    data_dir, _ = settings(args)
    doc = _describe(data_dir / "tls")
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"layout: {doc['layout']}")
    for key, what in (("ca", "local CA (devices trust this)"), ("server", "server certificate")):
        if key in doc:
            print(f"{what}: {doc[key]['path']}, until {doc[key]['not_after']}, SHA-256 {doc[key]['sha256']}")


def cmd_tls_new_layout(args: argparse.Namespace) -> None:
    data_dir, _ = settings(args)
    tls_dir = data_dir / "tls"
    if (tls_dir / CA_CERT_NAME).exists():
        raise CommandError(f"{tls_dir} has a local CA already: nothing to move")
    try:
        made = new_layout(tls_dir)
    except (TLSConfigError, OSError) as e:
        raise CommandError(f"{tls_dir}: {e}") from None
    print(made.ca_path)
    note(
        f"made the local CA {made.ca_path} (SHA-256 {made.ca_fingerprint}) and a server certificate it signs; "
        f"the old certificate is kept as {tls_dir / ('legacy-' + CERT_NAME)}. Give devices {made.ca_path} to trust, "
        "then send the gateway SIGHUP (systemctl reload) or restart it: until then it serves the old certificate"
    )


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    tls = sub.add_parser("tls", parents=[common], help="the data directory's TLS certificate")
    verbs = tls.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("show", parents=[common], help="the certificates in use, their fingerprints and expiry")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_tls_show)
    p = verbs.add_parser(
        "new-layout",
        parents=[common],
        help="move a data directory made before the local CA to it (the old certificate is kept aside)",
    )
    p.set_defaults(func=cmd_tls_new_layout)
