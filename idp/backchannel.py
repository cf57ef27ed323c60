"""OpenID Connect Back-Channel Logout 1.0: logout tokens and their delivery to agencies.

- Logout token (section 2.4): a JWT signed with the hub's current key for the agency's
  algorithm, header ``typ: logout+jwt`` and ``kid``; claims ``iss aud iat exp jti sub sid``
  and ``events`` with the back-channel logout event; never a ``nonce`` (2.4, 2.6). It lives
  two minutes; a retry later than that is sent a freshly signed token (new ``jti``).
- Delivery (section 2.5): ``POST`` of ``logout_token=...`` as
  ``application/x-www-form-urlencoded`` with a timeout, redirects not followed. 200 is success
  and so is 204 (2.8); anything else is retried after 10 s, 30 s, 2 min, 10 min and 1 h, and
  given up after six attempts (the row stays, with ``last_error``). An attempt that fails
  in an unexpected way is logged and counts as a failed attempt of that row only: the pass
  goes on and records every other row's outcome.
- Security Event Tokens (RFC 8417) ride the same queue (``kind`` ``security_event``): a
  consent withdrawal is pushed to the agency's ``event_delivery_uri`` (RFC 8935 push
  delivery) as the raw SET with ``Content-Type: application/secevent+jwt``; 202 is success
  (200 and 204 too); a 400 with ``{"err": ...}`` is a permanent failure (RFC 8935 2.3), given
  up at once; anything else is retried like a logout token. A SET has no ``exp``: it is sent
  as signed, never re-minted.
- The queue is the ``logout_deliveries`` table, so a restart loses nothing. A worker claims a
  row with a conditional ``UPDATE`` (due, and not leased to another worker) and holds a lease
  while it posts: any number of workers, on SQLite or PostgreSQL, never post a row at once.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import requests
import urllib3
from joserfc import jws, jwt
from joserfc.errors import JoseError
from requests.adapters import HTTPAdapter
from sqlalchemy import event, or_, select, update
from sqlalchemy.orm import Session

from kernel.bounded import BodyTooLarge, BodyTooSlow, read_bounded
from kernel.db import Database, utcnow
from kernel.metrics import DELIVERIES

from .keys import ActiveKey, KeyRing
from .models import LogoutDelivery

log = logging.getLogger("civitas.backchannel")

EVENT = "http://schemas.openid.net/event/backchannel-logout"
TOKEN_LIFETIME = 120
#: a stored token with less validity than this left is signed afresh before it is sent
REMINT_MARGIN = 30
#: seconds to wait after the 1st, 2nd, ... failed attempt
BACKOFF = (10, 30, 120, 600, 3600)
MAX_ATTEMPTS = len(BACKOFF) + 1

LOGOUT_KIND = "backchannel_logout"
SET_KIND = "security_event"
KINDS = (LOGOUT_KIND, SET_KIND)
SET_TYPE = "secevent+jwt"
CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
TOKEN_CLAIMS_CHANGE = CAEP + "token-claims-change"
SESSION_REVOKED = CAEP + "session-revoked"
#: RFC 8935 2.2: 202 Accepted; 200 and 204 are taken as success too
SET_SUCCESS = (200, 202, 204)


def mint_logout_token(key: ActiveKey, *, issuer: str, client_id: str, sub: str, sid: str,
                      now: int) -> str:
    """Back-Channel Logout 1.0 section 2.4."""
    header = {"alg": key.alg, "kid": key.kid, "typ": "logout+jwt"}
    claims = {
        "iss": issuer, "aud": client_id, "iat": now, "exp": now + TOKEN_LIFETIME,
        "jti": secrets.token_urlsafe(16), "sub": sub, "events": {EVENT: {}},
    }
    if sid:  # section 2.4: sid, sub or both; a consent withdrawal ends every session: sub only
        claims["sid"] = sid
    return jwt.encode(header, claims, key.key, algorithms=[key.alg])


def mint_security_event(key: ActiveKey, *, issuer: str, client_id: str, sub: str,
                        withdrawn: Sequence[str], complete: bool, event_time: int,
                        now: int) -> str:
    """A consent withdrawal as a Security Event Token (RFC 8417, OpenID CAEP 1.0).

    A complete withdrawal is a CAEP ``session-revoked`` event; a partial one is
    ``token-claims-change`` naming the withdrawn claims. The subject is the agency's own
    ``sub`` as an ``iss_sub`` identifier (RFC 9493 3.2.5). No ``exp`` (RFC 8417 2.2)."""
    header = {"alg": key.alg, "kid": key.kid, "typ": SET_TYPE}
    event: dict[str, Any] = {"event_timestamp": event_time}
    if complete:
        events = {SESSION_REVOKED: event}
    else:
        event["claims"] = {"consent_withdrawn": sorted(withdrawn), "complete": False}
        events = {TOKEN_CLAIMS_CHANGE: event}
    claims = {
        "iss": issuer, "aud": client_id, "iat": now, "jti": secrets.token_urlsafe(16),
        "sub_id": {"format": "iss_sub", "iss": issuer, "sub": sub}, "events": events,
    }
    return jwt.encode(header, claims, key.key, algorithms=[key.alg])


@dataclass(frozen=True)
class SecurityEventNotice:
    """A consent withdrawal one agency is to be told of by a SET pushed to ``event_uri``."""

    client_id: str
    event_uri: str
    alg: str
    sub: str
    withdrawn: frozenset[str]
    complete: bool
    event_time: int


@dataclass(frozen=True)
class LogoutNotice:
    """What one agency is to be told: the session ``sid`` ended for its subject ``sub``."""

    client_id: str
    logout_uri: str
    alg: str
    sub: str
    sid: str


@dataclass
class DeliveryPass:
    """What one call of :meth:`AgencyNotifier.deliver_due` did."""

    delivered: int = 0
    retrying: int = 0
    given_up: int = 0

    @property
    def attempted(self) -> int:
        return self.delivered + self.retrying + self.given_up


@dataclass(frozen=True)
class _Claimed:
    id: int
    kind: str
    client_id: str
    logout_uri: str
    token: str
    attempts: int
    #: this worker's lease on the row: its outcome is recorded only while the row still
    #: holds it (another worker may have taken the row over once it ran out)
    lease_until: datetime


class AgencyNotifier:
    """What agencies are told, through one delivery queue: logout tokens (:meth:`enqueue`
    at logout) and Security Event Tokens (:meth:`enqueue_events` at a consent withdrawal),
    posted by :meth:`deliver_due` from a worker. (It was ``LogoutDispatcher`` while it
    carried logout tokens alone; the setting ``backchannel_dispatcher`` keeps its name.)"""

    def __init__(self, db: Database, keys: KeyRing, *, issuer: str, timeout: float = 5.0,
                 workers: int = 8, batch: int = 100) -> None:
        self._db = db
        self._keys = keys
        self._issuer = issuer
        self.timeout = timeout
        self._workers = workers
        self._batch = batch
        self._http = requests.Session()
        adapter = HTTPAdapter(pool_maxsize=workers, max_retries=0)
        self._http.mount("http://", adapter)
        self._http.mount("https://", adapter)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- queue ------------------------------------------------------------------------------

    def enqueue(self, notices: Sequence[LogoutNotice], now: datetime | None = None, *,
                within: Session | None = None) -> int:
        """Sign a logout token for each notice and queue it, due now (in the transaction of
        ``within`` when given: queued if and only if it commits). Returns how many."""
        return self._sign_and_queue(
            LOGOUT_KIND, "a logout token", notices, now,
            lambda key, n, at: (n.logout_uri, mint_logout_token(
                key, issuer=self._issuer, client_id=n.client_id, sub=n.sub, sid=n.sid,
                now=at)), within)

    def enqueue_events(self, notices: Sequence[SecurityEventNotice],
                       now: datetime | None = None, *, within: Session | None = None) -> int:
        """Sign a Security Event Token for each notice and queue it, due now (``within``:
        as :meth:`enqueue`)."""
        return self._sign_and_queue(
            SET_KIND, "a security event", notices, now,
            lambda key, n, at: (n.event_uri, mint_security_event(
                key, issuer=self._issuer, client_id=n.client_id, sub=n.sub,
                withdrawn=sorted(n.withdrawn), complete=n.complete, event_time=n.event_time,
                now=at)), within)

    def _sign_and_queue(self, kind: str, what: str, notices: Sequence[Any],
                        now: datetime | None,
                        mint: Callable[[ActiveKey, Any, int], tuple[str, str]],
                        within: Session | None = None) -> int:
        """One row per notice: signed with the agency's algorithm's current key, due now."""
        now = now or utcnow()
        rows = []
        for n in notices:
            try:
                key = self._keys.signing_key(n.alg)
            except LookupError:
                log.error("no %s signing key: agency %s is not sent %s", n.alg, n.client_id,
                          what)
                continue
            uri, token = mint(key, n, int(now.timestamp()))
            rows.append(LogoutDelivery(kind=kind, client_id=n.client_id, logout_uri=uri,
                                       token=token, attempts=0, next_attempt_at=now,
                                       created_at=now))
        return self._queue(rows, within)

    def _queue(self, rows: list[LogoutDelivery], within: Session | None = None) -> int:
        if rows and within is not None:
            within.add_all(rows)  # delivered from the next pass after its commit
        elif rows:
            with self._db.session() as s:
                s.add_all(rows)
            self._wake.set()
        return len(rows)

    def wake(self) -> None:
        """Deliver now what was queued in a transaction that has committed since."""
        self._wake.set()

    def pending(self) -> list[LogoutDelivery]:
        """Rows not yet delivered nor given up, oldest first (for operators and tests)."""
        return self.deliveries("pending")

    def deliveries(self, state: str = "all", *, limit: int = 1000) -> list[LogoutDelivery]:
        """Rows of every kind, oldest first: ``all``, ``pending`` (neither delivered nor given
        up) or ``failed`` (given up, or pending after a failed attempt)."""
        query = select(LogoutDelivery)
        if state == "pending":
            query = query.where(LogoutDelivery.next_attempt_at.is_not(None))
        elif state == "failed":
            query = query.where(LogoutDelivery.delivered_at.is_(None),
                                LogoutDelivery.last_error.is_not(None))
        elif state != "all":
            raise ValueError(f"unknown state {state!r}")
        with self._db.session() as s:
            return list(s.scalars(query.order_by(LogoutDelivery.id).limit(limit)))

    # -- delivery ---------------------------------------------------------------------------

    def deliver_due(self, now: datetime | None = None) -> DeliveryPass:
        """One pass: claim the rows that are due, POST them (in parallel), record outcomes."""
        now = now or utcnow()
        claimed = self._claim(now)
        result = DeliveryPass()
        if not claimed:
            return result
        with ThreadPoolExecutor(max_workers=min(self._workers, len(claimed)),
                                thread_name_prefix="civitas-logout-post") as pool:
            outcomes = list(pool.map(lambda c: self._attempt_guarded(c, now), claimed))
        # each item on its own: one that cannot be recorded keeps its lease (and is tried
        # again when it runs out), the others' outcomes are kept
        for item, (token, error, permanent) in zip(claimed, outcomes, strict=True):
            try:
                self._record(item, token, error, now, result, permanent=permanent)
            except Exception:  # noqa: BLE001 (logged; the rest of the pass goes on)
                log.exception("outcome of delivery %d for %s not recorded", item.id,
                              item.client_id)
        return result

    def _due(self, now: datetime) -> Any:
        return (LogoutDelivery.next_attempt_at <= now) & or_(
            LogoutDelivery.claimed_until.is_(None), LogoutDelivery.claimed_until < now)

    def _lease(self, rows: int) -> timedelta:
        """How long a pass over ``rows`` rows may take: ``workers`` posts at a time, each
        waiting up to ``timeout`` to connect and again to read, and a margin. A lease
        shorter than the pass lets another worker take rows this one is still posting."""
        rounds = -(-rows // self._workers)
        return timedelta(seconds=rounds * 2 * self.timeout + 30)

    def _claim(self, now: datetime) -> list[_Claimed]:
        with self._db.session() as s:
            ids = list(s.scalars(select(LogoutDelivery.id).where(self._due(now))
                                 .order_by(LogoutDelivery.next_attempt_at)
                                 .limit(self._batch)))
        lease_until = now + self._lease(len(ids))
        claimed = []
        for row_id in ids:
            with self._db.session() as s:
                # Only one worker's UPDATE matches: the others see the lease already taken.
                taken = s.execute(update(LogoutDelivery)
                                  .where(LogoutDelivery.id == row_id, self._due(now))
                                  .values(claimed_until=lease_until))
                if taken.rowcount != 1:  # type: ignore[attr-defined]
                    continue
                row = s.get(LogoutDelivery, row_id)
                assert row is not None
                claimed.append(_Claimed(row.id, row.kind, row.client_id, row.logout_uri,
                                        row.token, row.attempts, lease_until))
        return claimed

    def _fresh_token(self, token: str, now: datetime) -> str:
        """The stored token, or the same notice signed afresh when it is about to expire."""
        compact = jws.extract_compact(token.encode())
        claims = json.loads(compact.payload)
        if "exp" not in claims or int(claims["exp"]) - now.timestamp() >= REMINT_MARGIN:
            return token  # a SET has no exp (RFC 8417): it stays as signed
        key = self._keys.signing_key(str(compact.headers()["alg"]))
        return mint_logout_token(key, issuer=self._issuer, client_id=claims["aud"],
                                 sub=claims["sub"], sid=claims.get("sid", ""),
                                 now=int(now.timestamp()))

    def _attempt_guarded(self, item: _Claimed,
                         now: datetime) -> tuple[str, str | None, bool]:
        """:meth:`_attempt`, with an unexpected failure of one item made a failed attempt
        (retried with the backoff, logged) instead of the end of the whole pass."""
        try:
            return self._attempt(item, now)
        except Exception as exc:  # noqa: BLE001 (logged with its traceback)
            log.exception("delivery %d for %s failed unexpectedly", item.id, item.client_id)
            return item.token, f"unexpected error: {type(exc).__name__}", False

    def _attempt(self, item: _Claimed, now: datetime) -> tuple[str, str | None, bool]:
        """POST one token; returns the token sent, an error (None on success) and whether
        the failure is permanent (not worth a retry)."""
        if item.kind == SET_KIND:
            return (item.token, *self._push_event(item))
        try:
            token = self._fresh_token(item.token, now)
        except (LookupError, ValueError, JoseError) as exc:
            return item.token, f"cannot sign a logout token: {exc}", False
        return (token, self._post_logout(item, token), False)

    def _push_event(self, item: _Claimed) -> tuple[str | None, bool]:
        """RFC 8935 2.1: POST the SET itself; 2.3: a 400 with ``err`` is final."""
        deadline = time.monotonic() + self.timeout
        try:
            with self._http.post(item.logout_uri, data=item.token.encode(),
                                 headers={"Content-Type": "application/secevent+jwt",
                                          "Accept": "application/json"},
                                 timeout=self.timeout, allow_redirects=False,
                                 stream=True) as resp:
                if resp.status_code in SET_SUCCESS:
                    return None, False
                if resp.status_code == 400:
                    return f"HTTP 400: {_set_error(resp, deadline)}", True
                return f"HTTP {resp.status_code}", False
        except requests.RequestException as exc:
            return f"{type(exc).__name__}: {exc}", False

    def _post_logout(self, item: _Claimed, token: str) -> str | None:
        try:
            with self._http.post(item.logout_uri, data={"logout_token": token},
                                 timeout=self.timeout, allow_redirects=False,
                                 stream=True) as resp:
                # Only the status matters (section 2.8); the body is never read.
                if resp.status_code in (200, 204):
                    return None
                return f"HTTP {resp.status_code}"
        except requests.RequestException as exc:
            return f"{type(exc).__name__}: {exc}"

    def _record(self, item: _Claimed, token: str, error: str | None, now: datetime,
                result: DeliveryPass, *, permanent: bool = False) -> None:
        what = "security event" if item.kind == SET_KIND else "logout token"
        with self._db.session() as s:
            row = s.get(LogoutDelivery, item.id, with_for_update=True)
            if row is None:  # removed by an operator meanwhile
                return
            if row.claimed_until != item.lease_until:
                # the lease ran out and another worker took the row over (and may have
                # delivered it): its outcome stands, this one is not recorded over it
                log.warning("%s %d for %s: lease lost while posting; outcome not recorded "
                            "(%s)", what, item.id, item.client_id, error or "delivered")
                return
            row.attempts = item.attempts + 1
            row.token = token
            row.claimed_until = None
            if error is None:
                row.delivered_at, row.next_attempt_at, row.last_error = utcnow(), None, None
                result.delivered += 1
                DELIVERIES.labels(item.kind, "delivered").inc()
                log.info("%s delivered to %s", what, item.client_id)
            elif permanent or row.attempts >= MAX_ATTEMPTS:
                row.next_attempt_at = None
                why = "refused" if permanent else f"gave up after {row.attempts} attempts"
                row.last_error = f"{why}: {error}"[:500]
                result.given_up += 1
                DELIVERIES.labels(item.kind, "given_up").inc()
                log.error("%s for %s given up: %s", what, item.client_id, error)
            else:
                row.next_attempt_at = now + timedelta(seconds=BACKOFF[row.attempts - 1])
                row.last_error = error[:500]
                result.retrying += 1
                DELIVERIES.labels(item.kind, "retrying").inc()
                log.warning("%s for %s not delivered (attempt %d): %s", what,
                            item.client_id, row.attempts, error)

    # -- background worker --------------------------------------------------------------------

    def start(self, interval: float = 1.0) -> None:
        """Deliver from a daemon thread that wakes every ``interval`` seconds (and at once
        after an enqueue). It stops with :meth:`stop` or when the database is disposed."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        if not event.contains(self._db.engine, "engine_disposed", self._on_dispose):
            event.listen(self._db.engine, "engine_disposed", self._on_dispose)
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True,
                                        name="civitas-backchannel-logout")
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, wait: float = 0) -> None:
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(wait)

    def _on_dispose(self, _engine: Any) -> None:
        self.stop()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception:  # noqa: BLE001 (a worker loop outlives one bad pass; logged)
                log.exception("back-channel logout delivery pass failed")
            self._wake.wait(interval)
            self._wake.clear()



def _set_error(resp: requests.Response, deadline: float) -> str:
    """RFC 8935 2.3: the ``err`` (and ``description``) of a 400, read at most 4 KiB and
    given up at ``deadline`` (kernel.bounded: a receiver that trickles it holds no worker)."""
    try:
        body = json.loads(read_bounded(resp.raw, max_bytes=4096, deadline=deadline) or b"{}")
    except (ValueError, RecursionError, OSError, requests.RequestException,
            urllib3.exceptions.HTTPError, BodyTooLarge, BodyTooSlow):
        return "no error object"  # RecursionError: nested deeper than json goes ("[" * 4000)
    err = body.get("err") if isinstance(body, dict) else None
    if not isinstance(err, str):
        return "no error object"
    desc = body.get("description")
    return err + (f" ({desc})" if isinstance(desc, str) else "")
