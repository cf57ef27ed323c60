"""Authorization codes, access tokens and refresh tokens.

Codes (RFC 6749 4.1.2): single use by an atomic take from the short-lived store, bound to
client, redirect URI and PKCE challenge, 60 s by default. A second redemption of a code is
refused and revokes every token issued from it (RFC 6749 10.5): the marker that a code was
issued is written with the code, so a reuse that races the first redemption is still seen.

Access tokens are JWTs in the RFC 9068 profile (``typ: at+jwt``) so agency APIs can check
them offline. What the hub needs of one beyond its public claims (the account, the grant,
the code it came from) travels in it, encrypted for the hub alone (claim ``civitas``), so
issuing one writes nothing to the store: the store holds revocation markers only (of a
token's ``jti``, its code, grant, hub session or agency-and-citizen), all read in one round
trip at each use. Tokens issued before, with a record in the store instead, are still read
that way until they expire. Refresh tokens are ``<grant_id>.<secret>``, opaque to agencies: one SQL
row per grant holds the hash of its live token, rotated in place on every use, and any other
token of the grant presented revokes the whole grant (RFC 9700 4.14.2). Only hashes of codes
and tokens are ever stored or used as keys.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from joserfc import jwt
from joserfc.errors import JoseError
from sqlalchemy import (
    CursorResult,
    Table,
    bindparam,
    delete,
    exists,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Session

from broker.accounts import account_is_live
from kernel import jsonfast
from kernel.crypto import DecryptionError, FieldCipher
from kernel.db import Database, Prepared, utcnow
from kernel.ids import new_id
from kernel.metrics import REFRESH_REVOKED
from kernel.store import ShortLivedStore

from .keys import SUPPORTED_ALGS, KeyRing
from .models import RefreshGrantRecord, RefreshToken

log = logging.getLogger(__name__)


def digest(value: str) -> str:
    # surrogatepass: a JSON string (a client assertion's jti) can hold a lone surrogate,
    # which plain UTF-8 refuses; every other string hashes to the same bytes as before
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def new_grant_id() -> str:
    return new_id()


class MalformedJWT(JoseError):
    """A token joserfc failed on with something other than its own errors: one shaped in a
    way it does not expect (a ``crit`` header that is no list of names, RFC 7515 4.1.11:
    TypeError), or a JSON document nested deeper than Python's parser goes
    (RecursionError)."""

    error = "malformed_jwt"


#: what joserfc raises, besides its own errors, on a token it cannot read
_UNREADABLE = (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError)


def decode_jwt(value: str, key: Any, *, algorithms: Sequence[str]) -> jwt.Token:
    """joserfc's ``jwt.decode``, where every way a token can fail to decode is a
    :class:`JoseError` (a :class:`MalformedJWT` for the failures joserfc does not name), so
    that a caller's one ``except JoseError`` is the invalid-token path for them all. An error
    that ``key`` (a callable) raises of its own, an OAuth error, passes through."""
    try:
        return jwt.decode(value, key, algorithms=algorithms)
    except JoseError:
        raise
    except _UNREADABLE as exc:
        raise MalformedJWT(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class AuthorizationCode:
    """Authlib's AuthorizationCodeMixin, as an immutable record."""

    code_hash: str
    client_id: str
    redirect_uri: str
    scope: str
    nonce: str | None
    code_challenge: str
    code_challenge_method: str
    account_id: str
    auth_time: int
    acr: str
    amr: tuple[str, ...]
    sid: str
    #: refresh grants made by redemptions of this code that failed afterwards (the code
    #: was put back, :meth:`TokenStore.restore_code`): their INSERT may have committed
    #: though its reply was lost, and the redemption that succeeds revokes them
    abandoned: tuple[str, ...] = ()

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> str:
        return self.acr

    def get_amr(self) -> list[str]:
        return list(self.amr)


@dataclass(frozen=True)
class AccessToken:
    """What the hub knows about an access token it issued (Authlib's TokenMixin)."""

    jti: str
    client_id: str
    account_id: str
    sub: str
    scope: str
    issued_at: int
    expires_at: int
    grant_id: str
    sid: str
    code_hash: str | None = None
    token_type: str = "access_token"  # noqa: S105 (a token type name)

    @property
    def for_client_itself(self) -> bool:
        """Issued by client_credentials: no citizen behind it (``account_id`` is empty)."""
        return not self.account_id

    # -- Authlib TokenMixin -----------------------------------------------------------------
    def check_client(self, client: Any) -> bool:
        return bool(client.client_id == self.client_id)

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_at - self.issued_at

    def is_expired(self) -> bool:
        return self.expires_at <= time.time()

    def is_revoked(self) -> bool:
        return False  # a revoked token is never returned (TokenStore.unless_revoked)


