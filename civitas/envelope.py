"""The edge of every response: the request id and the headers every answer carries.

They are added once, at the WSGI level, to whatever the application answers (views, error
pages, Authlib's responses): a header a view set itself is kept. Done here rather than in a
Flask ``after_request`` hook, which paid about ten microseconds per werkzeug ``Headers``
call (some 6% of the CPU of the cheapest request, bench/README.md); here it is one pass over
a short list of tuples.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Any

#: every response (OWASP ASVS 14.4: no sniffing, no framing, no referrer)
BASE_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
)
#: pages for people: nothing loads but the page's own inline style, forms post back here
HTML_HEADERS = (
    ("Content-Security-Policy",
     "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
     "frame-ancestors 'none'; base-uri 'none'"),
    ("Cache-Control", "no-store"),
)
REQUEST_ID = "civitas.request_id"
STARTED = "civitas.started"

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def new_request_id() -> str:
    """64 random bits that tie a request's log lines, error page, ledger entries and
    ``X-Request-Id`` together. Not a secret: the process's own generator (reseeded in every
    forked worker) makes it without uuid4's system call."""
    return f"{random.getrandbits(64):016x}"  # noqa: S311


class ResponseEnvelope:
    """WSGI middleware: a request id in ``environ[REQUEST_ID]``, the start time in
    ``environ[STARTED]``, and the headers above on the way out (unless already set)."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        environ[STARTED] = time.perf_counter()
        request_id = environ[REQUEST_ID] = new_request_id()

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            present = {name.lower(): value for name, value in headers}
            if "x-request-id" not in present:
                headers.append(("X-Request-Id", request_id))
            for name, value in BASE_HEADERS:
                if name.lower() not in present:
                    headers.append((name, value))
            if present.get("content-type", "").startswith("text/html"):
                for name, value in HTML_HEADERS:
                    if name.lower() not in present:
                        headers.append((name, value))
            return start_response(status, headers, exc_info)

        return self.app(environ, start)
