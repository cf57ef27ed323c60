"""Agency registration: validated, stored with a hashed secret; a ClientMixin for Authlib.

Registration metadata uses the names of RFC 7591 section 2 and OpenID Connect Dynamic Client
Registration 1.0 section 2 (``jwks``, ``jwks_uri``, ``subject_type``,
``id_token_signed_response_alg``...). Every refusal names the field at fault.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from authlib.oauth2.rfc6749 import ClientMixin
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from kernel import jsonfast
from kernel.db import Database, utcnow
from kernel.errors import CivitasError, ConfigError
from kernel.urls import check_redirect_uri, check_url

from .agency_keys import MAX_JWKS_BYTES, agency_keyset, check_jwks_uri
from .errors import AgencyRegistrationError, IdpError
from .models import Agency

SECRET_METHODS = ("client_secret_basic", "client_secret_post")
#: RFC 7591 2 ``token_endpoint_auth_method`` values; ``private_key_jwt`` is RFC 7523 section 3
#: / OpenID Connect Core 9 (what login.gov requires of agencies)
AUTH_METHODS = (*SECRET_METHODS, "private_key_jwt")
SCOPES = ("openid", "profile", "email", "offline_access")
#: scopes of the hub's own APIs, for the agency itself (client_credentials, RFC 6749 4.4);
#: every agency may have them, none of them reaches a citizen's data without a decision
SERVICE_SCOPES = ("consent.decisions",)
#: what the hub signs ID tokens with, per agency (``id_token_signed_response_alg``)
ID_TOKEN_ALGS = ("ES256", "RS256", "PS256")
#: OpenID Connect Core 8
SUBJECT_TYPES = ("pairwise", "public")
#: the sector every ``public`` agency shares, so they all see one ``sub`` per person
PUBLIC_SECTOR = "public"
#: a JWK set's arrays and objects at most this deep (a set of keys with x5c chains is 3)
MAX_JWKS_DEPTH = 16
#: registration fields that hold URIs (an '@' in one is written %40, see :func:`_refused_by`)
URI_FIELDS = frozenset({"redirect_uris", "post_logout_redirect_uris", "backchannel_logout_uri",
                        "event_delivery_uri", "jwks_uri"})
#: the members of an authorization response (RFC 6749 4.1.2, 4.1.2.1; RFC 9207 2), which
#: the hub adds to a redirect URI's query, so a registered one may not hold them
AUTHORIZATION_RESPONSE_MEMBERS = frozenset({"code", "state", "iss", "error",
                                            "error_description", "error_uri"})
#: where the ledger's refusal says what it refused: ``data.<member>``
_LEDGER_PATH = re.compile(r"\bdata\.([A-Za-z_]+)")


def _query_names(uri: str) -> list[str]:
    """The names of a URI's query members, split at ``&`` and at ``;`` (which some servers
    still take as a separator), decoded."""
    query = urlsplit(uri).query
    return [unquote_plus(part.partition("=")[0]) for part in re.split("[&;]", query) if part]


def _refused_by(exc: CivitasError) -> AgencyRegistrationError:
    """The audit ledger's refusal of a registration's entry (personal data such as an
    e-mail address, a number outside I-JSON) as the registrant's error, naming the field
    when the refusal says where (``... at data.redirect_uris[0] ...``)."""
    said = str(exc).replace("data.agency_name", "data.name").split(";")[0]
    found = _LEDGER_PATH.search(said)
    field = found.group(1) if found else "metadata"
    if field not in AgencyMetadata.__dataclass_fields__:
        field = "metadata"
    hint = " (write an '@' in a URI as %40)" if field in URI_FIELDS else ""
    return AgencyRegistrationError(
        field, f"refused by the audit ledger, which records every registration and takes no "
               f"personal data such as an e-mail address: {said}{hint}")


def hash_secret(secret: str) -> str:
    # Client secrets are 256-bit random values we generate (or >= 32 characters from config),
    # so a fast hash is enough; a password hash would only slow the token endpoint.
    return "sha256$" + hashlib.sha256(secret.encode()).hexdigest()


def verify_secret(secret: str, stored: str) -> bool:
    # An agency without a secret (private_key_jwt) stores "", which nothing matches.
    return bool(stored) and hmac.compare_digest(hash_secret(secret).encode(), stored.encode())


def _storable(client_id: str) -> bool:
    """Whether a client id can be looked up at all: one with a NUL (PostgreSQL text cannot
    hold it, and its driver refuses to send one) or that is not valid Unicode text (a lone
    surrogate, which a JSON string such as a client assertion's ``sub`` can carry: neither
    database driver can encode it, UnicodeEncodeError) is no registered agency's."""
    if "\x00" in client_id:
        return False
    if client_id.isascii():
        return True
    try:
        client_id.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class AgencyClient(ClientMixin):
    """An immutable view of an agency for one request (Authlib's client model)."""

    client_id: str
    name: str
    secret_hash: str
    redirect_uris: tuple[str, ...]
    sector_identifier: str
    scopes: tuple[str, ...]
    token_endpoint_auth_method: str
    subject_type: str
    id_token_signed_response_alg: str
    post_logout_redirect_uris: tuple[str, ...] = ()
    backchannel_logout_uri: str | None = None
    #: RFC 8935 push delivery of Security Event Tokens
    event_delivery_uri: str | None = None
    #: the agency's public keys inline (``private_key_jwt``), or where to fetch them
    jwks: dict[str, Any] | None = field(default=None, hash=False)
    jwks_uri: str | None = None

    @classmethod
    def from_row(cls, row: Agency) -> AgencyClient:
        return cls(
            client_id=row.client_id, name=row.name, secret_hash=row.secret_hash,
            redirect_uris=tuple(row.redirect_uris), sector_identifier=row.sector_identifier,
            scopes=tuple(row.scopes), token_endpoint_auth_method=row.token_endpoint_auth_method,
            subject_type=row.subject_type,
            id_token_signed_response_alg=row.id_token_signed_response_alg,
            post_logout_redirect_uris=tuple(row.post_logout_redirect_uris or ()),
            backchannel_logout_uri=row.backchannel_logout_uri,
            event_delivery_uri=row.event_delivery_uri,
            jwks=row.jwks, jwks_uri=row.jwks_uri,
        )

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        # OpenID Connect Core 3.1.2.1: redirect_uri is REQUIRED; never guess one.
        return None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        """The requested scope, or None (-> invalid_scope) if it asks for any scope this
        agency is not registered for: refuse rather than silently narrow."""
        if not scope:
            return ""
        requested = scope.split()
        if any(s not in self.scopes for s in requested):
            return None
        return " ".join(requested)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        # Exact string comparison (RFC 9700 2.1, 4.1.3): no prefix, case, slash or query leeway.
        return any(hmac.compare_digest(redirect_uri.encode(), u.encode())
                   for u in self.redirect_uris)

    def check_post_logout_redirect_uri(self, uri: str) -> bool:
        """RP-Initiated Logout 1.0 section 3: exactly one of the registered values."""
        return any(hmac.compare_digest(uri.encode(), u.encode())
                   for u in self.post_logout_redirect_uris)

    def check_client_secret(self, client_secret: str) -> bool:
        return verify_secret(client_secret, self.secret_hash)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == self.token_endpoint_auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        if grant_type == "refresh_token":
            return "offline_access" in self.scopes
        # every agency is a confidential client (RFC 6749 4.4: client_credentials needs one)
        return grant_type in ("authorization_code", "client_credentials")


