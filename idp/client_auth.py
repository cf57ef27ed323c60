"""``private_key_jwt`` client authentication (RFC 7523 section 3, OpenID Connect Core 9).

The agency signs a short-lived JWT with its private key and sends it as ``client_assertion``;
the hub verifies it with the public keys the agency registered, inline (``jwks``) or published
at its ``jwks_uri``. Authlib's :class:`JWTBearerClientAssertion` drives the flow; this module
supplies what it leaves to the server:

- the key, chosen by ``kid`` among the agency's registered keys only (never from the token's
  own ``jwk``, ``jku`` or ``x5u`` header), for an algorithm on the allow-list
  (RS256, PS256, ES256: never ``none`` or HS*, so a client secret cannot sign an assertion);
- the claims: ``iss`` = ``sub`` = client_id; ``aud`` the token endpoint or the issuer;
  ``exp`` in the future and at most 10 minutes ahead; ``iat``/``nbf`` not in the future
  (60 s clock skew); ``jti`` present and single use;
- the keys themselves come from :mod:`idp.agency_keys` (inline, or a fenced and cached fetch
  of ``jwks_uri``). Any failure is ``invalid_client``, never a server error.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, unquote_plus

from authlib.oauth2.rfc6749.errors import InvalidClientError, InvalidRequestError
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey

from .agencies import AgencyClient
from .agency_keys import ASSERTION_ALGS, AgencyKeys, JWKSUnavailable
from .tokens import TokenStore, decode_jwt

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LENGTH = 8192


def _fits(key: RSAKey | ECKey, alg: str) -> bool:
    wanted = "EC" if alg == "ES256" else "RSA"
    return key.key_type == wanted and key.get("alg") in (None, alg)


def pick_key(keys: KeySet, kid: object, alg: str) -> RSAKey | ECKey | None:
    """The registered key named by ``kid`` that fits ``alg``; without a kid, the only one."""
    fitting = [k for k in keys if isinstance(k, RSAKey | ECKey) and _fits(k, alg)]
    if kid is None:
        return fitting[0] if len(fitting) == 1 else None
    return next((k for k in fitting if k.kid == kid), None)


# -- HTTP Basic -----------------------------------------------------------------------------

#: why Basic credentials that cannot be read are refused
MALFORMED_BASIC = ("The HTTP Basic credentials cannot be read: they must be the base64 of "
                   "client_id:client_secret in UTF-8 (RFC 7617 section 2, RFC 6749 2.3.1).")


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """The client id and secret of an HTTP Basic ``Authorization`` header, each unquoted as
    Authlib does (form-urlencoded first, RFC 6749 2.3.1); see :func:`_raw_basic_credentials`."""
    raw = _raw_basic_credentials(header)
    return None if raw is None else (unquote(raw[0]), unquote(raw[1]))


def _raw_basic_credentials(header: str | None) -> tuple[str, str] | None:
    """The client id and secret of an HTTP Basic ``Authorization`` header (strict base64,
    then UTF-8), as sent (still form-urlencoded, RFC 6749 2.3.1); None when the header is
    absent or of another scheme. Credentials that cannot be read (not base64, not UTF-8, no
    colon, none at all) are a client that tried to authenticate with the header and failed:
    invalid_client, 401, with ``WWW-Authenticate: Basic`` (RFC 6749 5.2)."""
    if not header:
        return None
    parts = header.split(None, 1)
    if not parts or parts[0].lower() != "basic":
        return None
    try:
        if len(parts) != 2:
            raise ValueError("no credentials")
        # binascii.Error and UnicodeError are ValueErrors
        decoded = base64.b64decode(parts[1].strip().encode("ascii"), validate=True
                                   ).decode("utf-8")
    except ValueError:
        raise InvalidClientError(status_code=401, description=MALFORMED_BASIC) from None
    client_id, colon, secret = decoded.partition(":")
    if not colon:
        raise InvalidClientError(status_code=401, description=MALFORMED_BASIC)
    return client_id, secret


def client_secret_basic(query_client: Callable[[str], AgencyClient | None],
                        request: Any) -> AgencyClient | None:
    """Authlib's ``client_secret_basic`` (RFC 6749 2.3.1), registered on the hub's server
    in its place: Authlib's reading of the header lets a malformed one raise (UnicodeError,
    ValueError: a server error); here it is invalid_client (:func:`basic_credentials`)."""
    raw = _raw_basic_credentials(request.headers.get("Authorization"))
    if raw is None:
        return None
    client_id, secret = unquote(raw[0]), unquote(raw[1])
    if not (client_id and secret):
        return None  # as Authlib: not authenticated by this method
    client = query_client(client_id)
    if client is None:
        raise InvalidClientError(status_code=401,
                                 description="The client does not exist on this server.")
    if client.check_client_secret(secret):
        return client
    # RFC 6749 2.3.1: the secret is application/x-www-form-urlencoded, where a space is '+'
    # (openid-client sends it so); ``unquote`` above keeps a '+' as itself, for the clients
    # that send the secret unencoded (curl -u). Both are readings of what the client sent.
    spaced = unquote_plus(raw[1])
    return client if spaced != secret and client.check_client_secret(spaced) else None


# -- the assertion --------------------------------------------------------------------------

class PrivateKeyJWT(JWTBearerClientAssertion):  # type: ignore[misc]
    """Authlib's RFC 7523 client assertion with the hub's keys, claims and replay store."""

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, *, issuer: str, tokens: TokenStore, keys: AgencyKeys,
                 leeway: int = 60, max_lifetime: int = 600) -> None:
        super().__init__(validate_jti=True, leeway=leeway)
        self.issuer = issuer
        self.tokens = tokens
        self.keys = keys
        #: assertions valid for longer than this are refused (exp - now)
        self.max_lifetime = max_lifetime

    def __call__(self, query_client: Any, request: Any) -> AgencyClient | None:
        form = request.form
        if not (form.get("client_assertion_type") == ASSERTION_TYPE
                and form.get("client_assertion")):
            return None
        if request.headers.get("Authorization") or "client_secret" in form:
            # RFC 6749 2.3: a client MUST NOT use more than one authentication method.
            raise InvalidRequestError("Use one client authentication method, not two.")
        if len(form["client_assertion"]) > MAX_ASSERTION_LENGTH:
            raise InvalidClientError(description="The client assertion is too long.")
        client: AgencyClient | None = super().__call__(query_client, request)
        if client is not None and form.get("client_id", client.client_id) != client.client_id:
            raise InvalidClientError(description="client_id is not the assertion's subject.")
        return client

    def extract_assertion(self, assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Authlib's reading of the header and claims, before any key is known (for
        ``sub``), with a payload nested deeper than Python's JSON parser goes
        (RecursionError) refused as the invalid payload it is."""
        try:
            return super().extract_assertion(assertion)  # type: ignore[no-any-return]
        except RecursionError:
            raise InvalidClientError(description="Invalid JWT payload.") from None

    def get_audiences(self) -> list[str]:
        """RFC 7523 3 item 3 and OpenID Connect Core 9: the token endpoint or the issuer."""
        return [f"{self.issuer}/token", self.issuer]

    def resolve_client_public_key(self, client: AgencyClient) -> Callable[[Any], Any]:
        if client.token_endpoint_auth_method != self.CLIENT_AUTH_METHOD:
            raise InvalidClientError(
                description="The client is not registered for private_key_jwt.")
        keys = self._keys(client)

        def resolve(token: Any) -> RSAKey | ECKey:
            header = token.headers()
            kid, alg = header.get("kid"), str(header["alg"])
            key = pick_key(keys, kid, alg)
            if key is None and client.jwks_uri is not None:
                key = pick_key(self._keys(client, refresh=True), kid, alg)  # rotated?
            if key is None:
                raise InvalidClientError(
                    description="No registered key of the client matches the assertion's "
                                "kid and alg.")
            return key

        return resolve

    def _keys(self, client: AgencyClient, *, refresh: bool = False) -> KeySet:
        try:
            return self.keys.keys_for(client, refresh=refresh)
        except JWKSUnavailable as exc:
            log.warning("agency %s cannot use private_key_jwt: %s", client.client_id, exc)
            raise InvalidClientError(
                description="The client's public keys could not be obtained.") from exc

    def process_assertion_claims(self, assertion: str, resolve_key: Any) -> dict[str, Any]:
        try:
            token = decode_jwt(assertion, resolve_key, algorithms=ASSERTION_ALGS)
        except JoseError as exc:
            log.info("client assertion refused: %r", exc)
            raise InvalidClientError(
                description="The client assertion's algorithm or signature is not "
                            f"accepted (allowed: {', '.join(ASSERTION_ALGS)}).") from exc
        self.verify_claims(token.claims)
        return token.claims

    def verify_claims(self, claims: Any) -> None:
        """RFC 7523 3, items 1 to 7, with the hub's bounds on time."""

        def refuse(why: str) -> InvalidClientError:
            return InvalidClientError(description=f"Client assertion: {why}.")

        now = time.time()
        if not isinstance(claims.get("iss"), str) or claims.get("iss") != claims.get("sub"):
            raise refuse("iss and sub must both be the client_id")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud
        if (not isinstance(auds, list) or not auds
                or not all(isinstance(a, str) and a in self.get_audiences() for a in auds)):
            raise refuse(f"aud must be {self.issuer}/token or {self.issuer}")
        exp = claims.get("exp")
        if not _number(exp):
            raise refuse("exp is required")
        if exp <= now - self.leeway:
            raise refuse("it has expired")
        if exp > now + self.max_lifetime + self.leeway:
            raise refuse(f"exp is more than {self.max_lifetime // 60} minutes ahead")
        for name in ("iat", "nbf"):
            value = claims.get(name)
            if value is not None and (not _number(value) or value > now + self.leeway):
                raise refuse(f"{name} is in the future")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise refuse("jti is required")
        if not self.validate_jti(claims, jti):
            raise refuse("this jti was used before")

    def validate_jti(self, claims: Any, jti: str) -> bool:
        ttl = int(claims["exp"] - time.time()) + self.leeway + 1
        return self.tokens.use_jti(str(claims["sub"]), jti, ttl)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
