"""The whole plugin contract between the broker and the upstreams.

A connector talks to one upstream and nothing else. The broker dispatches on the capability:
a :class:`RedirectConnector` sends the browser away and handles the callback; a
:class:`PasswordConnector` checks a username and password itself. Either returns one frozen
:class:`UpstreamIdentity`; the broker sees nothing else of the upstream.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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


class UpstreamBusy(UpstreamUnavailable):
    """As many calls to the upstream as this process allows are already in flight: it is
    slow to answer, or very busy (:class:`Bulkhead`). Refused without calling it."""

    status_code = 503
    retry_after = 60
    public_message = ("Too many people are signing in with this service right now, or it is "
                      "slow to answer. Please wait a minute and try again.")


class UpstreamResponseInvalid(ConnectorError):
    """The upstream answered, but what it sent fails validation (possible attack)."""

    status_code = 502
    public_message = "The sign-in service sent a response that could not be verified."


class UpstreamRejected(ConnectorError):
    """The upstream (or the citizen there) refused the login."""

    status_code = 403
    public_message = "The sign-in service did not confirm who you are."


#: how long a call waits for a place in a full :class:`Bulkhead` while the upstream answers
#: in time: long enough to ride out a burst of logins (an upstream normally answers in well
#: under a second), short enough that a thread is never held long by a call it cannot make
BULKHEAD_WAIT_SECONDS = 0.5
#: a call in flight for longer than this makes the upstream slow: while every place is held
#: and one of them by such a call, one more is refused at once, without waiting
BULKHEAD_SLOW_SECONDS = 1.0


def busy_message(display_name: str,
                 then: str = "Please wait a minute and try again.") -> str:
    """What a citizen reads when :class:`Bulkhead` refuses a login through ``display_name``;
    ``then``: what to do next."""
    return (f"Too many people are signing in with {display_name} right now, or it is slow "
            f"to answer. {then}")


class Bulkhead:
    """At most ``size`` calls to one upstream in flight at once in this process.

    A worker has a few threads, and a call to an upstream that has stopped answering holds
    its thread until the call times out. Without a bound, citizens returning from one slow
    upstream would take every thread, and the whole hub (every other upstream, every
    agency's token and decision requests) would stop answering with it. With one, such an
    upstream holds at most ``size`` threads, and one more call is refused with
    :class:`UpstreamBusy` (503, ``Retry-After``) without the upstream being called: at
    once when a call in flight has taken ``slow`` seconds already (the upstream is slow, and
    waiting would only hold one more thread), else after waiting up to ``wait`` seconds for
    a place (a burst on an upstream that answers in time)."""

    def __init__(self, size: int, *, wait: float = BULKHEAD_WAIT_SECONDS,
                 slow: float = BULKHEAD_SLOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if size < 1:
            raise ValueError("a bulkhead needs at least one place")
        self.size = size
        self._wait = wait
        self._slow = slow
        self._clock = clock
        self._places = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        #: when each call in flight began, by a number of its own
        self._began: dict[int, float] = {}
        self._numbers = itertools.count()

    def _is_slow(self) -> bool:
        with self._lock:
            began = min(self._began.values(), default=None)
        return began is not None and self._clock() - began >= self._slow

    @contextmanager
    def call(self, refusal: str) -> Iterator[None]:
        """Hold a place for the block; :class:`UpstreamBusy` with ``refusal`` (for the
        citizen) if there is none."""
        if not self._places.acquire(blocking=False) and (
                self._is_slow() or not self._places.acquire(timeout=self._wait)):
            raise UpstreamBusy(refusal)
        number = next(self._numbers)
        try:
            with self._lock:
                self._began[number] = self._clock()
            yield
        finally:
            with self._lock:
                self._began.pop(number, None)
            self._places.release()


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
    #: when the person authenticated at the upstream (its ID token's ``auth_time``), when
    #: it says; None: just now (a password checked in this request)
    auth_time: int | None = None


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

    def begin(self, redirect_uri: str, *, reauthenticate: bool = False,
              max_age: int | None = None, login_hint: str | None = None,
              ui_locales: str | None = None) -> tuple[str, PendingLogin]:
        """Return the URL to send the browser to, and what to keep until the callback.
        ``reauthenticate``: the upstream must authenticate the person again rather than
        answer from a session of its own; ``max_age``: or have done so within that many
        seconds; ``login_hint``, ``ui_locales``: the agency's hints, for the upstream to use
        as it can (OpenID Connect Core 3.1.2.1)."""
        ...

    def probe(self) -> None:
        """Call the upstream now, bypassing any cache; raise :class:`UpstreamUnavailable` if
        it does not answer (whether an upstream taken as down is back: broker.health)."""
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
