"""Which peers' ``X-Forwarded-*`` headers the hub believes.

``trusted_proxy_hops`` says how many proxies stand in front of the hub (Werkzeug's
``ProxyFix`` takes that many entries from the right of each header), but not which: every
peer that reaches the hub's port is believed. ``trusted_proxy_addresses`` narrows it to the
addresses the nearest proxy connects from; any other peer (a metrics scraper, a neighbouring
container, a local process) is served as what it is, its forwarded headers ignored, so it
cannot name the client address that limits per address count.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

from werkzeug.middleware.proxy_fix import ProxyFix

from .envelope import StartResponse, WSGIApp

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def believe_forwarded(app: WSGIApp, hops: int, networks: Sequence[Network]) -> WSGIApp:
    """``app`` behind ``hops`` proxies: ``ProxyFix`` alone for any peer (no ``networks``),
    else only for the peers in ``networks``."""
    proxied = ProxyFix(app, x_for=hops, x_proto=hops, x_host=hops)
    return TrustedProxies(app, proxied, networks) if networks else proxied


class TrustedProxies:
    """WSGI middleware: ``proxied`` (the app behind ``ProxyFix``) for requests whose peer is
    in ``networks``, the plain ``app`` for the others."""

    def __init__(self, app: WSGIApp, proxied: WSGIApp, networks: Sequence[Network]) -> None:
        self.app = app
        self.proxied = proxied
        self.networks = tuple(networks)

    def believed(self, peer: str | None) -> bool:
        try:
            address = ipaddress.ip_address((peer or "").split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        if self.believed(environ.get("REMOTE_ADDR")):
            return self.proxied(environ, start_response)
        return self.app(environ, start_response)
