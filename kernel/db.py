"""SQL plumbing: the declarative base shared by every package's tables, and the engine."""

from __future__ import annotations

import time
from collections import namedtuple
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import DateTime, MetaData, TypeDecorator, create_engine, event
from sqlalchemy import exc as exc_mod
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import NullPool

from . import forks

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
#: a connection older than this is closed rather than handed out (SQLAlchemy's pool_recycle)
RECYCLE_SECONDS = 1800
#: how long opening a PostgreSQL connection may take (libpq ``connect_timeout``) unless the
#: database URL says: a server that accepts the connection and never answers (stopped, a
#: half-open network path) would otherwise hold the request, and /readyz, for good
CONNECT_TIMEOUT_SECONDS = 10
#: how an open connection finds that the server's host or the path to it is gone (the host
#: lost power, a failover moved its address, a firewall forgot the connection), which nothing
#: tells the hub: TCP keepalive probes after ``keepalives_idle`` seconds without data, one
#: every ``keepalives_interval``, ``keepalives_count`` unanswered ones close it; data sent
#: and not acknowledged for ``tcp_user_timeout`` ms closes it too (Linux, RFC 5482). Without
#: them a statement waits on such a connection for the kernel's retransmissions (about 15
#: minutes) or, waiting for an answer with nothing to send, for good, and so does its
#: request: gunicorn's worker timeout watches the worker's main thread, not its requests.
#: A live server answers the probes, however long a statement runs. Each is left to the
#: database URL where it names it.
TCP_DEADLINES: dict[str, int] = {"keepalives": 1, "keepalives_idle": 10,
                                 "keepalives_interval": 5, "keepalives_count": 3,
                                 "tcp_user_timeout": 25_000}


def database_unreachable(error: BaseException) -> bool:
    """A lost or refused connection to the database (answered 503: try again), not a bug in
    a statement."""
    if isinstance(error, exc_mod.DBAPIError):
        return bool(error.connection_invalidated) or isinstance(
            error, exc_mod.OperationalError | exc_mod.InterfaceError)
    return isinstance(error, exc_mod.DisconnectionError | exc_mod.TimeoutError)


def _connect_args(url: str) -> dict[str, Any]:
    """The driver's connection options for ``url`` that the URL does not give itself."""
    if url.startswith("sqlite"):
        return {"check_same_thread": False, "timeout": 15}
    named = parse_qs(urlsplit(url).query)
    given = {"connect_timeout": CONNECT_TIMEOUT_SECONDS, **TCP_DEADLINES}
    return {name: value for name, value in given.items() if name not in named}


