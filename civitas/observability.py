"""Health, readiness, metrics and structured JSON logs with the request id."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

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
        except RuntimeError:  # outside a request
            request_id = None
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_json_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


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

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        checks: dict[str, str] = {}
        try:
            with hub.db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except SQLAlchemyError as exc:
            checks["database"] = f"failed: {type(exc).__name__}"
        try:
            checks["store"] = "ok" if hub.store.ping() else "failed"
        except Exception as exc:  # noqa: BLE001 - any store client error means not ready
            checks["store"] = f"failed: {type(exc).__name__}"
        try:
            hub.keys.signing_key(hub.settings.signing_alg)
            checks["signing_keys"] = "ok"
        except (LookupError, SQLAlchemyError) as exc:
            checks["signing_keys"] = f"failed: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values())
        return jsonify(status="ready" if ready else "not ready", checks=checks), (
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