#: the key saying since when the store holds every revocation mark the hub wrote
MARKS_SINCE = "revocation-marks-since"
#: kept as long as the store keeps its data: written afresh when gone (expired, evicted),
#: it only refuses the access tokens issued before, for their remaining lifetime
MARKS_SINCE_TTL = 10 * 365 * 86400


class TokenStore:
    """Codes, nonces and revocation markers in the short-lived store (and the records of
    access tokens issued before the tokens carried their own)."""

    def __init__(self, store: ShortLivedStore, *, code_lifetime: int,
                 access_token_lifetime: int) -> None:
        self._store = store
        self.code_lifetime = code_lifetime
        self.access_token_lifetime = access_token_lifetime
        #: whether this process has made sure that :data:`MARKS_SINCE` is written
        self._marks_since_written = False

    # -- codes ----------------------------------------------------------------------------

    def save_code(self, code: str, record: dict[str, Any], *,
                  members: Sequence[tuple[str, str, int]] = ()) -> bool:
        """The code's record and its "issued" marker (kept as long as any token from the
        code can live, so a replay can revoke them), ``members`` (the hub session's
        participants), and the code's nonce when it has one, in one atomic round trip.

        False, and nothing stored, when this agency's nonce is already taken by a code that
        may still be redeemed: the request is a replay (OpenID Connect Core 15.5.2). The
        nonce is claimed with the code, not looked up before it, so two requests that race
        with one nonce cannot both get a code."""
        code_hash = digest(code)
        items: list[tuple[str, dict[str, Any], int]] = [
            ("code-issued:" + code_hash, {"at": int(time.time())},
             max(self.code_lifetime, self.access_token_lifetime)),
            ("code:" + code_hash, record, self.code_lifetime)]
        nonce: tuple[str, dict[str, Any], int] | None = None
        if record.get("nonce"):
            nonce = (self._nonce_key(record["client_id"], record["nonce"]), {},
                     self.code_lifetime)
        return self._store.put_many(items, members=members, new=nonce)

    def take_code(self, code: str) -> tuple[AuthorizationCode | None, bool]:
        """Atomically take a code: (the code, whether its hub session has ended since), in
        one round trip. A second take of a known code revokes its tokens: (None, False)."""
        code_hash = digest(code)
        record, marked = self._store.take_marked(
            "code:" + code_hash, field="sid", mark_prefix="revoked-sid:",
            otherwise="code-issued:" + code_hash)
        if record is None:
            if marked:  # issued, and taken before: a replay (RFC 6749 4.1.2)
                self.mark_revoked("code", code_hash)
            return None, False
        record["amr"] = tuple(record.get("amr", ()))
        record["abandoned"] = tuple(record.get("abandoned", ()))
        return AuthorizationCode(code_hash=code_hash, **record), marked

    def restore_code(self, code: AuthorizationCode, *, abandoned_grant: str | None = None
                     ) -> bool:
        """Put back a code taken by a redemption that failed before any token was made (the
        database was unreachable: the 503 says "try again", and the retry must find it), for
        the rest of its lifetime. False when that has run out. A replay that came meanwhile
        found it taken and revoked its tokens (:meth:`take_code`), which stays so."""
        revoked = "revoked-code:" + code.code_hash
        issued, replayed = self._store.get_many(["code-issued:" + code.code_hash, revoked])
        left = (int(issued["at"]) + self.code_lifetime - int(time.time())
                if isinstance(issued, dict) and "at" in issued else 0)
        if left <= 0 or replayed is not None:
            # a replay while it was out (RFC 6749 10.5): the code stays used up; put back,
            # it would give a valid ID token (which no mark revokes) after the replay
            return False
        record = {k: v for k, v in asdict(code).items() if k != "code_hash"}
        record["amr"] = list(code.amr)
        record["abandoned"] = [*code.abandoned, *([abandoned_grant] if abandoned_grant else [])]
        self._store.put("code:" + code.code_hash, record, left)
        if self._store.get(revoked) is not None:  # a replay between the look and the put
            self._store.delete("code:" + code.code_hash)
            return False
        return True

    # -- revocation markers ---------------------------------------------------------------

    def mark_revoked(self, kind: str, value: str) -> None:
        """Revoke every access token of a code, grant or hub session (``sid``)."""
        self._store.put(f"revoked-{kind}:{value}", {"at": int(time.time())},
                        self.access_token_lifetime)

    def mark_agency_revoked(self, account_id: str, client_id: str) -> None:
        """Every access token this agency holds for this citizen, issued until now, dies
        (read back by :meth:`unless_revoked`)."""
        self._store.put(f"revoked-agency:{client_id}:{account_id}", {"at": time.time()},
                        self.access_token_lifetime)

    def agency_revoked_since(self, account_id: str, client_id: str, since: float) -> bool:
        """Whether :meth:`mark_agency_revoked` was called for them at ``since`` or later."""
        mark = self._store.get(f"revoked-agency:{client_id}:{account_id}")
        return mark is not None and float(mark["at"]) >= since

    def marks_kept_since(self, *, lost: bool = False) -> int:
        """Since when (Unix time, whole seconds) the store holds every revocation mark: its
        first use, or when it was found to have ``lost`` its data (a Redis restarted without
        persistence, flushed, or its keys evicted), and the marks with it. An access token
        issued before cannot be told from a revoked one (:meth:`unless_revoked`); a lost
        store's time is the next whole second, as ``iat`` does not say whether a token of
        this second was issued before the loss."""
        now = int(time.time()) + (1 if lost else 0)
        self._marks_since_written = True
        if self._store.put_new(MARKS_SINCE, {"at": now}, MARKS_SINCE_TTL):
            return now
        found = self._store.get(MARKS_SINCE)
        return int(found["at"]) if found is not None else now

    def before_issuing(self) -> None:
        """Before this process issues its first access token: the store says since when it
        holds the marks, or a token issued now would be taken, at its first check, for one
        issued before the store's data were lost."""
        if not self._marks_since_written:
            self.marks_kept_since()

    def is_marked_revoked(self, kind: str, value: str | None) -> bool:
        return bool(value) and self._store.get(f"revoked-{kind}:{value}") is not None

    # -- access token records --------------------------------------------------------------

    def save_access_token(self, token: AccessToken) -> None:
        self._store.put("at:" + token.jti, {
            k: getattr(token, k) for k in ("client_id", "account_id", "sub", "scope",
                                          "issued_at", "expires_at", "grant_id", "sid",
                                          "code_hash")
        }, max(1, token.expires_at - int(time.time())))

    def access_token_record(self, jti: str) -> AccessToken | None:
        """A token issued with a record in the store (before tokens carried their own), if
        it is live. Remove once every such token has expired (``access_token_lifetime``
        after the upgrade)."""
        record = self._store.get("at:" + jti)
        if record is None or record["expires_at"] <= time.time():
            return None
        return self.unless_revoked(AccessToken(jti=jti, **record))

    def unless_revoked(self, token: AccessToken) -> AccessToken | None:
        """``token``, unless one of the ways it can have been revoked says so: its own
        ``jti`` (RFC 7009), its code (a second redemption, RFC 6749 10.5), its grant, its hub
        session (logout) or its agency and citizen (consent withdrawn); one round trip. A
        token issued before the store last lost its marks (:meth:`marks_kept_since`) may
        have been revoked: it is refused."""
        marks = [f"revoked-{kind}:{value}" for kind, value in (
            ("jti", token.jti), ("code", token.code_hash), ("grant", token.grant_id),
            ("sid", token.sid)) if value]
        *revoked, agency, since = self._store.get_many(
            [*marks, f"revoked-agency:{token.client_id}:{token.account_id}", MARKS_SINCE])
        if any(mark is not None for mark in revoked):
            return None
        kept_since = int(since["at"]) if since is not None else self.marks_kept_since(
            lost=True)
        if kept_since > time.time() + 1:
            # written by a clock that was ahead, and has been put back since: from now on
            # (or no token would pass until the clock reached it)
            kept_since = int(time.time())
            self._store.put(MARKS_SINCE, {"at": kept_since}, MARKS_SINCE_TTL)
        if token.issued_at < kept_since:
            return None
        if agency is not None and token.issued_at <= float(agency["at"]):
            return None
        return token

    def revoke_access_token(self, jti: str) -> None:
        """RFC 7009: this token dies (a marker as long as a token can live; a token issued
        with a record loses it too)."""
        self.mark_revoked("jti", jti)
        self._store.delete("at:" + jti)

    # -- nonces ---------------------------------------------------------------------------

    @staticmethod
    def _nonce_key(client_id: str, nonce: str) -> str:
        return f"nonce:{client_id}:{digest(nonce)}"

    # -- consent answers -------------------------------------------------------------------

    def answer_once(self, request_id: str, ttl: int) -> bool:
        """Claim the answer to a parked consent request: True the first time, False for a
        second submit of the same form (two at once included: the browser session is
        written last-wins, so its single use alone lets both through). Kept ``ttl``
        seconds, as long as the request can be answered."""
        return self._store.put_new(f"consent-answer:{digest(request_id)}", {}, max(1, ttl))

    # -- client assertion ids -------------------------------------------------------------

    def use_jti(self, client_id: str, jti: str, ttl: int) -> bool:
        """Record a client assertion's ``jti`` (RFC 7523 3, item 7): True the first time,
        False for a replay. Kept ``ttl`` seconds, as long as the assertion could be valid."""
        return self._store.put_new(f"assertion-jti:{client_id}:{digest(jti)}", {},
                                   max(1, ttl))


