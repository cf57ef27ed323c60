"""Consent end to end through the hub: the consent page at login, partial consent, deny,
prompt=none, re-consent after a new notice, the decision API, receipts, and withdrawal that
takes effect (decisions, tokens, back-channel logout)."""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import pytest
from jose import jws as jose_jws
from jose import jwt as jose_jwt
from sqlalchemy import select

from idp.models import RefreshGrantRecord
from tests.conftest import HUB_ISSUER, hub_config
from tests.flows import (
    AGENCY_ONE,
    AGENCY_TWO,
    AuthRequest,
    finish_login,
    path_of,
    query,
    redeem,
    start_login,
    upstream_login,
)

CONSENT = {
    "notice_url": "https://one.agency.example/privacy", "notice_version": "v1",
    "contact_name": "Benefits Privacy Office", "contact_email": "privacy@one.agency.example",
    "contact_phone": "+1 555 0199", "contact_address": "2 Agency Row, Springfield",
    "contact_country": "US", "contact_url": "https://one.agency.example/privacy-office",
    "purpose_labels": {"benefits": "to decide your benefit claim",
                       "newsletter": "to send you news about the programme"},
    "claims": [
        {"claim": "email", "purposes": ["benefits"], "lawful_basis": "consent",
         "required": True, "description": "Your email address"},
        {"claim": "name", "purposes": ["newsletter"], "lawful_basis": "consent",
         "required": False, "description": "Your full name"},
    ],
}