@dataclass(frozen=True)
class AgencyMetadata:
    """What an agency registers; ``None`` for the alg means the hub's default."""

    client_id: str
    name: str
    redirect_uris: tuple[str, ...]
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    sector_identifier: str | None = None
    token_endpoint_auth_method: str = "client_secret_basic"  # noqa: S105 (a method name)
    post_logout_redirect_uris: tuple[str, ...] = ()
    backchannel_logout_uri: str | None = None
    event_delivery_uri: str | None = None
    jwks: dict[str, Any] | None = field(default=None, hash=False)
    jwks_uri: str | None = None
    id_token_signed_response_alg: str | None = None
    subject_type: str = "pairwise"


def metadata_of(row: Agency) -> AgencyMetadata:
    """What a stored agency registered, as :meth:`AgencyRegistry.check` takes it."""
    return AgencyMetadata(
        client_id=row.client_id, name=row.name, redirect_uris=tuple(row.redirect_uris),
        scopes=tuple(row.scopes), sector_identifier=row.sector_identifier,
        token_endpoint_auth_method=row.token_endpoint_auth_method,
        post_logout_redirect_uris=tuple(row.post_logout_redirect_uris or ()),
        backchannel_logout_uri=row.backchannel_logout_uri,
        event_delivery_uri=row.event_delivery_uri, jwks=row.jwks, jwks_uri=row.jwks_uri,
        id_token_signed_response_alg=row.id_token_signed_response_alg,
        subject_type=row.subject_type)