#: the claim that carries what only the hub may read of an access token
PRIVATE_CLAIM = "civitas"
#: what its encryption is bound to (kernel.crypto: a value for one use is refused for another)
PRIVATE_CONTEXT = b"access-token"


class AccessTokens:
    """JWT access tokens (RFC 9068) signed with the hub's current key.

    The claims an agency reads are RFC 9068's; :data:`PRIVATE_CLAIM` holds the account, the
    grant and the code's hash, encrypted with the settings' ``encryption_key`` (AES-256-GCM-SIV,
    :class:`~kernel.crypto.FieldCipher`): the internal account id would let agencies link
    a citizen across pairwise sectors, so none of it is readable outside the hub."""

    def __init__(self, *, issuer: str, keys: KeyRing, tokens: TokenStore,
                 cipher: FieldCipher) -> None:
        self.issuer = issuer
        self.keys = keys
        self.tokens = tokens
        self._cipher = cipher

    def _private(self, account_id: str, grant_id: str, code_hash: str | None) -> str:
        return self._cipher.encrypt(jsonfast.dumps([account_id, grant_id, code_hash]),
                                    context=PRIVATE_CONTEXT)

    def issue(self, *, client_id: str, alg: str, account_id: str, sub: str, scope: str,
              grant_id: str, sid: str, auth_time: int, acr: str,
              code_hash: str | None = None) -> str:
        self.tokens.before_issuing()
        now = int(time.time())
        return self._signed(alg, {
            "iss": self.issuer, "sub": sub, "aud": client_id, "client_id": client_id,
            "iat": now, "exp": now + self.tokens.access_token_lifetime,
            "jti": secrets.token_urlsafe(24), "scope": scope, "auth_time": auth_time,
            "acr": acr, "sid": sid,
            PRIVATE_CLAIM: self._private(account_id, grant_id, code_hash)})

    def issue_for_client(self, *, client_id: str, alg: str, scope: str) -> str:
        """RFC 9068 2.2 for a grant without a resource owner (client_credentials): ``sub``
        is the agency's client_id, there is no account, session or authentication time."""
        self.tokens.before_issuing()
        now = int(time.time())
        return self._signed(alg, {
            "iss": self.issuer, "sub": client_id, "aud": self.issuer, "client_id": client_id,
            "iat": now, "exp": now + self.tokens.access_token_lifetime,
            "jti": secrets.token_urlsafe(24), "scope": scope,
            PRIVATE_CLAIM: self._private("", "", None)})

    def _signed(self, alg: str, claims: dict[str, Any]) -> str:
        key = self.keys.signing_key(alg)
        return key.sign_jwt({"alg": key.alg, "kid": key.kid, "typ": "at+jwt"}, claims)

    def verify(self, token: str) -> AccessToken | None:
        """The record of a valid, unrevoked access token this hub issued; else None."""
        if not token or token.count(".") != 2 or len(token) > 8192:
            return None
        try:
            decoded = decode_jwt(token, self.keys.verifying_keyset,
                                 algorithms=SUPPORTED_ALGS)
        except JoseError:
            return None
        claims = decoded.claims
        if (decoded.header.get("typ") != "at+jwt" or claims.get("iss") != self.issuer
                or not isinstance(claims.get("exp"), int) or claims["exp"] <= time.time()
                or not isinstance(claims.get("jti"), str)):
            return None
        private = claims.get(PRIVATE_CLAIM)
        if private is None:  # issued with a record in the store, before the claim
            record = self.tokens.access_token_record(claims["jti"])
            if record is None or record.client_id != claims.get("client_id"):
                return None
            return record
        found = self._read(claims, private)
        return self.tokens.unless_revoked(found) if found is not None else None

    def _read(self, claims: dict[str, Any], private: Any) -> AccessToken | None:
        """The token the hub issued with these (signed) claims; None if its private claim
        does not open (another hub's key, or not one the hub wrote)."""
        try:
            account_id, grant_id, code_hash = jsonfast.loads(
                self._cipher.decrypt(private, context=PRIVATE_CONTEXT))
        except (DecryptionError, ValueError, TypeError, AttributeError):
            return None
        client_id, iat = claims.get("client_id"), claims.get("iat")
        if not isinstance(client_id, str) or not isinstance(iat, int):
            return None
        return AccessToken(
            jti=claims["jti"], client_id=client_id, account_id=account_id,
            sub=str(claims.get("sub", "")), scope=str(claims.get("scope", "")),
            issued_at=iat, expires_at=claims["exp"], grant_id=grant_id,
            sid=str(claims.get("sid", "")), code_hash=code_hash)


