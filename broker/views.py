"""The broker's pages: choose an upstream, the callback, the password form, the account page
(linked credentials, attribute provenance, linking, unlinking, deletion), hub logout."""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, redirect, render_template, request, session, url_for
from werkzeug.wrappers import Response

from connectors import PasswordConnector, UpstreamRejected
from kernel.ratelimit import address_bucket
from kernel.timefmt import local_time

from .errors import BrokerError, LoginExpired, SignInRefusedUpstream
from .service import Broker, LoginOutcome
from .session import HubLogin, current_login

log = logging.getLogger(__name__)

NOTICES = {
    "linked": "The new way to sign in was added to your account.",
    "already-linked": "That sign-in was already linked to your account.",
    "unlinked": "That way to sign in was removed from your account.",
}


#: the hub's own pages a direct sign-in may lead back to (``/login?next=...``): the account
#: pages and the officer workspace, as a path with an optional plain query; nothing else,
#: so that ``next`` can never send a citizen to another site
#: (each path segment ends at its own '/': ``(?:[\w-]+/?)*`` could split a run of word
#: characters in 2^n ways, and a value that then failed to match backtracked for ever)
RETURN_PAGES = re.compile(
    r"/(?:account(?:/[\w-]+)*|officer/(?:[\w-]+/)*(?:[\w-]+)?)(?:\?[\w=&%.+-]*)?\Z",
    re.ASCII)
#: the longest ``next`` taken (a page of the hub's own: far shorter)
MAX_RETURN_PAGE = 1024


def return_page(path: str) -> str | None:
    """``path`` if a sign-in may lead back to it (:data:`RETURN_PAGES`), else None."""
    return path if (len(path) <= MAX_RETURN_PAGE and RETURN_PAGES.match(path)
                    and ".." not in path) else None


#: the hub's own assurance values (``urn:civitas:acr:ial<N>:aal<N>``, NIST SP 800-63-3) in
#: the words the account page uses; another value an operator configured is shown as it is
_CIVITAS_ACR = re.compile(r"urn:civitas:acr:ial([123]):aal([123])\Z")
_IAL_WORDS = {"1": "identity not checked against documents",
              "2": "identity checked against documents",
              "3": "identity checked in person"}
_AAL_WORDS = {"1": "signed in with one factor (such as a password)",
              "2": "signed in with two factors",
              "3": "signed in with a hardware key"}


def assurance_words(acr: str | None) -> str:
    """What an assurance value means, in plain words for the citizen."""
    found = _CIVITAS_ACR.match(acr or "")
    if found is None:
        return acr or ""
    return f"{_IAL_WORDS[found.group(1)].capitalize()}; {_AAL_WORDS[found.group(2)]}"


class FormExpired(BrokerError):
    status_code = 400
    public_message = "This form has expired. Please go back, reload the page and try again."


