"""Account linking, unlinking, deletion and attribute provenance (broker/), through full
logins at the real upstream OP. Two connectors ('op' and 'op-es') point at that OP: to the hub
they are two different credentials, as a state ID and a bank ID would be."""

from __future__ import annotations

import re

import pytest
from jose import jwt as jose_jwt
from sqlalchemy import func, select

from broker.models import AccountAttribute, ConstituentAccount, LinkedIdentity
from connectors import UpstreamIdentity
from tests.conftest import HIGH_ACR, LOW_ACR, bank_id_upstream, hub_config
from tests.flows import (
    AuthRequest,
    full_login,
    path_of,
    query,
    redeem,
    upstream_login,
)

LOW, HIGH = LOW_ACR, HIGH_ACR


@pytest.fixture
def config(upstream_issuer, tmp_path):
    """Two upstreams (the conftest's ``app`` builds the hub from this)."""
    cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/link.db")
    cfg["upstreams"].append(bank_id_upstream(upstream_issuer))
    cfg["attribute_source_ranking"] = ["op-es", "op"]
    return cfg


def csrf(client):
    page = client.get("/account").get_data(as_text=True)
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def start_link(client, upstream_id="op-es"):
    """From the account page to the upstream's login URL for linking."""
    r = client.post("/account/link", data={"csrf": csrf(client)})
    assert r.status_code == 303, r.get_data(as_text=True)
    flow = query(r.headers["Location"])["flow"]
    r = client.get(f"/login/{upstream_id}/start?flow={flow}")
    assert r.status_code == 303
    return r.headers["Location"]


def account_id(hub, connector_id, subject):
    with hub.db.session() as s:
        return s.scalars(select(LinkedIdentity.account_id).where(
            LinkedIdentity.connector_id == connector_id,
            LinkedIdentity.upstream_subject == subject)).one_or_none()


def count_accounts(hub):
    with hub.db.session() as s:
        return s.scalar(select(func.count()).select_from(ConstituentAccount))


def test_link_second_credential_and_show_it(client, hub):
    full_login(client, AuthRequest())
    callback = upstream_login(start_link(client), "alice")
    r = client.get(path_of(callback))
    assert r.status_code == 303 and r.headers["Location"] == "/account"
    page = client.get("/account").get_data(as_text=True)
    assert "The new way to sign in was added" in page
    assert "Example ID" in page and "Bank ID" in page and "Sign-in added" in page
    # the assurance in words a citizen reads, the value itself beside it
    assert ("Identity not checked against documents; signed in with one factor (such as a "
            'password) <span class="muted"><code>urn:civitas:acr:ial1:aal1</code>') in page
    assert account_id(hub, "op-es", "alice-0001") == account_id(hub, "op", "alice-0001")
    assert count_accounts(hub) == 1
    # afterwards, signing in with the linked credential reaches the same account
    other = client.application.test_client()
    full_login(other, AuthRequest(), upstream_id="op-es")
    assert count_accounts(hub) == 1


def test_replayed_link_callback_fails(client, hub):
    full_login(client, AuthRequest())
    callback = upstream_login(start_link(client), "alice")
    assert client.get(path_of(callback)).status_code == 303
    r = client.get(path_of(callback))
    assert r.status_code == 400 and "expired" in r.get_data(as_text=True)


def test_link_callback_in_another_browser_links_nothing(client, hub):
    """Login CSRF on linking: a victim's browser fed the attacker's link callback."""
    full_login(client, AuthRequest(), username="bob")            # the attacker
    callback = upstream_login(start_link(client), "bob")
    victim = client.application.test_client()
    full_login(victim, AuthRequest(), username="alice")
    r = victim.get(path_of(callback))
    assert r.status_code == 400
    assert account_id(hub, "op-es", "bob-0002") is None
    assert account_id(hub, "op", "alice-0001") != account_id(hub, "op", "bob-0002")


