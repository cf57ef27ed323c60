"""What an agency declares it asks for: claims, purposes, lawful basis, privacy notice.

These are the "notice" half of a consent record (ISO/IEC TS 27560:2023, the notice and the
purposes a record refers to) and the controller and service parts of a Kantara Consent
Receipt v1.1 (``piiControllers``, ``policyUrl``, ``services[].purposes[]``). The composition
root builds them from settings; they are plain frozen values and validate themselves, naming
the offending field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

#: GDPR Art. 6(1)(a)-(f) and the ISO/IEC TS 27560 vocabulary of legal bases. ``consent`` is
#: the only one a citizen can refuse without losing the service; the others are still shown.
LAWFUL_BASES: dict[str, str] = {
    "consent": "your consent",
    "contract": "a contract with you",
    "legal_obligation": "a legal obligation of the agency",
    "vital_interests": "protecting someone's life",
    "public_task": "a task the agency carries out in the public interest",
    "legitimate_interests": "the agency's legitimate interests",
}

#: claim and purpose identifiers: what agencies send to the decision API
_IDENT = re.compile(r"^[A-Za-z0-9_.:\-]{1,100}$")


def _check_ident(value: str, what: str) -> None:
    if not _IDENT.match(value):
        raise ValueError(f"{what} {value!r} must be 1 to 100 letters, digits or '_.:-'")


@dataclass(frozen=True)
class ClaimRequest:
    """One claim an agency asks for, why, and on which lawful basis."""

    claim: str
    #: purpose identifiers (``context.purpose`` in the decision API)
    purposes: tuple[str, ...]
    lawful_basis: str
    required: bool
    #: plain words shown to the citizen: what the claim is and why the agency needs it
    description: str
    #: Kantara CR v1.1 ``spiCat``: the sensitive category of this claim, if it has one
    sensitive_category: str | None = None

    def __post_init__(self) -> None:
        _check_ident(self.claim, "claim")
        if not self.purposes:
            raise ValueError(f"claim {self.claim!r}: at least one purpose is needed")
        for purpose in self.purposes:
            _check_ident(purpose, f"claim {self.claim!r}: purpose")
        if self.lawful_basis not in LAWFUL_BASES:
            raise ValueError(f"claim {self.claim!r}: lawful_basis must be one of "
                             f"{', '.join(LAWFUL_BASES)}")


@dataclass(frozen=True)
class AgencyContact:
    """How to reach the agency's privacy office (Kantara CR v1.1 ``piiControllers[]``)."""

    contact: str = ""
    email: str = ""
    phone: str = ""
    street_address: str = ""
    address_country: str = ""
    url: str = ""


@dataclass(frozen=True, kw_only=True)
class AgencyPolicy:
    """An agency's declaration: the claims it asks for and the notice that explains them."""

    client_id: str
    name: str
    claims: tuple[ClaimRequest, ...]
    notice_url: str
    notice_version: str
    notice_language: str = "en"
    #: days a grant stays valid; None = until withdrawn
    consent_ttl_days: int | None = None
    jurisdiction: str = "US"
    #: plain words for each purpose identifier; the identifier itself is shown when absent
    purpose_labels: Mapping[str, str] = field(default_factory=dict)
    contact: AgencyContact = field(default_factory=AgencyContact)

    def __post_init__(self) -> None:
        if not self.client_id or not self.name:
            raise ValueError("agency policy: client_id and name are required")
        names = [c.claim for c in self.claims]
        if len(set(names)) != len(names):
            raise ValueError(f"agency {self.client_id!r}: a claim is declared twice")
        if not self.notice_url or not self.notice_version:
            raise ValueError(f"agency {self.client_id!r}: notice_url and notice_version "
                             "are required")
        if self.consent_ttl_days is not None and self.consent_ttl_days < 1:
            raise ValueError(f"agency {self.client_id!r}: consent_ttl_days must be >= 1")

    def claim(self, name: str) -> ClaimRequest | None:
        return next((c for c in self.claims if c.claim == name), None)

    def offered(self, requested: set[str] | frozenset[str] | None) -> tuple[ClaimRequest, ...]:
        """The declared claims among those requested (all declared ones when None).

        A requested claim the agency did not declare is never offered, so never released."""
        if requested is None:
            return self.claims
        return tuple(c for c in self.claims if c.claim in requested)

    def purpose_label(self, purpose: str) -> str:
        return self.purpose_labels.get(purpose, purpose)

    def receipt_contact_gaps(self) -> list[str]:
        """The ways of reaching the agency's privacy office that its consent receipts leave
        empty, of those Kantara Consent Receipt 1.1 requires of every PII controller
        (``contact``, the name to write to; ``email``, ``phone``, ``address``): a citizen
        holding a receipt should be able to write, call or send a letter, and know to whom."""
        given = {"contact": self.contact.contact, "email": self.contact.email,
                 "phone": self.contact.phone, "address": self.contact.street_address}
        return [name for name, value in given.items() if not value.strip()]

    def snapshot(self) -> dict[str, object]:
        """The notice as it stood, kept with every consent event (ISO/IEC TS 27560 notice)."""
        return {
            "client_id": self.client_id,
            "name": self.name,
            "notice_url": self.notice_url,
            "notice_version": self.notice_version,
            "notice_language": self.notice_language,
            "jurisdiction": self.jurisdiction,
            "consent_ttl_days": self.consent_ttl_days,
            "purpose_labels": dict(self.purpose_labels),
            "contact": {
                "contact": self.contact.contact, "email": self.contact.email,
                "phone": self.contact.phone, "street_address": self.contact.street_address,
                "address_country": self.contact.address_country, "url": self.contact.url,
            },
            "claims": {
                c.claim: {"purposes": list(c.purposes), "lawful_basis": c.lawful_basis,
                          "required": c.required, "description": c.description,
                          "sensitive_category": c.sensitive_category}
                for c in self.claims
            },
        }
