"""Bad input gets a clear 4xx, never a server error: garbage sent to every endpoint."""

from __future__ import annotations

import base64
import json

import pytest

from civitas.app import create_app
from tests.conftest import hub_config
from tests.flows import AGENCY_ONE, AuthRequest, full_login

ENDPOINTS = [
    ("GET", "/authorize?client_id=%00&redirect_uri=%ff"), ("GET", "/authorize/continue"),
    ("GET", "/authorize/consent?request=x"), ("POST", "/authorize/consent"),
    ("POST", "/token"), ("PUT", "/token"), ("GET", "/userinfo"), ("POST", "/revoke"),
    ("POST", "/introspect"), ("GET", "/logout/end-session?id_token_hint=a.b.c"),
    ("POST", "/logout/end-session"), ("GET", "/login?flow=%ff%fe"),
    ("GET", "/login/op/start?flow="), ("GET", "/login/op/callback?state=x&code=y"),
    ("POST", "/login/op/password"), ("GET", "/account/history?page=-5"),
    ("GET", "/account/consents/receipts/zz"), ("POST", "/access/v1/evaluation"),
    ("POST", "/access/v1/evaluations"), ("GET", "/access/v1/receipts/x"),
    ("GET", "/officer/?from=zz"), ("POST", "/admin/api/agencies"),
    ("POST", "/account/delete"), ("POST", "/account/identities/99/unlink"),
    ("POST", "/account/link"), ("GET", "/no-such-page"),
]
#: the admin API answers 404 to everyone while it has no token: with one, garbage reaches it
ADMIN_TOKEN = "admin-token-" + "x" * 32
HEADERS = [{}, {"Authorization": "Basic !!!"}, {"Authorization": "Bearer " + "x" * 10000},
           {"Content-Type": "application/json"},
           {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}]
#: the pages a citizen's session opens (without one they only redirect to the login)
SIGNED_IN = [(method, url) for method, url in ENDPOINTS
             if url.startswith(("/account", "/officer"))]


@pytest.fixture
def config(config):
    return {**config, "admin_api_token": ADMIN_TOKEN}


def send_garbage(client, method, url):
    for headers in HEADERS:
        body = "{\x00not json" if method in ("POST", "PUT") else None
        r = client.open(url, method=method, headers=headers, data=body)
        # (a 200 is fine where the answer is a page, e.g. "you are signed out" without a
        # session; what must never happen is a server error)
        assert r.status_code < 500, (method, url, headers.keys(), r.status_code)
        if r.mimetype == "text/html" and r.status_code >= 400:
            assert "Traceback" not in r.get_data(as_text=True)
        yield r


@pytest.mark.parametrize(("method", "url"), ENDPOINTS)
def test_garbage_never_reaches_a_server_error(client, method, url):
    statuses = [r.status_code for r in send_garbage(client, method, url)]
    if url.startswith("/admin/api"):
        assert statuses[-1] == 400, statuses  # read by the API itself, not refused at its door


@pytest.mark.parametrize(("method", "url"), SIGNED_IN)
def test_garbage_from_a_signed_in_citizen_never_reaches_a_server_error(client, method, url):
    full_login(client, AuthRequest())
    for r in send_garbage(client, method, url):
        assert "/login" not in r.headers.get("Location", ""), r.status_code  # signed in
    assert client.get("/account").status_code == 200


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_nul_characters_are_refused_on_postgresql_too(upstream_issuer, pg_database_url):
    """PostgreSQL text cannot hold U+0000 and its driver refuses to send one, so a NUL that
    reached a query was a 500 there (never on SQLite): in a client id (HTTP Basic, a form, a
    query), in an AuthZEN field. Each is now an unknown client or a 400."""
    app = create_app(hub_config(upstream_issuer, pg_database_url, agencies=[
        AGENCY_ONE.config(scopes=["openid", "email", "offline_access"])]))
    client = app.test_client()
    agency = _basic(AGENCY_ONE.client_id, AGENCY_ONE.secret)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    evaluation = json.dumps({"subject": {"type": "user", "id": "a\x00"},
                             "action": {"name": "use"},
                             "resource": {"type": "claim", "id": "email"},
                             "context": {"purpose": "p\x00"}})
    try:
        for method, url in ENDPOINTS:
            path = url.split("?")[0]
            sent = [
                (f"{path}?client_id=a%00&flow=%00&state=%00&page=%00&id_token_hint=%00", {},
                 None),
                (path, form, "client_id=a%00&token=%00&code=%00&refresh_token=%00&csrf=%00"
                 "&grant_type=client_credentials&username=%00&password=%00"),
                (path, {**_basic("a\x00", "b\x00"), **form}, "grant_type=client_credentials"),
                (path, {**agency, **form}, "grant_type=client_credentials&scope=%00&token=%00"),
                (path, {**agency, "Content-Type": "application/json"}, evaluation),
                (path, {"Authorization": "Bearer a\x00b"}, None),
            ]
            for where, headers, body in sent:
                r = client.open(where, method=method, headers=headers, data=body)
                assert r.status_code < 500, (method, where, list(headers), body,
                                             r.status_code)
        for path in ("/access/v1/evaluation", "/access/v1/evaluations"):
            r = client.post(path, headers={**agency, "Content-Type": "application/json"},
                            data=evaluation)
            assert r.status_code == 400
            assert r.json["error_description"] == ("subject.id must not contain control "
                                                   "characters")
        r = client.post("/token", headers={**_basic("a\x00", "b"), **form},
                        data="grant_type=client_credentials")
        assert r.status_code == 401 and r.json["error"] == "invalid_client"
        # a refresh token carries its grant's id, which is looked up: a NUL there is an
        # unknown token, like any other that is not the hub's
        for token in ("a%00.b", "a.b%00", "%00", "a%00b"):
            r = client.post("/token", headers={**agency, **form},
                            data=f"grant_type=refresh_token&refresh_token={token}")
            assert r.status_code == 400 and r.json["error"] == "invalid_grant", token
    finally:
        app.extensions["civitas"].db.dispose()


