"""The agency registration API for administrators: a thin Flask adapter over AgencyRegistry.

    GET    /admin/api/agencies               every agency
    POST   /admin/api/agencies               register one; the client secret is in this answer
                                             only (RFC 7591 3.2.1), for secret-based methods
    GET    /admin/api/agencies/<client_id>   one agency
    PUT    /admin/api/agencies/<client_id>   replace its metadata (RFC 7592 2.2 style)
    DELETE /admin/api/agencies/<client_id>   remove it

JSON in and out, metadata named as ``civitas agency show`` prints it (RFC 7591 2 names where
one exists). Authenticated by the bearer token ``admin_api_token`` (RFC 6750 2.1); without one
configured the API does not exist (404). Refused metadata is answered with RFC 7591 3.2.2
errors whose description names the field: ``{"error": "invalid_client_metadata",
"error_description": "jwks: ..."}``. Secret hashes are never returned.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Any

from flask import Blueprint, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from kernel import jsonfast

from .agencies import AgencyMetadata, AgencyRegistry, shared_sector_notice
from .errors import AgencyRegistrationError
from .models import Agency

log = logging.getLogger("civitas.admin")

#: what ``describe()`` shows but a client cannot set: accepted back on PUT and ignored
READ_ONLY = frozenset({"source", "created_at", "updated_at"})
STRING_LISTS = ("redirect_uris", "scopes", "post_logout_redirect_uris")
OPTIONAL_STRINGS = ("sector_identifier", "backchannel_logout_uri", "event_delivery_uri",
                    "jwks_uri", "id_token_signed_response_alg")
STRINGS = ("client_id", "name", "token_endpoint_auth_method", "subject_type")
#: Back-Channel Logout 1.0 2.2: whether the agency needs ``sid`` in its logout tokens. The
#: hub puts ``sid`` in every one (discovery's ``backchannel_logout_session_supported``), so
#: either answer is served; the agency's description always says ``true``, what it gets
#: (RFC 7591 3.2.1: the server may replace a requested value with the one it uses)
SESSION_REQUIRED = "backchannel_logout_session_required"
FIELDS = frozenset({*STRING_LISTS, *OPTIONAL_STRINGS, *STRINGS, "jwks", SESSION_REQUIRED})
#: arrays and objects in a body at most this deep (a registration with a JWK set is 4); what
#: orjson reads (1024) is more than the walks over it and ``json.dumps`` can take
MAX_BODY_DEPTH = 32


def _answer(body: dict[str, Any] | None, status: int = 200) -> Response:
    resp = jsonify(body) if body is not None else Response(status=status)
    resp.status_code = status
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Pragma"] = "no-cache"
    return resp


def _error(status: int, error: str, description: str) -> Response:
    return _answer({"error": error, "error_description": description}, status)


def _refused(exc: AgencyRegistrationError) -> Response:
    """RFC 7591 3.2.2: ``invalid_redirect_uri`` for redirect URIs, else metadata."""
    code = "invalid_redirect_uri" if exc.field == "redirect_uris" else "invalid_client_metadata"
    return _error(400, code, str(exc))


def metadata_from_json(body: dict[str, Any], client_id: str) -> AgencyMetadata:
    """Registration metadata from a JSON object; each type error names its field."""
    unknown = sorted(set(body) - FIELDS - READ_ONLY)
    if unknown:
        raise AgencyRegistrationError(unknown[0], "unknown field")

    def string(name: str, *, default: str | None = None) -> str:
        value = body.get(name, default)
        if not isinstance(value, str):
            raise AgencyRegistrationError(name, "required, a string")
        return value

    def optional(name: str) -> str | None:
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise AgencyRegistrationError(name, "must be a string or null")
        return value

    def strings(name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = body.get(name, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise AgencyRegistrationError(name, "must be an array of strings")
        return tuple(value)

    if body.get("client_id", client_id) != client_id:
        raise AgencyRegistrationError("client_id", "does not match the agency's address")
    if not isinstance(body.get(SESSION_REQUIRED, False), bool):
        raise AgencyRegistrationError(SESSION_REQUIRED, "must be true or false")
    jwks = body.get("jwks")
    if jwks is not None and not isinstance(jwks, dict):
        raise AgencyRegistrationError("jwks", "must be a JWK set (a JSON object) or null")
    return AgencyMetadata(
        client_id=client_id, name=string("name"), redirect_uris=strings("redirect_uris"),
        scopes=strings("scopes", ("openid", "profile", "email")),
        sector_identifier=optional("sector_identifier"),
        token_endpoint_auth_method=string("token_endpoint_auth_method",
                                          default="client_secret_basic"),
        post_logout_redirect_uris=strings("post_logout_redirect_uris"),
        backchannel_logout_uri=optional("backchannel_logout_uri"),
        event_delivery_uri=optional("event_delivery_uri"), jwks=jwks,
        jwks_uri=optional("jwks_uri"),
        id_token_signed_response_alg=optional("id_token_signed_response_alg"),
        subject_type=string("subject_type", default="pairwise"),
    )


def _described(row: Agency, secret: str | None) -> dict[str, Any]:
    body = row.describe()
    if secret is not None:
        body["client_secret"] = secret
        body["client_secret_expires_at"] = 0  # RFC 7591 3.2.1: it does not expire
    return body


def create_blueprint(agencies: AgencyRegistry, token: str | None) -> Blueprint:
    bp = Blueprint("admin_api", __name__, url_prefix="/admin/api")
    expected = hashlib.sha256(token.encode()).digest() if token else None

    @bp.before_request
    def authenticate() -> Response | None:
        if expected is None:
            return _error(404, "not_found", "There is nothing at this address.")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            resp = _error(401, "invalid_request", "A bearer token is required.")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="civitas-admin"'
            return resp
        # compare digests in constant time: neither the token nor its length leaks
        if not hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), expected):
            log.warning("admin API: refused a bearer token from %s", request.remote_addr)
            resp = _error(401, "invalid_token", "The bearer token is not valid.")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="civitas-admin", ' \
                                               'error="invalid_token"'
            return resp
        return None

    @bp.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = "invalid_request" if status < 500 else "server_error"
        return _error(status, code, error.description or "The request failed.")

    def json_body() -> dict[str, Any] | Response:
        if not request.is_json:
            return _error(400, "invalid_request", "The body must be JSON "
                                                  "(Content-Type: application/json).")
        body = request.get_json(silent=True)  # too large -> 413 via the handler above
        if not isinstance(body, dict):
            return _error(400, "invalid_request", "The body must be a JSON object.")
        if jsonfast.nested_deeper_than(body, MAX_BODY_DEPTH):  # before anything walks it
            return _error(400, "invalid_request", "The body must not be nested more than "
                                                  f"{MAX_BODY_DEPTH} levels deep.")
        where = jsonfast.lone_surrogate_at(body)
        if where is not None:  # valid JSON, but no text any column (or the ledger) takes
            return _error(400, "invalid_request", f"The body must be Unicode text: {where} "
                                                  "holds a lone surrogate.")
        repeated = jsonfast.repeated_name(request.get_data(cache=True))
        if repeated is not None:  # RFC 7493 2.3: json and orjson keep the last, silently
            return _error(400, "invalid_request", "The body must not repeat a member name: "
                                                  f"{repeated!r} (RFC 7493 section 2.3).")
        # RFC 8259 6: NaN and Infinity (which json reads, and 1e400 as an infinity) are no
        # JSON numbers; integers beyond I-JSON are the registry's to refuse (jwks)
        outside = jsonfast.number_outside_i_json_at(body, integers=False)
        if outside is not None:
            return _error(400, "invalid_request",
                          f"The body must be JSON: {outside[0]} {outside[1]}.")
        return body

    def with_privacy_notices(body: dict[str, Any], client_id: str) -> dict[str, Any]:
        """Tell the registrant (and the log) when this agency now shares its pairwise
        sector with others only through its redirect URIs' host (an extra member, which
        RFC 7591 3.2.1 allows and clients ignore)."""
        notices = [shared_sector_notice(host, ids)
                   for host, ids in agencies.shared_host_sectors().items() if client_id in ids]
        for notice in notices:
            log.warning("admin API: privacy: %s", notice)
        return {**body, "civitas_privacy_notices": notices} if notices else body

    def unknown(client_id: str) -> Response:
        return _error(404, "not_found", f"No agency has client_id {client_id!r}.")

    def declared_in_settings(row: Agency) -> Response:
        return _error(409, "invalid_request", f"Agency {row.client_id!r} is declared in the "
                                              "settings file; change it there.")

    @bp.get("/agencies")
    def list_agencies() -> Response:
        return _answer({"agencies": [row.describe() for row in agencies.list()]})

    @bp.post("/agencies")
    def register() -> Response:
        body = json_body()
        if isinstance(body, Response):
            return body
        client_id = body.get("client_id") or f"agency-{secrets.token_hex(8)}"
        try:
            if not isinstance(client_id, str):
                raise AgencyRegistrationError("client_id", "must be a string")
            row, secret = agencies.register(metadata_from_json(body, client_id),
                                            source="api")
        except AgencyRegistrationError as exc:
            return _refused(exc)
        log.info("admin API: agency %s registered", row.client_id)
        resp = _answer(with_privacy_notices(_described(row, secret), row.client_id), 201)
        resp.headers["Location"] = f"{request.url_root.rstrip('/')}{bp.url_prefix}" \
                                   f"/agencies/{row.client_id}"
        return resp

    @bp.get("/agencies/<client_id>")
    def show(client_id: str) -> Response:
        row = agencies.get(client_id)
        return unknown(client_id) if row is None else _answer(row.describe())

    @bp.put("/agencies/<client_id>")
    def update(client_id: str) -> Response:
        row = agencies.get(client_id)
        if row is None:
            return unknown(client_id)
        if row.source == "config":
            return declared_in_settings(row)
        body = json_body()
        if isinstance(body, Response):
            return body
        try:
            changed = agencies.replace(metadata_from_json(body, client_id))
        except AgencyRegistrationError as exc:
            return _refused(exc)
        if changed is None:  # removed meanwhile
            return unknown(client_id)
        log.info("admin API: agency %s updated", client_id)
        return _answer(with_privacy_notices(_described(*changed), client_id))

    @bp.delete("/agencies/<client_id>")
    def remove(client_id: str) -> Response:
        row = agencies.get(client_id)
        if row is None:
            return unknown(client_id)
        if row.source == "config":
            return declared_in_settings(row)
        if not agencies.remove(client_id):
            return unknown(client_id)
        log.info("admin API: agency %s removed", client_id)
        return _answer(None, 204)

    return bp
