"""Several worker processes under gunicorn; each builds its own app after the fork, so no
database connection or lock crosses a process boundary."""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger
from gunicorn.http.unreader import Unreader
from gunicorn.workers.gthread import TConn, ThreadWorker

from .inline_worker import InlineWorker, accept_connection

#: a worker that cannot reach its storage as it starts waits this long, then leaves with
#: this status (gunicorn halts the whole server at 3, a boot error, or 4; at any other
#: status it starts the worker again)
WORKER_RETRY_SECONDS = 5
WORKER_RETRY_STATUS = 1


class HubApplication(BaseApplication):  # type: ignore[misc]
    def __init__(self, config_path: str | None, options: dict[str, Any]) -> None:
        self.config_path = config_path
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)
        # gunicorn 25.1+ opens a control socket ($XDG_RUNTIME_DIR or ~/.gunicorn/gunicorn.ctl)
        # through which the same user can resize or stop the server. The hub does not use it,
        # it writes under a home directory (which a read-only container does not have: an
        # error line at every start) and it is one more way in: off.
        if "control_socket_disable" in self.cfg.settings:
            self.cfg.set("control_socket_disable", True)

    def load(self) -> Any:
        from config import load_settings

        from .app import _is_unavailable, create_app, freeze_heap

        # `civitas serve` brought the schema up to date before starting gunicorn
        # (upgrade_schema), so the workers neither migrate nor import Alembic
        try:
            app = create_app(load_settings(self.config_path), migrate=False,
                             threads=self.cfg.threads)
        except Exception as exc:
            if not _is_unavailable(exc):
                raise
            # A worker started while the database or Redis is down (in place of one that
            # died, or at a reload). Failing to boot would make gunicorn stop the master
            # and every other worker, which serve on and recover by themselves: leave
            # with another status instead, after a pause, and the master starts it again.
            import logging

            said = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            logging.getLogger("civitas").error(
                "worker %d cannot start: storage unavailable: %s: %s; it is started "
                "again in %d s", os.getpid(), type(exc).__name__, said, WORKER_RETRY_SECONDS)
            time.sleep(WORKER_RETRY_SECONDS)
            sys.exit(WORKER_RETRY_STATUS)
        freeze_heap()
        return app


class _Slot(ctypes.Structure):
    _fields_ = [("conns", ctypes.c_long), ("seen", ctypes.c_double)]


class ConnectionBoard:
    """How many connections each worker holds, in memory the master maps before it forks
    (so every worker shares it), for :class:`BalancedWorker`. The master gives each worker a
    slot as it forks it and clears the slot when the worker exits; a worker writes only its
    own slot. ``seen`` is when the worker's loop last ran (``time.monotonic()``, one clock
    for every process of the machine): a slot not seen for ``STALE`` seconds is a worker
    that is stopping, hung or not yet started, and is left out."""

    SLOTS = 256
    STALE = 2.0

    def __init__(self) -> None:
        size = ctypes.sizeof(ctypes.c_long) + ctypes.sizeof(_Slot) * self.SLOTS
        self._map = mmap.mmap(-1, size)  # anonymous and shared: forked workers see it
        #: one past the highest slot ever given out: what a worker looks through
        self._top = ctypes.c_long.from_buffer(self._map)
        self.slots = (_Slot * self.SLOTS).from_buffer(self._map, ctypes.sizeof(ctypes.c_long))

    def assign(self, taken: set[int]) -> int | None:
        for index in range(self.SLOTS):
            if index not in taken:
                self.clear(index)
                self._top.value = max(self._top.value, index + 1)
                return index
        return None

    def clear(self, index: int) -> None:
        self.slots[index].conns, self.slots[index].seen = 0, 0.0

    def publish(self, index: int, conns: int, now: float) -> None:
        self.slots[index].conns, self.slots[index].seen = conns, now

    def fewest_elsewhere(self, index: int, now: float) -> int | None:
        """The fewest connections any other live worker holds (None: no other)."""
        fewest = None
        slots = self.slots
        for other in range(self._top.value):
            slot = slots[other]
            if other != index and now - slot.seen < self.STALE and (
                    fewest is None or slot.conns < fewest):
                fewest = slot.conns
        return fewest


#: made by the master at its first fork (:func:`assign_board_slot`), inherited by workers
_BOARD: ConnectionBoard | None = None