class _StraightConnections:
    """The psycopg connections of :meth:`Database._on_driver`, in autocommit for good and
    held in a list (each taken by one thread at a time), beside SQLAlchemy's pool.

    Through the pool, each statement paid a checkout and a checkin (the pool's queue and
    locks, its events, a rollback on return) and two autocommit switches: 5% of a login's
    CPU (``bench/app_cpu.py``). A connection here is never in a transaction, so none can be
    handed in autocommit to code that opens one. Kept from the pool: a connection idle for
    ``PING_AFTER_IDLE_SECONDS`` is pinged before use, one older than ``RECYCLE_SECONDS`` is
    closed; a lost connection (the server restarted or dropped it) closes every connection
    of its generation, here and in the pool, so the next statement opens a fresh one; one
    that failed in any other way than an error from the server, or is left in a
    transaction, is closed, never reused. A forked child opens its own (psycopg closes a
    connection only in the process that opened it, so the parent's are left alone). At
    most ``keep`` idle connections are kept; the others are closed as they come back."""

    def __init__(self, url: str, keep: int) -> None:
        self._url = url
        #: opens each connection with the dialect's connect events (an engine without a
        #: pool: taking the pool's connections would leave it empty, and then a request
        #: after an outage would not see the outage that the pool's own users see)
        self._opener: Engine | None = None
        self._keep = keep
        #: (connection, opened at, last used at, generation), all ``time.monotonic()``
        self._idle: list[tuple[Any, float, float, int]] = []
        self._generation = 0
        self._forks = forks.count()

    def take(self) -> tuple[Any, float, int]:
        """(a connection in autocommit, when it was opened, its generation)."""
        if self._forks != forks.count():  # a forked child: not the parent's connections
            self._idle, self._forks = [], forks.count()
        now = time.monotonic()
        conn: Any
        while True:
            try:
                conn, opened, used, generation = self._idle.pop()
            except IndexError:
                break
            if (generation != self._generation or conn.closed
                    or now - opened > RECYCLE_SECONDS):
                _close_quietly(conn)
                continue
            if now - used >= PING_AFTER_IDLE_SECONDS:
                try:
                    conn.execute("SELECT 1")
                except Exception:  # noqa: BLE001 - any failure: this connection is not used
                    _close_quietly(conn)
                    continue
            return conn, opened, generation
        generation = self._generation
        if self._opener is None:
            self._opener = create_engine(self._url, poolclass=NullPool,
                                         connect_args=_connect_args(self._url))
        dbapi = self._opener.dialect.loaded_dbapi
        try:
            # Engine.raw_connection() hands the driver's own error up unwrapped (only a
            # Connection wraps it): wrap it as the pool's users see it, so that a server
            # that refuses connections is "unavailable" (503), not an unexpected error
            raw = self._opener.raw_connection()
        except dbapi.Error as exc:
            raise exc_mod.DBAPIError.instance(None, None, exc, dbapi.Error,
                                              dialect=self._opener.dialect) from exc
        conn = raw.driver_connection
        raw.detach()  # closed by this class, not by the opener
        try:
            conn.autocommit = True
        except BaseException:
            _close_quietly(conn)
            raise
        return conn, now, generation

    def give_back(self, conn: Any, opened: float, generation: int) -> None:
        if (generation == self._generation and self._forks == forks.count() and not conn.closed
                and conn.info.transaction_status == _IDLE
                and len(self._idle) < self._keep):
            self._idle.append((conn, opened, time.monotonic(), generation))
        else:
            _close_quietly(conn)

    def close_all(self) -> None:
        """Every connection of this generation is done with: idle ones are closed now,
        ones in use as they come back."""
        self._generation += 1
        idle, self._idle = self._idle, []
        if self._forks == forks.count():
            for conn, *_ in idle:
                _close_quietly(conn)
        if self._opener is not None:
            self._opener.dispose()


#: psycopg's TransactionStatus.IDLE: a connection between statements, in no transaction
_IDLE = 0


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001,S110 - a connection that cannot even close is gone anyway
        pass


