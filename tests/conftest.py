"""Shared fixtures: real servers (upstream OP, Redis, PostgreSQL) and the hub built from a
config mapping. Servers start once per session, on 127.0.0.1 only, and stop at the end."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.fernet import Fernet

from civitas.app import build_hub, create_app, stop_background
from config import settings_from_mapping
from tests import servers
from tests.flows import AGENCY_ONE, AGENCY_TWO, UPSTREAM_CLIENT_ID, UPSTREAM_SECRET

HUB_PORT = servers.free_port()
HUB_ISSUER = f"http://127.0.0.1:{HUB_PORT}"


@pytest.fixture(scope="session")
def upstream_issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The third-party OpenID provider (npm oidc-provider) the citizen logs in with."""
    clients = [{
        "client_id": UPSTREAM_CLIENT_ID,
        "client_secret": UPSTREAM_SECRET,
        "redirect_uris": [f"{HUB_ISSUER}/login/{uid}/callback"
                          for uid in ("op", "op-es", "op-proxy", "op-wrong")],
        # auth_time in every ID token (OpenID Connect Registration 2), as the README asks
        # of an upstream: the hub passes it on
        "require_auth_time": True,
    }]
    with servers.run_upstream_op(tmp_path_factory.mktemp("op"), clients) as issuer:
        yield issuer


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with servers.run_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with servers.run_postgres(tmp_path_factory.mktemp("pg")) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A fresh, empty database on SQLite and on the real PostgreSQL: tests that take it run
    on both (the storage conformance rule)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/conformance.db"
        return
    with fresh_pg_database(request.getfixturevalue("postgres_url")) as url:
        yield url


@pytest.fixture
def pg_database_url(postgres_url: str) -> Iterator[str]:
    """A fresh, empty database on the real PostgreSQL only."""
    with fresh_pg_database(postgres_url) as url:
        yield url


@contextlib.contextmanager
def fresh_pg_database(base: str, prefix: str = "t_") -> Iterator[str]:
    """A new database on the server of ``base`` (a URL), dropped afterwards."""
    from sqlalchemy import create_engine, text

    name = prefix + secrets.token_hex(6)
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        try:
            drop_database(admin, name)
        finally:
            admin.dispose()


def drop_database(admin: Any, name: str, attempts: int = 40) -> None:
    """DROP DATABASE ... WITH (FORCE) ends the test's own connections, but not an autovacuum
    worker's (a superuser's process: "must be a member of the role whose process is being
    terminated", SQLSTATE 42501) which the hub's writes may have brought in; such a worker
    is done within moments, so try again for up to 10 s."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    for attempt in range(attempts):
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except DBAPIError as exc:
            state = getattr(exc.orig, "sqlstate", None)
            if state not in ("42501", "55006") or attempt == attempts - 1:
                raise
            time.sleep(0.25)


def in_forked_child(check: Callable[[], bool]) -> bool:
    """Run ``check`` in a child forked from this process (as gunicorn forks its workers)
    and say what it returned; the child leaves without running the parent's cleanup, and an
    exception in it counts as False."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = bool(check())
        finally:
            os.write(write_end, b"1" if ok else b"0")
            os._exit(0)
    os.close(write_end)
    try:
        _, status = os.waitpid(pid, 0)
        return os.read(read_end, 1) == b"1" and status == 0
    finally:
        os.close(read_end)


def hub_config(upstream_issuer: str, database_url: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "issuer": HUB_ISSUER,
        "database_url": database_url,
        "encryption_key": Fernet.generate_key().decode(),
        "pairwise_secret": secrets.token_urlsafe(32),
        "upstreams": [{
            "kind": "oidc", "id": "op", "display_name": "Example ID",
            "issuer": upstream_issuer, "client_id": UPSTREAM_CLIENT_ID,
            "client_secret": UPSTREAM_SECRET, "acr": "urn:civitas:acr:ial1:aal1",
        }],
        "agencies": [AGENCY_ONE.config(), AGENCY_TWO.config()],
        "ledger_seal_interval_seconds": 0,  # tests seal on demand
    }
    config.update(overrides)
    return config


LOW_ACR, HIGH_ACR = "urn:civitas:acr:ial1:aal1", "urn:civitas:acr:ial2:aal2"


def bank_id_upstream(upstream_issuer: str) -> dict[str, Any]:
    """A second upstream ('op-es', "Bank ID", high assurance) at the same real OP: to the hub
    a different credential, as a state ID and a bank ID would be."""
    return {"kind": "oidc", "id": "op-es", "display_name": "Bank ID", "issuer": upstream_issuer,
            "client_id": UPSTREAM_CLIENT_ID, "client_secret": UPSTREAM_SECRET, "acr": HIGH_ACR}


@pytest.fixture
def sql_hub(upstream_issuer: str, database_url: str) -> Iterator[Any]:
    """A hub (its services) on each database of ``database_url``: SQLite and PostgreSQL."""
    app = create_app(hub_config(upstream_issuer, database_url))
    yield app.extensions["civitas"]
    stop_background(app)
    app.extensions["civitas"].db.dispose()


@pytest.fixture
def config(upstream_issuer: str, tmp_path: Any) -> dict[str, Any]:
    return hub_config(upstream_issuer, f"sqlite:///{tmp_path}/civitas.db")


@pytest.fixture
def app(config: dict[str, Any]) -> Any:
    app = create_app(config)
    yield app
    stop_background(app)
    app.extensions["civitas"].db.dispose()


@pytest.fixture
def hub(app: Any) -> Any:
    return app.extensions["civitas"]


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def make_hub(upstream_issuer: str, tmp_path: Any) -> Iterator[Any]:
    """Build extra hubs (e.g. on PostgreSQL or Redis) that are disposed afterwards."""
    made: list[Any] = []

    def make(**overrides: Any) -> Any:
        cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/hub{len(made)}.db",
                         **overrides)
        app = create_app(cfg)
        made.append(app)
        return app

    yield make
    for app in made:
        stop_background(app)  # a short schedule (housekeeping) must not run into later tests
        app.extensions["civitas"].db.dispose()


__all__ = ["build_hub", "settings_from_mapping", "HUB_ISSUER"]
