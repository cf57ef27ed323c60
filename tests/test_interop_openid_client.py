"""Interop: a relying party this project did not write (npm ``openid-client``, see
tests/interop/rp.mjs) drives a full flow against the hub over real HTTP: discovery, an
authorization code flow with PKCE, state and nonce, userinfo, refresh, introspection,
revocation and RP-initiated logout. The citizen's browser is a ``requests`` session that logs
in at the real upstream OP; it stops at the agency redirect URI (a fake host, never fetched)
and hands that URL to the library."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import KeySet

from civitas.app import create_app
from tests.conftest import HUB_ISSUER, HUB_PORT, hub_config
from tests.flows import AGENCY_ONE, AuthRequest, allow_over_http, query
from tests.servers import serve_wsgi, stop_serving

INTEROP_DIR = Path(__file__).parent / "interop"
RP_SCRIPT = INTEROP_DIR / "rp.mjs"
NODE_TIMEOUT = 30
POST_LOGOUT = "https://one.agency.example/bye"
SCOPE = "openid email profile offline_access"


@pytest.fixture(scope="module")
def hub_url(upstream_issuer: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The hub over real HTTP on HUB_PORT (the upstream only knows that callback)."""
    db = tmp_path_factory.mktemp("interop-hub") / "civitas.db"
    app = create_app(hub_config(upstream_issuer, f"sqlite:///{db}", agencies=[
        AGENCY_ONE.config(scopes=["openid", "profile", "email", "offline_access"],
                          post_logout_redirect_uris=[POST_LOGOUT])]))
    running = [serve_wsgi(app, HUB_PORT)]
    try:
        yield HUB_ISSUER
    finally:
        stop_serving(running)
        app.extensions["civitas"].db.dispose()


@pytest.fixture(scope="module")
def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.fail("node is not installed: run scripts/ensure-system-deps")
    if not (INTEROP_DIR / "node_modules" / "openid-client" / "package.json").is_file():
        pytest.fail(f"openid-client is not installed in {INTEROP_DIR}: "
                    "run scripts/ensure-node-deps")
    return path


def rp(node: str, step: str, **params: Any) -> dict[str, Any]:
    """One step of the openid-client relying party; fails with what the library rejected."""
    payload = {"issuer": HUB_ISSUER, "client_id": AGENCY_ONE.client_id,
               "client_secret": AGENCY_ONE.secret, **params}
    try:
        done = subprocess.run([node, str(RP_SCRIPT), step], input=json.dumps(payload),
                              capture_output=True, text=True, timeout=NODE_TIMEOUT,
                              cwd=INTEROP_DIR, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"openid-client step {step!r} took more than {NODE_TIMEOUT}s")
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        result = {}
    if done.returncode != 0 or "error" in result or not result:
        pytest.fail(f"openid-client step {step!r} failed (exit {done.returncode}): "
                    f"{json.dumps(result.get('error'), indent=2) if result else done.stdout}"
                    f"\nstderr: {done.stderr[-2000:]}")
    return result


def follow_to(browser: requests.Session, response: requests.Response, prefix: str) -> str:
    """Follow redirects until one points at ``prefix`` (an agency URL, never fetched). The
    consent page, if the hub shows it, is answered with Allow and every box ticked: offline
    access needs the citizen's consent (OpenID Connect Core 11)."""
    for _ in range(12):
        response = allow_over_http(browser, response)
        assert response.status_code in (302, 303), (response.status_code, response.text[:500])
        location = urljoin(response.url, response.headers["Location"])
        if location.startswith(prefix):
            return location
        response = browser.get(location, allow_redirects=False, timeout=10)
    raise AssertionError(f"never redirected to {prefix}")


def login(browser: requests.Session, authorization_url: str) -> str:
    """The citizen: the hub's upstream choice, the upstream's login form, back to the agency."""
    r = browser.get(authorization_url, timeout=10)
    assert r.status_code == 200, r.text[:500]
    link = re.search(r'href="(/login/op/start\?flow=[^"]+)"', r.text)
    assert link, r.text[:500]
    r = browser.get(urljoin(r.url, html.unescape(link.group(1))), timeout=10)
    action = re.search(r'<form[^>]*action="([^"]+)"', r.text)
    assert action, r.text[:500]
    r = browser.post(urljoin(r.url, html.unescape(action.group(1))),
                     data={"username": "alice", "password": "alice-password"},
                     allow_redirects=False, timeout=10)
    return follow_to(browser, r, AGENCY_ONE.redirect_uri)


def silent_authorize(browser: requests.Session, hub: str) -> dict[str, str]:
    auth = AuthRequest(extra={"prompt": "none"})
    r = browser.get(hub + auth.url(), allow_redirects=False, timeout=10)
    return query(follow_to(browser, r, AGENCY_ONE.redirect_uri))


