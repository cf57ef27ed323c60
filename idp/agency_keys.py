"""An agency's public keys for ``private_key_jwt``: which JWK sets are accepted (RFC 7517
section 5) and how they are fetched from a ``jwks_uri`` (RFC 7591 section 2).

The fetch is an outbound call to an address an agency chose, so it is fenced: https only, to
public addresses only (every resolved address is checked with :mod:`ipaddress` and the
connection is pinned to the checked one, so a second DNS answer cannot redirect it), no
redirects, no proxy from the environment, 3 s and 64 KiB at most, cached 5 minutes per agency.
``allow_insecure`` lifts the https and address rules for development and tests.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey
from requests.adapters import HTTPAdapter

from kernel.bounded import BodyTooLarge, BodyTooSlow, read_bounded
from kernel.urls import check_url

from .errors import IdpError

if TYPE_CHECKING:
    from .agencies import AgencyClient

#: what an agency may sign its ``private_key_jwt`` assertions with: never ``none`` or HS*
ASSERTION_ALGS = ("RS256", "PS256", "ES256")
MAX_JWKS_BYTES = 64 * 1024
MAX_JWKS_KEYS = 32
#: JWK members that only a private or symmetric key has (RFC 7518 6.2.2, 6.3.2, 6.4.1)
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class JWKSUnavailable(IdpError):
    """An agency's keys could not be had: no keys, or its jwks_uri failed."""


# -- what is accepted ---------------------------------------------------------------------

def agency_keyset(data: object) -> KeySet:
    """An agency's public signing keys (RFC 7517 section 5), for ``private_key_jwt``.

    Every key needs a distinct ``kid`` (assertions name their key, OpenID Connect Core 10.1)
    and none may carry private members. RSA keys of 2048 bits or more and EC P-256 keys are
    kept; keys for encryption or for algorithms the hub does not accept are skipped.
    Raises ``ValueError`` saying what is wrong.
    """
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('must be a JWK set: a JSON object with a "keys" array')
    entries: list[Any] = data["keys"]
    if not entries:
        raise ValueError("has no keys")
    if len(entries) > MAX_JWKS_KEYS:
        raise ValueError(f"has more than {MAX_JWKS_KEYS} keys")
    usable: list[RSAKey | ECKey] = []
    kids: set[str] = set()
    for i, jwk in enumerate(entries):
        if not isinstance(jwk, dict):
            raise ValueError(f"key {i} is not a JSON object")
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid.strip():
            raise ValueError(f"key {i} has no kid")
        if kid in kids:
            raise ValueError(f"kid {kid!r} is used by two keys")
        kids.add(kid)
        if jwk.get("kty") == "oct":
            raise ValueError(f"key {kid!r} is a symmetric key (kty oct); register public keys")
        private = sorted(PRIVATE_MEMBERS & set(jwk))
        if private:
            raise ValueError(f"key {kid!r} contains private key members {private}; register "
                             "only the public key")
        alg = jwk.get("alg")
        if jwk.get("use", "sig") != "sig" or (alg is not None and alg not in ASSERTION_ALGS):
            continue
        kty = jwk.get("kty")
        try:
            if kty == "RSA":
                if alg == "ES256":
                    raise ValueError("alg ES256 needs an EC key")
                rsa = RSAKey.import_key(jwk)
                if rsa.raw_value.key_size < 2048:
                    raise ValueError("RSA keys need at least 2048 bits")
                usable.append(rsa)
            elif kty == "EC" and jwk.get("crv") == "P-256":
                if alg not in (None, "ES256"):
                    raise ValueError(f"alg {alg} needs an RSA key")
                usable.append(ECKey.import_key(jwk))
        except (JoseError, TypeError, ValueError) as exc:
            raise ValueError(f"key {kid!r} is not usable: {exc}") from exc
    if not usable:
        raise ValueError("has no usable signing key (RSA of 2048 bits or more, or EC P-256)")
    return KeySet(usable)  # type: ignore[arg-type]


def check_jwks_uri(uri: str, *, allow_insecure: bool) -> str:
    """https, no credentials or fragment; a literal address must be public unless insecure
    URIs are allowed (the fetch checks every resolved address again)."""
    check_url(uri, what=repr(uri))  # https, or http on loopback
    parts = urlsplit(uri)
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials")
    if allow_insecure:
        return uri
    if parts.scheme != "https":
        raise ValueError("must use https")
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return uri  # a name: every address it resolves to is checked at each fetch
    if not _is_public(host):
        raise ValueError("must not point at a private, loopback or link-local address")
    return uri


# -- fetching -----------------------------------------------------------------------------

_resolver: ThreadPoolExecutor | None = None
_resolver_lock = threading.Lock()


