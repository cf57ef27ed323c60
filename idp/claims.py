"""Which claims each scope releases (OpenID Connect Core 1.0 section 5.4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SCOPE_CLAIMS: dict[str, tuple[str, ...]] = {
    "profile": ("name", "family_name", "given_name", "middle_name", "nickname",
                "preferred_username", "profile", "picture", "website", "gender", "birthdate",
                "zoneinfo", "locale", "updated_at"),
    "email": ("email", "email_verified"),
}


def scope_claim_names(scope: str) -> frozenset[str]:
    """The claims a scope can release (OpenID Connect Core 5.4): the only attributes a
    request with it needs to decrypt."""
    return frozenset(name for s in scope.split() for name in SCOPE_CLAIMS.get(s, ()))


def claims_for_scope(attributes: Mapping[str, Any], scope: str) -> dict[str, Any]:
    released: dict[str, Any] = {}
    for s in scope.split():
        for name in SCOPE_CLAIMS.get(s, ()):
            if name in attributes:
                released[name] = attributes[name]
    return released


#: claims released together with the claim that carries their meaning
COMPANIONS = {"email_verified": "email", "phone_number_verified": "phone_number"}


def releasable(claims: Mapping[str, Any], granted: set[str]) -> dict[str, Any]:
    """Only what the citizen granted this agency (``sub`` always)."""
    return {k: v for k, v in claims.items()
            if k == "sub" or k in granted or COMPANIONS.get(k) in granted}
