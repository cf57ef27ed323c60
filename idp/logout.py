"""Ending a hub session: OpenID Connect RP-Initiated Logout 1.0 and the session bookkeeping
behind Back-Channel Logout 1.0.

- Which agencies took part in a hub session is recorded when each is issued a code under the
  session's ``sid`` (:class:`SessionParticipants`).
- Ending a session (:meth:`LogoutService.end_session`, from the end-session endpoint or the
  hub's own sign-out) revokes the tokens issued in it and queues a logout token for every
  agency that took part and registered a ``backchannel_logout_uri`` (Back-Channel Logout 1.0
  section 2.7). That includes the agency that asked for the logout: the specification allows
  it, it makes hub-initiated and agency-initiated logout identical, and an agency that has
  already ended its own session just ignores the token.
- An end-session request (RP-Initiated Logout 1.0 section 2) is checked here, free of Flask:
  ``id_token_hint`` must be an ID token the hub signed (an expired one is fine, section 2),
  ``client_id`` must agree with its audience, and ``post_logout_redirect_uri`` must be one
  the agency registered, character for character (section 3). Any failure means no redirect.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from authlib.common.urls import add_params_to_uri, url_encode

from broker.session import HubLogin
from kernel.store import ShortLivedStore

from .agencies import AgencyClient
from .backchannel import AgencyNotifier, LogoutNotice
from .errors import IdpError

if TYPE_CHECKING:
    from .provider import ProviderServices

log = logging.getLogger("civitas.logout")

MAX_HINT_LENGTH = 8192


class InvalidLogoutRequest(IdpError):
    """RP-Initiated Logout 1.0 section 4: an invalid request is never redirected."""

    status_code = 400

    def __init__(self, reason: str) -> None:
        super().__init__(
            "This sign-out request from the agency site is not valid, so you were not sent "
            f"back to it ({reason}). To sign out of Civitas, use the button on your Civitas "
            "account page."
        )
        self.reason = reason


class SessionParticipants:
    """Which agencies took part in a hub session: the set ``sid-members:<sid>`` of client ids.

    Adding is an atomic set-add in the store (written with the authorization code, in the
    same round trip: :meth:`entries`; agencies issued codes at the same moment, a portal
    opening several agency frames, are all kept) and renews the entry for the session
    lifetime; ``take`` reads and deletes it atomically (logout happens once).
    """

    PREFIX = "sid-members:"
    #: a member that is no agency: added when the session is written, so that the set lives
    #: as long as the session does (:meth:`renewal`), not only from the last code
    KEEPALIVE = ""
    #: where releases before the set lived (a JSON list under a lock), read on take until
    #: those sessions have expired
    LEGACY_PREFIX = "sid-agencies:"

    def __init__(self, store: ShortLivedStore, *, ttl: int) -> None:
        self._store = store
        self._ttl = ttl

    def add(self, sid: str, client_id: str) -> None:
        if sid:
            self._store.put_many([], members=self.entries(sid, client_id))

    def entries(self, sid: str | None, client_id: str) -> list[tuple[str, str, int]]:
        """What :meth:`add` writes, for a caller that writes it in its own round trip
        (``ShortLivedStore.put_many``'s ``members``): none without a hub session."""
        return [(self.PREFIX + sid, client_id, self._ttl)] if sid else []

    def renewal(self, sid: str) -> list[tuple[str, str, int]]:
        """What the session store writes with a hub session's data (each time it is renewed
        for the session lifetime): this set, renewed as long (Back-Channel Logout 1.0 section
        2.3). Otherwise a session kept alive by use would outlive the record of the
        agencies that took part in it, and its logout would tell none of them."""
        return self.entries(sid, self.KEEPALIVE)

    def take(self, sid: str) -> list[str]:
        """The session's agencies, forgotten as they are read."""
        if not sid:
            return []
        found = self._store.take_members(self.PREFIX + sid)
        legacy = self._store.take(self.LEGACY_PREFIX + sid)
        if legacy is not None:
            found |= {c for c in legacy.get("client_ids", []) if isinstance(c, str)}
        found.discard(self.KEEPALIVE)
        return sorted(found)

    def put_back(self, sid: str, client_ids: list[str]) -> None:
        """Undo :meth:`take` of a logout that failed before its agencies were told."""
        if sid and client_ids:
            self._store.put_many([], members=[(self.PREFIX + sid, c, self._ttl)
                                              for c in client_ids])


@dataclass(frozen=True)
class EndSessionRequest:
    """The parameters of RP-Initiated Logout 1.0 section 2 (``ui_locales`` is accepted and,
    the hub's pages being in one language, not acted on)."""

    id_token_hint: str | None = None
    client_id: str | None = None
    post_logout_redirect_uri: str | None = None
    state: str | None = None
    ui_locales: str | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> EndSessionRequest:
        def value(name: str) -> str | None:
            raw = params.get(name)
            return raw if isinstance(raw, str) and raw else None

        return cls(id_token_hint=value("id_token_hint"), client_id=value("client_id"),
                   post_logout_redirect_uri=value("post_logout_redirect_uri"),
                   state=value("state"), ui_locales=value("ui_locales"))


@dataclass(frozen=True)
class EndSessionPlan:
    """A checked end-session request: who asked, and where (if anywhere) to go afterwards."""

    request: EndSessionRequest
    client: AgencyClient | None
    #: a registered post-logout redirect URI of ``client``, or None: no redirect
    redirect_uri: str | None
    #: the ``sid`` of a verified ``id_token_hint``
    hint_sid: str | None

    def redirect_location(self) -> str | None:
        """The redirect URI with ``state`` added (RP-Initiated Logout 1.0 section 3)."""
        if self.redirect_uri is None:
            return None
        if self.request.state is None:
            return self.redirect_uri
        uri = self.redirect_uri
        parts = urlsplit(uri)
        query = parse_qsl(parts.query, keep_blank_values=True)
        kept = [(name, value) for name, value in query if name != "state"]
        if len(kept) != len(query):
            # registered before such URIs were refused (idp/agencies.py): the agency's state
            # for this request replaces the registered one, never goes beside it
            uri = urlunsplit(parts._replace(query=url_encode(kept)))
        return str(add_params_to_uri(uri, [("state", self.request.state)]))

    def ends_without_confirmation(self, login: HubLogin) -> bool:
        """A verified hint naming this very session is proof enough that the agency the
        citizen is using asked for the logout; anything else is confirmed by the citizen,
        so a forged cross-site request cannot sign anyone out silently (section 2)."""
        return self.hint_sid is not None and secrets.compare_digest(self.hint_sid.encode(),
                                                                    login.sid.encode())


class LogoutService:
    """End-session requests and the ending of hub sessions, free of Flask."""

    def __init__(self, hub: ProviderServices, participants: SessionParticipants,
                 dispatcher: AgencyNotifier) -> None:
        self.hub = hub
        self.participants = participants
        self.dispatcher = dispatcher

    # -- RP-Initiated Logout 1.0 ------------------------------------------------------------

    def verify_id_token_hint(self, hint: str) -> dict[str, Any]:
        """Section 2: a hint the hub signed, with any key it still publishes, and issued by
        this hub; its expiry is not checked (an expired ID token is a valid hint)."""
        if len(hint) > MAX_HINT_LENGTH:
            raise InvalidLogoutRequest("the id_token_hint is too long")
        claims = self.hub.verify_id_token_hint(hint)
        if claims is None:
            raise InvalidLogoutRequest("the id_token_hint is not an ID token from Civitas")
        return claims

    def plan(self, request: EndSessionRequest) -> EndSessionPlan:
        """Check an end-session request; raise :class:`InvalidLogoutRequest` if it fails."""
        client_id = request.client_id
        hint_sid: str | None = None
        if request.id_token_hint is not None:
            claims = self.verify_id_token_hint(request.id_token_hint)
            aud = claims.get("aud")
            audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if len(audiences) != 1 or not isinstance(audiences[0], str):
                raise InvalidLogoutRequest("the id_token_hint must name one agency")
            if client_id is not None and client_id != audiences[0]:
                raise InvalidLogoutRequest("client_id is not the audience of id_token_hint")
            client_id = audiences[0]
            sid = claims.get("sid")
            hint_sid = sid if isinstance(sid, str) and sid else None
        client = None
        if client_id is not None:
            client = self.hub.agencies.client(client_id)
            if client is None:
                raise InvalidLogoutRequest("the agency is not registered")
        uri = request.post_logout_redirect_uri
        if uri is not None:
            if client is None:
                raise InvalidLogoutRequest(
                    "post_logout_redirect_uri needs id_token_hint or client_id")
            if not client.check_post_logout_redirect_uri(uri):
                raise InvalidLogoutRequest(
                    "post_logout_redirect_uri is not registered for this agency")
        return EndSessionPlan(request=request, client=client, redirect_uri=uri,
                              hint_sid=hint_sid)

    # -- ending a session ----------------------------------------------------------------------

    def end_session(self, login: HubLogin) -> list[str]:
        """End the hub session ``login`` belongs to: revoke its tokens and queue a logout
        token for each agency in it that has a back-channel logout URI. Returns their client
        ids. The caller clears the browser session (the session store entry goes with it)."""
        self.revoke_session(login.sid)
        notices = []
        taken = self.participants.take(login.sid)
        for client_id in taken:
            client = self.hub.agencies.client(client_id)
            if client is None or not client.backchannel_logout_uri:
                continue
            notices.append(LogoutNotice(
                client_id=client.client_id, logout_uri=client.backchannel_logout_uri,
                alg=client.id_token_signed_response_alg,
                sub=self.hub.subject_for(client, login.account_id), sid=login.sid,
            ))
        try:
            self.dispatcher.enqueue(notices)
        except Exception:
            # not queued (the database failed): the session's agencies go back, for the
            # logout the citizen is asked to try again, or they would never be told
            self.participants.put_back(login.sid, taken)
            raise
        log.info("hub session ended; %d agency(ies) to be told", len(notices))
        return [n.client_id for n in notices]

    def revoke_session(self, sid: str) -> None:
        """Tokens issued in the session stop working. Safe for any value, empty included.

        Uses the token store's ``sid`` revocation marker (kept as long as an access token
        lives), which access-token and refresh checks already honour."""
        if sid:
            self.hub.tokens.mark_revoked("sid", sid)
