"""Attack checks on every JWT the hub verifies and on its pages (RFC 9700, RFC 8725,
OWASP ASVS 5.0 V10/V3)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from jose import jwt as jose_jwt

from tests.flows import AuthRequest, full_login, query, redeem


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, key: bytes = b"") -> str:
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    if header.get("alg") == "none":
        return signing_input + "."
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(sig)


@pytest.fixture
def tokens(client):
    auth = AuthRequest()
    params = full_login(client, auth)
    return redeem(client, auth, params["code"]).json


def oversized(hub, token: str, length: int) -> str:
    """``token`` signed again with the hub's own key, its claims padded to at least
    ``length`` characters: valid in every way but its size, so only a size limit refuses it."""
    header = jose_jwt.get_unverified_header(token)
    claims = jose_jwt.get_unverified_claims(token)
    key = hub.keys.signing_key(header["alg"])
    assert key.kid == header["kid"]
    header = {k: header[k] for k in ("alg", "kid", "typ") if k in header}
    unpadded = len(key.sign_jwt(header, claims))
    padded = key.sign_jwt(header, {**claims, "pad": "x" * ((length - unpadded) * 3 // 4 + 8)})
    assert length <= len(padded) < length + 64
    return padded


def variants(client, token: str) -> dict[str, str]:
    """Forged versions of a real token of the hub ("oversized": see :func:`oversized`)."""
    header = jose_jwt.get_unverified_header(token)
    claims = jose_jwt.get_unverified_claims(token)
    jwks = client.get("/jwks").json
    public = json.dumps(jwks["keys"][0]).encode()
    return {
        "alg-none": forge({**header, "alg": "none"}, claims),
        "hs256-with-public-key": forge({**header, "alg": "HS256"}, claims, public),
        "jwk-header": forge({**header, "alg": "HS256", "jwk": {"kty": "oct", "k": b64(b"k")}},
                            claims, b"k"),
        "jku-header": forge({**header, "alg": "HS256", "jku": "https://evil.example/jwks"},
                            claims, b"k"),
        "x5u-header": forge({**header, "alg": "HS256", "x5u": "https://evil.example/x5"},
                            claims, b"k"),
    }


@pytest.mark.parametrize("kind", ["alg-none", "hs256-with-public-key", "jwk-header",
                                  "jku-header", "x5u-header", "oversized"])
def test_rfc8725_forged_access_tokens_refused_at_userinfo_and_introspection(client, hub,
                                                                             tokens, kind):
    if kind == "oversized":  # over AccessTokens.verify's limit of 8192
        forged = oversized(hub, tokens["access_token"], 8193)
    else:
        forged = variants(client, tokens["access_token"])[kind]
    r = client.get("/userinfo", headers={"Authorization": f"Bearer {forged}"})
    assert r.status_code == 401 and r.json["error"] == "invalid_token"


@pytest.mark.parametrize("kind", ["alg-none", "hs256-with-public-key", "jwk-header",
                                  "jku-header", "oversized"])
def test_rfc8725_forged_id_token_hints_refused(client, hub, tokens, kind):
    if kind == "oversized":
        # over the hub's hint limit (16384) at /authorize; at end-session over the logout's
        # own limit (8192) but under the hub's, so each limit alone refuses its hint
        forged = oversized(hub, tokens["id_token"], 16385)
        forged_logout = oversized(hub, tokens["id_token"], 8193)
    else:
        forged = forged_logout = variants(client, tokens["id_token"])[kind]
    params = query(client.get(AuthRequest(extra={"id_token_hint": forged}).url())
                   .headers["Location"])
    assert params["error"] == "invalid_request"
    r = client.get("/logout/end-session", query_string={"id_token_hint": forged_logout})
    assert r.status_code == 400 and "Location" not in r.headers


def test_no_cors_on_the_authorization_and_token_endpoints(client):
    origin = {"Origin": "https://evil.example"}
    r = client.get(AuthRequest().url(), headers=origin)
    assert "Access-Control-Allow-Origin" not in r.headers
    r = client.post("/token", headers=origin, data={"grant_type": "authorization_code"})
    assert "Access-Control-Allow-Origin" not in r.headers


@pytest.mark.parametrize("path", ["/login", "/account", "/signed-out", "/nope",
                                  "/.well-known/openid-configuration"])
def test_every_response_refuses_framing(client, path):
    r = client.get(path)
    assert r.headers["X-Frame-Options"] == "DENY"
    if r.mimetype == "text/html":
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]


def test_forwarded_headers_ignored_unless_configured(make_hub):
    plain = make_hub()
    seen_plain = {}

    @plain.get("/_probe")
    def plain_probe():  # pragma: no cover - trivial
        from flask import request

        seen_plain.update(addr=request.remote_addr, scheme=request.scheme, host=request.host)
        return "ok"

    plain.test_client().get("/_probe", headers={"X-Forwarded-Host": "evil.example",
                                                "X-Forwarded-Proto": "https",
                                                "X-Forwarded-For": "203.0.113.9"})
    assert seen_plain["addr"] == "127.0.0.1" and seen_plain["scheme"] == "http"
    assert seen_plain["host"] != "evil.example"
    proxied = make_hub(trusted_proxy_hops=1)
    client = proxied.test_client()
    seen = {}

    @proxied.get("/_probe")
    def probe():  # pragma: no cover - trivial
        from flask import request

        seen.update(addr=request.remote_addr, scheme=request.scheme)
        return "ok"

    client.get("/_probe", headers={"X-Forwarded-Proto": "https",
                                   "X-Forwarded-For": "203.0.113.9"})
    assert seen == {"addr": "203.0.113.9", "scheme": "https"}
