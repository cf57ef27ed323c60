"""Consents and erasure under concurrency, on the real PostgreSQL: what a race probe found
(each test failed before its fix), repeated until the race is all but certain to occur."""

from __future__ import annotations

import dataclasses
import secrets
import time
from datetime import timedelta
from typing import Any

import pytest

from consent.decisions import parse_evaluation
from kernel.db import utcnow
from tests.conftest import LOW_ACR, hub_config
from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest, redeem
from tests.races import (
    delete_account,
    grant_consent,
    person,
    policy,
    subject,
    together,
    valid_grants,
)

ONE = AGENCY_ONE.client_id
OFFLINE = ["openid", "profile", "email", "offline_access"]
#: agency one's claims rest on consent (asked on its page); agency two's on a public task
CONSENT = {
    "notice_url": "https://one.agency.example/privacy", "notice_version": "v1",
    "purpose_labels": {"benefits": "to decide your benefit claim"},
    "claims": [{"claim": "email", "purposes": ["benefits"], "lawful_basis": "consent",
                "required": True, "description": "Your email address"},
               {"claim": "name", "purposes": ["benefits"], "lawful_basis": "consent",
                "required": False, "description": "Your full name"}],
}


@pytest.fixture
def config(upstream_issuer: str, pg_database_url: str) -> dict[str, Any]:
    """conftest's app and hub, on a fresh PostgreSQL database, with room for the races."""
    return hub_config(
        upstream_issuer, pg_database_url, database_pool_size=20,
        agencies=[AGENCY_ONE.config(consent=CONSENT, scopes=OFFLINE),
                  AGENCY_TWO.config(scopes=OFFLINE)],
        housekeeping_interval_seconds=0, backchannel_dispatcher=False)


def question(sub: str) -> Any:
    return parse_evaluation({"subject": {"type": "user", "id": sub}, "action": {"name": "use"},
                             "resource": {"type": "claim", "id": "email"},
                             "context": {"purpose": "benefits"}})


def test_the_expiry_job_racing_a_renewal_never_dates_an_event_in_the_future(hub):
    """Housekeeping's expiry walks the grants that were due when it started; one renewed
    meanwhile is no longer due. It was expired anyway, dated at the renewal's own expiry
    (tomorrow), and every later event with it: a withdrawal took effect a day late."""
    short = dataclasses.replace(policy(hub, ONE), consent_ttl_days=1)
    citizens = [person(hub, f"expiry-{k}") for k in range(150)]
    for citizen in citizens:  # every grant lapsed yesterday, no 'expired' event written yet
        hub.consent.record_decision(citizen, short, subject(hub, ONE, citizen), (),
                                    now=utcnow() - timedelta(days=2))
    me = citizens[-1]

    def renew() -> None:
        time.sleep(0.05)  # while the job walks the due grants
        hub.consent.record_decision(me, short, subject(hub, ONE, me), ())

    together(hub.consent.expire_due, renew)
    hub.consent.withdraw(me, ONE)
    now = utcnow()
    events = hub.consent.history(me, ONE)
    assert all(e.at <= now for e in events), [(e.kind, e.at) for e in events]
    [answer] = hub.consent.decisions.decide(ONE, [question(subject(hub, ONE, me))], now=now)
    assert answer.decision is False and answer.reason != "consented"


def test_core_11_a_code_redeemed_after_offline_access_was_withdrawn_gets_no_refresh_token(
        app, hub):
    """The consent as it stands at the code exchange decides offline access, not as it
    stood when the code was made: withdrawn in between, no refresh token comes."""
    me = person(hub, "withdrawn-before-redeem")
    grant_consent(hub, me, ONE, ("offline_access",))
    auth = AuthRequest(agency=AGENCY_ONE, scope="openid email offline_access")
    code = secrets.token_urlsafe(36)
    assert hub.tokens.save_code(code, {  # as /authorize made it, consent given
        "client_id": ONE, "redirect_uri": AGENCY_ONE.redirect_uri, "scope": auth.scope,
        "nonce": None, "code_challenge": auth.challenge, "code_challenge_method": "S256",
        "account_id": me, "auth_time": int(time.time()), "acr": LOW_ACR, "amr": ["pwd"],
        "sid": secrets.token_urlsafe(16)})
    hub.consent.withdraw(me, ONE)  # within the code's minute
    body = redeem(app.test_client(), auth, code).json
    assert "refresh_token" not in body, body


