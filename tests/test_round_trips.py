"""What a login costs in round trips to PostgreSQL and Redis, counted (issue 7).

The bench (bench/run.py, scenario 3) measures what a single sign-on to a second agency
costs; on a network each round trip to the stores is also a wait. This pins how many a
login makes, so that a change that adds one shows up here and is a decision, not an
accident. With the default settings (rate limits on):

- ``/authorize`` with a hub session: the session and the login limit per address, in one
  script (Redis: civitas/app.py counts the limit as the session is read),
  the account's existence and the agency's consent record in one statement (PostgreSQL,
  idp/citizen.py), then the code, its nonce and the session's participants in one Redis
  script;
- ``/token`` (code exchange): the token limit per address (Redis; the agency's own limit is
  counted in batches, a round trip every tenth request: kernel/ratelimit.py); the code taken
  with its hub session's revocation mark in one script (Redis), the account's attributes
  and the consent record in one statement (PostgreSQL); the access token carries its own
  record (encrypted, idp/tokens.py), so nothing more is written.

Statements and Redis commands are counted on the test's own thread (the hub's background
jobs are off as well), and each count is the least of three logins, so a cache of agencies
or keys that happens to refresh during one of them does not count as the login's.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from redis.connection import AbstractConnection

from civitas.app import create_app
from tests.conftest import hub_config
from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest, full_login, query, redeem

#: (PostgreSQL statements, Redis round trips) of each step of a login to a second agency
EXPECTED = {"authorize": (1, 2), "token": (1, 2)}


@contextmanager
def counting() -> Iterator[Counter[str]]:
    """Counts ``sql`` statements and ``redis`` round trips (one send of packed commands: a
    command, a pipeline or a script) made on this thread while the block runs. Statements
    are counted at the driver (psycopg's ``Cursor.execute``), so those sent through
    SQLAlchemy and those a :class:`kernel.db.PreparedRead` sends straight count alike."""
    counts: Counter[str] = Counter()
    me = threading.get_ident()
    execute = psycopg.Cursor.execute

    def counted_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == me:
            counts["sql"] += 1
        return execute(self, *args, **kwargs)

    send = AbstractConnection.send_packed_command

    def counted_send(self: Any, command: Any, check_health: bool = True) -> None:
        if threading.get_ident() == me:
            counts["redis"] += 1
        send(self, command, check_health)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(psycopg.Cursor, "execute", counted_execute)
        patch.setattr(AbstractConnection, "send_packed_command", counted_send)
        yield counts


def test_an_sso_login_of_a_second_agency_makes_these_round_trips(
        upstream_issuer, pg_database_url, redis_url):
    app = create_app(hub_config(upstream_issuer, pg_database_url, redis_url=redis_url,
                                housekeeping_interval_seconds=0,
                                backchannel_dispatcher=False))
    hub = app.extensions["civitas"]
    try:
        client = app.test_client()
        full_login(client, AuthRequest())  # the hub session, through the real upstream
        first = AuthRequest(agency=AGENCY_TWO)  # the second agency's consent, once
        r = client.get(first.url())
        assert r.status_code in (302, 303), r.get_data(as_text=True)[:400]
        seen: dict[str, list[tuple[int, int]]] = {"authorize": [], "token": []}
        for _ in range(3):
            auth = AuthRequest(agency=AGENCY_TWO)
            with counting() as counts:
                r = client.get(auth.url())
            assert r.status_code == 302, r.get_data(as_text=True)[:400]
            code = query(r.headers["Location"])["code"]  # no consent page: SSO
            seen["authorize"].append((counts["sql"], counts["redis"]))
            with counting() as counts:
                r = redeem(client, auth, code)
            assert r.status_code == 200, r.get_data(as_text=True)
            assert "id_token" in r.json and "access_token" in r.json
            seen["token"].append((counts["sql"], counts["redis"]))
        least = {step: (min(s for s, _ in runs), min(r for _, r in runs))
                 for step, runs in seen.items()}
        assert least == EXPECTED, seen
    finally:
        hub.db.dispose()


#: (PostgreSQL statements, Redis round trips) of a refresh (RFC 6749 6)
EXPECTED_REFRESH = (3, 3)


def test_a_refresh_makes_these_round_trips(upstream_issuer, pg_database_url, redis_url):
    """A refresh with rotation: the grant read with whether its citizen's account is live,
    then claimed, then rotated (PostgreSQL); the token limit per address, the hub session's
    revocation mark and the grant's revocation mark (Redis); the new access token carries
    its own record."""
    offline = ["openid", "profile", "email", "offline_access"]
    app = create_app(hub_config(upstream_issuer, pg_database_url, redis_url=redis_url,
                                housekeeping_interval_seconds=0, backchannel_dispatcher=False,
                                agencies=[AGENCY_ONE.config(scopes=offline)]))
    hub = app.extensions["civitas"]
    try:
        client = app.test_client()
        auth = AuthRequest(scope="openid email offline_access")
        params = full_login(client, auth)
        token = redeem(client, auth, params["code"]).json["refresh_token"]
        seen = []
        for _ in range(3):
            with counting() as counts:
                r = client.post("/token", data={"grant_type": "refresh_token",
                                                "refresh_token": token}, headers=basic())
            assert r.status_code == 200, r.get_data(as_text=True)
            token = r.json["refresh_token"]
            seen.append((counts["sql"], counts["redis"]))
        least = (min(s for s, _ in seen), min(r for _, r in seen))
        assert least == EXPECTED_REFRESH, seen
    finally:
        hub.db.dispose()


def basic() -> dict[str, str]:
    import base64

    pair = f"{AGENCY_ONE.client_id}:{AGENCY_ONE.secret}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}

