"""Full brokered logins: agency -> Civitas -> real upstream OP (npm oidc-provider) -> agency."""

from __future__ import annotations

import hashlib
import re
import time
import types
from pathlib import Path

import pytest
from jose import jwt as jose_jwt

from tests.conftest import HUB_ISSUER
from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest, full_login, query, redeem
from tests.flows import TestAgency as Agency


def test_login_issues_code_with_state_and_iss_rfc9207(client):
    auth = AuthRequest()
    params = full_login(client, auth)
    assert params["state"] == auth.state
    assert params["iss"] == HUB_ISSUER
    assert len(params["code"]) >= 32


def test_token_response_and_id_token_claims(client, hub):
    auth = AuthRequest()
    params = full_login(client, auth)
    r = redeem(client, auth, params["code"])
    assert r.status_code == 200, r.json
    body = r.json
    assert body["token_type"] == "Bearer" and body["expires_in"] > 0
    assert r.headers["Cache-Control"] == "no-store"
    jwks = client.get("/jwks").json
    # python-jose is what many agency apps verify tokens with.
    claims = jose_jwt.decode(body["id_token"], jwks, algorithms=["ES256"],
                             audience=AGENCY_ONE.client_id, issuer=HUB_ISSUER,
                             access_token=body["access_token"])
    assert claims["nonce"] == auth.nonce
    assert claims["acr"] == "urn:civitas:acr:ial1:aal1"
    assert abs(claims["auth_time"] - time.time()) < 120
    assert claims["exp"] > claims["iat"]
    assert claims["email"] == "alice@example.org" and claims["name"] == "Alice Example"
    assert "at_hash" in claims and "sid" in claims
    header = jose_jwt.get_unverified_header(body["id_token"])
    assert header["kid"] in {k["kid"] for k in jwks["keys"]}
    # the sub is pairwise: not the upstream's subject, not the account id
    assert claims["sub"] != "alice-0001"
    assert claims["sub"] != _account_id(hub)


def _account_id(hub):
    from sqlalchemy import select

    from broker.models import LinkedIdentity

    with hub.db.session() as s:
        return s.scalars(select(LinkedIdentity.account_id)).one()