@dataclass(frozen=True)
class RefreshGrant:
    """A refresh token's grant, as Authlib's refresh grant sees it."""

    grant_id: str
    client_id: str
    account_id: str
    scope: str
    sid: str
    acr: str
    amr: tuple[str, ...]
    auth_time: int
    expires_at: int
    #: the citizen's account existed, not deleted, when the grant was read (no default: a
    #: grant made without reading it must not pass for a live account's)
    account_live: bool
    token_type: str = "refresh_token"  # noqa: S105 (a token type name)

    def get_scope(self) -> str:
        return self.scope

    def check_client(self, client: Any) -> bool:
        return bool(client.client_id == self.client_id)

    def is_expired(self) -> bool:
        return self.expires_at <= time.time()

    def is_revoked(self) -> bool:
        return False


class ScopeWidened(ValueError):
    """A refresh request asked for more than its token's scope (RFC 6749 6)."""


_TOKENS = cast(Table, RefreshToken.__table__)
_GRANTS = cast(Table, RefreshGrantRecord.__table__)
#: whether the grant's citizen still has an account, read with the grant (a refresh needs it)
_ACCOUNT_LIVE = account_is_live(_GRANTS.c.account_id).label("account_live")
#: a grant by its id (the primary key: one row whatever the grant's history)
_GRANT = select(_GRANTS, _ACCOUNT_LIVE).where(_GRANTS.c.grant_id == bindparam("of_grant"))
#: the use of a grant's live token: exactly one concurrent use matches, none once revoked
_CLAIM = (update(_GRANTS)
          .where(_GRANTS.c.grant_id == bindparam("of_grant"),
                 _GRANTS.c.token_hash == bindparam("presented"), _GRANTS.c.revoked_at.is_(None))
          .values(token_hash=None))