class Database:
    """An engine and its session factory.

    PostgreSQL connections are pooled (``pool_size`` kept open, as many again on bursts) and
    checked with a round trip only when they sat idle for ``PING_AFTER_IDLE_SECONDS``: a
    ping on every checkout (``pool_pre_ping``) cost one extra round trip per unit of work on
    the hot paths. A connection that died while in use is noticed by its first statement;
    SQLAlchemy then drops the whole pool, and the request gets the 503 page of the root.
    The single statements of :meth:`send` and :class:`Prepared` have connections of their
    own beside the pool (:class:`_StraightConnections`, up to ``pool_size`` kept idle), held
    to the same rules."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        kwargs: dict[str, Any] = {"pool_size": pool_size, "max_overflow": pool_size,
                                  "pool_recycle": RECYCLE_SECONDS,
                                  "connect_args": _connect_args(url)}
        if url.startswith("sqlite"):
            kwargs = {"connect_args": _connect_args(url)}
        self.url = url
        self.engine: Engine = create_engine(url, **kwargs)
        self._straight = _StraightConnections(url, keep=pool_size)
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

    @property
    def driver_direct(self) -> bool:
        """Whether :meth:`send` and :class:`Prepared` go straight to the driver: PostgreSQL
        through psycopg."""
        dialect = self.engine.dialect
        return dialect.name == "postgresql" and dialect.driver == "psycopg"

    def send(self, sql: str, params: dict[str, Any]) -> int:
        """One statement in the driver's own SQL (``%(name)s`` parameters), atomic on its own
        outside a transaction, as :meth:`reader` runs it; its rowcount. Straight on a pooled
        psycopg connection where :attr:`driver_direct`, else through SQLAlchemy."""
        if not self.driver_direct:
            with self.reader() as conn:
                return int(conn.exec_driver_sql(sql, params).rowcount)
        return self._on_driver(sql, params, fetch=False)[2]

    def _on_driver(self, sql: str, values: dict[str, Any], *, fetch: bool,
                   describe: bool = False) -> tuple[list[Any], Any, int]:
        """(rows, description, rowcount) of one statement sent in autocommit on a psycopg
        connection of the straight path's own (:class:`_StraightConnections`); the
        description only when ``describe`` (psycopg builds it afresh, a Column object per
        column, at each call: 3% of a login's CPU when it was read on every statement).
        Driver errors come out as SQLAlchemy's (``DBAPIError.instance``, which the app
        answers as it answers them from SQLAlchemy); a connection found lost closes every
        connection of its generation, the pool's too, as SQLAlchemy does."""
        dialect = self.engine.dialect
        dbapi = dialect.loaded_dbapi
        conn, opened, generation = self._straight.take()
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql, values)
                rows = cursor.fetchall() if fetch else []
                description = cursor.description if describe else None
                rowcount = cursor.rowcount
        except dbapi.Error as exc:
            lost = dialect.is_disconnect(exc, conn, None)
            if lost:
                self._straight.close_all()
                self.engine.dispose(close=False)
            self._straight.give_back(conn, opened, generation)
            raise exc_mod.DBAPIError.instance(sql, values, exc, dbapi.Error,
                                              connection_invalidated=lost,
                                              dialect=dialect) from exc
        except BaseException:
            _close_quietly(conn)  # stopped half-way (a signal, a bug): its state is unknown
            raise
        self._straight.give_back(conn, opened, generation)
        return rows, description, rowcount

    def dispose(self) -> None:
        self._straight.close_all()
        self.engine.dispose()


