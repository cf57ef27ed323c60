"""Server-side browser sessions in the short-lived store, and the hub login they carry.

The cookie holds only a random id; the store key is its SHA-256, so a dump of the store does
not yield usable cookies. The id is regenerated at login (OWASP ASVS 3.2.1). Cookies are
HttpOnly and SameSite=Lax, and over https Secure and named with the ``__Host-`` prefix.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin
from werkzeug.datastructures import CallbackDict

from kernel.store import ShortLivedStore

COOKIE_NAME = "civitas_session"
#: its name when the hub is served over https (OWASP ASVS 3.4.4): a browser keeps a cookie
#: of this name only if this very host set it, Secure, with Path=/ and no Domain (RFC 6265bis
#: 4.1.3.2), so a sibling host of the same parent domain cannot plant a session of its choosing
HOST_COOKIE_NAME = "__Host-" + COOKIE_NAME


def cookie_name(secure: bool) -> str:
    """The session cookie's name: :data:`HOST_COOKIE_NAME` over https."""
    return HOST_COOKIE_NAME if secure else COOKIE_NAME


class StoreSession(CallbackDict[str, Any], SessionMixin):
    def __init__(self, initial: dict[str, Any] | None = None, sid: str | None = None) -> None:
        def on_update(_self: Any) -> None:
            self.modified = True

        super().__init__(initial or {}, on_update)
        self.sid = sid
        self.new = sid is None
        self.modified = False
        self.regenerate_requested = False

    def regenerate(self) -> None:
        """Give this session a new id at the end of the request (login, privilege change)."""
        self.regenerate_requested = True
        self.modified = True


def _key(sid: str) -> str:
    return "session:" + hashlib.sha256(sid.encode()).hexdigest()


class NoBrowserSession(StoreSession):
    """The session of an endpoint whose callers are programs (token, userinfo, the decision
    API, ...): a browser's cookie is neither read there nor acted on, which saves a store
    round trip per request and keeps ambient browser credentials out of those endpoints."""

    def __init__(self) -> None:
        super().__init__()

        def refuse(_self: Any) -> None:
            raise RuntimeError("this endpoint has no browser session to write to")

        self.on_update = refuse


#: reads a browser session's data: (the request, the session's store key, or None when the
#: request has no session cookie) -> the data, or None
SessionReader = Callable[[Request, str | None], dict[str, Any] | None]


class StoreSessionInterface(SessionInterface):
    def __init__(self, store: ShortLivedStore, *, lifetime: int, secure: bool,
                 sessionless: tuple[str, ...] = (),
                 renewed_with: Callable[[str], Sequence[tuple[str, str, int]]] | None = None
                 ) -> None:
        self.store = store
        self.lifetime = lifetime
        self.secure = secure
        self.cookie_name = cookie_name(secure)
        #: the store's sets that live as long as a hub login's session, by its ``sid``
        #: (members to add, as ``ShortLivedStore.put_many`` takes them): written with the
        #: session, in its round trip, so they are renewed whenever it is (the composition
        #: root wires the agencies that took part in it, for their back-channel logout)
        self.renewed_with = renewed_with
        #: path prefixes of endpoints for programs, which get a :class:`NoBrowserSession`
        self.sessionless = sessionless
        #: how a session is read: by default a ``get`` from the store; the composition root
        #: reads it in the same round trip as the request's rate limits (civitas/app.py).
        #: Called for every request of a browser endpoint, with or without a cookie.
        self.reader: SessionReader = self._get

    def get_cookie_name(self, app: Flask) -> str:
        return self.cookie_name

    def _get(self, request: Request, key: str | None) -> dict[str, Any] | None:
        return self.store.get(key) if key is not None else None

    def open_session(self, app: Flask, request: Request) -> StoreSession:
        if self.sessionless and request.path.startswith(self.sessionless):
            return NoBrowserSession()
        sid = request.cookies.get(self.cookie_name)
        if not (sid and 20 <= len(sid) <= 100):
            sid = None
        data = self.reader(request, _key(sid) if sid is not None else None)
        if sid is not None and data is not None:
            return StoreSession(data, sid=sid)
        return StoreSession()

    def save_session(self, app: Flask, session: SessionMixin | None,
                     response: Response) -> None:
        if session is None or isinstance(session, NoBrowserSession):
            return  # (None: opening it failed, the store is down; the answer says so)
        assert isinstance(session, StoreSession)
        if not session:
            if session.sid is not None and session.modified:
                self.store.delete(_key(session.sid))
                response.delete_cookie(self.cookie_name, path="/", secure=self.secure,
                                       httponly=True, samesite="Lax")
            return
        if not session.modified:
            return
        if session.regenerate_requested and session.sid is not None:
            self.store.delete(_key(session.sid))
            session.sid = None
        if session.sid is None:
            session.sid = secrets.token_urlsafe(32)
        members: Sequence[tuple[str, str, int]] = ()
        login = session.get("login")
        if self.renewed_with is not None and isinstance(login, dict) \
                and isinstance(login.get("sid"), str) and login["sid"]:
            members = self.renewed_with(login["sid"])
        if members:
            self.store.put_many([(_key(session.sid), dict(session), self.lifetime)],
                                members=members)
        else:
            self.store.put(_key(session.sid), dict(session), self.lifetime)
        response.set_cookie(
            self.cookie_name, session.sid, max_age=self.lifetime, path="/", httponly=True,
            secure=self.secure, samesite="Lax",
        )
        response.vary.add("Cookie")


@dataclass(frozen=True)
class HubLogin:
    """The citizen's login at the hub, kept in the session."""

    account_id: str
    auth_time: int
    acr: str
    amr: tuple[str, ...]
    upstream_id: str
    #: session id shared with agencies as ``sid`` (OpenID Connect Back-Channel Logout)
    sid: str
    #: when this login was made at the hub; ``auth_time`` is when the person authenticated
    #: at the upstream, which may be earlier (its own session answered)
    signed_in_at: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["amr"] = list(self.amr)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HubLogin:
        return cls(
            account_id=data["account_id"], auth_time=int(data["auth_time"]), acr=data["acr"],
            amr=tuple(data.get("amr", ())), upstream_id=data["upstream_id"], sid=data["sid"],
            signed_in_at=int(data.get("signed_in_at", data["auth_time"])),
        )


def current_login(session: SessionMixin) -> HubLogin | None:
    data = session.get("login")
    if not isinstance(data, dict):
        return None
    return HubLogin.from_json(data)


def establish_login(session: SessionMixin, *, account_id: str, acr: str, amr: tuple[str, ...],
                    upstream_id: str, auth_time: int | None = None) -> HubLogin:
    """Sign the session in. ``auth_time``: when the upstream authenticated the person
    (OpenID Connect Core 2: "Time when the End-User authentication occurred"), never
    later than now; None: now."""
    previous = current_login(session)
    # A fresh login by the same person keeps the session's ``sid`` so agencies that joined
    # earlier are still reached by a later logout (Back-Channel Logout 1.0 section 2.1).
    sid = (previous.sid if previous is not None and previous.account_id == account_id
           else secrets.token_urlsafe(16))
    now = int(time.time())
    login = HubLogin(account_id=account_id,
                     auth_time=now if auth_time is None else min(auth_time, now), acr=acr,
                     amr=amr, upstream_id=upstream_id, sid=sid, signed_in_at=now)
    session["login"] = login.to_json()
    if isinstance(session, StoreSession):
        session.regenerate()
    return login
