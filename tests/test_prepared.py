"""kernel.db.Prepared: a hot statement sent straight to psycopg on PostgreSQL must give
exactly the rows SQLAlchemy's execution gives (value for value, type for type, time zone for
time zone), write what SQLAlchemy reads back, raise SQLAlchemy's errors, and never hand a
connection left in autocommit back to the pool. The statements are the ones the hub sends on
every login (idp.citizen) and refresh (idp.tokens), over data made by a real brokered login
and a consent decision with an expiry and a receipt."""

from __future__ import annotations

import json
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy import exc as sa_exc

from broker.accounts import LIVE_ACCOUNT
from civitas.app import create_app
from consent.decisions import LATEST_BY_ACCOUNT
from idp.citizen import _CLAIMS, _LOGIN, CitizenReads
from kernel.db import Database, Prepared
from tests.conftest import hub_config, in_forked_child
from tests.flows import AGENCY_ONE, AuthRequest, full_login
from tests.test_consent_service import ONE
from tests.test_storage_outage import terminate_connections


def typed(rows: Any) -> list[list[tuple[str, Any, Any]]]:
    """Each value with its type and, for a time, its zone: 12:00+00:00 and 13:00+01:00 are
    equal datetimes, but not the same answer."""
    return [[(type(value).__name__, value, getattr(value, "tzinfo", None)) for value in row]
            for row in rows]


def through_sqlalchemy(db: Database, statement: Any, params: dict[str, Any]) -> list[Any]:
    with db.reader() as conn:
        return list(conn.execute(statement, params).all())


@pytest.fixture
def citizen(upstream_issuer: str, database_url: str) -> Any:
    """A hub whose alice signed in once (account, attributes, the agency's consent record)
    and then gave agency-one a consent that expires (an expiry and a receipt). PostgreSQL's
    sessions are set to a zone far from UTC, so psycopg's times come back with +13:00 (or
    +12:00) and only the column type's conversion makes them UTC, as the hub expects."""
    if database_url.startswith("postgresql"):
        name = database_url.rsplit("/", 1)[1]
        admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"ALTER DATABASE {name} SET timezone TO 'Pacific/Auckland'")
        admin.dispose()
    app = create_app(hub_config(upstream_issuer, database_url))
    hub = app.extensions["civitas"]
    full_login(app.test_client(), AuthRequest())
    with hub.db.reader() as conn:
        account_id = conn.exec_driver_sql(
            "SELECT account_id FROM consent_records WHERE client_id = 'agency-one'").scalar_one()
    hub.consent.record_decision(account_id, ONE, "pairwise-subject", ["email"])
    yield hub, account_id
    hub.db.dispose()


