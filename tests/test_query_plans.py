"""Every query of the decision path and of the token and userinfo paths reads the large tables
through an index, on PostgreSQL, so their cost stays flat as data grows (issue 7).

Tens of thousands of rows are loaded with the bench loader (bench/load_data.py: COPY, rows
made by the real consent service) into a fresh database, VACUUM ANALYZE gives the planner
statistics, the SQL of real requests is captured through SQLAlchemy's
``before_cursor_execute`` and each statement is explained with its own parameters (the
planner left to choose freely). A Seq Scan on a loaded table fails the test, and the last
test drops each index the paths rely on (in a transaction that is rolled back) to show that
the check would catch its loss. bench/decision_scale.py measures the latency itself at
1 million accounts and 10 million consent events.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from bench.decision_scale import Statement, absent_subject, capture_sql, explain, plan_nodes
from bench.load_data import TABLES, Templates, analyze, bench_settings, build_templates, load
from bench.load_data import start_hub as start_bench_hub
from civitas.app import Hub
from civitas.housekeeping import finish_erasures
from config import settings_from_mapping
from idp.models import RefreshGrantRecord, RefreshToken
from idp.tokens import digest, new_grant_id
from tests.conftest import fresh_pg_database
from tests.flows import pkce_pair

ACCOUNTS, EVENTS = 4_000, 40_000
AGENCY = "bench-agency-000"
#: the indexes the paths rely on: (path, the table whose reads need them, the indexes). An
#: account's attributes are found through the unique index that leads with account_id.
INDEXES = {
    "ix_consent_records_client_subject": (
        "decision", "consent_records", ("ix_consent_records_client_subject",)),
    "uq_consent_events_record_id_seq": (
        "decision", "consent_events", ("uq_consent_events_record_id_seq",)),
    "uq_consent_records_account_id_client_id": (
        "token", "consent_records", ("uq_consent_records_account_id_client_id",)),
    "account_attributes(account_id)": (
        "token", "account_attributes", (
            "uq_account_attributes_account_id_name_source_connector",)),
    "ix_consent_records_expires_at": (
        "expiry", "consent_records", ("ix_consent_records_expires_at",)),
    "ix_accounts_erasure_pending": (
        "erasure", "constituent_accounts", ("ix_accounts_erasure_pending",)),
}


@dataclass
class Loaded:
    app: Any
    hub: Hub
    secrets: dict[str, str]
    sample: list[tuple[str, str]]
    templates: Templates


@pytest.fixture(scope="module")
def loaded(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    with fresh_pg_database(postgres_url, "plans_") as url:
        mapping = bench_settings(url, agencies=5)
        app = start_bench_hub(settings_from_mapping(mapping))
        hub: Hub = app.extensions["civitas"]
        try:
            templates = build_templates(hub, tmp_path_factory.mktemp("templates"))
            result = load(hub, accounts=ACCOUNTS, events=EVENTS, templates=templates, seed=3,
                          batch_accounts=2_000)
            analyze(hub)
            assert result.counts["consent_events"] > EVENTS // 2, result.counts
            yield Loaded(app, hub, {a["client_id"]: a["client_secret"]
                                    for a in mapping["agencies"]}, result.sample, templates)
        finally:
            hub.db.dispose()


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(
        f"{client_id}:{secret}".encode()).decode()}


def reads(statements: list[Statement]) -> list[Statement]:
    """Those that EXPLAIN can plan and that may read a table: not the INSERTs, nor the SHOWs
    a connection's first use sends (SQLAlchemy's dialect reads the server's settings)."""
    return [s for s in statements
            if not s.sql.lstrip().upper().startswith(("INSERT", "SHOW"))]


def touches(statement: Statement, table: str) -> bool:
    return re.search(rf"\b(FROM|JOIN|UPDATE)\s+{table}\b", statement.sql) is not None


