"""When PostgreSQL drops the hub's connections (a restart, a fail-over, an administrator),
requests get a 503 "try again" (JSON for programs, a page for people), never a 500, and the
hub recovers by itself with fresh connections. A connection dropped in the middle of a
citizen's consent write (Allow, Deny, withdrawal) leaves no event, receipt or ledger entry
without the others, and the citizen can answer again; one in the middle of an account write
(first login, linking, unlinking, deletion) leaves no account, credential or account event
without its ledger entry or the other way round, and the citizen can do it again (an account
deletion cut off after the account was closed is finished by housekeeping)."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from jose import jwt as jose_jwt
from sqlalchemy import create_engine, event, select, text

import kernel.db
from broker.models import AccountAttribute, AccountEvent, ConstituentAccount, LinkedIdentity
from civitas.app import create_app, stop_background
from civitas.housekeeping import finish_erasures
from consent.ledger.ledger import hashed_id
from consent.ledger.models import LedgerEntry
from consent.models import ConsentEvent, ConsentReceipt
from consent.officers import pseudonym_key
from consent.reconcile import reconcile
from idp.models import RefreshGrantRecord
from idp.tokens import ACCOUNT_DELETED
from tests.conftest import bank_id_upstream, hub_config
from tests.flows import (
    AGENCY_ONE,
    AGENCY_TWO,
    AuthRequest,
    allow_consent,
    full_login,
    path_of,
    query,
    redeem,
    start_login,
    upstream_login,
)
from tests.test_consent_flow import CONSENT, answer, evaluate, to_consent_page
from tests.test_linking import csrf, start_link

EVALUATION = {"subject": {"type": "user", "id": "nobody"}, "action": {"name": "use"},
              "resource": {"type": "claim", "id": "email"},
              "context": {"purpose": "service-delivery"}}
AUTH = {"Authorization": "Basic " + base64.b64encode(
    f"{AGENCY_ONE.client_id}:{AGENCY_ONE.secret}".encode()).decode()}


def terminate_connections(url: str) -> int:
    """What a PostgreSQL restart does to every open connection of the hub's database: the
    hub's own (client backends), not an autovacuum worker the hub's writes brought in (a
    superuser's process, which this role may not end, and which is not the hub's)."""
    name = url.rsplit("/", 1)[1]
    admin = create_engine(url.rsplit("/", 1)[0] + "/civitas", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            return len(conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :db AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"), {"db": name}).all())
    finally:
        admin.dispose()


@pytest.fixture
def pg_app(upstream_issuer, pg_database_url):
    app = create_app(hub_config(upstream_issuer, pg_database_url))
    yield app, pg_database_url
    app.extensions["civitas"].db.dispose()


def test_dropped_connections_give_503_then_recover(pg_app, monkeypatch):
    app, url = pg_app
    monkeypatch.setattr("idp.agencies.CLIENT_CACHE_SECONDS", 0.0)  # every request reads
    client = app.test_client()
    for _ in range(3):  # warm the pool
        assert client.post("/access/v1/evaluation", json=EVALUATION,
                           headers=AUTH).status_code == 200
    assert terminate_connections(url) >= 1
    statuses = []
    for _ in range(3):
        r = client.post("/access/v1/evaluation", json=EVALUATION, headers=AUTH)
        statuses.append(r.status_code)
        if r.status_code == 503:
            assert r.json["error"] == "temporarily_unavailable"
            assert r.headers["Retry-After"] == "5"
    assert statuses[0] == 503 and statuses[-1] == 200, statuses
    # people get a page, not JSON (the admin-free page that reads the database: discovery
    # does not; the agency's authorization request does)
    assert terminate_connections(url) >= 1
    r = client.get(f"/authorize?client_id={AGENCY_ONE.client_id}")
    assert r.status_code == 503 and r.mimetype == "text/html", r.status_code
    assert "briefly unavailable" in r.get_data(as_text=True)
    r = client.get(f"/authorize?client_id={AGENCY_ONE.client_id}")
    assert r.status_code == 400  # the database is back: the request's own error


def test_connections_idle_in_the_pool_are_checked_before_use(pg_app, monkeypatch):
    app, url = pg_app
    monkeypatch.setattr(kernel.db, "PING_AFTER_IDLE_SECONDS", 0.0)
    client = app.test_client()
    assert client.post("/access/v1/evaluation", json=EVALUATION,
                       headers=AUTH).status_code == 200
    assert terminate_connections(url) >= 1
    # the idle check notices the dead connection and the pool opens a new one: no error
    for _ in range(3):
        assert client.post("/access/v1/evaluation", json=EVALUATION,
                           headers=AUTH).status_code == 200


# -- a citizen's consent write cut off half-way -----------------------------------------------
#
# Pressing Allow or Deny on the consent page, and withdrawing on /account/consents, each write a
# consent event, (for Allow and withdrawal) a signed receipt and a ledger entry in one
# transaction (consent.service ``_append``, the ledger joining the caller's session). Here the
# hub's own PostgreSQL backend is terminated (pg_terminate_backend, from a separate admin
# connection) in the middle of that transaction: right after the consent event's INSERT,
# right after the ledger entry's INSERT, or just before COMMIT. Nothing is mocked: the server
# really drops the connection and rolls the transaction back.

CUT_POINTS = ("after-event-insert", "after-ledger-insert", "before-commit")


class BackendCut:
    """Terminates, once, the PostgreSQL backend of the transaction that inserts a consent
    event, at ``point`` of it, and waits until that backend is gone. The points are found
    from that transaction's connection's statements (and, for the ledger INSERT, from any
    connection: should the entry ever be written apart from its event, the event's own
    transaction is still the one cut)."""

    def __init__(self, engine: Any, url: str, point: str) -> None:
        assert point in CUT_POINTS
        self.engine, self.point = engine, point
        self.admin = create_engine(url, isolation_level="AUTOCOMMIT")
        #: the backend that inserted the consent event (the transaction to cut)
        self.pid: int | None = None
        self.fired: list[str] = []

    def __enter__(self) -> BackendCut:
        event.listen(self.engine, "after_cursor_execute", self._after_execute)
        event.listen(self.engine, "commit", self._before_commit)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "after_cursor_execute", self._after_execute)
        event.remove(self.engine, "commit", self._before_commit)
        self.admin.dispose()

    @staticmethod
    def _pid(conn: Any) -> int:
        return int(conn.connection.dbapi_connection.info.backend_pid)

    def _cut(self, where: str) -> None:
        if self.fired or self.pid is None:
            return
        self.fired.append(where)
        with self.admin.connect() as admin:
            assert admin.execute(text("SELECT pg_terminate_backend(:pid)"),
                                 {"pid": self.pid}).scalar()
            deadline = time.monotonic() + 10
            while admin.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"),
                                {"pid": self.pid}).scalar():
                assert time.monotonic() < deadline, "the backend outlived its termination"
                time.sleep(0.01)

    def _after_execute(self, conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("INSERT INTO consent_events") and self.pid is None:
            self.pid = self._pid(conn)
            if self.point == "after-event-insert":
                self._cut(statement)
        elif statement.startswith("INSERT INTO ledger_entries") \
                and self.point == "after-ledger-insert":
            self._cut(statement)

    def _before_commit(self, conn: Any) -> None:
        if self.point == "before-commit" and self.pid is not None \
                and self._pid(conn) == self.pid:
            self._cut("COMMIT")


def consent_rows(hub: Any) -> dict[str, Any]:
    """What is stored of consent: rows per table, and the kinds of events and entries."""
    with hub.db.session() as s:
        events = list(s.scalars(select(ConsentEvent).order_by(ConsentEvent.seq)))
        receipts = list(s.scalars(select(ConsentReceipt)))
        entries = list(s.scalars(select(LedgerEntry).where(
            LedgerEntry.kind.startswith("consent.")).order_by(LedgerEntry.seq)))
    by_id = {e.id for e in events}
    assert all(r.event_id in by_id for r in receipts), "a receipt without its event"
    assert {e.receipt_id for e in events if e.receipt_id} == {r.id for r in receipts}
    return {"events": [e.kind for e in events], "receipts": len(receipts),
            "entries": [e.kind for e in entries]}


def assert_reconciled(hub: Any, events: int) -> None:
    report = reconcile(hub.db, hub.ledger, None, None)
    assert report.ok, (report.missing_in_ledger, report.unmatched_entries, report.altered)
    assert report.records == report.entries == events


def assert_unavailable_page(r: Any) -> None:
    """The citizen's 503: a page saying try again, quoting the request's reference."""
    body = r.get_data(as_text=True)
    assert r.status_code == 503, (r.status_code, body[:800])
    assert r.mimetype == "text/html" and r.headers["Retry-After"] == "5"
    assert "briefly unavailable" in body and "Traceback" not in body
    assert "Location" not in r.headers and "code=" not in body  # the agency gets nothing
    request_id = r.headers["X-Request-Id"]
    assert request_id and f"<code>{request_id}</code>" in body


@pytest.fixture
def consent_hub(upstream_issuer, pg_database_url):
    app = create_app(hub_config(upstream_issuer, pg_database_url, agencies=[
        AGENCY_ONE.config(consent=CONSENT), AGENCY_TWO.config()],
        backchannel_dispatcher=False))
    yield app, pg_database_url
    stop_background(app)
    app.extensions["civitas"].db.dispose()


@pytest.mark.parametrize("point", CUT_POINTS)
@pytest.mark.parametrize("decision", ["allow", "deny"])
def test_consent_answer_cut_off_mid_write_is_503_and_leaves_nothing_half_written(
        consent_hub, decision, point):
    app, url = consent_hub
    hub = app.extensions["civitas"]
    client = app.test_client()
    _, form = to_consent_page(client, AuthRequest())
    with BackendCut(hub.db.engine, url, point) as cut:
        r = answer(client, form, decision, claims=["name"])
    assert cut.fired, "the write never reached the cut point"
    assert_unavailable_page(r)
    assert_reconciled(hub, 0)
    assert consent_rows(hub) == {"events": [], "receipts": 0, "entries": []}

    # the database is back: the same citizen gets a fresh consent page and answers once
    auth = AuthRequest()
    r = client.get(auth.url())
    assert r.status_code == 303 and r.headers["Location"].startswith("/authorize/consent")
    page = client.get(path_of(r.headers["Location"])).get_data(as_text=True)
    form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page))
    r = answer(client, form, decision, claims=["name"])
    assert r.status_code == 302
    params = query(r.headers["Location"])
    if decision == "allow":
        assert "code" in params
        assert consent_rows(hub) == {"events": ["given"], "receipts": 1,
                                     "entries": ["consent.given"]}
    else:
        assert params["error"] == "access_denied"
        assert consent_rows(hub) == {"events": ["refused"], "receipts": 0,
                                     "entries": ["consent.refused"]}
    assert_reconciled(hub, 1)


def withdraw(client: Any) -> Any:
    page = client.get("/account/consents").get_data(as_text=True)
    assert "Agency One" in page
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found
    return client.post("/account/consents/withdraw",
                       data={"csrf": found.group(1), "client_id": AGENCY_ONE.client_id})


@pytest.mark.parametrize("point", CUT_POINTS)
def test_withdrawal_cut_off_mid_write_is_503_and_leaves_the_grant_as_it_was(
        consent_hub, point):
    app, url = consent_hub
    hub = app.extensions["civitas"]
    client = app.test_client()
    _, form = to_consent_page(client, AuthRequest())
    assert answer(client, form, "allow", claims=["name"]).status_code == 302
    given = {"events": ["given"], "receipts": 1, "entries": ["consent.given"]}
    assert consent_rows(hub) == given
    with BackendCut(hub.db.engine, url, point) as cut:
        r = withdraw(client)
    assert cut.fired, "the write never reached the cut point"
    assert_unavailable_page(r)
    assert_reconciled(hub, 1)
    assert consent_rows(hub) == given  # the grant stands, whole, with its one entry
    r = client.get(AuthRequest().url())  # and still lets the agency in
    assert r.status_code == 302 and "code" in query(r.headers["Location"])

    # the database is back: withdrawing from a fresh page is recorded once
    r = withdraw(client)
    assert r.status_code == 303, r.get_data(as_text=True)[:800]
    assert consent_rows(hub) == {"events": ["given", "withdrawn"], "receipts": 2,
                                 "entries": ["consent.given", "consent.withdrawn"]}
    assert_reconciled(hub, 2)


# -- a citizen's account write cut off half-way -----------------------------------------------
#
# A first login (the account, its first linked identity and its attributes), linking a second
# credential, unlinking one and deleting the account each write their rows and an account
# event, and the root's ``on_event`` hook appends the matching ``account.*`` ledger entry in
# the same session (civitas.app ``account_event_to_ledger``): all of it commits or none. Here
# the transaction's backend is terminated (as above, by pg_terminate_backend from an admin
# connection) right after its first write to the account's tables, after the ledger entry's
# INSERT, after the account event's INSERT, or just before COMMIT.

ACCOUNT_CUT_POINTS = ("after-change", *CUT_POINTS)
ACCOUNT_TABLES = ("constituent_accounts", "linked_identities", "account_attributes",
                  "account_events")


def _account_write(statement: str) -> bool:
    return statement.startswith(("INSERT INTO", "UPDATE", "DELETE FROM")) \
        and statement.split()[2 if statement.startswith(("INSERT", "DELETE")) else 1] \
        in ACCOUNT_TABLES


class AccountCut(BackendCut):
    """:class:`BackendCut` for the account's transaction: the one that first writes to the
    account's tables (the backend cut before COMMIT). The statement cut points (the first
    account write, the account event's INSERT, the ``account.*`` ledger entry's INSERT, on
    whatever connection it runs) cut the backend that ran that statement."""

    def __init__(self, engine: Any, url: str, point: str) -> None:
        assert point in ACCOUNT_CUT_POINTS
        super().__init__(engine, url, "before-commit")
        self.point = point

    def _cut_backend_of(self, conn: Any, where: str) -> None:
        if not self.fired:
            self.pid = self._pid(conn)
            self._cut(where)

    def _after_execute(self, conn: Any, _cursor: Any, statement: str, *args: Any) -> None:
        if self.fired:
            return
        if _account_write(statement):
            if self.pid is None:
                self.pid = self._pid(conn)
                if self.point == "after-change":
                    self._cut_backend_of(conn, statement)
            if statement.startswith("INSERT INTO account_events") \
                    and self.point == "after-event-insert":
                self._cut_backend_of(conn, statement)
        elif statement.startswith("INSERT INTO ledger_entries") \
                and self.point == "after-ledger-insert" \
                and str(dict(args[0]).get("kind", "")).startswith("account."):
            self._cut_backend_of(conn, statement)


def account_rows(hub: Any) -> dict[str, Any]:
    """What is stored of accounts, checked to agree with the ledger: every account event has
    its ``account.*`` entry (same kind, account, connector, assurance, in the same order) and
    every entry its event; returns the accounts (deleted or not), linked credentials,
    attribute sources and event kinds."""
    key = pseudonym_key(hub.settings.pairwise_secret.get_secret_value())
    with hub.db.session() as s:
        accounts = list(s.scalars(select(ConstituentAccount).order_by(
            ConstituentAccount.created_at)))
        links = sorted((li.connector_id, li.upstream_subject)
                       for li in s.scalars(select(LinkedIdentity)))
        sources = sorted({a.source_connector for a in s.scalars(select(AccountAttribute))})
        events = list(s.scalars(select(AccountEvent).order_by(AccountEvent.id)))
        entries = [json.loads(e.entry) for e in s.scalars(select(LedgerEntry).where(
            LedgerEntry.kind.startswith("account.")).order_by(LedgerEntry.seq))]
    assert [(f"account.{e.kind}", hashed_id(key, e.account_id), e.connector_id, e.acr)
            for e in events] == [
        (e["kind"], e["data"]["account"], e["data"]["connector"], e["data"]["acr"])
        for e in entries], "account events and their ledger entries disagree"
    return {"accounts": ["erased" if a.erased_at else "closed" if a.deleted_at else "live"
                         for a in accounts],
            "links": links, "sources": sources, "events": [e.kind for e in events]}


@pytest.fixture
def account_hub(upstream_issuer, pg_database_url):
    """Two upstreams (two credentials to the hub, as in tests/test_linking.py); the first
    agency may also ask for refresh tokens."""
    cfg = hub_config(upstream_issuer, pg_database_url, backchannel_dispatcher=False, agencies=[
        AGENCY_ONE.config(scopes=["openid", "profile", "email", "offline_access"]),
        AGENCY_TWO.config()])
    cfg["upstreams"].append(bank_id_upstream(upstream_issuer))
    app = create_app(cfg)
    yield app, pg_database_url
    stop_background(app)
    app.extensions["civitas"].db.dispose()


ALICE = [("op", "alice-0001")]
ALICE_BOTH = [("op", "alice-0001"), ("op-es", "alice-0001")]
#: the account rows of a citizen signed in with two linked credentials
TWO_CREDENTIALS = {"accounts": ["live"], "links": ALICE_BOTH, "sources": ["op", "op-es"],
                   "events": ["created", "linked"]}


def cut_off(hub: Any, url: str, point: str, request: Callable[[], Any]) -> Any:
    """``request`` with the account's transaction cut at ``point``: the hub's answer, which
    must be the readable "try again" page."""
    with AccountCut(hub.db.engine, url, point) as cut:
        r = request()
    assert cut.fired, "the write never reached the cut point"
    assert_unavailable_page(r)
    return r


def signed_in_with_two_credentials(client: Any, hub: Any) -> None:
    full_login(client, AuthRequest())
    assert client.get(path_of(upstream_login(start_link(client), "alice"))).status_code == 303
    assert account_rows(hub) == TWO_CREDENTIALS


@pytest.mark.parametrize("point", ACCOUNT_CUT_POINTS)
def test_first_login_cut_off_mid_write_creates_no_account(account_hub, point):
    app, url = account_hub
    hub = app.extensions["civitas"]
    client = app.test_client()
    callback = upstream_login(start_login(client, AuthRequest()), "alice")
    cut_off(hub, url, point, lambda: client.get(path_of(callback)))
    assert account_rows(hub) == {"accounts": [], "links": [], "sources": [], "events": []}
    with client.session_transaction() as session:
        assert "login" not in session  # not signed in to an account that is not there

    # the database is back: logging in again creates the account, once
    params = full_login(client, AuthRequest())
    assert "code" in params
    assert account_rows(hub) == {"accounts": ["live"], "links": ALICE, "sources": ["op"],
                                 "events": ["created"]}


@pytest.mark.parametrize("point", ACCOUNT_CUT_POINTS)
def test_link_cut_off_mid_write_links_nothing(account_hub, point):
    app, url = account_hub
    hub = app.extensions["civitas"]
    client = app.test_client()
    full_login(client, AuthRequest())
    before = {"accounts": ["live"], "links": ALICE, "sources": ["op"], "events": ["created"]}
    assert account_rows(hub) == before
    callback = upstream_login(start_link(client), "alice")
    cut_off(hub, url, point, lambda: client.get(path_of(callback)))
    assert account_rows(hub) == before
    r = client.get("/account")  # still signed in, with one credential
    assert r.status_code == 200 and "Bank ID" not in r.get_data(as_text=True)

    # the database is back: linking again from the account page links it, once
    r = client.get(path_of(upstream_login(start_link(client), "alice")))
    assert r.status_code == 303 and r.headers["Location"] == "/account"
    assert "The new way to sign in was added" in client.get("/account").get_data(as_text=True)
    assert account_rows(hub) == TWO_CREDENTIALS


@pytest.mark.parametrize("point", ACCOUNT_CUT_POINTS)
def test_unlink_cut_off_mid_write_keeps_the_credential(account_hub, point):
    app, url = account_hub
    hub = app.extensions["civitas"]
    client = app.test_client()
    signed_in_with_two_credentials(client, hub)
    before = account_rows(hub)
    with hub.db.session() as s:
        bank = s.scalars(select(LinkedIdentity.id).where(
            LinkedIdentity.connector_id == "op-es")).one()
    token = csrf(client)
    cut_off(hub, url, point, lambda: client.post(f"/account/identities/{bank}/unlink",
                                                 data={"csrf": token}))
    assert account_rows(hub) == before
    r = client.get("/account")
    assert r.status_code == 200 and "Bank ID" in r.get_data(as_text=True)

    # the database is back: unlinking again from a fresh page removes it, once
    r = client.post(f"/account/identities/{bank}/unlink", data={"csrf": csrf(client)})
    assert r.status_code == 303, r.get_data(as_text=True)[:800]
    assert "Sign-in removed" in client.get("/account").get_data(as_text=True)
    assert account_rows(hub) == {"accounts": ["live"], "links": ALICE, "sources": ["op"],
                                 "events": ["created", "linked", "unlinked"]}


@pytest.mark.parametrize("point", ACCOUNT_CUT_POINTS)
def test_account_deletion_cut_off_mid_write_deletes_nothing(account_hub, point):
    app, url = account_hub
    hub = app.extensions["civitas"]
    client = app.test_client()
    signed_in_with_two_credentials(client, hub)
    before = account_rows(hub)
    auth = AuthRequest()
    r = client.get(auth.url())  # an agency holds a grant of this account
    assert r.status_code == 302
    access = redeem(client, auth, query(r.headers["Location"])["code"]).json["access_token"]
    token = csrf(client)
    r = cut_off(hub, url, point, lambda: client.post(
        "/account/delete", data={"csrf": token, "confirm": "delete"}))
    assert account_rows(hub) == before
    # closing the account is the erasure's first step, in one transaction: cut off, nothing
    # is done. The account, its session and the agency's grant stand as they were, and the
    # citizen can press Delete again
    r = client.get("/account")
    assert r.status_code == 200 and "Bank ID" in r.get_data(as_text=True)
    assert client.get("/userinfo", headers={"Authorization": f"Bearer {access}"}
                      ).status_code == 200

    # the database is back: deleting again from a fresh page deletes it, once
    r = client.post("/account/delete", data={"csrf": csrf(client), "confirm": "delete"})
    assert r.status_code == 303, r.get_data(as_text=True)[:800]
    assert r.headers["Location"].endswith("/signed-out?deleted=1")
    assert account_rows(hub) == {"accounts": ["erased"], "links": [], "sources": [],
                                 "events": ["created", "linked", "deleted", "erased"]}
    assert client.get("/userinfo", headers={"Authorization": f"Bearer {access}"}
                      ).status_code == 401


class StatementCut(BackendCut):
    """Terminates, once, the backend that runs the first statement starting with
    ``prefix``, right after it ran."""

    def __init__(self, engine: Any, url: str, prefix: str) -> None:
        super().__init__(engine, url, "before-commit")
        self.prefix = prefix

    def _after_execute(self, conn: Any, _cursor: Any, statement: str, *args: Any) -> None:
        if not self.fired and statement.startswith(self.prefix):
            self.pid = self._pid(conn)
            self._cut(statement)


def test_account_deletion_cut_off_part_way_closes_the_account_and_housekeeping_finishes_it(
        account_hub, caplog):
    """Erasure closes the account first (one transaction: no session, token, claim or
    credential leads to it from then on), then revokes its refresh grants, withdraws its
    consents and removes its personal data. Cut off while revoking, the account stays
    closed, the citizen is told the rest will be finished, and housekeeping finishes it
    (each step idempotent); never a live account whose citizen asked for its erasure and
    went away (the order before this test needed the citizen to press Delete again)."""
    app, url = account_hub
    hub = app.extensions["civitas"]
    client = app.test_client()
    signed_in_with_two_credentials(client, hub)
    old_account = hub.accounts.account_for_credential("op", "alice-0001")
    auth = AuthRequest(scope="openid email offline_access")
    r = allow_consent(client, client.get(auth.url()))  # offline access: asked, and ticked
    assert r.status_code == 302
    tokens = redeem(client, auth, query(r.headers["Location"])["code"]).json
    assert "refresh_token" in tokens
    assert hub.consent.grants_for_account(old_account), "the agency holds no consent to end"
    sub = jose_jwt.get_unverified_claims(tokens["id_token"])["sub"]
    assert evaluate(client, sub, "email", "service-delivery").json["decision"] is True
    with StatementCut(hub.db.engine, url, "UPDATE refresh_grants") as cut:
        r = client.post("/account/delete", data={"csrf": csrf(client), "confirm": "delete"})
    assert cut.fired, "the deletion never revoked a grant"
    assert r.status_code == 303 and r.headers["Location"].endswith("?deleted=pending")
    page = client.get(path_of(r.headers["Location"])).get_data(as_text=True)
    assert "Your account is closed" in page and "finished automatically" in page
    assert any("erasure did not finish" in m for m in caplog.messages)
    # closed: no session, no credential, no claim, no refresh; the rest still to be erased
    closed = {"accounts": ["closed"], "links": [], "sources": ["op", "op-es"],
              "events": ["created", "linked", "deleted"]}
    assert account_rows(hub) == closed
    assert client.get("/account").status_code == 302
    assert client.get("/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"}
                      ).status_code == 401
    secret = base64.b64encode(f"{AGENCY_ONE.client_id}:{AGENCY_ONE.secret}".encode()).decode()
    r = client.post("/token", data={"grant_type": "refresh_token",
                                    "refresh_token": tokens["refresh_token"]},
                    headers={"Authorization": f"Basic {secret}"})
    assert r.status_code == 400 and r.json["error"] == "invalid_grant"
    grants = hub.consent.grants_for_account(old_account)
    assert any(g.valid for g in grants), "the cut came before the consents were withdrawn"
    # and the agency's decision API already answers as for no one at all
    answer_now = evaluate(client, sub, "email", "service-delivery").json
    nobody = evaluate(client, "no-such-subject", "email", "service-delivery").json
    assert answer_now["decision"] is False
    assert answer_now["context"]["reason"] == nobody["context"]["reason"]

    # housekeeping leaves an erasure alone while its own request may still be at it ...
    assert finish_erasures(hub) == 0 and account_rows(hub) == closed
    # ... and finishes it after that
    assert finish_erasures(hub, grace=timedelta(0)) == 1
    assert account_rows(hub) == {"accounts": ["erased"], "links": [], "sources": [],
                                 "events": ["created", "linked", "deleted", "erased"]}
    assert not any(g.valid for g in hub.consent.grants_for_account(old_account))
    with hub.db.session() as s:
        assert [(g.revoked_at is not None, g.revoked_reason) for g in s.scalars(
            select(RefreshGrantRecord).where(RefreshGrantRecord.account_id == old_account))] == [
            (True, ACCOUNT_DELETED)]
    report = reconcile(hub.db, hub.ledger, None, None)
    assert report.ok, (report.missing_in_ledger, report.unmatched_entries, report.altered)
    # the question asked while it was open, now about no one, and the one asked once it was
    # closed, kept so from the start
    assert report.erased == 2
    assert hub.consent.decisions.for_account(old_account) == []
    assert finish_erasures(hub, grace=timedelta(0)) == 0  # once

    # signing in again with the same credential makes a new, empty account
    full_login(app.test_client(), AuthRequest())
    assert hub.accounts.account_for_credential("op", "alice-0001") not in (None, old_account)


def test_a_database_server_that_never_answers_is_given_up_after_the_connect_timeout(
        monkeypatch):
    """A PostgreSQL that accepts connections and never answers (a stopped server, a
    half-open path) fails the connection after kernel.db.CONNECT_TIMEOUT_SECONDS, as an
    unavailable database (the 503 of the root, /readyz not ready), on the pooled path and
    the straight one, rather than holding the request for good."""
    import socket
    import threading

    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    import kernel.db
    from kernel.db import Database

    monkeypatch.setattr(kernel.db, "CONNECT_TIMEOUT_SECONDS", 1)
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])  # and never a byte back
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = silent.getsockname()[1]
    db = Database(f"postgresql+psycopg://civitas:x@127.0.0.1:{port}/civitas?sslmode=disable")
    try:
        started = time.monotonic()
        with pytest.raises(OperationalError):
            with db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        with pytest.raises(OperationalError):
            db.send("SELECT 1", {})
        assert time.monotonic() - started < 30  # (a hang is what failed before: no bound)
    finally:
        stop.set()
        thread.join()
        db.dispose()
        for s in held:
            s.close()
        silent.close()


def test_connections_to_postgresql_find_a_vanished_server_host_by_tcp_deadlines(
        pg_database_url):
    """A server host that is gone (lost power, a failover moved its address, a firewall
    forgot the connection) tells the hub nothing: a statement waited for the kernel's
    retransmissions (about 15 minutes) or, waiting for an answer with nothing to send, for
    good, and so did its request (gunicorn's timeout watches a worker's main thread, not
    its requests). Every connection, the pool's and the straight path's, now has TCP
    keepalive probes and a TCP user timeout (RFC 5482) set on its socket, from
    kernel.db.TCP_DEADLINES, unless the database URL names its own."""
    import os
    import socket

    from kernel.db import TCP_DEADLINES, Database

    tcp_user_timeout = getattr(socket, "TCP_USER_TIMEOUT", 18)

    def options(fd: int) -> tuple[int, int, int, int, int]:
        sock = socket.socket(fileno=os.dup(fd))
        try:
            return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                    sock.getsockopt(socket.IPPROTO_TCP, tcp_user_timeout))
        finally:
            sock.close()

    wanted = (1, TCP_DEADLINES["keepalives_idle"], TCP_DEADLINES["keepalives_interval"],
              TCP_DEADLINES["keepalives_count"], TCP_DEADLINES["tcp_user_timeout"])
    db = Database(pg_database_url)  # (127.0.0.1: TCP)
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            assert options(conn.connection.dbapi_connection.pgconn.socket) == wanted
        db.send("SELECT 1", {})
        straight = db._straight._idle[-1][0]
        assert options(straight.pgconn.socket) == wanted
    finally:
        db.dispose()
    joiner = "&" if "?" in pg_database_url else "?"
    db = Database(f"{pg_database_url}{joiner}keepalives_idle=30&tcp_user_timeout=60000")
    try:
        with db.engine.connect() as conn:
            found = options(conn.connection.dbapi_connection.pgconn.socket)
            assert (found[1], found[4]) == (30, 60_000) and found[2:4] == wanted[2:4]
    finally:
        db.dispose()
