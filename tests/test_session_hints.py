"""id_token_hint, login_hint and ui_locales on the authorization endpoint (OpenID Connect
Core 1.0 section 3.1.2.1)."""

from __future__ import annotations

from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest, full_login, query, redeem


def id_token(client, auth=None, username="alice"):
    auth = auth or AuthRequest()
    params = full_login(client, auth, username=username)
    return redeem(client, auth, params["code"]).json["id_token"]


def test_prompt_none_with_hint_of_current_citizen_issues_code(client):
    hint = id_token(client)
    auth = AuthRequest(extra={"prompt": "none", "id_token_hint": hint})
    r = client.get(auth.url())
    assert r.status_code == 302 and "code" in query(r.headers["Location"])


def test_prompt_none_with_hint_of_someone_else_is_login_required(client, app):
    bobs = id_token(app.test_client(), username="bob")
    id_token(client)  # alice is signed in here
    auth = AuthRequest(extra={"prompt": "none", "id_token_hint": bobs})
    params = query(client.get(auth.url()).headers["Location"])
    assert params["error"] == "login_required" and params["state"] == auth.state


def test_hint_of_someone_else_without_prompt_none_asks_to_log_in(client, app):
    bobs = id_token(app.test_client(), username="bob")
    id_token(client)
    r = client.get(AuthRequest(extra={"id_token_hint": bobs}).url())
    assert r.status_code == 303 and r.headers["Location"].startswith("/login?flow=")


def test_garbage_or_foreign_hint_is_invalid_request(client):
    hint = id_token(client, AuthRequest(agency=AGENCY_ONE))
    for bad in ("not-a-jwt", hint[:-4] + "AAAA"):
        params = query(client.get(AuthRequest(extra={"id_token_hint": bad}).url())
                       .headers["Location"])
        assert params["error"] == "invalid_request"
    # an ID token issued to agency one is no hint for agency two
    auth = AuthRequest(agency=AGENCY_TWO, extra={"id_token_hint": hint})
    params = query(client.get(auth.url()).headers["Location"])
    assert params["error"] == "invalid_request"


def test_login_hint_and_ui_locales_are_accepted(client):
    auth = AuthRequest(extra={"login_hint": "alice", "ui_locales": "fr-CA fr en"})
    params = full_login(client, auth)
    assert params["code"]
