"""The citizen's side of consent: the consent page at login, the consents section of the
account (list and withdraw, as easy as giving), and receipts (readable and downloadable).

The consent page itself is mounted by the login flow (idp/): it calls
:func:`render_consent_page` to show it and :func:`read_consent_form` to read the answer.
:func:`create_blueprint` returns one blueprint carrying these pages, the templates and, as a
nested blueprint, the agencies' decision API (:mod:`consent.api`).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from flask import (
    Blueprint,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.wrappers import Response

from broker.session import current_login
from kernel.store import ShortLivedStore
from kernel.timefmt import local_time

from .api import AgencyAuthenticator, create_api_blueprint
from .errors import ConsentError, FormExpired, NothingToWithdraw, ReceiptNotFound
from .history import ConsentGrant
from .models import ConsentReceipt
from .policy import LAWFUL_BASES, AgencyPolicy
from .service import ConsentService

NOTICES = {
    "withdrawn": "Your consent was withdrawn. The agency can no longer use that information "
                 "and has been told.",
    "claim-withdrawn": "That information is no longer shared with the agency, and the agency "
                       "has been told.",
    # a second Withdraw (another tab, a double click, Back): the first one did it
    "nothing-to-withdraw": "That was already withdrawn, or is no longer shared: there was "
                           "nothing left to withdraw. Nothing was changed.",
}
EVENT_WORDS = {"given": "Consent given", "renewed": "Consent renewed",
               "withdrawn": "Consent withdrawn"}


#: decisions per page of the citizen's data-access history
HISTORY_PAGE = 25
#: the highest page asked for (a higher one is shown as this one: past the end, empty): its
#: offset, 25 million rows, fits any database's integer (a page of 20 digits did not:
#: SQLite's OverflowError, PostgreSQL's "bigint out of range")
HISTORY_LAST_PAGE = 1_000_000


def check_csrf() -> None:
    """The form's ``csrf`` field must match the session's token (``csrf_token()``)."""
    expected = session.get("csrf")
    given = request.form.get("csrf", "")
    # bytes: compare_digest refuses str holding non-ASCII (a TypeError, a 500)
    if not expected or not hmac.compare_digest(str(expected).encode(), given.encode()):
        raise FormExpired()


# -- the consent page at login -------------------------------------------------------------


@dataclass(frozen=True)
class ConsentItem:
    """One line of the consent page."""

    claim: str
    description: str
    purposes: tuple[str, ...]
    lawful_basis: str
    required: bool
    checked: bool
    sensitive: bool


def consent_items(policy: AgencyPolicy, requested_claims: Iterable[str] | None, *,
                  previous: ConsentGrant | None = None,
                  preselect_optional: bool = False) -> list[ConsentItem]:
    """Required claims first, then optional ones; an optional box starts ticked only if the
    citizen granted it before (or ``preselect_optional``)."""
    offered = policy.offered(None if requested_claims is None else frozenset(requested_claims))
    before = set(previous.claims) if previous is not None and previous.valid else set()
    items = [ConsentItem(
        claim=c.claim, description=c.description or c.claim,
        purposes=tuple(policy.purpose_label(p) for p in c.purposes),
        lawful_basis=LAWFUL_BASES[c.lawful_basis], required=c.required,
        checked=c.required or c.claim in before or preselect_optional,
        sensitive=c.sensitive_category is not None,
    ) for c in offered]
    return sorted(items, key=lambda i: not i.required)


def render_consent_page(policy: AgencyPolicy, requested_claims: Iterable[str] | None, *,
                        action_url: str, hidden: Mapping[str, str] | None = None,
                        previous: ConsentGrant | None = None,
                        preselect_optional: bool = False) -> str:
    """The consent page (``consent/consent.html``). Its form POSTs to ``action_url`` with
    ``csrf``, the ``hidden`` fields, ``claim`` (each ticked optional claim) and
    ``decision`` = ``allow`` or ``deny``; read it back with :func:`read_consent_form`."""
    return render_template(
        "consent/consent.html", policy=policy, action_url=action_url, hidden=hidden or {},
        items=consent_items(policy, requested_claims, previous=previous,
                            preselect_optional=preselect_optional))


@dataclass(frozen=True)
class ConsentAnswer:
    allow: bool
    #: ticked optional claims among those offered; pass to ``record_decision``
    optional: frozenset[str]


def read_consent_form(policy: AgencyPolicy,
                      requested_claims: Iterable[str] | None) -> ConsentAnswer:
    """Check the CSRF token and read Allow/Deny and the ticked optional claims."""
    check_csrf()
    decision = request.form.get("decision")
    if decision not in ("allow", "deny"):
        raise ConsentError("Please choose Allow or Deny.")
    offered = policy.offered(None if requested_claims is None else frozenset(requested_claims))
    optional = {c.claim for c in offered if not c.required}
    ticked = frozenset(set(request.form.getlist("claim")) & optional)
    return ConsentAnswer(allow=decision == "allow", optional=ticked)


# -- the account pages ----------------------------------------------------------------------


def _grant_view(grant: ConsentGrant) -> dict[str, Any]:
    labels: Mapping[str, str] = grant.policy.get("purpose_labels") or {}
    declared: Mapping[str, Any] = grant.policy.get("claims") or {}
    return {
        "grant": grant,
        "claims": [{
            "claim": name,
            "description": (declared.get(name) or {}).get("description") or name,
            "purposes": [labels.get(p, p) for p in granted.purposes],
            "lawful_basis": LAWFUL_BASES.get(granted.lawful_basis, granted.lawful_basis),
            "required": granted.required,
        } for name, granted in sorted(grant.claims.items())],
    }


def receipt_items(receipt: ConsentReceipt, names: Mapping[tuple[str, str], str]) -> list[str]:
    """What a receipt covers (what was given, or what was withdrawn), in the words the
    agency declared (``names``: (client_id, claim) -> description), else the claim's name."""
    client_id = str(receipt.payload.get("civitas", {}).get("clientId", ""))
    claims = sorted({claim for service in receipt.payload.get("services", ())
                     for purpose in service.get("purposes", ())
                     for claim in purpose.get("piiCategory", ())})
    return [names.get((client_id, claim), claim) for claim in claims]


