"""HTTP adapter of the decision API: ``/access/v1/...`` (OpenID AuthZEN Authorization API 1.0).

- The agency authenticates through the injected ``authenticate_agency(request)``: a
  client_credentials access token with the decision scope, or its client credentials. When it
  answers None: 401 with ``WWW-Authenticate`` (RFC 6750 section 3, RFC 7617).
- Each agency, and each client address, is rate-limited in fixed windows counted in the
  short-lived store (one round trip for both), so every worker shares the count: 429 with
  ``Retry-After`` (RFC 6585 section 4); a request that fails to authenticate counts against
  its address alone. A limit of 0 is no limit.
- Errors are JSON ``{"error", "error_description"}`` with 400, 401, 404 or 429 (AuthZEN's HTTPS
  binding: an error is an HTTP status, never a decision). ``X-Request-ID`` is echoed, and
  named on the hub's log lines of the request (``agency_request_id``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Request, g, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from kernel import jsonfast
from kernel.ratelimit import Limit, RateLimited, RateLimiter, address_bucket
from kernel.store import ShortLivedStore

from .decisions import InvalidRequest, parse_evaluation, parse_evaluations
from .errors import ConsentError
from .openapi import openapi_document
from .service import ConsentService

#: returns the client_id of the authenticated agency, or None (injected by the provider); a
#: bearer token it refuses raises :class:`BearerRefused`
AgencyAuthenticator = Callable[[Request], str | None]


class BearerRefused(Exception):  # noqa: N818 (a refusal, read as such where it is caught)
    """A bearer token the decision API does not take (RFC 6750 3.1): ``invalid_token`` (not a
    live token of this hub), or ``insufficient_scope`` (a live token without the API's
    scope: a citizen's, say)."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error

REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


class ApiError(ConsentError):
    """An error of the decision API, rendered as JSON by this blueprint only."""

    def __init__(self, status: int, error: str, description: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(description, status_code=status)
        self.error = error
        self.headers = headers or {}


def create_api_blueprint(service: ConsentService, *,
                         authenticate_agency: AgencyAuthenticator, store: ShortLivedStore,
                         scope: str, rate_limit: int = 600, rate_window_seconds: int = 60,
                         rate_limit_per_address: int = 0,
                         token_url: str = "/token",  # noqa: S107 (a URL)
                         ) -> Blueprint:
    bp = Blueprint("api", __name__, url_prefix="/access/v1")
    limiter = RateLimiter(store, window_seconds=rate_window_seconds)
    decisions = service.decisions
    document = openapi_document(scope=scope, token_url=token_url)
    challenge = (f'Bearer realm="civitas-consent", scope="{scope}", '
                 'Basic realm="civitas-consent"')

    @bp.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        response = jsonify(error=error.error, error_description=error.public_message)
        response.status_code = error.status_code
        response.headers.update(error.headers)
        return response

    @bp.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        response = jsonify(error="invalid_request",
                           error_description=error.description or "Request failed.")
        response.status_code = error.code or 400
        return response

    @bp.before_request
    def _agency_request_id() -> None:
        given = request.headers.get("X-Request-ID", "")
        if REQUEST_ID.match(given):
            # the answer quotes this id instead of the hub's: the hub's log lines name it
            # too (civitas.observability), so that the agency's id leads to them
            g.agency_request_id = given

    @bp.after_request
    def _headers(response: Response) -> Response:
        given = request.headers.get("X-Request-ID", "")
        if REQUEST_ID.match(given):
            response.headers["X-Request-ID"] = given  # AuthZEN: echo the PEP's request id
        response.headers["Cache-Control"] = "no-store"
        return response

    def counted(agency_limit: Limit | None) -> None:
        """Count the request against its address (and its agency's) limits; 429 when over."""
        limits = [Limit(f"decision:addr:{address_bucket(request.remote_addr)}",
                        rate_limit_per_address)]
        try:
            limiter.hit(limits if agency_limit is None else [agency_limit, *limits])
        except RateLimited as exc:
            who = "agency" if ":agency:" in exc.key else "address"
            raise ApiError(429, "rate_limited", f"Too many requests from this {who}; retry "
                           f"after {exc.retry_after} seconds.",
                           {"Retry-After": str(exc.retry_after)}) from exc

    def agency() -> str:
        """The authenticated, not rate-limited agency's client_id. A request that fails to
        authenticate counts against its address too (as at the token endpoint), or one
        address could send any number of them."""
        try:
            client_id = authenticate_agency(request)
        except BearerRefused as refused:
            counted(None)
            # RFC 6750 3.1: "invalid_token" 401; "insufficient_scope" 403, with the scope
            if refused.error == "insufficient_scope":
                raise ApiError(403, "insufficient_scope", "This access token has no "
                               f"'{scope}' scope: get one with the client_credentials grant.",
                               {"WWW-Authenticate": f'Bearer realm="civitas-consent", '
                                f'error="insufficient_scope", scope="{scope}"'}) from refused
            raise ApiError(401, "invalid_token", "The access token is invalid or expired.",
                           {"WWW-Authenticate": 'Bearer realm="civitas-consent", '
                            f'error="invalid_token", scope="{scope}"'}) from refused
        if client_id is None:
            counted(None)
            raise ApiError(401, "invalid_client", "Agency authentication is required: a "
                           f"client_credentials access token with scope '{scope}', or the "
                           "agency's client id and secret (HTTP Basic).",
                           {"WWW-Authenticate": challenge})
        counted(Limit(f"decision:agency:{client_id}", rate_limit))
        return client_id

    def body() -> Any:
        raw = request.get_data(cache=False)
        if not raw.strip():
            raise ApiError(400, "invalid_request", "The request body must be a JSON object.")
        try:
            return jsonfast.loads_unique(raw)
        except jsonfast.RepeatedName as exc:  # json and orjson keep the last, silently
            raise ApiError(400, "invalid_request", "The request body must not repeat a "
                           f"member name: {exc.name!r} (RFC 7493 section 2.3).") from exc
        except ValueError as exc:
            raise ApiError(400, "invalid_request",
                           f"The request body is not valid JSON: {exc}") from exc

    def request_id() -> str | None:
        given = request.headers.get("X-Request-ID", "")
        return given if REQUEST_ID.match(given) else g.get("request_id")

    @bp.get("/openapi.json")
    def openapi() -> Response:
        response = jsonify(document)
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    @bp.post("/evaluation")
    def evaluation() -> Response:
        """AuthZEN 1.0 section 6."""
        client_id = agency()
        try:
            query = parse_evaluation(body())
        except InvalidRequest as exc:
            raise ApiError(400, "invalid_request", str(exc)) from exc
        [answer] = decisions.decide(client_id, [query], now=service.clock(),
                                    request_id=request_id())
        return jsonify(answer.to_authzen())

    @bp.post("/evaluations")
    def evaluations() -> Response:
        """AuthZEN 1.0 section 7."""
        client_id = agency()
        try:
            queries, semantic, single = parse_evaluations(body())
        except InvalidRequest as exc:
            raise ApiError(400, "invalid_request", str(exc)) from exc
        answers = decisions.decide(client_id, queries, now=service.clock(), semantic=semantic,
                                   request_id=request_id())
        if single:
            return jsonify(answers[0].to_authzen())
        return jsonify(evaluations=[a.to_authzen() for a in answers])

    @bp.get("/receipts/<receipt_id>")
    def receipt(receipt_id: str) -> Response:
        """A receipt of one of this agency's own records; any other id is simply not found."""
        client_id = agency()
        found = service.receipt(receipt_id)
        if found is None or found.client_id != client_id:
            raise ApiError(404, "not_found", "There is no receipt with this id for this "
                           "agency.")
        return jsonify(receipt_id=found.id, jws=found.jws, receipt=found.payload)

    return bp
