"""Agency registration: validated, stored with a hashed secret; a ClientMixin for Authlib."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from authlib.oauth2.rfc6749 import ClientMixin
from sqlalchemy import select

from kernel.db import Database, utcnow
from kernel.urls import check_redirect_uri, check_url

from .errors import AgencyRegistrationError
from .models import Agency

AUTH_METHODS = ("client_secret_basic", "client_secret_post")
SCOPES = ("openid", "profile", "email", "offline_access")


def hash_secret(secret: str) -> str:
    # Client secrets are 256-bit random values we generate (or >= 32 characters from config),
    # so a fast hash is enough; a password hash would only slow the token endpoint.
    return "sha256$" + hashlib.sha256(secret.encode()).hexdigest()


def verify_secret(secret: str, stored: str) -> bool:
    return hmac.compare_digest(hash_secret(secret).encode(), stored.encode())


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
        return grant_type == "authorization_code"


def default_sector(redirect_uris: list[str]) -> str:
    """OpenID Connect Core 8.1: without a sector_identifier_uri, the redirect URI host."""
    hosts = {urlsplit(u).hostname or "" for u in redirect_uris}
    if len(hosts) != 1:
        raise AgencyRegistrationError(
            "redirect URIs on several hosts need an explicit sector identifier"
        )
    return hosts.pop()


class AgencyRegistry:
    def __init__(self, db: Database, *, default_alg: str = "ES256") -> None:
        self._db = db
        self._default_alg = default_alg

    def _validate(self, *, client_id: str, name: str, redirect_uris: list[str],
                  scopes: list[str], auth_method: str,
                  post_logout_redirect_uris: list[str] | None = None,
                  backchannel_logout_uri: str | None = None) -> None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9._~-]{3,128}", client_id):
            raise AgencyRegistrationError(
                "client_id: 3 to 128 characters from A-Z a-z 0-9 . _ ~ -"
            )
        if not name.strip():
            raise AgencyRegistrationError("name: must not be empty")
        if not redirect_uris:
            raise AgencyRegistrationError("redirect_uris: at least one is needed")
        for uri in redirect_uris:
            try:
                check_redirect_uri(uri)
            except ValueError as exc:
                raise AgencyRegistrationError(f"redirect_uris: {exc}") from exc
        bad = [s for s in scopes if s not in SCOPES]
        if bad or "openid" not in scopes:
            raise AgencyRegistrationError(
                f"scopes: must include 'openid' and only {list(SCOPES)}; got {scopes}"
            )
        if auth_method not in AUTH_METHODS:
            raise AgencyRegistrationError(f"token_endpoint_auth_method: one of {AUTH_METHODS}")
        for uri in post_logout_redirect_uris or []:
            try:
                check_redirect_uri(uri)
            except ValueError as exc:
                raise AgencyRegistrationError(f"post_logout_redirect_uris: {exc}") from exc
        if backchannel_logout_uri is not None:
            try:
                check_url(backchannel_logout_uri, what="backchannel_logout_uri")
            except ValueError as exc:
                raise AgencyRegistrationError(str(exc)) from exc

    def add(self, *, client_id: str, name: str, redirect_uris: list[str],
            scopes: list[str] | None = None, sector_identifier: str | None = None,
            auth_method: str = "client_secret_basic", secret: str | None = None,
            source: str = "cli", post_logout_redirect_uris: list[str] | None = None,
            backchannel_logout_uri: str | None = None) -> tuple[Agency, str]:
        """Register an agency; returns the row and the client secret (shown once)."""
        scopes = scopes or ["openid", "profile", "email"]
        post_logout_redirect_uris = list(dict.fromkeys(post_logout_redirect_uris or []))
        self._validate(client_id=client_id, name=name, redirect_uris=redirect_uris,
                       scopes=scopes, auth_method=auth_method,
                       post_logout_redirect_uris=post_logout_redirect_uris,
                       backchannel_logout_uri=backchannel_logout_uri)
        secret = secret or secrets.token_urlsafe(32)
        row = Agency(
            client_id=client_id, name=name.strip(), secret_hash=hash_secret(secret),
            redirect_uris=list(redirect_uris),
            sector_identifier=sector_identifier or default_sector(redirect_uris),
            scopes=scopes, token_endpoint_auth_method=auth_method, subject_type="pairwise",
            id_token_signed_response_alg=self._default_alg, source=source,
            post_logout_redirect_uris=post_logout_redirect_uris,
            backchannel_logout_uri=backchannel_logout_uri,
        )
        with self._db.session() as s:
            if s.get(Agency, client_id) is not None:
                raise AgencyRegistrationError(f"client_id: {client_id!r} is already registered")
            s.add(row)
        return row, secret

    def sync_from_config(self, agencies: list[Any]) -> None:
        """Create or update the agencies declared in the settings file."""
        for a in agencies:
            secret = a.client_secret.get_secret_value()
            self._validate(client_id=a.client_id, name=a.name, redirect_uris=a.redirect_uris,
                           scopes=a.scopes, auth_method=a.token_endpoint_auth_method,
                           post_logout_redirect_uris=a.post_logout_redirect_uris,
                           backchannel_logout_uri=a.backchannel_logout_uri)
            with self._db.session() as s:
                row = s.get(Agency, a.client_id)
                if row is None:
                    s.add(Agency(client_id=a.client_id, source="config",
                                 id_token_signed_response_alg=self._default_alg,
                                 subject_type="pairwise", name=a.name,
                                 secret_hash=hash_secret(secret),
                                 redirect_uris=list(a.redirect_uris),
                                 sector_identifier=(a.sector_identifier
                                                    or default_sector(a.redirect_uris)),
                                 scopes=list(a.scopes),
                                 token_endpoint_auth_method=a.token_endpoint_auth_method,
                                 post_logout_redirect_uris=list(a.post_logout_redirect_uris),
                                 backchannel_logout_uri=a.backchannel_logout_uri))
                    continue
                row.name, row.secret_hash = a.name, hash_secret(secret)
                row.redirect_uris, row.scopes = list(a.redirect_uris), list(a.scopes)
                row.token_endpoint_auth_method = a.token_endpoint_auth_method
                row.sector_identifier = a.sector_identifier or default_sector(a.redirect_uris)
                row.post_logout_redirect_uris = list(a.post_logout_redirect_uris)
                row.backchannel_logout_uri = a.backchannel_logout_uri
                row.updated_at = utcnow()

    def get(self, client_id: str) -> Agency | None:
        with self._db.session() as s:
            return s.get(Agency, client_id)

    def client(self, client_id: str) -> AgencyClient | None:
        row = self.get(client_id)
        return AgencyClient.from_row(row) if row is not None else None

    def list(self) -> list[Agency]:
        with self._db.session() as s:
            return list(s.scalars(select(Agency).order_by(Agency.client_id)))

    def remove(self, client_id: str) -> bool:
        with self._db.session() as s:
            row = s.get(Agency, client_id)
            if row is None:
                return False
            s.delete(row)
            return True
