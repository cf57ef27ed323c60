"""The OpenID provider's HTTP endpoints: a thin Flask adapter over :mod:`idp.provider`."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from authlib.common.urls import add_params_to_uri
from authlib.oauth2.rfc6749.errors import AccessDeniedError, InvalidRequestError, OAuth2Error
from authlib.oidc.core.errors import ConsentRequiredError, LoginRequiredError
from flask import Blueprint, jsonify, redirect, render_template, request, session, url_for
from werkzeug.wrappers import Response

from broker.errors import LoginExpired
from broker.service import Broker
from broker.session import HubLogin, current_login
from consent.decisions import LatestState
from consent.history import needs_consent
from consent.views import check_csrf, read_consent_form, render_consent_page

from .agencies import ID_TOKEN_ALGS, SERVICE_SCOPES
from .agency_keys import ASSERTION_ALGS
from .claims import SCOPE_CLAIMS, scope_claim_names
from .consent_step import OFFLINE_ACCESS, PENDING_LIFETIME, park, requested_claims, unpark
from .errors import ConsentAlreadyAnswered
from .keys import JWKS_MAX_AGE_SECONDS
from .provider import (
    AUTH_METHODS,
    HubAuthorizationServer,
    StoredAuthorizationRequest,
    repeated_parameter,
)


class UnmetAuthenticationRequirements(OAuth2Error):  # type: ignore[misc]
    """OpenID Connect Core 1.0 errata set 2, 3.1.2.6: no upstream can give the requested acr."""

    error = "unmet_authentication_requirements"


def requested_acrs(params: Any) -> list[str] | None:
    values = (params.get("acr_values") or "").split()
    return values or None


#: the most digits a ``max_age`` may have: 2**64 - 1 (a client's "any age") has 20
MAX_AGE_DIGITS = 20
#: how far the upstream's clock may be behind the hub's when its auth_time is compared with
#: the start of the request that asked for a fresh sign-in
AUTH_TIME_LEEWAY_SECONDS = 10

#: the WSGI environ key of the consent state that /authorize read with the account
CONSENT_READ = "civitas.consent_read"

UNSUPPORTED_PARAMS = {
    "request": "request_not_supported",
    "request_uri": "request_uri_not_supported",
    "registration": "registration_not_supported",
}


def discovery_document(issuer: str, acr_values: list[str], *,
                       public_subjects: bool = False) -> dict[str, Any]:
    """OpenID Connect Discovery 1.0 section 3 / RFC 8414."""
    return {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/authorize",
        "token_endpoint": f"{issuer}/token",
        "revocation_endpoint": f"{issuer}/revoke",
        "introspection_endpoint": f"{issuer}/introspect",
        "revocation_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "revocation_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
        "introspection_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "introspection_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
        "userinfo_endpoint": f"{issuer}/userinfo",
        "jwks_uri": f"{issuer}/jwks",
        "end_session_endpoint": f"{issuer}/logout/end-session",
        "backchannel_logout_supported": True,
        "backchannel_logout_session_supported": True,
        "scopes_supported": ["openid", "profile", "email", "offline_access",
                             *SERVICE_SCOPES],
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token",
                                  "client_credentials"],
        "subject_types_supported": ["pairwise", "public"] if public_subjects else ["pairwise"],
        "id_token_signing_alg_values_supported": list(ID_TOKEN_ALGS),
        "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
        "code_challenge_methods_supported": ["S256"],
        # every claim a scope can release (idp/claims.py), which upstreams may supply
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "acr",
                             "amr", "sid", "at_hash",
                             *dict.fromkeys(name for names in SCOPE_CLAIMS.values()
                                            for name in names)],
        "claims_parameter_supported": False,
        "request_parameter_supported": False,
        "request_uri_parameter_supported": False,
        "authorization_response_iss_parameter_supported": True,
        "prompt_values_supported": ["none", "login", "consent", "select_account"],
        "acr_values_supported": acr_values,
    }


def create_blueprint(server: HubAuthorizationServer, broker: Broker) -> Blueprint:
    bp = Blueprint("idp", __name__, template_folder="templates")
    hub = server.hub
    discovery = discovery_document(hub.issuer, sorted(broker.offered_acrs()),
                                   public_subjects=hub.agencies.policy.allow_public_subjects)

    def with_iss(response: Response) -> Response:
        location = response.headers.get("Location")
        if location and "iss" not in parse_qs(urlsplit(location).query):
            response.headers["Location"] = add_params_to_uri(location, {"iss": hub.issuer})
        return response

    def error_response(oauth_request: Any, error: OAuth2Error) -> Response:
        if error.redirect_uri:
            # Redirect only to a URI already validated against the agency (RFC 6749 4.1.2.1).
            return with_iss(server.handle_error_response(oauth_request, error))
        return Response(
            render_template("idp/error.html", error=error.error,
                            description=error.get_error_description()),
            status=400, mimetype="text/html",
        )

    def active_login(client_id: Any = None) -> HubLogin | None:
        """The hub session's login while its account exists. With ``client_id`` (not yet
        validated), the citizen's consent state with that agency is read in the same round
        trip and kept in this request's WSGI environ for :func:`finish` (not in ``g``: an
        application context can outlive a request)."""
        login = current_login(session)
        if login is None:
            return None
        if isinstance(client_id, str) and client_id and hub.citizens is not None:
            live, state = hub.citizens.login(login.account_id, client_id)
            request.environ[CONSENT_READ] = (login.account_id, client_id, state)
        else:
            live = hub.accounts.exists(login.account_id)
        if not live:
            session.clear()  # the account is gone; its session must not be used again
            return None
        return login

    def consent_state(account_id: str, client_id: str) -> LatestState | None:
        """The consent record's state now: the one :func:`active_login` read in this request
        for this citizen and agency, else read now."""
        assert hub.consent is not None
        known = request.environ.pop(CONSENT_READ, None)
        if known is not None and known[:2] == (account_id, client_id):
            return known[2]  # type: ignore[no-any-return]
        return hub.consent.latest(account_id, client_id)

    @bp.route("/authorize", methods=["GET", "POST"])
    def authorize() -> Response:
        oauth_request = server.create_oauth2_request(None)
        login = active_login(oauth_request.payload.client_id)
        try:
            grant = server.get_consent_grant(request=oauth_request, end_user=login)
            redirect_uri = grant.request.payload.redirect_uri
            # RFC 6749 3.1: "Parameters sent without a value MUST be treated as if they were
            # omitted from the request" (max_age=, response_mode=, prompt=...)
            params = {name: value for name, value in grant.request.payload.data.items()
                      if value != ""}
            repeated = repeated_parameter(grant.request)
            if repeated is not None:
                # RFC 6749 3.1: "MUST NOT be included more than once" (Authlib refuses five
                # of them itself; prompt=none&prompt=login took the first); the client and
                # redirect URI are known good by now, so the agency is told there
                raise InvalidRequestError(f"Multiple '{quote(repeated, safe='')}' in request.",
                                          redirect_uri=redirect_uri, state=params.get("state"))
            for name, code in UNSUPPORTED_PARAMS.items():
                if params.get(name):
                    err = InvalidRequestError(f"'{name}' is not supported",
                                              redirect_uri=redirect_uri,
                                              state=params.get("state"))
                    err.error = code
                    raise err
            if "openid" not in (params.get("scope") or "").split():
                # Civitas is an OpenID provider: every request is an authentication request.
                err = InvalidRequestError("The 'openid' scope is required.",
                                          redirect_uri=redirect_uri, state=params.get("state"))
                err.error = "invalid_scope"
                raise err
            if params.get("response_mode", "query") != "query":
                raise InvalidRequestError("Only response_mode=query is supported.",
                                          redirect_uri=redirect_uri, state=params.get("state"))
            prompts = set((params.get("prompt") or "").split())
            max_age_raw = params.get("max_age")
            max_age: int | None = None
            if max_age_raw is not None:
                raw = str(max_age_raw)
                # digits capped: int() refuses a string of 4,300 digits or more (a 500)
                if not (raw.isascii() and raw.isdigit() and len(raw) <= MAX_AGE_DIGITS):
                    raise InvalidRequestError(
                        f"'max_age' must be a non-negative integer of at most "
                        f"{MAX_AGE_DIGITS} digits", redirect_uri=redirect_uri,
                        state=params.get("state"))
                max_age = int(raw)
            acrs = requested_acrs(params)
            if acrs is not None and not set(acrs) & broker.offered_acrs():
                raise UnmetAuthenticationRequirements(
                    "No sign-in option offers the requested acr_values.",
                    redirect_uri=redirect_uri, state=params.get("state"))
            hinted_other_person = False
            if params.get("id_token_hint"):
                hint = hub.verify_id_token_hint(params["id_token_hint"])
                client = grant.request.client
                aud = hint.get("aud") if hint else None
                if hint is None or client.client_id not in (aud if isinstance(aud, list)
                                                            else [aud]):
                    raise InvalidRequestError(
                        "id_token_hint is not an ID token from this hub for this agency.",
                        redirect_uri=redirect_uri, state=params.get("state"))
                # Core 3.1.2.1: the hint names someone other than the signed-in citizen
                hinted_other_person = login is not None and hint.get("sub") != \
                    hub.subject_for(client, login.account_id)
            # Core 3.1.2.1: select_account asks the citizen to choose whom to sign in as,
            # which the login page (and the upstream, asked to sign in again) offers
            reauthenticate = bool(prompts & {"login", "select_account"})
            needs_login = (
                hinted_other_person
                or login is None
                or reauthenticate
                or (max_age is not None and time.time() - login.auth_time > max_age)
                # an existing login of lower assurance is never raised, only redone
                or (acrs is not None and login.acr not in acrs)
            )
            if needs_login and "none" in prompts:
                raise LoginRequiredError(redirect_uri=redirect_uri, state=params.get("state"))
        except OAuth2Error as error:
            return error_response(oauth_request, error)
        if needs_login:
            payload = {k: v for k, v in params.items() if isinstance(v, str)}
            flow = broker.flows(session).start(
                return_to="/authorize/continue?flow={flow_id}", payload=payload,
                allowed_acrs=requested_acrs(params), reauthenticate=reauthenticate,
                max_age=max_age, cancel_to="/authorize/cancel?flow={flow_id}",
                login_hint=params.get("login_hint"), ui_locales=params.get("ui_locales"))
            return redirect(url_for("broker.login_page", flow=flow.id), code=303)
        assert login is not None
        return finish(oauth_request, grant, login, params)

    @bp.post("/authorize/cancel")
    def cancel() -> Response:
        """The citizen cancelled the sign-in an agency asked for (on the hub's login page,
        after cancelling or being refused at an upstream, say): the agency is told, at its
        redirect URI, with its state and the hub's iss (RFC 6749 4.1.2.1 access_denied:
        "The resource owner or authorization server denied the request"), rather than
        left waiting. Single use, as the flow is."""
        check_csrf()
        flow = broker.flows(session).cancel(request.args.get("flow", ""))
        if flow.payload is None or flow.cancel_to is None:  # not an agency's sign-in
            raise LoginExpired()
        oauth_request = StoredAuthorizationRequest(f"{hub.issuer}/authorize", flow.payload)
        try:
            grant = server.get_consent_grant(request=oauth_request, end_user=None)
            raise AccessDeniedError("The citizen cancelled the sign-in.",
                                    redirect_uri=grant.request.payload.redirect_uri,
                                    state=flow.payload.get("state"))
        except OAuth2Error as error:
            return error_response(oauth_request, error)

    @bp.get("/authorize/continue")
    def resume() -> Response:
        """Back from the login: answer the stored authorization request (single use)."""
        flow = broker.flows(session).finish(request.args.get("flow", ""))
        login = active_login()
        if login is None or flow.payload is None or login.signed_in_at < flow.started_at:
            raise LoginExpired()
        oauth_request = StoredAuthorizationRequest(f"{hub.issuer}/authorize", flow.payload)
        try:
            grant = server.get_consent_grant(request=oauth_request, end_user=login)
            if not fresh_enough(login, flow):
                # Core 3.1.2.1: "If it cannot reauthenticate the End-User, it MUST return an
                # error, typically login_required" (the upstream answered from a session of
                # its own, older than the agency allows)
                raise LoginRequiredError(
                    "The sign-in service did not authenticate the citizen again, as the "
                    "request's prompt or max_age asked.",
                    redirect_uri=grant.request.payload.redirect_uri,
                    state=flow.payload.get("state"))
            acrs = requested_acrs(flow.payload)
            if acrs is not None and login.acr not in acrs:
                raise UnmetAuthenticationRequirements(
                    "The sign-in did not reach the requested assurance.",
                    redirect_uri=grant.request.payload.redirect_uri,
                    state=flow.payload.get("state"))
        except OAuth2Error as error:
            return error_response(oauth_request, error)
        return finish(oauth_request, grant, login, flow.payload)

    def fresh_enough(login: HubLogin, flow: Any) -> bool:
        """Whether the citizen authenticated (``auth_time``, the upstream's) as recently as
        the flow's request asked: not before the request, for ``prompt=login`` or
        ``select_account``; not more than ``max_age`` seconds before it. Both within
        :data:`AUTH_TIME_LEEWAY_SECONDS` of clock skew between the upstream and the hub."""
        earliest = flow.started_at - AUTH_TIME_LEEWAY_SECONDS
        if flow.reauthenticate and login.auth_time < earliest:
            return False
        return flow.max_age is None or login.auth_time >= earliest - flow.max_age

    def finish(oauth_request: Any, grant: Any, login: HubLogin, params: Any) -> Response:
        """Issue the code, unless the citizen must first be asked for consent."""
        offline = True  # no consent records here: the agency's registration decides
        if hub.consent is not None:
            client = grant.request.client
            policy = hub.policy_for(client)
            wanted = requested_claims(grant.request.scope or "", policy)
            prompts = set((params.get("prompt") or "").split())
            state = consent_state(login.account_id, client.client_id)
            ask = "consent" in prompts or needs_consent(state, policy, wanted)
            if ask and "none" in prompts and OFFLINE_ACCESS in wanted \
                    and not needs_consent(state, policy, wanted - {OFFLINE_ACCESS}):
                # OpenID Connect Core 11: offline access not consented to and no page to
                # ask on: its request is ignored (a code without it), not an error
                ask = False
            if ask and "consent" not in prompts and notice_only(state, policy, wanted):
                # No claim rests on consent (public task, legal obligation...): nothing to
                # refuse, so the first use is recorded with its notice instead of asked.
                hub.consent.record_decision(
                    login.account_id, policy, hub.subject_for(client, login.account_id), (),
                    requested_claims=wanted, method="notice")
                ask = False
            if ask:
                if "none" in prompts:
                    return error_response(oauth_request, ConsentRequiredError(
                        redirect_uri=grant.request.payload.redirect_uri,
                        state=params.get("state")))
                pending = park(session, {k: v for k, v in dict(params).items()
                                         if isinstance(v, str)},
                               login=(login.account_id, login.signed_in_at))
                return redirect(url_for("idp.consent_page", request=pending.id), code=303)
            offline = state is not None and OFFLINE_ACCESS in state.granted
        return respond(oauth_request, grant, login, offline=offline)

    def respond(oauth_request: Any, grant: Any, user: HubLogin | None, *,
                offline: bool = False) -> Response:
        """The redirect to the agency: a code for ``user``, or ``access_denied`` without one.
        The code's scope keeps ``offline_access`` only when ``offline`` (the citizen granted
        it: OpenID Connect Core 11), else no refresh token comes of it.
        Its RFC 9207 ``iss`` is added by the server's ``HubIssuerParameter`` (to errors too),
        so it is not looked for again here as :func:`with_iss` does."""
        grant.request.civitas_offline = offline  # read by save_authorization_code
        response: Response = server.create_authorization_response(
            request=oauth_request, grant_user=user, grant=grant)
        return response

    def notice_only(state: LatestState | None, policy: Any, wanted: set[str]) -> bool:
        offered = policy.offered(frozenset(wanted))
        return (bool(offered) and all(c.lawful_basis != "consent" for c in offered)
                and state is None)

    def pending_consent(request_id: str, *, remove: bool) -> tuple[Any, Any, HubLogin, Any]:
        login = active_login()
        pending = unpark(session, request_id, remove=remove)
        if pending is None and request_id in session.get("consent_answered", ()):
            raise ConsentAlreadyAnswered()
        if login is None or pending is None or hub.consent is None \
                or pending.login != (login.account_id, login.signed_in_at):
            # asked under another login (someone else may have signed in in this browser
            # since): its answer is not this citizen's (OpenID Connect Core 3.1.2.4)
            raise LoginExpired()
        oauth_request = StoredAuthorizationRequest(f"{hub.issuer}/authorize", pending.params)
        return oauth_request, pending, login, hub.consent

    @bp.get("/authorize/consent")
    def consent_page() -> Response:
        request_id = request.args.get("request", "")
        oauth_request, pending, login, consent = pending_consent(request_id, remove=False)
        try:
            grant = server.get_consent_grant(request=oauth_request, end_user=login)
        except OAuth2Error as error:
            return error_response(oauth_request, error)
        client = grant.request.client
        policy = hub.policy_for(client)
        response = Response(render_consent_page(
            policy, requested_claims(grant.request.scope or "", policy),
            action_url=url_for("idp.consent_submit"), hidden={"request": request_id},
            previous=consent.current(login.account_id, client.client_id)), mimetype="text/html")
        # Browsers apply form-action to the redirect that follows the form: allow the
        # agency's validated redirect origin, nothing else.
        target = urlsplit(grant.request.payload.redirect_uri)
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; "
            f"form-action 'self' {target.scheme}://{target.netloc}; "
            "frame-ancestors 'none'; base-uri 'none'")
        return response

    @bp.post("/authorize/consent")
    def consent_submit() -> Response:
        request_id = request.form.get("request", "")
        oauth_request, pending, login, consent = pending_consent(request_id, remove=False)
        try:
            grant = server.get_consent_grant(request=oauth_request, end_user=login)
        except OAuth2Error as error:
            unpark(session, request_id, remove=True)
            return error_response(oauth_request, error)
        client = grant.request.client
        policy = hub.policy_for(client)
        wanted = requested_claims(grant.request.scope or "", policy)
        answer = read_consent_form(policy, wanted)  # checks the CSRF token first
        unpark(session, request_id, remove=True)  # single use from here on
        # remembered, only to tell a second look at it (Back, a double click) that it was
        # answered rather than that the sign-in expired
        session["consent_answered"] = [*session.get("consent_answered", ())][-7:] + [request_id]
        if not hub.tokens.answer_once(request_id, PENDING_LIFETIME):
            raise ConsentAlreadyAnswered()  # answered already, by a submit of the same form
        subject = hub.subject_for(client, login.account_id)
        if not answer.allow:
            consent.record_refusal(login.account_id, policy, subject, requested_claims=wanted)
            # RFC 6749 4.1.2.1: access_denied, to the validated redirect URI
            return respond(oauth_request, grant, None)
        given = consent.record_decision(login.account_id, policy, subject, answer.optional,
                                        requested_claims=wanted)
        return respond(oauth_request, grant, login,
                       offline=given.valid and OFFLINE_ACCESS in given.claims)

    @bp.post("/token")
    def token() -> Response:
        # the header itself, not Werkzeug's reading of it, which raises on a non-ASCII one
        # (a 500; client_secret_basic answers a malformed one invalid_client)
        if request.headers.get("Authorization", "").strip() and (
                "client_secret" in request.form or "client_assertion" in request.form):
            # RFC 6749 2.3: a client MUST NOT use more than one authentication method.
            resp = jsonify(error="invalid_request",
                           error_description="Use one client authentication method, not two.")
            resp.status_code = 400
            resp.headers["Cache-Control"] = "no-store"
            resp.headers["Pragma"] = "no-cache"
            return resp
        return server.create_token_response()  # type: ignore[no-any-return]

    def no_store(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
        return response

    @bp.post("/revoke")
    def revoke() -> Response:
        """RFC 7009."""
        return no_store(server.create_endpoint_response("revocation"))

    @bp.post("/introspect")
    def introspect() -> Response:
        """RFC 7662."""
        return no_store(server.create_endpoint_response("introspection"))

    @bp.route("/userinfo", methods=["GET", "POST"])
    def userinfo() -> Response:
        """OpenID Connect Core 5.3; bearer token per RFC 6750 2.1, errors per 3.1."""
        auth = request.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            resp = jsonify(error="invalid_request", error_description="Bearer token required")
            resp.status_code = 401
            resp.headers["WWW-Authenticate"] = 'Bearer realm="civitas"'
            return resp
        record = hub.access_tokens.verify(value.strip())
        client = hub.agencies.client(record.client_id) if record else None
        if record is not None and client is not None and "openid" not in record.scope.split():
            # RFC 6750 3.1: a live token without the scope: 403 insufficient_scope (an
            # agency's own client_credentials token, which opens no citizen's data)
            resp = jsonify(error="insufficient_scope",
                           error_description="The access token has no 'openid' scope.")
            resp.status_code = 403
            resp.headers["WWW-Authenticate"] = (
                'Bearer realm="civitas", error="insufficient_scope", scope="openid"')
            return resp
        attributes, granted = None, None
        if record is not None and client is not None and "openid" in record.scope.split():
            attributes, granted, _ = hub.citizen_claims(  # attributes None: deleted
                record.account_id, client.client_id, scope_claim_names(record.scope))
        if record is None or client is None or attributes is None:
            resp = jsonify(error="invalid_token",
                           error_description="The access token is invalid or expired")
            resp.status_code = 401
            resp.headers["WWW-Authenticate"] = (
                'Bearer realm="civitas", error="invalid_token"'
            )
            return resp
        resp = jsonify(hub.user_claims(client, record.account_id, record.scope, attributes,
                                       granted))
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @bp.get("/.well-known/openid-configuration")
    def openid_configuration() -> Response:
        resp = jsonify(discovery)
        resp.headers["Cache-Control"] = "public, max-age=3600"
        resp.headers["Access-Control-Allow-Origin"] = "*"
        return resp

    @bp.get("/jwks")
    def jwks() -> Response:
        resp = jsonify(hub.keys.jwks())
        resp.headers["Cache-Control"] = f"public, max-age={JWKS_MAX_AGE_SECONDS}"
        resp.headers["Access-Control-Allow-Origin"] = "*"
        resp.mimetype = "application/jwk-set+json"
        return resp

    return bp