def assign_board_slot(server: Any, worker: Any) -> None:
    """gunicorn's ``pre_fork`` hook, in the master: the worker about to be forked gets a
    slot no live worker holds."""
    global _BOARD  # noqa: PLW0603 (one board per master, made where it forks)
    if _BOARD is None:
        _BOARD = ConnectionBoard()
    taken = {getattr(w, "board_slot", None) for w in server.WORKERS.values()}
    worker.board_slot = _BOARD.assign({index for index in taken if index is not None})


def clear_board_slot(_server: Any, worker: Any) -> None:
    """gunicorn's ``child_exit`` hook, in the master: a dead worker holds no connections."""
    index = getattr(worker, "board_slot", None)
    if _BOARD is not None and index is not None:
        _BOARD.clear(index)


class WaitForDataWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, except that a new connection waits in the worker's poller
    until its first bytes arrive, as a kept-alive one does, instead of in one of the
    worker's threads. gunicorn 25+ hands each new connection to a thread, which waits up to
    5 s for data: connections opened ahead of use (a browser's preconnect, a proxy's or load
    generator's pool) took every thread while requests on other connections queued (the
    decision bench with 64 paced connections: p99 95 ms, max 223 ms). A connection that
    sends nothing within ``keepalive`` seconds is closed, like an idle kept-alive one."""

    def accept(self, listener: Any) -> None:
        accepted = accept_connection(listener)
        if accepted is None:
            return
        client_sock, client_addr = accepted
        self.nr_conns += 1
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        conn.timeout = time.monotonic() + self.cfg.keepalive
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             partial(self.on_pending_socket_readable, conn))


class _Balanced:
    """The rule for new connections that :class:`BalancedWorker` explains, on the board:
    this worker's count published, and whether it holds no more than any other."""

    nr_conns: int

    def _publish(self) -> tuple[ConnectionBoard, int, float] | None:
        """Write this worker's count on the board: (board, its slot, now), or None when
        there is no board (a single worker, more workers than slots)."""
        index = getattr(self, "board_slot", None)
        if _BOARD is None or index is None:
            return None
        now = time.monotonic()
        _BOARD.publish(index, self.nr_conns, now)
        return _BOARD, index, now

    def _my_turn(self) -> bool:
        published = self._publish()
        if published is None:
            return True
        board, index, now = published
        fewest = board.fewest_elsewhere(index, now)
        return fewest is None or self.nr_conns <= fewest

    def _leave_board(self) -> None:
        """Stopping: the others must not wait for this worker."""
        index = getattr(self, "board_slot", None)
        if _BOARD is not None and index is not None:
            _BOARD.clear(index)


class BalancedWorker(_Balanced, WaitForDataWorker):
    """Workers share one listening socket, and a worker accepts a new connection only while
    it holds no more connections than every other worker (least connections, as a load
    balancer would do it): new connections go to whichever worker holds fewest, so a
    proxy's pool of kept-alive connections ends up spread evenly.

    Why not the alternatives: with one shared socket and no rule, the first worker to wake
    takes the new connections, and a proxy's pool of kept-alive connections could all sit in
    one worker while the other idles (half the throughput, bench/README.md); with one
    SO_REUSEPORT socket per worker the kernel spreads connections by a hash of their
    addresses, which for a few long-lived connections is seldom even (8 connections on 2
    workers: 4/4 in 27% of cases; a worker at 0.85 of a core and one at 0.27, p99 63 ms under
    the decision bench), and connections waiting in a worker's own accept queue are reset
    when that worker exits. A worker that is not to accept leaves the socket out of its
    poller and looks again every ``RECHECK`` seconds; a worker whose loop has not run for
    ``ConnectionBoard.STALE`` seconds (stopping, hung, not yet started) does not count, so
    a stuck worker cannot stop the others from accepting."""

    RECHECK = 0.02

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled and self.alive and self._my_turn())

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self.alive:
            self.set_accept_enabled(self.nr_conns < self.worker_connections)
            if not self._accepting:
                timeout = min(timeout, self.RECHECK)
        else:
            self._leave_board()
        super().wait_for_and_dispatch_events(timeout)

    def accept(self, listener: Any) -> None:
        # the board may have changed since the poller said the socket was readable
        if not self._my_turn():
            super().set_accept_enabled(False)
            return
        super().accept(listener)
        self._publish()


