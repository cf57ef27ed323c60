"""Offline access needs the citizen's consent (OpenID Connect Core 11: the OP "MUST always
obtain consent to returning a Refresh Token that enables offline access").

It is put to the citizen as one more optional item of the agency's consent, never ticked in
advance; the agency gets a refresh token only while it is granted, and the citizen can
withdraw it alone from /account/consents, which ends the agency's refresh grants.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from jose import jwt as jose_jwt
from sqlalchemy import select

from idp.models import RefreshGrantRecord
from tests.flows import (
    AGENCY_ONE,
    AuthRequest,
    full_login,
    path_of,
    query,
    redeem,
)
from tests.test_consent_flow import CONSENT, answer, basic, evaluate, to_consent_page

OFFLINE = ["openid", "profile", "email", "offline_access"]
ASKED = "openid email offline_access"


@pytest.fixture
def consent_app(make_hub):
    """An agency whose claims rest on consent, and which may have refresh tokens."""
    return make_hub(agencies=[AGENCY_ONE.config(consent=CONSENT, scopes=OFFLINE)])


def boxes(page: str) -> dict[str, bool]:
    """The consent page's optional items: claim -> ticked."""
    return {value: "checked" in rest for value, rest in re.findall(
        r'<input type="checkbox" name="claim" value="([^"]+)"([^>]*)>', page)}


def consent_form(client: Any, response: Any) -> tuple[str, dict[str, str]]:
    assert response.status_code == 303, response.get_data(as_text=True)[:500]
    assert response.headers["Location"].startswith("/authorize/consent")
    page = client.get(path_of(response.headers["Location"])).get_data(as_text=True)
    return page, dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page))


def granted_offline(client: Any) -> dict[str, Any]:
    """Sign in, Allow with offline access ticked; the token response."""
    auth = AuthRequest(scope=ASKED)
    _, form = to_consent_page(client, auth)
    r = answer(client, form, "allow", claims=["offline_access"])
    return redeem(client, auth, query(r.headers["Location"])["code"]).json


def refresh(client: Any, token: str) -> Any:
    return client.post("/token", headers=basic(AGENCY_ONE), data={
        "grant_type": "refresh_token", "refresh_token": token})


def test_core_11_offline_access_is_asked_unticked_and_a_refresh_token_needs_it(consent_app):
    client = consent_app.test_client()
    auth = AuthRequest(scope=ASKED)
    page, form = to_consent_page(client, auth)
    assert "Access while you are away" in page
    assert boxes(page) == {"offline_access": False}  # never ticked for them

    # Allow without ticking it: signed in, no refresh token, and the scope says so
    r = answer(client, form, "allow")
    body = redeem(client, auth, query(r.headers["Location"])["code"]).json
    assert "refresh_token" not in body and body["scope"] == "openid email"
    assert "offline_access" not in jose_jwt.get_unverified_claims(body["id_token"])
    # the next request with it: left unticked stands, as for any optional item
    auth = AuthRequest(scope=ASKED)
    r = client.get(auth.url())
    assert r.status_code == 302
    body = redeem(client, auth, query(r.headers["Location"])["code"]).json
    assert "refresh_token" not in body and body["scope"] == "openid email"

    # prompt=consent asks again; ticked, it brings a refresh token
    auth = AuthRequest(scope=ASKED, extra={"prompt": "consent"})
    page, form = consent_form(client, client.get(auth.url()))
    assert boxes(page)["offline_access"] is False
    r = answer(client, form, "allow", claims=["offline_access"])
    body = redeem(client, auth, query(r.headers["Location"])["code"]).json
    assert body["scope"] == ASKED and refresh(client, body["refresh_token"]).status_code == 200
    userinfo = client.get("/userinfo", headers={
        "Authorization": f"Bearer {body['access_token']}"}).json
    assert "offline_access" not in userinfo and userinfo["email"]
    # and is remembered: the next request gets one without being asked
    auth = AuthRequest(scope=ASKED)
    r = client.get(auth.url())
    assert r.status_code == 302
    assert "refresh_token" in redeem(client, auth, query(r.headers["Location"])["code"]).json


