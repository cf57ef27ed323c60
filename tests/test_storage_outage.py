"""When PostgreSQL drops the hub's connections (a restart, a fail-over, an administrator),
requests get a 503 "try again" (JSON for programs, a page for people), never a 500, and the
hub recovers by itself with fresh connections."""

from __future__ import annotations

import base64

import pytest
from sqlalchemy import create_engine, text

import kernel.db
from civitas.app import create_app
from tests.conftest import hub_config
from tests.flows import AGENCY_ONE

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