class BalancedInlineWorker(_Balanced, InlineWorker):
    """:class:`~civitas.inline_worker.InlineWorker` (the hub's worker where the system has
    epoll) with :class:`BalancedWorker`'s rule for new connections."""

    def accepting_now(self) -> bool:
        if not self.alive:
            self._leave_board()
            return False
        return bool(super().accepting_now()) and self._my_turn()

    def accepted(self) -> None:
        self._publish()


#: set to ``gthread`` to serve with gunicorn's thread-pool worker (:class:`BalancedWorker`)
#: instead of :class:`BalancedInlineWorker`
WORKER_ENV = "CIVITAS_WORKER"
#: the values ``CIVITAS_WORKER`` may take (empty: the default)
WORKER_CHOICES = ("", "inline", "gthread")


class UnknownWorker(ValueError):
    """``CIVITAS_WORKER`` names no worker the hub has."""


def worker_class() -> str:
    """:class:`BalancedInlineWorker` where the system has epoll (Linux), unless
    ``CIVITAS_WORKER=gthread``: 1.09-1.23x the requests per second of gunicorn's gthread
    worker on the same CPU (bench/README.md, sixteenth session). Else
    :class:`BalancedWorker` where gunicorn's gthread worker has the pending-connection
    handling it builds on (gunicorn 25+), else gthread itself. Raises
    :class:`UnknownWorker` for any other value of ``CIVITAS_WORKER``."""
    chosen = os.environ.get(WORKER_ENV, "")
    if chosen not in WORKER_CHOICES:
        raise UnknownWorker(f"{WORKER_ENV}={chosen!r} names no worker; use one of "
                            + ", ".join(repr(c) for c in WORKER_CHOICES if c)
                            + ", or leave it unset")
    inline_needs = ("handle_request", "_keepalive_after")  # InlineWorker takes gthread's
    if (chosen != "gthread" and hasattr(select, "epoll")
            and all(hasattr(ThreadWorker, name) for name in inline_needs)
            # and hands a request's head, read in the poller, to the parser's unreader
            and all(hasattr(Unreader, name) for name in ("unread", "take_buffered"))):
        return f"{__name__}.BalancedInlineWorker"
    if all(hasattr(ThreadWorker, name) for name in (
            "on_pending_socket_readable", "murder_pending", "enqueue_req",
            "set_accept_enabled", "wait_for_and_dispatch_events")):
        return f"{__name__}.BalancedWorker"
    return "gthread"


class JSONLogger(Logger):  # type: ignore[misc]
    """gunicorn's own lines (start, workers booting, a worker that timed out or died) as one
    JSON object per line, like the hub's, so that a log pipeline can parse every line."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        from .observability import JSONFormatter

        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(JSONFormatter())


#: how long a worker keeps an idle connection open (gunicorn's default, said here so that a
#: proxy in front can be set to close its idle connections first: deploy/nginx.conf)
KEEPALIVE_SECONDS = 2

#: glibc mallopt parameter: how many malloc arenas threads may spread over
_M_ARENA_MAX = -8


def cache_http_date() -> None:
    """gunicorn formats every response's Date header afresh (``email.utils.formatdate``,
    2.5% of a worker's CPU under the SSO bench); it changes once a second, so it is formatted
    once a second. The header has a resolution of one second (RFC 9110 5.6.7), so the text
    is the same."""
    from gunicorn import util

    if getattr(util.http_date, "civitas_cached", False):
        return
    formatted = util.http_date
    last: tuple[int, str] = (-1, "")

    def http_date(timestamp: float | None = None) -> str:
        nonlocal last
        if timestamp is not None:
            return str(formatted(timestamp))
        second = int(time.time())
        seen = last  # (one read: another thread may replace it meanwhile)
        if seen[0] != second:
            seen = last = (second, str(formatted(second)))
        return seen[1]

    http_date.civitas_cached = True  # type: ignore[attr-defined]
    util.http_date = http_date


def after_fork(server: Any = None, worker: Any = None) -> None:
    """gunicorn's ``post_fork`` hook, in each worker."""
    limit_malloc_arenas(server, worker)
    cache_http_date()