def test_withdrawing_offline_access_alone_ends_the_refresh_grant_and_keeps_the_rest(
        consent_app):
    hub = consent_app.extensions["civitas"]
    client = consent_app.test_client()
    body = granted_offline(client)
    sub = jose_jwt.get_unverified_claims(body["id_token"])["sub"]
    assert evaluate(client, sub, "offline_access", "offline-access").json["decision"] is True

    refreshed = refresh(client, body["refresh_token"])  # used while away
    assert refreshed.status_code == 200
    live_token = refreshed.json["refresh_token"]
    with hub.db.session() as s:
        [(used, ends)] = s.execute(select(RefreshGrantRecord.rotated_at,
                                          RefreshGrantRecord.expires_at)).all()
    page = client.get("/account/consents").get_data(as_text=True)
    assert "Access while you are away" in page
    assert 'name="claim" value="offline_access"' in page  # its own Withdraw button
    # and when the agency last used it, and until when it can
    told = re.search(r'<p class="offline">(.*?)</p>', page, re.S)
    assert told, page
    assert " ".join(told.group(1).split()) == (
        f"Agency One can act for you while you are away: it last did on "
        f"{used:%Y-%m-%d %H:%M} UTC, and can until {ends:%Y-%m-%d} unless you withdraw it.")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = client.post("/account/consents/withdraw", data={
        "csrf": csrf, "client_id": AGENCY_ONE.client_id, "claim": "offline_access"})
    assert r.status_code == 303
    r = refresh(client, live_token)
    assert r.status_code == 400 and r.json["error"] == "invalid_grant"
    with hub.db.session() as s:
        assert list(s.scalars(select(RefreshGrantRecord.revoked_reason))) == [
            "consent_withdrawn"]
    # the rest of the consent stands; offline access is no longer granted
    assert evaluate(client, sub, "email", "benefits").json["decision"] is True
    assert evaluate(client, sub, "offline_access", "offline-access").json["decision"] is False
    assert 'class="offline"' not in client.get("/account/consents").get_data(as_text=True)
    auth = AuthRequest(scope=ASKED)
    r = client.get(auth.url())
    assert r.status_code == 302
    assert "refresh_token" not in redeem(client, auth, query(r.headers["Location"])["code"]).json


def test_a_public_task_agency_asks_for_offline_access_and_nothing_else(make_hub):
    """Claims on a public task need no consent (a notice is recorded instead), but offline
    access does: the page shows it, and its claims as required."""
    app = make_hub(agencies=[AGENCY_ONE.config(scopes=OFFLINE)])
    client = app.test_client()
    full_login(client, AuthRequest(scope="openid email"))  # no page without offline_access
    auth = AuthRequest(scope=ASKED)
    page, form = consent_form(client, client.get(auth.url()))
    assert boxes(page) == {"offline_access": False}
    assert "Your email" in page and "(required to sign in)" in page
    r = answer(client, form, "allow", claims=["offline_access"])
    body = redeem(client, auth, query(r.headers["Location"])["code"]).json
    assert body["scope"] == ASKED and refresh(client, body["refresh_token"]).status_code == 200


def test_an_agency_without_refresh_tokens_is_never_asked_about_offline_access(make_hub):
    """An agency not registered for ``offline_access`` gets no such item on its page, and
    asking for it is an invalid scope (RFC 6749 4.1.2.1)."""
    app = make_hub(agencies=[AGENCY_ONE.config(consent=CONSENT)])
    client = app.test_client()
    r = client.get(AuthRequest(scope="openid profile email offline_access").url())
    assert r.status_code == 302 and query(r.headers["Location"])["error"] == "invalid_scope"
    page, _ = to_consent_page(client, AuthRequest(scope="openid profile email"))
    assert boxes(page) == {"name": False} and "while you are away" not in page


