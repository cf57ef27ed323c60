"""The whole plugin contract between the broker and the upstreams.

A connector talks to one upstream and nothing else. The broker dispatches on the capability:
a :class:`RedirectConnector` sends the browser away and handles the callback; a
:class:`PasswordConnector` checks a username and password itself. Either returns one frozen
:class:`UpstreamIdentity`; the broker sees nothing else of the upstream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from kernel.errors import CivitasError


class ConnectorError(CivitasError):
    """An upstream could not be used. Shown to the citizen with a reference id."""

    status_code = 502
    public_message = "The sign-in service did not answer correctly."


class UpstreamUnavailable(ConnectorError):
    status_code = 502
    public_message = "The sign-in service could not be reached. Please try again later."


class UpstreamResponseInvalid(ConnectorError):
    """The upstream answered, but what it sent fails validation (possible attack)."""

    status_code = 502
    public_message = "The sign-in service sent a response that could not be verified."


class UpstreamRejected(ConnectorError):
    """The upstream (or the citizen there) refused the login."""

    status_code = 403
    public_message = "The sign-in service did not confirm who you are."


@dataclass(frozen=True)
class UpstreamIdentity:
    """What an upstream asserts about the person who just logged in there."""

    connector_id: str
    #: the upstream's stable subject identifier for this person
    subject: str
    #: normalised attributes (OpenID Connect standard claim names)
    attributes: Mapping[str, Any]
    #: the assurance (acr) this upstream provides for this login
    acr: str
    amr: tuple[str, ...] = ()
    #: opaque, never shown to agencies (e.g. the upstream's id_token for logout)
    connector_data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PendingLogin:
    """What a redirect login must remember between ``begin`` and the callback.

    The broker binds it to the browser session; it is single-use.
    """

    state: str
    data: Mapping[str, Any]


@runtime_checkable
class RedirectConnector(Protocol):
    id: str
    display_name: str
    #: the assurance (acr) a login through this upstream provides
    acr: str

    def begin(self, redirect_uri: str) -> tuple[str, PendingLogin]:
        """Return the URL to send the browser to, and what to keep until the callback."""
        ...

    def complete(
        self, params: Mapping[str, str], pending: PendingLogin, redirect_uri: str
    ) -> UpstreamIdentity:
        """Validate the callback parameters against ``pending`` and return the identity."""
        ...


@runtime_checkable
class PasswordConnector(Protocol):
    id: str
    display_name: str
    acr: str

    def login(self, username: str, password: str) -> UpstreamIdentity: ...
