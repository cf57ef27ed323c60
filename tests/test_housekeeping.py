"""Housekeeping (civitas/housekeeping.py): refresh tokens of ended grants are deleted, grants
past their validity get their ``expired`` event, erasures cut off part-way are finished, on
each worker's schedule or once from the ``civitas housekeeping`` command."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import delete, func, select, update

import civitas.app
from broker.models import ConstituentAccount
from civitas.app import create_app, stop_background
from civitas.cli import main
from civitas.housekeeping import finish_erasures, run_once
from connectors import UpstreamIdentity
from idp.models import RefreshGrantRecord, RefreshToken
from kernel.db import utcnow
from kernel.periodic import PeriodicThread
from tests.conftest import hub_config
from tests.flows import AGENCY_ONE, AGENCY_TWO, PUBLIC_TASK, citizen, metric

#: consent-based (the citizen's consent, valid for 30 days) and public-task claims
CONSENTED = dict(PUBLIC_TASK, consent_ttl_days=30, claims=[
    dict(claim, lawful_basis="consent", required=False) for claim in PUBLIC_TASK["claims"]])
GRANT = dict(client_id=AGENCY_ONE.client_id, scope="openid email offline_access", sid="s",
             acr="urn:civitas:acr:ial1:aal1", amr=("pwd",), auth_time=0)


def rows_of(hub, grant_id: str) -> int:
    """The rows a refresh grant has: its own and those of its tokens issued before 0012."""
    with hub.db.session() as s:
        return s.scalar(select(func.count()).select_from(RefreshGrantRecord).where(
            RefreshGrantRecord.grant_id == grant_id)) + s.scalar(
            select(func.count()).select_from(RefreshToken).where(
                RefreshToken.grant_id == grant_id))


def test_purge_deletes_the_ended_grants_and_nothing_else(sql_hub):
    """On SQLite and on PostgreSQL."""
    hub = sql_hub
    tokens = hub.server.hub.refresh_tokens
    account = citizen(hub, "purge")
    grant = dict(GRANT, account_id=account)
    ended_an_hour_ago = time.time() - 3600
    for n in range(4):  # four grants that ended an hour ago, one revoked
        tokens.issue(grant_id=f"ended-{n}", family_expires_at=ended_an_hour_ago,
                     new_grant=True, **grant)
    tokens.revoke_grant("ended-0")
    # and six used tokens of one of them, issued before migration 0012
    with hub.db.session() as s:
        s.add_all(RefreshToken(token_hash=f"{n:064d}", grant_id="ended-1", used_at=utcnow(),
                               expires_at=utcnow() - timedelta(hours=1), **dict(
                                   grant, amr=["pwd"])) for n in range(6))
    recent = tokens.issue(grant_id="recent", family_expires_at=time.time() - 60,
                          new_grant=True, **grant)
    live = tokens.issue(grant_id="live", **grant)
    used = tokens.use(live, AGENCY_ONE.client_id)
    assert used is not None
    live = tokens.issue(grant_id="live", family_expires_at=used.expires_at, **grant)

    # ended before the cut-off (ten minutes ago): gone, three rows per transaction
    assert tokens.purge_expired(before=utcnow() - timedelta(minutes=10), batch=3) == 4
    assert [rows_of(hub, g) for g in ("ended-0", "ended-1", "recent", "live")] == [0, 0, 1, 1]
    assert tokens.purge_expired(before=utcnow() - timedelta(minutes=10), batch=3) == 0
    # what is left works as before: the live grant refreshes, the ended one is refused
    assert tokens.use(live, AGENCY_ONE.client_id) is not None
    assert tokens.use(recent, AGENCY_ONE.client_id) is None


def test_each_worker_runs_housekeeping_on_its_schedule(make_hub):
    app = make_hub(agencies=[AGENCY_ONE.config(consent=CONSENTED), AGENCY_TWO.config()],
                   housekeeping_interval_seconds=0.2)
    hub = app.extensions["civitas"]
    account = citizen(hub, "schedule")
    policy = hub.server.hub.policy_for(hub.agencies.client(AGENCY_ONE.client_id))
    hub.consent.record_decision(account, policy, "sub-one", {"email"},
                                now=utcnow() - timedelta(days=31))
    # and a grant that is valid for another day: housekeeping must leave it as it is
    valid = citizen(hub, "schedule-valid")
    hub.consent.record_decision(valid, policy, "sub-valid", {"email"},
                                now=utcnow() - timedelta(days=29))
    # the access-token lifetime (600 s) past the grant's end: past the purge's cut-off
    hub.server.hub.refresh_tokens.issue(grant_id="ended", account_id=account,
                                        family_expires_at=time.time() - 700, new_grant=True,
                                        **GRANT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = [e.state for e in hub.consent.history(account, AGENCY_ONE.client_id)]
        if states[-1] == "expired" and rows_of(hub, "ended") == 0:
            break
        time.sleep(0.1)
    assert states == ["given", "expired"]
    assert rows_of(hub, "ended") == 0
    assert [e.state for e in hub.consent.history(valid, AGENCY_ONE.client_id)] == ["given"]
    # stopped with the app (civitas.app.stop_background, as the fixture's teardown does):
    # no round after it, so no later test counts this hub's
    stop_background(app)
    ran = metric("civitas_background_jobs_total", job="refresh_purge", outcome="ok")
    time.sleep(0.5)  # two and a half intervals
    assert metric("civitas_background_jobs_total", job="refresh_purge", outcome="ok") == ran
    stop_background(app)  # a second call does nothing


def test_a_periodic_thread_stopped_from_its_own_thread_ends_cleanly():
    """The app's finalizer stops the housekeeper and the sealer, and a garbage collection
    run while their job allocates runs it in their own thread: that stop must not try to
    join the thread it runs in (it raised RuntimeError, seen as a flaky test error)."""
    raised: list[BaseException] = []
    ran = threading.Event()

    def job() -> None:
        try:
            periodic.stop(0)
        except BaseException as exc:  # noqa: BLE001 - what the thread would have died of
            raised.append(exc)
        ran.set()

    periodic = PeriodicThread("stops-itself", 0.01, job)
    periodic.start()
    thread = periodic._thread  # noqa: SLF001
    assert ran.wait(5)
    thread.join(5)
    assert raised == [] and not thread.is_alive()
    periodic.stop()  # and again from outside: nothing left to stop


def test_a_failing_job_is_logged_and_the_other_still_runs(make_hub, monkeypatch, caplog):
    hub = make_hub(agencies=[AGENCY_ONE.config()]).extensions["civitas"]
    hub.server.hub.refresh_tokens.issue(grant_id="ended", account_id=citizen(hub, "fail"),
                                        family_expires_at=time.time() - 700, new_grant=True,
                                        **GRANT)

    def broken(*args, **kwargs):
        raise RuntimeError("the consent tables are unreachable")

    def rounds(job, outcome):
        return metric("civitas_background_jobs_total", job=job, outcome=outcome)

    before = [rounds("consent_expiry", "failed"), rounds("refresh_purge", "ok")]
    monkeypatch.setattr(hub.consent, "expire_due", broken)
    done = run_once(hub)
    assert (done.consents_expired, done.refresh_grants_purged, done.erasures_finished,
            done.ok) == (None, 1, 0, False)
    # counted for an alert on outcome="failed"
    assert [rounds("consent_expiry", "failed"), rounds("refresh_purge", "ok")] == [
        before[0] + 1, before[1] + 1]
    assert "consent expiry failed" in caplog.text and "unreachable" in caplog.text


@pytest.fixture
def cli_hub(upstream_issuer, tmp_path):
    """A hub, and the settings file the command reads for it."""
    config = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/cli.db",
                        agencies=[AGENCY_ONE.config()])
    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(config))
    hub = create_app(config).extensions["civitas"]
    yield hub, path
    hub.db.dispose()


def test_the_command_runs_housekeeping_once(cli_hub):
    hub, path = cli_hub
    account = citizen(hub, "cli")
    hub.server.hub.refresh_tokens.issue(grant_id="ended", account_id=account,
                                        family_expires_at=time.time() - 700, new_grant=True,
                                        **GRANT)
    # ended a minute ago, within the access-token lifetime (600 s): a replay of its used
    # token must still revoke the access tokens it issued, so its row is kept
    hub.server.hub.refresh_tokens.issue(grant_id="just-ended", account_id=account,
                                        family_expires_at=time.time() - 60, new_grant=True,
                                        **GRANT)
    result = CliRunner().invoke(main, ["--config", str(path), "housekeeping"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert ("consent grants expired: 0; refresh grants purged: 1; erasures finished: 0"
            in result.output)
    assert rows_of(hub, "ended") == 0 and rows_of(hub, "just-ended") == 1


def test_an_erasure_that_fails_again_leaves_the_others_to_be_finished(sql_hub, monkeypatch,
                                                                        caplog):
    """Accounts closed by their citizens whose erasure was cut off: each is finished on its
    own, so one that fails again (logged, the round counted as failed) holds up no other,
    and is finished by a later round. A live account and one erased already are left
    alone. On SQLite and on PostgreSQL."""
    hub = sql_hub
    stuck, other, live, done = (str(hub.accounts.resolve(UpstreamIdentity(
        connector_id="op", subject=name, acr="urn:civitas:acr:ial1:aal1",
        attributes={"email": f"{name}@example.org"})).account_id)
        for name in ("stuck", "other", "live", "done"))
    for account in (stuck, other, done):
        assert hub.accounts.close(account)
    assert hub.accounts.erase(done)
    with hub.db.session() as s:  # closed minutes ago, out of the grace; the stuck one first
        for account, minutes in ((stuck, 3), (other, 2)):
            s.execute(update(ConstituentAccount).where(ConstituentAccount.id == account)
                      .values(deleted_at=utcnow() - timedelta(minutes=minutes)))
    assert hub.accounts.erasures_pending(closed_before=utcnow()) == [stuck, other]
    real = civitas.app.end_grants_and_consents

    def failing_for_stuck(hub_, account_id):
        if account_id == stuck:
            raise RuntimeError("the consent tables are unreachable")
        real(hub_, account_id)

    monkeypatch.setattr(civitas.app, "end_grants_and_consents", failing_for_stuck)
    failed = metric("civitas_background_jobs_total", job="erasure", outcome="failed")
    done_round = run_once(hub)
    assert done_round.erasures_finished is None and not done_round.ok
    assert metric("civitas_background_jobs_total", job="erasure", outcome="failed") == failed + 1
    assert f"account {stuck}: finishing its erasure failed" in caplog.text
    assert hub.accounts.erasures_pending(closed_before=utcnow()) == [stuck]
    assert hub.accounts.attribute_records(other) == []
    assert hub.accounts.attribute_records(live) != [] and hub.accounts.exists(live)

    monkeypatch.setattr(civitas.app, "end_grants_and_consents", real)
    assert finish_erasures(hub) == 1
    assert hub.accounts.erasures_pending(closed_before=utcnow()) == []
    assert hub.accounts.attribute_records(stuck) == []
    assert [e.kind for e in hub.accounts.events(stuck)][:2] == ["erased", "deleted"]


def columns_after_downgrade(db, revision: str, table: str) -> set[str]:
    """The columns of ``table`` once the database is downgraded to ``revision``."""
    from alembic import command
    from sqlalchemy import inspect

    from civitas.migrations import alembic_config

    command.downgrade(alembic_config(db.engine), revision)
    return {c["name"] for c in inspect(db.engine).get_columns(table)}


def test_migration_0013_marks_the_accounts_deleted_before_it_as_erased(database_url):
    """Until 0013 an account was erased in the request that deleted it (the account went
    last), so each deleted one is marked erased at its deletion time and none is left for
    housekeeping to finish; a live account stays unmarked. Downgrading drops the mark."""
    from datetime import UTC, datetime

    from cryptography.fernet import Fernet
    from sqlalchemy import text

    from broker.accounts import AccountDirectory
    from civitas.migrations import upgrade
    from kernel.crypto import FieldCipher
    from kernel.db import Database

    db = Database(database_url)
    try:
        upgrade(db.engine, "0012")
        gone = datetime(2026, 11, 1, 12, tzinfo=UTC)
        with db.engine.begin() as conn:
            for account, deleted_at in (("gone", gone), ("here", None)):
                conn.execute(text("INSERT INTO constituent_accounts (id, created_at, deleted_at)"
                                  " VALUES (:id, :created, :deleted)"),
                             {"id": account, "created": gone, "deleted": deleted_at})
        upgrade(db.engine)
        with db.session() as s:
            assert [(a.id, a.deleted_at, a.erased_at) for a in s.scalars(
                select(ConstituentAccount).order_by(ConstituentAccount.id))] == [
                ("gone", gone, gone), ("here", None, None)]
        accounts = AccountDirectory(db, FieldCipher([Fernet.generate_key().decode()]))
        assert accounts.erasures_pending(closed_before=utcnow()) == []
        assert "erased_at" not in columns_after_downgrade(db, "0012", "constituent_accounts")
    finally:
        db.dispose()


def test_migration_0014_keeps_the_questions_asked_before_it_as_they_were(database_url):
    """A question answered before 0014 has no salt, and its entry (which cannot change)
    names the subject and record: after the upgrade the two still agree in `audit
    reconcile`, a change to such a row is still named, and new questions are salted beside
    it. Downgrading drops the salts' column."""
    from datetime import UTC, datetime

    from cryptography.fernet import Fernet
    from sqlalchemy import text

    from civitas.migrations import upgrade
    from consent.decisions import DecisionPoint, parse_evaluation
    from consent.ledger.ledger import Ledger
    from consent.models import AgencyDecision
    from consent.reconcile import reconcile
    from kernel.crypto import FieldCipher
    from kernel.db import Database

    db = Database(database_url)
    try:
        upgrade(db.engine, "0013")
        then = datetime(2026, 11, 1, 12, tzinfo=UTC)
        old = {"id": "0" * 32, "at": then, "client_id": "agency-one", "subject": "pairwise-1",
               "account_id": None, "record_id": None, "action": "use", "claim": "email",
               "purpose": "benefits", "decision": False, "reason": "no_consent"}
        with db.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO consent_decisions (id, at, client_id, subject, account_id,"
                " record_id, action, claim, purpose, decision, reason) VALUES (:id, :at,"
                " :client_id, :subject, :account_id, :record_id, :action, :claim, :purpose,"
                " :decision, :reason)"), old)
        upgrade(db.engine)
        ledger = Ledger(db, FieldCipher([Fernet.generate_key().decode()]),
                        origin="test.civitas.example/ledger")
        # the entry the code before 0014 wrote with that row
        ledger.append("decision.query", {
            "decision_id": old["id"], "agency": "agency-one", "subject": "pairwise-1",
            "action": "use", "claim": "email", "purpose": "benefits", "decision": False,
            "reason": "no_consent", "record": None})
        DecisionPoint(db, ledger).decide("agency-one", [parse_evaluation({
            "subject": {"type": "user", "id": "pairwise-2"}, "action": {"name": "use"},
            "resource": {"type": "claim", "id": "email"},
            "context": {"purpose": "benefits"}})], now=utcnow())
        with db.session() as s:
            salts = {subject: salt for subject, salt in s.execute(
                select(AgencyDecision.subject, AgencyDecision.subject_salt))}
        assert salts["pairwise-1"] is None and len(salts["pairwise-2"]) == 16
        report = reconcile(db, ledger, None, None)
        assert report.ok and report.records == report.entries == 2
        with db.session() as s:
            s.execute(update(AgencyDecision).where(AgencyDecision.id == old["id"]).values(
                subject="pairwise-3"))
        assert reconcile(db, ledger, None, None).altered == [f"decision:{old['id']}"]
        assert "subject_salt" not in columns_after_downgrade(db, "0013", "consent_decisions")
    finally:
        db.dispose()


