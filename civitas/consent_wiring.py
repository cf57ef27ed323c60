"""Wiring the consent package to the OpenID provider: receipt signing with the hub's keys,
agency policies from settings, and agency authentication for the decision API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from authlib.oauth2.rfc6749.errors import OAuth2Error
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey

from config import Settings
from consent.api import BearerRefused
from consent.policy import AgencyContact, AgencyPolicy, ClaimRequest
from idp.keys import KeyRing
from idp.provider import AUTH_METHODS, HubAuthorizationServer


class HubReceiptSigner:
    """Consent receipts are JWS signed with the hub's current key (published in the JWKS),
    typed so a receipt can never pass for a token."""

    def __init__(self, keys: KeyRing, alg: str) -> None:
        self._keys = keys
        self._alg = alg

    def sign(self, payload: dict[str, Any]) -> str:
        import json

        key = self._keys.signing_key(self._alg)
        signing_key: ECKey | RSAKey = key.key
        header = {"alg": key.alg, "kid": key.kid, "typ": "kantara-cr+jws"}
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True)
        return str(jws.serialize_compact(header, body, signing_key, algorithms=[key.alg]))

    def jwks(self) -> dict[str, Any]:
        return self._keys.jwks()


def agency_policies(settings: Settings) -> dict[str, AgencyPolicy]:
    policies = {}
    for agency in settings.agencies:
        decl = agency.consent
        if decl is None:
            continue
        policies[agency.client_id] = AgencyPolicy(
            client_id=agency.client_id, name=agency.name,
            claims=tuple(ClaimRequest(claim=c.claim, purposes=tuple(c.purposes),
                                      lawful_basis=c.lawful_basis, required=c.required,
                                      description=c.description) for c in decl.claims),
            notice_url=decl.notice_url, notice_version=decl.notice_version,
            notice_language=decl.notice_language, consent_ttl_days=decl.consent_ttl_days,
            jurisdiction=decl.jurisdiction, purpose_labels=dict(decl.purpose_labels),
            contact=AgencyContact(contact=decl.contact_name, email=decl.contact_email,
                                  phone=decl.contact_phone, street_address=decl.contact_address,
                                  address_country=decl.contact_country, url=decl.contact_url),
        )
    return policies


def receipt_contact_notices(policies: Mapping[str, AgencyPolicy]) -> list[str]:
    """One line per agency whose consent receipts would not say how to reach its privacy
    office (:meth:`AgencyPolicy.receipt_contact_gaps`), naming the settings to add."""
    setting = {"contact": "contact_name", "email": "contact_email", "phone": "contact_phone",
               "address": "contact_address"}
    notices = []
    for client_id, policy in sorted(policies.items()):
        gaps = policy.receipt_contact_gaps()
        if gaps:
            notices.append(
                f"agency {client_id!r}: its consent receipts give no {', '.join(gaps)} for "
                "its privacy office (Kantara Consent Receipt 1.1 asks for them): set "
                + ", ".join(f"consent.{setting[g]}" for g in gaps))
    return notices


def agency_authenticator(server: HubAuthorizationServer, scope: str) -> Any:
    """The decision API authenticates an agency by a client_credentials access token with
    ``scope`` (RFC 6750 2.1), or the way the token endpoint does (client secret, or
    private_key_jwt). A bearer token that is not such a token is refused (RFC 6750 3.1:
    :class:`~consent.api.BearerRefused`, invalid_token or insufficient_scope), never retried
    as client credentials."""
    services = server.hub

    def authenticate(request: Any) -> str | None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            record = services.access_tokens.verify(value.strip())
            if record is None or services.agencies.client(record.client_id) is None:
                raise BearerRefused("invalid_token")
            if not record.for_client_itself or scope not in record.scope.split():
                raise BearerRefused("insufficient_scope")
            return record.client_id
        try:
            client = server.authenticate_client(server.create_oauth2_request(None),
                                                AUTH_METHODS, "consent")
        except OAuth2Error:
            return None
        return str(client.client_id)

    return authenticate

