"""Brokered logins with an LDAP directory (a real slapd): the password page, brute-force
limits, injection attempts, a directory that goes away, and linking to an OIDC account."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import pytest
from jose import jwt as jose_jwt

from tests import servers
from tests.conftest import hub_config
from tests.flows import AuthRequest, full_login, metric, path_of, query, redeem

STAFF = "Agency Staff Directory"
#: the failed-attempt limiter's answer (not the request rate limit per address)
TOO_MANY = "Too many failed sign-in attempts."


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    with servers.run_slapd(tmp_path_factory.mktemp("slapd")) as info:
        yield info


def ldap_upstream(info, **extra):
    return {"kind": "ldap", "id": "staff", "display_name": STAFF, "url": info["url"],
            "bind_dn": info["svc_dn"], "bind_password": info["svc_password"],
            "user_base_dn": f"ou=people,{info['base_dn']}", "group_attribute": "memberOf",
            "acr": "urn:civitas:acr:ial2:aal1", "timeout_seconds": 2, **extra}


@contextlib.contextmanager
def ldap_hub(upstream_issuer: str, directory: dict, tmp_path: Any) -> Iterator[Any]:
    """A hub (its app) with the OIDC upstream and the directory's LDAP upstream."""
    from civitas.app import create_app, stop_background

    cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/ldap.db")
    cfg["upstreams"].append(ldap_upstream(directory))
    app = create_app(cfg)
    try:
        yield app
    finally:
        stop_background(app)
        app.extensions["civitas"].db.dispose()


@pytest.fixture
def app(upstream_issuer, directory, tmp_path):
    with ldap_hub(upstream_issuer, directory, tmp_path) as app:
        yield app


def password_page(client, auth=None):
    r = client.get((auth or AuthRequest()).url())
    r = client.get(path_of(r.headers["Location"]))
    page = r.get_data(as_text=True)
    assert f"Sign in with {STAFF}" in page
    link = re.search(r'href="(/login/staff/start\?flow=[^"]+)"', page).group(1)
    r = client.get(link.replace("&amp;", "&"))
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert '<label for="username">Username</label>' in html
    assert 'type="password"' in html
    return {name: re.search(rf'name="{name}" value="([^"]*)"', html).group(1)
            for name in ("csrf", "flow")}


def submit(client, form, username, password, **env):
    return client.post("/login/staff/password",
                       data={**form, "username": username, "password": password}, **env)


def test_ldap_login_through_the_hub(client):
    auth = AuthRequest()
    form = password_page(client, auth)
    r = submit(client, form, "alice", "alice-ldap-pw")
    assert r.status_code == 303
    r = client.get(path_of(r.headers["Location"]))
    params = query(r.headers["Location"])
    claims = jose_jwt.get_unverified_claims(redeem(client, auth, params["code"]).json["id_token"])
    assert claims["name"] == "Alice Directory"
    assert claims["email"] == "alice@agency.example"
    assert claims["acr"] == "urn:civitas:acr:ial2:aal1" and claims["amr"] == ["pwd"]


def test_wrong_password_and_unknown_user_look_the_same(client):
    form = password_page(client)
    rejected = metric("civitas_logins_total", upstream="staff", outcome="rejected")
    wrong = submit(client, form, "alice", "nope")
    unknown = submit(client, form, "mallory", "nope")
    assert wrong.status_code == unknown.status_code == 401
    assert metric("civitas_logins_total", upstream="staff", outcome="rejected") == rejected + 2
    for r in (wrong, unknown):
        assert "Wrong username or password." in r.get_data(as_text=True)
    strip = lambda r: re.sub(r'value="[^"]*"', "", r.get_data(as_text=True))  # noqa: E731
    assert strip(wrong) == strip(unknown)


@pytest.mark.parametrize("username", ["*", "*)(uid=*))(|(uid=*", "alice)(|(uid=*", "al*",
                                      "alice\x00", "alice,ou=people", "cn=admin"])
def test_injection_usernames_do_not_log_in(client, username):
    form = password_page(client)
    r = submit(client, form, username, "alice-ldap-pw")
    assert r.status_code == 401 and "Wrong username or password." in r.get_data(as_text=True)


def test_user_with_filter_metacharacters_logs_in(client):
    form = password_page(client)
    r = submit(client, form, "st*r(x)\\y", "star-pw")
    assert r.status_code == 303


def test_empty_password_is_refused(upstream_issuer, directory, tmp_path):
    """The hub refuses a blank password itself, before any network traffic (it would make
    an unauthenticated bind, RFC 4513 5.1.2): the directory here is a closed port, so any
    answer but the hub's own would be 502."""
    from civitas.app import create_app

    cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/closed.db")
    cfg["upstreams"].append(ldap_upstream(
        directory, url=f"ldap://127.0.0.1:{servers.free_port()}"))
    app = create_app(cfg)
    try:
        client = app.test_client()
        form = password_page(client)
        for blank in ("", "   "):
            r = submit(client, form, "alice", blank)
            assert r.status_code == 401
            assert "Wrong username or password." in r.get_data(as_text=True)
    finally:
        app.extensions["civitas"].db.dispose()


