"""The authorization server, assembled from Authlib's grant and extension classes.

- Authorization code grant only (OpenID Connect Core 3.1), with PKCE S256 required of every
  client (RFC 9700 2.1.1; ``plain`` and absent are refused), ``redirect_uri`` required and
  matched exactly, and RFC 9207 ``iss`` on every authorization response.
- ID tokens signed with the hub's current key for the agency's algorithm, carrying a pairwise
  ``sub`` (Core 8.1) and ``iss aud exp iat auth_time nonce at_hash acr amr sid``.
"""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any
from urllib.parse import quote, urlsplit

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.integrations.flask_oauth2.requests import FlaskOAuth2Payload, FlaskOAuth2Request
from authlib.oauth2.rfc6749 import OAuth2Request, grants
from authlib.oauth2.rfc6749.errors import (
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Error,
    UnauthorizedClientError,
    UnsupportedResponseTypeError,
)
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from authlib.oauth2.rfc9207 import IssuerParameter
from authlib.oidc.core import OpenIDCode
from authlib.oidc.core.util import create_half_hash
from flask import Response as FlaskResponse
from flask import request as flask_request
from joserfc.errors import JoseError
from werkzeug.datastructures import EnvironHeaders
from werkzeug.utils import get_content_type

from broker.accounts import AccountDirectory
from broker.session import HubLogin
from consent.policy import AgencyPolicy
from consent.service import ConsentService
from kernel import jsonfast
from kernel.db import database_unreachable
from kernel.metrics import TOKENS
from kernel.ratelimit import Limit, RateLimited, RateLimiter
from kernel.store import store_unavailable

from .agencies import AUTH_METHODS as AGENCY_AUTH_METHODS
from .agencies import PUBLIC_SECTOR, SERVICE_SCOPES, AgencyClient, AgencyRegistry
from .agency_keys import AgencyKeys
from .citizen import CitizenReads
from .claims import claims_for_scope, releasable, scope_claim_names
from .client_auth import PrivateKeyJWT, client_secret_basic
from .keys import SUPPORTED_ALGS, KeyRing
from .logout import SessionParticipants
from .pairwise import PairwiseSubjects
from .tokens import (
    CONSENT_WITHDRAWN,
    REDEMPTION_FAILED,
    AccessToken,
    AccessTokens,
    AuthorizationCode,
    GrantEnded,
    RefreshGrant,
    RefreshTokens,
    ScopeWidened,
    TokenStore,
    decode_jwt,
    new_grant_id,
)

#: the access token type of every token response (RFC 6749 5.1, RFC 6750)
BEARER = "Bearer"
#: client authentication at the token, revocation and introspection endpoints
AUTH_METHODS = list(AGENCY_AUTH_METHODS)


