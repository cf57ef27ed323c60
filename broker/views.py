"""The broker's pages: choose an upstream, the callback, the account page, hub logout."""

from __future__ import annotations

from flask import Blueprint, abort, redirect, render_template, request, session, url_for
from werkzeug.wrappers import Response

from .service import Broker
from .session import current_login


def create_blueprint(broker: Broker) -> Blueprint:
    bp = Blueprint("broker", __name__, template_folder="templates")

    @bp.get("/login")
    def login_page() -> str | Response:
        flow_id = request.args.get("flow")
        if not flow_id:
            # A direct visit: sign in to the hub itself and land on the account page.
            flow = broker.flows(session).start(return_to=url_for("broker.account"))
            return redirect(url_for("broker.login_page", flow=flow.id))
        flow = broker.flows(session).get(flow_id)
        return render_template(
            "broker/login.html", flow=flow, upstreams=list(broker.connectors.values())
        )

    @bp.get("/login/<upstream_id>/start")
    def start(upstream_id: str) -> Response:
        url = broker.begin(session, request.args.get("flow", ""), upstream_id)
        return redirect(url, code=303)

    @bp.get("/login/<upstream_id>/callback")
    def callback(upstream_id: str) -> Response:
        flow, _login = broker.complete(session, upstream_id, request.args.to_dict())
        return redirect(flow.return_to, code=303)

    @bp.get("/account")
    def account() -> str | Response:
        login = current_login(session)
        if login is None:
            return redirect(url_for("broker.login_page"))
        identities = broker.accounts.linked_identities(login.account_id)
        names = {c.id: c.display_name for c in broker.connectors.values()}
        return render_template(
            "broker/account.html", login=login, identities=identities, upstream_names=names,
            attributes=broker.accounts.attributes(login.account_id),
        )

    @bp.post("/logout")
    def logout() -> Response:
        if request.form.get("csrf") != session.get("csrf"):
            abort(400)
        session.clear()
        return redirect(url_for("broker.signed_out"), code=303)

    @bp.get("/signed-out")
    def signed_out() -> str:
        return render_template("broker/signed_out.html")

    return bp
