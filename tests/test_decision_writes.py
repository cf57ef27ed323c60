"""The decision API's writes on PostgreSQL: every answer is one decision row and one ledger
entry, written by one statement (consent/decisions.py ``_RECORD_PG``), so both tables get
their rows or neither does, and nothing is answered unless they are committed."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from jose import jwt as jose_jwt
from sqlalchemy import func, select, text

from civitas.app import create_app
from consent.ledger import merkle
from consent.ledger.models import LedgerEntry
from consent.models import AgencyDecision
from consent.reconcile import reconcile
from tests.conftest import hub_config
from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest, full_login, redeem

CLAIMS = ["email", "name", "given_name", "health_card"]


def auth(agency: Any) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(
        f"{agency.client_id}:{agency.secret}".encode()).decode()}


def batch(sub: str, claims: list[str], purpose: str = "service-delivery") -> dict[str, Any]:
    return {"subject": {"type": "user", "id": sub}, "action": {"name": "use"},
            "context": {"purpose": purpose},
            "evaluations": [{"resource": {"type": "claim", "id": c}} for c in claims]}


def single(sub: str, claim: str) -> dict[str, Any]:
    return {"subject": {"type": "user", "id": sub}, "action": {"name": "use"},
            "resource": {"type": "claim", "id": claim}, "context": {"purpose": "benefits"}}


@pytest.fixture
def hub(upstream_issuer, pg_database_url):
    app = create_app(hub_config(upstream_issuer, pg_database_url))
    yield app
    app.extensions["civitas"].db.dispose()


def counts(hub_: Any) -> tuple[int, int]:
    with hub_.db.session() as s:
        return (s.scalar(select(func.count()).select_from(AgencyDecision)) or 0,
                s.scalar(select(func.count()).select_from(LedgerEntry).where(
                    LedgerEntry.kind == "decision.query")) or 0)


def test_each_answer_is_one_row_and_one_ledger_entry_with_the_same_facts(hub):
    state = hub.extensions["civitas"]
    client = hub.test_client()
    login = AuthRequest(agency=AGENCY_TWO)
    tokens = redeem(client, login, full_login(client, login)["code"]).json
    sub = jose_jwt.get_unverified_claims(tokens["id_token"])["sub"]

    r = client.post("/access/v1/evaluations", json=batch(sub, CLAIMS),
                    headers={**auth(AGENCY_TWO), "X-Request-ID": "batch-1"})
    assert r.status_code == 200, r.get_data(as_text=True)
    answers = r.json["evaluations"]
    assert [a["decision"] for a in answers] == [True, True, True, False]
    # a subject id that JSON and SQL must both carry unchanged
    strange = 'nobody "knows" me \\ \u00fc \u2603 \U0001f600 \'; --'
    unknown = client.post("/access/v1/evaluation", headers=auth(AGENCY_ONE),
                          json=single(strange, "email")).json
    assert unknown["decision"] is False and unknown["context"]["reason"] == "no_consent"

    with state.db.session() as s:
        rows = {d.id: d for d in s.scalars(select(AgencyDecision))}
        stored = list(s.scalars(select(LedgerEntry).where(
            LedgerEntry.kind == "decision.query").order_by(LedgerEntry.seq)))
    entries = [json.loads(e.entry) for e in stored]
    for entry in stored:  # what is stored is what was hashed, at the time it names
        assert entry.leaf_hash == merkle.leaf_hash(entry.entry.encode())
        assert entry.created_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ") == json.loads(
            entry.entry)["time"]
    # one request's entries are written together, at one time (the batch's four, then one)
    assert len({e.created_at for e in stored[:4]}) == 1
    assert stored[4].created_at >= stored[0].created_at
    ids = [a["context"]["decision_id"] for a in answers] + [unknown["context"]["decision_id"]]
    assert sorted(rows) == sorted(ids) and [e["data"]["decision_id"] for e in entries] == ids
    for answer, claim in zip(answers, CLAIMS, strict=True):
        row = rows[answer["context"]["decision_id"]]
        assert (row.client_id, row.subject, row.claim, row.purpose, row.action) == (
            AGENCY_TWO.client_id, sub, claim, "service-delivery", "use")
        assert row.decision is answer["decision"] and row.reason == answer["context"]["reason"]
        assert row.request_id == "batch-1" and row.at.tzinfo is not None
        assert row.account_id is not None and row.record_id is not None
        if answer["decision"]:
            assert row.record_id == answer["context"]["consent_record_id"]
    stranger = rows[unknown["context"]["decision_id"]]
    assert stranger.subject == strange
    assert stranger.account_id is None and stranger.record_id is None
    assert stranger.request_id  # the hub's own request id when the agency sent none
    # each row has a salt of its own, through the JSON of the one statement byte for byte
    assert len({row.subject_salt for row in rows.values()}) == 5
    assert all(isinstance(row.subject_salt, bytes) and len(row.subject_salt) == 16
               for row in rows.values())
    for entry, decision_id, text_ in zip(entries, ids, (e.entry for e in stored), strict=True):
        row = rows[decision_id]
        assert entry["kind"] == "decision.query" and entry["time"].endswith("Z")
        # the subject and record only as their commitment, recomputed here as an auditor
        # would from the row: SHA-256 of the salt, then RFC 8785 of [subject, record] (UTF-8,
        # as the stranger's subject shows)
        digest = hashlib.sha256(row.subject_salt + json.dumps(
            [row.subject, row.record_id], separators=(",", ":"), ensure_ascii=False
        ).encode()).digest()
        assert entry["data"] == {
            "decision_id": row.id, "agency": row.client_id, "action": row.action,
            "claim": row.claim, "purpose": row.purpose, "decision": row.decision,
            "reason": row.reason,
            "subject_commitment": base64.urlsafe_b64encode(digest).rstrip(b"=").decode()}
        assert row.subject not in text_
        assert row.record_id is None or row.record_id not in text_
    # the privacy officers' check finds both sides complete
    report = reconcile(state.db, state.ledger, None, None)
    assert report.ok and not report.missing_in_ledger


def test_a_failed_ledger_write_records_no_decision_and_answers_503(hub):
    """The disk fills up (SQLSTATE 53100) while the ledger entries are written: the agency
    is told to try again, and no decision row stays without its ledger entry."""
    state = hub.extensions["civitas"]
    client = hub.test_client()
    assert client.post("/access/v1/evaluations", json=batch("s-1", CLAIMS),
                       headers=auth(AGENCY_ONE)).status_code == 200
    before = counts(state)
    assert before == (4, 4)
    with state.db.engine.begin() as conn:
        conn.execute(text(
            "CREATE FUNCTION civitas_test_full() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = '53100'; END $$"))
        conn.execute(text(
            "CREATE TRIGGER civitas_test_full BEFORE INSERT ON ledger_entries "
            "FOR EACH ROW EXECUTE FUNCTION civitas_test_full()"))
    try:
        for path, body in (("/access/v1/evaluations", batch("s-2", CLAIMS)),
                           ("/access/v1/evaluation", single("s-3", "email"))):
            r = client.post(path, json=body, headers=auth(AGENCY_ONE))
            assert r.status_code == 503, r.get_data(as_text=True)
            assert r.json["error"] == "temporarily_unavailable"
            assert "decision" not in r.json and "evaluations" not in r.json
        assert counts(state) == before
    finally:
        with state.db.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER civitas_test_full ON ledger_entries"))
            conn.execute(text("DROP FUNCTION civitas_test_full()"))
    r = client.post("/access/v1/evaluations", json=batch("s-2", CLAIMS),
                    headers=auth(AGENCY_ONE))
    assert r.status_code == 200 and counts(state) == (8, 8)