def test_migration_0015_lets_an_erased_question_lose_its_subject_and_back(database_url):
    """After 0015 a question's subject may be gone (its account erased) and the row says
    when; downgrading leaves such a row an empty subject, so the column can be NOT NULL
    again, and keeps every other row as it was. On SQLite (the table is copied) and
    PostgreSQL."""
    from datetime import UTC, datetime

    from sqlalchemy import text

    from civitas.migrations import upgrade
    from consent.models import AgencyDecision
    from kernel.db import Database

    db = Database(database_url)
    try:
        upgrade(db.engine, "0014")
        then = datetime(2026, 11, 1, 12, tzinfo=UTC)
        with db.engine.begin() as conn:
            for id_, subject in (("1" * 32, "pairwise-1"), ("2" * 32, "pairwise-2")):
                conn.execute(text(
                    "INSERT INTO consent_decisions (id, at, client_id, subject, action, claim,"
                    " purpose, decision, reason) VALUES (:id, :at, 'agency-one', :subject,"
                    " 'use', 'email', 'benefits', false, 'no_consent')"),
                    {"id": id_, "at": then, "subject": subject})
        upgrade(db.engine)
        with db.session() as s:
            s.execute(update(AgencyDecision).where(AgencyDecision.id == "1" * 32).values(
                subject=None, erased_at=then))
            assert [(d.subject, d.erased_at) for d in s.scalars(
                select(AgencyDecision).order_by(AgencyDecision.id))] == [
                (None, then), ("pairwise-2", None)]
        assert "erased_at" not in columns_after_downgrade(db, "0014", "consent_decisions")
        with db.engine.connect() as conn:
            assert list(conn.execute(text(
                "SELECT id, subject FROM consent_decisions ORDER BY id"))) == [
                ("1" * 32, ""), ("2" * 32, "pairwise-2")]
            with pytest.raises(Exception, match="(?i)null"):  # NOT NULL again
                conn.execute(text("UPDATE consent_decisions SET subject = NULL"))
    finally:
        db.dispose()


