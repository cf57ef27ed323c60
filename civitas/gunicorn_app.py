"""Several worker processes under gunicorn; each builds its own app after the fork, so no
database connection or lock crosses a process boundary."""

from __future__ import annotations

import errno
import os
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
from gunicorn.workers.gthread import TConn, ThreadWorker


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

        from .app import create_app, freeze_heap

        # `civitas serve` brought the schema up to date before starting gunicorn
        # (upgrade_schema), so the workers neither migrate nor import Alembic
        app = create_app(load_settings(self.config_path), migrate=False)
        freeze_heap()
        return app


class WaitForDataWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, except that a new connection waits in the worker's poller
    until its first bytes arrive, as a kept-alive one does, instead of in one of the
    worker's threads. gunicorn 25+ hands each new connection to a thread, which waits up to
    5 s for data: connections opened ahead of use (a browser's preconnect, a proxy's or load
    generator's pool) took every thread while requests on other connections queued (the
    decision bench with 64 paced connections: p99 95 ms, max 223 ms). A connection that
    sends nothing within ``keepalive`` seconds is closed, like an idle kept-alive one."""

    def accept(self, listener: Any) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        conn.timeout = time.monotonic() + self.cfg.keepalive
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             partial(self.on_pending_socket_readable, conn))


def worker_class() -> str:
    """:class:`WaitForDataWorker` where gunicorn's gthread worker has the pending-connection
    handling it builds on (gunicorn 25+), else gthread itself."""
    if all(hasattr(ThreadWorker, name) for name in (
            "on_pending_socket_readable", "murder_pending", "enqueue_req")):
        return f"{__name__}.WaitForDataWorker"
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


#: glibc mallopt parameter: how many malloc arenas threads may spread over
_M_ARENA_MAX = -8


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
    """Why ``host:port`` cannot be listened on, if it cannot. Each worker binds its own
    SO_REUSEPORT socket, and such sockets share a port with any other process of the same
    user that set the option too: a forgotten hub on the same port would silently get half
    the connections. A probe without the option fails where anyone already listens."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (TIME_WAIT is fine)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


class SchemaUpgradeFailed(RuntimeError):
    """`civitas db upgrade` failed before the workers started; the message is its output."""


def upgrade_schema(config_path: str | None) -> str:
    """Bring the database schema up to date once, before any worker starts, in a child
    process (`civitas db upgrade`): the master never imports Alembic, so the workers forked
    from it do not carry it (~11 MB of RSS each) and do not run migrations themselves. No
    timeout: a migration of a large table may rightly take minutes, and the operator sees the
    hub not yet listening; a database that does not answer fails the connection instead."""
    argv = [sys.executable, "-m", "civitas.cli",
            *(["--config", config_path] if config_path else []), "db", "upgrade"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603 (this program)
    if proc.returncode != 0:
        raise SchemaUpgradeFailed((proc.stderr or proc.stdout).strip()
                                  or f"exit status {proc.returncode}")
    return proc.stdout.strip()


def run_gunicorn(config_path: str | None, *, host: str, port: int, workers: int,
                 threads: int, json_logs: bool = True) -> None:
    """Serve with gunicorn. The schema must be up to date first (``upgrade_schema``): the
    workers do not migrate."""
    # Prometheus multiprocess mode: every worker writes its metrics to this directory, which
    # must be set before prometheus-client is imported (`civitas serve` re-executes itself
    # with it; a caller that imports this module itself sets it first).
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR",
                          tempfile.mkdtemp(prefix="civitas-metrics-"))
    HubApplication(config_path, {
        "bind": f"{host}:{port}", "workers": workers, "threads": threads,
        "worker_class": worker_class(), "preload_app": False, "accesslog": None,
        "graceful_timeout": 10, "timeout": 30,
        # Only `trusted_proxy_hops` (ProxyFix in the app) decides which X-Forwarded-* to
        # believe; gunicorn's own defaults would believe them from 127.0.0.1 regardless.
        "forwarded_allow_ips": "", "secure_scheme_headers": {},
        # Each worker listens on its own SO_REUSEPORT socket and the kernel spreads new
        # connections over them. With one shared socket the first worker to wake takes
        # them, and long-lived keep-alive connections (a proxy's upstream pool, a load
        # generator) could all sit in one worker while the others idle: measured at half
        # the throughput (bench/README.md). The cost: connections still waiting in a worker's
        # accept queue when that worker exits are reset (clients retry; workers are not
        # recycled here, so that is a crash or a shutdown).
        "reuse_port": hasattr(socket, "SO_REUSEPORT"),
        "post_fork": limit_malloc_arenas,
        **({"logger_class": JSONLogger} if json_logs else {}),
    }).run()
