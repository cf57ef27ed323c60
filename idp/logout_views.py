"""The end-session endpoint (OpenID Connect RP-Initiated Logout 1.0): a thin Flask adapter
over :mod:`idp.logout`.

``GET`` or ``POST /logout/end-session``. An agency's form ``POST`` that arrives without the
hub's session cookie (SameSite=Lax: browsers leave it off a cross-site POST) is turned into
the same request by ``GET`` (303), a top-level navigation that carries it. A verified
``id_token_hint`` for the current session signs the citizen out at once; otherwise the
citizen is asked first, with a form posted back here carrying a CSRF token. Afterwards: a
redirect to a registered ``post_logout_redirect_uri`` (with ``state``), or a plain "You are
signed out" page.
"""

from __future__ import annotations

import hmac
from urllib.parse import quote, urlencode, urlsplit

from flask import Blueprint, current_app, redirect, render_template, request, session
from werkzeug.wrappers import Response

from broker.session import current_login

from .errors import IdpError
from .logout import EndSessionPlan, EndSessionRequest, InvalidLogoutRequest, LogoutService

END_SESSION_PATH = "/logout/end-session"
#: the app's page policy, with the agency's post-logout origin added to ``form-action``
CONFIRM_PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; form-action 'self' {origin}; "
                    "frame-ancestors 'none'; base-uri 'none'")


class LogoutFormExpired(IdpError):
    status_code = 400
    public_message = ("This sign-out form has expired. Please go back to the site you were "
                      "using and sign out again.")


def create_blueprint(logout: LogoutService) -> Blueprint:
    bp = Blueprint("idp_logout", __name__, template_folder="templates")

    def finish(plan: EndSessionPlan) -> Response:
        location = plan.redirect_location()
        if location is None:
            page = render_template("idp/signed_out.html", agency=plan.client)
            return Response(page, status=200, mimetype="text/html")
        resp = redirect(location, code=303)
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @bp.route(END_SESSION_PATH, methods=["GET", "POST"])
    def end_session() -> Response:
        params = request.form if request.method == "POST" else request.args
        # RFC 6749 3.1, as /authorize and /token: a parameter sent twice is refused (the
        # first value was taken), never redirected
        repeated = sorted(name for name, values in params.lists() if len(values) > 1)
        if repeated:
            raise InvalidLogoutRequest(f"{quote(repeated[0], safe='')} is sent more than once")
        # The confirmation form below posts back with a CSRF token; a request from an
        # agency (GET, or a form POST per section 2) never carries one.
        confirming = request.method == "POST" and "csrf" in request.form
        plan = logout.plan(EndSessionRequest.from_params(params))
        cookie = current_app.session_interface.get_cookie_name(current_app)
        if request.method == "POST" and not confirming and cookie not in request.cookies:
            # RP-Initiated Logout 1.0 section 2 (GET and POST): the session cookie is
            # SameSite=Lax, which a browser sends on a top-level GET navigation but never on
            # a cross-site POST, so the agency's form post would find no session here and
            # be sent back "signed out" while the hub session lives on. The same request by
            # GET (checked above: an invalid one is never redirected) carries the cookie.
            resp = redirect(f"{END_SESSION_PATH}?{urlencode(list(params.items()))}", code=303)
            resp.headers["Cache-Control"] = "no-store"
            return resp
        login = current_login(session)
        if login is None:
            return finish(plan)  # nothing to end: already signed out
        if confirming:
            expected = session.get("csrf")
            given = request.form["csrf"].encode()
            if not expected or not hmac.compare_digest(str(expected).encode(), given):
                raise LogoutFormExpired()
        if confirming or plan.ends_without_confirmation(login):
            logout.end_session(login)
            session.clear()
            return finish(plan)
        page = render_template("idp/logout_confirm.html", plan=plan, agency=plan.client,
                               action=END_SESSION_PATH)
        resp = Response(page, status=200, mimetype="text/html")
        if plan.redirect_uri is not None:
            # Browsers apply form-action to the redirect that follows the form post too.
            target = urlsplit(plan.redirect_uri)
            host = target.hostname or ""
            host = f"[{host}]" if ":" in host else host  # an IPv6 literal
            port = f":{target.port}" if target.port else ""
            resp.headers["Content-Security-Policy"] = CONFIRM_PAGE_CSP.format(
                origin=f"{target.scheme}://{host}{port}")
        return resp

    return bp
