"""Consent: records and their append-only history, expiry, partial consent, the AuthZEN
decision API (and its OpenAPI document, checked with schemathesis), signed Kantara receipts,
and the citizen's consents page. A small local Flask app with the consent blueprint, a real
SQLite database, a fake receipt signer (joserfc, generated EC key) and a fake agency
authenticator stand in for the parts the OpenID provider wires in."""

from __future__ import annotations

import base64
import json
import re
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import schemathesis
from flask import Flask, render_template, session
from hypothesis import HealthCheck, settings
from joserfc import jws
from joserfc.jwk import ECKey, KeySet
from sqlalchemy import func, select

import broker.models  # noqa: F401  (accounts table)
import consent.models  # noqa: F401
from broker.models import ConstituentAccount
from broker.session import HubLogin
from consent.decisions import EvaluationQuery
from consent.errors import FormExpired, NothingToWithdraw, RequiredClaimWithdrawal
from consent.models import AgencyDecision, ConsentEvent, ConsentReceipt, ConsentRecord
from consent.openapi import openapi_document
from consent.policy import AgencyContact, AgencyPolicy, ClaimRequest
from consent.receipts import receipt_schema
from consent.service import ConsentService, Withdrawal
from consent.views import create_blueprint, read_consent_form, render_consent_page
from kernel.db import Base, Database, utcnow
from kernel.errors import CivitasError
from kernel.store import MemoryStore
from tests.flows import within_one_window

ROOT = Path(__file__).resolve().parents[1]

ONE = AgencyPolicy(
    client_id="agency-one", name="Department of Benefits",
    claims=(
        ClaimRequest("name", ("identification",), "public_task", True, "Your full name"),
        ClaimRequest("email", ("notifications",), "consent", False, "Your email address"),
        ClaimRequest("health_card", ("eligibility",), "consent", False,
                     "Your health card number", sensitive_category="health"),
    ),
    notice_url="https://benefits.example.gov/privacy", notice_version="2024-1",
    consent_ttl_days=30, purpose_labels={"notifications": "Sending you updates",
                                         "identification": "Knowing who you are"},
    contact=AgencyContact(contact="Privacy Office", email="privacy@benefits.example.gov",
                          phone="+1 555 0100", address_country="US",
                          url="https://benefits.example.gov"),
)
TWO = AgencyPolicy(
    client_id="agency-two", name="Parks Service",
    claims=(ClaimRequest("email", ("contact",), "consent", True, "Your email address"),),
    notice_url="https://parks.example.gov/privacy", notice_version="1",
)
TOKENS = {"token-one": "agency-one", "token-two": "agency-two"}
BASIC = {("agency-two", "secret-two"): "agency-two"}
ONE_AUTH = {"Authorization": "Bearer token-one"}


class FakeSigner:
    """A ReceiptSigner with a generated P-256 key (the hub's KeyRing in production)."""

    def __init__(self) -> None:
        self.key = ECKey.generate_key("P-256", private=True, auto_kid=True)

    def sign(self, payload: dict[str, Any]) -> str:
        header = {"alg": "ES256", "kid": self.key.kid, "typ": "JWT"}
        return jws.serialize_compact(header, json.dumps(payload, sort_keys=True), self.key)

    def jwks(self) -> dict[str, Any]:
        public = self.key.as_dict(private=False)
        public.update(alg="ES256", use="sig")
        return {"keys": [public]}