def test_userinfo_returns_same_sub_and_scoped_claims(client):
    auth = AuthRequest(scope="openid email")
    params = full_login(client, auth)
    body = redeem(client, auth, params["code"]).json
    id_claims = jose_jwt.get_unverified_claims(body["id_token"])
    r = client.get("/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert r.status_code == 200
    assert r.json["sub"] == id_claims["sub"]
    assert r.json["email"] == "alice@example.org"
    assert "name" not in r.json  # profile scope was not asked for


def test_pairwise_sub_differs_between_agencies_and_is_stable(client):
    subs = []
    for agency in (AGENCY_ONE, AGENCY_TWO, AGENCY_ONE):
        auth = AuthRequest(agency=agency)
        browser = client.application.test_client()  # a fresh browser: full upstream login
        params = full_login(browser, auth)
        body = redeem(browser, auth, params["code"]).json
        subs.append(jose_jwt.get_unverified_claims(body["id_token"])["sub"])
    assert subs[0] != subs[1]
    assert subs[0] == subs[2]


def test_pairwise_sub_is_per_sector_not_per_agency_oidc_core_8_1(make_hub):
    """OpenID Connect Core 8.1: the subject is computed per sector. An agency that declares
    agency one's sector gets agency one's `sub` although its own host and client differ; one
    on another host of its own does not."""
    same_sector = Agency("agency-one-batch", "s3-" + "c" * 40,
                         "https://batch.one-services.example/cb", "Agency One (batch)")
    own_sector = Agency("agency-other", "s4-" + "d" * 40,
                        "https://other.agency.example/cb", "Other Agency")
    app = make_hub(agencies=[AGENCY_ONE.config(), AGENCY_TWO.config(),
                             same_sector.config(sector_identifier="one.agency.example"),
                             own_sector.config()])
    client = app.test_client()
    subs = {}
    for agency in (AGENCY_ONE, same_sector, own_sector):  # one login, then single sign-on
        auth = AuthRequest(agency=agency)
        if subs:
            r = client.get(auth.url())
            assert r.status_code == 302 and "code=" in r.headers["Location"], r.headers
            code = query(r.headers["Location"])["code"]
        else:
            code = full_login(client, auth)["code"]
        body = redeem(client, auth, code).json
        subs[agency.client_id] = jose_jwt.get_unverified_claims(body["id_token"])["sub"]
    assert subs[same_sector.client_id] == subs[AGENCY_ONE.client_id]
    assert subs[own_sector.client_id] != subs[AGENCY_ONE.client_id]


def test_second_agency_uses_hub_session_without_upstream_login(client):
    full_login(client, AuthRequest(agency=AGENCY_ONE))
    auth = AuthRequest(agency=AGENCY_TWO)
    r = client.get(auth.url())
    assert r.status_code == 302
    assert r.headers["Location"].startswith(AGENCY_TWO.redirect_uri + "?code=")


def test_first_login_creates_one_account_and_returning_login_reuses_it(client, hub):
    from sqlalchemy import func, select

    from broker.models import ConstituentAccount, LinkedIdentity

    full_login(client, AuthRequest())
    full_login(hub_client := client.application.test_client(), AuthRequest())
    with hub.db.session() as s:
        assert s.scalar(select(func.count()).select_from(ConstituentAccount)) == 1
        link = s.scalars(select(LinkedIdentity)).one()
        assert (link.connector_id, link.upstream_subject) == ("op", "alice-0001")
    full_login(hub_client.application.test_client(), AuthRequest(), username="bob")
    with hub.db.session() as s:
        assert s.scalar(select(func.count()).select_from(ConstituentAccount)) == 2


def test_attributes_are_encrypted_at_rest(client, hub):
    from sqlalchemy import select

    from broker.models import AccountAttribute

    full_login(client, AuthRequest())
    with hub.db.session() as s:
        rows = s.scalars(select(AccountAttribute)).all()
    assert {r.name for r in rows} >= {"email", "name"}
    for row in rows:
        assert "alice" not in row.value_encrypted.lower()
        assert row.source_connector == "op" and row.acr == "urn:civitas:acr:ial1:aal1"


def _session_cookie(client):
    cookie = client.get_cookie("civitas_session")
    return cookie.value if cookie else None


def session_key(sid: str) -> str:
    """Where the store keeps a browser session: under the SHA-256 of its cookie's id."""
    return "session:" + hashlib.sha256(sid.encode()).hexdigest()


def test_session_id_regenerated_at_login_and_old_id_dead(client, app):
    from tests.flows import finish_login, start_login, upstream_login

    auth = AuthRequest()
    callback = upstream_login(start_login(client, auth))
    before = _session_cookie(client)
    assert before
    r = finish_login(client, callback)
    assert r.status_code == 302
    after = _session_cookie(client)
    assert after and after != before
    # the pre-login session's record (its flow, its upstream state) is gone from the store,
    # not merely left without a login; the new id names the session that holds the login
    store = app.extensions["civitas"].store
    assert store.get(session_key(before)) is None
    assert store.get(session_key(after))["login"]
    # the pre-login id no longer names a session: it cannot be used to reach the account
    attacker = app.test_client()
    attacker.set_cookie("civitas_session", before, domain="localhost")
    r = attacker.get("/account")
    assert r.status_code == 302 and r.headers["Location"].startswith("/login")


def test_session_cookie_flags(client):
    full_login(client, AuthRequest())
    r = client.get("/account")
    header = [h for h in r.headers.getlist("Set-Cookie") if h.startswith("civitas_session")]
    # the account page does not re-set the cookie unless the session changed; log in again
    r = client.get(AuthRequest(extra={"prompt": "login"}).url())
    header = [h for h in r.headers.getlist("Set-Cookie") if h.startswith("civitas_session")]
    assert header, r.headers
    assert "HttpOnly" in header[0] and "SameSite=Lax" in header[0]
    assert "Secure" not in header[0]  # the test issuer is loopback http


def test_account_page_and_logout(client):
    full_login(client, AuthRequest())
    r = client.get("/account")
    page = r.get_data(as_text=True)
    assert r.status_code == 200 and "Example ID" in page and "alice@example.org" in page
    token = page.split('name="csrf" value="')[1].split('"')[0]
    assert client.post("/logout", data={"csrf": "wrong"}).status_code == 400
    signed_in = _session_cookie(client)
    r = client.post("/logout", data={"csrf": token})
    assert r.status_code == 303
    assert client.get("/account").status_code == 302
    # the session ended at the hub, not only in this browser: its old cookie, sent again
    # (a copy an attacker kept), opens nothing
    replay = client.application.test_client()
    replay.set_cookie("civitas_session", signed_in, domain="localhost")
    assert replay.get("/account").status_code == 302
    # after logout an agency gets no silent login
    r = client.get(AuthRequest(extra={"prompt": "none"}).url())
    assert "error=login_required" in r.headers["Location"]


def test_session_cookie_secure_when_issuer_is_https(make_hub):
    app = make_hub(issuer="https://login.example.gov")
    client = app.test_client()
    r = client.get("/login", base_url="https://login.example.gov")
    assert r.status_code == 302
    header = next(h for h in r.headers.getlist("Set-Cookie")
                  if h.startswith("__Host-civitas_session="))  # host-only (ASVS 3.4.4)
    assert "Secure" in header and "HttpOnly" in header and "SameSite=Lax" in header


def readme_id_token_check() -> str:
    """The python-jose block of README.md that agency developers copy."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    [block] = [b for b in blocks if "jwt.decode(id_token" in b]
    return block


def test_readme_id_token_check_takes_the_id_token_and_nothing_else_the_hub_signs(client, hub):
    """OpenID Connect Core 3.1.3.7 and RFC 8725 3.11, with the library agencies use: the
    README's check passes this sign-in's ID token, and refuses every other JWS the hub signs
    with the same key for the same agency (its access token, a logout token, a security
    event, a consent receipt) and an ID token of another sign-in."""
    from jose.exceptions import JOSEError

    from idp.backchannel import mint_logout_token, mint_security_event

    block = readme_id_token_check()
    auth = AuthRequest()
    body = redeem(client, auth, full_login(client, auth)["code"]).json
    jwks = client.get("/jwks").json

    def check(id_token: str, nonce: str = auth.nonce) -> dict:
        fake = types.SimpleNamespace(get=lambda url, timeout: types.SimpleNamespace(
            json=lambda: jwks))
        scope = {"requests": fake, "issuer": HUB_ISSUER, "client_id": AGENCY_ONE.client_id,
                 "id_token": id_token, "access_token": body["access_token"], "nonce": nonce}
        exec(block, scope)  # noqa: S102 (the README's own code, run as agencies run it)
        return scope["claims"]

    assert check(body["id_token"])["sub"]
    key = hub.keys.signing_key("ES256")
    sub = jose_jwt.get_unverified_claims(body["id_token"])["sub"]
    now = int(time.time())
    others = {
        "access token": body["access_token"],
        "logout token": mint_logout_token(key, issuer=HUB_ISSUER, client_id=AGENCY_ONE.client_id,
                                          sub=sub, sid="s", now=now),
        "security event": mint_security_event(
            key, issuer=HUB_ISSUER, client_id=AGENCY_ONE.client_id, sub=sub, withdrawn=[],
            complete=True, event_time=now, now=now),
        # (a receipt names its citizen otherwise; given a sub, it still does not pass)
        "consent receipt": hub.server.hub.consent.signer.sign({"sub": sub, "iat": now}),
    }
    for name, token in others.items():
        assert jose_jwt.decode(token, jwks, algorithms=["ES256"],  # each is validly signed
                               options={"verify_aud": False})
        with pytest.raises((JOSEError, ValueError)):
            check(token)
            pytest.fail(f"the README's check took a {name} for an ID token")
    with pytest.raises(ValueError, match="not the ID token of this sign-in"):
        check(body["id_token"], nonce="the nonce of another sign-in")