@dataclass(frozen=True)
class RegistrationPolicy:
    """The hub-wide rules registrations are checked against (from the settings)."""

    default_alg: str = "ES256"
    #: OpenID Connect Core 8: ``public`` subjects let agencies correlate people; off by default
    allow_public_subjects: bool = False
    #: http and private addresses for ``jwks_uri`` (development and tests only)
    allow_insecure_jwks_uri: bool = False


def default_sector(redirect_uris: Iterable[str]) -> str:
    """OpenID Connect Core 8.1: without a sector_identifier_uri, the redirect URI host."""
    hosts = {urlsplit(u).hostname or "" for u in redirect_uris}
    if len(hosts) != 1:
        raise AgencyRegistrationError(
            "sector_identifier", "redirect URIs on several hosts need an explicit one")
    return hosts.pop()


#: agencies by the host whose default pairwise sector they share (:func:`shared_host_sectors`)
SharedSectors = dict[str, list[str]]


def shared_host_sectors(agencies: Iterable[tuple[str, Sequence[str], str | None, str]]
                        ) -> SharedSectors:
    """Pairwise agencies that would see the same ``sub`` for each citizen only because their
    redirect URIs are on one host (OpenID Connect Core 8.1's default sector), by host:
    ``agencies`` are (client_id, redirect_uris, sector_identifier or None, subject_type).

    Two organisations behind one portal host can then link their records of a person, which
    pairwise identifiers exist to prevent (NIST SP 800-63C 6.3.2). A ``sector_identifier``
    other than the host is a deliberate grouping and is not reported."""
    by_sector: dict[str, list[str]] = {}
    for client_id, redirect_uris, sector, subject_type in agencies:
        hosts = {urlsplit(u).hostname or "" for u in redirect_uris}
        if subject_type != "pairwise" or len(hosts) != 1:
            continue
        host = hosts.pop()
        if sector in (None, host):
            by_sector.setdefault(host, []).append(client_id)
    return {host: sorted(ids) for host, ids in sorted(by_sector.items()) if len(ids) > 1}


def shared_sector_notice(host: str, client_ids: Sequence[str]) -> str:
    return (f"agencies {', '.join(client_ids)} share the pairwise sector {host!r} (their "
            "redirect URIs' host): each citizen has the same `sub` at all of them, so they "
            "can link their records. If they are different organisations, give each its own "
            "`sector_identifier`.")


#: how long another process's change to an agency may take to be seen here
CLIENT_CACHE_SECONDS = 5.0


def _stable(described: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in described.items() if k not in ("created_at", "updated_at")}