def test_link_finished_after_another_citizen_signed_in_links_nothing(client, hub):
    """A link flow belongs to the account that started it: if someone else has signed in
    in the same browser since, its callback adds the credential to neither account."""
    full_login(client, AuthRequest(), username="alice")
    callback = upstream_login(start_link(client), "alice")
    full_login(client, AuthRequest(extra={"prompt": "login"}), username="bob")
    r = client.get(path_of(callback))
    assert r.status_code == 400 and "expired" in r.get_data(as_text=True)
    assert account_id(hub, "op-es", "alice-0001") is None
    with hub.db.session() as s:
        assert s.scalar(select(func.count()).select_from(LinkedIdentity)) == 2  # op only
    assert account_id(hub, "op", "alice-0001") != account_id(hub, "op", "bob-0002")


def test_credential_of_another_account_cannot_be_linked(client, hub):
    other = client.application.test_client()
    full_login(other, AuthRequest(), username="bob", upstream_id="op-es")  # account B
    full_login(client, AuthRequest(), username="alice")                   # account A
    callback = upstream_login(start_link(client), "bob")
    r = client.get(path_of(callback))
    assert r.status_code == 409
    assert "already linked to another Civitas account" in r.get_data(as_text=True)
    assert account_id(hub, "op-es", "bob-0002") != account_id(hub, "op", "alice-0001")
    with hub.db.session() as s:
        assert s.scalar(select(func.count()).select_from(LinkedIdentity)) == 2


def test_same_email_at_second_upstream_creates_new_account(client, hub):
    full_login(client, AuthRequest(), username="alice", upstream_id="op")
    full_login(client.application.test_client(), AuthRequest(), username="alice",
               upstream_id="op-es")
    assert count_accounts(hub) == 2
    assert account_id(hub, "op", "alice-0001") != account_id(hub, "op-es", "alice-0001")
    # the premise: both upstreams really did assert the same email
    assert {hub.accounts.attributes(account_id(hub, c, "alice-0001")).get("email")
            for c in ("op", "op-es")} == {"alice@example.org"}


def test_linking_never_raises_assurance(client, hub):
    auth = AuthRequest()
    params = full_login(client, auth)             # low-assurance upstream
    callback = upstream_login(start_link(client), "alice")
    r = client.get(path_of(callback))             # high-assurance credential linked
    assert r.status_code == 303 and r.headers["Location"] == "/account"
    assert account_id(hub, "op-es", "alice-0001") == account_id(hub, "op", "alice-0001")
    auth2 = AuthRequest()
    r = client.get(auth2.url())                   # SSO with the same hub session
    params = query(r.headers["Location"])
    claims = jose_jwt.get_unverified_claims(redeem(client, auth2, params["code"]).json["id_token"])
    assert claims["acr"] == LOW
    fresh = client.application.test_client()
    auth3 = AuthRequest()
    params = full_login(fresh, auth3, upstream_id="op")
    claims = jose_jwt.get_unverified_claims(redeem(fresh, auth3, params["code"]).json["id_token"])
    assert claims["acr"] == LOW
    # the linked credential is high assurance when it is the one used to sign in
    auth4 = AuthRequest()
    bank = client.application.test_client()
    params = full_login(bank, auth4, upstream_id="op-es")
    claims = jose_jwt.get_unverified_claims(redeem(bank, auth4, params["code"]).json["id_token"])
    assert claims["acr"] == HIGH


def test_unlink_allowed_while_another_remains_but_not_the_last(client, hub):
    full_login(client, AuthRequest())
    client.get(path_of(upstream_login(start_link(client), "alice")))
    with hub.db.session() as s:
        links = {li.connector_id: li.id for li in s.scalars(select(LinkedIdentity))}
    # a forged form without the token changes nothing (two credentials: only the form
    # token check can refuse it)
    r = client.post(f"/account/identities/{links['op-es']}/unlink", data={"csrf": "x"})
    assert r.status_code == 400 and "This form has expired" in r.get_data(as_text=True)
    assert account_id(hub, "op-es", "alice-0001") is not None
    r = client.post(f"/account/identities/{links['op-es']}/unlink", data={"csrf": csrf(client)})
    assert r.status_code == 303
    page = client.get("/account").get_data(as_text=True)
    assert "Sign-in removed" in page
    with hub.db.session() as s:
        assert s.scalar(select(func.count()).select_from(AccountAttribute).where(
            AccountAttribute.source_connector == "op-es")) == 0
    r = client.post(f"/account/identities/{links['op']}/unlink", data={"csrf": csrf(client)})
    assert r.status_code == 409 and "only way you can sign in" in r.get_data(as_text=True)
    assert account_id(hub, "op", "alice-0001") is not None