def test_per_username_attempt_limit(client):
    form = password_page(client)
    for _ in range(5):
        assert submit(client, form, "alice", "wrong").status_code == 401
    r = submit(client, form, "alice", "alice-ldap-pw")  # even the right password now
    assert r.status_code == 429 and TOO_MANY in r.get_data(as_text=True)
    # the same limit for a name that does not exist: nothing to enumerate
    for _ in range(5):
        submit(client, form, "nobody-here", "wrong")
    assert submit(client, form, "nobody-here", "x").status_code == 429
    # another user from another address is not locked out
    other = client.application.test_client()
    form2 = password_page(other)
    r = submit(other, form2, "bob", "bob-ldap-pw", environ_base={"REMOTE_ADDR": "10.9.9.9"})
    assert r.status_code == 303


def test_per_username_limit_holds_across_addresses_and_spellings(client):
    """Guesses spread over five addresses, and over spellings the directory takes for the
    same name (case, surrounding spaces: uid matches ignoring them), count together."""
    form = password_page(client)
    for i, name in enumerate(["alice", "ALICE", " Alice", "alice ", "aLiCe"]):
        r = submit(client, form, name, "wrong", environ_base={"REMOTE_ADDR": f"10.7.0.{i}"})
        assert r.status_code == 401
    r = submit(client, form, "alice", "alice-ldap-pw", environ_base={"REMOTE_ADDR": "10.7.0.9"})
    assert r.status_code == 429 and TOO_MANY in r.get_data(as_text=True)


def test_per_address_attempt_limit(client):
    form = password_page(client)
    for i in range(20):
        assert submit(client, form, f"user{i}", "wrong").status_code == 401
    r = submit(client, form, "bob", "bob-ldap-pw")
    assert r.status_code == 429 and TOO_MANY in r.get_data(as_text=True)


def test_password_form_needs_its_csrf_token(client):
    form = password_page(client)
    r = submit(client, {**form, "csrf": "forged"}, "alice", "alice-ldap-pw")
    assert r.status_code == 400


def test_directory_stopped_mid_test_gives_clear_error(upstream_issuer, tmp_path):
    from civitas.app import create_app

    with servers.run_slapd(tmp_path / "short") as info:
        cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/gone.db")
        cfg["upstreams"].append(ldap_upstream(info))
        client = create_app(cfg).test_client()
        form = password_page(client)
        assert submit(client, form, "alice", "alice-ldap-pw").status_code == 303
        client = client.application.test_client()
        form = password_page(client)
    unavailable = metric("civitas_logins_total", upstream="staff", outcome="unavailable")
    r = submit(client, form, "alice", "alice-ldap-pw")  # slapd has stopped
    body = r.get_data(as_text=True)
    assert r.status_code == 502 and "could not be reached" in body
    assert metric("civitas_logins_total", upstream="staff",
                  outcome="unavailable") == unavailable + 1
    assert "Traceback" not in body and "reference" in body


def test_link_directory_credential_to_oidc_account(client, app):
    full_login(client, AuthRequest())  # alice via the OIDC upstream
    page = client.get("/account").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = client.post("/account/link", data={"csrf": csrf})
    flow = query(r.headers["Location"])["flow"]
    r = client.get(f"/login/staff/start?flow={flow}")
    form = {"csrf": csrf, "flow": flow}
    r = submit(client, form, "alice", "alice-ldap-pw")
    assert r.status_code == 303 and r.headers["Location"] == "/account"
    page = client.get("/account").get_data(as_text=True)
    assert STAFF in page and "Example ID" in page and "alice@agency.example" in page


def test_oidc_core_3_1_2_1_login_hint_starts_the_directory_form(client):
    """The agency's login_hint is the username the directory's form starts with (escaped as
    any value on the page); the citizen may sign in as someone else."""
    import html as html_mod

    auth = AuthRequest(extra={"login_hint": 'alice"<x>'})
    r = client.get(auth.url())
    page = client.get(path_of(r.headers["Location"])).get_data(as_text=True)
    link = re.search(r'href="(/login/staff/start\?flow=[^"]+)"', page).group(1)
    form = client.get(link.replace("&amp;", "&")).get_data(as_text=True)
    field = re.search(r'<input id="username"[^>]*>', form).group(0)
    value = re.search(r'value="([^"]*)"', field).group(1)
    assert "<" not in value and html_mod.unescape(value) == 'alice"<x>'
    fields = {name: re.search(rf'name="{name}" value="([^"]*)"', form).group(1)
              for name in ("csrf", "flow")}
    r = submit(client, fields, "bob", "bob-ldap-pw")
    assert r.status_code == 303, r.get_data(as_text=True)[:300]
