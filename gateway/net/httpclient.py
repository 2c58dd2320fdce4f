"""The gateway as an HTTPS client (uploads, alert notices, the identity provider's keys): verified, quiet."""

from __future__ import annotations

from typing import Any

from twisted.internet import ssl
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer


@implementer(IPolicyForHTTPS)
class VerifyingPolicy:
    """Verify the certificate chain and the host name of every upload; TLS 1.2 or newer."""

    def __init__(self, root: Any = None) -> None:
        self._root = root

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self._root,
            extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
        )


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" / "Stopping factory" pair per connection (per batch, once idle)


class QuietPool(HTTPConnectionPool):
    """Twisted's connection pool, without two log lines per connection it makes."""

    _factory = _QuietHTTP11ClientFactory
