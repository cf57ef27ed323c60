"""Health, readiness, metrics and structured JSON logs with the request id."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text

from kernel import forks
from kernel.metrics import LATENCY, REQUESTS

from .envelope import REQUEST_ID, STARTED

_log = logging.getLogger("civitas")


def request_id_of(req: Any) -> str:
    """The request's id: the one its hooks set in ``g``, else the envelope's."""
    try:
        found = g.get("request_id")
    except RuntimeError:
        found = None
    return str(found or req.environ.get(REQUEST_ID, "-"))

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                      "PATCH"})


class JSONFormatter(logging.Formatter):
    """One JSON object per line, with the request id when there is a request."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        try:
            request_id = g.get("request_id")
            agency_request_id = g.get("agency_request_id")
        except RuntimeError:  # outside a request
            request_id = agency_request_id = None
        if request_id:
            entry["request_id"] = request_id
        if agency_request_id:  # the X-Request-ID a decision API answer echoed (AuthZEN)
            entry["agency_request_id"] = agency_request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_json_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


#: how long /readyz waits for its checks' answers: less than the probe's own timeout (4 s in
#: compose.yaml, 1-5 s for load balancers), so that a dependency that never answers is
#: reported as not ready instead of holding the probe. Opening a PostgreSQL connection has
#: its own deadline (kernel.db.CONNECT_TIMEOUT_SECONDS), but a statement on an established
#: connection to a stopped server has none (one to a host that is gone gives up after
#: kernel.db.TCP_DEADLINES: 25 s or more), and the probe saw only its own timeout
READY_DEADLINE_SECONDS = 2.0
#: the key /readyz writes to find whether the store takes writes (kept 10 s)
READY_PROBE_KEY = "readyz-probe"


class ReadinessCheck:
    """One dependency's check for /readyz, run on a thread of its own so that the probe can
    answer by its deadline whether or not the dependency does.

    While a run has not answered, no second one starts: the probes that come meanwhile wait
    on the same run. A dependency that hangs holds one thread (and at most one connection)
    per worker, however often it is probed, and the first probe after it answers again
    starts afresh. ``probe`` returns when the dependency is usable and raises when not."""

    def __init__(self, probe: Callable[[], None]) -> None:
        self._probe = probe
        self._lock = threading.Lock()
        #: the run under way: (answered, its answer once there, started at, fork count)
        self._running: tuple[threading.Event, list[str], float, int] | None = None

    def start(self) -> tuple[threading.Event, list[str], float, int]:
        """The run under way in this process, or a new one."""
        with self._lock:
            run = self._running
            if run is None or run[3] != forks.count():  # (a parent's run has no thread here)
                run = self._running = (threading.Event(), [], time.monotonic(), forks.count())
                threading.Thread(target=self._run, args=(run,), daemon=True,
                                 name="civitas-readyz").start()
            return run

    def answer(self, run: tuple[threading.Event, list[str], float, int], until: float) -> str:
        """``run``'s answer, waiting for it until ``until`` (``time.monotonic()``)."""
        answered, answer, started, _ = run
        if answered.wait(max(0.0, until - time.monotonic())):
            return answer[0]
        return f"failed: no answer for {time.monotonic() - started:.1f} s"

    def _run(self, run: tuple[threading.Event, list[str], float, int]) -> None:
        answered, answer, _, _ = run
        try:
            self._probe()
            answer.append("ok")
        except Exception as exc:  # noqa: BLE001 - any failure of a dependency: not ready
            answer.append(f"failed: {type(exc).__name__}")
        finally:
            with self._lock:
                if self._running is run:
                    self._running = None
            answered.set()


def install(app: Flask) -> None:
    hub = app.extensions["civitas"]

    # the labelled series, looked up once each: ``labels()`` takes a lock and builds a key
    requests: dict[tuple[str, str, int], Any] = {}
    latency: dict[str, Any] = {}

    @app.after_request
    def _record(response: Response) -> Response:
        # the request itself, read once, not through the context-local proxy four times
        req = request._get_current_object()  # type: ignore[attr-defined]
        rule = req.url_rule
        endpoint = rule.rule if rule is not None else "unmatched"
        # the method is the client's word: any token makes a new series (and an entry in the
        # cache above), so only the standard methods are labelled by name (RFC 9110 9.3)
        method = req.method if req.method in _METHODS else "OTHER"
        key = (endpoint, method, response.status_code)
        counter = requests.get(key)
        if counter is None:
            counter = requests.setdefault(key, REQUESTS.labels(endpoint, key[1], str(key[2])))
        counter.inc()
        if response.status_code >= 400:
            # every answer that is an error has a line with its id, which its page or header
            # quotes as the reference to give support: also the refusals no other line
            # names (an unknown agency's authorization request, a page not there, ...)
            _log.info("request %s: %s %s answered %d", request_id_of(req), key[1], endpoint,
                      response.status_code)
        started = req.environ.get(STARTED)  # set by the envelope (civitas.envelope)
        if started is not None:
            histogram = latency.get(endpoint)
            if histogram is None:
                histogram = latency.setdefault(endpoint, LATENCY.labels(endpoint))
            histogram.observe(time.perf_counter() - started)
        return response

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok", pid=os.getpid())

    def database() -> None:
        with hub.db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def store() -> None:
        # a write, not a PING: a Redis out of memory (``noeviction``), a replica after a
        # failover (READONLY) or one whose snapshot failed (MISCONF) answers PING, and
        # refuses every sign-in, code and token
        hub.store.put(READY_PROBE_KEY, {"pid": os.getpid()}, 10)

    def signing_keys() -> None:
        hub.keys.signing_key(hub.settings.signing_alg)

    checks = {"database": ReadinessCheck(database), "store": ReadinessCheck(store),
              "signing_keys": ReadinessCheck(signing_keys)}

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        until = time.monotonic() + READY_DEADLINE_SECONDS
        # all three at once: the probe waits for the slowest, not for the sum
        runs = {name: check.start() for name, check in checks.items()}
        answers = {name: checks[name].answer(run, until) for name, run in runs.items()}
        ready = all(v == "ok" for v in answers.values())
        return jsonify(status="ready" if ready else "not ready", checks=answers), (
            200 if ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            data = generate_latest(registry)
        else:
            data = generate_latest()
        return Response(data, mimetype=CONTENT_TYPE_LATEST)
