"""Hostile input that reached a server error (a probe with the Flask test client): each
case here is answered as the same kind of wrong input already is, a clear 4xx at the right
place in the right form (a readable page for people, OAuth-style JSON for programs).

Max_age of thousands of digits, a non-ASCII form token, a history page past any offset the
database can hold, officer search dates at the calendar's limits, a superscript page number,
HTML errors on the JSON endpoints, repeated parameters in an upstream's callback, and the
error code of an unknown agency's record of processing."""

from __future__ import annotations

import re
from urllib.parse import urlencode

import pytest
from jose import jwt as jose_jwt
from markupsafe import escape

from civitas.app import create_app, stop_background
from tests import test_officer_workspace
from tests.conftest import HUB_ISSUER, hub_config
from tests.flows import (
    AGENCY_ONE,
    AGENCY_TWO,
    AuthRequest,
    consent_answer,
    finish_login,
    full_login,
    path_of,
    query,
    redeem,
    start_login,
    upstream_login,
)
from tests.test_linking import csrf
from tests.test_officer_workspace import CONSENT, evaluate, result_ids

# the officer workspace's hub (an LDAP staff directory, 57 decisions) and its officer
directory = test_officer_workspace.directory
world = test_officer_workspace.world
officer = test_officer_workspace.officer

FORM_EXPIRED = "This form has expired. Please go back, reload the page and try again."
LOGIN_EXPIRED = ("This sign-in has expired or was started in a different browser. "
                 "Please go back to the site you were using and sign in again.")
MAX_AGE_REFUSED = "'max_age' must be a non-negative integer of at most 20 digits"
SERVER_ERROR = "Something went wrong on our side. Please try again later."


def error_page(response, status, message):
    """The hub's readable error page (civitas/templates/error.html) saying ``message``."""
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert f'<p class="error">{escape(message)}</p>' in page, page[:2000]
    return page


def json_error(response, status, error, description):
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.mimetype == "application/json"
    assert response.json == {"error": error, "error_description": description}


def allowed(response):
    return set(response.headers["Allow"].split(", "))


# -- 1. max_age of thousands of digits (OpenID Connect Core 3.1.2.1) ------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("max_age", ["9" * 5000, "1" + "0" * 20],
                         ids=["5000_digits", "21_digits"])
def test_a_max_age_of_too_many_digits_is_invalid_request_at_the_redirect_uri(client, method,
                                                                              max_age):
    auth = AuthRequest(extra={"max_age": max_age})
    r = (client.get(auth.url()) if method == "GET"
         else client.post("/authorize", data=auth.params()))
    assert r.status_code == 302, r.get_data(as_text=True)[:500]
    assert r.headers["Location"].startswith(AGENCY_ONE.redirect_uri + "?")
    assert query(r.headers["Location"]) == {
        "error": "invalid_request", "error_description": MAX_AGE_REFUSED,
        "state": auth.state, "iss": HUB_ISSUER}


def test_a_max_age_of_twenty_digits_is_still_a_max_age(client):
    """The cap refuses only the absurd: 2**64 - 1 (a client's "no limit") is read."""
    auth = AuthRequest(extra={"max_age": str(2**64 - 1)})
    r = client.get(auth.url())
    assert r.status_code == 303 and r.headers["Location"].startswith("/login?flow=")


# -- 2. a non-ASCII form token is a wrong form token ----------------------------------------


@pytest.mark.parametrize("path", [
    "/logout", "/account/delete", "/account/link", "/account/identities/1/unlink",
    "/login/op/password", "/account/consents/withdraw"])