def test_a_closed_account_s_consents_answer_as_no_record_at_once(sql_hub):
    """The decision API stops answering for an account once it is closed, before its
    consents are withdrawn (an erasure cut off there is finished only by housekeeping). On
    SQLite and on PostgreSQL."""
    from consent.decisions import parse_evaluation

    hub = sql_hub
    provider = hub.server.hub
    agency = hub.agencies.client(AGENCY_ONE.client_id)
    account, other = citizen(hub, "closing"), citizen(hub, "staying")
    queries = []
    for who in (account, other):
        subject = provider.subject_for(agency, who)
        hub.consent.record_decision(who, provider.policy_for(agency), subject, ())
        queries.append(parse_evaluation({
            "subject": {"type": "user", "id": subject}, "action": {"name": "use"},
            "resource": {"type": "claim", "id": "email"},
            "context": {"purpose": "service-delivery"}}))

    def answers() -> list[tuple[bool, str]]:
        return [(a.decision, a.reason) for a in hub.consent.decisions.decide(
            AGENCY_ONE.client_id, queries, now=utcnow())]

    permitted = answers()
    assert [d for d, _ in permitted] == [True, True]
    assert hub.accounts.close(account)
    assert hub.consent.grants_for_account(account)[0].valid  # not withdrawn yet
    nobody = hub.consent.decisions.decide(AGENCY_ONE.client_id, [parse_evaluation({
        "subject": {"type": "user", "id": "nobody"}, "action": {"name": "use"},
        "resource": {"type": "claim", "id": "email"},
        "context": {"purpose": "service-delivery"}})], now=utcnow())[0]
    assert answers() == [(False, nobody.reason), permitted[1]]


