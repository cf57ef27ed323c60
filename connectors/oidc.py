"""Redirect-style connector for an upstream OpenID Provider.

OpenID Connect Core 1.0 section 3.1 (authorization code flow) with PKCE (RFC 7636, S256),
``state`` and ``nonce``; RFC 9207 ``iss`` checked on the callback; ID token validation per
OpenID Connect Core 3.1.3.7: exact issuer, audience (and ``azp``), signature against the
upstream's published JWKS with an algorithm allow-list (never ``none``, never a key named by
the token itself), ``exp``/``iat`` and ``nonce``. The userinfo ``sub`` must equal the ID token
``sub`` (Core 5.3.2). Every HTTP call has a timeout and a size cap.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlencode

import requests
import urllib3
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jws import extract_compact
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import ConnectionPool
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, ReadTimeoutError
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from kernel.bounded import BodyTooLarge, BodyTooSlow, read_bounded

from .base import (
    Bulkhead,
    PendingLogin,
    UpstreamIdentity,
    UpstreamRejected,
    UpstreamResponseInvalid,
    UpstreamUnavailable,
    busy_message,
)

#: claims taken from the upstream into the constituent account (OpenID Connect Core 5.1)
STANDARD_CLAIMS = (
    "name", "given_name", "family_name", "middle_name", "nickname", "preferred_username",
    "email", "email_verified", "phone_number", "phone_number_verified", "birthdate",
    "locale", "zoneinfo", "address",
)
MAX_RESPONSE_BYTES = 512 * 1024
CLOCK_LEEWAY_SECONDS = 60
METADATA_TTL_SECONDS = 3600
JWKS_REFRESH_MIN_SECONDS = 60


@dataclass(frozen=True)
class OIDCConfig:
    id: str
    display_name: str
    issuer: str
    client_id: str
    client_secret: str = field(repr=False)
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    acr: str = "urn:civitas:acr:ial1:aal1"
    id_token_algs: tuple[str, ...] = ("RS256", "ES256", "PS256")
    timeout_seconds: float = 5.0
    require_iss_parameter: bool = False
    #: logins through this upstream at once in one worker process (:class:`Bulkhead`)
    max_concurrent_calls: int = 2


class _RetryClosed(Retry):
    """A retry of a connection the upstream had closed, never of a timeout: the upstream
    had its ``timeout_seconds``, and a second wait would hold the login (and a worker
    thread) twice that long."""

    def increment(self, method: str | None = None, url: str | None = None,
                  response: BaseHTTPResponse | None = None, error: Exception | None = None,
                  _pool: ConnectionPool | None = None,
                  _stacktrace: TracebackType | None = None) -> Self:
        if isinstance(error, ReadTimeoutError | ConnectTimeoutError):
            raise MaxRetryError(_pool, url, error) from error  # type: ignore[arg-type]
        return super().increment(method, url, response, error, _pool, _stacktrace)


def _session() -> requests.Session:
    """A pooled session; an idempotent GET is retried once on a stale pooled connection."""
    session = requests.Session()
    retry = _RetryClosed(total=1, connect=1, read=1, status=0,
                         allowed_methods=frozenset({"GET"}), raise_on_status=False)
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


class OIDCConnector:
    """One upstream OpenID Provider."""

    def __init__(self, config: OIDCConfig, *, http: requests.Session | None = None) -> None:
        self.config = config
        self.id = config.id
        self.display_name = config.display_name
        self.acr = config.acr
        self._http = http or _session()
        self._lock = threading.Lock()
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._jwks: KeySet | None = None
        self._jwks_at = 0.0
        self._bulkhead = Bulkhead(config.max_concurrent_calls)

    # -- HTTP -----------------------------------------------------------------------------

    def _fetch_json(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        unreachable = (f"The sign-in service {self.display_name} could not be reached. "
                       "Please try again later.")
        # the whole answer within the timeout (plus at most one read's wait: read_bounded),
        # not only each wait for more bytes
        deadline = time.monotonic() + self.config.timeout_seconds
        try:
            with self._http.request(
                method, url, timeout=self.config.timeout_seconds, stream=True,
                allow_redirects=False, **kwargs,
            ) as resp:
                body = read_bounded(resp.raw, max_bytes=MAX_RESPONSE_BYTES, deadline=deadline)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise UpstreamUnavailable(unreachable, detail=f"{method} {url}: "
                                      f"{type(exc).__name__}") from exc
        except BodyTooSlow:
            raise UpstreamUnavailable(unreachable, detail=f"{method} {url}: the answer was "
                                      "still arriving after the timeout") from None
        except BodyTooLarge:
            raise UpstreamResponseInvalid(detail=f"{method} {url}: the answer is larger than "
                                          f"{MAX_RESPONSE_BYTES} bytes") from None
        try:
            return resp.status_code, json.loads(body)
        except ValueError as exc:
            if resp.status_code >= 500:
                raise UpstreamUnavailable(
                    detail=f"{method} {url}: status {resp.status_code}") from exc
            raise UpstreamResponseInvalid(
                detail=f"{method} {url}: status {resp.status_code}, not JSON") from exc

    def metadata(self, *, refresh: bool = False) -> dict[str, Any]:
        """OpenID Connect Discovery 1.0 section 4, cached unless ``refresh``; issuer must
        match exactly (4.3)."""
        with self._lock:
            fresh = time.monotonic() - self._metadata_at < METADATA_TTL_SECONDS
            if self._metadata and fresh and not refresh:
                return self._metadata
        url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        status, doc = self._fetch_json("GET", url)
        if status != 200 or not isinstance(doc, dict):
            raise UpstreamUnavailable(detail=f"discovery {url}: status {status}")
        if doc.get("issuer") != self.config.issuer:
            raise UpstreamResponseInvalid(
                detail="discovery names another issuer than the configured one "
                       "(OpenID Connect Discovery 1.0 section 4.3)")
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(doc.get(key), str):
                raise UpstreamResponseInvalid(detail=f"discovery has no {key}")
        with self._lock:
            self._metadata, self._metadata_at = doc, time.monotonic()
        return doc

    def _keyset(self, *, refresh: bool = False) -> KeySet:
        with self._lock:
            fresh_enough = time.monotonic() - self._jwks_at < JWKS_REFRESH_MIN_SECONDS
            if self._jwks is not None and (not refresh or fresh_enough):
                return self._jwks
        status, doc = self._fetch_json("GET", self.metadata()["jwks_uri"])
        if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise UpstreamUnavailable(detail=f"jwks_uri: status {status}, or no key list")
        # Only public keys usable for signatures; anything else is ignored.
        keys = [k for k in doc["keys"] if isinstance(k, dict) and k.get("use", "sig") == "sig"
                and "d" not in k]
        try:
            keyset = KeySet.import_key_set({"keys": keys})
        except (JoseError, ValueError, TypeError) as exc:
            raise UpstreamResponseInvalid(detail="jwks_uri: a key cannot be read") from exc
        with self._lock:
            self._jwks, self._jwks_at = keyset, time.monotonic()
        return keyset

    # -- the redirect protocol ---------------------------------------------------------

    def probe(self) -> None:
        with self._bulkhead.call(busy_message(self.display_name)):
            self.metadata(refresh=True)

    def begin(self, redirect_uri: str, *, reauthenticate: bool = False,
              max_age: int | None = None, login_hint: str | None = None,
              ui_locales: str | None = None) -> tuple[str, PendingLogin]:
        with self._bulkhead.call(busy_message(self.display_name)):
            meta = self.metadata()
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(48)
        params = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(self.config.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": create_s256_code_challenge(verifier),
            "code_challenge_method": "S256",
        }
        # what the agency asked of the hub, asked of the upstream in turn: its own session
        # would otherwise answer for a sign-in it did not redo (OpenID Connect Core 3.1.2.1)
        if reauthenticate:
            params["prompt"] = "login"
        if max_age is not None:
            params["max_age"] = str(max_age)
        if login_hint:
            params["login_hint"] = login_hint
        if ui_locales:
            params["ui_locales"] = ui_locales
        sep = "&" if "?" in meta["authorization_endpoint"] else "?"
        url = meta["authorization_endpoint"] + sep + urlencode(params)
        return url, PendingLogin(state=state, data={"nonce": nonce, "verifier": verifier,
                                                    "max_age": max_age})

    def complete(
        self, params: Mapping[str, str], pending: PendingLogin, redirect_uri: str
    ) -> UpstreamIdentity:
        # the broker has used up the login's state by now: a refused callback starts over
        with self._bulkhead.call(busy_message(
                self.display_name, "Please wait a minute, then go back to the site you were "
                "using and sign in again.")):
            return self._complete(params, pending, redirect_uri)

    def _complete(
        self, params: Mapping[str, str], pending: PendingLogin, redirect_uri: str
    ) -> UpstreamIdentity:
        meta = self.metadata()
        if not hmac.compare_digest(str(params.get("state", "")), pending.state):
            raise UpstreamResponseInvalid(detail="the callback's state is not the login's")
        self._check_iss_parameter(params, meta)
        if params.get("error"):
            if params["error"] == "access_denied":
                raise UpstreamRejected("Sign-in was cancelled or refused at "
                                       f"{self.display_name}.")
            raise UpstreamRejected(detail="the authorization response is an error")
        code = params.get("code")
        if not code:
            raise UpstreamResponseInvalid(detail="the callback has no code")
        tokens = self._redeem(meta, code, redirect_uri, str(pending.data["verifier"]))
        claims = self._validate_id_token(tokens.get("id_token"), str(pending.data["nonce"]))
        attributes = {k: claims[k] for k in STANDARD_CLAIMS if k in claims}
        access_token = tokens.get("access_token")
        if meta.get("userinfo_endpoint") and isinstance(access_token, str):
            attributes.update(self._userinfo(meta["userinfo_endpoint"], access_token,
                                             claims["sub"]))
        amr = claims.get("amr")
        auth_time = claims.get("auth_time")
        if not isinstance(auth_time, int | float) or isinstance(auth_time, bool):
            if pending.data.get("max_age") is not None:  # Core 2: then it is REQUIRED
                raise UpstreamResponseInvalid(
                    detail="the ID token has no auth_time, though max_age was sent "
                           "(OpenID Connect Core 2)")
            auth_time = None
        return UpstreamIdentity(
            connector_id=self.id,
            subject=claims["sub"],
            attributes=attributes,
            acr=self.config.acr,
            amr=tuple(a for a in amr if isinstance(a, str)) if isinstance(amr, list) else (),
            connector_data={"upstream_acr": claims.get("acr"), "sid": claims.get("sid")},
            auth_time=int(auth_time) if auth_time is not None else None,
        )

    def _check_iss_parameter(self, params: Mapping[str, str], meta: Mapping[str, Any]) -> None:
        """RFC 9207 section 2.4: compare ``iss`` exactly; demand it when announced."""
        iss = params.get("iss")
        announced = meta.get("authorization_response_iss_parameter_supported") is True
        if iss is None:
            if announced or self.config.require_iss_parameter:
                raise UpstreamResponseInvalid(
                    detail="the callback has no iss parameter (RFC 9207 section 2.4)")
            return
        if iss != self.config.issuer:
            raise UpstreamResponseInvalid(
                detail="the callback's iss parameter is not the issuer (RFC 9207 section 2.4)")

    def _redeem(self, meta: Mapping[str, Any], code: str, redirect_uri: str,
                verifier: str) -> dict[str, Any]:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        methods = meta.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        auth: tuple[str, str] | None = None
        if "client_secret_basic" in methods:
            # RFC 6749 2.3.1: form-encode the id and secret before Basic encoding
            auth = (quote(self.config.client_id, safe=""),
                    quote(self.config.client_secret, safe=""))
        else:
            form.update(client_id=self.config.client_id, client_secret=self.config.client_secret)
        status, body = self._fetch_json(
            "POST", meta["token_endpoint"], data=form, auth=auth,
            headers={"Accept": "application/json"},
        )
        if status >= 500:
            raise UpstreamUnavailable(detail=f"token endpoint: status {status}")
        if status != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            raise UpstreamRejected(detail=f"token endpoint: status {status}, "
                                          f"error {str(error)[:64]!r}")
        if str(body.get("token_type", "")).lower() != "bearer":
            raise UpstreamResponseInvalid(detail="token endpoint: token_type is not Bearer")
        return body

    def _validate_id_token(self, id_token: Any, nonce: str) -> dict[str, Any]:
        """OpenID Connect Core 3.1.3.7: each step of the ID token's validation, in order;
        the first that fails is named in the log."""
        if not isinstance(id_token, str) or id_token.count(".") != 2:
            raise UpstreamResponseInvalid(detail="no ID token, or not a compact JWS")
        algs = list(self.config.id_token_algs)
        try:
            alg = extract_compact(id_token.encode()).protected.get("alg")
        except (JoseError, ValueError, TypeError) as exc:
            raise UpstreamResponseInvalid(detail="the ID token's header cannot be read") from exc
        if alg not in algs:
            # 3.1.3.7 step 7: before any key is looked at, so "none" never refetches keys
            raise UpstreamResponseInvalid(
                detail=f"the ID token's alg {str(alg)[:16]!r} is not one of {algs}")
        try:
            token = jwt.decode(id_token, self._keyset(), algorithms=algs)
        except JoseError:
            # The upstream may have rotated keys: refetch once (rate-limited) and retry.
            try:
                token = jwt.decode(id_token, self._keyset(refresh=True), algorithms=algs)
            except JoseError as exc:
                raise UpstreamResponseInvalid(
                    detail="the ID token's signature does not verify with the upstream's "
                           "keys (OpenID Connect Core 3.1.3.7 step 6)") from exc
        claims = token.claims
        now = time.time()
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        steps = (
            (claims.get("iss") == self.config.issuer, "iss is not the issuer", "3.1.3.7 step 2"),
            (self.config.client_id in auds, "aud does not name this hub", "3.1.3.7 step 3"),
            (len(auds) == 1 or claims.get("azp") == self.config.client_id,
             "several audiences and azp is not this hub", "3.1.3.7 step 4"),
            ("azp" not in claims or claims.get("azp") == self.config.client_id,
             "azp is not this hub", "3.1.3.7 step 5"),
            (isinstance(claims.get("exp"), int | float)
             and claims["exp"] > now - CLOCK_LEEWAY_SECONDS,
             "expired, or no exp", "3.1.3.7 step 9"),
            (isinstance(claims.get("iat"), int | float)
             and claims["iat"] < now + CLOCK_LEEWAY_SECONDS,
             "issued in the future, or no iat", "3.1.3.7 step 10"),
            (isinstance(claims.get("nonce"), str)
             and hmac.compare_digest(claims["nonce"].encode(), nonce.encode()),
             "nonce is not the login's", "3.1.3.7 step 11"),
            # "MUST NOT exceed 255 ASCII characters in length": so no lone surrogate
            # either, which JSON can escape but no column holds
            (isinstance(claims.get("sub"), str) and 0 < len(claims["sub"]) <= 255
             and claims["sub"].isascii(),
             "sub is missing, longer than 255 characters or not ASCII", "2"),
        )
        for holds, failure, section in steps:
            if not holds:
                raise UpstreamResponseInvalid(
                    detail=f"the ID token's {failure} (OpenID Connect Core {section})")
        return dict(claims)

    def _userinfo(self, url: str, access_token: str, sub: str) -> dict[str, Any]:
        status, body = self._fetch_json(
            "GET", url, headers={"Authorization": f"Bearer {access_token}",
                                 "Accept": "application/json"},
        )
        if status != 200 or not isinstance(body, dict):
            raise UpstreamResponseInvalid(detail=f"userinfo: status {status}, or not an object")
        if body.get("sub") != sub:
            raise UpstreamResponseInvalid(
                detail="userinfo's sub is not the ID token's (OpenID Connect Core 5.3.2)")
        return {k: body[k] for k in STANDARD_CLAIMS if k in body}