def test_account_deletion_racing_a_withdrawal_still_withdraws_every_other_consent(hub):
    """withdraw_all read the valid grants, then withdrew each: one withdrawn meanwhile
    raised NothingToWithdraw, and the grants after it stayed valid."""
    left = []
    for i in range(40):
        me = person(hub, f"withdraw-all-{i}")
        grant_consent(hub, me, AGENCY_TWO.client_id)
        grant_consent(hub, me, ONE)  # the newest: withdraw_all's first
        together(lambda me=me: hub.consent.withdraw(me, ONE),
                 lambda me=me: hub.consent.withdraw_all(me))
        left += [(i, valid_grants(hub, me))] if valid_grants(hub, me) else []
    assert not left, f"{len(left)} of 40 kept a valid consent: {left[:3]}"


def test_no_consent_is_given_to_a_closed_account_nor_outlives_its_erasure(hub):
    """A consent given while the account was being deleted outlived the erasure (the
    withdrawal had read the grants already), and one given after the close was recorded
    as well: the account's row is now held while a consent is given."""
    from consent.errors import AccountClosed

    outlived = []
    for i in range(40):
        me = person(hub, f"consent-vs-delete-{i}")
        together(lambda me=me: grant_consent(hub, me, ONE, ("name",)),
                 lambda me=me: delete_account(hub, me))
        outlived += [i] if valid_grants(hub, me) else []
    assert not outlived, f"{len(outlived)} of 40 erased accounts hold a valid consent"
    closed = person(hub, "closed-first")
    assert hub.accounts.close(closed)
    with pytest.raises(AccountClosed):
        grant_consent(hub, closed, ONE)
    assert hub.consent.grants_for_account(closed) == []


def test_an_answer_written_after_the_erasure_stripped_the_account_names_no_one(hub,
                                                                                monkeypatch):
    """The decision API reads the record, then writes its answer: an erasure that strips
    the account's questions in between (closed, stripped) left the answer naming the
    citizen for good. The write now checks the account itself. The erasure is made to land
    in that gap (a timing no test can otherwise aim at)."""
    from civitas.app import end_grants_and_consents
    from consent.decisions import DecisionPoint
    from consent.models import AgencyDecision

    me = person(hub, "erased-between-read-and-write")
    grant_consent(hub, me, ONE)
    answer_all = DecisionPoint._answer_all

    def answered_then_erased(*args: Any, **kwargs: Any) -> Any:
        answered = answer_all(*args, **kwargs)
        assert hub.accounts.close(me)
        end_grants_and_consents(hub, me)  # the strip of its questions: none yet
        return answered

    monkeypatch.setattr(DecisionPoint, "_answer_all", staticmethod(answered_then_erased))
    [answer] = hub.consent.decisions.decide(ONE, [question(subject(hub, ONE, me))],
                                            now=utcnow(), request_id="r-gap")
    assert answer.decision is True  # answered while the account was open
    with hub.db.session() as s:
        row = s.get(AgencyDecision, answer.decision_id)
        assert (row.subject, row.account_id, row.record_id, row.subject_salt,
                row.request_id) == (None,) * 5 and row.erased_at is not None


def test_core_11_a_withdrawal_between_the_exchange_s_read_and_its_grant_ends_the_grant(
        app, hub, monkeypatch):
    """The code exchange reads the consent, then makes the refresh grant; a withdrawal in
    between revoked the agency's grants before this one existed, which then lived on. The
    withdrawal marks before it revokes and the exchange looks after it makes: the grant
    dies, and the agency is told invalid_grant. The withdrawal is made to land in that gap
    (a timing no test can otherwise aim at)."""
    from sqlalchemy import select

    from idp.models import RefreshGrantRecord

    me = person(hub, "withdrawn-during-exchange")
    grant_consent(hub, me, ONE, ("offline_access",))
    auth = AuthRequest(agency=AGENCY_ONE, scope="openid email offline_access")
    code = secrets.token_urlsafe(36)
    assert hub.tokens.save_code(code, {
        "client_id": ONE, "redirect_uri": AGENCY_ONE.redirect_uri, "scope": auth.scope,
        "nonce": None, "code_challenge": auth.challenge, "code_challenge_method": "S256",
        "account_id": me, "auth_time": int(time.time()), "acr": LOW_ACR, "amr": ["pwd"],
        "sid": secrets.token_urlsafe(16)})
    refresh_tokens = hub.server.hub.refresh_tokens
    issue = refresh_tokens.issue

    def withdrawn_first(**kwargs: Any) -> str:
        hub.consent.withdraw(me, ONE)  # commits, marks, revokes the grants there are
        return issue(**kwargs)

    monkeypatch.setattr(refresh_tokens, "issue", withdrawn_first)
    r = redeem(app.test_client(), auth, code)
    assert r.status_code == 400 and r.json["error"] == "invalid_grant", r.json
    with hub.db.session() as s:
        assert [g.revoked_reason for g in s.scalars(select(RefreshGrantRecord).where(
            RefreshGrantRecord.account_id == me))] == ["consent_withdrawn"]