def _asked(hub, name: str):
    """A citizen with a record at agency one, and an evaluation about them."""
    from consent.decisions import parse_evaluation

    provider = hub.server.hub
    agency = hub.agencies.client(AGENCY_ONE.client_id)
    account = citizen(hub, name)
    subject = provider.subject_for(agency, account)
    hub.consent.record_decision(account, provider.policy_for(agency), subject, ())
    return account, parse_evaluation({
        "subject": {"type": "user", "id": subject}, "action": {"name": "use"},
        "resource": {"type": "claim", "id": "email"},
        "context": {"purpose": "service-delivery"}})


def test_the_decision_log_is_kept_for_its_retention_and_reconcile_knows_it(sql_hub,
                                                                          monkeypatch):
    """Answers older than ``decision_log_retention_days`` are deleted by housekeeping (in
    batches, through the time-ordered primary key); their ledger entries stay, and `audit
    reconcile` counts them as past retention, not as entries without a record, while an
    answer deleted within the retention is still reported. On SQLite and PostgreSQL."""
    import secrets

    import consent.decisions
    from consent.ledger.models import LedgerEntry
    from consent.models import AgencyDecision
    from consent.reconcile import reconcile

    hub = sql_hub
    _, query = _asked(hub, "asked")
    now = utcnow()
    for days, count in ((40, 3), (10, 2)):
        then = now - timedelta(days=days)
        ms = int(then.timestamp() * 1000)
        # the ids new_time_ordered_id would have made then (UUID version 7)
        monkeypatch.setattr(consent.decisions, "new_time_ordered_id", lambda ms=ms: (
            f"{ms << 80 | 0x7 << 76 | 0b10 << 62 | secrets.randbits(62):032x}"))
        hub.consent.decisions.decide(AGENCY_ONE.client_id, [query] * count, now=then)
        with hub.db.session() as s:  # and their entries were written then
            for (decision_id,) in s.execute(select(AgencyDecision.id).where(
                    AgencyDecision.at == then)):
                s.execute(update(LedgerEntry).where(
                    LedgerEntry.entry.contains(decision_id)).values(created_at=then))
    monkeypatch.undo()

    def decisions() -> int:
        with hub.db.session() as s:
            return s.scalar(select(func.count()).select_from(AgencyDecision))

    kept_since = now - timedelta(days=30)
    report = reconcile(hub.db, hub.ledger, None, None, decisions_kept_since=kept_since)
    assert report.ok and report.past_retention == 0 and decisions() == 5

    # kept for ever by default: housekeeping deletes nothing
    assert run_once(hub).decisions_purged == 0 and decisions() == 5
    monkeypatch.setattr(hub, "settings", hub.settings.model_copy(
        update={"decision_log_retention_days": 30}))
    assert run_once(hub).decisions_purged == 3 and decisions() == 2
    assert hub.consent.decisions.purge(kept_since, batch=1) == 0  # once

    report = reconcile(hub.db, hub.ledger, None, None)
    assert not report.ok and len(report.unmatched_entries) == 3  # the check sees them
    report = reconcile(hub.db, hub.ledger, None, None, decisions_kept_since=kept_since)
    assert report.ok and report.past_retention == 3 and report.records == 2 + 1

    with hub.db.session() as s:  # one deleted within the retention is still a difference
        s.execute(delete(AgencyDecision).where(AgencyDecision.id == s.scalars(
            select(AgencyDecision.id).limit(1)).one()))
    report = reconcile(hub.db, hub.ledger, None, None, decisions_kept_since=kept_since)
    assert len(report.unmatched_entries) == 1 and report.past_retention == 3


