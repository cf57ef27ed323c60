"""Password-style connector for an LDAP directory (ldap3).

Two ways to find and check the person, chosen by the configuration:

* search-then-bind (``bind_dn`` given): a service account, kept bound on pooled connections,
  searches ``user_base_dn`` with ``user_filter`` (RFC 4511 section 4.5.1); exactly one entry must
  match. The password is then checked by a simple bind as that entry's DN (RFC 4511 4.2,
  RFC 4513 5.1.3) on a separate, short-lived connection, so a pooled connection never changes
  identity.
* direct bind (no ``bind_dn``): the DN comes from ``user_dn_template``; after the bind the
  entry is read as the person (base-object search with ``user_filter``).

Input safety: the username enters a search filter escaped once per RFC 4515 section 3, and a
DN escaped per RFC 4514 section 2.4. An empty password is refused before any network traffic:
a simple bind with a DN and an empty password is an *unauthenticated* bind (RFC 4513 5.1.2)
that servers may answer with success. A wrong password and an unknown user look the same
(:class:`InvalidCredentials`).

Transport: ``ldaps://``, or ``ldap://`` with StartTLS (RFC 4511 4.14, RFC 4513 section 3). The
certificate is always verified against ``ca_file`` (else the system store) and the host name
checked (RFC 4513 3.1.3, RFC 6125) by Python's ``ssl`` during the handshake; there is no switch
to turn that off. Cleartext ``ldap://`` is accepted only to a loopback address. Referrals
(RFC 4511 4.1.10) are never chased. Every connection has connect and receive timeouts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import ldap3
from ldap3.core.exceptions import (
    LDAPCommunicationError,
    LDAPException,
    LDAPMaximumRetriesError,
    LDAPOperationResult,
    LDAPResponseTimeoutError,
    LDAPStartTLSError,
)
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn, parse_dn

from kernel.errors import ConfigError
from kernel.watchdog import WATCHDOG

from .base import (
    Bulkhead,
    ConnectorError,
    UpstreamIdentity,
    UpstreamRejected,
    UpstreamResponseInvalid,
    UpstreamUnavailable,
    busy_message,
)

MAX_USERNAME_CHARS = 256
MAX_PASSWORD_CHARS = 1024
#: a pooled connection idle longer than this is closed rather than reused: servers and
#: firewalls drop idle connections, sometimes silently (which would look like a timeout)
POOL_MAX_IDLE_SECONDS = 60.0
DEFAULT_ATTRIBUTE_MAP: tuple[tuple[str, str], ...] = (
    ("name", "cn"), ("given_name", "givenName"), ("family_name", "sn"), ("email", "mail"),
    ("preferred_username", "uid"),
)
#: attributes that name the person rather than identify them stably
_UNSTABLE_SUBJECTS = {"dn", "distinguishedname", "entrydn", "uid", "cn", "mail",
                      "samaccountname", "userprincipalname"}

# RFC 4511 Appendix A result codes
_SUCCESS, _SIZE_LIMIT_EXCEEDED, _NO_SUCH_OBJECT = 0, 4, 32
#: a bind refused because of who or what was presented (never a server fault)
_BIND_REFUSED = {32, 48, 49, 50, 53}  # noSuchObject ... unwillingToPerform
#: the server is (momentarily) unable to answer
_TRANSIENT = {3, 11, 51, 52, 80}  # timeLimitExceeded, adminLimitExceeded, busy, unavailable, other
_NETWORK_ERRORS = (LDAPCommunicationError, LDAPStartTLSError, LDAPResponseTimeoutError,
                   LDAPMaximumRetriesError, OSError)

_T = TypeVar("_T")


class DirectoryTooSlow(UpstreamUnavailable):
    """An exchange with the directory cut at its deadline (:meth:`LDAPConnector._deadline`)."""


class InvalidCredentials(UpstreamRejected):
    """Wrong password, unknown user, or a username that cannot be one: never told apart."""

    status_code = 401
    public_message = "Wrong username or password."


@dataclass(frozen=True)
class LDAPConfig:
    id: str
    display_name: str
    #: ``ldap://host[:port]`` or ``ldaps://host[:port]``
    url: str
    start_tls: bool = False
    #: CA bundle (PEM) that verifies the server; None means the system trust store
    ca_file: str | None = None
    #: service account for search-then-bind; both None means direct bind
    bind_dn: str | None = None
    bind_password: str | None = field(default=None, repr=False)
    #: direct bind only, e.g. ``uid={username},ou=people,dc=example,dc=org``
    user_dn_template: str | None = None
    user_base_dn: str | None = None
    user_filter: str = "(&(objectClass=inetOrgPerson)(uid={username}))"
    #: stable, never reassigned identifier of the entry (never the DN or the username)
    subject_attribute: str = "entryUUID"
    #: (claim, LDAP attribute) pairs
    attribute_map: tuple[tuple[str, str], ...] = DEFAULT_ATTRIBUTE_MAP
    #: groups from an attribute of the person holding group DNs (e.g. ``memberOf``) ...
    group_attribute: str | None = None
    #: ... or from a search under ``group_base_dn`` (``{dn}``: the person's DN)
    group_base_dn: str | None = None
    group_filter: str = "(&(objectClass=groupOfNames)(member={dn}))"
    group_name_attribute: str = "cn"
    acr: str = "urn:civitas:acr:ial1:aal1"
    #: connect timeout, and receive timeout for each answer
    timeout_seconds: float = 5.0
    #: service-account connections kept open (search-then-bind)
    pool_size: int = 4
    #: logins through this directory at once in one worker process (:class:`Bulkhead`)
    max_concurrent_calls: int = 2

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"ldap upstream {self.id!r}: {key} {why}")

        parts = urlsplit(self.url)
        if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
            raise bad("url", "must be ldap://host[:port] or ldaps://host[:port]")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise bad("url", "must not carry a DN, query, fragment or credentials")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise bad("url", "has an invalid port") from None
        if parts.scheme == "ldaps" and self.start_tls:
            raise bad("start_tls", "cannot be combined with an ldaps:// url")
        if parts.scheme == "ldap" and not self.start_tls and not _is_loopback(parts.hostname):
            raise bad("url", "sends passwords in clear text: use ldaps:// or start_tls")
        if self.ca_file is not None and not os.path.isfile(self.ca_file):
            raise bad("ca_file", f"{self.ca_file!r} is not a readable file")
        if (self.bind_dn is None) != (self.bind_password is None):
            raise bad("bind_dn", "and bind_password must be given together")
        if self.bind_dn is not None:
            if not self.bind_dn or not self.bind_password:
                raise bad("bind_password", "must not be empty (RFC 4513 5.1.2)")
            if not self.user_base_dn:
                raise bad("user_base_dn", "is required for search-then-bind (bind_dn is set)")
        elif not self.user_dn_template or "{username}" not in self.user_dn_template:
            raise bad("user_dn_template", "must contain {username} when no bind_dn is given")
        if "{username}" not in self.user_filter or not _looks_like_filter(self.user_filter):
            raise bad("user_filter", "must be a parenthesised filter containing {username}")
        if not self.subject_attribute or self.subject_attribute.lower() in _UNSTABLE_SUBJECTS:
            raise bad("subject_attribute", "must be a stable identifier such as entryUUID")
        if self.group_attribute and self.group_base_dn:
            raise bad("group_attribute", "and group_base_dn exclude each other")
        if "{dn}" not in self.group_filter or not _looks_like_filter(self.group_filter):
            raise bad("group_filter", "must be a parenthesised filter containing {dn}")
        if not 0 < self.timeout_seconds <= 60:
            raise bad("timeout_seconds", "must be more than 0 and at most 60")
        if not 1 <= self.pool_size <= 64:
            raise bad("pool_size", "must be between 1 and 64")
        if not 1 <= self.max_concurrent_calls <= 256:
            raise bad("max_concurrent_calls", "must be between 1 and 256")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _looks_like_filter(text: str) -> bool:
    return text.startswith("(") and text.endswith(")") and text.count("(") == text.count(")")


class _VerifiedTLS(ldap3.Tls):  # type: ignore[misc]  # ldap3 ships no type information
    """ldap3's own ``Tls`` turns the context's host name check off and matches names itself
    with the deprecated ``ssl.match_hostname``; this one lets OpenSSL verify the chain and the
    name (DNS or IP address) during the handshake, for LDAPS and StartTLS alike."""

    def __init__(self, context: ssl.SSLContext, server_hostname: str) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED)
        self._context = context
        self._server_hostname = server_hostname

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        # Always shake hands at once: the socket's receive timeout bounds the handshake.
        connection.socket = self._context.wrap_socket(
            connection.socket, server_side=False, do_handshake_on_connect=True,
            server_hostname=self._server_hostname,
        )


class _ServicePool:
    """Connections bound as the service account, each lent to one thread at a time.

    At most ``size`` exist; when all are lent, a thread waits up to ``wait`` seconds. A
    connection that saw an error is closed, never lent again.
    """

    def __init__(self, open_: Callable[[], Any], size: int, wait: float) -> None:
        self._open = open_
        self._wait = wait
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[tuple[Any, float]] = []

    def take(self, busy: Callable[[], ConnectorError]) -> tuple[Any, bool]:
        """A connection and whether it was used before; the caller must :meth:`give_back`."""
        if not self._slots.acquire(timeout=self._wait):
            raise busy()
        try:
            now = time.monotonic()
            found: Any = None
            stale: list[Any] = []
            with self._lock:
                while self._idle and found is None:
                    conn, since = self._idle.pop()
                    if now - since <= POOL_MAX_IDLE_SECONDS and not conn.closed:
                        found = conn
                    else:
                        stale.append(conn)
            for conn in stale:
                _close(conn)
            return (found, True) if found is not None else (self._open(), False)
        except BaseException:
            self._slots.release()
            raise

    def give_back(self, conn: Any, *, healthy: bool) -> None:
        try:
            if healthy and not conn.closed:
                with self._lock:
                    self._idle.append((conn, time.monotonic()))
            else:
                _close(conn)
        finally:
            self._slots.release()

    def drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            _close(conn)


def _close(conn: Any) -> None:
    with contextlib.suppress(*_NETWORK_ERRORS, LDAPException):
        conn.unbind()


class LDAPConnector:
    """One LDAP directory; implements :class:`connectors.base.PasswordConnector`."""

    def __init__(self, config: LDAPConfig) -> None:
        self.config = config
        self.id = config.id
        self.display_name = config.display_name
        self.acr = config.acr
        parts = urlsplit(config.url)
        assert parts.hostname is not None  # checked by LDAPConfig
        self._host = parts.hostname
        self._ldaps = parts.scheme == "ldaps"
        self._port = parts.port or (636 if self._ldaps else 389)
        self._tls: _VerifiedTLS | None = None
        if self._ldaps or config.start_tls:
            try:
                context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                                     cafile=config.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"ldap upstream {config.id!r}: ca_file cannot be loaded: "
                                  f"{exc}") from exc
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._tls = _VerifiedTLS(context, self._host)
        self._bulkhead = Bulkhead(config.max_concurrent_calls)
        self._pool: _ServicePool | None = None
        if config.bind_dn is not None:
            self._pool = _ServicePool(self._open_service, config.pool_size,
                                      config.timeout_seconds)

    # -- the password protocol ---------------------------------------------------------

    def login(self, username: str, password: str) -> UpstreamIdentity:
        _check_input(username, password)
        with self._bulkhead.call(busy_message(self.display_name)):
            return self._login(username, password)

    def _login(self, username: str, password: str) -> UpstreamIdentity:
        if self._pool is not None:
            dn, attributes = self._as_service(lambda conn: self._find_user(
                conn, self.config.user_base_dn or "", ldap3.SUBTREE, username))
            user = self._connect(dn, password)
            try:
                self._guard(user, lambda: self._bind(user, service=False))
            finally:
                _close(user)
            groups = self._as_service(lambda conn: self._groups(conn, dn, attributes))
        else:
            template = self.config.user_dn_template or ""
            dn = template.replace("{username}", escape_rdn(username))
            user = self._connect(dn, password)
            try:
                self._guard(user, lambda: self._bind(user, service=False))
                dn, attributes = self._guard(user, lambda: self._find_user(
                    user, dn, ldap3.BASE, username))
                groups = self._guard(user, lambda: self._groups(user, dn, attributes))
            finally:
                _close(user)
        claims: dict[str, Any] = {}
        for claim, attribute in self.config.attribute_map:
            value = _first_text(attributes.get(attribute.lower(), []))
            if value is not None:
                claims[claim] = value
        if groups is not None:
            claims["groups"] = groups
        return UpstreamIdentity(
            connector_id=self.id,
            subject=self._subject(attributes.get(self.config.subject_attribute.lower(), [])),
            attributes=claims,
            acr=self.acr,
            amr=("pwd",),
            connector_data={"dn": dn},
        )

    def close(self) -> None:
        """Unbind the pooled service-account connections (at shutdown)."""
        if self._pool is not None:
            self._pool.drop_idle()

    # -- directory operations ----------------------------------------------------------

    def _find_user(self, conn: Any, base: str, scope: str,
                   username: str) -> tuple[str, dict[str, list[bytes]]]:
        """Exactly one entry must match (RFC 4511 4.5.1); zero or several is a failed login."""
        search_filter = self.config.user_filter.replace(
            "{username}", escape_filter_chars(username))
        wanted = [self.config.subject_attribute, *(a for _, a in self.config.attribute_map)]
        if self.config.group_attribute:
            wanted.append(self.config.group_attribute)
        entries, result = self._search(conn, base, scope, search_filter, wanted, size_limit=2)
        code = result["result"]
        if code == _SIZE_LIMIT_EXCEEDED or (code == _NO_SUCH_OBJECT and scope == ldap3.BASE):
            raise InvalidCredentials()
        self._check_result(result)
        if len(entries) != 1:
            raise InvalidCredentials()
        return entries[0]

    def _groups(self, conn: Any, dn: str,
                attributes: dict[str, list[bytes]]) -> list[str] | None:
        """Names (``group_name_attribute``) of the person's groups, or None if not configured."""
        name_attribute = self.config.group_name_attribute.lower()
        names: set[str] = set()
        if self.config.group_attribute:
            for raw in attributes.get(self.config.group_attribute.lower(), []):
                try:
                    rdn_type, rdn_value, _ = parse_dn(raw.decode())[0]
                except (LDAPException, UnicodeDecodeError, IndexError):
                    continue
                if rdn_type.lower() == name_attribute and rdn_value:
                    names.add(rdn_value)
            return sorted(names)
        if not self.config.group_base_dn:
            return None
        search_filter = self.config.group_filter.replace("{dn}", escape_filter_chars(dn))
        entries, result = self._search(conn, self.config.group_base_dn, ldap3.SUBTREE,
                                       search_filter, [self.config.group_name_attribute])
        self._check_result(result)
        for _, group in entries:
            name = _first_text(group.get(name_attribute, []))
            if name:
                names.add(name)
        return sorted(names)

    def _search(self, conn: Any, base: str, scope: str, search_filter: str,
                attributes: Sequence[str],
                size_limit: int = 0,
                ) -> tuple[list[tuple[str, dict[str, list[bytes]]]], dict[str, Any]]:
        conn.search(
            search_base=base, search_filter=search_filter, search_scope=scope,
            dereference_aliases=ldap3.DEREF_NEVER, attributes=list(attributes),
            size_limit=size_limit, time_limit=math.ceil(self.config.timeout_seconds),
        )
        entries = [
            (str(e["dn"]), {str(k).lower(): list(v) for k, v in e["raw_attributes"].items()})
            for e in conn.response or []
            if e.get("type") == "searchResEntry"  # references (searchResRef) are not chased
        ]
        return entries, dict(conn.result)

    def _check_result(self, result: dict[str, Any]) -> None:
        """Success, or an error whose cause (logged, never shown) holds the LDAP result."""
        if result["result"] == _SUCCESS:
            return
        cause = _result_error(result)
        if result["result"] in _TRANSIENT:
            raise self._unavailable() from cause
        raise ConnectorError() from cause

    def _bind(self, conn: Any, *, service: bool) -> None:
        if conn.bind() and conn.bound:
            return
        result = dict(conn.result)
        # A refused service account is the hub's problem, never the citizen's password.
        if not service and result["result"] in _BIND_REFUSED:
            raise InvalidCredentials()
        if result["result"] in _TRANSIENT:
            raise self._unavailable() from _result_error(result)
        raise ConnectorError() from _result_error(result)

    def _subject(self, values: list[bytes]) -> str:
        if len(values) != 1:
            raise UpstreamResponseInvalid(detail=f"the entry has {len(values)} values of "
                                          f"{self.config.subject_attribute}, not one")
        raw = values[0]
        if self.config.subject_attribute.lower() == "objectguid" and len(raw) == 16:
            return str(uuid.UUID(bytes_le=raw))  # Active Directory: a binary GUID
        subject = _first_text(values)
        if not subject or len(subject) > 255:
            raise UpstreamResponseInvalid(detail=f"{self.config.subject_attribute} is empty "
                                          "or longer than 255 characters")
        return subject

    # -- connections -------------------------------------------------------------------

    def _connect(self, user: str, password: str) -> Any:
        """An open (and, if configured, StartTLS-protected) connection, not yet bound."""
        timeout = self.config.timeout_seconds
        # A fresh Server each time: ldap3 shuns an address for seconds after one failure.
        server = ldap3.Server(self._host, port=self._port, use_ssl=self._ldaps, tls=self._tls,
                              get_info=ldap3.NONE, connect_timeout=timeout)
        # auto_escape and check_names off: ldap3 sends filters and DNs exactly as built here.
        conn = ldap3.Connection(
            server, user=user, password=password, authentication=ldap3.SIMPLE,
            client_strategy=ldap3.SYNC, auto_referrals=False, auto_escape=False,
            check_names=False, raise_exceptions=False, read_only=True,
            # ldap3 also sets SO_RCVTIMEO from this and needs whole seconds there; the socket
            # timeout it sets first is the one that bounds each receive.
            receive_timeout=math.ceil(timeout),
        )
        try:
            # the TLS handshake (LDAPS, StartTLS) is an exchange too: within its deadline
            with self._deadline(conn):
                conn.open(read_server_info=False)
                if self.config.start_tls and not (conn.start_tls(read_server_info=False)
                                                  and conn.tls_started):
                    raise LDAPStartTLSError("StartTLS was not established")
        except DirectoryTooSlow:
            _close(conn)
            raise
        except _NETWORK_ERRORS as exc:
            _close(conn)
            raise self._unavailable() from exc
        except LDAPException as exc:
            _close(conn)
            raise ConnectorError() from exc
        return conn

    def _open_service(self) -> Any:
        conn = self._connect(self.config.bind_dn or "", self.config.bind_password or "")
        try:
            self._guard(conn, lambda: self._bind(conn, service=True))
        except BaseException:
            _close(conn)
            raise
        return conn

    def _as_service(self, operation: Callable[[Any], _T]) -> _T:
        """Run ``operation`` on a pooled service-account connection.

        A reused connection that the server (or a firewall) has closed meanwhile fails at
        once: then the other idle ones are likely dead too (a restarted server), so they are
        dropped and the operation is retried once on a fresh connection. A timeout is not
        retried: that would double the wait.
        """
        assert self._pool is not None
        for attempt in (1, 2):
            conn, reused = self._pool.take(self._unavailable)
            healthy = False
            try:
                with self._deadline(conn):
                    result = operation(conn)
                healthy = True
                return result
            except DirectoryTooSlow:
                raise  # cut: the connection is not given back
            except ConnectorError:
                healthy = True  # the exchange itself completed: the connection is fine
                raise
            except _NETWORK_ERRORS as exc:
                if attempt == 2 or not reused or isinstance(exc, TimeoutError):
                    raise self._unavailable() from exc
                self._pool.drop_idle()
            except LDAPException as exc:
                raise ConnectorError() from exc
            finally:
                self._pool.give_back(conn, healthy=healthy)
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _deadline(self, conn: Any) -> Iterator[None]:
        """Bound one exchange on ``conn`` as a whole. ldap3's receive timeout bounds each
        wait for more bytes, so a directory that sends its answer a byte at a time, each
        within it, would hold the thread for as long as it liked (a "slow read"). At the
        deadline (the timeout, plus one read's wait, as for HTTP upstreams:
        kernel.bounded) the socket is shut, the blocked read returns, and whatever the
        exchange then raised, or returned, becomes :class:`DirectoryTooSlow`.

        The deadline is an alarm of the process's one watchdog thread
        (:mod:`kernel.watchdog`), not a thread per exchange; disarming it is exact, so an
        exchange that ends in time leaves no cut on its way to the connection."""

        def cut() -> None:
            with contextlib.suppress(OSError, AttributeError):
                conn.socket.shutdown(socket.SHUT_RDWR)

        alarm = WATCHDOG.arm(2 * self.config.timeout_seconds, cut)
        try:
            yield
        except Exception as exc:
            if alarm.disarm():
                raise self._too_slow() from exc
            raise
        finally:  # whatever ended it (an interruption too); a second disarm says the same
            cut_came = alarm.disarm()
        if cut_came:  # it answered as the cut came: the connection is gone anyway
            raise self._too_slow()

    def _too_slow(self) -> DirectoryTooSlow:
        return DirectoryTooSlow(
            self._unavailable().public_message,
            detail=f"no whole answer within {2 * self.config.timeout_seconds:g} s (the "
                   "timeout and one read's wait): the connection was cut")

    def _guard(self, conn: Any, operation: Callable[[], _T]) -> _T:
        """Run one exchange on ``conn`` within its deadline, turning ldap3's exceptions into
        connector errors."""
        try:
            with self._deadline(conn):
                return operation()
        except _NETWORK_ERRORS as exc:
            raise self._unavailable() from exc
        except LDAPException as exc:
            raise ConnectorError() from exc

    def _unavailable(self) -> UpstreamUnavailable:
        return UpstreamUnavailable(f"The sign-in service {self.display_name} could not be "
                                   "reached. Please try again later.")


def _check_input(username: str, password: str) -> None:
    """Refuse what can never be a login, before any network traffic."""
    if not isinstance(username, str) or not isinstance(password, str):
        raise InvalidCredentials()
    if not username.strip() or len(username) > MAX_USERNAME_CHARS or "\x00" in username:
        raise InvalidCredentials()
    # An empty password would make an unauthenticated bind (RFC 4513 5.1.2).
    if not password.strip() or len(password) > MAX_PASSWORD_CHARS:
        raise InvalidCredentials()


def _result_error(result: dict[str, Any]) -> LDAPOperationResult:
    return LDAPOperationResult(result=result.get("result"), description=result.get("description"),
                               dn=result.get("dn"), message=result.get("message"),
                               response_type=result.get("type"))


def _first_text(values: list[bytes]) -> str | None:
    for raw in values:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None