def test_credential_of_another_account_cannot_be_unlinked(client, hub):
    """The unlink form names a credential by its number: one of another account is refused
    as not this account's, even when this account has a second credential to spare (so the
    last-credential check cannot be what refuses it)."""
    full_login(client.application.test_client(), AuthRequest(), username="bob")  # account B
    full_login(client, AuthRequest(), username="alice")                          # account A
    assert client.get(path_of(upstream_login(start_link(client), "alice"))).status_code == 303
    with hub.db.session() as s:
        [bobs] = s.scalars(select(LinkedIdentity.id).where(
            LinkedIdentity.upstream_subject == "bob-0002")).all()
    r = client.post(f"/account/identities/{bobs}/unlink", data={"csrf": csrf(client)})
    # not found, as an id that no one has: the citizen learns nothing of another account
    nobodys = client.post(f"/account/identities/{bobs + 1000}/unlink",
                          data={"csrf": csrf(client)})
    assert r.status_code == nobodys.status_code == 404
    assert "not linked to your account" in r.get_data(as_text=True)
    assert r.get_data(as_text=True).replace(r.headers.get("X-Request-ID", ""), "") == \
        nobodys.get_data(as_text=True).replace(nobodys.headers.get("X-Request-ID", ""), "")
    assert account_id(hub, "op", "bob-0002") is not None
    assert account_id(hub, "op-es", "alice-0001") == account_id(hub, "op", "alice-0001")


def test_account_deletion_erases_and_revokes(client, hub):
    auth = AuthRequest()
    params = full_login(client, auth)
    token = redeem(client, auth, params["code"]).json["access_token"]
    old_account = account_id(hub, "op", "alice-0001")
    r = client.post("/account/delete", data={"csrf": csrf(client)})
    assert r.status_code == 400  # the confirmation box was not ticked
    r = client.post("/account/delete", data={"csrf": csrf(client), "confirm": "delete"})
    assert r.status_code == 303
    assert "account is deleted" in client.get(path_of(r.headers["Location"])).get_data(
        as_text=True)
    assert client.get("/userinfo", headers={"Authorization": f"Bearer {token}"}
                      ).status_code == 401
    assert client.get("/account").status_code == 302
    with hub.db.session() as s:
        assert s.scalar(select(func.count()).select_from(AccountAttribute)) == 0
        assert s.scalar(select(func.count()).select_from(LinkedIdentity)) == 0
        account = s.get(ConstituentAccount, old_account)
        assert account is not None and account.deleted_at is not None  # pseudonymous stub
    kinds = [e.kind for e in hub.accounts.events(old_account)]
    assert kinds[:2] == ["erased", "deleted"] and "created" in kinds
    # signing in again with the same credential starts a new, empty account
    full_login(client.application.test_client(), AuthRequest())
    assert account_id(hub, "op", "alice-0001") not in (None, old_account)


