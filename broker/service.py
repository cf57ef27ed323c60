"""The broker's protocol logic, free of Flask request globals."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from flask.sessions import SessionMixin

from connectors import (
    ConnectorError,
    PasswordConnector,
    PendingLogin,
    RedirectConnector,
    UpstreamBusy,
    UpstreamIdentity,
    UpstreamRejected,
    UpstreamResponseInvalid,
    UpstreamUnavailable,
)
from kernel.metrics import LOGINS

from .accounts import AccountDirectory
from .errors import AssuranceNotOffered, LoginExpired, SignInRefusedUpstream, UnknownUpstream
from .flow import FlowStore, LoginFlow
from .health import UpstreamDown, UpstreamHealth
from .ratelimit import AttemptLimiter
from .session import HubLogin, current_login, establish_login

Connector = RedirectConnector | PasswordConnector


#: ``civitas_logins_total``'s outcome for a login the upstream did not complete, by the
#: connector's error (the first that matches: a busy or down upstream is also unavailable)
FAILED_OUTCOMES: tuple[tuple[type[ConnectorError], str], ...] = (
    (UpstreamDown, "down"),  # taken as down after calls in a row failed (broker.health)
    (UpstreamBusy, "busy"),  # refused by the bulkhead (connectors.base.Bulkhead)
    (UpstreamUnavailable, "unavailable"),  # unreachable, timed out or a 5xx
    (UpstreamResponseInvalid, "invalid"),  # an answer that failed a check: alert on it
    (UpstreamRejected, "rejected"),  # the citizen cancelled, or a wrong password
)


@dataclass(frozen=True)
class LoginOutcome:
    flow: LoginFlow
    login: HubLogin
    #: for a link flow: True when a new credential was added, False when already linked
    linked: bool | None = None


@dataclass
class Broker:
    issuer: str
    connectors: Mapping[str, Connector]
    accounts: AccountDirectory
    flow_lifetime: int
    limiter: AttemptLimiter
    health: UpstreamHealth

    @contextmanager
    def _calling(self, upstream: Connector, *, admit: bool, proves: bool,
                 answered_by: tuple[type[ConnectorError], ...] = ()) -> Iterator[bool]:
        """Around a login's calls to ``upstream``: with ``admit``, refuse it first while the
        upstream is down (broker.health); yield whether this login is the probe of an
        upstream on probation. A failure is counted by why (``civitas_logins_total``); a
        call that did not reach the upstream counts towards taking it as down; one that
        ``proves`` it answers (or the probe's, or one that raised ``answered_by``) tells
        the upstream's health it is back."""
        try:
            probing = self.health.admit(upstream.id, upstream.display_name) if admit else False
            yield probing
        except ConnectorError as exc:
            outcome = next((o for kind, o in FAILED_OUTCOMES if isinstance(exc, kind)), "error")
            LOGINS.labels(upstream.id, outcome).inc()
            if outcome == "unavailable":
                self.health.failed(upstream.id)
            elif isinstance(exc, answered_by):
                self.health.answered(upstream.id)
            raise
        if proves or probing:
            self.health.answered(upstream.id)

    def flows(self, session: SessionMixin) -> FlowStore:
        return FlowStore(session, self.flow_lifetime)

    def offered_acrs(self) -> set[str]:
        return {c.acr for c in self.connectors.values()}

    def choices(self, flow: LoginFlow) -> list[Connector]:
        """The upstreams this flow may use (all, or those meeting the requested assurance)."""
        return [c for c in self.connectors.values() if flow.allows(c.acr)]

    def connector(self, upstream_id: str) -> Connector:
        connector = self.connectors.get(upstream_id)
        if connector is None:
            raise UnknownUpstream()
        return connector

    def redirect_connector(self, upstream_id: str) -> RedirectConnector:
        connector = self.connector(upstream_id)
        if not isinstance(connector, RedirectConnector):
            raise UnknownUpstream()
        return connector

    def password_connector(self, upstream_id: str) -> PasswordConnector:
        connector = self.connector(upstream_id)
        if not isinstance(connector, PasswordConnector):
            raise UnknownUpstream()
        return connector

    def callback_uri(self, upstream_id: str) -> str:
        """A distinct redirect URI per upstream (mix-up defence, RFC 9700 4.4.2)."""
        return f"{self.issuer}/login/{upstream_id}/callback"

    def start_link(self, session: SessionMixin) -> LoginFlow:
        """Begin adding a credential to the signed-in citizen's account."""
        login = current_login(session)
        if login is None:
            raise LoginExpired()
        return self.flows(session).start(
            return_to="/account", payload={"purpose": "link", "account_id": login.account_id}
        )

    def begin(self, session: SessionMixin, flow_id: str, upstream_id: str) -> str:
        """Choose a redirect upstream for a flow; return the URL to send the browser to."""
        flows = self.flows(session)
        flow = flows.get(flow_id)
        connector = self.redirect_connector(upstream_id)
        if not flow.allows(connector.acr):
            raise AssuranceNotOffered()
        # begin's own call may be answered from a cache: it proves nothing of the upstream,
        # but the probe's fresh call does
        with self._calling(connector, admit=True, proves=False) as probing:
            if probing:
                connector.probe()
            url, pending = connector.begin(self.callback_uri(upstream_id),
                                           reauthenticate=flow.reauthenticate,
                                           max_age=flow.max_age, login_hint=flow.login_hint,
                                           ui_locales=flow.ui_locales)
        flows.save(flow.choose(upstream_id, pending.state, dict(pending.data)))
        return url

    def complete(self, session: SessionMixin, upstream_id: str,
                 params: Mapping[str, str]) -> LoginOutcome:
        """Handle a redirect upstream's callback: validate, then log in or link."""
        flows = self.flows(session)
        flow = flows.by_upstream_state(params.get("state"))
        if flow.upstream_id != upstream_id or flow.upstream_state is None:
            raise LoginExpired()
        pending = PendingLogin(state=flow.upstream_state, data=flow.pending or {})
        # Single use: the pending state is consumed before the upstream is even called.
        flow = flow.authenticate()
        flows.save(flow)
        connector = self.redirect_connector(upstream_id)
        # never refused here: the login began before the upstream went down, and its
        # answer may well come
        try:
            with self._calling(connector, admit=False, proves=True):
                identity = connector.complete(params, pending, self.callback_uri(upstream_id))
        except UpstreamRejected as exc:
            # cancelled or refused there: the citizen may choose again (or cancel)
            flows.save(flow.reopen())
            raise SignInRefusedUpstream(flow.id, exc.public_message) from exc
        return self._finish(session, flow, identity)

    def password_login(self, session: SessionMixin, flow_id: str, upstream_id: str,
                       username: str, password: str, address: str) -> LoginOutcome:
        """A username and password for a password upstream (e.g. an agency directory)."""
        flows = self.flows(session)
        flow = flows.get(flow_id)
        connector = self.password_connector(upstream_id)
        if not flow.allows(connector.acr):
            raise AssuranceNotOffered()
        self.limiter.check(upstream_id, username, address)
        try:
            with self._calling(connector, admit=True, proves=True,
                               answered_by=(UpstreamRejected,)):
                identity = connector.login(username, password)
        except UpstreamRejected:
            self.limiter.failed(upstream_id, username, address)
            raise
        flow = flow.authenticate_with_password(upstream_id)
        flows.save(flow)
        return self._finish(session, flow, identity)

    def _finish(self, session: SessionMixin, flow: LoginFlow,
                identity: UpstreamIdentity) -> LoginOutcome:
        if flow.purpose == "link":
            login = current_login(session)
            account_id = str((flow.payload or {}).get("account_id", ""))
            if login is None or login.account_id != account_id:
                raise LoginExpired()
            linked = self.accounts.link(account_id, identity)
            self.flows(session).finish(flow.id)
            # The session keeps the login it had: linking never raises assurance.
            return LoginOutcome(flow=flow, login=login, linked=linked)
        LOGINS.labels(identity.connector_id, "ok").inc()
        resolved = self.accounts.resolve(identity)
        login = establish_login(session, account_id=resolved.account_id, acr=identity.acr,
                                amr=identity.amr, upstream_id=identity.connector_id,
                                auth_time=identity.auth_time)
        return LoginOutcome(flow=flow, login=login)