def test_rows_are_those_sqlalchemy_gives_for_every_case(citizen: Any, database_url: str) -> None:
    hub, account_id = citizen
    now = hub.consent.clock()
    cases = [
        (account_id, "agency-one", now),  # a consent with an expiry, a receipt, JSON columns
        (account_id, "agency-one", now + timedelta(days=90)),  # after it expired
        (account_id, "agency-one", now - timedelta(days=1)),  # before any event: NULLs
        (account_id, "agency-two", now),  # no record with that agency: NULLs
        ("no-such-account", "agency-one", now),  # no row at all
    ]
    reads = {name: Prepared(hub.db, statement)
             for name, statement in (("login", _LOGIN), ("claims", _CLAIMS))}
    assert all(read.direct is database_url.startswith("postgresql") for read in reads.values())

    def compare() -> list[int]:
        counts = []
        for name, statement in (("login", _LOGIN), ("claims", _CLAIMS)):
            for account, client_id, at in cases:
                params = {"account_id": account, "key": account, "client_id": client_id,
                          "now": at}
                fast, slow = reads[name].rows(params), through_sqlalchemy(hub.db, statement,
                                                                         params)
                assert typed(fast) == typed(slow), (name, client_id, at)
                for mine, theirs in zip(fast, slow, strict=True):
                    assert dict(mine._mapping) == dict(theirs._mapping)
                    assert [getattr(mine, key) for key in theirs._fields] == list(theirs)
                counts.append(len(fast))
        return counts

    counts = compare()
    claims_rows = counts[len(cases):]
    assert counts[:len(cases)] == [1, 1, 1, 1, 0]  # the login read: the account, or nothing
    assert claims_rows[0] >= 4 and claims_rows[-1] == 0  # a row per attribute
    with hub.db.reader() as conn:  # the values that need converting were there to convert
        assert conn.exec_driver_sql(
            "SELECT count(*) FROM consent_events WHERE expires_at IS NOT NULL "
            "AND receipt_id IS NOT NULL").scalar_one() >= 1
    first = reads["claims"].rows({"account_id": account_id, "key": account_id,
                                 "client_id": "agency-one", "now": now})[0]
    assert first.consent_expires_at.utcoffset() == timedelta(0)
    assert first.asserted_at.utcoffset() == timedelta(0)
    if database_url.startswith("postgresql"):  # the zone was there to convert
        with hub.db.reader() as conn:
            assert conn.exec_driver_sql("SELECT now()").scalar_one().utcoffset() >= \
                timedelta(hours=12)
    assert first.consent_receipt_id
    # the consent JSON comes back as its text (parsed once per read, not once per attribute
    # row: idp.citizen._with_consent); the read of the state alone gives it parsed, Prepared
    # or not, and both agree
    latest = Prepared(hub.db, LATEST_BY_ACCOUNT)
    params = {"key": account_id, "client_id": "agency-one", "now": now}
    state = latest.rows(params)
    assert typed(state) == typed(through_sqlalchemy(hub.db, LATEST_BY_ACCOUNT, params))
    assert isinstance(state[0].claims, dict) and isinstance(state[0].declined, list)
    assert json.loads(first.consent_claims) == state[0].claims
    assert json.loads(first.consent_declined) == state[0].declined

    # the state the login and claims reads make is the consent service's own, in every case
    reader = CitizenReads(hub.db, hub.accounts, hub.consent)
    for account, client_id, at in cases:
        reader._consent = SimpleNamespace(clock=lambda at=at: at)  # type: ignore[assignment]
        expected = hub.consent.latest(account, client_id, at)
        assert reader.login(account, client_id)[1] == expected, (client_id, at)
        assert reader.claims(account, client_id, ["email", "name"])[1] == expected

    live = Prepared(hub.db, LIVE_ACCOUNT)  # introspection's read (AccountDirectory.exists)
    for account in (account_id, "no-such-account"):
        assert typed(live.rows({"account_id": account})) == typed(
            through_sqlalchemy(hub.db, LIVE_ACCOUNT, {"account_id": account}))
    assert hub.accounts.exists(account_id) and not hub.accounts.exists("no-such-account")

    hub.accounts.close(account_id)  # closed: no login row; its attribute rows, each with
    counts = compare()              # the deletion time, which the claims read refuses
    assert counts[:len(cases)] == [0] * len(cases)
    assert counts[len(cases):] == claims_rows
    assert hub.accounts.erase(account_id)  # erased: one row of the deletion time
    counts = compare()
    assert counts[:len(cases)] == [0] * len(cases)
    assert counts[len(cases)] == 1
    assert live.rows({"account_id": account_id}) == [] and not hub.accounts.exists(account_id)


def test_a_value_the_column_type_refuses_is_refused_as_sqlalchemy_refuses_it(
        citizen: Any) -> None:
    """UTCDateTime takes no naive time: the bind conversion runs on both paths."""
    hub, account_id = citizen
    params = {"account_id": account_id, "key": account_id, "client_id": "agency-one",
              "now": hub.consent.clock().replace(tzinfo=None)}
    for run in (Prepared(hub.db, _LOGIN).rows,
                lambda p: through_sqlalchemy(hub.db, _LOGIN, p)):
        with pytest.raises(sa_exc.StatementError) as caught:
            run(params)
        assert isinstance(caught.value.orig, ValueError)
        assert "naive datetime" in str(caught.value.orig)


