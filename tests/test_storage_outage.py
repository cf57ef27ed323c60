"""When PostgreSQL drops the hub's connections (a restart, a fail-over, an administrator),
requests get a 503 "try again" (JSON for programs, a page for people), never a 500, and the
hub recovers by itself with fresh connections. A connection dropped in the middle of a
citizen's consent write (Allow, Deny, withdrawal) leaves no event, receipt or ledger entry
without the others, and the citizen can answer again."""

from __future__ import annotations

import base64
import re
import time
from typing import Any

import pytest
from sqlalchemy import create_engine, event, select, text

import kernel.db
from civitas.app import create_app, stop_background
from consent.ledger.models import LedgerEntry
from consent.models import ConsentEvent, ConsentReceipt
from consent.reconcile import reconcile
from tests.conftest import hub_config
from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest, path_of, query
from tests.test_consent_flow import CONSENT, answer, to_consent_page

EVALUATION = {"subject": {"type": "user", "id": "nobody"}, "action": {"name": "use"},
              "resource": {"type": "claim", "id": "email"},
              "context": {"purpose": "service-delivery"}}
AUTH = {"Authorization": "Basic " + base64.b64encode(
    f"{AGENCY_ONE.client_id}:{AGENCY_ONE.secret}".encode()).decode()}


def terminate_connections(url: str) -> int:
    """What a PostgreSQL restart does to every open connection of the hub's database."""
    name = url.rsplit("/", 1)[1]
    admin = create_engine(url.rsplit("/", 1)[0] + "/civitas", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            return len(conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": name}).all())
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