class Receiver:
    """A real agency endpoint on 127.0.0.1 recording what it receives: the path of every
    POST, and the logout token of each back-channel logout (``url``). A POST to a path
    ending in ``/events`` is a Security Event Token (RFC 8935 2: answered 202)."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.received: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.received.append(self.path)
                events = self.path.endswith("/events")
                if not events:
                    receiver.tokens.append(parse_qs(body.decode())["logout_token"][0])
                self.send_response(202 if events else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = f"{self.base}/backchannel"


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def make(upstream_issuer, tmp_path, receiver=None, notice_version="v1", name="c.db",
         **overrides):
    from civitas.app import create_app

    decl = dict(CONSENT, notice_version=notice_version)
    extra = {"backchannel_logout_uri": receiver.url} if receiver else {}
    cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/{name}", agencies=[
        AGENCY_ONE.config(consent=decl, scopes=["openid", "profile", "email",
                                                "offline_access"], **extra),
        AGENCY_TWO.config()], backchannel_dispatcher=False, **overrides)
    return create_app(cfg)


@pytest.fixture
def app(upstream_issuer, tmp_path, receiver):
    app = make(upstream_issuer, tmp_path, receiver)
    yield app
    app.extensions["civitas"].db.dispose()


def to_consent_page(client, auth):
    callback = upstream_login(start_login(client, auth))
    r = finish_login(client, callback, consent=False)
    assert r.status_code == 303 and r.headers["Location"].startswith("/authorize/consent")
    page = client.get(path_of(r.headers["Location"])).get_data(as_text=True)
    form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page))
    return page, form


def answer(client, form, decision, claims=()):
    return client.post("/authorize/consent", data={**form, "decision": decision,
                                                   "claim": list(claims)})


def basic(agency):
    return {"Authorization": "Basic " + base64.b64encode(
        f"{agency.client_id}:{agency.secret}".encode()).decode()}


def evaluate(client, sub, claim, purpose, agency=AGENCY_ONE):
    return client.post("/access/v1/evaluation", headers=basic(agency), json={
        "subject": {"type": "user", "id": sub}, "action": {"name": "use"},
        "resource": {"type": "claim", "id": claim}, "context": {"purpose": purpose}})


def test_consent_page_shows_what_a_citizen_needs(client):
    page, form = to_consent_page(client, AuthRequest())
    assert "Agency One" in page and "https://one.agency.example/privacy" in page
    assert "to decide your benefit claim" in page and "Your email address" in page
    assert re.search(r'type="checkbox" name="claim" value="name"', page)  # optional
    assert not re.search(r'type="checkbox" name="claim" value="email"', page)  # required
    assert "Allow" in page and "Deny" in page and form["csrf"]


def test_partial_consent_releases_only_granted_claims(client):
    auth = AuthRequest()
    _, form = to_consent_page(client, auth)
    r = answer(client, form, "allow")  # optional "name" left unticked
    assert r.status_code == 302
    params = query(r.headers["Location"])
    body = redeem(client, auth, params["code"]).json
    claims = jose_jwt.get_unverified_claims(body["id_token"])
    assert claims["email"] == "alice@example.org" and "name" not in claims
    info = client.get("/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert info.json["email"] == "alice@example.org" and "name" not in info.json
    # the next login of this agency is not interrupted
    r = client.get(AuthRequest().url())
    assert r.status_code == 302 and "code" in query(r.headers["Location"])


def test_deny_returns_access_denied(client, app):
    auth = AuthRequest()
    _, form = to_consent_page(client, auth)
    r = answer(client, form, "deny")
    params = query(r.headers["Location"])
    assert params["error"] == "access_denied" and params["state"] == auth.state
    assert params["iss"] == HUB_ISSUER
    # the refusal is a consent event of its own, with its ledger entry
    hub = app.extensions["civitas"]
    [entry] = [json.loads(e.entry)["data"] for e in hub.ledger.entries(None, None, None)
               if e.kind.startswith("consent.")]
    assert entry["state"] == "refused" and entry["agency"] == AGENCY_ONE.client_id
    assert entry["affected"] == ["email", "name"] and entry["claims"] == {}


def test_consent_form_needs_csrf_and_is_single_use(client):
    _, form = to_consent_page(client, AuthRequest())
    assert answer(client, {**form, "csrf": "forged"}, "allow").status_code == 400
    assert answer(client, form, "allow").status_code == 302
    assert answer(client, form, "allow").status_code == 400  # replayed


def test_prompt_none_without_consent_is_consent_required(client):
    auth = AuthRequest(agency=AGENCY_TWO)  # public-task agency: logs the citizen in
    callback = upstream_login(start_login(client, auth))
    finish_login(client, callback)
    auth = AuthRequest(extra={"prompt": "none"})
    params = query(client.get(auth.url()).headers["Location"])
    assert params["error"] == "consent_required" and params["state"] == auth.state


def test_new_notice_version_asks_again(upstream_issuer, tmp_path, receiver):
    from cryptography.fernet import Fernet

    same = {"encryption_key": Fernet.generate_key().decode(), "pairwise_secret": "p" * 40}
    first = make(upstream_issuer, tmp_path, receiver, name="n.db", **same)
    client = first.test_client()
    _, form = to_consent_page(client, AuthRequest())
    assert answer(client, form, "allow").status_code == 302
    second = make(upstream_issuer, tmp_path, receiver, notice_version="v2", name="n.db", **same)
    client2 = second.test_client()
    callback = upstream_login(start_login(client2, AuthRequest()))
    r = finish_login(client2, callback, consent=False)
    assert r.headers["Location"].startswith("/authorize/consent")


def test_decision_api_and_withdrawal_take_effect(client, app, receiver):
    hub = app.extensions["civitas"]
    auth = AuthRequest(scope="openid profile email offline_access")
    _, form = to_consent_page(client, auth)
    r = answer(client, form, "allow", claims=["name", "offline_access"])
    body = redeem(client, auth, query(r.headers["Location"])["code"]).json
    sub = jose_jwt.get_unverified_claims(body["id_token"])["sub"]

    allowed = evaluate(client, sub, "email", "benefits")
    assert allowed.status_code == 200 and allowed.json["decision"] is True
    receipt_id = allowed.json["context"]["receipt_id"]
    assert evaluate(client, sub, "email", "newsletter").json["decision"] is False
    assert evaluate(client, sub, "name", "newsletter").json["decision"] is True
    # another agency's question about this sub is like a question about nobody
    other = evaluate(client, sub, "email", "benefits", agency=AGENCY_TWO).json
    nobody = evaluate(client, "no-such-sub", "email", "benefits", agency=AGENCY_TWO).json
    assert other["decision"] is nobody["decision"] is False
    assert other["context"]["reason"] == nobody["context"]["reason"]

    # the receipt verifies with the hub's published keys
    r = client.get(f"/access/v1/receipts/{receipt_id}", headers=basic(AGENCY_ONE))
    assert r.status_code == 200
    jws_text = r.json.get("jws") or r.json.get("receipt_jws")
    payload = json.loads(jose_jws.verify(jws_text, client.get("/jwks").json,
                                         algorithms=["ES256"]))
    assert payload["version"] == "KI-CR-v1.1.0"
    # Kantara CR 1.1 piiControllers: whom the citizen writes to, and how, as the settings say
    assert payload["piiControllers"] == [{
        "piiController": "Agency One", "contact": "Benefits Privacy Office",
        "address": {"streetAddress": "2 Agency Row, Springfield", "addressCountry": "US"},
        "email": "privacy@one.agency.example", "phone": "+1 555 0199",
        "piiControllerUrl": "https://one.agency.example/privacy-office"}]

    # withdraw everything for this agency from the account page
    page = client.get("/account/consents").get_data(as_text=True)
    assert "Agency One" in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = client.post("/account/consents/withdraw",
                    data={"csrf": csrf, "client_id": AGENCY_ONE.client_id})
    assert r.status_code in (302, 303)
    assert evaluate(client, sub, "email", "benefits").json["decision"] is False
    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    assert client.get("/userinfo", headers=bearer).status_code == 401
    r = client.post("/introspect", data={"token": body["access_token"]}, headers=basic(AGENCY_ONE))
    assert r.json == {"active": False}
    r = client.post("/token", headers=basic(AGENCY_ONE), data={
        "grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert r.status_code == 400 and r.json["error"] == "invalid_grant"
    with hub.db.session() as s:
        [reason] = s.scalars(select(RefreshGrantRecord.revoked_reason)).all()
    assert reason == "consent_withdrawn"
    assert hub.dispatcher.deliver_due().delivered >= 1
    logout = jose_jwt.get_unverified_claims(receiver.tokens[-1])
    assert logout["sub"] == sub and "sid" not in logout and logout["aud"] == AGENCY_ONE.client_id


def test_decision_api_refuses_bad_requests(client):
    r = client.post("/access/v1/evaluation", headers=basic(AGENCY_ONE), data="{not json",
                    content_type="application/json")
    assert r.status_code == 400 and r.json["error"] == "invalid_request"
    assert r.json["error_description"].startswith("The request body is not valid JSON")
    r = client.post("/access/v1/evaluation", json={"subject": {}},
                    headers={"Authorization": "Basic " + base64.b64encode(
                        f"{AGENCY_ONE.client_id}:wrong".encode()).decode()})
    assert r.status_code == 401 and r.json["error"] == "invalid_client"
    assert r.json["error_description"].startswith("Agency authentication is required")
    r = client.post("/access/v1/evaluation", headers=basic(AGENCY_ONE), json={"subject": {}})
    assert r.status_code == 400 and r.json["error"] == "invalid_request"
    assert r.json["error_description"] == "missing field action"
    assert client.get("/access/v1/openapi.json").json["openapi"].startswith("3.1")


def test_consent_and_decisions_land_in_the_verifiable_ledger(client, app, tmp_path):
    """Every consent event and decision is a ledger entry; an export verifies offline."""
    from click.testing import CliRunner

    from consent.ledger.cli import make_audit_cli

    hub = app.extensions["civitas"]
    auth = AuthRequest()
    _, form = to_consent_page(client, auth)
    r = answer(client, form, "allow", claims=["name"])
    body = redeem(client, auth, query(r.headers["Location"])["code"]).json
    sub = jose_jwt.get_unverified_claims(body["id_token"])["sub"]
    evaluate(client, sub, "email", "benefits")
    evaluate(client, sub, "email", "newsletter")
    kinds = [e.kind for e in hub.ledger.entries(None, None, None)]
    assert kinds.count("consent.given") == 1 and kinds.count("decision.query") == 2
    for entry in hub.ledger.entries(None, None, None):
        assert "alice" not in entry.entry.lower()  # no personal data in clear

    audit = make_audit_cli(lambda ctx: hub.ledger)
    runner = CliRunner()
    out = tmp_path / "export.jsonl"
    assert runner.invoke(audit, ["checkpoint"]).exit_code == 0
    result = runner.invoke(audit, ["export", str(out)])
    assert result.exit_code == 0, result.output
    key = runner.invoke(audit, ["pubkey"]).output.strip()
    result = runner.invoke(audit, ["verify", str(out), "--public-key", key])
    assert result.exit_code == 0, result.output
    # one changed byte is found, and named: the verdict, not a crash
    text = out.read_text()
    out.write_text(text.replace('"benefits"', '"benefitz"', 1))
    line, entry = next((n, json.loads(row)["index"])
                       for n, row in enumerate(text.splitlines(), 1) if '"benefits"' in row)
    result = runner.invoke(audit, ["verify", str(out), "--public-key", key])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert (f"FAILED {out}: line {line}: entry {entry} was altered: its text does not match "
            "its leaf hash") in result.output, result.output


def test_citizen_sees_who_used_their_data(client):
    auth = AuthRequest()
    _, form = to_consent_page(client, auth)
    r = answer(client, form, "allow")  # name (newsletter) left unticked
    body = redeem(client, auth, query(r.headers["Location"])["code"]).json
    sub = jose_jwt.get_unverified_claims(body["id_token"])["sub"]
    evaluate(client, sub, "email", "benefits")
    for _ in range(26):
        evaluate(client, sub, "name", "newsletter")
    page = client.get("/account/history").get_data(as_text=True)
    rows = re.findall(r"<tr><td>.*?</tr>", page, re.S)
    assert len(rows) == 25 and "Older" in page  # paginated, newest first
    assert "Agency One" in rows[0] and "Your full name" in rows[0] and "Refused" in rows[0]
    assert "to send you news about the programme" in rows[0]
    older = client.get("/account/history?page=2").get_data(as_text=True)
    assert "Your email address" in older and "Allowed" in older
    assert "to decide your benefit claim" in older
    other = client.application.test_client()
    assert other.get("/account/history").status_code == 302  # signed-out: to the login


def test_the_history_shows_questions_asked_before_the_citizen_signed_in_there(client, app):
    """An agency can ask about a citizen's ``sub`` before the citizen ever signs in there
    (another agency of its pairwise sector knows it): no record answers it, but it was
    about this citizen, so their history shows it, and says so; a question about someone
    else's sub there does not show."""
    hub = app.extensions["civitas"]
    auth = AuthRequest()
    _, form = to_consent_page(client, auth)
    answer(client, form, "allow")
    with client.session_transaction() as s:
        account_id = s["login"]["account_id"]
    at_two = hub.server.hub.subject_for(hub.agencies.client(AGENCY_TWO.client_id), account_id)
    assert evaluate(client, at_two, "email", "benefits", agency=AGENCY_TWO).json[
        "context"]["reason"] == "no_consent"
    assert evaluate(client, "someone-else", "name", "benefits", agency=AGENCY_TWO).json[
        "decision"] is False
    rows = re.findall(r"<tr><td>.*?</tr>", client.get("/account/history").get_data(
        as_text=True), re.S)
    assert len(rows) == 1, rows
    assert "Agency Two" in rows[0] and "Refused" in rows[0]
    assert "asked before you first signed in to this agency" in rows[0]