def decision_statements(loaded: Loaded) -> list[Statement]:
    """The SQL of one decision for a citizen with a record and one for an unknown subject."""
    client = loaded.app.test_client()
    with_record = next(s for s in loaded.sample if s[0] == AGENCY)
    claim = loaded.templates.policies[AGENCY].claims[0]
    with capture_sql() as seen:
        for subject in (with_record[1], absent_subject()):
            r = client.post("/access/v1/evaluation", headers=basic(
                AGENCY, loaded.secrets[AGENCY]), json={
                "subject": {"type": "user", "id": subject}, "action": {"name": "use"},
                "resource": {"type": "claim", "id": claim.claim},
                "context": {"purpose": claim.purposes[0]}})
            assert r.status_code == 200, r.get_data(as_text=True)
    return seen


def token_statements(loaded: Loaded) -> list[Statement]:
    """The SQL of a code exchange, a userinfo request and a refresh, for a loaded citizen
    who has a consent record with the agency."""
    hub = loaded.hub
    with hub.db.engine.connect() as conn:
        account_id = conn.execute(text(
            "SELECT account_id FROM consent_records WHERE client_id = :c LIMIT 1"),
            {"c": AGENCY}).scalar_one()
    # the citizen allows offline access (a refresh token comes only with it)
    provider = hub.server.hub
    client_of = hub.agencies.client(AGENCY)
    hub.consent.record_decision(account_id, provider.policy_for(client_of),
                                provider.subject_for(client_of, account_id),
                                ("offline_access",))
    verifier, challenge = pkce_pair()
    code = secrets.token_urlsafe(32)
    redirect_uri = "https://a000.agency.example/cb"
    hub.tokens.save_code(code, {
        "client_id": AGENCY, "redirect_uri": redirect_uri,
        "scope": "openid profile email offline_access", "nonce": None,
        "code_challenge": challenge, "code_challenge_method": "S256",
        "account_id": account_id, "auth_time": int(time.time()),
        "acr": "urn:civitas:acr:ial1:aal1", "amr": ["pwd"], "sid": secrets.token_hex(8)})
    client = loaded.app.test_client()
    auth = basic(AGENCY, loaded.secrets[AGENCY])
    with capture_sql() as seen:
        r = client.post("/token", headers=auth, data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "code_verifier": verifier})
        assert r.status_code == 200, r.get_data(as_text=True)
        tokens = r.get_json()
        r = client.get("/userinfo",
                       headers={"Authorization": f"Bearer {tokens['access_token']}"})
        assert r.status_code == 200, r.get_data(as_text=True)
        r = client.post("/token", headers=auth, data={
            "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})
        assert r.status_code == 200, r.get_data(as_text=True)
    return seen


def seq_scans(loaded: Loaded, statements: list[Statement]) -> list[str]:
    found = []
    with loaded.hub.db.engine.connect() as conn:
        for statement in reads(statements):
            explained = explain(conn, statement)
            found += [f"Seq Scan on {table}: {' '.join(statement.sql.split())[:160]}"
                      for table in explained.seq_scans(TABLES)]
    return found


def test_the_decision_path_reads_through_indexes(loaded: Loaded) -> None:
    statements = decision_statements(loaded)
    for table in ("consent_records", "consent_events"):
        assert any(touches(s, table) for s in statements), f"no read of {table} captured"
    assert seq_scans(loaded, statements) == []


def test_the_token_and_userinfo_paths_read_through_indexes(loaded: Loaded) -> None:
    statements = token_statements(loaded)
    for table in ("constituent_accounts", "account_attributes", "consent_records",
                  "consent_events"):
        assert any(touches(s, table) for s in statements), f"no read of {table} captured"
    assert seq_scans(loaded, statements) == []


#: used tokens issued before migration 0012 (a client refreshing every 5 minutes left this
#: many in 10 days), kept in refresh_tokens until their grants end
HISTORY = 3_000
#: the other citizens' grants
OTHER_GRANTS = 20_000


def refresh_statements(loaded: Loaded) -> tuple[list[Statement], list[Statement], str]:
    """The SQL of a refresh, beside HISTORY used tokens from before migration 0012 and
    OTHER_GRANTS other grants, and of the revocations of that grant and of its account's
    grants with the agency; and that account."""
    hub = loaded.hub
    with hub.db.engine.connect() as conn:
        account_id = conn.execute(text(
            "SELECT account_id FROM consent_records WHERE client_id = :c LIMIT 1"),
            {"c": AGENCY}).scalar_one()
    refresh = hub.server.hub.refresh_tokens
    grant = {"grant_id": new_grant_id(), "client_id": AGENCY, "account_id": account_id,
             "scope": "openid profile offline_access", "sid": secrets.token_hex(8),
             "acr": "urn:civitas:acr:ial1:aal1", "auth_time": int(time.time())}
    live = refresh.issue(**grant, amr=("pwd",))
    now = datetime.now(UTC)
    with hub.db.engine.begin() as conn:
        conn.execute(RefreshToken.__table__.insert(), [
            dict(grant, token_hash=digest(secrets.token_urlsafe(16)), amr=["pwd"],
                 created_at=now, expires_at=now + timedelta(days=20), used_at=now)
            for _ in range(HISTORY)])
        conn.execute(RefreshGrantRecord.__table__.insert(), [
            {"grant_id": new_grant_id(), "client_id": AGENCY, "account_id": new_grant_id(),
             "created_at": now, "expires_at": now + timedelta(days=20)}
            for _ in range(OTHER_GRANTS)])
    with hub.db.reader() as conn:
        conn.execute(text("ANALYZE refresh_tokens"))
        conn.execute(text("ANALYZE refresh_grants"))
    client = loaded.app.test_client()
    with capture_sql() as used:
        r = client.post("/token", headers=basic(AGENCY, loaded.secrets[AGENCY]), data={
            "grant_type": "refresh_token", "refresh_token": live})
        assert r.status_code == 200, r.get_data(as_text=True)
    with capture_sql() as revoked:
        refresh.revoke_account(account_id, AGENCY)
        refresh.revoke_grant(grant["grant_id"])
    return used, revoked, account_id


def rows_visited(conn: Any, statements: list[Statement]) -> dict[str, int]:
    """Rows of refresh_tokens and refresh_grants that statements visit (returned, or read
    and filtered out), by table. The statements run (EXPLAIN ANALYZE) in a savepoint that is
    rolled back."""
    visited = {"refresh_tokens": 0, "refresh_grants": 0}
    found = [s for s in reads(statements) if any(touches(s, t) for t in visited)]
    assert found, "no statement on refresh_tokens or refresh_grants captured"
    for statement in found:
        for node in plan_nodes(explain(conn, statement, analyze=True).plan):
            if node.get("Relation Name") in visited and node["Node Type"] != "ModifyTable":
                visited[node["Relation Name"]] += (
                    int(node.get("Actual Rows", 0) * node.get("Actual Loops", 1))
                    + int(node.get("Rows Removed by Filter", 0))
                    + int(node.get("Rows Removed by Index Recheck", 0)))
    return visited


def test_a_refresh_and_a_revocation_read_one_row_of_the_grant(loaded: Loaded) -> None:
    """RFC 9700 4.14.2: each use reads the token's grant (whether it is revoked, whether the
    token is its live one), claims it and writes the rotated token: one row of
    refresh_grants each time, by its primary key, and nothing of the used tokens kept from
    before migration 0012. Revoking all of an account's grants with an agency reads only
    its grants. A read through the history or of all the grants would visit thousands of
    rows."""
    used, revoked, account_id = refresh_statements(loaded)
    with loaded.hub.db.engine.connect() as conn:
        on_use = rows_visited(conn, used)
        on_revoke = rows_visited(conn, revoked)
        # the account's grants with the agency (an earlier test's code exchange left one)
        its_grants = conn.execute(text(
            "SELECT count(*) FROM refresh_grants WHERE account_id = :a AND client_id = :c"),
            {"a": account_id, "c": AGENCY}).scalar_one()
    updates = sum(s.sql.lstrip().upper().startswith("UPDATE") for s in revoked)
    assert on_use == {"refresh_tokens": 0, "refresh_grants": 3}, on_use
    assert on_revoke["refresh_tokens"] == 0, on_revoke
    assert on_revoke["refresh_grants"] <= its_grants + updates <= 5, (on_revoke, its_grants)


def expiry_statements(loaded: Loaded) -> list[Statement]:
    """The SQL of the expiry job on a day when no grant is due (the usual run: every grant
    due earlier has been expired by an earlier run)."""
    with capture_sql() as seen:
        assert loaded.hub.consent.expire_due(now=datetime(2001, 1, 1, tzinfo=UTC)) == 0
    return seen


def erasure_statements(loaded: Loaded) -> list[Statement]:
    """The SQL of housekeeping's search for erasures to finish, on the usual day: none."""
    with capture_sql() as seen:
        assert finish_erasures(loaded.hub) == 0
    return seen


def forget_statements(loaded: Loaded) -> list[Statement]:
    """The SQL of erasure's strip of an account's questions (those that resolved to it, and
    those that named its sub at any agency without resolving), for an account that has
    none, and of an officer's search for a citizen by an agency's sub nobody has."""
    from civitas.app import subjects_at_every_agency
    from consent.officers import CitizenRef, DecisionQuery, OfficerWorkspace

    hub = loaded.hub
    nobody = "0" * 32
    workspace = OfficerWorkspace(hub.db, None, pseudonym_key=b"k" * 32,
                                 account_for_credential=lambda *_: None,
                                 subjects_of=subjects_at_every_agency(hub))
    with capture_sql() as seen:
        assert hub.consent.decisions.forget_account(
            nobody, now=datetime.now(UTC), subjects=subjects_at_every_agency(hub)(nobody)) == 0
        found = workspace.search(DecisionQuery(citizen=CitizenRef("pairwise", AGENCY, "x" * 43)),
                                 officer_account_id=nobody)
        assert found.total == 0
    return seen


def purge_statements(loaded: Loaded) -> list[Statement]:
    """The SQL of the decision log's purge on a usual day: nothing past its retention."""
    with capture_sql() as seen:
        assert loaded.hub.consent.decisions.purge(datetime(2001, 1, 1, tzinfo=UTC)) == 0
    return seen


def test_the_decision_purge_walks_the_primary_key(loaded: Loaded) -> None:
    """A range of the time-ordered primary key: a round with nothing past retention reads
    nothing, however large the log (with the condition on ``at`` in the statement and no
    order, the planner chose a sequential scan or a bitmap scan; bench/purge_scale.py: 1.7
    ms for such a round at 124,000 rows, after VACUUM)."""
    statements = [s for s in reads(purge_statements(loaded))
                  if touches(s, "consent_decisions")]
    assert statements
    with loaded.hub.db.engine.connect() as conn:
        scans = {scan for s in statements for scan in explain(conn, s).scans}
    assert {(table, index) for _, table, index in scans} == {
        ("consent_decisions", "pk_consent_decisions")}, scans


def test_erasure_and_officers_find_unresolved_questions_through_their_partial_index(
        loaded: Loaded) -> None:
    """The questions that resolved to no one, by (agency, subject): the partial index
    ``ix_consent_decisions_unresolved``, whose condition the statements must repeat for
    the planner to use it (migration 0016). Named, not only "no Seq Scan": without it the
    planner reads each agency's questions through (client_id, at), every one of them."""
    statements = [s for s in reads(forget_statements(loaded))
                  if touches(s, "consent_decisions")]
    assert len(statements) >= 3
    with loaded.hub.db.engine.connect() as conn:
        indexes = {index for s in statements for _, table, index in explain(conn, s).scans
                   if table == "consent_decisions"}
    assert {"ix_consent_decisions_account_at", "ix_consent_decisions_unresolved"} <= {
        name for found in indexes if found for name in found.split("|")}, indexes
    assert seq_scans(loaded, statements) == []


def test_the_erasure_job_reads_only_the_closed_accounts(loaded: Loaded) -> None:
    statements = erasure_statements(loaded)
    assert any(touches(s, "constituent_accounts") for s in statements)
    assert seq_scans(loaded, statements) == []


def test_the_expiry_job_reads_only_the_grants_due(loaded: Loaded) -> None:
    statements = expiry_statements(loaded)
    assert any(touches(s, "consent_records") for s in statements)
    assert not any(touches(s, "consent_events") for s in statements)  # no grouping of events
    assert seq_scans(loaded, statements) == []


@pytest.mark.parametrize("index", sorted(INDEXES))
def test_losing_an_index_is_caught(loaded: Loaded, index: str) -> None:
    """Without the index the same statement scans its table: the check is not vacuous."""
    path, table, indexes = INDEXES[index]
    statements = {"decision": decision_statements, "token": token_statements,
                  "expiry": expiry_statements, "erasure": erasure_statements}[path](loaded)
    needing = [s for s in reads(statements) if touches(s, table)]
    assert needing
    with loaded.hub.db.engine.connect() as conn:
        with conn.begin() as transaction:
            for name in indexes:
                if name.startswith("uq_"):
                    conn.execute(text(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'))
                else:
                    conn.execute(text(f'DROP INDEX "{name}"'))
            scans = [t for s in needing for t in explain(conn, s).seq_scans(TABLES)]
            transaction.rollback()
    assert table in scans, f"{index} dropped, yet no Seq Scan on {table}"


def test_the_loader_writes_what_the_service_reads(loaded: Loaded) -> None:
    """Loaded records answer like real ones: a sampled citizen's record is found under the
    agency's pairwise subject and its events replay to a state."""
    client_id, subject = loaded.sample[0]
    with loaded.hub.db.engine.connect() as conn:
        account_id = conn.execute(text(
            "SELECT account_id FROM consent_records WHERE client_id = :c AND subject = :s"),
            {"c": client_id, "s": subject}).scalar_one()
    client = loaded.hub.agencies.client(client_id)
    assert client is not None
    assert loaded.hub.server.hub.subject_for(client, account_id) == subject
    assert loaded.hub.consent.current(account_id, client_id) is not None
    assert set(loaded.hub.accounts.attributes(account_id)) >= {"email", "name"}


def test_loaded_records_carry_the_validity_of_their_last_event(loaded: Loaded) -> None:
    """consent_records.expires_at is what consent.history.expiry_of gives for the record's
    last event (the rule the service and migration 0010 follow), for every loaded record."""
    with loaded.hub.db.engine.connect() as conn:
        expiring, wrong = conn.execute(text("""
            SELECT count(r.expires_at), count(*) FILTER (WHERE r.expires_at IS DISTINCT FROM (
                SELECT e.expires_at FROM consent_events e
                WHERE e.record_id = r.id AND e.state IN ('given', 'renewed')
                  AND e.seq = (SELECT max(l.seq) FROM consent_events l WHERE l.record_id = r.id)))
            FROM consent_records r""")).one()
    assert expiring > 0 and wrong == 0


def test_loaded_decisions_have_the_time_ordered_ids_the_hub_gives(loaded: Loaded) -> None:
    """As consent.models.new_time_ordered_id: UUID version 7 of the decision's own time, so
    the benches' decision log sorts (and is purged) as a real one."""
    import uuid

    with loaded.hub.db.engine.connect() as conn:
        rows = conn.execute(text("SELECT id, at FROM consent_decisions ORDER BY id")).all()
    assert len(rows) > 100
    assert {uuid.UUID(r.id).version for r in rows} == {7}
    ms = [int(r.at.timestamp() * 1000) for r in rows]
    assert ms == sorted(ms)