@pytest.mark.parametrize("given", ["\u00e9", "token\u00e9"], ids=["e_acute", "token_e_acute"])
def test_a_non_ascii_form_token_is_refused_as_an_expired_form(client, hub, path, given):
    full_login(client, AuthRequest())
    token = csrf(client)  # the session holds a form token
    before = client.get("/account").get_data(as_text=True)
    r = client.post(path, data={"csrf": given.replace("token", token), "confirm": "delete",
                                "client_id": AGENCY_ONE.client_id, "flow": "x",
                                "username": "alice", "password": "alice-password"})
    error_page(r, 400, FORM_EXPIRED)
    # nothing happened: still signed in, the same account page, the same form token
    assert client.get("/account").get_data(as_text=True) == before
    assert csrf(client) == token


@pytest.fixture
def consent_client(make_hub):
    """A hub whose agency one asks for consent (its claims rest on it)."""
    app = make_hub(agencies=[AGENCY_ONE.config(consent=CONSENT), AGENCY_TWO.config()],
                   backchannel_dispatcher=False)
    return app.test_client()


def test_a_non_ascii_form_token_on_the_consent_page_leaves_the_request_pending(
        consent_client):
    client, auth = consent_client, AuthRequest()
    r = finish_login(client, upstream_login(start_login(client, auth)), consent=False)
    assert r.status_code == 303 and r.headers["Location"].startswith("/authorize/consent")
    form = consent_answer(client.get(path_of(r.headers["Location"])).get_data(as_text=True))
    assert form["csrf"]
    error_page(client.post("/authorize/consent", data={**form, "csrf": "\u00e9"}),
               400, FORM_EXPIRED)
    # nothing was recorded and the request is still there: the genuine answer is taken
    r = client.post("/authorize/consent", data=form)
    assert r.status_code == 302, r.get_data(as_text=True)[:500]
    params = query(r.headers["Location"])
    assert params["state"] == auth.state and params["code"]
    # and withdrawing it with such a token changes nothing either
    token = csrf(client)
    error_page(client.post("/account/consents/withdraw",
                           data={"csrf": "\u00e9", "client_id": AGENCY_ONE.client_id}),
               400, FORM_EXPIRED)
    r = client.post("/account/consents/withdraw",
                    data={"csrf": token, "client_id": AGENCY_ONE.client_id})
    assert r.status_code == 303 and r.headers["Location"] == "/account/consents"


# -- 3. a history page past any offset the database holds -----------------------------------


def test_a_history_page_far_past_the_end_is_an_empty_page(upstream_issuer, database_url):
    """SQLite refused the offset (an OverflowError), PostgreSQL too (bigint out of range)."""
    app = create_app(hub_config(upstream_issuer, database_url, agencies=[
        AGENCY_ONE.config(consent=CONSENT), AGENCY_TWO.config()], backchannel_dispatcher=False))
    try:
        client, auth = app.test_client(), AuthRequest()
        params = full_login(client, auth)
        sub = jose_jwt.get_unverified_claims(
            redeem(client, auth, params["code"]).json["id_token"])["sub"]
        assert evaluate(client, sub, "email", "benefits").json["decision"] is True
        first = client.get("/account/history")
        assert first.status_code == 200
        assert '<table id="history">' in first.get_data(as_text=True)
        assert "Your email address" in first.get_data(as_text=True)
        for page in ("4611686018427387904", "99999999999999999999", "9" * 400, "1000001"):
            r = client.get(f"/account/history?page={page}")
            assert r.status_code == 200, (page, r.status_code)
            body = r.get_data(as_text=True)
            assert "<h1>Who used your information</h1>" in body
            assert '<table id="history">' not in body and "Your email address" not in body
            assert "No agency has asked about your information yet." in body
    finally:
        stop_background(app)
        app.extensions["civitas"].db.dispose()


# -- 4. officer search dates at the calendar's limits ----------------------------------------

OFFICER_PATHS = ["/officer/", "/officer/decisions.json", "/officer/decisions.csv"]


@pytest.mark.parametrize("path", OFFICER_PATHS)
@pytest.mark.parametrize(("field", "value"), [
    ("to", "9999-12-31"), ("from", "0001-01-01T00:00:00+01:00"),
    ("to", "9999-12-31T23:59:59-01:00")], ids=["last_day", "first_hour_east", "last_hour_west"])