def test_the_decision_purge_goes_in_batches(sql_hub, monkeypatch):
    from consent.models import AgencyDecision

    hub = sql_hub
    _, query = _asked(hub, "batched")
    hub.consent.decisions.decide(AGENCY_ONE.client_id, [query] * 5, now=utcnow())
    deletes: list[int] = []
    real = hub.consent.decisions._db.session

    def counting():
        deletes.append(1)
        return real()

    monkeypatch.setattr(hub.consent.decisions._db, "session", counting)
    assert hub.consent.decisions.purge(utcnow() + timedelta(seconds=1), batch=2) == 5
    assert len(deletes) == 3  # 2 + 2 + 1
    monkeypatch.undo()
    with hub.db.session() as s:
        assert s.scalar(select(func.count()).select_from(AgencyDecision)) == 0


def test_past_retention_a_decision_s_entry_no_longer_says_about_whom(sql_hub):
    """The ledger entry of a question names its subject and consent record only through a
    commitment salted by the decision's row: the retention purge deletes the row, the entry
    stays as it was (the same bytes, still proved by a signed checkpoint), and nothing in
    the ledger leads to the citizen any more. On SQLite and PostgreSQL."""
    import json

    from consent.entries import subject_commitment
    from consent.ledger import merkle
    from consent.models import AgencyDecision
    from consent.reconcile import reconcile

    hub = sql_hub
    account, query = _asked(hub, "forgotten")
    hub.consent.decisions.decide(AGENCY_ONE.client_id, [query] * 2, now=utcnow())
    with hub.db.session() as s:
        rows = {d.id: (d.subject, d.record_id, d.subject_salt)
                for d in s.scalars(select(AgencyDecision))}
    checkpoint = hub.ledger.checkpoint()  # sealed: each entry is a leaf of a signed tree
    asked = list(hub.ledger.entries("decision.query", None, None))
    assert len(rows) == len(asked) == 2
    for entry in asked:
        subject, record_id, salt = rows[json.loads(entry.entry)["data"]["decision_id"]]
        assert subject == query.subject_id and record_id is not None
        # while the row is kept, the entry is tied to it (an auditor recomputes this) ...
        assert json.loads(entry.entry)["data"]["subject_commitment"] == subject_commitment(
            salt, subject, record_id)

    assert hub.consent.decisions.purge(utcnow() + timedelta(seconds=1)) == 2
    kept = {e.seq: e for e in hub.ledger.entries(None, None, None)}
    for entry in asked:  # ... and once it is gone, the entry is what it was
        same = kept[entry.seq]
        assert (same.entry, same.leaf_hash, same.leaf_index) == (
            entry.entry, entry.leaf_hash, entry.leaf_index)
        proof = hub.ledger.inclusion_proof(same.leaf_index, checkpoint.size)
        assert merkle.verify_inclusion(same.leaf_index, checkpoint.size,
                                       merkle.leaf_hash(same.entry.encode()), proof,
                                       checkpoint.root_hash)
        assert json.loads(same.entry)["data"]["agency"] == AGENCY_ONE.client_id
    # no entry of any kind holding the subject or the record leads from a question to them:
    # the consent entries (kept as the proof of consent) name them, the questions do not
    record_id = next(iter(rows.values()))[1]
    for entry in kept.values():
        if entry.kind == "decision.query":
            assert query.subject_id not in entry.entry and record_id not in entry.entry
            assert account not in entry.entry
    report = reconcile(hub.db, hub.ledger, None, None,
                       decisions_kept_since=utcnow() + timedelta(seconds=1))
    assert report.ok and report.past_retention == 2


