"""Consent: records, the agency decision API, signed receipts, the citizen's consents pages.

Standards: ISO/IEC TS 27560:2023 (consent record information structure: a record with an
append-only list of events, :mod:`consent.models`, :mod:`consent.history`), the OpenID AuthZEN
Authorization API 1.0 (the decision API, :mod:`consent.decisions`, :mod:`consent.api`,
:mod:`consent.openapi`), the Kantara Initiative Consent Receipt Specification v1.1.0 (signed
receipts, :mod:`consent.receipts`, ``consent/receipt.schema.json``).

Dependencies: kernel/ and broker/ (``current_login``) only. Everything that needs the OpenID
provider is injected: a :class:`ReceiptSigner`, an ``on_withdraw`` hook and an
``authenticate_agency`` function.

Integration (what the composition root and the login flow call)
===============================================================

Import from the modules (this file imports nothing, so ``consent.ledger`` and its offline
verifier stay light): ``consent.policy`` (AgencyPolicy, ClaimRequest, AgencyContact,
LAWFUL_BASES), ``consent.service`` (ConsentService, Withdrawal), ``consent.receipts``
(ReceiptSigner), ``consent.history`` (ConsentGrant), ``consent.views`` (create_blueprint,
render_consent_page, read_consent_form, ConsentAnswer).

Agencies' declarations (built from settings, one per agency)::

    AgencyPolicy(client_id=..., name=..., notice_url=..., notice_version=...,
                 claims=(ClaimRequest(claim, purposes, lawful_basis, required, description,
                                      sensitive_category=None), ...),
                 notice_language="en", consent_ttl_days=None, jurisdiction="US",
                 purpose_labels={purpose_id: "plain words"}, contact=AgencyContact(...))

``lawful_basis`` is one of :data:`LAWFUL_BASES` (consent, contract, legal_obligation,
vital_interests, public_task, legitimate_interests). Both classes validate themselves and
raise ``ValueError`` naming the agency and field. ``AgencyPolicy`` is keyword-only.

The service (one per hub)::

    consent = ConsentService(db, signer, on_withdraw=hook, clock=utcnow)

- ``signer``: a :class:`ReceiptSigner`: ``sign(payload: dict) -> str`` (compact JWS, header
  with ``kid``; use an explicit ``typ`` such as ``"kantara-cr+jws"`` so a receipt can never
  pass for an ID or access token, RFC 8725 3.11) and ``jwks() -> dict`` (the hub JWKS).
- ``on_withdraw(w: Withdrawal) -> None``: called after a withdrawal is committed, with
  ``account_id, client_id, subject`` (pairwise sub), ``claims`` withdrawn, ``complete`` (whole
  grant or optional claims only), ``record_id, receipt_id, at``. Wire it to token revocation,
  back-channel logout and the Security Event Token; queue deliveries, do not raise for them.

At login (idp/), with ``requested`` = the claims the request's scopes ask for::

    if "consent" in prompts or consent.needs_consent(account_id, policy, requested):
        # prompt=none -> consent_required; otherwise show the page:
        html = render_consent_page(policy, requested, action_url=..., hidden={"flow": id},
                                   previous=consent.current(account_id, client_id))
    # on the POST:
    answer = read_consent_form(policy, requested)      # checks CSRF; Allow/Deny + ticked
    if answer.allow:
        consent.record_decision(account_id, policy, sub, answer.optional,
                                requested_claims=requested)      # -> ConsentGrant
    else:
        consent.record_refusal(account_id, policy, sub, requested_claims=requested)
        # -> access_denied to the agency
    released = consent.granted_claims(account_id, client_id) & claims_of(scope)

``sub`` is the agency's pairwise subject: it is stored with the grant, it is the
``piiPrincipalId`` of receipts and the subject agencies send to the decision API. Claims the
agency did not declare in its policy are never offered and never released. The page is the
template ``consent/consent.html`` (extends ``layout.html``, uses ``csrf_token()``).

Other calls: ``consent.current(account_id, client_id)`` / ``state_at(..., at)`` ->
:class:`ConsentGrant` or None; ``consented_at(account_id, client_id, claim, purpose, at)``;
``history(account_id, client_id)``; ``withdraw(account_id, client_id, claim=None)``;
``withdraw_all(account_id)`` (call it on account deletion); ``expire_due()`` (optional
periodic job: expiry takes effect at its time anyway, this writes the ``expired`` events);
``receipts_for_account``; ``consent.decisions.for_account(account_id)`` (data-access history).

HTTP (register once)::

    app.register_blueprint(create_blueprint(
        consent, authenticate_agency=fn, store=hub.store, decision_scope="consent.decisions",
        rate_limit=600, rate_window_seconds=60, login_url="/login",
        token_url=f"{issuer}/token", issuer=issuer))

``authenticate_agency(request) -> client_id | None``: a client_credentials access token
carrying ``decision_scope``, or the agency's client credentials (HTTP Basic). Routes:

- ``GET /account/consents`` (``consent.consents``), ``POST /account/consents/withdraw``
  (form: ``csrf``, ``client_id``, optional ``claim``), ``GET
  /account/consents/receipts/<id>`` and ``.../<id>/download``: the citizen's pages; without a
  hub login they redirect to ``login_url``.
- ``POST /access/v1/evaluation``, ``POST /access/v1/evaluations``, ``GET
  /access/v1/receipts/<id>`` (agency-authenticated, rate-limited per agency, JSON errors) and
  ``GET /access/v1/openapi.json`` (nested blueprint ``consent.api``), and the AuthZEN PDP
  metadata ``GET /.well-known/authzen-configuration``.

Storage: tables ``consent_records``, ``consent_events``, ``consent_receipts``,
``consent_decisions`` (migration 0005); ``civitas/migrations/env.py`` must ``import
consent.models``. Templates ``consent/consent.html``, ``consent/account.html``,
``consent/receipt.html``; ``consent/receipt.schema.json`` must be packaged (``*.json``).
"""
