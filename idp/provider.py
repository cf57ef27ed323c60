"""The authorization server, assembled from Authlib's grant and extension classes.

- Authorization code grant only (OpenID Connect Core 3.1), with PKCE S256 required of every
  client (RFC 9700 2.1.1; ``plain`` and absent are refused), ``redirect_uri`` required and
  matched exactly, and RFC 9207 ``iss`` on every authorization response.
- ID tokens signed with the hub's current key for the agency's algorithm, carrying a pairwise
  ``sub`` (Core 8.1) and ``iss aud exp iat auth_time nonce at_hash acr amr sid``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.integrations.flask_oauth2.requests import FlaskOAuth2Request
from authlib.oauth2.rfc6749 import OAuth2Request, grants
from authlib.oauth2.rfc6749.errors import InvalidRequestError
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc9207 import IssuerParameter
from authlib.oidc.core import OpenIDCode
from authlib.oidc.core.util import create_half_hash
from flask import request as flask_request
from joserfc import jwt

from broker.accounts import AccountDirectory
from broker.session import HubLogin

from .agencies import AgencyClient, AgencyRegistry
from .claims import claims_for_scope
from .keys import KeyRing
from .pairwise import PairwiseSubjects
from .tokens import AuthorizationCode, TokenStore


@dataclass
class ProviderServices:
    issuer: str
    agencies: AgencyRegistry
    tokens: TokenStore
    accounts: AccountDirectory
    keys: KeyRing
    subjects: PairwiseSubjects
    id_token_lifetime: int

    def subject_for(self, client: AgencyClient, account_id: str) -> str:
        return self.subjects.subject(client.sector_identifier, account_id)

    def user_claims(self, client: AgencyClient, account_id: str, scope: str) -> dict[str, Any]:
        claims = claims_for_scope(self.accounts.attributes(account_id), scope)
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
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

    @property
    def hub(self) -> ProviderServices:
        return self.server.hub  # type: ignore[no-any-return]

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

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        login: HubLogin = request.user
        data = request.payload.data
        nonce = data.get("nonce")
        self.hub.tokens.save_code(code, {
            "client_id": request.client.client_id,
            "redirect_uri": request.payload.redirect_uri,
            "scope": request.scope,
            "nonce": nonce,
            "code_challenge": data["code_challenge"],
            "code_challenge_method": data["code_challenge_method"],
            "account_id": login.account_id,
            "auth_time": login.auth_time,
            "acr": login.acr,
            "amr": list(login.amr),
            "sid": login.sid,
        })
        if nonce:
            self.hub.tokens.remember_nonce(request.client.client_id, nonce,
                                           self.hub.tokens.code_lifetime)

    def query_authorization_code(self, code: str, client: AgencyClient
                                 ) -> AuthorizationCode | None:
        record = self.hub.tokens.take_code(code)
        if record is None or record.client_id != client.client_id:
            return None
        return record

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        """Nothing to do: the code was taken atomically when it was queried."""

    def authenticate_user(self, authorization_code: AuthorizationCode) -> HubLogin | None:
        if not self.hub.accounts.exists(authorization_code.account_id):
            return None
        return HubLogin(account_id=authorization_code.account_id,
                        auth_time=authorization_code.auth_time, acr=authorization_code.acr,
                        amr=authorization_code.amr, upstream_id="", sid=authorization_code.sid)

    def generate_token(self, user: HubLogin, scope: str, grant_type: str | None = None,
                       expires_in: int | None = None,
                       include_refresh_token: bool = True) -> dict[str, Any]:
        code: AuthorizationCode = self.request.authorization_code
        token = self.hub.tokens.issue_access_token(
            client_id=self.request.client.client_id, account_id=user.account_id, scope=scope,
            code_hash=code.code_hash,
        )
        return {"token_type": "Bearer", "access_token": token,
                "expires_in": self.hub.tokens.access_token_lifetime, "scope": scope}


class HubOpenIDCode(OpenIDCode):
    def __init__(self, hub: ProviderServices) -> None:
        super().__init__(require_nonce=False)
        self.hub = hub

    def exists_nonce(self, nonce: str, request: OAuth2Request) -> bool:
        return self.hub.tokens.nonce_seen(request.payload.client_id, nonce)

    def encode_id_token(self, token: dict[str, Any], request: OAuth2Request) -> str:
        client: AgencyClient = request.client
        code: AuthorizationCode = request.authorization_code
        key = self.hub.keys.signing_key(client.id_token_signed_response_alg)
        now = int(time.time())
        claims: dict[str, Any] = self.hub.user_claims(client, code.account_id, token["scope"])
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
        header = {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
        return jwt.encode(header, claims, key.key, algorithms=[key.alg])


class HubIssuerParameter(IssuerParameter):
    def __init__(self, issuer: str) -> None:
        self.issuer = issuer

    def get_issuer(self) -> str:
        return self.issuer


class HubAuthorizationServer(AuthorizationServer):
    def __init__(self, hub: ProviderServices) -> None:
        super().__init__()
        self.hub = hub
        self._query_client = hub.agencies.client
        self._save_token = lambda token, request: None  # tokens are stored as they are minted
        self.register_grant(CodeGrant, [S256Challenge(required=True), HubOpenIDCode(hub)])
        self.register_extension(HubIssuerParameter(hub.issuer))
        self.scopes_supported = ["openid", "profile", "email"]

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        if isinstance(request, OAuth2Request):
            return request
        return FlaskOAuth2Request(flask_request)