@dataclass
class ProviderServices:
    issuer: str
    agencies: AgencyRegistry
    tokens: TokenStore
    access_tokens: AccessTokens
    refresh_tokens: RefreshTokens
    accounts: AccountDirectory
    keys: KeyRing
    subjects: PairwiseSubjects
    id_token_lifetime: int
    participants: SessionParticipants
    #: agencies' public keys for ``private_key_jwt`` (inline or fetched from jwks_uri)
    agency_keys: AgencyKeys = field(default_factory=AgencyKeys)
    #: consent records; when set, only granted claims are released
    consent: ConsentService | None = None
    #: each agency's declaration of the claims it asks for and why
    policies: Mapping[str, AgencyPolicy] = field(default_factory=dict)
    #: counts authenticated requests per agency at the token, revocation and introspection
    #: endpoints (``agency_limit`` per window; None or 0: no limit)
    limiter: RateLimiter | None = None
    agency_limit: int = 0
    #: an account and its consent with one agency in one read (set with ``consent``)
    citizens: CitizenReads | None = None
    #: declared policies with their offline access item: (declared, with it) per agency
    _offline_policies: dict[str, tuple[AgencyPolicy, AgencyPolicy]] = field(
        default_factory=dict, init=False, repr=False)

    def policy_for(self, client: AgencyClient) -> AgencyPolicy:
        """The agency's declaration (a default one when it declared none), with the offline
        access item when it may have refresh tokens (OpenID Connect Core 11)."""
        from .consent_step import default_policy, with_offline_access

        policy = self.policies.get(client.client_id)
        if policy is None:
            origin = "{0.scheme}://{0.netloc}/".format(urlsplit(client.redirect_uris[0]))
            policy = default_policy(client.client_id, client.name, list(client.scopes), origin)
        if client.check_grant_type("refresh_token"):
            cached = self._offline_policies.get(client.client_id)
            if cached is not None and cached[0] is policy:
                return cached[1]
            offline = with_offline_access(policy)
            if client.client_id in self.policies:  # a declared one stays the same object
                self._offline_policies[client.client_id] = (policy, offline)
            return offline
        return policy

    def issue_tokens(self, *, client: AgencyClient, account_id: str, scope: str, grant_id: str,
                     sid: str, auth_time: int, acr: str, amr: tuple[str, ...],
                     code_hash: str | None = None, refresh: bool = False,
                     family_expires_at: int | None = None,
                     consent_ends: datetime | None = None,
                     grant_scope: str | None = None) -> dict[str, Any]:
        """The token response body for a grant: a JWT access token for ``scope`` and, when
        the agency may have one and the grant has ``offline_access``, a refresh token: the
        rotation of a grant that ends at ``family_expires_at``, or a new grant, which ends
        with the citizen's consent (``consent_ends``) if that comes before the refresh
        lifetime. ``grant_scope``: a rotated grant's own scope, which the new refresh token
        keeps whatever narrower ``scope`` this request asked for (RFC 6749 section 6: "the
        refresh token scope MUST be identical to that of the refresh token included by the
        client in the request")."""
        access = self.access_tokens.issue(
            client_id=client.client_id, alg=client.id_token_signed_response_alg,
            account_id=account_id, sub=self.subject_for(client, account_id), scope=scope,
            grant_id=grant_id, sid=sid, auth_time=auth_time, acr=acr, code_hash=code_hash,
        )
        body: dict[str, Any] = {"token_type": "Bearer", "access_token": access,
                                "expires_in": self.tokens.access_token_lifetime, "scope": scope}
        TOKENS.labels("refresh_token" if family_expires_at is not None
                      else "authorization_code").inc()
        kept = grant_scope or scope
        if refresh and "offline_access" in kept.split() and client.check_grant_type(
                "refresh_token"):
            ends, new_grant = family_expires_at, None
            if ends is None and consent_ends is not None and consent_ends.timestamp() < (
                    time.time() + self.refresh_tokens.lifetime):
                # offline access is part of the consent: it ends with it (Core 11)
                ends, new_grant = int(consent_ends.timestamp()), True
            body["refresh_token"] = self.refresh_tokens.issue(
                grant_id=grant_id, client_id=client.client_id, account_id=account_id,
                scope=kept, sid=sid, acr=acr, amr=amr, auth_time=auth_time,
                family_expires_at=ends, new_grant=new_grant,
            )
        return body

    def issue_client_token(self, client: AgencyClient, scope: str) -> dict[str, Any]:
        """The token response of the client_credentials grant: an access token for the
        agency itself (no refresh token, no ID token: RFC 6749 4.4.3)."""
        access = self.access_tokens.issue_for_client(
            client_id=client.client_id, alg=client.id_token_signed_response_alg, scope=scope)
        TOKENS.labels("client_credentials").inc()
        return {"token_type": "Bearer", "access_token": access,
                "expires_in": self.tokens.access_token_lifetime, "scope": scope}

    def verify_id_token_hint(self, hint: str) -> dict[str, Any] | None:
        """The claims of an ID token this hub signed (with any key it still publishes), or
        None. Expiry is not checked: an expired ID token is still a valid hint (OpenID
        Connect Core 3.1.2.1, RP-Initiated Logout 1.0 section 2)."""
        if not hint or len(hint) > 16384:
            return None
        try:
            token = decode_jwt(hint, self.keys.verifying_keyset,
                               algorithms=SUPPORTED_ALGS)
        except JoseError:
            return None
        if token.header.get("typ", "JWT") != "JWT" or token.claims.get("iss") != self.issuer:
            return None  # e.g. an access or logout token: signed here, but no ID token
        return dict(token.claims)

    def find_token(self, token: str, hint: str | None) -> AccessToken | RefreshGrant | None:
        """An access or refresh token by its value (RFC 7009 2.1 / RFC 7662 2.1 hint)."""
        order = ("refresh_token", "access_token") if hint == "refresh_token" else (
            "access_token", "refresh_token")
        for kind in order:
            found = (self.access_tokens.verify(token) if kind == "access_token"
                     else self.refresh_tokens.find(token))
            if found is None:
                continue
            if isinstance(found, AccessToken) and found.for_client_itself:
                return found  # client_credentials: no citizen whose deletion ends it
            if (found.account_live if isinstance(found, RefreshGrant)
                    else self.accounts.exists(found.account_id)):
                return found
        return None

    def subject_for(self, client: AgencyClient, account_id: str) -> str:
        """OpenID Connect Core 8: pairwise per sector, or one ``public`` value that every
        agency registered with ``subject_type: public`` shares."""
        sector = PUBLIC_SECTOR if client.subject_type == "public" else client.sector_identifier
        return self.subjects.subject(sector, account_id)

    def citizen_claims(self, account_id: str, client_id: str, names: Collection[str]
                       ) -> tuple[dict[str, Any] | None, set[str] | None, datetime | None]:
        """The account's attributes among ``names`` (None: it is gone), the claims the
        citizen has granted the agency now (None: no consent records here) and when that
        consent ends (None: until withdrawn), in one read."""
        if self.citizens is None:
            return self.accounts.live_attributes(account_id, names), None, None
        attributes, state = self.citizens.claims(account_id, client_id, names)
        if state is None:
            return attributes, set(), None
        return attributes, state.granted, state.expires_at if state.valid else None

    def user_claims(self, client: AgencyClient, account_id: str, scope: str,
                    attributes: Mapping[str, Any] | None = None,
                    granted: set[str] | None = None) -> dict[str, Any]:
        """Claims for the ID token and userinfo: those of the scope that the citizen granted
        this agency (consent), under the agency's ``sub``. ``attributes`` and ``granted``,
        when given, were read in this request (:meth:`citizen_claims`)."""
        if attributes is None:
            attributes = self.accounts.attributes(account_id)
        claims = claims_for_scope(attributes, scope)
        if self.consent is not None:
            if granted is None:
                granted = self.consent.granted_claims(account_id, client.client_id)
            claims = releasable(claims, granted)
        claims["sub"] = self.subject_for(client, account_id)
        return claims


