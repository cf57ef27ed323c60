"""Scenario F of bench/run.py: the least a client_credentials token endpoint can do in Python.

Not the hub and not part of it: a yardstick. It answers the request of scenario 1 (RFC 6749
4.4, client_secret_basic) with what every Python implementation must do at the least: check the
client's secret (a stored SHA-256, compared in constant time), parse the form, sign an RFC 9068
access token with ES256 (the key made at start-up, the header encoded once), keep the token in
Redis for introspection and revocation (one SET with expiry, as the hub does), and answer JSON.
No framework (bare WSGI), no OAuth library, no metrics, no logs, no rate limits, no database.

Run by bench/run.py under the hub's server (gunicorn gthread, the same workers and threads)
and, when it is installed, under granian; what it reaches there is the ceiling of the token
endpoint for Python on this machine, to read beside the peer (bench/README.md, "Floor").

Settings come from the environment: FLOOR_CLIENT_ID, FLOOR_CLIENT_SECRET, FLOOR_REDIS_URL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from urllib.parse import parse_qs

import redis
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

ISSUER = "http://127.0.0.1"
LIFETIME = 300
_KEY = ec.generate_private_key(ec.SECP256R1())
_ALG = ec.ECDSA(hashes.SHA256())


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


_HEADER = _b64(json.dumps({"alg": "ES256", "typ": "at+jwt", "kid": "floor"}).encode())
_CLIENTS = {os.environ.get("FLOOR_CLIENT_ID", "agency-one"):
            hashlib.sha256(os.environ.get("FLOOR_CLIENT_SECRET", "").encode()).digest()}
_REDIS = redis.Redis.from_url(os.environ.get("FLOOR_REDIS_URL", "redis://127.0.0.1:6379/0"))
_JSON = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]


def _error(start_response, status: str, code: str):
    start_response(status, _JSON)
    return [json.dumps({"error": code}).encode()]


def _client(header: str) -> str | None:
    if not header.startswith("Basic "):
        return None
    try:
        client_id, _, secret = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except ValueError:
        return None
    want = _CLIENTS.get(client_id)
    if want is None or not hmac.compare_digest(want, hashlib.sha256(secret.encode()).digest()):
        return None
    return client_id


def app(environ, start_response):
    if environ.get("REQUEST_METHOD") != "POST":
        return _error(start_response, "405 Method Not Allowed", "invalid_request")
    client_id = _client(environ.get("HTTP_AUTHORIZATION", ""))
    if client_id is None:
        return _error(start_response, "401 Unauthorized", "invalid_client")
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return _error(start_response, "400 Bad Request", "invalid_request")
    form = parse_qs(environ["wsgi.input"].read(length).decode("utf-8", "replace"))
    if form.get("grant_type") != ["client_credentials"]:
        return _error(start_response, "400 Bad Request", "unsupported_grant_type")
    now = int(time.time())
    jti = secrets.token_urlsafe(16)
    claims = {"iss": ISSUER, "sub": client_id, "aud": ISSUER, "client_id": client_id,
              "iat": now, "exp": now + LIFETIME, "jti": jti,
              "scope": form.get("scope", [""])[0]}
    signing_input = _HEADER + b"." + _b64(json.dumps(claims, separators=(",", ":")).encode())
    r, s = decode_dss_signature(_KEY.sign(signing_input, _ALG))
    token = signing_input + b"." + _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    _REDIS.set("floor:at:" + jti, client_id, ex=LIFETIME)
    body = json.dumps({"access_token": token.decode(), "token_type": "Bearer",
                       "expires_in": LIFETIME, "scope": claims["scope"]}).encode()
    start_response("200 OK", [*_JSON, ("Content-Length", str(len(body)))])
    return [body]
