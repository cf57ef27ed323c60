"""The privacy officer's pages under ``/officer/``: decision search, CSV/JSON exports, and the
record of processing per agency. A thin adapter over :mod:`consent.officers`.

Only holders of the officer role (see :func:`consent.officers.holds_officer_role`) reach
them; anyone else signed in gets 403 (a page, or JSON for the exports), and a visitor who is
not signed in is sent to the hub's login. Searches are GET requests that change nothing but
the ledger, so they carry no CSRF token.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from flask import Blueprint, g, jsonify, render_template, request, session, url_for
from markupsafe import Markup
from werkzeug.wrappers import Response

from broker.session import current_login

from .charts import activity, svg_chart
from .errors import ConsentError
from .officers import (
    CSV_COLUMNS,
    PAGE_SIZE,
    QUERY_FIELDS,
    AssertedAttribute,
    InvalidOfficerQuery,
    OfficerRule,
    OfficerWorkspace,
    csv_safe,
    holds_officer_role,
    parse_query,
)
from .policy import AgencyPolicy
from .views import sign_in_then_back


class NotAnOfficer(ConsentError):
    status_code = 403
    public_message = "This page is for the hub's privacy officers."


class AgencyNotFound(ConsentError):
    status_code = 404
    public_message = "There is no agency with that client id."


#: the exports' error codes other than ``invalid_request``, by status
_ERROR_CODES = {403: "forbidden", 404: "not_found"}


def wants_json() -> bool:
    """Whether this request under /officer/ is a program's (the exports, ``format=json``),
    whose errors are answered in JSON (here, and by the app's handlers for the rest)."""
    return request.path.endswith((".json", ".csv")) or request.args.get("format") == "json"


def create_officer_blueprint(
    workspace: OfficerWorkspace, *, rules: Sequence[OfficerRule],
    attributes_of: Callable[[str], Iterable[AssertedAttribute]],
    account_exists: Callable[[str], bool],
    agencies: Callable[[], list[tuple[str, str]]],
    policy_of: Callable[[str], tuple[AgencyPolicy, bool] | None],
) -> Blueprint:
    """``agencies`` lists (client_id, name); ``policy_of`` gives an agency's policy and
    whether it was declared (rather than the default for an agency that declared nothing)."""
    bp = Blueprint("officer", __name__, url_prefix="/officer", template_folder="templates")

    @bp.before_request
    def _officers_only() -> Response | None:
        login = current_login(session)
        if login is None or not account_exists(login.account_id):
            return sign_in_then_back(url_for("broker.login_page"))
        if not holds_officer_role(rules, login_upstream=login.upstream_id,
                                  auth_time=login.auth_time,
                                  attributes=attributes_of(login.account_id)):
            raise NotAnOfficer()
        g.officer_account_id = login.account_id
        return None

    @bp.errorhandler(ConsentError)
    def _error(error: ConsentError) -> Response | tuple[str, int]:
        if wants_json():
            response = jsonify(error=_ERROR_CODES.get(error.status_code, "invalid_request"),
                               error_description=error.public_message)
            response.status_code = error.status_code
            return response
        return render_template("error.html", status=error.status_code,
                               message=error.public_message), error.status_code

    @bp.after_request
    def _no_store(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store"
        return response

    def _page_number() -> int:
        raw = request.args.get("page", "1")
        # isascii too: "²" is a digit to str.isdigit() but not to int() (a 500), and int()
        # would read "٣" as 3
        return int(raw) if raw.isascii() and raw.isdigit() and 0 < len(raw) < 7 else 1

    @bp.get("/")
    def search() -> str | tuple[str, int]:
        # the form's own fields only: any other name would reach url_for, which takes some
        # for itself (endpoint=, _method=: a server error; _anchor=, _external=)
        args: dict[str, Any] = {k: v for k, v in request.args.items()
                                if k in QUERY_FIELDS and v}
        try:
            query = parse_query(request.args)
        except InvalidOfficerQuery as problem:
            # the form again, as the officer filled it in, with the problem beside its field
            # (WCAG 3.3.1): not an error page that loses the search
            return render_template(
                "officer/search.html", query=None, args=request.args, results=None,
                error=problem.public_message, error_field=problem.field,
                agencies=agencies()), 400
        results = workspace.search(query, officer_account_id=g.officer_account_id,
                                   page=_page_number())

        def page_url(page: int) -> str:
            return url_for("officer.search", **args, page=page)

        return render_template(
            "officer/search.html", query=query, args=request.args, results=results,
            page_url=page_url, page_size=PAGE_SIZE, agencies=agencies(),
            csv_url=url_for("officer.export_csv", **args),
            json_url=url_for("officer.export_json", **args))

    @bp.get("/decisions.csv")
    def export_csv() -> Response:
        query = parse_query(request.args)
        rows = workspace.export(query, officer_account_id=g.officer_account_id)

        def lines() -> Iterator[str]:
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(CSV_COLUMNS)
            for row in rows:
                writer.writerow([csv_safe(row[c]) for c in CSV_COLUMNS])
                if buffer.tell() > 16 * 1024:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
            yield buffer.getvalue()

        return Response(lines(), mimetype="text/csv", headers={
            "Content-Disposition": 'attachment; filename="decisions.csv"'})

    @bp.get("/decisions.json")
    def export_json() -> Response:
        query = parse_query(request.args)
        decisions = list(workspace.export(query, officer_account_id=g.officer_account_id))
        response = jsonify(query=query.describe(), count=len(decisions), decisions=decisions)
        response.headers["Content-Disposition"] = 'attachment; filename="decisions.json"'
        return response

    @bp.get("/agencies/<client_id>/art30")
    def art30(client_id: str) -> Response | str:
        found = policy_of(client_id)
        if found is None:
            raise AgencyNotFound()
        policy, declared = found
        record = workspace.record_of_processing(policy, declared=declared)
        if request.args.get("format") == "json":
            return jsonify(record)
        return render_template("officer/art30.html", record=record)

    @bp.get("/activity")
    def activity_page() -> str:
        """Grants, withdrawals and decisions per agency per day (last 30 days)."""
        charts = []
        for number, (client_id, name) in enumerate(agencies(), start=1):
            rows = activity(workspace.db, client_id)
            charts.append({
                "name": name, "client_id": client_id,
                # svg_chart escapes the only text it is given (the title); the rest is numbers
                "svg": Markup(svg_chart(rows, title=f"{name}: activity, last 30 days",  # noqa: S704
                                        chart_id=f"chart-{number}")),
                "rows": rows,  # the figures, as a table: what the bars show, in words
                "totals": {k: sum(getattr(r, k) for r in rows)
                           for k in ("granted", "withdrawn", "decisions")},
            })
        return render_template("officer/activity.html", charts=charts)

    return bp


__all__ = ["create_officer_blueprint", "NotAnOfficer", "wants_json"]