def _lookup(host: str, port: int, timeout: float) -> list[str]:
    """getaddrinfo with a deadline (the resolver itself has none)."""
    global _resolver
    with _resolver_lock:
        if _resolver is None:
            _resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="civitas-dns")
    future = _resolver.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=timeout)
    except FutureTimeout as exc:
        raise JWKSUnavailable(f"looking up {host} timed out") from exc
    except OSError as exc:
        raise JWKSUnavailable(f"{host} cannot be resolved") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_public(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _PinnedAdapter(HTTPAdapter):
    """Connects to the address that was checked while verifying TLS for the host name, so a
    second DNS answer (rebinding) cannot redirect the request."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname
        super().__init__(max_retries=0)

    def build_connection_pool_key_attributes(
            self, request: requests.PreparedRequest, verify: bool | str,
            cert: str | tuple[str, str] | None = None) -> Any:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert)
        kwargs: dict[str, Any] = {**pool_kwargs, "server_hostname": self._hostname,
                                  "assert_hostname": self._hostname}
        return host_params, kwargs


@dataclass(frozen=True)
class _Fetched:
    keys: KeySet | None
    problem: str
    at: float


class AgencyKeys:
    """An agency's public keys: its inline ``jwks``, or its ``jwks_uri`` through a cache."""

    def __init__(self, *, allow_insecure: bool = False, timeout: float = 3.0,
                 max_bytes: int = 64 * 1024, ttl: float = 300.0, failure_ttl: float = 5.0,
                 min_refresh: float = 30.0, verify: bool | str = True,
                 lookup: Callable[[str, int, float], list[str]] = _lookup) -> None:
        self.allow_insecure = allow_insecure
        #: TLS verification: True (the system's CAs) or a CA bundle path
        self.verify = verify
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.ttl = ttl
        #: a failed fetch is remembered briefly, so a dead jwks_uri is not hammered
        self.failure_ttl = failure_ttl
        #: an unknown kid refetches (key rotation), at most this often per agency
        self.min_refresh = min_refresh
        self._lookup = lookup
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], _Fetched] = {}
        self._fetching: dict[tuple[str, str], threading.Lock] = {}

    def keys_for(self, client: AgencyClient, *, refresh: bool = False) -> KeySet:
        if client.jwks is not None:
            try:
                return agency_keyset(client.jwks)
            except ValueError as exc:
                raise JWKSUnavailable(f"the registered jwks {exc}") from exc
        if client.jwks_uri is None:
            raise JWKSUnavailable("the agency has registered no keys")
        return self._remote(client.client_id, client.jwks_uri, refresh)

    def _usable(self, entry: _Fetched | None, refresh: bool) -> bool:
        if entry is None:
            return False
        age = time.monotonic() - entry.at
        if entry.keys is None:
            return age < self.failure_ttl
        return age < (self.min_refresh if refresh else self.ttl)

    def _remote(self, client_id: str, uri: str, refresh: bool) -> KeySet:
        slot = (client_id, uri)
        with self._lock:
            entry = self._cache.get(slot)
            fetching = self._fetching.setdefault(slot, threading.Lock())
        if not self._usable(entry, refresh):
            with fetching:  # one fetch per agency at a time; the others wait for it
                entry = self._cache.get(slot)
                if not self._usable(entry, refresh):
                    try:
                        entry = _Fetched(agency_keyset(self.fetch(uri)), "", time.monotonic())
                    except ValueError as exc:
                        entry = _Fetched(None, f"its JWK set {exc}", time.monotonic())
                    except JWKSUnavailable as exc:
                        entry = _Fetched(None, str(exc), time.monotonic())
                    with self._lock:
                        self._cache[slot] = entry
        assert entry is not None
        if entry.keys is None:
            raise JWKSUnavailable(f"jwks_uri {uri}: {entry.problem}")
        return entry.keys

    def fetch(self, uri: str) -> object:
        """GET a JWK set: checked scheme and addresses, no redirects, bounded time and size."""
        deadline = time.monotonic() + self.timeout
        parts = urlsplit(uri)
        host = parts.hostname
        if parts.scheme not in ("https", "http") or not host:
            raise JWKSUnavailable("not an absolute https URL")
        if parts.scheme != "https" and not self.allow_insecure:
            raise JWKSUnavailable("not https")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            addresses = self._lookup(host, port, self.timeout)
        if not addresses:
            raise JWKSUnavailable(f"{host} has no address")
        if not self.allow_insecure and not all(_is_public(a) for a in addresses):
            raise JWKSUnavailable(f"{host} resolves to a private, loopback or link-local "
                                  "address")
        address = addresses[0].split("%", 1)[0]
        netloc = f"[{address}]" if ":" in address else address
        pinned = urlunsplit((parts.scheme, f"{netloc}:{port}", parts.path or "/",
                             parts.query, ""))
        host_header = f"[{host}]" if ":" in host else host.encode("idna").decode()
        if parts.port is not None:
            host_header += f":{parts.port}"
        session = requests.Session()
        session.trust_env = False  # no proxy from the environment: the checked address is used
        session.verify = self.verify
        session.mount("https://", _PinnedAdapter(host))
        try:
            with session, session.get(
                    pinned, headers={"Host": host_header, "Accept-Encoding": "identity",
                                     "Accept": "application/jwk-set+json, application/json"},
                    timeout=(self.timeout, self.timeout), allow_redirects=False,
                    stream=True) as resp:
                if resp.status_code != 200:
                    raise JWKSUnavailable(f"answered HTTP {resp.status_code}")
                declared = resp.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise JWKSUnavailable(f"larger than {self.max_bytes} bytes")
                try:
                    body = read_bounded(resp.raw, max_bytes=self.max_bytes, deadline=deadline)
                except BodyTooLarge:
                    raise JWKSUnavailable(f"larger than {self.max_bytes} bytes") from None
                except BodyTooSlow:
                    raise JWKSUnavailable("took too long") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise JWKSUnavailable(f"could not be fetched ({type(exc).__name__})") from exc
        try:
            return json.loads(body)
        except ValueError as exc:
            raise JWKSUnavailable("did not answer with JSON") from exc
        except RecursionError:  # nested deeper than the parser goes ("[" * 60000)
            raise JWKSUnavailable("did not answer with usable JSON (nested too deeply)") \
                from None
