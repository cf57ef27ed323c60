"""Consent receipts: Kantara Initiative Consent Receipt Specification v1.1.0 (2018-02-20).

Every grant and every withdrawal produces one receipt: the JSON document of the
specification's field tables (``version`` "KI-CR-v1.1.0", ``jurisdiction``,
``consentTimestamp`` in integer seconds, ``collectionMethod``, ``consentReceiptID`` a UUIDv4,
``language``, ``piiPrincipalId``, ``piiControllers``, ``policyUrl``, ``services`` with their
``purposes``, ``sensitive``, ``spiCat``), signed as a compact JWS by the hub key that the
injected :class:`ReceiptSigner` holds and publishes in the JWKS. Civitas adds one extension
member, ``civitas``, that ties the receipt to its ISO/IEC TS 27560 record and event.

``consent/receipt.schema.json`` is the JSON Schema every receipt here satisfies.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from importlib import resources
from typing import Any, Protocol

from .history import GrantedClaim

VERSION = "KI-CR-v1.1.0"

COLLECTION_METHODS = {
    "web-form": "Consent page shown by the Civitas sign-in hub before signing in to the agency",
    "account-page": "Civitas account page, consents section",
    "account-deletion": "Deletion of the Civitas account",
}


class ReceiptSigner(Protocol):
    """Signs receipts with a hub key (provided by the OpenID provider, injected).

    ``sign`` returns a compact JWS over the JSON payload whose header names the key (``kid``);
    ``jwks`` is the public key set that verifies it (the hub's published JWKS).
    """

    def sign(self, payload: dict[str, Any]) -> str: ...

    def jwks(self) -> dict[str, Any]: ...


def receipt_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of the receipts this module builds."""
    text = resources.files("consent").joinpath("receipt.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def _when(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M UTC")


def _services(policy: Mapping[str, Any], claims: Iterable[GrantedClaim], *,
              termination: str) -> list[dict[str, Any]]:
    """One service (the agency) whose purposes group the claims by purpose and basis."""
    labels: Mapping[str, str] = policy.get("purpose_labels") or {}
    groups: dict[tuple[str, str], list[GrantedClaim]] = {}
    for claim in claims:
        for purpose in claim.purposes:
            groups.setdefault((purpose, claim.lawful_basis), []).append(claim)
    purposes = []
    for (purpose, basis), members in sorted(groups.items()):
        purposes.append({
            "purpose": labels.get(purpose, purpose),
            "purposeCategory": [purpose],
            "consentType": "EXPLICIT",
            "piiCategory": sorted(c.claim for c in members),
            "primaryPurpose": any(c.required for c in members),
            "termination": termination,
            "thirdPartyDisclosure": False,
            "lawfulBasis": basis,
        })
    return [{"service": str(policy.get("name", "")), "purposes": purposes}]


def build_receipt(*, receipt_id: str, at: datetime, event_kind: str, method: str,
                  subject: str, policy: Mapping[str, Any], claims: Iterable[GrantedClaim],
                  record_id: str, record_schema_version: str,
                  expires_at: datetime | None) -> dict[str, Any]:
    """The receipt payload (unsigned). ``claims`` are those granted (for a grant) or
    withdrawn (for a withdrawal); ``policy`` is the agency's notice snapshot."""
    claims = list(claims)
    withdrawn = event_kind == "withdrawn"
    if withdrawn:
        termination = f"Withdrawn by the PII principal on {_when(at)}"
    elif expires_at is not None:
        termination = ("When the PII principal withdraws it in their Civitas account, or "
                       f"on {_when(expires_at)} when it expires")
    else:
        termination = "When the PII principal withdraws it in their Civitas account"
    declared: Mapping[str, Any] = policy.get("claims") or {}
    spi = sorted({str(declared[c.claim]["sensitive_category"]) for c in claims
                  if declared.get(c.claim, {}).get("sensitive_category")})
    contact: Mapping[str, str] = policy.get("contact") or {}
    controller: dict[str, Any] = {
        "piiController": str(policy.get("name", "")),
        "contact": contact.get("contact", ""),
        "address": {"streetAddress": contact.get("street_address", ""),
                    "addressCountry": contact.get("address_country", "")},
        "email": contact.get("email", ""),
        "phone": contact.get("phone", ""),
    }
    if contact.get("url"):
        controller["piiControllerUrl"] = contact["url"]
    return {
        "version": VERSION,
        "jurisdiction": str(policy.get("jurisdiction", "")),
        "consentTimestamp": int(at.timestamp()),
        "collectionMethod": COLLECTION_METHODS.get(method, method),
        "consentReceiptID": receipt_id,
        "language": str(policy.get("notice_language", "en")),
        "piiPrincipalId": subject,
        "piiControllers": [controller],
        "policyUrl": str(policy.get("notice_url", "")),
        "services": _services(policy, claims, termination=termination),
        "sensitive": bool(spi),
        "spiCat": spi,
        "civitas": {
            "recordId": record_id,
            "recordSchemaVersion": record_schema_version,
            "event": event_kind,
            "clientId": str(policy.get("client_id", "")),
            "noticeVersion": str(policy.get("notice_version", "")),
            "collectionMethod": method,
            "expiresAt": int(expires_at.timestamp()) if expires_at is not None else None,
        },
    }