class AgencyRegistry:
    def __init__(self, db: Database, *, default_alg: str = "ES256",
                 policy: RegistrationPolicy | None = None,
                 on_signing_alg: Callable[[tuple[str, ...]], None] | None = None,
                 on_change: Callable[[str, dict[str, Any], Any], object] | None = None
                 ) -> None:
        self._db = db
        self.policy = policy or RegistrationPolicy(default_alg=default_alg)
        #: told of every registration, change and removal inside its transaction (the root
        #: appends it to the audit ledger): kind, the registration without secrets, session.
        #: A CivitasError it raises on a registration or change (the ledger refusing the
        #: entry) refuses it: AgencyRegistrationError, nothing stored
        self._on_change = on_change
        #: client_id -> (read at, client): every token and decision request authenticates
        #: an agency, so lookups are cached briefly; changes made here clear the entry at
        #: once, changes made by another process are seen within CLIENT_CACHE_SECONDS
        self._clients: dict[str, tuple[float, AgencyClient | None]] = {}
        #: called with an ID token algorithm an agency uses, so the hub has a key for it
        self._on_signing_alg = on_signing_alg

    # -- validation ---------------------------------------------------------------------

    def check(self, meta: AgencyMetadata) -> AgencyMetadata:
        """The metadata, normalised, or AgencyRegistrationError naming the field at fault."""
        if not re.fullmatch(r"[A-Za-z0-9._~-]{3,128}", meta.client_id):
            raise AgencyRegistrationError(
                "client_id", "3 to 128 characters from A-Z a-z 0-9 . _ ~ -")
        name = meta.name.strip()
        if not name or len(name) > 120:
            raise AgencyRegistrationError("name", "1 to 120 characters")
        if not meta.redirect_uris:
            raise AgencyRegistrationError("redirect_uris", "at least one is needed")
        if len(set(meta.redirect_uris)) != len(meta.redirect_uris):
            raise AgencyRegistrationError("redirect_uris", "duplicate redirect URI")
        for uri in meta.redirect_uris:
            self._url("redirect_uris", check_redirect_uri, uri)
            taken = sorted(set(_query_names(uri)) & AUTHORIZATION_RESPONSE_MEMBERS)
            if taken:
                # RFC 6749 4.1.2 and 4.1.2.1, RFC 9207 2: the hub adds these to the
                # redirect URI's query; one already in it would go back twice
                raise AgencyRegistrationError(
                    "redirect_uris", f"{uri!r} must not have a {taken[0]!r} query member: "
                    "the hub adds it to the authorization response (RFC 6749 4.1.2)")
        scopes = list(dict.fromkeys(meta.scopes))
        if any(s not in SCOPES for s in scopes) or "openid" not in scopes:
            raise AgencyRegistrationError(
                "scopes", f"must include 'openid' and only {list(SCOPES)}; got {scopes}")
        if meta.token_endpoint_auth_method not in AUTH_METHODS:
            raise AgencyRegistrationError("token_endpoint_auth_method",
                                          f"one of {list(AUTH_METHODS)}")
        for uri in meta.post_logout_redirect_uris:
            self._url("post_logout_redirect_uris", check_redirect_uri, uri)
            if "state" in _query_names(uri):
                # RP-Initiated Logout 1.0 section 3: the hub adds the agency's own state; one
                # in the registered URI would go back with it, twice
                raise AgencyRegistrationError(
                    "post_logout_redirect_uris", f"{uri!r} must not have a 'state' query "
                    "member: the hub adds the state the agency sends (RP-Initiated Logout "
                    "1.0 section 3)")
        if meta.backchannel_logout_uri is not None:
            self._url("backchannel_logout_uri", lambda u: check_url(u, what=repr(u)),
                      meta.backchannel_logout_uri)
        if meta.event_delivery_uri is not None:
            self._url("event_delivery_uri", lambda u: check_url(u, what=repr(u)),
                      meta.event_delivery_uri)
        sector = meta.sector_identifier
        if sector is None:
            sector = default_sector(meta.redirect_uris)
        elif not sector.strip() or len(sector) > 255 or sector == PUBLIC_SECTOR:
            raise AgencyRegistrationError(
                "sector_identifier", f"1 to 255 characters, and not {PUBLIC_SECTOR!r}")
        self._check_keys(meta)
        alg = meta.id_token_signed_response_alg or self.policy.default_alg
        if alg not in ID_TOKEN_ALGS:
            raise AgencyRegistrationError("id_token_signed_response_alg",
                                          f"one of {list(ID_TOKEN_ALGS)}")
        if meta.subject_type not in SUBJECT_TYPES:
            raise AgencyRegistrationError("subject_type", f"one of {list(SUBJECT_TYPES)}")
        if meta.subject_type == "public" and not self.policy.allow_public_subjects:
            raise AgencyRegistrationError(
                "subject_type", "'public' is not allowed on this hub (allow_public_subjects "
                "is off); use 'pairwise'")
        return replace(meta, name=name, scopes=tuple(scopes), sector_identifier=sector,
                       post_logout_redirect_uris=tuple(
                           dict.fromkeys(meta.post_logout_redirect_uris)),
                       id_token_signed_response_alg=alg)

    def _check_keys(self, meta: AgencyMetadata) -> None:
        if meta.jwks is not None and meta.jwks_uri is not None:
            # RFC 7591 2: the two MUST NOT both be present
            raise AgencyRegistrationError("jwks", "give jwks or jwks_uri, not both")
        if meta.token_endpoint_auth_method == "private_key_jwt" and (  # noqa: S105
                meta.jwks is None and meta.jwks_uri is None):
            raise AgencyRegistrationError("jwks", "private_key_jwt needs jwks or jwks_uri")
        if meta.jwks is not None:
            if jsonfast.nested_deeper_than(meta.jwks, MAX_JWKS_DEPTH):  # json.dumps recurses
                raise AgencyRegistrationError(
                    "jwks", f"nested more than {MAX_JWKS_DEPTH} levels deep")
            outside = jsonfast.number_outside_i_json_at(meta.jwks)
            if outside is not None:  # RFC 8259 6, RFC 7493 2.2 (and the ledger takes none)
                raise AgencyRegistrationError("jwks", f"{outside[0]} {outside[1]}")
            if len(json.dumps(meta.jwks)) > MAX_JWKS_BYTES:
                raise AgencyRegistrationError("jwks", f"larger than {MAX_JWKS_BYTES} bytes")
            try:
                agency_keyset(meta.jwks)
            except ValueError as exc:
                raise AgencyRegistrationError("jwks", str(exc)) from exc
        if meta.jwks_uri is not None:
            insecure = self.policy.allow_insecure_jwks_uri
            self._url("jwks_uri", lambda u: check_jwks_uri(u, allow_insecure=insecure),
                      meta.jwks_uri)

    @staticmethod
    def _url(name: str, check: Callable[[str], str], value: str) -> None:
        if len(value) > 2000:
            raise AgencyRegistrationError(name, "longer than 2000 characters")
        try:
            check(value)
        except ValueError as exc:
            raise AgencyRegistrationError(name, str(exc)) from exc

    # -- changes --------------------------------------------------------------------------

    def _apply(self, row: Agency, meta: AgencyMetadata) -> None:
        assert meta.sector_identifier is not None and meta.id_token_signed_response_alg
        row.name, row.redirect_uris = meta.name, list(meta.redirect_uris)
        row.sector_identifier, row.scopes = meta.sector_identifier, list(meta.scopes)
        row.token_endpoint_auth_method = meta.token_endpoint_auth_method
        row.post_logout_redirect_uris = list(meta.post_logout_redirect_uris)
        row.backchannel_logout_uri = meta.backchannel_logout_uri
        row.event_delivery_uri = meta.event_delivery_uri
        row.jwks, row.jwks_uri = meta.jwks, meta.jwks_uri
        row.id_token_signed_response_alg = meta.id_token_signed_response_alg
        row.subject_type = meta.subject_type
        row.updated_at = utcnow()

    def _signing_alg_used(self, meta: AgencyMetadata) -> None:
        if self._on_signing_alg is not None and meta.id_token_signed_response_alg:
            self._on_signing_alg((meta.id_token_signed_response_alg,))

    def _changed(self, kind: str, row: Agency, s: Any) -> None:
        self._clients.pop(row.client_id, None)
        if self._on_change is not None:
            described = row.describe()
            for volatile in ("created_at", "updated_at"):
                described.pop(volatile, None)
            # an agency's name is no personal data, but the ledger guards the member "name"
            described["agency_name"] = described.pop("name", None)
            self._on_change(kind, described, s)

    def _recorded(self, kind: str, row: Agency, s: Any) -> None:
        """:meth:`_changed` for a registration or change: what the audit ledger refuses to
        record is refused (the caller's transaction then rolls back; RFC 7591 3.2.2
        ``invalid_client_metadata``), not a server error."""
        try:
            self._changed(kind, row, s)
        except IdpError:
            raise
        except CivitasError as exc:  # the ledger's LedgerError, PersonalDataRefused
            raise _refused_by(exc) from exc

    @staticmethod
    def _secret_for(meta: AgencyMetadata, secret: str | None) -> str | None:
        if meta.token_endpoint_auth_method not in SECRET_METHODS:
            if secret is not None:
                raise AgencyRegistrationError(
                    "client_secret", f"not used with {meta.token_endpoint_auth_method}")
            return None
        return secret or secrets.token_urlsafe(32)

    def register(self, meta: AgencyMetadata, *, secret: str | None = None,
                 source: str = "cli") -> tuple[Agency, str | None]:
        """Register an agency; returns the row and the client secret (shown once), which is
        None for ``private_key_jwt`` agencies: they have no secret at all."""
        meta = self.check(meta)
        secret = self._secret_for(meta, secret)
        row = Agency(client_id=meta.client_id, source=source,
                     secret_hash=hash_secret(secret) if secret else "", created_at=utcnow())
        self._apply(row, meta)
        taken = AgencyRegistrationError("client_id", f"{meta.client_id!r} is already registered")
        try:
            with self._db.session() as s:
                if s.get(Agency, meta.client_id) is not None:
                    raise taken
                s.add(row)
                self._recorded("agency.registered", row, s)
        except IntegrityError as exc:
            # registered by another request between the look-up and the commit (its
            # primary key refused ours); this transaction, and its ledger entry, rolled back
            if self.get(meta.client_id) is None:
                raise  # some other constraint: not a registrant's error
            raise taken from exc
        # only once it is stored: a refused registration must not publish a key
        self._signing_alg_used(meta)
        return row, secret

    def add(self, *, client_id: str, name: str, redirect_uris: list[str],
            scopes: list[str] | None = None, sector_identifier: str | None = None,
            auth_method: str = "client_secret_basic", secret: str | None = None,
            source: str = "cli", post_logout_redirect_uris: list[str] | None = None,
            backchannel_logout_uri: str | None = None, jwks: dict[str, Any] | None = None,
            jwks_uri: str | None = None, id_token_signed_response_alg: str | None = None,
            subject_type: str = "pairwise", event_delivery_uri: str | None = None
            ) -> tuple[Agency, str | None]:
        """Register an agency from keyword arguments (CLI, tests); see :meth:`register`."""
        return self.register(AgencyMetadata(
            client_id=client_id, name=name, redirect_uris=tuple(redirect_uris),
            scopes=tuple(scopes or ("openid", "profile", "email")),
            sector_identifier=sector_identifier, token_endpoint_auth_method=auth_method,
            post_logout_redirect_uris=tuple(post_logout_redirect_uris or ()),
            backchannel_logout_uri=backchannel_logout_uri, jwks=jwks, jwks_uri=jwks_uri,
            id_token_signed_response_alg=id_token_signed_response_alg,
            subject_type=subject_type, event_delivery_uri=event_delivery_uri,
        ), secret=secret, source=source)

    def replace(self, meta: AgencyMetadata) -> tuple[Agency, str | None] | None:
        """Replace a registered agency's metadata (None when it is not registered).

        The client secret is kept; an agency that moves from ``private_key_jwt`` to a secret
        method gets a new one (returned once), one that moves away from secrets loses its.
        """
        meta = self.check(meta)
        issued: str | None = None
        with self._db.session() as s:
            # locked: the UPDATE writes only the columns that differ from what was read, so
            # a read outdated by a concurrent replacement would merge the two (RFC 7592 2.2)
            row = s.get(Agency, meta.client_id, with_for_update=True)
            if row is None:
                return None
            if meta.token_endpoint_auth_method not in SECRET_METHODS:
                row.secret_hash = ""
            elif not row.secret_hash:
                issued = secrets.token_urlsafe(32)
                row.secret_hash = hash_secret(issued)
            self._apply(row, meta)
            self._recorded("agency.changed", row, s)
        self._clients.pop(meta.client_id, None)  # again after commit: no stale re-read
        self._signing_alg_used(meta)
        return row, issued

    def sync_from_config(self, agencies: list[Any]) -> None:
        """Create or update the agencies declared in the settings file (at start-up, which
        then ensures a signing key for every algorithm in :meth:`signing_algs`)."""
        for i, a in enumerate(agencies):
            try:
                meta = self.check(AgencyMetadata(
                    client_id=a.client_id, name=a.name, redirect_uris=tuple(a.redirect_uris),
                    scopes=tuple(a.scopes), sector_identifier=a.sector_identifier,
                    token_endpoint_auth_method=a.token_endpoint_auth_method,
                    post_logout_redirect_uris=tuple(a.post_logout_redirect_uris),
                    backchannel_logout_uri=a.backchannel_logout_uri,
                    event_delivery_uri=a.event_delivery_uri, jwks=a.jwks,
                    jwks_uri=a.jwks_uri,
                    id_token_signed_response_alg=a.id_token_signed_response_alg,
                    subject_type=a.subject_type,
                ))
                secret = self._secret_for(
                    meta, a.client_secret.get_secret_value() if a.client_secret else None)
                self._store_declared(a.client_id, meta, secret)
            except AgencyRegistrationError as exc:
                raise ConfigError(f"invalid configuration in settings:\n  agencies[{i}]."
                                  f"{exc.field}: {exc.problem} (agency {a.client_id!r})"
                                  ) from exc

    def _store_declared(self, client_id: str, meta: AgencyMetadata, secret: str | None
                        ) -> None:
        with self._db.session() as s:
            # locked, as in :meth:`replace`: several processes may start at once
            row = s.get(Agency, client_id, with_for_update=True)
            before = None
            if row is None:
                row = Agency(client_id=client_id, source="config", created_at=utcnow())
                s.add(row)
            else:
                before = (row.secret_hash, _stable(row.describe()))
            row.secret_hash = hash_secret(secret) if secret else ""
            self._apply(row, meta)
            if before is None:
                self._recorded("agency.registered", row, s)
            elif before != (row.secret_hash, _stable(row.describe())):
                self._recorded("agency.changed", row, s)

    # -- queries ----------------------------------------------------------------------------

    def get(self, client_id: str) -> Agency | None:
        if not _storable(client_id):
            return None  # no registered id is such a string: unknown, not a server error
        with self._db.session() as s:
            return s.get(Agency, client_id)

    def client(self, client_id: str) -> AgencyClient | None:
        now = time.monotonic()
        cached = self._clients.get(client_id)
        if cached is not None and now - cached[0] < CLIENT_CACHE_SECONDS:
            return cached[1]
        row = self.get(client_id)
        found = AgencyClient.from_row(row) if row is not None else None
        if len(self._clients) > 10_000:
            self._clients.clear()
        self._clients[client_id] = (now, found)
        return found

    def list(self) -> list[Agency]:
        with self._db.session() as s:
            return list(s.scalars(select(Agency).order_by(Agency.client_id)))

    def nonconforming(self) -> Sequence[tuple[str, AgencyRegistrationError]]:
        """The stored agencies that today's rules (:meth:`check`, with this hub's
        :class:`RegistrationPolicy`) would refuse, each with the first field at fault, in
        client_id order. The rules have grown since some were stored (a redirect URI with a
        ``code`` or ``state`` member, a port out of range, a ``public`` subject type on a
        hub that no longer allows it...); nothing is changed here."""
        found = []
        for row in self.list():
            try:
                self.check(metadata_of(row))
            except AgencyRegistrationError as exc:
                found.append((row.client_id, exc))
        return found

    def shared_host_sectors(self) -> SharedSectors:
        """:func:`shared_host_sectors` of the registered agencies."""
        return shared_host_sectors((row.client_id, row.redirect_uris, row.sector_identifier,
                                    row.subject_type) for row in self.list())

    def signing_algs(self) -> set[str]:
        """Every ID token algorithm some registered agency uses."""
        with self._db.session() as s:
            return set(s.scalars(select(Agency.id_token_signed_response_alg).distinct()))

    def remove(self, client_id: str) -> bool:
        if not _storable(client_id):
            return False
        with self._db.session() as s:
            # locked: a concurrent removal or replacement is seen, one agency.removed entry
            row = s.get(Agency, client_id, with_for_update=True)
            if row is None:
                return False
            self._changed("agency.removed", row, s)
            s.delete(row)
        self._clients.pop(client_id, None)  # again after commit: no stale re-read
        return True