def test_a_search_date_past_the_calendar_is_a_clear_400(world, officer, path, field, value):
    client, _ = officer
    r = client.get(path, query_string={field: value})
    message = (f"The field {field!r} is outside the dates that can be searched "
               "(years 1 to 9999, in UTC).")
    if path == "/officer/":
        # the search form again, the problem beside its field
        assert r.status_code == 400 and r.mimetype == "text/html"
        assert (f'<p class="error" role="alert" id="search-error">{escape(message)}'
                in r.get_data(as_text=True))
    else:
        json_error(r, 400, "invalid_request", message)


def test_search_dates_just_inside_the_calendar_are_searched(world, officer):
    client, _ = officer
    r = client.get("/officer/decisions.json",
                   query_string={"from": "0001-01-01T00:00:00+00:00", "to": "9999-12-30"})
    assert r.status_code == 200 and r.json["count"] == 57


# -- 5. a page number that is a digit to Python but not a number ----------------------------


@pytest.mark.parametrize("page", ["\u00b2", "\u0663", "1\u00b2"],
                         ids=["superscript_two", "arabic_indic_three", "one_superscript_two"])
def test_an_officer_page_number_that_is_not_ascii_digits_is_the_first_page(world, officer,
                                                                           page):
    client, _ = officer
    first = result_ids(client.get("/officer/"))
    assert len(first) == 50
    r = client.get("/officer/", query_string={"page": page})
    assert r.status_code == 200
    assert result_ids(r) == first


# -- 6. the JSON endpoints answer errors in JSON, people's pages in a page --------------------


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("PUT", "/token", {"POST", "OPTIONS"}), ("GET", "/revoke", {"POST", "OPTIONS"}),
    ("GET", "/introspect", {"POST", "OPTIONS"}),
    ("PUT", "/userinfo", {"GET", "HEAD", "POST", "OPTIONS"}),
    ("POST", "/.well-known/openid-configuration", {"GET", "HEAD", "OPTIONS"}),
    ("DELETE", "/jwks", {"GET", "HEAD", "OPTIONS"}),
    ("GET", "/access/v1/evaluation", {"POST", "OPTIONS"}),
    ("POST", "/officer/decisions.json", {"GET", "HEAD", "OPTIONS"}),
    ("POST", "/officer/decisions.csv", {"GET", "HEAD", "OPTIONS"}),
])
def test_a_wrong_method_on_a_json_endpoint_is_answered_in_json(client, method, path, allow):
    r = client.open(path, method=method)
    json_error(r, 405, "invalid_request",
               f"The method {method} is not allowed here; use "
               f"{', '.join(sorted(allow - {'OPTIONS', 'HEAD'}))}.")
    assert allowed(r) == allow


@pytest.mark.parametrize("path", ["/access/v1/nothing", "/admin/api/nothing", "/token/x",
                                  "/officer/nothing.json"])
def test_no_such_json_endpoint_is_not_found_in_json(client, path):
    json_error(client.get(path), 404, "not_found", "There is nothing at this address.")


def test_an_unknown_well_known_address_keeps_the_page(client):
    """/.well-known/ also holds addresses for people (change-password, security.txt): one
    the hub does not serve is not found in a page (as test_authorization_endpoint's
    test_discovery_4_trailing_slash_is_not_a_second_document has it)."""
    for path in ("/.well-known/change-password", "/.well-known/openid-configuration/"):
        page = error_page(client.get(path), 404, "There is no page at this address.")
        assert "<h1>Page not found</h1>" in page


