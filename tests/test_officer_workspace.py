"""The privacy officer's workspace: the role from an LDAP group (a real slapd), 403 for
everyone else, decision search with filters and pages, CSV/JSON exports, ledgered citizen
lookups, and the GDPR Art. 30 record of processing."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from jose import jwt as jose_jwt
from sqlalchemy import select

from broker.models import LinkedIdentity
from connectors import UpstreamIdentity
from consent.ledger.ledger import hashed_id
from consent.officers import OfficerRule, OfficerWorkspace, holds_officer_role, pseudonym_key
from tests import servers
from tests.conftest import hub_config
from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest, full_login, path_of, redeem

CONSENT = {
    "notice_url": "https://one.agency.example/privacy", "notice_version": "v3",
    "consent_ttl_days": 365,
    "purpose_labels": {"benefits": "to decide your benefit claim",
                       "newsletter": "to send you news about the programme"},
    "claims": [
        {"claim": "email", "purposes": ["benefits"], "lawful_basis": "consent",
         "required": True, "description": "Your email address"},
        {"claim": "name", "purposes": ["newsletter"], "lawful_basis": "consent",
         "required": False, "description": "Your full name"},
    ],
}
EXPORT_COLUMNS = ["decision_id", "at", "agency", "subject", "action", "claim", "purpose",
                  "decision", "reason", "record_id", "request_id", "erased_at"]
PAGES = ["/officer/", "/officer/decisions.csv", "/officer/decisions.json",
         "/officer/agencies/agency-one/art30", "/officer/agencies/agency-one/art30?format=json",
         "/officer/activity"]


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    with servers.run_slapd(tmp_path_factory.mktemp("slapd-officer")) as info:
        yield info


@pytest.fixture(scope="module")
def world(upstream_issuer, directory, tmp_path_factory):
    """One hub with an LDAP staff directory whose ``admins`` are officers, a citizen (alice
    at the OIDC upstream) who consented to agency one, and 57 decisions about her."""
    from civitas.app import create_app

    db = tmp_path_factory.mktemp("officer") / "o.db"
    cfg = hub_config(upstream_issuer, f"sqlite:///{db}", agencies=[
        AGENCY_ONE.config(consent=CONSENT), AGENCY_TWO.config()],
        backchannel_dispatcher=False,
        officer_role=[{"upstream": "staff", "attribute": "groups", "value": "admins"}])
    cfg["upstreams"].append({
        "kind": "ldap", "id": "staff", "display_name": "Staff", "url": directory["url"],
        "bind_dn": directory["svc_dn"], "bind_password": directory["svc_password"],
        "user_base_dn": f"ou=people,{directory['base_dn']}", "group_attribute": "memberOf",
        "timeout_seconds": 2})
    app = create_app(cfg)
    hub = app.extensions["civitas"]
    citizen = app.test_client()
    auth = AuthRequest()
    params = full_login(citizen, auth)  # alice at "op", consents to email and name
    id_token = redeem(citizen, auth, params["code"]).json["id_token"]
    sub = jose_jwt.get_unverified_claims(id_token)["sub"]
    for _ in range(52):
        assert evaluate(citizen, sub, "email", "benefits").json["decision"] is True
    for _ in range(3):
        assert evaluate(citizen, sub, "email", "newsletter").json["decision"] is False
    assert evaluate(citizen, sub, "name", "newsletter").json["decision"] is True
    assert evaluate(citizen, "no-such-sub", "email", "benefits").json["decision"] is False
    with hub.db.session() as s:
        link = s.scalars(select(LinkedIdentity).where(LinkedIdentity.connector_id == "op")).one()
        op_subject, account_id = link.upstream_subject, link.account_id
    yield {"app": app, "hub": hub, "sub": sub, "op_subject": op_subject,
           "account_id": account_id, "citizen": citizen,
           "key": pseudonym_key(cfg["pairwise_secret"])}
    hub.db.dispose()


def evaluate(client, sub, claim, purpose):
    basic = base64.b64encode(f"{AGENCY_ONE.client_id}:{AGENCY_ONE.secret}".encode()).decode()
    return client.post("/access/v1/evaluation", headers={"Authorization": f"Basic {basic}"},
                       json={"subject": {"type": "user", "id": sub}, "action": {"name": "use"},
                             "resource": {"type": "claim", "id": claim},
                             "context": {"purpose": purpose}})


def staff_login(app, username):
    """Sign in to the hub itself with the staff directory; returns (client, account id)."""
    client = app.test_client()
    r = client.get("/login")
    page = client.get(path_of(r.headers["Location"])).get_data(as_text=True)
    link = html.unescape(re.search(r'href="(/login/staff/start\?flow=[^"]+)"', page).group(1))
    form_page = client.get(link).get_data(as_text=True)
    form = {name: re.search(rf'name="{name}" value="([^"]*)"', form_page).group(1)
            for name in ("csrf", "flow")}
    r = client.post("/login/staff/password",
                    data={**form, "username": username, "password": f"{username}-ldap-pw"})
    assert r.status_code == 303
    with client.session_transaction() as s:
        return client, s["login"]["account_id"]


@pytest.fixture(scope="module")
def officer(world):
    return staff_login(world["app"], "alice")


def result_ids(response):
    return re.findall(r'<tr data-id="([0-9a-f]+)">', response.get_data(as_text=True))


# -- who gets in --------------------------------------------------------------------------


def test_role_needs_the_configured_upstream_and_a_fresh_assertion():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Attr:
        name: str
        value: object
        source: str
        asserted_at: datetime

    rules = [OfficerRule("staff", "groups", "admins")]
    now = datetime.now(UTC)
    login_at = int(now.timestamp())
    good = Attr("groups", ["staff", "admins"], "staff", now)
    assert holds_officer_role(rules, login_upstream="staff", auth_time=login_at,
                              attributes=[good])
    assert not holds_officer_role(rules, login_upstream="op", auth_time=login_at,
                                  attributes=[good])
    assert not holds_officer_role(rules, login_upstream="staff", auth_time=login_at,
                                  attributes=[Attr("groups", ["admins"], "op", now)])
    assert not holds_officer_role(rules, login_upstream="staff", auth_time=login_at,
                                  attributes=[Attr("groups", ["admins"], "staff",
                                                   now - timedelta(days=2))])
    assert not holds_officer_role(rules, login_upstream="staff", auth_time=login_at,
                                  attributes=[Attr("groups", "admins-not", "staff", now)])
    assert not holds_officer_role([], login_upstream="staff", auth_time=login_at,
                                  attributes=[good])


def test_officer_role_must_name_a_configured_upstream(upstream_issuer, tmp_path):
    from config import settings_from_mapping
    from kernel.errors import ConfigError

    cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/x.db",
                     officer_role=[{"upstream": "nope", "value": "admins"}])
    with pytest.raises(ConfigError, match="officer_role: unknown upstream"):
        settings_from_mapping(cfg)
    cfg["officer_role"] = [{"upstream": "op", "value": "admins"}]
    assert settings_from_mapping(cfg).officer_role[0].attribute == "groups"


def test_not_signed_in_goes_to_login(world):
    client = world["app"].test_client()
    for url in PAGES:
        r = client.get(url)
        assert r.status_code == 302 and r.headers["Location"].startswith("/login"), url


def test_staff_member_without_the_group_gets_403_everywhere(world):
    client, _ = staff_login(world["app"], "bob")  # in "staff" only
    for url in PAGES:
        r = client.get(url)
        assert r.status_code == 403, url
        if url.endswith((".csv", ".json")) or "format=json" in url:
            assert r.is_json and r.json["error"] == "forbidden"
        else:
            assert "privacy officers" in r.get_data(as_text=True)


def test_another_upstream_cannot_assert_the_role(world):
    hub = world["hub"]
    # the citizen signed in through the OIDC upstream, which now claims she is an admin
    hub.accounts.resolve(UpstreamIdentity(connector_id="op", subject=world["op_subject"],
                                          attributes={"groups": ["admins"]},
                                          acr="urn:civitas:acr:ial1:aal1"))
    for url in PAGES:
        assert world["citizen"].get(url).status_code == 403, url
    # bob, signed in through staff, with "admins" asserted for his account by "op" only
    client, bob = staff_login(world["app"], "bob")
    hub.accounts.link(bob, UpstreamIdentity(connector_id="op", subject="bob-at-op",
                                            attributes={"groups": ["admins"]},
                                            acr="urn:civitas:acr:ial1:aal1"))
    # "op" ranks first, so even the *released* value is now op's: only the source check
    # keeps the role with the staff directory
    assert hub.accounts.attributes(bob)["groups"] == ["admins"]
    for url in PAGES:
        assert client.get(url).status_code == 403, url


# -- search ---------------------------------------------------------------------------------


def test_search_newest_first_in_pages_of_50(world, officer):
    client, _ = officer
    first = client.get("/officer/")
    assert first.status_code == 200
    body = first.get_data(as_text=True)
    assert "57 decisions, page 1 of 2" in body
    page1, page2 = result_ids(first), result_ids(client.get("/officer/?page=2"))
    assert len(page1) == 50 and len(page2) == 7 and not set(page1) & set(page2)
    exported = client.get("/officer/decisions.json")
    export = exported.json
    assert export["count"] == 57
    assert [d["decision_id"] for d in export["decisions"]] == page1 + page2
    # the JSON export carries the CSV's columns: the internal account id stays in the hub
    assert {key for d in export["decisions"] for key in d} == set(EXPORT_COLUMNS)
    assert world["account_id"] not in exported.get_data(as_text=True)
    assert world["account_id"] not in body
    times = [d["at"] for d in export["decisions"]]
    assert times == sorted(times, reverse=True)
    assert 'rel="next"' in body and "page=2" in body


@pytest.mark.parametrize(("query", "count"), [
    ("decision=deny", 4), ("decision=permit", 53), ("purpose=newsletter", 4),
    ("claim=name", 1), ("agency=agency-one&claim=email&purpose=benefits", 53),
    ("agency=agency-two", 0),
])
def test_search_filters(world, officer, query, count):
    client, _ = officer
    data = client.get(f"/officer/decisions.json?{query}").json
    assert data["count"] == count
    page = client.get(f"/officer/?{query}")
    assert len(result_ids(page)) == min(count, 50)


def test_time_window(world, officer):
    client, _ = officer
    today = datetime.now(UTC).date()
    count = lambda q: client.get(f"/officer/decisions.json?{q}").json["count"]  # noqa: E731
    assert count(f"from={today}&to={today}") == 57
    assert count(f"from={today + timedelta(days=1)}") == 0
    assert count(f"to={today - timedelta(days=1)}") == 0
    assert client.get("/officer/?from=yesterday").status_code == 400
    r = client.get(f"/officer/decisions.json?from={today}&to={today - timedelta(days=2)}")
    assert r.status_code == 400 and r.is_json
    # a date and time in ISO 8601's extended format is a moment; the basic format, which
    # Python also reads (20261125), was taken for a moment, silently leaving out that day
    assert count(f"to={today + timedelta(days=1)}T00:00") == 57
    for basic in (today.strftime("%Y%m%d"), today.strftime("%G-W%V-%u"), f"{today}X"):
        r = client.get(f"/officer/decisions.json?to={basic}")
        assert r.status_code == 400 and "YYYY-MM-DD" in r.json["error_description"], basic


def test_a_search_field_given_twice_is_refused(world, officer):
    """decision=permit&decision=deny searched the permits alone (the second value was
    ignored): an export that is not what was asked for. Now a 400 naming the field."""
    client, _ = officer
    for path in ("/officer/", "/officer/decisions.json", "/officer/decisions.csv"):
        r = client.get(f"{path}?decision=permit&decision=deny")
        assert r.status_code == 400, (path, r.status_code)
        assert "'decision' is given more than once" in html.unescape(r.get_data(as_text=True)), path
    assert client.get("/officer/decisions.json?decision=permit").status_code == 200


@pytest.mark.parametrize("name", ["endpoint", "_method", "_anchor", "_external", "_scheme"])
def test_names_of_no_search_field_are_ignored_not_passed_on(world, officer, name):
    """The page's links (next page, CSV, JSON) carry the search's own fields only: any other
    name reached url_for, which takes some for itself (endpoint= and _method= were server
    errors; _anchor= and _external= changed the links)."""
    client, _ = officer
    r = client.get(f"/officer/?claim=email&{name}=x")
    assert r.status_code == 200, r.status_code
    page = r.get_data(as_text=True)
    assert 'href="/officer/decisions.csv?claim=email"' in page
    assert 'href="/officer/decisions.json?claim=email"' in page


def test_csv_export(world, officer):
    client, _ = officer
    r = client.get("/officer/decisions.csv?claim=email&decision=deny")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    assert "attachment" in r.headers["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(r.get_data(as_text=True))))
    assert rows[0] == EXPORT_COLUMNS
    body = [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
    assert len(body) == 4
    assert all(b["claim"] == "email" and b["decision"] == "deny" for b in body)
    # cells a spreadsheet would run as a formula (=, +, -, @ first) carry a leading quote,
    # and a base64url pairwise sub may well start with "-"
    expected = world["sub"] if world["sub"][0] not in "=+-@" else "'" + world["sub"]
    assert {b["subject"] for b in body} == {expected, "no-such-sub"}
    assert [b["purpose"] for b in body].count("newsletter") == 3


def test_a_question_about_an_erased_account_shows_who_asked_and_not_about_whom(world, officer):
    """Erasure strips a decision of its subject, record and request id: the search page says
    "erased" where the subject was, and the exports leave it empty and say when."""
    from sqlalchemy import delete

    from consent.models import AgencyDecision, new_time_ordered_id

    client, _ = officer
    hub = world["hub"]
    row = AgencyDecision(id=new_time_ordered_id(), at=datetime.now(UTC), client_id="agency-one",
                         subject=None, account_id=None, record_id=None, action="use",
                         claim="erased-claim", purpose="benefits", decision=False,
                         reason="no_consent", request_id=None,
                         erased_at=datetime(2026, 11, 20, 9, tzinfo=UTC))
    with hub.db.session() as s:
        s.add(row)
    try:
        page = client.get("/officer/?claim=erased-claim")
        assert page.status_code == 200 and result_ids(page) == [row.id]
        assert "<em>erased</em>" in page.get_data(as_text=True)
        exported = client.get("/officer/decisions.json?claim=erased-claim").json["decisions"]
        assert [(d["subject"], d["record_id"], d["erased_at"]) for d in exported] == [
            (None, None, "2026-11-20T09:00:00+00:00")]
        r = client.get("/officer/decisions.csv?claim=erased-claim")
        rows = list(csv.reader(io.StringIO(r.get_data(as_text=True))))
        cells = dict(zip(rows[0], rows[1], strict=True))
        assert (cells["subject"], cells["agency"], cells["erased_at"]) == (
            "", "agency-one", "2026-11-20T09:00:00+00:00")
    finally:  # the module's other tests count the decisions
        with hub.db.session() as s:
            s.execute(delete(AgencyDecision).where(AgencyDecision.id == row.id))


def test_plain_searches_are_not_ledgered(world, officer):
    client, _ = officer
    before = len(list(world["hub"].ledger.entries("officer.lookup")))
    client.get("/officer/?decision=deny")
    client.get("/officer/decisions.csv")
    assert len(list(world["hub"].ledger.entries("officer.lookup"))) == before


# -- citizen lookups ----------------------------------------------------------------------


def test_lookup_by_credential_is_ledgered_without_personal_data(world, officer):
    client, officer_id = officer
    ledger = world["hub"].ledger
    before = [e.seq for e in ledger.entries("officer.lookup")]
    r = client.get(f"/officer/?connector=op&upstream_subject={world['op_subject']}")
    assert r.status_code == 200 and "56 decisions" in r.get_data(as_text=True)
    entries = [e for e in ledger.entries("officer.lookup") if e.seq not in before]
    assert len(entries) == 1
    text = entries[0].entry
    data = json.loads(text)
    payload = data.get("data", data)
    key = world["key"]
    assert payload["officer"] == hashed_id(key, officer_id)
    assert payload["target"] == hashed_id(key, world["account_id"])
    assert payload["query"] == {"by": "credential", "scope": "op"}
    for secret in (world["op_subject"], world["account_id"], officer_id, world["sub"],
                   "alice"):
        assert secret not in text
    # the same key as the account.* entries: the target joins the citizen's account events
    assert any(json.loads(e.entry).get("data", {}).get("account") == payload["target"]
               for e in ledger.entries("account.created"))


def test_lookup_by_pairwise_sub_and_exports_are_ledgered(world, officer):
    client, _ = officer
    ledger = world["hub"].ledger
    before = len(list(ledger.entries("officer.lookup")))
    q = f"agency=agency-one&sub={world['sub']}&decision=deny"
    page = client.get(f"/officer/?{q}")
    assert len(result_ids(page)) == 3
    # the whole subject is shown, so that it can be copied into the search (it was cut)
    assert page.get_data(as_text=True).count(f'<code class="subject">{world["sub"]}</code>') == 3
    assert client.get(f"/officer/decisions.json?{q}").json["count"] == 3
    rows = list(csv.reader(io.StringIO(client.get(
        f"/officer/decisions.csv?{q}").get_data(as_text=True))))
    assert len(rows) == 4
    new = list(ledger.entries("officer.lookup"))[before:]
    assert len(new) == 3
    for e in new:
        assert world["sub"] not in e.entry
        assert json.loads(e.entry)["data"]["query"] == {
            "agency": "agency-one", "decision": False, "by": "pairwise", "scope": "agency-one"}


def test_unknown_citizen_matches_nothing_and_is_still_ledgered(world, officer):
    client, _ = officer
    ledger = world["hub"].ledger
    before = len(list(ledger.entries("officer.lookup")))
    r = client.get("/officer/?connector=op&upstream_subject=nobody")
    assert r.status_code == 200 and result_ids(r) == []
    assert 'id="citizen-unknown"' in r.get_data(as_text=True)
    entry = json.loads(list(ledger.entries("officer.lookup"))[before].entry)["data"]
    assert entry["target"] is None
    assert client.get("/officer/?connector=op").status_code == 400  # half a credential
    assert client.get("/officer/?sub=x").status_code == 400  # a sub needs its agency


# -- Art. 30 --------------------------------------------------------------------------------


def test_record_of_processing(world, officer):
    client, _ = officer
    record = client.get("/officer/agencies/agency-one/art30?format=json").json
    page = client.get("/officer/agencies/agency-one/art30").get_data(as_text=True)
    assert re.search(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\.", page), page[:2000]
    assert record["controller"]["client_id"] == "agency-one" and record["declared"] is True
    assert [(p["purpose"], p["label"], p["claims"]) for p in record["purposes"]] == [
        ("benefits", "to decide your benefit claim", ["email"]),
        ("newsletter", "to send you news about the programme", ["name"])]
    assert {c["claim"]: (c["lawful_basis"], c["purposes"], c["required"])
            for c in record["claims"]} == {"email": ("consent", ["benefits"], True),
                                           "name": ("consent", ["newsletter"], False)}
    assert record["recipients"][0]["client_id"] == "agency-one"
    assert record["retention"] == "365 days from consent" and record["consent_ttl_days"] == 365
    assert record["decision_log_retention"] == "kept for ever"  # decision_log_retention_days 0
    # what outlives the decision log is said too: the questions' entries name no one
    assert "kept for ever" in record["audit_ledger"] and "salt is deleted with the question" \
        in record["audit_ledger"] and "days)" not in record["audit_ledger"]
    hub = world["app"].extensions["civitas"]
    kept = OfficerWorkspace(hub.db, hub.ledger, pseudonym_key=b"k" * 32,
                            account_for_credential=lambda *_: None, decision_log_days=90)
    kept_record = kept.record_of_processing(hub.server.hub.policy_for(hub.agencies.client(
        "agency-one")), declared=True)
    assert kept_record["decision_log_retention"] == "90 days"
    assert kept_record["audit_ledger"].endswith("deleted with the question (90 days)")
    assert record["notice"] == {"url": "https://one.agency.example/privacy", "version": "v3",
                                "language": "en"}
    assert record["counts"]["grants"] == 1 and record["counts"]["withdrawals"] == 0
    assert record["counts"]["decisions_permit"] == 53
    page = client.get("/officer/agencies/agency-one/art30").get_data(as_text=True)
    assert "Record of processing: Agency One" in page and "365 days from consent" in page
    # agency two rests on its public task, with no consent expiry; an unknown agency is 404
    two = client.get("/officer/agencies/agency-two/art30?format=json").json
    assert two["lawful_bases"] == ["public_task"] and two["retention"] == "until withdrawn"
    assert {c["claim"] for c in two["claims"]} == {"name", "given_name", "family_name", "email"}
    assert client.get("/officer/agencies/nope/art30").status_code == 404


def test_activity_charts_per_agency(world, officer):
    client, _ = officer
    r = client.get("/officer/activity")
    assert r.status_code == 200
    body = r.get_data(as_text=True)
    assert body.count("<svg") >= 2 and "Agency One" in body
    assert re.search(r"[1-9][0-9]* decision quer", body)  # the decisions made above
    assert "<script" not in body
    # WCAG 1.4.1 / 1.1.1: the figures are also a table, not only bars told apart by colour;
    # its rows add up to the totals said under the chart
    section = body[body.index("<h2>Agency One"):]
    section = section[:section.index("</section>")]
    rows = re.findall(r"<tr><td>(\d{4}-\d\d-\d\d)</td><td>(\d+)</td><td>(\d+)</td>"
                      r"<td>(\d+)</td></tr>", section)
    assert len(rows) == 30
    decisions = sum(int(r[3]) for r in rows)
    assert decisions > 0
    said = "query" if decisions == 1 else "queries"
    assert f"{decisions} decision {said} in 30 days" in " ".join(section.split())


@pytest.mark.parametrize(("value", "cell"), [("-sub", "'-sub"), ("=1+1", "'=1+1"),
                                             ("+x", "'+x"), ("@x", "'@x"), ("sub", "sub"),
                                             (None, "")])
def test_csv_cells_cannot_become_formulas(value, cell):
    from consent.officers import csv_safe

    assert csv_safe(value) == cell


def test_a_citizen_search_finds_questions_asked_before_a_record_existed(world, officer):
    """An agency can ask about a citizen's ``sub`` before the citizen signs in there
    (another agency of its pairwise sector knows it); the question resolves to no one, and
    a search for the citizen still finds it, by credential (the hub computes the citizen's
    sub at every agency) and by that sub. Filtered to agency two, which alice never signed
    in to, so that no other test's count moves."""
    client, _ = officer
    hub = world["hub"]
    two = hub.agencies.client(AGENCY_TWO.client_id)
    sub_at_two = hub.server.hub.subject_for(two, world["account_id"])
    basic = base64.b64encode(f"{AGENCY_TWO.client_id}:{AGENCY_TWO.secret}".encode()).decode()
    r = world["citizen"].post(
        "/access/v1/evaluation", headers={"Authorization": f"Basic {basic}"},
        json={"subject": {"type": "user", "id": sub_at_two}, "action": {"name": "use"},
              "resource": {"type": "claim", "id": "email"},
              "context": {"purpose": "service-delivery"}})
    assert r.json["context"]["reason"] == "no_consent"
    asked = r.json["context"]["decision_id"]
    by_credential = client.get(
        f"/officer/decisions.json?agency=agency-two&connector=op"
        f"&upstream_subject={world['op_subject']}").json
    assert [d["decision_id"] for d in by_credential["decisions"]] == [asked]
    by_sub = client.get(f"/officer/decisions.json?agency=agency-two&sub={sub_at_two}").json
    assert [d["decision_id"] for d in by_sub["decisions"]] == [asked]
    # somebody else's sub at agency two finds nothing
    assert client.get("/officer/decisions.json?agency=agency-two&sub=someone-else"
                      ).json["count"] == 0