def create_blueprint(broker: Broker, *,
                     on_logout: Callable[[HubLogin], object] | None = None,
                     on_delete: Callable[[str], object] | None = None) -> Blueprint:
    """``on_logout`` is told of every hub session that ends here (sign-out, account deletion),
    before the session is cleared: the composition root wires it to the OpenID provider's
    logout (token revocation, back-channel logout) without broker/ depending on idp/."""
    bp = Blueprint("broker", __name__, template_folder="templates")
    bp.add_app_template_filter(assurance_words, "assurance_words")
    bp.add_app_template_filter(local_time, "local_time")

    def check_csrf() -> None:
        expected = session.get("csrf")
        given = request.form.get("csrf", "")
        # bytes: compare_digest refuses str holding non-ASCII (a TypeError, a 500)
        if not expected or not hmac.compare_digest(str(expected).encode(), given.encode()):
            raise FormExpired()

    def signed_in() -> HubLogin | None:
        login = current_login(session)
        if login is not None and not broker.accounts.exists(login.account_id):
            session.clear()
            return None
        return login

    def after_login(outcome: LoginOutcome, previous: HubLogin | None) -> Response:
        """``previous``: the session's login before this one. When someone else signed in
        over it (a shared computer: the session now has a new ``sid``), that person's hub
        session has ended: its tokens die and its agencies are told (Back-Channel Logout
        1.0 section 2), as when they sign out; otherwise no later logout would reach them."""
        if (previous is not None and on_logout is not None
                and outcome.login.sid != previous.sid):
            on_logout(previous)
        if outcome.linked is not None:
            session["notice"] = "linked" if outcome.linked else "already-linked"
        return redirect(outcome.flow.return_to, code=303)

    def password_page(flow: Any, connector: PasswordConnector, *, error: str | None,
                      username: str) -> Response:
        response = Response(render_template(
            "broker/password.html", flow=flow, upstream=connector, error=error,
            username=username), mimetype="text/html")
        # The form's redirect chain ends at the agency that asked (browsers check form-action
        # on every redirect after a form post): allow that one validated origin.
        target = urlsplit(str((flow.payload or {}).get("redirect_uri", "")))
        extra = f" {target.scheme}://{target.netloc}" if target.scheme in ("http", "https") else ""
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; "
            f"form-action 'self'{extra}; frame-ancestors 'none'; base-uri 'none'")
        return response

    @bp.get("/login")
    def login_page() -> str | Response:
        flow_id = request.args.get("flow")
        if not flow_id:
            # A direct visit: sign in to the hub itself and land on the page that sent the
            # citizen here (``next``, one of the hub's own pages), else the account page.
            back = return_page(request.args.get("next", "")) or url_for("broker.account")
            flow = broker.flows(session).start(return_to=back)
            return redirect(url_for("broker.login_page", flow=flow.id))
        flow = broker.flows(session).get(flow_id)
        upstreams = broker.choices(flow)
        return render_template("broker/login.html", flow=flow, upstreams=upstreams,
                               down=broker.health.down(u.id for u in upstreams),
                               notice=session.pop("login_notice", None))

    @bp.get("/login/<upstream_id>/start")
    def start(upstream_id: str) -> str | Response:
        connector = broker.connector(upstream_id)
        flow_id = request.args.get("flow", "")
        if isinstance(connector, PasswordConnector):
            flow = broker.flows(session).get(flow_id)
            broker.health.refuse_if_down(upstream_id, connector.display_name)
            # the agency's login_hint starts the form (Core 3.1.2.1); the citizen may change it
            return password_page(flow, connector, error=None, username=flow.login_hint or "")
        return redirect(broker.begin(session, flow_id, upstream_id), code=303)

    @bp.post("/login/<upstream_id>/password")
    def password(upstream_id: str) -> str | Response | tuple[str, int]:
        check_csrf()
        connector = broker.password_connector(upstream_id)
        flow_id = request.form.get("flow", "")
        username = request.form.get("username", "")
        previous = current_login(session)
        try:
            outcome = broker.password_login(
                session, flow_id, upstream_id, username, request.form.get("password", ""),
                address_bucket(request.remote_addr),
            )
        except UpstreamRejected as exc:
            flow = broker.flows(session).get(flow_id)
            page = password_page(flow, connector, error=exc.public_message, username=username)
            page.status_code = exc.status_code
            return page
        return after_login(outcome, previous)

    @bp.get("/login/<upstream_id>/callback")
    def callback(upstream_id: str) -> Response:
        # RFC 6749 3.1 and RFC 9207 2.4: no parameter may be repeated. to_dict() keeps the
        # first value, so "iss=<upstream>&iss=<another>" would pass the issuer check
        repeated = sorted(k for k, values in request.args.lists() if len(values) > 1)
        if repeated:
            raise LoginExpired(detail="the upstream's callback repeats "
                                      + ", ".join(repr(k[:40]) for k in repeated[:5]))
        previous = current_login(session)
        try:
            return after_login(broker.complete(session, upstream_id, request.args.to_dict()),
                               previous)
        except SignInRefusedUpstream as refused:
            # not a dead end: back to the choice, saying what happened (Cancel is there)
            session["login_notice"] = refused.public_message
            return redirect(url_for("broker.login_page", flow=refused.flow_id), code=303)

    @bp.get("/account")
    def account() -> str | Response:
        login = signed_in()
        if login is None:
            return redirect(url_for("broker.login_page"))
        names = {c.id: c.display_name for c in broker.connectors.values()}
        return render_template(
            "broker/account.html", login=login, upstream_names=names,
            identities=broker.accounts.linked_identities(login.account_id),
            attributes=broker.accounts.attribute_records(login.account_id),
            events=broker.accounts.events(login.account_id)[:50],
            notice=NOTICES.get(session.pop("notice", "")),
        )

    @bp.post("/account/link")
    def link() -> Response:
        check_csrf()
        if signed_in() is None:
            return redirect(url_for("broker.login_page"), code=303)
        flow = broker.start_link(session)
        return redirect(url_for("broker.login_page", flow=flow.id), code=303)

    @bp.post("/account/identities/<int:link_id>/unlink")
    def unlink(link_id: int) -> Response:
        check_csrf()
        login = signed_in()
        if login is None:
            return redirect(url_for("broker.login_page"), code=303)
        broker.accounts.unlink(login.account_id, link_id)
        session["notice"] = "unlinked"
        return redirect(url_for("broker.account"), code=303)

    @bp.post("/account/delete")
    def delete() -> Response | tuple[str, int]:
        check_csrf()
        login = signed_in()
        if login is None:
            return redirect(url_for("broker.login_page"), code=303)
        if request.form.get("confirm") != "delete":
            raise BrokerError("To delete your account, tick the box that confirms it.")
        # The account is closed first, in one transaction (from then on no session, token
        # or claim, and no credential leads to it), then its grants and consents end and its
        # personal data goes. Each later step is idempotent: should one fail, housekeeping
        # finishes the erasure (civitas.housekeeping), and the citizen is told so.
        if not broker.accounts.close(login.account_id):
            session.clear()  # closed meanwhile (another tab)
            return redirect(url_for("broker.signed_out", deleted="1"), code=303)
        finished = True
        try:
            if on_delete is not None:  # e.g. withdraw every consent (the root wires it)
                on_delete(login.account_id)
            broker.accounts.erase(login.account_id)
        except Exception:  # noqa: BLE001 - the closing stands; housekeeping finishes the rest
            log.exception("account %s is closed but its erasure did not finish; "
                          "housekeeping will finish it", login.account_id)
            finished = False
        if on_logout is not None:
            on_logout(login)
        session.clear()
        return redirect(url_for("broker.signed_out", deleted="1" if finished else "pending"),
                        code=303)

    @bp.post("/logout")
    def logout() -> Response:
        login = current_login(session)
        if login is None:
            # nothing to end (the session expired, or the hub's in-process store restarted,
            # while the page was open): the citizen is signed out, which is what they asked
            return redirect(url_for("broker.signed_out"), code=303)
        check_csrf()
        if login is not None and on_logout is not None:
            on_logout(login)
        session.clear()
        return redirect(url_for("broker.signed_out"), code=303)

    @bp.get("/signed-out")
    def signed_out() -> str:
        deleted = request.args.get("deleted")
        return render_template("broker/signed_out.html",
                               deleted=deleted if deleted in ("1", "pending") else None)

    return bp