def test_an_unexpected_error_on_a_json_endpoint_is_server_error_in_json(client, hub,
                                                                        monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(hub.server, "create_token_response", boom)
    monkeypatch.setattr(hub.server.hub.access_tokens, "verify", boom)
    json_error(client.post("/token", data={"grant_type": "client_credentials"}),
               500, "server_error", SERVER_ERROR)
    json_error(client.get("/userinfo", headers={"Authorization": "Bearer x"}),
               500, "server_error", SERVER_ERROR)


def test_a_hub_error_on_a_json_endpoint_is_answered_in_json_with_its_retry_after(
        client, hub, monkeypatch):
    """A refusal the hub raises on purpose (a CivitasError: its status, its words, its
    Retry-After) reaches a program in JSON too, and a person as the page."""
    from kernel.errors import CivitasError

    class Busy(CivitasError):
        status_code = 503
        public_message = "The hub is busy; try again in a moment."
        retry_after = 7

    def busy(*args, **kwargs):
        raise Busy()

    monkeypatch.setattr(hub.server.hub.access_tokens, "verify", busy)
    r = client.get("/userinfo", headers={"Authorization": "Bearer x"})
    json_error(r, 503, "temporarily_unavailable", "The hub is busy; try again in a moment.")
    assert r.headers["Retry-After"] == "7"
    monkeypatch.setattr(hub.broker, "flows", busy)
    r = client.get("/login")
    error_page(r, 503, "The hub is busy; try again in a moment.")
    assert r.headers["Retry-After"] == "7"


def test_peoples_pages_keep_the_readable_error_page(client, hub, monkeypatch):
    r = client.put("/account")
    page = error_page(r, 405, "This page cannot be used that way.")
    assert "<h1>We could not do that</h1>" in page
    assert allowed(r) == {"GET", "HEAD", "OPTIONS"}
    page = error_page(client.get("/no-such-page"), 404, "There is no page at this address.")
    assert "<h1>Page not found</h1>" in page

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(hub.broker, "flows", boom)
    page = error_page(client.get("/login"), 500, SERVER_ERROR)
    assert "<h1>Sorry, something went wrong</h1>" in page


# -- 7. an upstream's callback with a repeated parameter (RFC 9207 2.4, RFC 6749 3.1) --------


@pytest.mark.parametrize("extra", [
    {"iss": "https://evil.example"}, {"state": "another"}, {"code": "another"},
    {"session_state": "x"}], ids=["iss", "state", "code", "not_repeated"])
def test_a_callback_with_a_repeated_parameter_is_refused(client, upstream_issuer, extra):
    auth = AuthRequest()
    callback = upstream_login(start_login(client, auth))
    got = query(callback)
    assert got["iss"] == upstream_issuer and got["state"] and got["code"]
    r = client.get(path_of(callback) + "&" + urlencode(extra))
    if "session_state" in extra:  # a parameter given once is not refused
        assert r.status_code == 303 and r.headers["Location"].startswith("/authorize/continue")
        return
    error_page(r, 400, LOGIN_EXPIRED)
    assert client.get("/account").status_code == 302  # not signed in


def test_a_callback_with_a_repeated_error_is_refused(client):
    auth = AuthRequest()
    callback = upstream_login(start_login(client, auth))
    state = query(callback)["state"]
    r = client.get("/login/op/callback?" + urlencode(
        [("state", state), ("error", "access_denied"), ("error", "server_error")]))
    error_page(r, 400, LOGIN_EXPIRED)
    assert client.get("/account").status_code == 302


# -- 9. an unknown agency's record of processing --------------------------------------------


def test_an_unknown_agencys_record_of_processing_is_not_found(world, officer):
    client, _ = officer
    json_error(client.get("/officer/agencies/no-such-agency/art30?format=json"),
               404, "not_found", "There is no agency with that client id.")
    error_page(client.get("/officer/agencies/no-such-agency/art30"),
               404, "There is no agency with that client id.")


def test_another_officer_refusal_keeps_its_code(world):
    """403 stays ``forbidden`` (a citizen who is not an officer)."""
    citizen = world["citizen"]
    json_error(citizen.get("/officer/decisions.json"), 403, "forbidden",
               "This page is for the hub's privacy officers.")
    assert re.search(r"privacy officers", citizen.get("/officer/").get_data(as_text=True))