def test_a_driver_error_is_sqlalchemys_and_keeps_its_connection_out_of_the_pool(
        citizen: Any, database_url: str) -> None:
    """The read the server refuses ran on a connection of the straight path's own
    (kernel.db._StraightConnections), never on one of the pool's: its error is SQLAlchemy's,
    its connection is kept for the next read, idle in no transaction, and the pool (whose
    connections are never in autocommit) was not touched."""
    if not database_url.startswith("postgresql"):
        pytest.skip("the straight path is PostgreSQL's")
    hub, account_id = citizen
    db = Database(database_url, pool_size=1)
    try:
        read = Prepared(db, _LOGIN)
        params = {"account_id": "a\x00b", "key": account_id, "client_id": "agency-one",
                  "now": hub.consent.clock()}
        with pytest.raises(sa_exc.DataError) as caught:  # the app answers it with a 400
            read.rows(params)
        assert "NUL (0x00)" in str(caught.value.orig)
        (conn, *_), = db._straight._idle  # the failed read's, given back
        assert conn.autocommit is True and conn.info.transaction_status == 0  # idle
        pool = db.engine.pool
        assert pool.checkedin() == pool.checkedout() == 0  # type: ignore[attr-defined]
        assert read.rows(dict(params, account_id=account_id))  # and the connection works
        assert [c for c, *_ in db._straight._idle] == [conn]  # the same one
        assert pool.checkedin() == pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        db.dispose()


def test_a_connection_the_server_dropped_is_replaced_after_one_error(
        citizen: Any, database_url: str) -> None:
    """As through SQLAlchemy: the read fails once with an OperationalError that says the
    connection was invalidated (the app's 503, test_storage_outage.py), and the next read
    gets a fresh connection."""
    if not database_url.startswith("postgresql"):
        pytest.skip("the straight path is PostgreSQL's")
    hub, account_id = citizen
    read = Prepared(hub.db, _LOGIN)
    params = {"account_id": account_id, "key": account_id, "client_id": "agency-one",
              "now": hub.consent.clock()}
    assert read.rows(params)
    assert terminate_connections(database_url) >= 1
    with pytest.raises(sa_exc.OperationalError) as caught:
        read.rows(params)
    assert caught.value.connection_invalidated
    assert read.rows(params)


def test_a_refresh_rotates_its_grant_through_the_prepared_writes(sql_hub: Any,
                                                                 database_url: str) -> None:
    """The refresh path's read, claim and rotation (kernel.db.Prepared: rowcount) on SQLite
    and on PostgreSQL: the rotation writes what SQLAlchemy reads back (the JSON list of
    ``amr``, the new token's hash), a claim matches once, and a revoked grant takes no
    rotation."""
    from sqlalchemy import select

    from idp.tokens import _GRANTS, GrantEnded, digest
    from tests.test_token_lifecycle import refresh_grant

    refresh_tokens = sql_hub.server.hub.refresh_tokens
    grant = refresh_grant(sql_hub, "prepared")
    first = refresh_tokens.issue(grant_id="prepared-1", **grant)
    used = refresh_tokens.use(first, AGENCY_ONE.client_id)
    assert used is not None and used.grant_id == "prepared-1"
    assert refresh_tokens.use(first, AGENCY_ONE.client_id) is None  # the claim matched once
    second = refresh_tokens.issue(grant_id="prepared-2", **grant)
    assert refresh_tokens.use(second, AGENCY_ONE.client_id) is not None
    rotated = refresh_tokens.issue(grant_id="prepared-2", **dict(grant, amr=("pwd", "otp")),
                                   family_expires_at=used.expires_at)
    with sql_hub.db.reader() as conn:
        row = conn.execute(select(_GRANTS).where(_GRANTS.c.grant_id == "prepared-2")).one()
    assert row.amr == ["pwd", "otp"] and row.token_hash == digest(rotated)
    assert row.rotations == 1
    assert refresh_tokens.find(rotated) is not None
    assert refresh_tokens.revoke_grant("prepared-2")
    with pytest.raises(GrantEnded):
        refresh_tokens.issue(grant_id="prepared-2", **grant, family_expires_at=used.expires_at)