def test_core_3_1_2_4_a_consent_page_answers_only_for_the_login_it_was_asked_under(client):
    """Alice reaches the consent page; then Bob signs in at the hub in the same browser;
    then Alice's old tab presses Allow. The answer was taken as Bob's: a code for Bob,
    and a consent record of his from a page Alice was shown. Now the page answers only for
    the login it was asked under (a sign-in since, of anyone, ends it)."""
    import html as html_lib

    from tests.flows import consent_answer

    auth = AuthRequest()
    r = finish_login(client, upstream_login(start_login(client, auth), "alice"), consent=False)
    assert r.headers["Location"].startswith("/authorize/consent")
    form = consent_answer(client.get(path_of(r.headers["Location"])).get_data(as_text=True))
    page = client.get(path_of(client.get("/login").headers["Location"]))
    link = html_lib.unescape(re.search(r'href="(/login/op/start\?flow=[^"]+)"',
                                       page.get_data(as_text=True)).group(1))
    r = client.get(path_of(upstream_login(client.get(link).headers["Location"], "bob")))
    assert r.status_code == 303 and r.headers["Location"] == "/account"  # Bob, signed in
    hub = client.application.extensions["civitas"]
    with client.session_transaction() as s:
        bob = s["login"]["account_id"]
    form["csrf"] = re.search(r'name="csrf" value="([^"]+)"', client.get(
        "/account").get_data(as_text=True)).group(1)  # the session's token, as the tab has
    r = client.post("/authorize/consent", data=form)
    assert r.status_code == 400 and "Location" not in r.headers, r.headers.get("Location")
    assert hub.consent.grants_for_account(bob) == []


