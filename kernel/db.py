"""SQL plumbing: the declarative base shared by every package's tables, and the engine."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, MetaData, TypeDecorator, create_engine, event
from sqlalchemy import exc as exc_mod
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


#: a pooled connection idle for longer than this is pinged before it is handed out
PING_AFTER_IDLE_SECONDS = 10.0


class Database:
    """An engine and its session factory.

    PostgreSQL connections are pooled (``pool_size`` kept open, as many again on bursts) and
    checked with a round trip only when they sat idle for ``PING_AFTER_IDLE_SECONDS``: a
    ping on every checkout (``pool_pre_ping``) cost one extra round trip per unit of work on
    the hot paths. A connection that died while in use is noticed by its first statement;
    SQLAlchemy then drops the whole pool, and the request gets the 503 page of the root."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        kwargs: dict[str, Any] = {"pool_size": pool_size, "max_overflow": pool_size,
                                  "pool_recycle": 1800}
        if url.startswith("sqlite"):
            kwargs = {"connect_args": {"check_same_thread": False, "timeout": 15}}
        self.url = url
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            event.listen(self.engine, "checkin", _note_checkin)
            event.listen(self.engine, "checkout", _ping_if_idle)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits on success, rolls back on any error."""
        with self._factory() as session, session.begin():
            yield session

    @contextmanager
    def reader(self) -> Iterator[Connection]:
        """A connection for reads that need no transaction of their own (each statement sees
        what is committed when it runs): no BEGIN and ROLLBACK round trips around them."""
        with self.engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    def dispose(self) -> None:
        self.engine.dispose()


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info["checked_in_at"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Pessimistic disconnect handling for connections that sat in the pool: a dead one
    raises DisconnectionError, and the pool replaces it with a fresh connection."""
    since = record.info.get("checked_in_at")
    if since is None or time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
        return
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        dbapi_connection.rollback()
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use this connection
        raise exc_mod.DisconnectionError(f"stale pooled connection: {exc}") from exc


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=15000")
    cursor.close()


@contextmanager
def startup_lock(engine: Engine, key: int = 0x43495649) -> Iterator[None]:
    """Serialise start-up work (migrations, first keys, settings sync) across processes and
    hosts that start together. PostgreSQL: a session advisory lock; SQLite: one process."""
    if engine.dialect.name != "postgresql":
        yield
        return
    from sqlalchemy import text

    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
