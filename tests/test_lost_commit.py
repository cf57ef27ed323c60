"""The write committed, and the hub never heard (PostgreSQL, through tests/pg_proxy.py).

The connection drops after COMMIT reached the server and before its answer came back: the
server has committed; the hub only sees a lost connection, so it says "try again" (503). The
citizen must then find the write done once, neither half done nor done twice: a consent
answer is whole (event, receipt, ledger entry) and answering again records nothing more; a
first login made its account, and signing in again finds it; a deletion closed the account,
and housekeeping finishes its erasure. The other cut points (before COMMIT) are in
tests/test_storage_outage.py.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import event

from civitas.app import create_app, stop_background
from civitas.housekeeping import finish_erasures
from tests.conftest import bank_id_upstream, hub_config
from tests.flows import (
    AGENCY_ONE,
    AGENCY_TWO,
    AuthRequest,
    full_login,
    path_of,
    query,
    start_login,
    upstream_login,
)
from tests.pg_proxy import PgProxy
from tests.test_consent_flow import CONSENT, answer, to_consent_page
from tests.test_linking import csrf
from tests.test_storage_outage import (
    ALICE,
    account_rows,
    assert_reconciled,
    assert_unavailable_page,
    consent_rows,
)


class LoseCommitReply:
    """The answer to the COMMIT of the transaction that first runs a statement starting with
    ``prefix`` is lost on its way back to the hub."""

    def __init__(self, engine: Any, proxy: PgProxy, prefix: str) -> None:
        self.engine, self.proxy, self.prefix = engine, proxy, prefix
        self.armed = False

    def __enter__(self) -> LoseCommitReply:
        event.listen(self.engine, "after_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "after_cursor_execute", self._seen)

    def _seen(self, conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not self.armed and statement.startswith(self.prefix):
            self.armed = True
            self.proxy.lose_commit_reply(conn.connection.dbapi_connection.info.backend_pid)


@pytest.fixture
def proxied_hub(upstream_issuer, pg_database_url):
    """A hub whose every connection to PostgreSQL goes through the relay."""
    parts = urlsplit(pg_database_url)
    proxy = PgProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    cfg = hub_config(upstream_issuer, proxy.url(pg_database_url), backchannel_dispatcher=False,
                     agencies=[AGENCY_ONE.config(consent=CONSENT), AGENCY_TWO.config()])
    cfg["upstreams"].append(bank_id_upstream(upstream_issuer))
    app = create_app(cfg)
    yield app, proxy
    stop_background(app)
    app.extensions["civitas"].db.dispose()
    proxy.close()


def test_the_relay_passes_a_whole_login_and_consent_through(proxied_hub):
    """The control: through the relay, unarmed, everything works and nothing is lost."""
    app, proxy = proxied_hub
    hub = app.extensions["civitas"]
    client = app.test_client()
    _, form = to_consent_page(client, AuthRequest())
    r = answer(client, form, "allow", claims=["name"])
    assert r.status_code == 302 and "code" in query(r.headers["Location"])
    assert consent_rows(hub) == {"events": ["given"], "receipts": 1,
                                 "entries": ["consent.given"]}
    assert proxy.lost == []


def test_consent_answer_whose_commit_reply_is_lost_is_recorded_once(proxied_hub):
    app, proxy = proxied_hub
    hub = app.extensions["civitas"]
    client = app.test_client()
    _, form = to_consent_page(client, AuthRequest())
    with LoseCommitReply(hub.db.engine, proxy, "INSERT INTO consent_events") as lose:
        r = answer(client, form, "allow", claims=["name"])
    assert lose.armed and len(proxy.lost) == 1, "no COMMIT answer was lost"
    assert_unavailable_page(r)  # the hub cannot know it was done: it says try again
    given = {"events": ["given"], "receipts": 1, "entries": ["consent.given"]}
    assert consent_rows(hub) == given  # the server committed it, whole
    assert_reconciled(hub, 1)

    # the same form sent again (back, then resubmit) is refused: its request was used once
    r = answer(client, form, "allow", claims=["name"])
    assert r.status_code == 400 and "Location" not in r.headers
    assert consent_rows(hub) == given
    # the agency's request sent again finds the consent and gets its code at once
    r = client.get(AuthRequest().url())
    assert r.status_code == 302 and "code" in query(r.headers["Location"])
    assert consent_rows(hub) == given
    assert_reconciled(hub, 1)


def test_first_login_whose_commit_reply_is_lost_made_one_account(proxied_hub):
    app, proxy = proxied_hub
    hub = app.extensions["civitas"]
    client = app.test_client()
    callback = upstream_login(start_login(client, AuthRequest()), "alice")
    with LoseCommitReply(hub.db.engine, proxy, "INSERT INTO constituent_accounts") as lose:
        r = client.get(path_of(callback))
    assert lose.armed and len(proxy.lost) == 1, "no COMMIT answer was lost"
    assert_unavailable_page(r)
    created = {"accounts": ["live"], "links": ALICE, "sources": ["op"], "events": ["created"]}
    assert account_rows(hub) == created
    with client.session_transaction() as session:
        assert "login" not in session
    account = hub.accounts.account_for_credential("op", "alice-0001")

    # signing in again finds that account: no second one, no second "created"
    params = full_login(client, AuthRequest())
    assert "code" in params
    assert account_rows(hub) == created
    assert hub.accounts.account_for_credential("op", "alice-0001") == account


def test_deletion_whose_commit_reply_is_lost_closed_the_account_and_is_finished(proxied_hub):
    app, proxy = proxied_hub
    hub = app.extensions["civitas"]
    client = app.test_client()
    full_login(client, AuthRequest())
    account = hub.accounts.account_for_credential("op", "alice-0001")
    token = csrf(client)
    with LoseCommitReply(hub.db.engine, proxy, "UPDATE constituent_accounts") as lose:
        r = client.post("/account/delete", data={"csrf": token, "confirm": "delete"})
    assert lose.armed and len(proxy.lost) == 1, "no COMMIT answer was lost"
    assert_unavailable_page(r)
    # the account was closed: its session, credential and claims are gone at once
    assert account_rows(hub) == {"accounts": ["closed"], "links": [], "sources": ["op"],
                                 "events": ["created", "deleted"]}
    assert client.get("/account").status_code == 302
    # and housekeeping finishes the erasure that the request never reached
    assert finish_erasures(hub, grace=timedelta(0)) == 1
    assert account_rows(hub) == {"accounts": ["erased"], "links": [], "sources": [],
                                 "events": ["created", "deleted", "erased"]}
    assert not any(g.valid for g in hub.consent.grants_for_account(account))