class Prepared:
    """A statement whose shape is fixed at start-up, run many times on a hot path, each run
    atomic on its own outside a transaction (as in :meth:`Database.reader`): ``rows(params)``
    for a SELECT (rows that read like SQLAlchemy's: ``row.name``, ``row._mapping``),
    ``rowcount(params)`` for an INSERT, UPDATE or DELETE.

    On PostgreSQL through psycopg the statement is compiled once here and sent straight on
    a driver connection in autocommit (:meth:`Database.send`), with the bind and
    result conversions SQLAlchemy's execution would apply, each taken from the column's type
    for the dialect (``dialect_impl``). That leaves out SQLAlchemy's work per execution (an
    execution context, the compiled-cache lookup, result metadata, event dispatch): 100-150
    µs of CPU per statement, a sixth of a login (``bench/app_cpu.py``, bench/README.md).
    Elsewhere (SQLite, in one process) the statement goes through :meth:`Database.reader`
    and SQLAlchemy. ``tests/test_prepared.py`` holds both ways to the same rows, value for
    value and type for type, and to the same errors."""

    def __init__(self, db: Database, statement: Any) -> None:
        self._db = db
        self._statement = statement
        dialect = db.engine.dialect
        self._dialect = dialect
        columns = list(getattr(statement, "selected_columns", ()))
        self._types = [column.type.dialect_impl(dialect) for column in columns]
        self._row: Any = None
        if columns:
            self._row = namedtuple("PreparedRow", [column.key for column in columns])  # type: ignore[misc]  # noqa: PYI024
            self._row._mapping = property(lambda row: row._asdict())
        self._direct = db.driver_direct
        self._results: list[Any] | None = None
        if self._direct:
            compiled = statement.compile(dialect=dialect)
            self._compiled = compiled
            self._sql = str(compiled)
            if "POSTCOMPILE" in self._sql or any(bind.expanding
                                                 for bind in compiled.binds.values()):
                # rendered per execution by SQLAlchemy: not a statement fixed at start-up
                raise ValueError("Prepared takes no expanding (IN) or literal-execute "
                                 "parameters")
            self._binds = {compiled.bind_names[bind]: processor
                           for bind in compiled.binds.values()
                           if (processor := bind.type.dialect_impl(dialect)
                               .bind_processor(dialect)) is not None}
            self._given, self._fixed, self._keys = _bind_plan(compiled)

    @property
    def direct(self) -> bool:
        """Whether this statement goes straight to the driver (PostgreSQL through psycopg)."""
        return self._direct

    def rows(self, params: dict[str, Any]) -> list[Any]:
        if self._row is None:
            raise TypeError("rows() of a statement that selects nothing; use rowcount()")
        if not self._direct:
            with self._db.reader() as conn:
                return [self._row(*row) for row in conn.execute(self._statement, params)]
        rows, description, _ = self._db._on_driver(self._sql, self._values(params), fetch=True,
                                                   describe=self._results is None)
        if self._results is None:  # the first run: the columns' conversions, once
            if len(description) != len(self._types):
                raise RuntimeError(f"{len(description)} columns came back, "
                                   f"not {len(self._types)}")
            self._results = [
                (index, processor) for index, (kind, column)
                in enumerate(zip(self._types, description, strict=True))
                if (processor := kind.result_processor(self._dialect, column.type_code))
                is not None]
        convert = self._results  # only the columns that have a conversion are visited
        if not convert:
            return [self._row(*row) for row in rows]
        converted = []
        for row in rows:
            values = list(row)
            for index, processor in convert:
                values[index] = processor(values[index])
            converted.append(self._row._make(values))
        return converted

    def rowcount(self, params: dict[str, Any]) -> int:
        if not self._direct:
            with self._db.reader() as conn:
                return int(conn.execute(self._statement, params).rowcount)
        return self._db._on_driver(self._sql, self._values(params), fetch=False)[2]

    def _values(self, params: dict[str, Any]) -> dict[str, Any]:
        values: dict[str, Any]
        if self._keys is not None and params.keys() == self._keys:
            # what construct_params gives for exactly the statement's parameters, without
            # its walk over every bind (1% of a login's CPU): each from ``params`` by its key,
            # the statement's own values (a LIMIT) as compiled
            values = {name: params[key] for name, key in self._given}
            values.update(self._fixed)
        else:  # anything else (a missing or an extra key) as SQLAlchemy has it, errors too
            values = self._compiled.construct_params(params)
        try:
            for name, processor in self._binds.items():
                values[name] = processor(values[name])
        except Exception as exc:  # as SQLAlchemy reports a value its column type refuses
            raise exc_mod.StatementError(str(exc), self._sql, values, exc) from exc
        return values


def _bind_plan(compiled: Any) -> tuple[list[tuple[str, str]], dict[str, Any],
                                       frozenset[str] | None]:
    """How :meth:`Prepared._values` builds a statement's parameters without
    ``construct_params``: (the names given by the caller with the key each is given by, the
    names with a value of the statement's own, the caller's keys). The keys are None when
    the statement has binds that only ``construct_params`` gets right: escaped names,
    values computed at execution (``callable``), or a name with two sources."""
    given: dict[str, str] = {}
    fixed: dict[str, Any] = {}
    plain = not compiled.escaped_bind_names
    for bind, name in compiled.bind_names.items():  # a name used twice has a bind each
        if bind.callable is not None:
            plain = False
        elif bind.required:
            plain = plain and given.setdefault(name, bind.key) == bind.key
        else:
            plain = plain and fixed.setdefault(name, bind.value) is bind.value
    if given.keys() & fixed.keys():
        plain = False
    return list(given.items()), fixed, frozenset(given.values()) if plain else None


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