def test_a_nul_that_reaches_postgresql_anywhere_is_a_400_not_a_500(upstream_issuer,
                                                                  pg_database_url):
    """The net under the views' own checks: a view that passes a NUL from the request to a
    query (none of the hub's do now; these two are added for the test) gets a 400, in JSON
    for programs and as a page for people, not a server error."""
    from flask import jsonify, request
    from sqlalchemy import select

    from idp.models import Agency

    app = create_app(hub_config(upstream_issuer, pg_database_url))
    hub = app.extensions["civitas"]

    def lookup():
        with hub.db.session() as s:
            found = s.scalar(select(Agency.client_id).where(
                Agency.name == request.args["name"]))
        return jsonify(found=found)

    app.add_url_rule("/access/v1/test-lookup", "test_lookup_json", lookup)
    app.add_url_rule("/test-lookup", "test_lookup_page", lookup)
    client = app.test_client()
    try:
        assert client.get("/access/v1/test-lookup?name=Agency").json == {"found": None}
        r = client.get("/access/v1/test-lookup?name=a%00b")
        assert r.status_code == 400 and r.json["error"] == "invalid_request"
        assert "NUL" in r.json["error_description"]
        r = client.get("/test-lookup?name=a%00b")
        assert r.status_code == 400 and r.mimetype == "text/html"
        assert "NUL character" in r.get_data(as_text=True)
        assert client.get("/access/v1/test-lookup?name=x").status_code == 200  # pool is fine
    finally:
        hub.db.dispose()


def test_plain_http_is_refused_with_a_clear_400_not_a_500(upstream_issuer, tmp_path,
                                                           monkeypatch):
    """RFC 6749 3.1, 3.2: the authorization and token endpoints require TLS. A request that
    reaches the hub over plain http at a name other than a loopback one (no TLS in front
    of the hub, or a proxy whose X-Forwarded-Proto the hub does not believe) is refused:
    JSON ``invalid_request`` for programs, a page for people, both saying HTTPS, and a log
    line that points at trusted_proxy_hops. Over https the same requests are served."""
    app = create_app(hub_config(upstream_issuer, f"sqlite:///{tmp_path}/hub.db"))
    # the tests' hub has a loopback http issuer, for which create_app lets Authlib take
    # http (civitas.app._allow_loopback_http); a production hub has an https issuer
    monkeypatch.delenv("AUTHLIB_INSECURE_TRANSPORT", raising=False)
    client = app.test_client()
    agency = _basic(AGENCY_ONE.client_id, AGENCY_ONE.secret)
    token_request = {"grant_type": "client_credentials", "scope": "consent.decisions"}
    for path in ("/token", "/introspect", "/revoke"):
        r = client.post(path, base_url="http://hub.example", headers=agency,
                        data=token_request if path == "/token" else {"token": "x"})
        assert r.status_code == 400, (path, r.status_code)
        assert r.json == {"error": "invalid_request",
                          "error_description": "This service must be reached over HTTPS."}
    auth = AuthRequest()
    r = client.get(auth.url(), base_url="http://hub.example")
    assert r.status_code == 400 and r.mimetype == "text/html"
    assert "must be reached over HTTPS" in r.get_data(as_text=True)
    assert r.headers["X-Request-Id"] in r.get_data(as_text=True)
    # over https: served
    r = client.post("/token", base_url="https://hub.example", headers=agency,
                    data=token_request)
    assert r.status_code == 200 and r.json["token_type"].lower() == "bearer"
    r = client.get(auth.url(), base_url="https://hub.example")
    assert r.status_code in (302, 303)