@pytest.fixture
def browser() -> Iterator[requests.Session]:
    """The citizen's browser: one cookie jar across the hub and the upstream."""
    with requests.Session() as session:
        yield session


def test_openid_client_full_flow_with_refresh_and_logout(hub_url: str, node: str,
                                                         browser: requests.Session) -> None:

    # 1. discovery and the authorization request (PKCE S256, state, nonce)
    start = rp(node, "authorize", redirect_uri=AGENCY_ONE.redirect_uri, scope=SCOPE)
    assert start["metadata"]["issuer"] == HUB_ISSUER
    assert start["url"].startswith(f"{HUB_ISSUER}/")
    sent = query(start["url"])
    assert sent["code_challenge_method"] == "S256" and sent["scope"] == SCOPE

    # 2. the citizen logs in; the library checks the response (iss, state), redeems the code
    # and checks the ID token's claims (iss, aud, exp, nonce) and its signature against the
    # hub's JWKS (openid-client 6 skips that for an ID token from the token endpoint, Core
    # 3.1.3.7 item 6, unless told enableNonRepudiationChecks, as rp.mjs does). It never
    # checks at_hash in the code flow. Both are also checked here, so neither rests on one
    # library's defaults
    callback = login(browser, start["url"])
    assert query(callback)["iss"] == HUB_ISSUER
    got = rp(node, "code", callback_url=callback, verifier=start["verifier"],
             state=start["state"], nonce=start["nonce"])
    tokens, claims = got["tokens"], got["claims"]
    assert claims["iss"] == HUB_ISSUER and claims["aud"] in (
        AGENCY_ONE.client_id, [AGENCY_ONE.client_id])
    assert claims["nonce"] == start["nonce"]
    jwks = requests.get(start["metadata"]["jwks_uri"], timeout=10).json()
    verified = jwt.decode(tokens["id_token"], KeySet.import_key_set(jwks))  # the signature
    assert verified.claims == claims
    alg = verified.header["alg"]
    digest = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}[alg[-3:]]
    half = digest(tokens["access_token"].encode("ascii")).digest()
    assert claims["at_hash"] == base64.urlsafe_b64encode(
        half[:len(half) // 2]).rstrip(b"=").decode()
    assert tokens["token_type"].lower() == "bearer"
    assert tokens["access_token"] and tokens["refresh_token"] and tokens["id_token"]
    sub = claims["sub"]

    # 3. userinfo, with the library's check that it is the same subject
    info = rp(node, "userinfo", access_token=tokens["access_token"], sub=sub)["userinfo"]
    assert info["sub"] == sub and info["email"] == "alice@example.org"

    # 4. refresh: new tokens, a rotated refresh token
    refreshed = rp(node, "refresh", refresh_token=tokens["refresh_token"])
    new = refreshed["tokens"]
    assert new["access_token"] and new["access_token"] != tokens["access_token"]
    assert new["refresh_token"] and new["refresh_token"] != tokens["refresh_token"]
    # The hub returns no ID token on refresh (OpenID Connect Core 12.2 lets it omit one), so
    # the subject kept across the refresh is checked through userinfo with the new access
    # token: the library refuses a sub other than the ID token's (Core 5.3.2).
    assert refreshed["claims"] is None and "id_token" not in new
    info = rp(node, "userinfo", access_token=new["access_token"], sub=sub)["userinfo"]
    assert info["sub"] == sub

    # 5. introspection and revocation
    active = rp(node, "introspect", token=new["access_token"])["introspection"]
    assert active["active"] is True and active.get("client_id") == AGENCY_ONE.client_id
    rp(node, "revoke", token=new["refresh_token"])
    assert rp(node, "introspect", token=new["refresh_token"])["introspection"]["active"] is False

    # 5b. client_credentials (RFC 6749 4.4) for the consent decision API
    service = rp(node, "clientCredentials", scope="consent.decisions")["tokens"]
    assert service["scope"] == "consent.decisions" and service["refresh_token"] is None
    own = rp(node, "introspect", token=service["access_token"])["introspection"]
    assert own["active"] is True and own["sub"] == AGENCY_ONE.client_id

    # 6. RP-initiated logout: the hub ends the session and returns to the agency with state
    assert silent_authorize(browser, hub_url).get("code"), "the hub session should be alive"
    logout_url = rp(node, "logout", id_token=tokens["id_token"],
                    post_logout_redirect_uri=POST_LOGOUT, state="bye-state")["url"]
    assert logout_url.startswith(f"{HUB_ISSUER}/logout/end-session?")
    r = browser.get(logout_url, allow_redirects=False, timeout=10)
    back = follow_to(browser, r, POST_LOGOUT)
    assert back.split("?")[0] == POST_LOGOUT and query(back)["state"] == "bye-state"
    assert silent_authorize(browser, hub_url).get("error") == "login_required"