def test_offline_access_ends_when_the_consent_does(make_hub):
    """A consent valid for a day (``consent_ttl_days``) gives a refresh grant that ends with
    it, not after the hub's refresh lifetime: offline access is part of that consent. The
    grant keeps that end through its rotations."""
    app = make_hub(agencies=[AGENCY_ONE.config(consent=dict(CONSENT, consent_ttl_days=1),
                                               scopes=OFFLINE)])
    hub = app.extensions["civitas"]
    client = app.test_client()
    body = granted_offline(client)
    [grant] = hub.consent.grants_for_account(hub.accounts.account_for_credential(
        "op", "alice-0001"))
    assert grant.expires_at is not None
    assert hub.settings.refresh_token_lifetime_seconds > 86400  # so the cap shows
    with hub.db.session() as s:
        [ends] = s.scalars(select(RefreshGrantRecord.expires_at))
    assert abs((ends - grant.expires_at).total_seconds()) < 1
    assert refresh(client, body["refresh_token"]).status_code == 200
    with hub.db.session() as s:
        assert [e for e in s.scalars(select(RefreshGrantRecord.expires_at))] == [ends]


def test_the_command_revokes_the_refresh_grants_issued_without_offline_consent(
        upstream_issuer, tmp_path):
    """``civitas tokens revoke-unconsented``: grants issued before offline access needed the
    citizen's consent (made here directly, as that code did) are revoked, with their
    reason; one whose citizen granted it stays; ``--dry-run`` only counts."""
    import yaml
    from click.testing import CliRunner

    from civitas.app import create_app
    from civitas.cli import main
    from tests.conftest import hub_config
    from tests.flows import citizen

    config = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/cli.db",
                        agencies=[AGENCY_ONE.config(consent=CONSENT, scopes=OFFLINE)])
    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(config))
    app = create_app(config)
    hub = app.extensions["civitas"]
    try:
        client = app.test_client()
        consented = granted_offline(client)["refresh_token"]
        provider = hub.server.hub
        agency = hub.agencies.client(AGENCY_ONE.client_id)
        grant = dict(client_id=AGENCY_ONE.client_id, scope=ASKED, sid="s",
                     acr="urn:civitas:acr:ial1:aal1", amr=("pwd",), auth_time=0)
        declined = citizen(hub, "declined")  # allowed the rest, left offline access unticked
        hub.consent.record_decision(declined, provider.policy_for(agency),
                                    provider.subject_for(agency, declined), ())
        old = {name: provider.refresh_tokens.issue(grant_id=name, account_id=account, **grant)
               for name, account in (("declined", declined),
                                     ("never-asked", citizen(hub, "never-asked")))}

        def run(*args: str) -> str:
            result = CliRunner().invoke(main, ["--config", str(path), "tokens",
                                               "revoke-unconsented", *args],
                                        catch_exceptions=False)
            assert result.exit_code == 0, result.output
            return result.output

        assert "3 live refresh grant(s); would revoke 2" in run("--dry-run")
        assert all(refresh(client, t).status_code == 200 for t in (consented, *old.values()))
        assert "3 live refresh grant(s); revoked 2" in run()
        with hub.db.session() as s:
            reasons = dict(s.execute(select(RefreshGrantRecord.grant_id,
                                            RefreshGrantRecord.revoked_reason)).all())
        assert reasons.pop("declined") == reasons.pop("never-asked") == "no_offline_consent"
        assert list(reasons.values()) == [None]  # the consented one
        assert "1 live refresh grant(s); revoked 0" in run()
    finally:
        hub.db.dispose()


def test_core_11_prompt_none_ignores_an_offline_access_never_granted(consent_app):
    """With no page to ask on (``prompt=none``), offline access never granted is ignored:
    a code without it, not ``consent_required``; anything else still unanswered is."""
    client = consent_app.test_client()
    auth = AuthRequest(scope="openid email")
    _, form = to_consent_page(client, auth)
    assert answer(client, form, "allow").status_code == 302  # email given; never asked offline
    auth = AuthRequest(scope=ASKED, extra={"prompt": "none"})
    r = client.get(auth.url())
    assert r.status_code == 302 and "code" in query(r.headers["Location"])
    body = redeem(client, auth, query(r.headers["Location"])["code"]).json
    assert "refresh_token" not in body and body["scope"] == "openid email"
    # a claim never asked for is still consent_required
    r = client.get(AuthRequest(scope="openid profile email offline_access",
                               extra={"prompt": "none"}).url())
    assert query(r.headers["Location"])["error"] == "consent_required"
    # and without prompt=none the citizen is asked
    r = client.get(AuthRequest(scope=ASKED).url())
    assert r.status_code == 303 and r.headers["Location"].startswith("/authorize/consent")