def test_a_statement_sqlalchemy_renders_per_execution_is_refused_at_start_up() -> None:
    """An IN list (expanding) or a literal-execute value is rendered into the SQL by
    SQLAlchemy at each execution: such a statement has no fixed SQL to send."""
    from sqlalchemy import bindparam, select

    from idp.tokens import _GRANTS

    db = Database("postgresql+psycopg://nobody@127.0.0.1:9/none")  # never connected
    try:
        grant_id = _GRANTS.c.grant_id
        for statement in (
                select(grant_id).where(grant_id.in_(bindparam("ids", expanding=True))),
                select(grant_id).limit(bindparam("n", literal_execute=True))):
            with pytest.raises(ValueError, match="expanding"):
                Prepared(db, statement)
        assert Prepared(db, select(grant_id).where(grant_id == bindparam("g"))).direct
    finally:
        db.dispose()


def test_parameters_are_those_construct_params_gives_for_every_hot_statement() -> None:
    """Prepared._values builds exactly the parameters SQLAlchemy's ``construct_params``
    does, bind conversions applied, for each statement the hub prepares; a key missing or
    one too many goes SQLAlchemy's way, its error included."""
    from datetime import datetime, timezone

    from sqlalchemy import bindparam, literal, select

    from consent.decisions import _LATEST
    from idp.tokens import _CLAIM, _GRANT, _GRANTS, _ROTATE

    db = Database("postgresql+psycopg://nobody@127.0.0.1:9/none")  # never connected
    grant_id = _GRANTS.c.grant_id
    computed = select(grant_id).where(grant_id == bindparam("g", callable_=lambda: "now"))
    twice = select(grant_id, literal(7).label("n")).where(
        (grant_id == bindparam("g")) | (grant_id == bindparam("g")))
    # in a zone of its own: UTCDateTime's conversion gives an equal time, but in UTC
    now = datetime(2026, 11, 24, 12, tzinfo=timezone(timedelta(hours=13)))

    def plain(values: dict[str, Any]) -> dict[str, Any]:
        # psycopg's Json wrapper compared by what it wraps, and a time by its zone too: each
        # value with its type, so a conversion left out (a list for a Json, a time still in
        # +13:00) is seen
        return {k: (type(v).__name__, getattr(v, "obj", v), getattr(v, "tzinfo", None))
                for k, v in values.items()}

    sample = {"UTCDateTime": now, "JSON": ["pwd"], "Integer": 5}  # by type; else text
    try:
        statements = [LIVE_ACCOUNT, _LOGIN, _CLAIMS, _GRANT, _CLAIM, _ROTATE, computed, twice,
                      *_LATEST.values()]
        for statement in statements:
            prepared = Prepared(db, statement)
            compiled = prepared._compiled  # noqa: SLF001 - what the fast path stands in for
            params = {bind.key: sample.get(type(bind.type).__name__, "v-" + bind.key)
                      for bind in compiled.bind_names if bind.required}
            keys = set(params)
            expected = compiled.construct_params(params)
            for name, processor in prepared._binds.items():  # noqa: SLF001
                expected[name] = processor(expected[name])
            assert plain(prepared._values(params)) == plain(expected), statement  # noqa: SLF001
            assert plain(prepared._values({**params, "stray": 1})) == plain(expected)  # noqa: SLF001
            for key in keys:
                with pytest.raises(sa_exc.InvalidRequestError, match="value is required"):
                    prepared._values({k: v for k, v in params.items() if k != key})  # noqa: SLF001
        assert Prepared(db, computed)._keys is None  # noqa: SLF001 - computed at execution
        assert Prepared(db, _CLAIMS)._keys == {"account_id", "key", "client_id", "now"}  # noqa: SLF001
    finally:
        db.dispose()