class StoredAuthorizationRequest(OAuth2Request):
    """An authorization request replayed from the login flow after the citizen logged in."""

    def __init__(self, uri: str, params: dict[str, str]) -> None:
        super().__init__("GET", uri)
        self.payload = BasicOAuth2Payload(params)
        self._params = params

    @property
    def args(self) -> dict[str, str]:
        return self._params

    @property
    def form(self) -> dict[str, str]:
        return {}


class S256Challenge(CodeChallenge):
    """RFC 7636 with ``S256`` only, required of every client (RFC 9700 2.1.1)."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge with "
                                      "code_challenge_method=S256 (RFC 7636).")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256.")
        super().validate_code_challenge(grant, redirect_uri)


class CodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS

    @property
    def hub(self) -> ProviderServices:
        return self.server.hub  # type: ignore[no-any-return]

    def create_token_response(self) -> Any:
        """The code was taken when the request was validated. Should the database then be
        unreachable, the agency is told to try again (503): the code goes back for the
        rest of its minute, or the retry would get ``invalid_grant`` and the citizen's
        sign-in would be lost. No token was made from it: nothing was answered."""
        try:
            return super().create_token_response()
        except Exception as exc:
            code = getattr(self.request, "authorization_code", None)
            if isinstance(code, AuthorizationCode) and database_unreachable(exc):
                # the refresh grant's INSERT may have committed though its reply was lost
                # (a COMMIT cut off): the redemption that succeeds revokes it
                self.hub.tokens.restore_code(
                    code, abandoned_grant=getattr(self.request, "civitas_grant_id", None))
            raise

    _validated_redirect_uri: str | None = None

    def validate_authorization_request(self) -> str:
        """Authlib's validation, once per grant. A grant is made for one request: the hub
        validates it through ``get_consent_grant`` before deciding whether to ask for
        consent, and ``create_authorization_response`` would validate the same request again
        (about 1% of a login's CPU). A refusal is raised each time, never remembered."""
        if self._validated_redirect_uri is None:
            self._validated_redirect_uri = super().validate_authorization_request()
        return self._validated_redirect_uri

    @staticmethod
    def validate_authorization_redirect_uri(request: OAuth2Request, client: AgencyClient) -> str:
        """OpenID Connect Core 3.1.2.1: ``redirect_uri`` is required and must match exactly.
        A missing or unregistered one is answered with an error page, never a redirect."""
        uri = request.payload.redirect_uri
        if not uri:
            raise InvalidRequestError("Missing 'redirect_uri' in request.")
        if not client.check_redirect_uri(uri):
            raise InvalidRequestError("The 'redirect_uri' is not registered for this agency.")
        return str(uri)

    @staticmethod
    def generate_authorization_code() -> str:
        """48 URL-safe characters from 36 random bytes (288 bits; RFC 6749 10.10 asks that
        guessing a code be at most 2^-128 likely). Authlib's default draws each of its 48
        characters with a separate ``SystemRandom.choice``: 48 ``getrandom`` calls and
        about 34 µs per code, against under 1 µs for one read of 36 bytes."""
        return secrets.token_urlsafe(36)

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        login: HubLogin = request.user
        data = request.payload.data
        nonce = data.get("nonce")
        client_id = request.client.client_id
        scope = request.scope or ""
        if "offline_access" in scope.split() and not getattr(request, "civitas_offline", False):
            # OpenID Connect Core 11: without the citizen's consent to offline access the
            # request for it is ignored: no refresh token, and the token response's scope
            # says so (RFC 6749 5.1)
            scope = " ".join(s for s in scope.split() if s != "offline_access")
        saved = self.hub.tokens.save_code(code, {
            "client_id": client_id,
            "redirect_uri": request.payload.redirect_uri,
            "scope": scope,
            "nonce": nonce,
            "code_challenge": data["code_challenge"],
            "code_challenge_method": data["code_challenge_method"],
            "account_id": login.account_id,
            "auth_time": login.auth_time,
            "acr": login.acr,
            "amr": list(login.amr),
            "sid": login.sid,
        }, members=self.hub.participants.entries(login.sid, client_id))
        if not saved:
            # OpenID Connect Core 15.5.2: this agency's nonce is taken by a code that may
            # still be redeemed. Nothing was stored; the agency is told at its redirect URI.
            raise InvalidRequestError("The 'nonce' was already used.",
                                      redirect_uri=request.payload.redirect_uri,
                                      state=data.get("state"))

    def query_authorization_code(self, code: str, client: AgencyClient
                                 ) -> AuthorizationCode | None:
        # The code is taken, and its hub session's revocation mark read, in one round trip.
        # A code whose hub session ended (logout) between the code and its redemption gets
        # no tokens. A session that ends later, while the tokens are made, is the race every
        # provider has: the access token's sid still meets the mark at every use
        # (TokenStore.unless_revoked).
        record, session_ended = self.hub.tokens.take_code(code)
        if record is None or session_ended or record.client_id != client.client_id:
            return None
        return record

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        """Nothing to do: the code was taken atomically when it was queried."""

    def authenticate_user(self, authorization_code: AuthorizationCode) -> HubLogin | None:
        # The account must still exist; its attributes and the claims the citizen granted
        # the agency come in the same read, and the ID token of this request is made from
        # them (encode_id_token), not read again.
        self.request.civitas_read_at = time.time()
        attributes, granted, consent_ends = self.hub.citizen_claims(
            authorization_code.account_id, authorization_code.client_id,
            scope_claim_names(authorization_code.scope))
        if attributes is None:
            return None
        self.request.civitas_attributes = attributes
        self.request.civitas_granted = granted
        self.request.civitas_consent_ends = consent_ends
        return HubLogin(account_id=authorization_code.account_id,
                        auth_time=authorization_code.auth_time, acr=authorization_code.acr,
                        amr=authorization_code.amr, upstream_id="", sid=authorization_code.sid)

    def generate_token(self, user: HubLogin, scope: str, grant_type: str | None = None,
                       expires_in: int | None = None,
                       include_refresh_token: bool = True) -> dict[str, Any]:
        code: AuthorizationCode = self.request.authorization_code
        # offline access as the citizen's consent stands now, read with the claims: not as
        # it stood when the code was made (withdrawn since, it gives no refresh token:
        # OpenID Connect Core 11). None: no consent records are kept here.
        granted = getattr(self.request, "civitas_granted", None)
        offline = granted is None or OFFLINE_ACCESS_SCOPE in granted
        for abandoned in code.abandoned:  # made by a redemption that failed: never given
            self.hub.refresh_tokens.revoke_grant(abandoned, reason=REDEMPTION_FAILED)
        grant_id = self.request.civitas_grant_id = new_grant_id()
        body = self.hub.issue_tokens(
            client=self.request.client, account_id=user.account_id, scope=scope,
            grant_id=grant_id, sid=code.sid, auth_time=code.auth_time, acr=code.acr,
            amr=code.amr, code_hash=code.code_hash, refresh=include_refresh_token and offline,
            consent_ends=getattr(self.request, "civitas_consent_ends", None),
        )
        if "refresh_token" in body and granted is not None and \
                self.hub.tokens.agency_revoked_since(
                    user.account_id, self.request.client.client_id,
                    self.request.civitas_read_at):
            # the consent was withdrawn after it was read, and its withdrawal may have
            # revoked the agency's grants before this one was made (it marks, then
            # revokes; this makes, then looks): this grant dies too, and so do the tokens
            self.hub.refresh_tokens.revoke_grant(grant_id, reason=CONSENT_WITHDRAWN)
            raise InvalidGrantError("The citizen's consent was withdrawn meanwhile.")
        return body


class RotatingRefreshGrant(grants.RefreshTokenGrant):
    """RFC 6749 section 6 with rotation (RFC 9700 4.14.2): every use returns a new refresh
    token of the same grant; the grant's absolute lifetime never grows."""

    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True

    @property
    def hub(self) -> ProviderServices:
        return self.server.hub  # type: ignore[no-any-return]

    def create_token_response(self) -> Any:
        """The token was used when the request was validated. Should the database or the
        store then fail before its successor is written, the agency is told to try again
        (503): the token goes back to its grant, or the retry would be taken for a replay
        and revoke the grant (RFC 9700 4.14.2). Nothing was issued from it: nothing was
        answered."""
        try:
            return super().create_token_response()
        except Exception as exc:
            if isinstance(getattr(self.request, "refresh_token", None), RefreshGrant) and (
                    database_unreachable(exc) or store_unavailable(exc)):
                self.hub.refresh_tokens.put_back(self.request.form["refresh_token"])
            raise

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshGrant | None:
        client: AgencyClient = self.request.client
        # Refuse a wider scope before the token is consumed (RFC 6749 6).
        try:
            return self.hub.refresh_tokens.use(
                refresh_token, client.client_id,
                scope_within=set((self.request.payload.scope or "").split()))
        except ScopeWidened:
            raise InvalidScopeError() from None

    def authenticate_user(self, refresh_token: RefreshGrant) -> HubLogin | None:
        # Offline access outlives the hub session on purpose (OpenID Connect Core 11): a
        # logout ends the session's access tokens, not the agency's refresh grant; deletion
        # of the account and withdrawal of consent do revoke it.
        if not refresh_token.account_live:  # read with the grant (RefreshTokens.use)
            # RFC 6749 5.2: the grant is invalid (Authlib's answer to no user would be
            # invalid_request, which tells the agency its request was malformed)
            raise InvalidGrantError()
        return HubLogin(account_id=refresh_token.account_id, auth_time=refresh_token.auth_time,
                        acr=refresh_token.acr, amr=refresh_token.amr, upstream_id="",
                        sid=refresh_token.sid)

    def revoke_old_credential(self, refresh_token: RefreshGrant) -> None:
        """Nothing to do: the token was consumed atomically when it was checked."""

    def generate_token(self, user: HubLogin, scope: str, grant_type: str | None = None,
                       expires_in: int | None = None,
                       include_refresh_token: bool = True) -> dict[str, Any]:
        grant: RefreshGrant = self.request.refresh_token
        # after the hub session ended, refreshed tokens are offline tokens: no session id
        sid = "" if self.hub.tokens.is_marked_revoked("sid", grant.sid) else grant.sid
        try:
            body = self.hub.issue_tokens(
                client=self.request.client, account_id=user.account_id, scope=scope,
                grant_id=grant.grant_id, sid=sid, auth_time=grant.auth_time, acr=grant.acr,
                amr=grant.amr, refresh=True, family_expires_at=grant.expires_at,
                grant_scope=grant.scope,
            )
        except GrantEnded:
            raise InvalidGrantError() from None  # revoked between the use and the rotation
        if self.hub.tokens.is_marked_revoked("grant", grant.grant_id):
            # a replay of this token raced us and revoked the grant meanwhile
            raise InvalidGrantError()
        return body


class AgencyCredentialsGrant(grants.ClientCredentialsGrant):
    """RFC 6749 4.4: an agency's access token for the hub's own APIs (the consent decision
    API), never for a citizen's data: only ``SERVICE_SCOPES`` (the default when ``scope`` is
    absent, RFC 6749 3.3), no refresh token (4.4.3), no ID token."""

    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS

    @property
    def hub(self) -> ProviderServices:
        return self.server.hub  # type: ignore[no-any-return]

    def validate_token_request(self) -> None:
        client: AgencyClient = self.authenticate_token_endpoint_client()
        if not client.check_grant_type(self.GRANT_TYPE):
            raise UnauthorizedClientError(
                f"The client is not authorized to use 'grant_type={self.GRANT_TYPE}'")
        raw = self.request.payload.scope
        requested = (raw if raw is not None else " ".join(SERVICE_SCOPES)).split()
        if not requested or any(s not in SERVICE_SCOPES for s in requested):
            raise InvalidScopeError("The client_credentials grant gives only these scopes: "
                                    f"{' '.join(SERVICE_SCOPES)}.")
        self.request.client = client
        self.granted_scope = " ".join(dict.fromkeys(requested))

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        body = self.hub.issue_client_token(self.request.client, self.granted_scope)
        return 200, body, self.TOKEN_RESPONSE_HEADER


def check_token_params(request: Any) -> None:
    """The parameters of a revocation or introspection request: ``token`` is required. Any
    ``token_type_hint`` is let through: :meth:`ProviderServices.find_token` reads only
    ``refresh_token`` (to look there first) and searches every type whatever the hint."""
    if "token" not in request.form:
        raise InvalidRequestError()  # as Authlib


class HubRevocation(RevocationEndpoint):
    """RFC 7009: an agency revokes its own access or refresh tokens."""

    CLIENT_AUTH_METHODS = AUTH_METHODS

    def check_params(self, request: Any, client: AgencyClient) -> None:
        """RFC 7009 2.1: ``token`` is required; a ``token_type_hint`` the hub does not
        understand is ignored (Authlib refuses it: unsupported_token_type)."""
        check_token_params(request)

    def query_token(self, token_string: str, token_type_hint: str | None
                    ) -> AccessToken | RefreshGrant | None:
        return self.server.hub.find_token(token_string, token_type_hint)  # type: ignore

    def revoke_token(self, token: AccessToken | RefreshGrant, request: Any) -> None:
        hub: ProviderServices = self.server.hub
        if isinstance(token, AccessToken):
            hub.tokens.revoke_access_token(token.jti)
        else:
            # A refresh token stands for its grant: revoke the grant and its access tokens.
            hub.refresh_tokens.revoke_grant(token.grant_id)


class HubIntrospection(IntrospectionEndpoint):
    """RFC 7662: answers only the agency a token was issued to; to any other agency every
    token is simply inactive, so nothing about other agencies' tokens leaks."""

    CLIENT_AUTH_METHODS = AUTH_METHODS

    def check_params(self, request: Any, client: AgencyClient) -> None:
        """RFC 7662 2.1: ``token`` is required; with a ``token_type_hint`` the hub does not
        understand it searches every type it supports (Authlib refuses the hint:
        unsupported_token_type)."""
        check_token_params(request)

    def query_token(self, token_string: str, token_type_hint: str | None
                    ) -> AccessToken | RefreshGrant | None:
        return self.server.hub.find_token(token_string, token_type_hint)  # type: ignore

    def check_permission(self, token: AccessToken | RefreshGrant, client: AgencyClient,
                         request: Any) -> bool:
        return token.client_id == client.client_id

    def introspect_token(self, token: AccessToken | RefreshGrant) -> dict[str, Any]:
        hub: ProviderServices = self.server.hub
        client = hub.agencies.client(token.client_id)
        if client is None:
            return {"active": False}
        if isinstance(token, AccessToken) and token.for_client_itself:
            # RFC 9068 2.2: the agency's own token; its sub is its client_id
            return {"active": True, "client_id": token.client_id, "scope": token.scope,
                    "sub": token.client_id, "iss": hub.issuer, "aud": hub.issuer,
                    "token_type": BEARER, "exp": token.expires_at,
                    "iat": token.issued_at, "jti": token.jti}
        body: dict[str, Any] = {
            "active": True, "client_id": token.client_id, "scope": token.scope,
            "sub": hub.subject_for(client, token.account_id), "iss": hub.issuer,
            "exp": token.expires_at,
        }
        if isinstance(token, AccessToken):
            # RFC 7662 2.2: token_type is an RFC 6749 5.1 (7.1) access token type, as the
            # token response said; a refresh token has none ("access_token" and
            # "refresh_token" are RFC 7009 hint values, not types)
            body.update(token_type=BEARER, iat=token.issued_at, jti=token.jti,
                        aud=token.client_id)
        return body


class HubOpenIDCode(OpenIDCode):
    def __init__(self, hub: ProviderServices) -> None:
        super().__init__(require_nonce=False)
        self.hub = hub

    def exists_nonce(self, nonce: str, request: OAuth2Request) -> bool:
        # A nonce is claimed atomically with the code it goes into (save_authorization_code):
        # a lookup here would cost a round trip and could not stop two racing requests.
        return False

    def encode_id_token(self, token: dict[str, Any], request: OAuth2Request) -> str:
        client: AgencyClient = request.client
        code: AuthorizationCode = request.authorization_code
        key = self.hub.keys.signing_key(client.id_token_signed_response_alg)
        now = int(time.time())
        claims: dict[str, Any] = self.hub.user_claims(
            client, code.account_id, token["scope"],
            attributes=getattr(request, "civitas_attributes", None),
            granted=getattr(request, "civitas_granted", None))
        claims.update({
            "iss": self.hub.issuer,
            "aud": client.client_id,
            "iat": now,
            "exp": now + self.hub.id_token_lifetime,
            "auth_time": code.auth_time,
            "acr": code.acr,
            "sid": code.sid,
        })
        if code.amr:
            claims["amr"] = list(code.amr)
        if code.nonce:
            claims["nonce"] = code.nonce
        at_hash = create_half_hash(token["access_token"], key.alg)
        claims["at_hash"] = at_hash.decode() if isinstance(at_hash, bytes) else at_hash
        return key.sign_jwt({"alg": key.alg, "kid": key.kid, "typ": "JWT"}, claims)


class HubIssuerParameter(IssuerParameter):
    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        self._param = "iss=" + quote(issuer, safe="")

    def get_issuer(self) -> str:
        return self.issuer

    def add_issuer_parameter(self, authorization_server: Any, response: Any) -> None:
        """RFC 9207 2: ``iss`` in every authorization response, errors included. The
        ``Location`` is the agency's registered redirect URI, which has no fragment (RFC 6749
        3.1.2, kernel/urls.py), with the response's parameters in its query: ``iss`` is
        appended to that query as it stands, which also keeps a registered query exactly
        (RFC 6749 3.1.2). Authlib's own way parses the whole URI and encodes it again (2-3%
        of a login's CPU)."""
        location = response.location
        if not location:
            return
        if "#" in location:
            super().add_issuer_parameter(authorization_server, response)
            return
        if "?" not in location:
            joiner = "?"
        elif location.endswith(("?", "&")):
            joiner = ""
        else:
            joiner = "&"
        response.location = location + joiner + self._param


class RateLimitedError(OAuth2Error):
    """RFC 6585 section 4: 429 with ``Retry-After``. OAuth has no error code for it; the
    body follows RFC 6749 5.2's shape so that client libraries show the description."""

    error = "rate_limited"
    status_code = 429

    def __init__(self, retry_after: int) -> None:
        super().__init__(description="Too many requests from this agency; retry after "
                                     f"{retry_after} seconds.")
        self.retry_after = retry_after

    def get_headers(self) -> list[tuple[str, str]]:
        return [*super().get_headers(), ("Retry-After", str(self.retry_after))]


#: endpoints whose authenticated requests count against the agency's limit
LIMITED_ENDPOINTS = frozenset({"token", "revocation", "introspection"})


class HubOAuth2Payload(FlaskOAuth2Payload):
    @cached_property
    def datalist(self) -> dict[str, list[str]]:
        """Every parameter's values (RFC 6749 3.1: Authlib refuses one sent twice), as
        Authlib's: the query's, then the form's (never for GET: Werkzeug's ``values``). Made
        by walking each source once, where Authlib's looks every name up in both again (1.5%
        of a login's CPU)."""
        values: defaultdict[str, list[str]] = defaultdict(list)
        for source in self.data.dicts:
            for name, items in source.lists():
                values[name].extend(items)
        return values


class _RequestHeaders(EnvironHeaders):
    """A request's headers, true as a truth value without being counted. Authlib's
    ``OAuth2Request`` keeps ``headers or {}``, and an ``EnvironHeaders`` counts itself by
    walking the whole WSGI environ (4% of a client_credentials request's CPU). The only
    difference: a request with no header at all (HTTP/1.0 allows it) keeps an empty
    ``EnvironHeaders``, where Authlib would keep ``{}``; both answer every lookup None."""

    def __bool__(self) -> bool:
        return True


class HubOAuth2Request(FlaskOAuth2Request):
    """Authlib's request for a Flask request, whose ``uri`` is the request's scheme and host
    only (``scheme://host/``, Werkzeug's ``host_url`` without its URI-to-IRI conversion),
    not its whole URL. Authlib reads ``uri`` to refuse plain http
    (``InsecureTransportError.check``: the scheme and the host name) and in RFC 7592 client
    management, which the hub does not offer; Werkzeug's whole URL (the path and query
    turned from IRI to URI) cost about 3% of a login's CPU, its ``host_url`` 1%. The check
    gets the same answer from any of them (tests/test_bad_input.py)."""

    def __init__(self, request: Any) -> None:
        OAuth2Request.__init__(self, method=request.method,
                               uri=f"{request.scheme}://{request.host}/",
                               headers=_RequestHeaders(request.environ))
        self._request = request
        self.payload = HubOAuth2Payload(request)


#: the scope, and consent item, of offline access (idp.consent_step.OFFLINE_ACCESS)
OFFLINE_ACCESS_SCOPE = "offline_access"


def repeated_parameter(request: OAuth2Request) -> str | None:
    """The first parameter a request sends more than once (its query's and its form's
    together, as Authlib reads them), or None."""
    return next((name for name, values in request.payload.datalist.items()
                 if len(values) > 1), None)


#: what Werkzeug labels a response given no type (``default_mimetype``, utf-8)
_DEFAULT_CONTENT_TYPE = get_content_type(FlaskResponse.default_mimetype or "text/html", "utf-8")


class HubAuthorizationServer(AuthorizationServer):
    def __init__(self, hub: ProviderServices) -> None:
        super().__init__()
        self.hub = hub
        self._query_client = hub.agencies.client
        self._save_token = lambda token, request: None  # tokens are stored as they are minted
        self.register_grant(CodeGrant, [S256Challenge(required=True), HubOpenIDCode(hub)])
        self.register_grant(RotatingRefreshGrant)
        self.register_grant(AgencyCredentialsGrant)
        self.register_endpoint(HubRevocation)
        self.register_endpoint(HubIntrospection)
        # a malformed Authorization header is invalid_client, not a server error
        self.register_client_auth_method("client_secret_basic", client_secret_basic)
        self.register_client_auth_method("private_key_jwt", PrivateKeyJWT(
            issuer=hub.issuer, tokens=hub.tokens, keys=hub.agency_keys))
        self.register_extension(HubIssuerParameter(hub.issuer))
        self.scopes_supported = ["openid", "profile", "email", "offline_access"]

    def get_authorization_grant(self, request: OAuth2Request) -> Any:
        """Authlib's, but an unsupported ``response_type`` is refused in words of the
        hub's: Authlib's put the value itself in the ``error_description``, which RFC 6749
        4.1.2.1 limits to printable ASCII without '"' or '\\', and Authlib refuses to make
        an error whose description breaks that rule (ValueError: a server error for
        ``response_type=to"ken``). Redirected only to a redirect URI the client has, as
        Authlib does."""
        if any(grant.check_authorization_endpoint(request)
               for grant, _ in self._authorization_grants):
            return super().get_authorization_grant(request)
        redirect_uri = None
        client = self.query_client(request.payload.client_id or "")
        if client is not None:
            wanted = request.payload.redirect_uri
            if wanted and client.check_redirect_uri(wanted):
                redirect_uri = wanted
            elif not wanted:
                redirect_uri = client.get_default_redirect_uri()
        # (Authlib's passes its description where the error takes the response type, and
        # the value as the description; no state, which 4.1.2.1 requires back)
        raise UnsupportedResponseTypeError(
            request.payload.response_type,
            description="The only response_type this server supports is 'code'.",
            redirect_uri=redirect_uri,
            state=request.payload.state if redirect_uri is not None else None)

    def authenticate_client(self, request: OAuth2Request, methods: list[str],
                            endpoint: str = "token") -> AgencyClient:
        client: AgencyClient = super().authenticate_client(request, methods, endpoint)
        limiter = self.hub.limiter
        if limiter is not None and endpoint in LIMITED_ENDPOINTS:
            try:
                # capacity, not a guess to stop (the agency is authenticated): counted in
                # batches, so most token requests make one round trip for limits, not two
                limiter.hit([Limit(f"token:agency:{client.client_id}", self.hub.agency_limit,
                                   exact=False)])
            except RateLimited as exc:
                raise RateLimitedError(exc.retry_after) from exc
        return client

    def create_token_response(self, request: Any = None) -> Any:
        """Authlib's token response, with a request that repeats a parameter refused first
        (RFC 6749 3.2: "Request and response parameters MUST NOT be included more than
        once"): invalid_request naming it, in the words Authlib answers /authorize with,
        before any client, grant or code is looked at (a refused request uses no code)."""
        oauth_request = self.create_oauth2_request(request)
        repeated = repeated_parameter(oauth_request)
        if repeated is not None:
            # RFC 6749 5.2 allows no '"', '\\' or non-ASCII in an error description (and
            # Authlib refuses to make one with them: a server error): the name goes quoted
            return self.handle_error_response(oauth_request, InvalidRequestError(
                f"Multiple '{quote(repeated, safe='')}' in request."))
        return super().create_token_response(oauth_request)

    def handle_response(self, status_code: int, payload: Any, headers: Any) -> Any:
        """Authlib's response, its JSON body written by :mod:`kernel.jsonfast`, with its
        Content-Type given to Werkzeug when the headers have
        none (an authorization response's redirect): the type Werkzeug would give it, without
        its search of the headers, which raises and catches an HTTP exception when the name
        is missing (1% of a login's CPU)."""
        if isinstance(payload, dict):  # a token, introspection or error body (Authlib: json)
            payload = jsonfast.dumpb(payload)
        if not isinstance(headers, list) or any(name.lower() == "content-type"
                                                for name, _ in headers):
            return super().handle_response(status_code, payload, headers)
        return FlaskResponse(payload, status=status_code, headers=headers,
                             content_type=_DEFAULT_CONTENT_TYPE)

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        if isinstance(request, OAuth2Request):
            return request
        # the request itself, not Flask's context-local proxy to it: Authlib reads the
        # payload a dozen times per request, each read through the proxy's lookup
        return HubOAuth2Request(flask_request._get_current_object())  # type: ignore[attr-defined]
