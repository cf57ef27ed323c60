"""The broker's protocol logic, free of Flask request globals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flask.sessions import SessionMixin

from connectors import PendingLogin, RedirectConnector

from .accounts import AccountDirectory
from .errors import LoginExpired, UnknownUpstream
from .flow import FlowStore, LoginFlow
from .session import HubLogin, establish_login


@dataclass
class Broker:
    issuer: str
    connectors: Mapping[str, RedirectConnector]
    accounts: AccountDirectory
    flow_lifetime: int

    def flows(self, session: SessionMixin) -> FlowStore:
        return FlowStore(session, self.flow_lifetime)

    def connector(self, upstream_id: str) -> RedirectConnector:
        connector = self.connectors.get(upstream_id)
        if connector is None:
            raise UnknownUpstream()
        return connector

    def callback_uri(self, upstream_id: str) -> str:
        """A distinct redirect URI per upstream (mix-up defence, RFC 9700 4.4.2)."""
        return f"{self.issuer}/login/{upstream_id}/callback"

    def begin(self, session: SessionMixin, flow_id: str, upstream_id: str) -> str:
        """Choose an upstream for a flow; return the URL to send the browser to."""
        flows = self.flows(session)
        flow = flows.get(flow_id)
        connector = self.connector(upstream_id)
        url, pending = connector.begin(self.callback_uri(upstream_id))
        flows.save(flow.choose(upstream_id, pending.state, dict(pending.data)))
        return url

    def complete(self, session: SessionMixin, upstream_id: str,
                 params: Mapping[str, str]) -> tuple[LoginFlow, HubLogin]:
        """Handle the upstream callback: validate, resolve the account, log in."""
        flows = self.flows(session)
        flow = flows.by_upstream_state(params.get("state"))
        if flow.upstream_id != upstream_id or flow.upstream_state is None:
            raise LoginExpired()
        pending = PendingLogin(state=flow.upstream_state, data=flow.pending or {})
        # Single use: the pending state is consumed before the upstream is even called.
        flow = flow.authenticate()
        flows.save(flow)
        identity = self.connector(upstream_id).complete(
            params, pending, self.callback_uri(upstream_id)
        )
        resolved = self.accounts.resolve(identity)
        login = establish_login(session, account_id=resolved.account_id, acr=identity.acr,
                                amr=identity.amr, upstream_id=upstream_id)
        return flow, login
