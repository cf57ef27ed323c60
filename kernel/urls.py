"""URL rules shared by configuration and agency registration."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(value: str, *, what: str) -> str:
    """An absolute https URL (http only on loopback), without a fragment."""
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ValueError(f"{what} must be an absolute https URL")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(f"{what} must use https (http is allowed only for loopback addresses)")
    if "#" in value:
        raise ValueError(f"{what} must not contain a fragment")
    if any(ch.isspace() for ch in value):
        raise ValueError(f"{what} must not contain white space")
    return value


def check_redirect_uri(value: str) -> str:
    """RFC 6749 3.1.2 and RFC 9700 2.1: absolute, no fragment, https or loopback http.

    ``javascript:`` and ``data:`` and every other scheme fail the https check. Redirect URIs
    are later compared as exact strings, so what is registered is what must be sent.
    """
    return check_url(value, what=f"redirect URI {value!r}")