#: the rotated token, written in place of the one just used (no index holds the columns it
#: writes, so PostgreSQL rewrites no index)
_ROTATE = (update(_GRANTS)
           .where(_GRANTS.c.grant_id == bindparam("of_grant"), _GRANTS.c.token_hash.is_(None),
                  _GRANTS.c.revoked_at.is_(None))
           .values(token_hash=bindparam("new_hash"), scope=bindparam("new_scope"),
                   sid=bindparam("new_sid"), acr=bindparam("new_acr"),
                   amr=bindparam("new_amr"), auth_time=bindparam("new_auth_time"),
                   rotations=_GRANTS.c.rotations + 1, rotated_at=bindparam("now")))
_INSERT_GRANT = insert(_GRANTS)
_REVOKE = (update(_GRANTS)
           .where(_GRANTS.c.grant_id == bindparam("of_grant"), _GRANTS.c.revoked_at.is_(None))
           .values(revoked_at=bindparam("now"), revoked_reason=bindparam("reason")))
#: a used token made the live one again: only while its grant has none and is unrevoked
_PUT_BACK = (update(_GRANTS)
             .where(_GRANTS.c.grant_id == bindparam("of_grant"), _GRANTS.c.token_hash.is_(None),
                    _GRANTS.c.revoked_at.is_(None))
             .values(token_hash=bindparam("presented")))
#: a token issued before migration 0012, by its hash, with its grant's revocation
_LEGACY_TOKEN = (select(_TOKENS, _GRANTS.c.revoked_at.is_not(None).label("grant_revoked"),
                        _ACCOUNT_LIVE)
                 .join(_GRANTS, _GRANTS.c.grant_id == _TOKENS.c.grant_id)
                 .where(_TOKENS.c.token_hash == bindparam("token_hash")))
_LEGACY_CLAIM = (update(_TOKENS)
                 .where(_TOKENS.c.id == bindparam("row_id"), _TOKENS.c.used_at.is_(None),
                        ~exists().where(_GRANTS.c.grant_id == bindparam("of_grant"),
                                        _GRANTS.c.revoked_at.is_not(None)))
                 .values(used_at=bindparam("now")))

#: why a grant was revoked (``refresh_grants.revoked_reason``)
REUSE, REVOKED_BY_AGENCY, CONSENT_WITHDRAWN = "reuse", "revoked", "consent_withdrawn"
#: a grant made by a code redemption that failed (its reply never sent): the retry's stands
REDEMPTION_FAILED = "redemption_failed"
ACCOUNT_DELETED = "account_deleted"
#: issued before offline access needed the citizen's consent, which they have not given
NO_OFFLINE_CONSENT = "no_offline_consent"