def test_a_decision_changed_behind_the_hub_s_back_no_longer_matches_its_commitment(sql_hub):
    """The commitment binds the row: another subject, another record, or another salt (or
    none, which would make the row read as one from before the salt) is named by `audit
    reconcile`; put back, all agrees. On SQLite and PostgreSQL."""
    from consent.models import AgencyDecision
    from consent.reconcile import reconcile

    hub = sql_hub
    _, query = _asked(hub, "tampered")
    other_account, other = _asked(hub, "other")
    hub.consent.decisions.decide(AGENCY_ONE.client_id, [query], now=utcnow())
    assert reconcile(hub.db, hub.ledger, None, None).ok
    with hub.db.session() as s:
        row = s.scalars(select(AgencyDecision)).one()
        original = {"subject": row.subject, "record_id": row.record_id,
                    "subject_salt": row.subject_salt}
        others = hub.consent.grants_for_account(other_account)[0].record_id
    for change in ({"subject": other.subject_id}, {"record_id": others},
                   {"subject_salt": bytes(16)}, {"subject_salt": b"short"},
                   {"subject_salt": None}):
        with hub.db.session() as s:
            s.execute(update(AgencyDecision).values(**change))
        report = reconcile(hub.db, hub.ledger, None, None)
        assert report.altered == [f"decision:{row.id}"], change
        with hub.db.session() as s:
            s.execute(update(AgencyDecision).values(**original))
        assert reconcile(hub.db, hub.ledger, None, None).ok