# -- the straight path's own connections (kernel.db._StraightConnections) ------------------

@pytest.fixture
def straight(pg_database_url: str) -> Any:
    """A Database on a fresh PostgreSQL database and a statement that says which server
    process (which connection) ran it."""
    from sqlalchemy import func, select

    db = Database(pg_database_url, pool_size=2)
    backend = Prepared(db, select(func.pg_backend_pid().label("pid")))
    assert backend.direct
    yield db, lambda: backend.rows({})[0].pid
    db.dispose()


def test_straight_statements_reuse_a_connection_of_their_own_in_autocommit(
        straight: Any) -> None:
    db, backend = straight
    first = backend()
    assert [backend() for _ in range(5)] == [first] * 5
    (conn, *_), = db._straight._idle
    assert conn.autocommit is True and conn.info.transaction_status == 0  # idle, no transaction
    pool = db.engine.raw_connection()  # the pool's connections are never in autocommit
    try:
        assert pool.driver_connection.autocommit is False  # type: ignore[union-attr]
        with pool.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            assert cursor.fetchone()[0] != first  # and are not the straight path's
    finally:
        pool.close()
    # a statement the server refuses leaves its connection in use
    with pytest.raises(sa_exc.DataError):
        db.send("SELECT %(v)s::text", {"v": "a\x00b"})
    assert backend() == first


def test_straight_connections_lost_are_all_replaced_after_one_error(
        straight: Any, pg_database_url: str, monkeypatch: Any) -> None:
    import threading

    import kernel.db

    db, backend = straight
    # two connections idle: two threads held one each at the same time
    both = threading.Barrier(2)

    def hold() -> None:
        conn, opened, generation = db._straight.take()
        both.wait(timeout=10)
        db._straight.give_back(conn, opened, generation)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(db._straight._idle) == 2
    before = backend()
    assert terminate_connections(pg_database_url) >= 2
    with pytest.raises(sa_exc.OperationalError) as caught:
        backend()
    assert caught.value.connection_invalidated
    assert db._straight._idle == []  # the other lost one is closed too, not tried next
    after = backend()
    assert after != before and backend() == after

    # idle longer than PING_AFTER_IDLE_SECONDS: checked first, so a lost one costs no error
    monkeypatch.setattr(kernel.db, "PING_AFTER_IDLE_SECONDS", 0.0)
    assert terminate_connections(pg_database_url) >= 1
    assert backend() not in (before, after)

    # older than RECYCLE_SECONDS: closed, not handed out, so the count on the server stays
    monkeypatch.setattr(kernel.db, "RECYCLE_SECONDS", 0.0)
    seen = {backend() for _ in range(4)}
    assert len(seen) == 4
    assert terminate_connections(pg_database_url) <= 1  # only the last one is still open


def test_straight_connections_kept_idle_are_bounded(straight: Any,
                                                    pg_database_url: str) -> None:
    db, backend = straight  # pool_size=2: at most two kept idle
    taken = [db._straight.take() for _ in range(5)]
    for conn, opened, generation in taken:
        db._straight.give_back(conn, opened, generation)
    assert len(db._straight._idle) == 2
    assert sum(conn.closed for conn, *_ in taken) == 3
    assert terminate_connections(pg_database_url) == 2


def test_straight_connections_in_a_forked_child_are_its_own(straight: Any) -> None:
    """A child forked after the parent used its connections (gunicorn's master,
    preloading) opens its own, and leaves the parent's open and in working order."""
    db, backend = straight
    parent = backend()

    def child() -> bool:
        mine = backend()
        return bool(mine != parent and backend() == mine)

    assert in_forked_child(child)
    assert backend() == parent