def limit_malloc_arenas(_server: Any = None, _worker: Any = None) -> None:
    """glibc gives each thread of a worker its own malloc arena (up to 8 per core); with
    gthread workers that fragmented one worker to 154 MB of RSS under load where two
    arenas keep it at 117 MB, with the same throughput (bench/README.md). An operator's
    MALLOC_ARENA_MAX wins; elsewhere than glibc this does nothing."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass


def address_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, if it cannot: said at once and plainly,
    where gunicorn would retry for five seconds and then say "Can't connect". (Where the
    workers fall back to SO_REUSEPORT sockets, such sockets would also share the port with
    any other process of the same user that set the option: a forgotten hub would silently
    get half the connections. A probe without the option fails where anyone listens.)"""
    import errno

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (TIME_WAIT is fine)
        try:
            probe.bind((host, port))
        except OSError as exc:  # (socket.gaierror too: a --host that does not resolve)
            said = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                return (f"{said}. Another program (or another Civitas) is listening there: "
                        "stop it, or choose another --port.")
            return (f"{said}. Check --host (an address of this machine, such as 127.0.0.1 "
                    "or 0.0.0.0) and --port (one below 1024 needs privileges).")
    return None


class SchemaUpgradeFailed(RuntimeError):
    """`civitas db upgrade` failed before the workers started; the message is its output."""


def upgrade_schema(config_path: str | None) -> str:
    """Bring the database schema up to date once, before any worker starts, in a child
    process (`civitas db upgrade`): the master never imports Alembic, so the workers forked
    from it do not carry it (~11 MB of RSS each) and do not run migrations themselves. No
    timeout: a migration of a large table may rightly take minutes, and the operator sees the
    hub not yet listening; a database that does not answer fails the connection instead."""
    return _db_command(config_path, "upgrade")


def check_schema(config_path: str | None) -> str:
    """``civitas db check`` in a child process, as :func:`upgrade_schema` runs the upgrade:
    the schema is the one this release needs (``CIVITAS_SKIP_DB_UPGRADE=1``: migrations are
    a release step of their own), else :class:`SchemaUpgradeFailed` saying what to run."""
    return _db_command(config_path, "check")


def _db_command(config_path: str | None, verb: str) -> str:
    argv = [sys.executable, "-m", "civitas.cli",
            *(["--config", config_path] if config_path else []), "db", verb]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603 (this program)
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip().removeprefix("Error: ")  # (click's)
        raise SchemaUpgradeFailed(said or f"exit status {proc.returncode}")
    return proc.stdout.strip()


def run_gunicorn(config_path: str | None, *, host: str, port: int, workers: int,
                 threads: int, json_logs: bool = True) -> None:
    """Serve with gunicorn. The schema must be up to date first (``upgrade_schema``): the
    workers do not migrate."""
    # Prometheus multiprocess mode: every worker writes its metrics to this directory, which
    # must be set before prometheus-client is imported (`civitas serve` re-executes itself
    # with it; a caller that imports this module itself sets it first).
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:  # (setdefault made one every time)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="civitas-metrics-")
    worker = worker_class()
    balanced = worker.startswith(f"{__name__}.Balanced")
    HubApplication(config_path, {
        "bind": f"{host}:{port}", "workers": workers, "threads": threads,
        "worker_class": worker, "preload_app": False, "accesslog": None,
        "graceful_timeout": 10, "timeout": 30, "keepalive": KEEPALIVE_SECONDS,
        # Only `trusted_proxy_hops` (ProxyFix in the app) decides which X-Forwarded-* to
        # believe; gunicorn's own defaults would believe them from 127.0.0.1 regardless.
        "forwarded_allow_ips": "", "secure_scheme_headers": {},
        # One listening socket shared by the workers, each of which takes a new connection
        # only while it holds no more than the others (BalancedWorker: why, and the
        # figures). Where that worker cannot be used (an older gunicorn), one SO_REUSEPORT
        # socket per worker, spread by the kernel's hash, is better than a shared socket
        # that the first worker to wake empties.
        "reuse_port": balanced is False and hasattr(socket, "SO_REUSEPORT"),
        "pre_fork": assign_board_slot, "child_exit": clear_board_slot,
        "post_fork": after_fork,
        **({"logger_class": JSONLogger} if json_logs else {}),
    }).run()