def test_erasure_strips_the_questions_about_the_account_of_whom_and_keeps_the_rest(
        sql_hub, monkeypatch):
    """Right to erasure (GDPR Art. 17): the agencies' questions that resolved to the account
    keep who asked, when, what for and the answer, and lose the subject, account, record,
    salt and request id; another citizen's stay as they were, the ledger entries are not
    touched, and `audit reconcile` still compares what is left. On SQLite and PostgreSQL."""
    import json

    from civitas.app import end_grants_and_consents
    from consent.ledger.models import LedgerEntry
    from consent.models import AgencyDecision
    from consent.reconcile import reconcile

    hub = sql_hub
    gone, about_gone = _asked(hub, "erased-citizen")
    kept, about_kept = _asked(hub, "kept-citizen")
    decisions = hub.consent.decisions
    decisions.decide(AGENCY_ONE.client_id, [about_gone] * 3, now=utcnow(), request_id="r-1")
    decisions.decide(AGENCY_ONE.client_id, [about_kept], now=utcnow(), request_id="r-2")

    def rows() -> dict[str, tuple]:
        with hub.db.session() as s:
            return {d.id: (d.client_id, d.at, d.action, d.claim, d.purpose, d.decision,
                           d.reason, d.subject, d.account_id, d.record_id, d.subject_salt,
                           d.request_id, d.erased_at)
                    for d in s.scalars(select(AgencyDecision))}

    def entries() -> list[tuple]:
        with hub.db.session() as s:
            return [(e.seq, e.entry, e.leaf_hash) for e in s.scalars(
                select(LedgerEntry).order_by(LedgerEntry.seq))]

    before, ledger_before = rows(), entries()
    assert hub.accounts.close(gone)
    end_grants_and_consents(hub, gone)
    assert hub.accounts.erase(gone)
    after = rows()
    stripped = [i for i, row in before.items() if row[8] == gone]
    assert len(stripped) == 3 and len(after) == 4
    for decision_id in stripped:
        assert after[decision_id][:7] == before[decision_id][:7]  # who, when, what, answer
        assert after[decision_id][7:12] == (None,) * 5 and after[decision_id][12] is not None
    other = next(i for i in before if i not in stripped)
    assert after[other] == before[other] and after[other][8] == kept
    # the ledger is as it was (the new entries lead to no one: their salts are gone)
    assert [e for e in entries() if e[0] <= ledger_before[-1][0]] == ledger_before
    assert not any(about_gone.subject_id in text for _, text, _ in entries()
                   if json.loads(text)["kind"] == "decision.query")
    report = reconcile(hub.db, hub.ledger, None, None)
    assert report.ok and report.erased == 3, report
    import civitas.cli
    monkeypatch.setattr(civitas.cli, "_hub", lambda ctx: hub)
    out = CliRunner().invoke(main, ["audit", "reconcile"])
    assert out.exit_code == 0, out.output
    assert "3 decision(s) about an erased account: compared with their entries apart from " \
        "whom" in out.output
    assert decisions.forget_account(gone, now=utcnow()) == 0  # once
    assert decisions.for_account(gone) == [] and len(decisions.for_account(kept)) == 1

    # what is left is still held to its entry: a flipped answer is named
    with hub.db.session() as s:
        s.execute(update(AgencyDecision).where(AgencyDecision.id == stripped[0]).values(
            decision=not before[stripped[0]][5]))
    assert reconcile(hub.db, hub.ledger, None, None).altered == [f"decision:{stripped[0]}"]