#: ``<grant_id>.<secret>``: a grant id (hex from new_grant_id; the column holds 32 characters
#: of this alphabet at most) and token_urlsafe's alphabet
_REFRESH_TOKEN = re.compile(r"([A-Za-z0-9_-]{1,32})\.[A-Za-z0-9_-]+")


def grant_of(token: str) -> str | None:
    """The grant id a refresh token carries (``<grant_id>.<secret>``); None for a token
    issued before migration 0012 (no dot) or anything else, which is then looked up only by
    its hash."""
    shaped = _REFRESH_TOKEN.fullmatch(token)
    return shaped.group(1) if shaped else None


def _check_scope(scope: str, within: set[str] | None) -> None:
    """RFC 6749 6: a refresh may ask for the token's scope or less, never more."""
    if within is not None and not within <= set(scope.split()):
        raise ScopeWidened()


class GrantEnded(ValueError):
    """A rotated token was to be written for a grant that was revoked meanwhile."""


class RefreshTokens:
    """Refresh tokens in SQL, one row per grant with the hash of its live token, rotated in
    place on every use; a grant is revoked as a whole, on reuse, on the agency's revocation
    (RFC 7009) or when the citizen withdraws consent."""

    def __init__(self, db: Database, tokens: TokenStore, *, lifetime: int) -> None:
        self._db = db
        self._tokens = tokens
        self.lifetime = lifetime
        # the statements of every refresh, compiled once (kernel.db.Prepared)
        self._read_grant = Prepared(db, _GRANT)
        self._claim = Prepared(db, _CLAIM)
        self._rotate = Prepared(db, _ROTATE)

    def issue(self, *, grant_id: str, client_id: str, account_id: str, scope: str, sid: str,
              acr: str, amr: tuple[str, ...], auth_time: int,
              family_expires_at: int | None = None, new_grant: bool | None = None) -> str:
        """A new refresh token: the first of a new grant, which ends ``lifetime`` from now,
        or, with ``family_expires_at``, the rotation of a grant whose token was just used,
        which keeps its end. ``new_grant=True`` with ``family_expires_at`` starts a grant
        with that end. Raises :class:`GrantEnded` when the grant was revoked meanwhile."""
        token = f"{grant_id}.{secrets.token_urlsafe(32)}"
        now = utcnow()
        starts = new_grant if new_grant is not None else family_expires_at is None
        # one statement either way, atomic on its own: no transaction round trips around it
        if not starts:
            if self._rotate.rowcount({
                    "of_grant": grant_id, "new_hash": digest(token), "new_scope": scope,
                    "new_sid": sid, "new_acr": acr, "new_amr": list(amr),
                    "new_auth_time": auth_time, "now": now}) != 1:
                raise GrantEnded(grant_id)
            return token
        expires = (now + timedelta(seconds=self.lifetime) if family_expires_at is None
                   else datetime.fromtimestamp(family_expires_at, UTC))
        with self._db.reader() as conn:  # (an INSERT that fails raises)
            conn.execute(_INSERT_GRANT, {
                "grant_id": grant_id, "client_id": client_id, "account_id": account_id,
                "created_at": now, "expires_at": expires, "token_hash": digest(token),
                "scope": scope, "sid": sid, "acr": acr, "amr": list(amr),
                "auth_time": auth_time})
        return token

    @staticmethod
    def _grant(row: Any) -> RefreshGrant:
        """The grant of a row of refresh_grants or (before 0012) of refresh_tokens."""
        return RefreshGrant(grant_id=row.grant_id,
                            client_id=row.client_id, account_id=row.account_id, scope=row.scope,
                            sid=row.sid, acr=row.acr, amr=tuple(row.amr or ()),
                            auth_time=row.auth_time, expires_at=int(row.expires_at.timestamp()),
                            account_live=bool(row.account_live))

    def find(self, token: str) -> RefreshGrant | None:
        """A live refresh token (its grant's live one, unexpired, unrevoked), without using
        it."""
        token_hash = digest(token)
        grant_id = grant_of(token)
        row = None if grant_id is None else next(
            iter(self._read_grant.rows({"of_grant": grant_id})), None)
        live = (row is not None and row.revoked_at is None and row.token_hash is not None
                and hmac.compare_digest(row.token_hash, token_hash))
        if not live and (row is None or row.revoked_at is None):
            # (a token of the new kind is in refresh_tokens after a downgrade from 0012 and
            # an upgrade back)
            with self._db.reader() as conn:
                row = conn.execute(_LEGACY_TOKEN, {"token_hash": token_hash}).first()
            live = row is not None and row.used_at is None and not row.grant_revoked
        if row is None or not live or row.expires_at <= utcnow():
            return None
        return self._grant(row)

    def use(self, token: str, client_id: str,
            scope_within: set[str] | None = None) -> RefreshGrant | None:
        """Consume a refresh token atomically (exactly one concurrent use wins): one read of
        its grant, one conditional update.

        A token of the grant that is not its live one (a used token presented again) revokes
        the grant. With ``scope_within``, a live token whose scope does not cover it raises
        :class:`ScopeWidened` and stays unused (RFC 6749 6).
        """
        token_hash = digest(token)
        grant_id = grant_of(token)
        if grant_id is None:
            return self._use_legacy(token_hash, client_id, scope_within, unknown_revokes=None)
        now = utcnow()
        # Two statements, each atomic, outside a transaction: the claim matches only while
        # the presented token is the grant's live one and the grant is unrevoked, so whatever
        # commits between the read and the claim (a concurrent use, a revocation) makes it
        # claim nothing, which is then treated as reuse below. A transaction around both
        # (READ COMMITTED) would see the same: each statement sees what is committed.
        row = next(iter(self._read_grant.rows({"of_grant": grant_id})), None)
        if row is None or row.client_id != client_id or row.revoked_at is not None:
            return None  # unknown, another agency's, or revoked already
        presented_live = (row.token_hash is not None
                          and hmac.compare_digest(row.token_hash, token_hash))
        if not presented_live:
            # Not the live token: a used one (or a forgery) presented again, which revokes
            # the grant; or one in refresh_tokens (after a downgrade from 0012 and an
            # upgrade back), used as such.
            return self._use_legacy(token_hash, client_id, scope_within,
                                    unknown_revokes=grant_id)
        if row.expires_at <= now:
            return None
        _check_scope(row.scope, scope_within)
        if self._claim.rowcount({"of_grant": grant_id, "presented": token_hash}) == 1:
            return self._grant(row)
        self._reused(grant_id, client_id)  # a concurrent use won: a copy exists
        return None

    def put_back(self, token: str) -> bool:
        """Undo :meth:`use` of ``token`` when nothing was issued from it (the database or
        the store failed before its successor was written, and the agency was told to try
        again): its grant's live token again, unless the grant was revoked or given a
        successor meanwhile. Whether it was put back."""
        grant_id = grant_of(token)
        if grant_id is None:
            return False  # (a token from before migration 0012 is used up for good)
        with self._db.reader() as conn:
            return cast(CursorResult[Any], conn.execute(_PUT_BACK, {
                "of_grant": grant_id, "presented": digest(token)})).rowcount == 1

    def _use_legacy(self, token_hash: str, client_id: str, scope_within: set[str] | None, *,
                    unknown_revokes: str | None) -> RefreshGrant | None:
        """``use`` for a token issued before migration 0012 (by its hash): its row in
        refresh_tokens. Its grant's rotated token is written to the grant's row, as any
        other. A token not found there revokes the grant ``unknown_revokes``, if given."""
        now = utcnow()
        with self._db.reader() as conn:
            row = conn.execute(_LEGACY_TOKEN, {"token_hash": token_hash}).first()
            if row is None:
                revoke = unknown_revokes
            elif row.client_id != client_id or row.grant_revoked:
                return None
            else:
                if row.used_at is None and row.expires_at > now:
                    _check_scope(row.scope, scope_within)
                claimed = cast(CursorResult[Any], conn.execute(
                    _LEGACY_CLAIM, {"row_id": row.id, "of_grant": row.grant_id, "now": now})
                ).rowcount
                if claimed == 1 and row.expires_at > now:
                    return self._grant(row)
                revoke = None if claimed == 1 else row.grant_id  # used before, or raced
        if revoke is not None:
            self._reused(revoke, client_id)
        return None

    def _reused(self, grant_id: str, client_id: str) -> None:
        """A token of the grant other than its live one was presented: someone holds a copy
        of a token (RFC 9700 4.14.2), a security event the operator should see."""
        if self.revoke_grant(grant_id, reason=REUSE):
            log.warning("refresh token reuse by agency %s: grant %s revoked", client_id,
                        grant_id)

    def purge_expired(self, *, before: datetime, batch: int = 5000) -> int:
        """Delete the grants that ended before ``before`` (and any tokens of theirs issued
        before migration 0012); how many grants were deleted.

        A token past its grant's end is refused whether or not its row is there. Pass a
        ``before`` at least one access-token lifetime in the past: until then, replaying a
        used token still revokes the access tokens the grant issued last. ``batch`` rows per
        transaction, so that no lock or transaction grows with the backlog. The grants go
        last: no token is left without its grant's row."""
        purged = 0
        for table, key in ((_TOKENS, _TOKENS.c.id), (_GRANTS, _GRANTS.c.grant_id)):
            while True:
                with self._db.session() as s:
                    done = cast(CursorResult[Any], s.execute(
                        delete(table).where(key.in_(
                            select(key).where(table.c.expires_at < before).limit(batch))
                        ).execution_options(synchronize_session=False))).rowcount
                if table is _GRANTS:
                    purged += done
                if done < batch:
                    break
        return purged

    def revoke_grant(self, grant_id: str, *, reason: str = REVOKED_BY_AGENCY) -> bool:
        """Revoke a grant: each of its tokens, used, live or rotated in later, is refused,
        and so are the access tokens it issued. One row, whatever the grant's history; a
        grant revoked already keeps its first revocation's time and reason. Whether this
        call revoked it (counted in ``civitas_refresh_grants_revoked_total``)."""
        with self._db.reader() as conn:
            revoked = cast(CursorResult[Any], conn.execute(
                _REVOKE, {"of_grant": grant_id, "now": utcnow(), "reason": reason})).rowcount
        self._tokens.mark_revoked("grant", grant_id)
        if revoked == 1:
            REFRESH_REVOKED.labels(reason).inc()
        return revoked == 1

    def offline_use(self, account_id: str) -> dict[str, tuple[datetime, datetime]]:
        """Per agency holding live refresh grants of the account: when one was last used
        (issued or refreshed) and when the last of them ends. What the citizen's consents
        page shows of the agency's access while they are away."""
        with self._db.reader() as conn:
            rows = conn.execute(
                select(_GRANTS.c.client_id, _GRANTS.c.created_at, _GRANTS.c.rotated_at,
                       _GRANTS.c.expires_at)
                .where(_GRANTS.c.account_id == account_id, _GRANTS.c.revoked_at.is_(None),
                       _GRANTS.c.expires_at > utcnow())).all()
        use: dict[str, tuple[datetime, datetime]] = {}
        for row in rows:
            used = row.rotated_at or row.created_at
            last, ends = use.get(row.client_id, (used, row.expires_at))
            use[row.client_id] = (max(last, used), max(ends, row.expires_at))
        return use

    def live_grants(self, *, batch: int = 1000) -> Iterator[tuple[str, str, str]]:
        """(grant id, account id, client id) of every grant neither revoked nor ended, in
        pages of ``batch``."""
        after = ""
        while True:
            with self._db.reader() as conn:
                rows = conn.execute(
                    select(_GRANTS.c.grant_id, _GRANTS.c.account_id, _GRANTS.c.client_id)
                    .where(_GRANTS.c.grant_id > after, _GRANTS.c.revoked_at.is_(None),
                           _GRANTS.c.expires_at > utcnow())
                    .order_by(_GRANTS.c.grant_id).limit(batch)).all()
            for row in rows:
                yield row.grant_id, row.account_id, row.client_id
            if len(rows) < batch:
                return
            after = rows[-1].grant_id

    def revoke_agency_within(self, s: Session, account_id: str, client_id: str, *,
                             reason: str = CONSENT_WITHDRAWN) -> int:
        """Revoke every live grant of an account to one agency in the caller's transaction
        (``s``): they end with what ends them (a consent withdrawal), or not at all. Their
        access tokens are the caller's to mark (:meth:`TokenStore.mark_agency_revoked`,
        after the commit). How many were revoked."""
        revoked = cast(CursorResult[Any], s.execute(
            update(_GRANTS).where(_GRANTS.c.account_id == account_id,
                                  _GRANTS.c.client_id == client_id,
                                  _GRANTS.c.revoked_at.is_(None))
            .values(revoked_at=utcnow(), revoked_reason=reason))).rowcount
        if revoked:
            REFRESH_REVOKED.labels(reason).inc(revoked)
        return revoked

    def revoke_account(self, account_id: str, client_id: str | None = None, *,
                       reason: str = CONSENT_WITHDRAWN) -> None:
        """Revoke every live grant of an account (optionally only one agency's)."""
        query = select(_GRANTS.c.grant_id).where(_GRANTS.c.account_id == account_id,
                                                _GRANTS.c.revoked_at.is_(None))
        if client_id is not None:
            query = query.where(_GRANTS.c.client_id == client_id)
        with self._db.reader() as conn:
            grants = list(conn.scalars(query))
        for grant_id in grants:
            self.revoke_grant(grant_id, reason=reason)
