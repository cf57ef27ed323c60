"""Consent in the authorization flow, and what a withdrawal sets off on the provider side.

The consent package keeps the records; this module decides, for one authorization request,
whether the citizen must be asked (claims not yet granted, an expired grant, a new notice
version, or ``prompt=consent``), and releases only granted claims. A withdrawal revokes the
agency's tokens for that citizen and tells the agency by back-channel logout and by a
Security Event Token pushed to its ``event_delivery_uri`` (RFC 8417, RFC 8935).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from consent.policy import AgencyPolicy, ClaimRequest
from consent.service import ConsentService, Withdrawal

from .backchannel import AgencyNotifier, LogoutNotice, SecurityEventNotice
from .claims import COMPANIONS, SCOPE_CLAIMS
from .provider import ProviderServices

log = logging.getLogger(__name__)

PENDING_LIFETIME = 900


#: OpenID Connect Core 11: the OP "MUST always obtain consent to returning a Refresh Token
#: that enables offline access". Put to the citizen as one more optional item of the agency's
#: consent (never ticked in advance), so that it is recorded, receipted, withdrawn and
#: expires as every other: the agency gets a refresh token only while it is granted.
OFFLINE_ACCESS = "offline_access"
OFFLINE_PURPOSE = "offline-access"
OFFLINE_ACCESS_CLAIM = ClaimRequest(
    claim=OFFLINE_ACCESS, purposes=(OFFLINE_PURPOSE,), lawful_basis="consent", required=False,
    description="Access while you are away")
OFFLINE_PURPOSE_LABEL = ("to keep getting the information you allow without you signing in "
                         "again, until you withdraw it or your consent ends")


def with_offline_access(policy: AgencyPolicy) -> AgencyPolicy:
    """``policy`` with the offline access item (for an agency that may have refresh
    tokens), unless the agency declared it itself."""
    if policy.claim(OFFLINE_ACCESS) is not None:
        return policy
    return dataclasses.replace(
        policy, claims=(*policy.claims, OFFLINE_ACCESS_CLAIM),
        purpose_labels={OFFLINE_PURPOSE: OFFLINE_PURPOSE_LABEL, **policy.purpose_labels})


def requested_claims(scope: str, policy: AgencyPolicy) -> set[str]:
    """The declared claims a scope asks for (companion claims ride with their claim), and
    offline access when the scope has ``offline_access``."""
    scopes = scope.split()
    names = {n for s in scopes for n in SCOPE_CLAIMS.get(s, ())}
    if OFFLINE_ACCESS in scopes:
        names.add(OFFLINE_ACCESS)
    return {c.claim for c in policy.claims if c.claim in names}


def default_policy(client_id: str, name: str, scopes: list[str], notice_url: str) -> AgencyPolicy:
    """For an agency that declared nothing: each claim of its scopes, required, to deliver
    the service it was registered for, on the basis of consent."""
    claims = []
    for scope in scopes:
        for claim in SCOPE_CLAIMS.get(scope, ()):
            if claim in COMPANIONS:
                continue
            claims.append(ClaimRequest(
                claim=claim, purposes=("service-delivery",), lawful_basis="consent",
                required=True, description=f"Your {claim.replace('_', ' ')}"))
    return AgencyPolicy(client_id=client_id, name=name, claims=tuple(claims),
                        notice_url=notice_url, notice_version="unversioned",
                        purpose_labels={"service-delivery": "to provide the service you use"})


@dataclass
class PendingConsent:
    """An authorization request waiting for the citizen's answer, kept in the session."""

    id: str
    params: dict[str, str]
    started_at: int
    #: the login it was asked under (account id and when it signed in): the answer counts
    #: only from that login (another citizen may have signed in in this browser since)
    login: tuple[str, int] = ("", 0)


def park(session: Any, params: dict[str, str], *, login: tuple[str, int]) -> PendingConsent:
    pending = {k: v for k, v in session.get("consent_requests", {}).items()
               if time.time() - v["started_at"] < PENDING_LIFETIME}
    while len(pending) >= 8:
        pending.pop(min(pending, key=lambda k: pending[k]["started_at"]))
    item = PendingConsent(id=secrets.token_urlsafe(16), params=params,
                          started_at=int(time.time()), login=login)
    pending[item.id] = {"params": params, "started_at": item.started_at,
                        "login": list(login)}
    session["consent_requests"] = pending
    return item


def unpark(session: Any, request_id: str, *, remove: bool) -> PendingConsent | None:
    pending = dict(session.get("consent_requests", {}))
    data = pending.get(request_id)
    if data is None or time.time() - data["started_at"] >= PENDING_LIFETIME:
        return None
    if remove:
        pending.pop(request_id)
        session["consent_requests"] = pending
    account_id, signed_in_at = data.get("login") or ("", 0)
    return PendingConsent(id=request_id, params=data["params"], started_at=data["started_at"],
                          login=(str(account_id), int(signed_in_at)))


def make_withdrawal_handler(hub: ProviderServices, dispatcher: AgencyNotifier
                            ) -> Callable[[Withdrawal], None]:
    def on_withdraw(w: Withdrawal) -> None:
        """Withdrawal takes effect at once: after its commit (which ended the agency's
        refresh grants and queued its notices: :func:`make_withdrawal_writes`), the
        agency's access tokens for this citizen die too."""
        # the mark first: a code exchange that read the consent before this withdrawal and
        # makes its refresh grant after the revocation below looks for it (CodeGrant)
        hub.tokens.mark_agency_revoked(w.account_id, w.client_id)
        hub.refresh_tokens.revoke_account(w.account_id, w.client_id)
        dispatcher.wake()
        log.info("consent withdrawn: agency %s tokens revoked", w.client_id)

    return on_withdraw


def make_withdrawal_writes(hub: ProviderServices, dispatcher: AgencyNotifier
                           ) -> Callable[[Session, Withdrawal], None]:
    def with_withdrawal(s: Session, w: Withdrawal) -> None:
        """In the withdrawal's own transaction: the agency's refresh grants for this citizen
        end, and the agency is to be told by back-channel logout and by a Security Event
        Token if it can be. Should the hub fail once the withdrawal has committed, neither
        is lost (a withdrawal cannot be made twice)."""
        hub.refresh_tokens.revoke_agency_within(s, w.account_id, w.client_id)
        client = hub.agencies.client(w.client_id)
        if client is not None and client.backchannel_logout_uri:
            dispatcher.enqueue([LogoutNotice(
                client_id=client.client_id, logout_uri=client.backchannel_logout_uri,
                alg=client.id_token_signed_response_alg,
                sub=hub.subject_for(client, w.account_id), sid="")], within=s)
        if client is not None and client.event_delivery_uri:
            dispatcher.enqueue_events([SecurityEventNotice(
                client_id=client.client_id, event_uri=client.event_delivery_uri,
                alg=client.id_token_signed_response_alg,
                sub=hub.subject_for(client, w.account_id), withdrawn=w.claims,
                complete=w.complete, event_time=int(w.at.timestamp()))], within=s)

    return with_withdrawal


__all__ = ["OFFLINE_ACCESS", "ConsentService", "PendingConsent", "default_policy",
           "make_withdrawal_handler", "make_withdrawal_writes", "park", "requested_claims",
           "unpark", "with_offline_access"]
