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


def variants(client, token: str) -> dict[str, str]:
    """Forged versions of a real token of the hub."""
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
        "oversized": token + "A" * 20000,
    }


@pytest.mark.parametrize("kind", ["alg-none", "hs256-with-public-key", "jwk-header",
                                  "jku-header", "x5u-header", "oversized"])
def test_rfc8725_forged_access_tokens_refused_at_userinfo_and_introspection(client, tokens,
                                                                             kind):
    forged = variants(client, tokens["access_token"])[kind]
    r = client.get("/userinfo", headers={"Authorization": f"Bearer {forged}"})
    assert r.status_code == 401 and r.json["error"] == "invalid_token"


@pytest.mark.parametrize("kind", ["alg-none", "hs256-with-public-key", "jwk-header",
                                  "jku-header", "oversized"])
def test_rfc8725_forged_id_token_hints_refused(client, tokens, kind):
    forged = variants(client, tokens["id_token"])[kind]
    params = query(client.get(AuthRequest(extra={"id_token_hint": forged}).url())
                   .headers["Location"])
    assert params["error"] == "invalid_request"
    r = client.get("/logout/end-session", query_string={"id_token_hint": forged})
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
    r = plain.test_client().get("/login", headers={"X-Forwarded-Host": "evil.example",
                                                   "X-Forwarded-Proto": "https"})
    assert "evil.example" not in r.headers["Location"]
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
