"""Assurance: acr_values are honoured or refused, never inflated (OpenID Connect Core
3.1.2.1, 2; NIST SP 800-63C)."""

from __future__ import annotations

import re

import pytest
from jose import jwt as jose_jwt

from tests.conftest import HIGH_ACR, HUB_ISSUER, LOW_ACR, bank_id_upstream, hub_config
from tests.flows import (
    AuthRequest,
    finish_login,
    full_login,
    path_of,
    query,
    redeem,
    start_login,
    upstream_login,
)

LOW, HIGH = LOW_ACR, HIGH_ACR


@pytest.fixture
def config(upstream_issuer, tmp_path):
    """Two upstreams (the conftest's ``app`` builds the hub from this)."""
    cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/acr.db")
    cfg["upstreams"].append(bank_id_upstream(upstream_issuer))
    return cfg


def id_claims(client, auth, params):
    return jose_jwt.get_unverified_claims(redeem(client, auth, params["code"]).json["id_token"])


def test_discovery_lists_offered_acrs(client):
    doc = client.get("/.well-known/openid-configuration").json
    assert doc["acr_values_supported"] == sorted([LOW, HIGH])
    assert doc["issuer"] == HUB_ISSUER


def test_high_acr_request_offers_only_high_upstreams(client):
    auth = AuthRequest(extra={"acr_values": HIGH})
    r = client.get(auth.url())
    assert r.status_code == 303
    page = client.get(path_of(r.headers["Location"])).get_data(as_text=True)
    assert "Bank ID" in page and "Example ID" not in page
    flow = query(r.headers["Location"])["flow"]
    r = client.get(f"/login/op/start?flow={flow}")  # forcing the low upstream anyway
    assert r.status_code == 403 and "stronger way" in r.get_data(as_text=True)
    params = full_login(client.application.test_client(), auth, upstream_id="op-es")
    assert params["code"]


def test_acr_claim_says_what_happened(client):
    auth = AuthRequest(extra={"acr_values": f"{HIGH} {LOW}"})
    params = full_login(client, auth, upstream_id="op")
    assert id_claims(client, auth, params)["acr"] == LOW  # acceptable, and not inflated


def test_low_session_is_not_raised_but_redone(client):
    full_login(client, AuthRequest(), upstream_id="op")
    auth = AuthRequest(extra={"acr_values": HIGH})
    r = client.get(auth.url())
    assert r.status_code == 303 and r.headers["Location"].startswith("/login?flow=")
    url = client.get(path_of(r.headers["Location"]))
    link = re.search(r'href="(/login/op-es/start\?flow=[^"]+)"', url.get_data(as_text=True))
    r = client.get(link.group(1).replace("&amp;", "&"))
    r = finish_login(client, upstream_login(r.headers["Location"]))
    params = query(r.headers["Location"])
    assert id_claims(client, auth, params)["acr"] == HIGH


def test_prompt_none_with_insufficient_session_is_login_required(client):
    full_login(client, AuthRequest(), upstream_id="op")
    auth = AuthRequest(extra={"acr_values": HIGH, "prompt": "none"})
    r = client.get(auth.url())
    assert r.status_code == 302
    params = query(r.headers["Location"])
    assert params["error"] == "login_required" and params["iss"] == HUB_ISSUER


def test_unknown_acr_is_unmet_authentication_requirements(client):
    auth = AuthRequest(extra={"acr_values": "http://idmanagement.gov/ns/assurance/ial/3"})
    r = client.get(auth.url())
    assert r.status_code == 302
    params = query(r.headers["Location"])
    assert params["error"] == "unmet_authentication_requirements"
    assert params["state"] == auth.state and params["iss"] == HUB_ISSUER


def _flow_of(client, auth: AuthRequest) -> str:
    """Start ``auth`` at /authorize; the id of the login flow it waits on."""
    r = client.get(auth.url())
    assert r.status_code == 303 and r.headers["Location"].startswith("/login?flow="), r.status_code
    return query(r.headers["Location"])["flow"]


def test_a_low_login_in_between_cannot_answer_a_high_request(client):
    """OpenID Connect Core 3.1.2.1 (acr_values): the citizen signs in at HIGH for a request
    that asked for it, and before the browser is back at /authorize/continue signs in again
    at LOW in another tab: the request is not answered with the LOW login the session now
    holds."""
    high = AuthRequest(extra={"acr_values": HIGH})
    callback = upstream_login(start_login(client, high, "op-es"))
    r = client.get(path_of(callback))
    assert r.status_code == 303 and r.headers["Location"].startswith("/authorize/continue")
    back = path_of(r.headers["Location"])  # not followed yet
    full_login(client, AuthRequest(extra={"prompt": "login"}), upstream_id="op")  # LOW
    r = client.get(back)
    assert r.status_code == 302 and r.headers["Location"].startswith(high.agency.redirect_uri)
    params = query(r.headers["Location"])
    assert params["error"] == "unmet_authentication_requirements" and "code" not in params
    assert params["error_description"] == "The sign-in did not reach the requested assurance."
    assert params["state"] == high.state and params["iss"] == HUB_ISSUER


def test_prompt_login_is_not_answered_by_the_login_it_asked_to_redo(client):
    """OpenID Connect Core 3.1.2.1 (prompt=login): the flow waits for a new login; the
    session's login from before the flow began cannot answer it by going straight to where
    the flow resumes. Two checks stand in the way, each enough alone: the flow was never
    authenticated, and the session's login is older than the flow."""
    full_login(client, AuthRequest(), upstream_id="op")
    waiting = _flow_of(client, AuthRequest(extra={"prompt": "login"}))
    r = client.get(f"/authorize/continue?flow={waiting}")
    assert r.status_code == 400 and "expired" in r.get_data(as_text=True)
    assert "Location" not in r.headers