def test_one_consent_form_is_answered_once_even_by_two_submits_at_once(client):
    """Two submits of one consent form at once both found the parked request (the browser
    session is written last-wins: the first one's removal of it is not seen by the
    second), and both recorded a consent event and receipt. Made deterministic here: the
    second submit sees the session as it was before the first."""
    from tests.flows import consent_answer

    hub = client.application.extensions["civitas"]
    auth = AuthRequest()
    r = finish_login(client, upstream_login(start_login(client, auth), "alice"), consent=False)
    form = consent_answer(client.get(path_of(r.headers["Location"])).get_data(as_text=True))
    with client.session_transaction() as s:
        parked, account = dict(s["consent_requests"]), s["login"]["account_id"]
    first = client.post("/authorize/consent", data=form)
    assert first.status_code == 302 and "code=" in first.headers["Location"]
    with client.session_transaction() as s:
        s["consent_requests"] = parked  # what the concurrent submit read
    second = client.post("/authorize/consent", data=form)
    assert second.status_code == 400 and "Location" not in second.headers
    [record] = hub.consent.grants_for_account(account)
    assert [e.kind for e in hub.consent.history(account, record.client_id)] == ["given"]


def test_records_and_ledger_match_one_to_one(client, app, monkeypatch):
    from sqlalchemy import delete

    from consent.ledger.models import LedgerEntry
    from consent.reconcile import reconcile

    hub = app.extensions["civitas"]
    auth = AuthRequest()
    _, form = to_consent_page(client, auth)
    r = answer(client, form, "allow")
    body = redeem(client, auth, query(r.headers["Location"])["code"]).json
    sub = jose_jwt.get_unverified_claims(body["id_token"])["sub"]
    evaluate(client, sub, "email", "benefits")
    # a withdrawal from the account page is a consent event too, with its own entry
    page = client.get("/account/consents").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = client.post("/account/consents/withdraw",
                    data={"csrf": csrf, "client_id": AGENCY_ONE.client_id})
    assert r.status_code == 303
    kinds = sorted(e.kind for e in hub.ledger.entries(None, None, None)
                   if e.kind.startswith(("consent.", "decision.")))
    assert kinds == ["consent.given", "consent.withdrawn", "decision.query"]
    report = reconcile(hub.db, hub.ledger, None, None)
    assert report.ok and report.records == report.entries == 3
    # a record altered behind the hub's back (the citizen's grant widened, a refusal turned
    # into a permit) no longer says what its entry says, and is named; put back, all agrees
    from sqlalchemy import select, update

    from consent.models import AgencyDecision, ConsentEvent
    with hub.db.session() as s:
        given = s.scalars(select(ConsentEvent).where(ConsentEvent.kind == "given")).one()
        decision = s.scalars(select(AgencyDecision)).one()
        original = (dict(given.claims), decision.decision)
        s.execute(update(ConsentEvent).where(ConsentEvent.id == given.id).values(
            claims={**given.claims, "health_card": {"purposes": ["benefits"]}}))
        s.execute(update(AgencyDecision).where(AgencyDecision.id == decision.id).values(
            decision=not decision.decision))
    report = reconcile(hub.db, hub.ledger, None, None)
    assert not report.ok and not report.missing_in_ledger and not report.unmatched_entries
    assert report.altered == sorted([f"consent:{given.record_id}#{given.seq}",
                                     f"decision:{decision.id}"])
    # the officer's command says which (this hub's, not one built from a settings file)
    from click.testing import CliRunner

    import civitas.cli
    monkeypatch.setattr(civitas.cli, "_hub", lambda ctx: hub)
    out = CliRunner().invoke(civitas.cli.main, ["audit", "reconcile"])
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit), out.output
    assert f"record differs from its ledger entry: decision:{decision.id}" in out.output
    with hub.db.session() as s:
        s.execute(update(ConsentEvent).where(ConsentEvent.id == given.id).values(
            claims=original[0]))
        s.execute(update(AgencyDecision).where(AgencyDecision.id == decision.id).values(
            decision=original[1]))
    assert reconcile(hub.db, hub.ledger, None, None).ok
    # an entry removed behind the hub's back is named
    with hub.db.session() as s:
        s.execute(delete(LedgerEntry).where(LedgerEntry.kind == "decision.query"))
    report = reconcile(hub.db, hub.ledger, None, None)
    assert not report.ok and report.missing_in_ledger[0].startswith("decision:")
