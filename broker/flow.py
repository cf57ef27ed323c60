"""The login flow as an explicit state machine, kept in the browser's server-side session.

    choosing --choose(upstream)--> redirected --authenticate()--> authenticated --finish()
       ^                               |
       +------- choose(other) ---------+

A transition that is not on this picture raises :class:`LoginExpired` (the only way to reach
one is a stale or replayed URL). Each flow remembers where to return, a local path.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from flask.sessions import SessionMixin

from .errors import LoginExpired

FlowState = Literal["choosing", "redirected", "authenticated"]

MAX_FLOWS_PER_SESSION = 8

#: the longest ``login_hint`` passed on (an identifier: an email address, a username)
MAX_LOGIN_HINT = 256
#: ``ui_locales``: space-separated BCP 47 language tags (OpenID Connect Core 3.1.2.1)
UI_LOCALES = re.compile(r"[A-Za-z0-9-]{1,35}(?: [A-Za-z0-9-]{1,35}){0,9}\Z", re.ASCII)


def passable_hints(login_hint: str | None, ui_locales: str | None
                   ) -> tuple[str | None, str | None]:
    """The hints worth passing on to an upstream: a ``login_hint`` of printable characters
    and sensible length, ``ui_locales`` of language tags; others are dropped (hints: the
    sign-in goes on without them, as Core 3.1.2.1 lets an OP ignore them)."""
    hint = login_hint.strip() if login_hint else ""
    return ((hint if hint and len(hint) <= MAX_LOGIN_HINT and hint.isprintable() else None),
            (ui_locales if ui_locales and UI_LOCALES.match(ui_locales) else None))


@dataclass(frozen=True)
class LoginFlow:
    id: str
    return_to: str
    state: FlowState
    started_at: int
    upstream_id: str | None = None
    #: the upstream's ``state`` value while redirected (binds the callback to this flow)
    upstream_state: str | None = None
    pending: dict[str, Any] | None = None
    #: what the flow was started for (e.g. the agency's authorization request parameters)
    payload: dict[str, Any] | None = None
    #: when set, only upstreams providing one of these assurance levels may be used
    allowed_acrs: list[str] | None = None
    #: the upstream must authenticate the person again, not answer from a session of its
    #: own (the agency sent ``prompt=login`` or ``select_account``: OpenID Connect Core
    #: 3.1.2.1), and/or within ``max_age`` seconds
    reauthenticate: bool = False
    max_age: int | None = None
    #: what the agency said of whom to expect and in which languages (OpenID Connect Core
    #: 3.1.2.1 ``login_hint``, ``ui_locales``), passed on to the upstream the citizen chooses
    #: (a directory's form starts with the hint as the username)
    login_hint: str | None = None
    ui_locales: str | None = None
    #: where the citizen's "Cancel" goes (a local path; the agency that asked is told,
    #: RFC 6749 4.1.2.1 access_denied); None: nowhere to go back to
    cancel_to: str | None = None

    def allows(self, acr: str) -> bool:
        return self.allowed_acrs is None or acr in self.allowed_acrs

    def choose(self, upstream_id: str, upstream_state: str, pending: dict[str, Any]) -> LoginFlow:
        if self.state not in ("choosing", "redirected"):
            raise LoginExpired()
        return replace(self, state="redirected", upstream_id=upstream_id,
                       upstream_state=upstream_state, pending=pending)

    def authenticate(self) -> LoginFlow:
        if self.state != "redirected":
            raise LoginExpired()
        return replace(self, state="authenticated", upstream_state=None, pending=None)

    def reopen(self) -> LoginFlow:
        """Back to choosing after the upstream refused or the citizen cancelled there: the
        upstream's state is used up, so its callback cannot be replayed."""
        return replace(self, state="choosing", upstream_id=None, upstream_state=None,
                       pending=None)

    def authenticate_with_password(self, upstream_id: str) -> LoginFlow:
        """A password upstream answers in one request: choosing -> authenticated."""
        if self.state not in ("choosing", "redirected"):
            raise LoginExpired()
        return replace(self, state="authenticated", upstream_id=upstream_id,
                       upstream_state=None, pending=None)

    @property
    def purpose(self) -> str:
        """``login`` (sign in, possibly for an agency) or ``link`` (add a credential)."""
        return str((self.payload or {}).get("purpose", "login"))


def _is_local_path(path: str) -> bool:
    return path.startswith("/") and not path.startswith("//") and "\\" not in path


class FlowStore:
    """Flows of one browser session (a dict of flow id -> flow)."""

    def __init__(self, session: SessionMixin, lifetime: int) -> None:
        self._session = session
        self._lifetime = lifetime

    def _all(self) -> dict[str, dict[str, Any]]:
        flows = self._session.get("flows")
        return flows if isinstance(flows, dict) else {}

    def start(self, return_to: str, payload: dict[str, Any] | None = None,
              allowed_acrs: list[str] | None = None, *, reauthenticate: bool = False,
              max_age: int | None = None, cancel_to: str | None = None,
              login_hint: str | None = None, ui_locales: str | None = None) -> LoginFlow:
        """Start a flow. ``return_to`` is a local path; ``{flow_id}`` in it is filled in."""
        if not _is_local_path(return_to) or not (cancel_to is None
                                                  or _is_local_path(cancel_to)):
            raise ValueError("return_to and cancel_to must be local paths")
        flow_id = secrets.token_urlsafe(16)
        login_hint, ui_locales = passable_hints(login_hint, ui_locales)
        flow = LoginFlow(id=flow_id, return_to=return_to.replace("{flow_id}", flow_id),
                         state="choosing", started_at=int(time.time()), payload=payload,
                         allowed_acrs=allowed_acrs, reauthenticate=reauthenticate,
                         max_age=max_age, cancel_to=None if cancel_to is None
                         else cancel_to.replace("{flow_id}", flow_id),
                         login_hint=login_hint, ui_locales=ui_locales)
        flows = self._all()
        now = time.time()
        flows = {k: v for k, v in flows.items() if now - v["started_at"] < self._lifetime}
        while len(flows) >= MAX_FLOWS_PER_SESSION:
            flows.pop(min(flows, key=lambda k: flows[k]["started_at"]))
        flows[flow.id] = asdict(flow)
        self._session["flows"] = flows
        return flow

    def get(self, flow_id: str | None) -> LoginFlow:
        data = self._all().get(flow_id or "")
        if data is None or time.time() - data["started_at"] >= self._lifetime:
            raise LoginExpired()
        return LoginFlow(**data)

    def by_upstream_state(self, upstream_state: str | None) -> LoginFlow:
        for data in self._all().values():
            if upstream_state and data.get("upstream_state") == upstream_state:
                return self.get(data["id"])
        raise LoginExpired()

    def save(self, flow: LoginFlow) -> None:
        flows = self._all()
        flows[flow.id] = asdict(flow)
        self._session["flows"] = flows

    def finish(self, flow_id: str) -> LoginFlow:
        """Remove and return an authenticated flow (single use)."""
        flow = self.get(flow_id)
        if flow.state != "authenticated":
            raise LoginExpired()
        return self._remove(flow)

    def cancel(self, flow_id: str) -> LoginFlow:
        """Remove and return a flow the citizen cancels (single use), whatever its state."""
        return self._remove(self.get(flow_id))

    def _remove(self, flow: LoginFlow) -> LoginFlow:
        flow_id = flow.id
        flows = self._all()
        flows.pop(flow_id, None)
        self._session["flows"] = flows
        return flow
