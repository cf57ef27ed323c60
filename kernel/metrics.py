"""Prometheus metrics shared by every package (prometheus-client).

With several worker processes, set ``PROMETHEUS_MULTIPROC_DIR`` (``civitas serve --workers``
does) and ``/metrics`` aggregates every worker.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from . import metric_files

metric_files.install()  # before the first value is made

REQUESTS = Counter("civitas_http_requests_total", "HTTP requests", ["endpoint", "method", "status"])
LATENCY = Histogram(
    "civitas_http_request_seconds", "HTTP request latency", ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
#: outcome ``ok``, or why the upstream did not complete the login (broker.service's
#: FAILED_OUTCOMES): ``busy``, ``unavailable``, ``invalid`` (an answer that failed a check:
#: an attack or a misconfigured upstream), ``rejected``, ``error``
LOGINS = Counter("civitas_logins_total", "Upstream logins, by outcome",
                 ["upstream", "outcome"])
#: times an upstream was taken as down after calls in a row failed (broker.health)
UPSTREAM_DOWN = Counter("civitas_upstream_down_total",
                        "Times an upstream was taken as down, by upstream", ["upstream"])
TOKENS = Counter("civitas_tokens_issued_total", "Tokens issued", ["grant_type"])
CONSENT_DECISIONS = Counter("civitas_consent_decisions_total", "Consent decision API answers",
                            ["decision"])
DELIVERIES = Counter("civitas_event_deliveries_total", "Back-channel logout and SET deliveries",
                     ["kind", "outcome"])
#: rounds of the work each worker does in the background: ``ledger_seal``,
#: ``consent_expiry``, ``refresh_purge``; alert on ``outcome="failed"``
BACKGROUND_JOBS = Counter("civitas_background_jobs_total",
                          "Rounds of background jobs, by job and outcome", ["job", "outcome"])
REFRESH_REVOKED = Counter("civitas_refresh_grants_revoked_total",
                          "Refresh grants revoked, by reason (reuse: RFC 9700 4.14.2)", ["reason"])