def authenticate_agency(request: Any) -> str | None:
    """Bearer token -> client id, or HTTP Basic client credentials."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return TOKENS.get(value.strip())
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return None
        return BASIC.get((user, password))
    return None


class Env:
    def __init__(self, tmp_path: Path, *, rate_limit: int = 1000,
                 database_url: str | None = None) -> None:
        self.db = Database(database_url or f"sqlite:///{tmp_path}/consent.db")
        Base.metadata.create_all(self.db.engine)
        self.signer = FakeSigner()
        self.withdrawals: list[Withdrawal] = []
        self.service = ConsentService(self.db, self.signer, on_withdraw=self.withdrawals.append)
        self.app = make_app(self.service, rate_limit=rate_limit)
        self.client = self.app.test_client()
        with self.db.session() as s:
            self.alice, self.bob = ConstituentAccount(), ConstituentAccount()
            s.add_all([self.alice, self.bob])

    def login(self, account: ConstituentAccount) -> None:
        with self.client.session_transaction() as sess:
            sess["login"] = HubLogin(account_id=account.id, auth_time=0, acr="a", amr=(),
                                     upstream_id="op", sid="sid").to_json()
            sess["csrf"] = "csrf-token"

    def decisions(self) -> list[AgencyDecision]:
        with self.db.session() as s:
            return list(s.scalars(select(AgencyDecision).order_by(AgencyDecision.at)))


def make_app(service: ConsentService, *, rate_limit: int) -> Flask:
    app = Flask(__name__, template_folder=str(ROOT / "civitas" / "templates"))
    app.secret_key = "test"  # noqa: S105

    @app.context_processor
    def _csrf() -> dict[str, Any]:
        return {"csrf_token": lambda: session.setdefault("csrf", "csrf-token")}

    @app.errorhandler(CivitasError)
    def _error(error: CivitasError) -> tuple[str, int]:
        return render_template("error.html", status=error.status_code,
                               message=error.public_message), error.status_code

    app.register_blueprint(create_blueprint(
        service, authenticate_agency=authenticate_agency, store=MemoryStore(),
        decision_scope="consent.decide", rate_limit=rate_limit))
    return app


@pytest.fixture
def env(tmp_path: Path) -> Any:
    e = Env(tmp_path)
    yield e
    e.db.dispose()




@pytest.fixture
def any_env(tmp_path: Path, database_url: str) -> Any:
    e = Env(tmp_path, database_url=database_url)
    yield e
    e.db.dispose()


T0 = datetime(2030, 1, 1, 12, tzinfo=UTC)


def evaluation(sub: str, claim: str, purpose: str, action: str = "use") -> dict[str, Any]:
    return {"subject": {"type": "user", "id": sub}, "action": {"name": action},
            "resource": {"type": "claim", "id": claim}, "context": {"purpose": purpose}}


def without_id(answer: dict[str, Any]) -> dict[str, Any]:
    return {**answer, "context": {k: v for k, v in answer["context"].items()
                                  if k != "decision_id"}}


# -- records, history, expiry ---------------------------------------------------------------


def test_history_is_append_only_and_answers_point_in_time(any_env: Env) -> None:
    env = any_env
    svc, alice = env.service, env.alice.id
    svc.record_refusal(alice, ONE, "sub-a1", now=T0)
    svc.record_decision(alice, ONE, "sub-a1", {"email"}, now=T0 + timedelta(hours=1))
    before = [(e.id, e.seq, e.kind, e.state, dict(e.claims)) for e in svc.history(alice,
                                                                                  "agency-one")]
    svc.withdraw(alice, "agency-one", claim="email", now=T0 + timedelta(hours=2))
    svc.withdraw(alice, "agency-one", now=T0 + timedelta(hours=3))
    events = svc.history(alice, "agency-one")
    assert [(e.kind, e.state) for e in events] == [
        ("refused", "refused"), ("given", "given"), ("withdrawn", "given"),
        ("withdrawn", "withdrawn")]
    assert [(e.id, e.seq, e.kind, e.state, dict(e.claims)) for e in events[:2]] == before
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert events[2].affected == ["email"] and events[3].affected == ["name"]
    assert all(e.notice_version == "2024-1" and e.notice_language == "en" for e in events)

    at = svc.consented_at
    assert not at(alice, "agency-one", "email", "notifications", T0 - timedelta(days=1))
    assert not at(alice, "agency-one", "email", "notifications", T0 + timedelta(minutes=30))
    assert at(alice, "agency-one", "email", "notifications", T0 + timedelta(minutes=90))
    assert at(alice, "agency-one", "name", "identification", T0 + timedelta(minutes=150))
    assert not at(alice, "agency-one", "email", "notifications", T0 + timedelta(minutes=150))
    assert not at(alice, "agency-one", "name", "identification", T0 + timedelta(hours=4))
    assert not at(alice, "agency-one", "email", "eligibility", T0 + timedelta(minutes=90))
    # the past does not change: asked again later, the answer for 90 minutes is the same
    assert at(alice, "agency-one", "email", "notifications", T0 + timedelta(minutes=90))
    assert len(env.withdrawals) == 2
    assert env.withdrawals[0].claims == {"email"} and not env.withdrawals[0].complete
    assert env.withdrawals[1].claims == {"name"} and env.withdrawals[1].complete
    assert env.withdrawals[1].subject == "sub-a1"


def test_partial_consent_releases_required_and_ticked_only(env: Env) -> None:
    svc, alice = env.service, env.alice.id
    requested = {"name", "email", "health_card"}
    assert svc.needs_consent(alice, ONE, requested, now=T0)
    grant = svc.record_decision(alice, ONE, "sub-a1", {"email", "name", "unknown"},
                                requested_claims=requested, now=T0)
    assert set(grant.claims) == {"name", "email"}
    assert grant.declined == {"health_card"}
    assert svc.granted_claims(alice, "agency-one", now=T0) == {"name", "email"}
    # an unticked optional claim is not asked again; a claim never shown is
    assert not svc.needs_consent(alice, ONE, requested, now=T0)
    assert not svc.needs_consent(alice, ONE, {"name"}, now=T0)
    assert svc.granted_claims(alice, "agency-two", now=T0) == set()


def test_grant_for_a_subset_keeps_earlier_claims_and_asks_for_new_ones(env: Env) -> None:
    svc, alice = env.service, env.alice.id
    svc.record_decision(alice, ONE, "s", set(), requested_claims={"name"}, now=T0)
    assert svc.needs_consent(alice, ONE, {"name", "email"}, now=T0)
    svc.record_decision(alice, ONE, "s", {"email"}, requested_claims={"email"}, now=T0)
    assert svc.granted_claims(alice, "agency-one", now=T0) == {"name", "email"}
    assert [e.kind for e in svc.history(alice, "agency-one")] == ["given", "renewed"]


def test_refusal_leaves_a_valid_grant_and_a_first_refusal_denies(env: Env) -> None:
    svc, alice, bob = env.service, env.alice.id, env.bob.id
    svc.record_decision(alice, ONE, "s", {"email"}, now=T0)
    grant = svc.record_refusal(alice, ONE, "s", requested_claims={"health_card"}, now=T0)
    assert grant.valid and set(grant.claims) == {"name", "email"}
    refused = svc.record_refusal(bob, ONE, "b", now=T0)
    assert refused.state == "refused" and not refused.claims
    assert svc.needs_consent(bob, ONE, None, now=T0)


def record_validity(db: Database, account_id: str, client_id: str) -> datetime | None:
    with db.session() as s:
        return s.scalars(select(ConsentRecord.expires_at).where(
            ConsentRecord.account_id == account_id,
            ConsentRecord.client_id == client_id)).one()


def test_expiry_job_finds_only_valid_grants_past_their_end(any_env: Env) -> None:
    """The record carries its grant's end (consent_records.expires_at) from every append: a
    grant withdrawn, renewed or without an end is never picked up, and an expired one once."""
    env = any_env
    svc, alice, bob = env.service, env.alice.id, env.bob.id
    svc.record_decision(alice, ONE, "s", set(), now=T0)
    svc.record_decision(bob, ONE, "b", set(), now=T0)
    svc.record_decision(bob, TWO, "b2", set(), now=T0)  # TWO's grants do not end
    assert record_validity(env.db, alice, "agency-one") == T0 + timedelta(days=30)
    assert record_validity(env.db, bob, TWO.client_id) is None
    svc.withdraw(bob, "agency-one", now=T0 + timedelta(days=1))
    assert record_validity(env.db, bob, "agency-one") is None
    renewed_at = T0 + timedelta(days=20)
    svc.record_decision(alice, ONE, "s", set(), now=renewed_at)
    assert record_validity(env.db, alice, "agency-one") == renewed_at + timedelta(days=30)

    assert svc.expire_due(now=T0 + timedelta(days=40)) == 0  # alice renewed, bob withdrew
    assert svc.expire_due(now=renewed_at + timedelta(days=31)) == 1
    assert record_validity(env.db, alice, "agency-one") is None
    assert svc.expire_due(now=renewed_at + timedelta(days=400)) == 0
    assert [e.kind for e in svc.history(alice, "agency-one")] == ["given", "renewed", "expired"]
    assert [e.kind for e in svc.history(bob, "agency-one")] == ["given", "withdrawn"]


def test_migration_0010_fills_each_records_validity_from_its_last_event(
        database_url: str) -> None:
    from alembic import command

    from civitas.migrations import alembic_config, upgrade

    db = Database(database_url)
    try:
        upgrade(db.engine)
        service = ConsentService(db, FakeSigner())
        with db.session() as s:
            alice, bob = ConstituentAccount(), ConstituentAccount()
            s.add_all([alice, bob])
        service.record_decision(alice.id, ONE, "s", set(), now=T0)
        service.record_decision(bob.id, ONE, "b", set(), now=T0)
        service.withdraw(bob.id, "agency-one", now=T0 + timedelta(days=1))
        service.record_decision(bob.id, TWO, "b2", set(), now=T0)
        command.downgrade(alembic_config(db.engine), "0009")
        upgrade(db.engine)
        assert record_validity(db, alice.id, "agency-one") == T0 + timedelta(days=30)
        assert record_validity(db, bob.id, "agency-one") is None
        assert record_validity(db, bob.id, TWO.client_id) is None
        assert service.expire_due(now=T0 + timedelta(days=31)) == 1
    finally:
        db.dispose()


def test_a_new_notice_version_asks_again(env: Env) -> None:
    svc, alice = env.service, env.alice.id
    svc.record_decision(alice, TWO, "s", set(), now=T0)
    assert not svc.needs_consent(alice, TWO, {"email"}, now=T0)
    newer = AgencyPolicy(client_id=TWO.client_id, name=TWO.name, claims=TWO.claims,
                         notice_url=TWO.notice_url, notice_version="2")
    assert svc.needs_consent(alice, newer, {"email"}, now=T0)


def test_expiry_asks_again_and_is_recorded(any_env: Env) -> None:
    env = any_env
    svc, alice, bob = env.service, env.alice.id, env.bob.id
    svc.record_decision(alice, ONE, "s", set(), now=T0)
    assert svc.current(alice, "agency-one", T0).expires_at == T0 + timedelta(days=30)
    assert not svc.needs_consent(alice, ONE, {"name"}, now=T0 + timedelta(days=29))
    later = T0 + timedelta(days=31)
    assert svc.needs_consent(alice, ONE, {"name"}, now=later)
    assert svc.granted_claims(alice, "agency-one", now=later) == set()
    assert svc.current(alice, "agency-one", later).state == "expired"
    query = EvaluationQuery("user", "s", "use", "claim", "name", "identification")
    [before] = svc.decisions.decide("agency-one", [query], now=T0 + timedelta(days=29))
    [after] = svc.decisions.decide("agency-one", [query], now=later)
    assert before.decision and (after.decision, after.reason) == (False, "expired")
    renewed = svc.record_decision(alice, ONE, "s", set(), now=later)
    assert renewed.state == "renewed" and renewed.expires_at == later + timedelta(days=30)
    events = svc.history(alice, "agency-one")
    assert [(e.kind, e.at) for e in events] == [
        ("given", T0), ("expired", T0 + timedelta(days=30)), ("renewed", later)]

    svc.record_decision(bob, ONE, "b", set(), now=T0)
    assert svc.expire_due(now=T0 + timedelta(days=40)) == 1
    assert svc.expire_due(now=T0 + timedelta(days=40)) == 0
    assert [e.kind for e in svc.history(bob, "agency-one")] == ["given", "expired"]
    with pytest.raises(NothingToWithdraw):
        svc.withdraw(bob, "agency-one", now=T0 + timedelta(days=41))


def test_withdrawal_rules(env: Env) -> None:
    svc, alice = env.service, env.alice.id
    with pytest.raises(NothingToWithdraw):
        svc.withdraw(alice, "agency-one")
    svc.record_decision(alice, ONE, "s", {"email"})
    with pytest.raises(RequiredClaimWithdrawal):
        svc.withdraw(alice, "agency-one", claim="name")
    with pytest.raises(NothingToWithdraw):
        svc.withdraw(alice, "agency-one", claim="health_card")
    svc.record_decision(alice, TWO, "s2", set())
    assert {g.client_id for g in svc.withdraw_all(alice)} == {"agency-one", "agency-two"}
    assert svc.granted_claims(alice, "agency-one") == set()
    assert {w.client_id for w in env.withdrawals} == {"agency-one", "agency-two"}


def test_every_consent_event_is_one_ledger_entry_of_what_it_records(env: Env) -> None:
    """Every append (given, renewed, refused, withdrawn in part and in whole, expired) writes
    exactly one ledger entry in its own transaction, holding what the event holds: no event
    without its entry, no entry saying something else."""
    from cryptography.fernet import Fernet

    from consent.ledger import Ledger
    from consent.models import EVENT_KINDS
    from consent.reconcile import reconcile
    from kernel.crypto import FieldCipher

    ledger = Ledger(env.db, FieldCipher([Fernet.generate_key().decode()]),
                    origin="audit.civitas.test/ledger")
    svc = ConsentService(env.db, env.signer, ledger=ledger)
    alice, bob = env.alice.id, env.bob.id
    svc.record_decision(alice, ONE, "sub-a1", {"email"}, now=T0)
    svc.record_decision(alice, ONE, "sub-a1", {"email", "health_card"},
                        requested_claims={"health_card"}, now=T0 + timedelta(hours=1))
    svc.record_refusal(alice, ONE, "sub-a1", requested_claims={"email"},
                       now=T0 + timedelta(hours=2))
    svc.withdraw(alice, "agency-one", claim="email", now=T0 + timedelta(hours=3))
    svc.withdraw(alice, "agency-one", now=T0 + timedelta(hours=4))
    svc.record_refusal(bob, ONE, "sub-b1", now=T0)
    svc.record_decision(bob, ONE, "sub-b1", set(), now=T0 + timedelta(hours=1))
    assert svc.expire_due(now=T0 + timedelta(days=40)) == 1

    events = [(svc.current(a, "agency-one", T0).record_id, e)
              for a in (alice, bob) for e in svc.history(a, "agency-one")]
    assert [e.kind for _, e in events] == [
        "given", "renewed", "refused", "withdrawn", "withdrawn", "refused", "given", "expired"]
    assert {e.kind for _, e in events} == set(EVENT_KINDS)
    entries = [json.loads(e.entry) for e in ledger.entries()]
    assert len(entries) == len(events)
    by_event = {(d["data"]["record"], d["data"]["event"]): d for d in entries}
    for record_id, e in events:
        entry = by_event[(record_id, e.seq)]
        assert entry["kind"] == f"consent.{e.kind}"
        assert entry["data"] == {
            "record": record_id, "event": e.seq, "agency": "agency-one",
            "subject": e.subject, "state": e.state, "claims": e.claims,
            "declined": e.declined, "affected": e.affected, "method": e.method,
            "notice_version": e.notice_version, "receipt": e.receipt_id}
    # the partial withdrawal leaves the grant valid, without the claim withdrawn
    partial = by_event[(events[3][0], 4)]["data"]
    assert partial["state"] == "renewed" and partial["affected"] == ["email"]
    assert set(partial["claims"]) == {"name", "health_card"}
    report = reconcile(env.db, ledger, None, None)
    assert report.ok and report.records == report.entries == len(events)


def test_concurrent_grants_append_in_order_to_one_record(any_env: Env) -> None:
    """Unique (account, agency) and (record, seq), and the record's row lock: racing first
    grants make one record and racing appends queue or retry, so no event is lost and the
    order has no gap."""
    env = any_env
    errors: list[BaseException] = []

    def grant() -> None:
        try:
            env.service.record_decision(env.alice.id, ONE, "sub-a1", {"email"})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=grant) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    events = env.service.history(env.alice.id, "agency-one")
    assert [e.seq for e in events] == list(range(1, 13))
    assert len(env.service.receipts_for_account(env.alice.id)) == 12


# -- receipts -----------------------------------------------------------------------------


def test_receipts_are_schema_valid_and_verify_with_the_jwks(env: Env) -> None:
    svc, alice = env.service, env.alice.id
    svc.record_decision(alice, ONE, "sub-a1", {"email", "health_card"}, now=T0)
    svc.withdraw(alice, "agency-one", claim="health_card", now=T0 + timedelta(minutes=1))
    svc.withdraw(alice, "agency-one", now=T0 + timedelta(minutes=2))
    receipts = svc.receipts_for_account(alice)
    assert len(receipts) == 3
    validator = jsonschema.Draft202012Validator(
        receipt_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    keys = KeySet.import_key_set(env.signer.jwks())  # type: ignore[arg-type]
    for r in receipts:
        validator.validate(r.payload)
        token = jws.deserialize_compact(r.jws, keys)
        assert json.loads(token.payload) == r.payload
        assert r.payload["consentReceiptID"] == r.id
    given = next(r.payload for r in receipts if r.payload["civitas"]["event"] == "given")
    assert given["version"] == "KI-CR-v1.1.0"
    assert given["consentTimestamp"] == int(T0.timestamp())
    assert given["piiPrincipalId"] == "sub-a1"
    assert given["sensitive"] is True and given["spiCat"] == ["health"]
    purposes = {p["purposeCategory"][0]: p for p in given["services"][0]["purposes"]}
    assert purposes["identification"]["lawfulBasis"] == "public_task"
    assert purposes["identification"]["primaryPurpose"] is True
    assert purposes["notifications"]["purpose"] == "Sending you updates"
    assert purposes["notifications"]["piiCategory"] == ["email"]
    last = receipts[0].payload
    assert last["civitas"]["event"] == "withdrawn" and not last["sensitive"]
    assert {p["piiCategory"][0] for p in last["services"][0]["purposes"]} == {"name", "email"}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**given, "consentTimestamp": "2030-01-01"})


def test_allowing_nothing_optional_records_the_grant_without_a_receipt(env: Env) -> None:
    optional_only = AgencyPolicy(
        client_id="agency-two", name="Parks Service", notice_url="https://parks.example.gov/p",
        notice_version="1",
        claims=(ClaimRequest("email", ("contact",), "consent", False, "Your email"),))
    grant = env.service.record_decision(env.alice.id, optional_only, "s", set())
    assert grant.valid and not grant.claims and grant.receipt_id is None
    assert not env.service.needs_consent(env.alice.id, optional_only, {"email"})
    env.service.withdraw(env.alice.id, "agency-two")
    assert env.withdrawals[0].receipt_id is None
    assert env.service.receipts_for_account(env.alice.id) == []


def test_agency_fetches_only_its_own_receipts(env: Env) -> None:
    env.service.record_decision(env.alice.id, ONE, "sub-a1", set())
    [receipt] = env.service.receipts_for_account(env.alice.id)
    resp = env.client.get(f"/access/v1/receipts/{receipt.id}", headers=ONE_AUTH)
    assert resp.status_code == 200
    assert resp.json["jws"] == receipt.jws and resp.json["receipt"] == receipt.payload
    other = env.client.get(f"/access/v1/receipts/{receipt.id}",
                           headers={"Authorization": "Bearer token-two"})
    unknown = env.client.get("/access/v1/receipts/nope", headers={
        "Authorization": "Bearer token-two"})
    assert other.status_code == unknown.status_code == 404
    assert other.json == unknown.json
    assert env.client.get(f"/access/v1/receipts/{receipt.id}").status_code == 401


# -- the decision API -----------------------------------------------------------------------


def test_decisions_allow_deny_and_hide_other_agencies_subjects(any_env: Env) -> None:
    env = any_env
    svc = env.service
    svc.record_decision(env.alice.id, ONE, "sub-a1", {"email"})
    svc.record_decision(env.alice.id, TWO, "sub-a2", set())
    post = env.client.post

    allowed = post("/access/v1/evaluation", json=evaluation("sub-a1", "email", "notifications"),
                   headers={**ONE_AUTH, "X-Request-ID": "req-1"})
    assert allowed.status_code == 200 and allowed.headers["X-Request-ID"] == "req-1"
    body = allowed.json
    grant = svc.current(env.alice.id, "agency-one")
    assert body["decision"] is True
    assert body["context"]["reason"] == "consented"
    assert body["context"]["consent_record_id"] == grant.record_id
    assert body["context"]["receipt_id"] == grant.receipt_id
    assert body["context"]["lawful_basis"] == "consent"
    assert body["context"]["expires_at"].endswith("Z")

    other_purpose = post("/access/v1/evaluation",
                         json=evaluation("sub-a1", "email", "marketing"), headers=ONE_AUTH).json
    assert other_purpose["decision"] is False
    assert other_purpose["context"]["reason"] == "purpose_not_consented"
    not_granted = post("/access/v1/evaluation", json=evaluation(
        "sub-a1", "health_card", "eligibility"), headers=ONE_AUTH).json
    assert not_granted["context"]["reason"] == "claim_not_consented"
    # a consented claim and purpose, asked as anything but "use" of a user's claim: denied
    # by the check of that member (each would be allowed without it)
    for member, value, reason in [("action", {"name": "sell"}, "unsupported_action"),
                                  ("subject", {"type": "group", "id": "sub-a1"},
                                   "unsupported_subject_type"),
                                  ("resource", {"type": "document", "id": "email"},
                                   "unsupported_resource_type")]:
        odd = post("/access/v1/evaluation", headers=ONE_AUTH, json={
            **evaluation("sub-a1", "email", "notifications"), member: value}).json
        assert without_id(odd) == {"decision": False, "context": {"reason": reason}}, member

    # agency two's subject, asked by agency one, is just an unknown subject
    foreign = post("/access/v1/evaluation", json=evaluation("sub-a2", "email", "contact"),
                   headers=ONE_AUTH)
    unknown = post("/access/v1/evaluation", json=evaluation("nobody", "email", "contact"),
                   headers=ONE_AUTH)
    assert foreign.status_code == unknown.status_code == 200
    assert without_id(foreign.json) == without_id(unknown.json) == {
        "decision": False, "context": {"reason": "no_consent"}}
    assert foreign.json["context"]["decision_id"] != unknown.json["context"]["decision_id"]
    basic = "Basic " + base64.b64encode(b"agency-two:secret-two").decode()
    assert post("/access/v1/evaluation", json=evaluation("sub-a2", "email", "contact"),
                headers={"Authorization": basic}).json["decision"] is True

    svc.withdraw(env.alice.id, "agency-one")
    after = post("/access/v1/evaluation", json=evaluation("sub-a1", "email", "notifications"),
                 headers=ONE_AUTH).json
    assert after["decision"] is False and after["context"]["reason"] == "withdrawn"


def test_every_decision_is_recorded(env: Env) -> None:
    env.service.record_decision(env.alice.id, ONE, "sub-a1", set())
    env.client.post("/access/v1/evaluation", json=evaluation("sub-a1", "name",
                                                             "identification"),
                    headers={**ONE_AUTH, "X-Request-ID": "r-9"})
    env.client.post("/access/v1/evaluations", headers=ONE_AUTH, json={
        "subject": {"type": "user", "id": "nobody"}, "action": {"name": "use"},
        "context": {"purpose": "identification"},
        "evaluations": [{"resource": {"type": "claim", "id": "name"}},
                        {"resource": {"type": "claim", "id": "email"}}]})
    rows = env.decisions()
    assert [(r.subject, r.claim, r.decision, r.reason) for r in rows] == [
        ("sub-a1", "name", True, "consented"), ("nobody", "name", False, "no_consent"),
        ("nobody", "email", False, "no_consent")]
    assert rows[0].account_id == env.alice.id and rows[0].request_id == "r-9"
    assert rows[1].account_id is None and rows[0].client_id == "agency-one"
    assert [d.id for d in env.service.decisions.for_account(env.alice.id)] == [rows[0].id]


def test_batch_evaluations(env: Env) -> None:
    env.service.record_decision(env.alice.id, ONE, "sub-a1", {"email"})
    defaults = {"subject": {"type": "user", "id": "sub-a1"}, "action": {"name": "use"}}
    items = [
        {"resource": {"type": "claim", "id": "name"}, "context": {"purpose": "identification"}},
        {"resource": {"type": "claim", "id": "health_card"},
         "context": {"purpose": "eligibility"}},
        {"resource": {"type": "claim", "id": "email"}, "context": {"purpose": "notifications"}},
    ]
    post = env.client.post
    all_ = post("/access/v1/evaluations", json={**defaults, "evaluations": items},
                headers=ONE_AUTH).json
    assert [e["decision"] for e in all_["evaluations"]] == [True, False, True]
    first_deny = post("/access/v1/evaluations", headers=ONE_AUTH, json={
        **defaults, "evaluations": items,
        "options": {"evaluations_semantic": "deny_on_first_deny"}}).json
    assert [e["decision"] for e in first_deny["evaluations"]] == [True, False]
    first_permit = post("/access/v1/evaluations", headers=ONE_AUTH, json={
        **defaults, "evaluations": items,
        "options": {"evaluations_semantic": "permit_on_first_permit"}}).json
    assert [e["decision"] for e in first_permit["evaluations"]] == [True]
    override = post("/access/v1/evaluations", headers=ONE_AUTH, json={
        **defaults, "evaluations": [{**items[0], "subject": {"type": "user", "id": "x"}}]}).json
    assert override["evaluations"][0]["context"]["reason"] == "no_consent"
    # context is free-form beyond its purpose (AuthZEN 5.4)
    free = post("/access/v1/evaluation", headers=ONE_AUTH, json={**evaluation(
        "sub-a1", "email", "notifications"), "context": {"purpose": "notifications",
                                                         "properties": 5, "ip": "x"}}).json
    assert free["decision"] is True
    single = post("/access/v1/evaluations", headers=ONE_AUTH,
                  json=evaluation("sub-a1", "email", "notifications")).json
    assert single["decision"] is True and "evaluations" not in single


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/access/v1/evaluation", b'{"subject": ', "not valid JSON"),
    ("/access/v1/evaluation", b"", "must be a JSON object"),
    ("/access/v1/evaluation", b"[1, 2]", "must be a JSON object"),
    ("/access/v1/evaluation", json.dumps({"subject": {"type": "user", "id": "s"}}).encode(),
     "missing field action"),
    ("/access/v1/evaluation", json.dumps({**evaluation("s", "email", "p"), "context": {}})
     .encode(), "missing field context.purpose"),
    ("/access/v1/evaluation", json.dumps({**evaluation("s", "email", "p"),
                                          "subject": {"type": "user", "id": 7}}).encode(),
     "subject.id must be a string"),
    ("/access/v1/evaluation", json.dumps({**evaluation("s", "email", "p"),
                                          "action": {"name": "use", "properties": []}})
     .encode(), "action.properties must be a JSON object"),
    ("/access/v1/evaluations", json.dumps({"evaluations": [{"subject": {
        "type": "user", "id": "s"}}]}).encode(), "missing field evaluations[0].action"),
    ("/access/v1/evaluations", json.dumps({**evaluation("s", "e", "p"), "options": {
        "evaluations_semantic": "all"}}).encode(), "evaluations_semantic"),
    ("/access/v1/evaluations", json.dumps({**evaluation("s", "e", "p"),
                                           "evaluations": [{}] * 101}).encode(), "at most"),
    # every request is recorded (decision row, ledger entry): no personal data in clear
    ("/access/v1/evaluation", json.dumps(evaluation("alice@example.org", "email", "p"))
     .encode(), "subject.id looks like an e-mail address"),
    ("/access/v1/evaluations", json.dumps({**evaluation("s", "e", "p"), "evaluations": [
        {"context": {"purpose": "write to a@b.example"}},
        {"context": {"purpose": "a@b.example"}}]}).encode(),
     "evaluations[1].context.purpose looks like an e-mail address"),
    ("/access/v1/evaluation", json.dumps(evaluation("s", "email", "p\u0000")).encode(),
     "context.purpose must not contain control characters"),
    # JSON can escape a lone surrogate; it is no Unicode text, so no record can hold it
    ("/access/v1/evaluation", json.dumps(evaluation("sub-\ud800", "email", "p")).encode(),
     "subject.id must be Unicode text (it holds a lone surrogate)"),
    ("/access/v1/evaluations", json.dumps({**evaluation("s", "e", "p"), "evaluations": [
        {}, {"resource": {"type": "claim", "id": "em\udfffail"}}]}).encode(),
     "evaluations[1].resource.id must be Unicode text"),
    # I-JSON (RFC 7493 2.3): json kept the last of a repeated name, so the question asked
    # about one citizen and was recorded as asked about another
    ("/access/v1/evaluation", b'{"subject":{"type":"user","id":"sub-a1","id":"sub-b1"},'
     b'"action":{"name":"use"},"resource":{"type":"claim","id":"email"},'
     b'"context":{"purpose":"p"}}', "must not repeat a member name: 'id'"),
    ("/access/v1/evaluations", json.dumps({**evaluation("s", "e", "p"), "evaluations": [
        {}, {"context": {"purpose": "x"}}]}).encode().replace(
        b'{"purpose": "x"}', b'{"purpose": "x", "purpose": "y"}'),
     "must not repeat a member name: 'purpose'"),
])
def test_malformed_requests_are_400_with_a_clear_error(env: Env, path: str, body: bytes,
                                                       message: str) -> None:
    resp = env.client.post(path, data=body, headers={**ONE_AUTH,
                                                     "Content-Type": "application/json"})
    assert resp.status_code == 400
    assert resp.json["error"] == "invalid_request"
    assert message in resp.json["error_description"]
    assert env.decisions() == []


def test_colons_in_strings_are_not_taken_for_repeated_names(env: Env) -> None:
    """loads_unique's fast path counts colons; text with colons in its strings is read
    exactly, and answered when no name repeats."""
    env.service.record_decision(env.alice.id, ONE, "sub-a1", {"email"})
    body = {**evaluation("sub-a1", "email", "urn:gov:purpose:notifications"),
            "context": {"purpose": "urn:gov:purpose:notifications", "note": "a:b:c"}}
    resp = env.client.post("/access/v1/evaluation", json=body, headers=ONE_AUTH)
    assert resp.status_code == 200, resp.json
    assert [(r.subject, r.purpose) for r in env.decisions()] == [
        ("sub-a1", "urn:gov:purpose:notifications")]


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic " + base64.b64encode(
    b"agency-two:wrong").decode(), "Basic !!!"])
def test_bad_credentials_are_401(env: Env, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    resp = env.client.post("/access/v1/evaluation", json=evaluation("s", "email", "p"),
                           headers=headers)
    assert resp.status_code == 401
    assert resp.json["error"] == "invalid_client"
    assert 'Bearer realm="civitas-consent"' in resp.headers["WWW-Authenticate"]
    assert env.decisions() == []


def test_rate_limit_per_agency(tmp_path: Path) -> None:
    env = Env(tmp_path, rate_limit=3)
    try:
        within_one_window()  # or a turn between the requests lets the fourth through
        post = env.client.post
        for _ in range(3):
            assert post("/access/v1/evaluation", json=evaluation("s", "e", "p"),
                        headers=ONE_AUTH).status_code == 200
        limited = post("/access/v1/evaluation", json=evaluation("s", "e", "p"),
                       headers=ONE_AUTH)
        assert limited.status_code == 429 and limited.json["error"] == "rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        # another agency has its own allowance
        assert post("/access/v1/evaluation", json=evaluation("s", "e", "p"), headers={
            "Authorization": "Bearer token-two"}).status_code == 200
        assert len(env.decisions()) == 4
    finally:
        env.db.dispose()


# -- the OpenAPI document --------------------------------------------------------------------


def test_openapi_document_is_served_and_describes_real_answers(env: Env) -> None:
    """Allowed answers (which random fuzzing cannot reach) validated with jsonschema against
    the served document."""
    doc = env.client.get("/access/v1/openapi.json").json
    assert doc == json.loads(json.dumps(openapi_document(scope="consent.decide")))
    assert doc["openapi"].startswith("3.1")
    env.service.record_decision(env.alice.id, ONE, "sub-a1", {"email"})
    [receipt] = env.service.receipts_for_account(env.alice.id)

    def check(schema_name: str, instance: Any) -> None:
        schema = {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
        jsonschema.Draft202012Validator(
            schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        ).validate(instance)

    request = evaluation("sub-a1", "email", "notifications")
    check("EvaluationRequest", request)
    check("EvaluationResponse", env.client.post("/access/v1/evaluation", json=request,
                                                headers=ONE_AUTH).json)
    batch = {"subject": request["subject"], "action": request["action"],
             "evaluations": [{"resource": request["resource"], "context": request["context"]}]}
    check("EvaluationsRequest", batch)
    check("EvaluationsResponse", env.client.post("/access/v1/evaluations", json=batch,
                                                 headers=ONE_AUTH).json)
    with pytest.raises(jsonschema.ValidationError):
        check("EvaluationsRequest", {"evaluations": [{"resource": request["resource"]}]})
    check("ReceiptResponse", env.client.get(f"/access/v1/receipts/{receipt.id}",
                                            headers=ONE_AUTH).json)
    check("Error", env.client.post("/access/v1/evaluation", data=b"{",
                                   headers=ONE_AUTH).json)


def test_pdp_metadata_points_at_the_evaluation_endpoints(env: Env) -> None:
    meta = env.client.get("/.well-known/authzen-configuration").json
    assert meta == {"policy_decision_point": "http://localhost",
                    "access_evaluation_endpoint": "http://localhost/access/v1/evaluation",
                    "access_evaluations_endpoint": "http://localhost/access/v1/evaluations"}


# schemathesis's lazy fixture loader does not work with this pytest, so the app it tests is
# built once at import, on a database in a temporary directory removed at exit.
_API_DIR = tempfile.TemporaryDirectory(prefix="civitas-consent-api-")
_API_ENV = Env(Path(_API_DIR.name), rate_limit=10**9)
_API_ENV.service.record_decision(_API_ENV.alice.id, ONE, "sub-a1", {"email"})
api_schema = schemathesis.openapi.from_wsgi("/access/v1/openapi.json", _API_ENV.app)


@api_schema.parametrize()
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case: Any) -> None:
    """schemathesis generates requests from the served document (its examples, coverage and
    fuzzing phases: boundary values, valid and invalid data) and checks every answer against
    it: status codes, content types, response schemas and headers, invalid data rejected,
    valid data accepted, authentication enforced."""
    case.call_and_validate(headers=ONE_AUTH)


# -- the citizen's pages --------------------------------------------------------------------


def test_consents_page_lists_and_withdraws_with_csrf(env: Env) -> None:
    svc, client = env.service, env.client
    assert client.get("/account/consents").headers["Location"] == (
        "/login?next=%2Faccount%2Fconsents")  # back here after signing in
    svc.record_decision(env.alice.id, ONE, "sub-a1", {"email"})
    svc.record_decision(env.alice.id, TWO, "sub-a2", set())
    svc.record_decision(env.bob.id, TWO, "sub-b2", set())
    env.login(env.alice)
    page = client.get("/account/consents").get_data(as_text=True)
    for expected in ("Department of Benefits", "Parks Service", "Your email address",
                 "Sending you updates", "Knowing who you are", "Required",
                 "Withdraw all consent for Department of Benefits", "Consent receipts"):
        assert expected in page
    assert "Your health card number" not in page
    # her own receipts are listed, never anyone else's (Bob's grant to agency two)
    with env.db.session() as s:
        receipts = {owner: set(s.scalars(select(ConsentReceipt.id).where(
            ConsentReceipt.account_id == owner))) for owner in (env.alice.id, env.bob.id)}
    assert len(receipts[env.alice.id]) == 2 and len(receipts[env.bob.id]) == 1
    assert all(r in page for r in receipts[env.alice.id])
    assert not any(r in page for r in receipts[env.bob.id])

    refused = client.post("/account/consents/withdraw", data={"client_id": "agency-one"})
    assert refused.status_code == 400
    assert svc.granted_claims(env.alice.id, "agency-one") == {"name", "email"}

    one_claim = client.post("/account/consents/withdraw", data={
        "client_id": "agency-one", "claim": "email", "csrf": "csrf-token"})
    assert one_claim.status_code == 303
    assert svc.granted_claims(env.alice.id, "agency-one") == {"name"}
    assert "no longer shared" in client.get("/account/consents").get_data(as_text=True)
    required = client.post("/account/consents/withdraw", data={
        "client_id": "agency-one", "claim": "name", "csrf": "csrf-token"})
    assert required.status_code == 409

    assert client.post("/account/consents/withdraw", data={
        "client_id": "agency-two", "csrf": "csrf-token"}).status_code == 303
    assert svc.granted_claims(env.alice.id, "agency-two") == set()
    assert svc.granted_claims(env.bob.id, "agency-two") == {"email"}
    assert [(w.client_id, w.complete) for w in env.withdrawals] == [
        ("agency-one", False), ("agency-two", True)]
    decision = client.post("/access/v1/evaluation", json=evaluation("sub-a2", "email",
                                                                    "contact"),
                           headers={"Authorization": "Bearer token-two"}).json
    assert decision["decision"] is False
    # a grant already withdrawn is not withdrawn twice
    # (a second Withdraw, from another tab or a double click, is not an error page: back to
    # the consents, saying that nothing changed)
    again = client.post("/account/consents/withdraw", data={
        "client_id": "agency-two", "csrf": "csrf-token"})
    assert again.status_code == 303 and again.headers["Location"] == "/account/consents"
    assert "Nothing was changed" in client.get("/account/consents").get_data(as_text=True)
    # someone else's grant cannot be withdrawn from this session, even naming their account:
    # Bob's grant to an agency Alice never used
    three = AgencyPolicy(client_id="agency-three", name="Library", claims=TWO.claims,
                         notice_url="https://library.example.gov/privacy", notice_version="1")
    svc.record_decision(env.bob.id, three, "sub-b3", set())
    refused = client.post("/account/consents/withdraw", data={
        "client_id": "agency-three", "account_id": env.bob.id, "csrf": "csrf-token"})
    assert refused.status_code == 303
    assert "Nothing was changed" in client.get("/account/consents").get_data(as_text=True)
    assert svc.granted_claims(env.bob.id, "agency-three") == {"email"}
    assert svc.granted_claims(env.bob.id, "agency-two") == {"email"}
    assert len(env.withdrawals) == 2


def test_receipt_page_and_download_are_the_owners_only(env: Env) -> None:
    env.service.record_decision(env.alice.id, ONE, "sub-a1", {"email"})
    [receipt] = env.service.receipts_for_account(env.alice.id)
    env.login(env.alice)
    page = env.client.get(f"/account/consents/receipts/{receipt.id}").get_data(as_text=True)
    assert receipt.id in page and "Department of Benefits" in page and receipt.jws in page
    download = env.client.get(f"/account/consents/receipts/{receipt.id}/download")
    assert download.headers["Content-Disposition"].startswith("attachment;")
    assert json.loads(download.data) == {"receipt": receipt.payload, "jws": receipt.jws}
    env.login(env.bob)
    assert env.client.get(f"/account/consents/receipts/{receipt.id}").status_code == 404
    assert env.client.get(
        f"/account/consents/receipts/{receipt.id}/download").status_code == 404


def test_consent_page_renders_and_reads_the_answer(env: Env) -> None:
    requested = {"name", "email", "health_card", "undeclared"}
    with env.app.test_request_context("/authorize/consent"):
        session["csrf"] = "csrf-token"
        html = render_consent_page(ONE, requested, action_url="/authorize/consent",
                                   hidden={"flow": "f-1"})
    assert "Department of Benefits" in html
    assert 'href="https://benefits.example.gov/privacy"' in html and "2024-1" in html
    assert "(required to sign in)" in html and "Knowing who you are" in html
    assert re.search(r'type="checkbox" name="claim" value="email">', html)  # not pre-ticked
    assert 'name="flow" value="f-1"' in html and 'name="csrf" value="csrf-token"' in html
    assert 'value="allow"' in html and 'value="deny"' in html and "undeclared" not in html

    form = {"csrf": "csrf-token", "decision": "allow", "claim": ["email", "name", "x"]}
    with env.app.test_request_context("/authorize/consent", method="POST", data=form):
        session["csrf"] = "csrf-token"
        answer = read_consent_form(ONE, requested)
    assert answer.allow and answer.optional == {"email"}
    with env.app.test_request_context("/authorize/consent", method="POST",
                                      data={**form, "decision": "deny"}):
        session["csrf"] = "csrf-token"
        assert not read_consent_form(ONE, requested).allow
    with env.app.test_request_context("/authorize/consent", method="POST",
                                      data={**form, "csrf": "forged"}):
        session["csrf"] = "csrf-token"
        with pytest.raises(FormExpired):
            read_consent_form(ONE, requested)


# -- storage --------------------------------------------------------------------------------


def test_migration_matches_models_and_downgrades(database_url: str) -> None:
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from civitas.migrations import alembic_config, upgrade

    def ours(conn: Any) -> MigrationContext:
        """Compare only this package's tables (other packages' migrations test theirs)."""
        def include(obj: Any, name: str | None, kind: str, *_: Any) -> bool:
            table = obj if kind == "table" else getattr(obj, "table", None)
            return table is None or str(table.name).startswith("consent_")

        return MigrationContext.configure(conn, opts={"include_object": include})

    db = Database(database_url)
    try:
        upgrade(db.engine)
        with db.engine.connect() as conn:
            diff = compare_metadata(ours(conn), Base.metadata)
        assert diff == []
        service = ConsentService(db, FakeSigner())
        with db.session() as s:
            account = ConstituentAccount()
            s.add(account)
        service.record_decision(account.id, ONE, "s", {"email"}, now=utcnow())
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(ConsentEvent)) == 1
        command.downgrade(alembic_config(db.engine), "0004")
        with db.engine.connect() as conn:
            diff = compare_metadata(ours(conn), Base.metadata)
        assert {d[1].name for d in diff if d[0] == "add_table"} == {
            "consent_records", "consent_events", "consent_receipts", "consent_decisions"}
    finally:
        db.dispose()


@pytest.mark.parametrize("make", ["record", "grant", "account"])
def test_ids_are_random_version_4_uuids(make: str) -> None:
    import uuid

    from broker.models import new_account_id
    from idp.tokens import new_grant_id
    from kernel.ids import new_id as new_record_id

    new_id = {"record": new_record_id, "grant": new_grant_id, "account": new_account_id}[make]
    ids = {new_id() for _ in range(2000)}
    assert len(ids) == 2000
    for value in ids:
        parsed = uuid.UUID(value)
        assert parsed.hex == value and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_decision_ids_are_version_7_uuids_that_sort_by_time() -> None:
    """RFC 9562 section 5.7: 48 bits of Unix time in ms, version 7, variant 10, random
    bits; ids made in a later millisecond sort after earlier ones (so new decision rows go
    to the end of the primary key's index)."""
    import uuid

    from consent.models import new_time_ordered_id

    before = time.time_ns() // 1_000_000
    first = [new_time_ordered_id() for _ in range(1000)]
    time.sleep(0.002)
    later = [new_time_ordered_id() for _ in range(1000)]
    after = time.time_ns() // 1_000_000
    assert len(set(first + later)) == 2000
    for value in first + later:
        parsed = uuid.UUID(value)
        assert parsed.hex == value and parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert before <= parsed.int >> 80 <= after
    assert max(first) < min(later)
    # rand_a (12 bits) and rand_b (62 bits) are random: each of those bits varies
    random_bits = 0xFFF << 64 | (1 << 62) - 1
    varying = 0
    for value in later:
        varying |= (uuid.UUID(value).int ^ uuid.UUID(later[0]).int) & random_bits
    assert varying == random_bits