def test_attribute_provenance_keeps_both_values_and_releases_ranked_source(client, hub):
    full_login(client, AuthRequest())
    aid = account_id(hub, "op", "alice-0001")
    hub.accounts.link(aid, UpstreamIdentity(
        connector_id="op-es", subject="alice-bank", acr=HIGH,
        attributes={"email": "alice@bank.example", "name": "Alice B. Example"}))
    records = [r for r in hub.accounts.attribute_records(aid) if r.name == "email"]
    assert {(r.value, r.source, r.released) for r in records} == {
        ("alice@bank.example", "op-es", True), ("alice@example.org", "op", False)}
    assert hub.accounts.attributes(aid)["email"] == "alice@bank.example"
    page = client.get("/account").get_data(as_text=True)
    assert "alice@bank.example" in page and "alice@example.org" in page and HIGH in page
    # and the agency gets the ranked value
    auth = AuthRequest()
    r = client.get(auth.url())
    code = query(r.headers["Location"])["code"]
    claims = jose_jwt.get_unverified_claims(redeem(client, auth, code).json["id_token"])
    assert claims["email"] == "alice@bank.example"


def test_link_requires_sign_in(client):
    # an anonymous session with a valid form token: only the sign-in check can refuse
    with client.session_transaction() as session:
        session["csrf"] = "anonymous-form-token"
    r = client.post("/account/link", data={"csrf": "anonymous-form-token"})
    assert r.status_code == 303 and r.headers["Location"] == "/login"  # no link flow
    with client.session_transaction() as session:
        assert not session.get("flows") and "login" not in session


def test_link_start_needs_the_form_token(client):
    """A cross-site form post cannot start a link flow in a signed-in citizen's browser:
    only the form token check refuses it (the citizen is signed in)."""
    full_login(client, AuthRequest())
    for given in ({"csrf": "forged"}, {}):
        r = client.post("/account/link", data=given)
        assert r.status_code == 400 and "This form has expired" in r.get_data(as_text=True)
    with client.session_transaction() as session:
        assert session.get("login")
        assert not [f for f in (session.get("flows") or {}).values()
                    if (f.get("payload") or {}).get("purpose") == "link"]


def test_account_events_are_ledger_entries_without_personal_data(client, hub):
    full_login(client, AuthRequest())
    client.get(path_of(upstream_login(start_link(client), "alice")))
    aid = account_id(hub, "op", "alice-0001")
    r = client.post("/account/delete", data={"csrf": csrf(client), "confirm": "delete"})
    assert r.status_code == 303
    entries = list(hub.ledger.entries(None, None, None))
    kinds = [e.kind for e in entries]
    for kind in ("account.created", "account.linked", "account.deleted"):
        assert kind in kinds, kinds
    for e in entries:  # pseudonymous: neither the account id nor the person appears
        assert aid not in e.entry and "alice" not in e.entry.lower()


@pytest.mark.parametrize("acr, words", [
    ("urn:civitas:acr:ial2:aal2",
     "Identity checked against documents; signed in with two factors"),
    ("urn:civitas:acr:ial3:aal3", "Identity checked in person; signed in with a hardware key"),
    ("urn:example:loa:substantial", "urn:example:loa:substantial"),  # an operator's own value
    ("urn:civitas:acr:ial4:aal1", "urn:civitas:acr:ial4:aal1"), (None, ""),
])
def test_assurance_in_plain_words(acr, words):
    from broker.views import assurance_words

    assert assurance_words(acr) == words


def test_the_account_page_shows_times_in_the_jurisdictions_zone(make_hub):
    """display_timezone: the citizen reads times in the zone of the jurisdiction the hub
    serves, its abbreviation beside them (stored times stay UTC); UTC by default."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    for zone, app in (("UTC", make_hub()), ("Europe/Tallinn",
                                            make_hub(display_timezone="Europe/Tallinn"))):
        client = app.test_client()
        full_login(client, AuthRequest())
        before = datetime.now(ZoneInfo(zone))
        page = client.get("/account").get_data(as_text=True)
        shown = re.findall(r"<td>(\d{4}-\d\d-\d\d \d\d:\d\d) ([A-Z+0-9-]+)</td>", page)
        assert shown, page
        for when, abbreviation in shown:
            assert abbreviation == before.strftime("%Z")
            at = datetime.strptime(when, "%Y-%m-%d %H:%M").replace(tzinfo=ZoneInfo(zone))
            assert abs((at - before).total_seconds()) < 600  # this login's, in that zone
