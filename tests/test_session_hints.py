"""id_token_hint, login_hint and ui_locales on the authorization endpoint (OpenID Connect
Core 1.0 section 3.1.2.1)."""

from __future__ import annotations

from jose import jwt as jose_jwt

from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest, full_login, query, redeem

#: the error_description of every hint that is no ID token of this hub for this agency
NOT_OUR_HINT = "id_token_hint is not an ID token from this hub for this agency."


def id_token(client, auth=None, username="alice"):
    auth = auth or AuthRequest()
    params = full_login(client, auth, username=username)
    return redeem(client, auth, params["code"]).json["id_token"]


def resigned(hub, token, *, typ=None, **claims):
    """``token`` signed again with the hub's own key, its ``typ`` header and ``claims``
    changed: valid in every other way, so only the check of what changed can refuse it."""
    header = jose_jwt.get_unverified_header(token)
    key = hub.keys.signing_key(header["alg"])
    assert key.kid == header["kid"]
    header = {"alg": key.alg, "kid": key.kid, "typ": typ or header.get("typ", "JWT")}
    return key.sign_jwt(header, {**jose_jwt.get_unverified_claims(token), **claims})


def silent(client, hint, agency=AGENCY_ONE):
    """The redirect's parameters for a prompt=none request with ``hint``."""
    auth = AuthRequest(agency=agency, extra={"prompt": "none", "id_token_hint": hint})
    r = client.get(auth.url())
    assert r.status_code == 302 and r.headers["Location"].startswith(agency.redirect_uri)
    params = query(r.headers["Location"])
    assert params["state"] == auth.state
    return params


def assert_not_our_hint(params):
    assert "code" not in params
    assert params["error"] == "invalid_request"
    assert params["error_description"] == NOT_OUR_HINT


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


def test_core_3_1_2_1_hint_from_another_issuer_is_invalid_request(client, hub):
    hint = id_token(client)
    assert "code" in silent(client, resigned(hub, hint))  # re-signed as it was: a good hint
    ours = jose_jwt.get_unverified_claims(hint)["iss"]
    for issuer in ("https://elsewhere.example", ours + "/", ours.upper()):
        assert_not_our_hint(silent(client, resigned(hub, hint, iss=issuer)))


def test_core_3_1_2_1_access_or_logout_token_as_hint_is_invalid_request(client, hub):
    auth = AuthRequest()
    tokens = redeem(client, auth, full_login(client, auth)["code"]).json
    hint = tokens["id_token"]
    assert "code" in silent(client, resigned(hub, hint))
    # the hub's own access token for this agency and citizen: only its typ is wrong
    access = tokens["access_token"]
    assert jose_jwt.get_unverified_header(access)["typ"] == "at+jwt"
    at_claims, id_claims = (jose_jwt.get_unverified_claims(t) for t in (access, hint))
    assert (at_claims["iss"], at_claims["aud"], at_claims["sub"]) == (
        id_claims["iss"], id_claims["aud"], id_claims["sub"])
    assert_not_our_hint(silent(client, access))
    for typ in ("at+jwt", "logout+jwt", "secevent+jwt"):
        assert_not_our_hint(silent(client, resigned(hub, hint, typ=typ)))


def test_core_3_1_2_1_hint_for_another_audience_is_invalid_request(client, hub):
    # alice's own ID token of agency two (her sub there), its audience changed
    hint = id_token(client, AuthRequest(agency=AGENCY_TWO))
    assert "code" in silent(client, resigned(hub, hint), AGENCY_TWO)
    for aud in (AGENCY_ONE.client_id, [AGENCY_ONE.client_id], "https://elsewhere.example"):
        assert_not_our_hint(silent(client, resigned(hub, hint, aud=aud), AGENCY_TWO))


def test_core_3_1_2_1_hint_of_another_sub_is_login_required(client, hub):
    hint = id_token(client)
    assert "code" in silent(client, resigned(hub, hint))
    other = resigned(hub, hint, sub="someone-else")
    params = silent(client, other)
    assert "code" not in params and params["error"] == "login_required"
    # without prompt=none the citizen is asked to log in (again)
    r = client.get(AuthRequest(extra={"id_token_hint": other}).url())
    assert r.status_code == 303 and r.headers["Location"].startswith("/login?flow=")
