"""
A map under a tracker's track on the dashboard (``--ui-tiles``).

By default the dashboard fetches nothing from anywhere but the gateway: a
track is drawn on plain longitude/latitude axes. An administrator who runs
(or may use) a tile server gives its URL template; the device page then
draws the track on those raster tiles, and the page's Content-Security-Policy
lets the browser fetch from that one origin (images and fetches) and run the
map's web worker (``worker-src blob:``). Nothing else is widened.
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import urlsplit

from gateway.settings import Setting

PLACEHOLDERS = ("{z}", "{x}", "{y}")
# Characters that would end a source in the policy or an attribute in the page.
_NOT_IN_URL = frozenset(" \t\r\n;,'\"<>\\")


def tile_url(value: Any) -> str:
    """An https:// URL template with {z}, {x} and {y}."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a URL")
    example = "such as https://tiles.example.com/{z}/{x}/{y}.png"
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(
            f"{value!r}: give an https:// tile URL {example} (the dashboard is served over HTTPS; "
            "browsers refuse plain http:// tiles on it)"
        )
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"{value!r} has a bad port") from None
    if parts.username or parts.password:
        raise ValueError(f"{value!r}: a tile URL with credentials would show them to every browser")
    bad = sorted(set(value) & _NOT_IN_URL)
    if bad:
        raise ValueError(f"{value!r}: {''.join(bad)!r} cannot be in a tile URL (percent-encode it)")
    missing = [p for p in PLACEHOLDERS if p not in value]
    if missing:
        raise ValueError(f"{value!r} lacks {', '.join(missing)}: give a URL template {example}")
    return value


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def page_policy(policy: bytes, url: str | None) -> bytes:
    """The dashboard page's policy with the tile server's origin allowed, when there is one."""
    if url is None:
        return policy
    source = origin(url).encode()
    directives = []
    for directive in policy.split(b"; "):
        name = directive.split(b" ", 1)[0]
        if name in (b"img-src", b"connect-src"):
            directive += b" " + source
        directives.append(directive)
    directives.append(b"worker-src blob:")
    return b"; ".join(directives)


def page_meta(url: str | None, attribution: str | None) -> bytes:
    """What the page reads to draw its map: a <meta> element, or nothing."""
    if url is None:
        return b""
    return (
        f'<meta name="gateway-tiles" content="{html.escape(url)}" data-attribution="{html.escape(attribution or "")}">'
    ).encode()


TILE_SETTINGS = (
    Setting(
        "ui-tiles",
        None,
        tile_url,
        "Draw a tracker's track on the dashboard over raster map tiles from this https:// URL template "
        "({z}/{x}/{y}), whose origin the page's Content-Security-Policy then allows. Without it the dashboard "
        "fetches nothing from elsewhere and draws tracks on plain axes.",
    ),
    Setting(
        "ui-tiles-attribution",
        None,
        lambda value: str(value)[:300],
        "The credit the tile server's terms ask for, shown on the map (for OpenStreetMap's tiles: "
        "'© OpenStreetMap contributors').",
    ),
)
