"""URL rules shared by configuration and agency registration."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

#: C0 controls and DEL (RFC 3986 section 2 allows neither, escaped or not)
_CONTROL = re.compile("[\x00-\x1f\x7f]")
#: RFC 3986 3.2.3: a port is digits (ASCII only: ``int()`` would take "+80" and "٨٠")
_PORT = re.compile(r"[0-9]+")


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
    """An absolute https URL (http only on loopback) that names a host, with a usable port
    if any, in ASCII without control characters or white space, with neither user
    information nor a fragment.

    RFC 3986 section 2 allows only ASCII characters in a URI (others are percent-encoded,
    a host in its IDNA A-label form): a URI with others, once copied into a header (the
    logout page's Content-Security-Policy, a Location), cannot be sent (HTTP header values
    are Latin-1 at most, PEP 3333). RFC 3986 3.2.3 and RFC 9110 4.2.2: a port is a number
    a connection can use; Werkzeug refuses any other when it builds a redirect.
    """
    if any(ch.isspace() for ch in value):
        raise ValueError(f"{what} must not contain white space")
    if _CONTROL.search(value):
        raise ValueError(f"{what} must not contain control characters")
    if not value.isascii():
        raise ValueError(
            f"{what} must be ASCII (RFC 3986 section 2): percent-encode other characters "
            "(UTF-8), and write an internationalised host name in its IDNA A-label form "
            "(xn--...)")
    try:
        parts = urlsplit(value)
    except ValueError as exc:  # a bracketed host that is no IPv6 address, say
        raise ValueError(f"{what} is not a URL: {exc}") from exc
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ValueError(f"{what} must be an absolute https URL")
    if "@" in parts.netloc:
        # RFC 6749 3.1.2 / RFC 9700 (and RFC 9110 4.2.4): credentials never go in a URI
        raise ValueError(f"{what} must not contain user information (credentials before '@')")
    if not parts.hostname:
        raise ValueError(f"{what} must name a host")
    _, colon, port = parts.netloc.rpartition("]")[2].partition(":")
    if colon and port and (not _PORT.fullmatch(port) or not 0 < int(port) <= 65535):
        raise ValueError(f"{what} port must be a number from 1 to 65535")
    try:
        parts.port  # noqa: B018 (what Werkzeug reads: it must read it too)
    except ValueError as exc:
        raise ValueError(f"{what} port must be a number from 1 to 65535") from exc
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(f"{what} must use https (http is allowed only for loopback addresses)")
    if "#" in value:
        raise ValueError(f"{what} must not contain a fragment")
    return value


def check_redirect_uri(value: str) -> str:
    """RFC 6749 3.1.2 and RFC 9700 2.1: absolute, no fragment, https or loopback http.

    ``javascript:`` and ``data:`` and every other scheme fail the https check. Redirect URIs
    are later compared as exact strings, so what is registered is what must be sent.
    """
    return check_url(value, what=f"redirect URI {value!r}")