def claim_names(grants: Iterable[ConsentGrant]) -> dict[tuple[str, str], str]:
    """(client_id, claim) -> the description the agency declared for it."""
    names: dict[tuple[str, str], str] = {}
    for grant in grants:
        declared: Mapping[str, Any] = grant.policy.get("claims") or {}
        for claim, spec in declared.items():
            if isinstance(spec, Mapping) and spec.get("description"):
                names[(grant.client_id, claim)] = str(spec["description"])
    return names


def sign_in_then_back(login_url: str) -> Response:
    """The login page at ``login_url``, which leads back to the page asked for afterwards
    (``next``: the login page takes only the hub's own pages)."""
    back = request.full_path if request.query_string else request.path
    return redirect(f"{login_url}?{urlencode({'next': back})}")


def create_blueprint(service: ConsentService, *, authenticate_agency: AgencyAuthenticator,
                     store: ShortLivedStore, decision_scope: str = "consent.decisions",
                     rate_limit: int = 600, rate_window_seconds: int = 60,
                     rate_limit_per_address: int = 0,
                     login_url: str = "/login",
                     token_url: str = "/token",  # noqa: S107 (a URL, not a secret)
                     issuer: str | None = None,
                     describe_agency: Callable[[str], AgencyPolicy | None] | None = None,
                     history_days: int = 0,
                     offline_use: Callable[[str], Mapping[str, tuple[datetime, datetime]]]
                     | None = None,
                     subjects_of: Callable[[str], Sequence[tuple[str, str]]] | None = None
                     ) -> Blueprint:
    """The ``consent`` blueprint: account pages, templates and the decision API (nested as
    ``consent.api``), plus the AuthZEN PDP metadata (``issuer`` is its
    ``policy_decision_point``; the request's host when None). ``history_days``: how long
    the decision log keeps an answer (0: for ever), told on the citizen's history page.
    ``offline_use``: per agency that can act while the citizen is away (live refresh
    grants), when it last did and until when it can, shown on the consents page.
    ``subjects_of``: the account's (agency, ``sub``) at every agency, so that the history
    also shows the questions an agency asked before the citizen signed in there."""
    bp = Blueprint("consent", __name__, template_folder="templates")
    bp.add_app_template_filter(local_time, "local_time")
    bp.register_blueprint(create_api_blueprint(
        service, authenticate_agency=authenticate_agency, store=store,
        scope=decision_scope, rate_limit=rate_limit, rate_window_seconds=rate_window_seconds,
        rate_limit_per_address=rate_limit_per_address, token_url=token_url))

    @bp.get("/.well-known/authzen-configuration")
    def authzen_configuration() -> Response:
        """AuthZEN 1.0 PDP metadata: where agencies find the evaluation endpoints."""
        base = (issuer or request.host_url).rstrip("/")
        response = jsonify(policy_decision_point=base,
                           access_evaluation_endpoint=f"{base}/access/v1/evaluation",
                           access_evaluations_endpoint=f"{base}/access/v1/evaluations")
        response.headers["Cache-Control"] = "public, max-age=3600"
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    def account_id() -> str | None:
        login = current_login(session)
        return login.account_id if login is not None else None

    def own_receipt(owner: str, receipt_id: str) -> ConsentReceipt:
        """The citizen's own receipt; anyone else's is simply not found."""
        found = service.receipt(receipt_id)
        if found is None or found.account_id != owner:
            raise ReceiptNotFound()
        return found

    @bp.get("/account/history")
    def data_access_history() -> str | Response:
        """Who used (or asked to use) the citizen's data, newest first, in plain words (the
        Estonian Data Tracker is the model)."""
        owner = account_id()
        if owner is None:
            return sign_in_then_back(login_url)
        page = min(max(1, request.args.get("page", 1, type=int) or 1), HISTORY_LAST_PAGE)
        rows = service.decisions.for_account(
            owner, limit=HISTORY_PAGE + 1, offset=(page - 1) * HISTORY_PAGE,
            subjects=subjects_of(owner) if subjects_of is not None else ())
        items = []
        for row in rows[:HISTORY_PAGE]:
            policy = describe_agency(row.client_id) if describe_agency else None
            claim = policy.claim(row.claim) if policy is not None else None
            items.append({
                "at": row.at, "agency": policy.name if policy is not None else row.client_id,
                "what": claim.description if claim is not None else row.claim,
                "why": (policy.purpose_labels.get(row.purpose, row.purpose)
                        if policy is not None else row.purpose),
                "allowed": row.decision,
                # it named the citizen's sub there, but no record of theirs was there yet
                "before_record": row.account_id is None,
            })
        return render_template("consent/history.html", items=items, page=page,
                               more=len(rows) > HISTORY_PAGE, kept_days=history_days)

    @bp.get("/account/consents")
    def consents() -> str | Response:
        owner = account_id()
        if owner is None:
            return sign_in_then_back(login_url)
        grants = service.grants_for_account(owner)
        names = claim_names(grants)
        return render_template(
            "consent/account.html", items_of=lambda r: receipt_items(r, names),
            active=[_grant_view(g) for g in grants if g.valid],
            offline=offline_use(owner) if offline_use is not None else {},
            past=[g for g in grants if not g.valid],
            receipts=service.receipts_for_account(owner),
            event_words=EVENT_WORDS, notice=NOTICES.get(session.pop("consent_notice", "")))

    @bp.post("/account/consents/withdraw")
    def withdraw() -> Response:
        check_csrf()
        owner = account_id()
        if owner is None:
            return redirect(login_url, code=303)
        client_id = request.form.get("client_id", "")
        claim = request.form.get("claim") or None
        try:
            service.withdraw(owner, client_id, claim=claim)
        except NothingToWithdraw:
            # not an error page: the citizen sees what they share now, and that nothing
            # changed (the same answer whether or not there ever was such a consent)
            session["consent_notice"] = "nothing-to-withdraw"
            return redirect(url_for("consent.consents"), code=303)
        session["consent_notice"] = "withdrawn" if claim is None else "claim-withdrawn"
        return redirect(url_for("consent.consents"), code=303)

    @bp.get("/account/consents/receipts/<receipt_id>")
    def receipt_page(receipt_id: str) -> str | Response:
        owner = account_id()
        if owner is None:
            return sign_in_then_back(login_url)
        found = own_receipt(owner, receipt_id)
        names = claim_names(service.grants_for_account(owner))
        return render_template("consent/receipt.html", receipt=found, payload=found.payload,
                               items=receipt_items(found, names),
                               client_id=found.payload.get("civitas", {}).get("clientId", ""),
                               names=names,
                               event_words=EVENT_WORDS, bases=LAWFUL_BASES)

    @bp.get("/account/consents/receipts/<receipt_id>/download")
    def receipt_download(receipt_id: str) -> Response:
        owner = account_id()
        if owner is None:
            return sign_in_then_back(login_url)
        found = own_receipt(owner, receipt_id)
        body = json.dumps({"receipt": found.payload, "jws": found.jws}, indent=2,
                          sort_keys=True)
        return Response(body, mimetype="application/json", headers={
            "Content-Disposition": f'attachment; filename="consent-receipt-{found.id}.json"',
            "Cache-Control": "no-store"})

    return bp