def test_erasure_also_strips_unresolved_questions_naming_the_account_and_later_ones(sql_hub):
    """Right to erasure (GDPR Art. 17), the questions that never resolved to the account: a
    question at an agency where the citizen has no record yet, naming the ``sub`` the
    citizen has there (another agency of its sector knows it), is stripped of whom at
    erasure like the resolved ones; one naming somebody else is not. Once the account is
    closed, a new question about it is answered as one about nobody and kept already
    stripped, with nothing in it (nor in its ledger entry) that leads back. On SQLite and
    PostgreSQL."""
    from civitas.app import end_grants_and_consents
    from consent.decisions import parse_evaluation
    from consent.models import AgencyDecision
    from consent.reconcile import reconcile

    hub = sql_hub
    provider, decisions = hub.server.hub, hub.consent.decisions
    gone, about_gone = _asked(hub, "erased-citizen")
    two = hub.agencies.client(AGENCY_TWO.client_id)
    gone_at_two = provider.subject_for(two, gone)

    def asking(subject: str):
        return parse_evaluation({
            "subject": {"type": "user", "id": subject}, "action": {"name": "use"},
            "resource": {"type": "claim", "id": "email"},
            "context": {"purpose": "service-delivery"}})

    [early] = decisions.decide(two.client_id, [asking(gone_at_two)], now=utcnow(),
                               request_id="r-early")
    [other] = decisions.decide(two.client_id, [asking("somebody-else")], now=utcnow(),
                               request_id="r-other")
    [resolved] = decisions.decide(AGENCY_ONE.client_id, [about_gone], now=utcnow())

    def row(decision_id: str) -> tuple:
        with hub.db.session() as s:
            d = s.get(AgencyDecision, decision_id)
            return (d.subject, d.account_id, d.record_id, d.subject_salt, d.request_id,
                    d.erased_at)

    assert row(early.decision_id)[:2] == (gone_at_two, None)  # resolved to no one
    assert hub.accounts.close(gone)
    # closed: answered as about nobody, and kept stripped at once
    [late] = decisions.decide(AGENCY_ONE.client_id, [about_gone], now=utcnow(),
                              request_id="r-late")
    [unknown] = decisions.decide(AGENCY_ONE.client_id, [asking("never-seen")], now=utcnow())
    assert (late.decision, late.reason) == (unknown.decision, unknown.reason) == (
        False, "no_consent")
    assert row(late.decision_id)[:5] == (None,) * 5 and row(late.decision_id)[5] is not None
    end_grants_and_consents(hub, gone)
    assert hub.accounts.erase(gone)
    for stripped in (early, resolved, late):
        assert row(stripped.decision_id)[:5] == (None,) * 5, stripped
        assert row(stripped.decision_id)[5] is not None
    assert row(other.decision_id)[:2] == ("somebody-else", None)
    assert row(other.decision_id)[4] == "r-other"
    report = reconcile(hub.db, hub.ledger, None, None)
    assert report.ok and report.erased == 3, report
    assert decisions.forget_account(gone, now=utcnow(), subjects=[
        (two.client_id, gone_at_two)]) == 0  # once


def test_the_citizen_is_told_how_long_their_history_is_kept(make_hub):
    from tests.flows import AuthRequest, full_login

    for days, told in ((0, None), (400, "kept here for 400 days")):
        client = make_hub(decision_log_retention_days=days).test_client()
        full_login(client, AuthRequest())
        page = client.get("/account/history").get_data(as_text=True)
        assert ('id="kept"' in page) is (told is not None)
        assert told is None or told in page
        assert ("no longer that it was about you" in page) is (told is not None)
