"""The OpenAPI 3.1 document of the decision API (served at ``/access/v1/openapi.json``).

Request and response shapes follow the OpenID AuthZEN Authorization API 1.0 (sections 5 to
7); the constraints here are exactly those :mod:`consent.decisions` enforces, and the tests
run schemathesis against the live endpoints with this document. The receipt schema is
``consent/receipt.schema.json`` itself (OpenAPI 3.1 schemas are JSON Schema 2020-12).
"""

from __future__ import annotations

from typing import Any

from .decisions import ENTITIES, FIELD_PATTERN, MAX_BATCH, SEMANTICS
from .history import REASONS
from .receipts import receipt_schema

EXAMPLES = {"subject": {"type": "user"}, "action": {"name": "use"},
            "resource": {"type": "claim"}, "context": {}}
DESCRIPTIONS = {
    "subject": "AuthZEN 5.1. type 'user'; id: the citizen's pairwise sub at this agency.",
    "action": "AuthZEN 5.3. name 'use' (other actions are denied).",
    "resource": "AuthZEN 5.2. type 'claim'; id: the claim name, e.g. 'email'.",
    "context": "AuthZEN 5.4. purpose: the purpose identifier the agency declared.",
}


def _entity(name: str) -> dict[str, Any]:
    properties: dict[str, Any] = {
        field: {"type": "string", "minLength": 1, "maxLength": limit,
                "pattern": FIELD_PATTERN}
        for field, limit in ENTITIES[name].items()
    }
    for field, example in EXAMPLES[name].items():
        properties[field]["examples"] = [example]
    if name != "context":
        properties["properties"] = {"type": "object"}
    return {"type": "object", "description": DESCRIPTIONS[name],
            "required": list(ENTITIES[name]), "properties": properties}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": _ref("Error")}}}
    if headers:
        response["headers"] = headers
    return response


UNAUTHORIZED = _error(
    "No valid agency credentials: a client_credentials access token with the decision "
    "scope, or the agency's client id and secret (HTTP Basic).",
    {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}})
FORBIDDEN = _error(
    "A live access token without the decision scope (a citizen's token, say): RFC 6750 3.1 "
    "insufficient_scope.",
    {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}})
RATE_LIMITED = _error("Too many requests from this agency.",
                      {"Retry-After": {"required": True,
                                       "schema": {"type": "string", "pattern": "^[0-9]+$"}}})
BAD_REQUEST = _error("The body is not a valid AuthZEN request; error_description says why.")


def _batch_schema() -> dict[str, Any]:
    """Section 7.1: top-level members are defaults; each evaluation must end up with all four
    entities, from itself or from the defaults."""
    each_present = [
        {"anyOf": [
            {"required": [name]},
            {"required": ["evaluations"], "properties": {"evaluations": {
                "minItems": 1, "items": {"required": [name]}}}},
        ]}
        for name in ENTITIES
    ]
    return {
        "type": "object",
        "properties": {
            **{name: _ref(name.capitalize()) for name in ENTITIES},
            "evaluations": {"type": "array", "maxItems": MAX_BATCH,
                            "items": _ref("EvaluationItem")},
            "options": {"type": "object", "properties": {
                "evaluations_semantic": {"enum": list(SEMANTICS)}}},
        },
        "allOf": each_present,
    }


def openapi_document(*, scope: str,
                     token_url: str = "/token",  # noqa: S107 (a URL, not a secret)
                     ) -> dict[str, Any]:
    receipt = {k: v for k, v in receipt_schema().items() if k not in ("$schema", "$id")}
    post_responses = {"400": BAD_REQUEST, "401": UNAUTHORIZED, "403": FORBIDDEN,
                      "429": RATE_LIMITED}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Civitas consent decision API",
            "version": "1.0.0",
            "description": (
                "Shaped on the OpenID AuthZEN Authorization API 1.0: may this agency use "
                "this claim of this citizen for this purpose? Deny by default. A subject "
                "unknown to the asking agency (including another agency's) is answered like "
                "any unknown subject. Every decision is recorded. Send X-Request-ID to have "
                "it echoed."),
        },
        "security": [{"agencyToken": [scope]}, {"agencyCredentials": []}],
        "paths": {
            "/access/v1/evaluation": {"post": {
                "operationId": "evaluate",
                "summary": "One access evaluation (AuthZEN 1.0 section 6)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": _ref("EvaluationRequest")}}},
                "responses": {"200": {"description": "The decision", "content": {
                    "application/json": {"schema": _ref("EvaluationResponse")}}},
                    **post_responses},
            }},
            "/access/v1/evaluations": {"post": {
                "operationId": "evaluateMany",
                "summary": "A batch of access evaluations (AuthZEN 1.0 section 7)",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": _ref("EvaluationsRequest")}}},
                "responses": {"200": {
                    "description": "One decision per evaluation, in order (fewer when a "
                                   "short-circuit semantic stopped early); a single decision "
                                   "when no evaluations array was given",
                    "content": {"application/json": {"schema": {"anyOf": [
                        _ref("EvaluationsResponse"), _ref("EvaluationResponse")]}}}},
                    **post_responses},
            }},
            "/access/v1/receipts/{receipt_id}": {"get": {
                "operationId": "getReceipt",
                "summary": "A consent receipt issued for one of this agency's records",
                "parameters": [{"name": "receipt_id", "in": "path", "required": True,
                                "schema": {"type": "string", "minLength": 1,
                                           "maxLength": 36}}],
                "responses": {
                    "200": {"description": "The signed receipt and its payload", "content": {
                        "application/json": {"schema": _ref("ReceiptResponse")}}},
                    "401": UNAUTHORIZED,
                    "403": FORBIDDEN,
                    "404": _error("No receipt with this id for this agency."),
                    "429": RATE_LIMITED,
                },
            }},
        },
        "components": {
            "securitySchemes": {
                "agencyToken": {"type": "oauth2", "flows": {"clientCredentials": {
                    "tokenUrl": token_url,
                    "scopes": {scope: "Ask the consent decision API"}}}},
                "agencyCredentials": {"type": "http", "scheme": "basic"},
            },
            "schemas": {
                **{name.capitalize(): _entity(name) for name in ENTITIES},
                "EvaluationRequest": {
                    "type": "object", "required": list(ENTITIES),
                    "properties": {name: _ref(name.capitalize()) for name in ENTITIES}},
                "EvaluationItem": {
                    "type": "object",
                    "properties": {name: _ref(name.capitalize()) for name in ENTITIES}},
                "EvaluationsRequest": _batch_schema(),
                "DecisionContext": {
                    "type": "object", "required": ["decision_id", "reason"],
                    "properties": {
                        "decision_id": {"type": "string"},
                        "reason": {"enum": list(REASONS)},
                        "consent_record_id": {"type": ["string", "null"]},
                        "receipt_id": {"type": ["string", "null"]},
                        "lawful_basis": {"type": ["string", "null"]},
                        "expires_at": {"type": ["string", "null"], "format": "date-time"},
                    }},
                "EvaluationResponse": {
                    "type": "object", "required": ["decision", "context"],
                    "properties": {"decision": {"type": "boolean"},
                                   "context": _ref("DecisionContext")}},
                "EvaluationsResponse": {
                    "type": "object", "required": ["evaluations"],
                    "properties": {"evaluations": {"type": "array",
                                                   "items": _ref("EvaluationResponse")}}},
                "ReceiptResponse": {
                    "type": "object", "required": ["receipt_id", "jws", "receipt"],
                    "properties": {
                        "receipt_id": {"type": "string"},
                        "jws": {"type": "string", "description": "Compact JWS (RFC 7515) "
                                "signed by a key in the hub's JWKS; authoritative."},
                        "receipt": _ref("ConsentReceipt")}},
                "ConsentReceipt": receipt,
                "Error": {
                    "type": "object", "required": ["error", "error_description"],
                    "properties": {
                        "error": {"enum": ["invalid_request", "invalid_client",
                                          "invalid_token", "insufficient_scope",
                                          "rate_limited", "not_found"]},
                        "error_description": {"type": "string"}}},
            },
        },
    }
