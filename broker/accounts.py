"""Account resolution: (connector id, upstream subject) -> one ConstituentAccount.

The first login with a credential creates the account and its LinkedIdentity. Accounts are
never matched or linked by email or any other attribute: an attacker who controls an upstream
can assert any email address.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, Exists, Row, ScalarSelect, Table, bindparam, exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from connectors import UpstreamIdentity
from kernel import jsonfast
from kernel.crypto import FieldCipher
from kernel.db import Database, Prepared, utcnow

from .errors import CredentialAlreadyLinked, LastCredential, NotYourCredential
from .models import AccountAttribute, AccountEvent, ConstituentAccount, LinkedIdentity

_ACCOUNTS = cast(Table, ConstituentAccount.__table__)
_ATTRIBUTES = cast(Table, AccountAttribute.__table__)
# The reads of every token, userinfo and login request, built once: SQLAlchemy then reuses
# their compiled form without building and hashing a new statement each time.
# Public, for a caller that reads them together with something else in one statement
# (idp.citizen): each takes the parameter ``account_id``.
#: one row while the account exists and is not deleted, else none
LIVE_ACCOUNT = select(_ACCOUNTS.c.id).where(_ACCOUNTS.c.id == bindparam("account_id"),
                                            _ACCOUNTS.c.deleted_at.is_(None))


def account_is_live(account_id: ColumnElement[str]) -> Exists:
    """Whether the account ``account_id`` (a column of the caller's statement) exists and is
    not deleted: :meth:`AccountDirectory.exists` as a column of another statement."""
    return exists().where(_ACCOUNTS.c.id == account_id, _ACCOUNTS.c.deleted_at.is_(None))


def account_closed_at(account_id: ColumnElement[str]) -> ScalarSelect[Any]:
    """When the account ``account_id`` (a column of the caller's statement) was closed: a
    scalar subquery, NULL while it is open. A value, not a condition: PostgreSQL can run an
    EXISTS over many rows as one hashed scan of the whole table, but a scalar subquery
    only as one index probe per row."""
    return select(_ACCOUNTS.c.deleted_at).where(_ACCOUNTS.c.id == account_id).scalar_subquery()


def hold_open_account(s: Session, account_id: str) -> bool:
    """Lock the account's row (FOR SHARE, until ``s``'s transaction ends) and say whether
    it is open: what the consent service asks before a consent is given. Closing the
    account (:meth:`AccountDirectory.close`: its row FOR UPDATE) waits for a consent being
    given, and one given after the close is refused, so none outlives the erasure."""
    deleted_at = s.execute(select(_ACCOUNTS.c.deleted_at).where(
        _ACCOUNTS.c.id == account_id).with_for_update(read=True)).first()
    return deleted_at is not None and deleted_at[0] is None


#: the account's ``deleted_at`` and one row per attribute value (one row of NULLs when it has
#: none); no row when there is no such account: :meth:`AccountDirectory.attributes_from_rows`
LIVE_ATTRIBUTES = (select(_ACCOUNTS.c.deleted_at, _ATTRIBUTES.c.name,
                          _ATTRIBUTES.c.value_encrypted, _ATTRIBUTES.c.source_connector,
                          _ATTRIBUTES.c.asserted_at)
                   .select_from(_ACCOUNTS.outerjoin(
                       _ATTRIBUTES, _ATTRIBUTES.c.account_id == _ACCOUNTS.c.id))
                   .where(_ACCOUNTS.c.id == bindparam("account_id")))


@dataclass(frozen=True)
class ResolvedAccount:
    account_id: str
    created: bool


@dataclass(frozen=True)
class AttributeRecord:
    """One attribute value with its provenance, for the citizen's account page."""

    name: str
    value: Any
    source: str
    acr: str
    asserted_at: datetime
    released: bool


class AccountDirectory:
    def __init__(self, db: Database, cipher: FieldCipher,
                 source_ranking: list[str] | None = None,
                 on_event: Callable[[AccountEvent, Session], object] | None = None) -> None:
        self._db = db
        self._cipher = cipher
        #: told of every account event inside its transaction (the root appends it to the
        #: audit ledger, so the event and its entry commit or roll back together)
        self._on_event = on_event
        #: connector ids, most trusted first: released claims come from the first that has one
        self._ranking = {c: i for i, c in enumerate(source_ranking or [])}
        #: read on every introspection and account page (kernel.db.Prepared: compiled once)
        self._live = Prepared(db, LIVE_ACCOUNT)

    def resolve(self, identity: UpstreamIdentity) -> ResolvedAccount:
        """Find or create the account for this credential, and record its attributes."""
        for _attempt in range(3):
            try:
                return self._resolve_once(identity)
            except IntegrityError:
                # A concurrent first login with the same credential won the insert: the
                # unique (connector, subject) constraint guarantees one account; retry to read it.
                continue
        raise RuntimeError("could not resolve account after concurrent inserts")

    def _resolve_once(self, identity: UpstreamIdentity) -> ResolvedAccount:
        now = utcnow()
        with self._db.session() as s:
            link = self._locked_link(s, identity)
            created = link is None
            if link is None:
                account = ConstituentAccount()
                s.add(account)
                s.flush()
                self._event(s, AccountEvent(account_id=account.id, kind="created",
                                   connector_id=identity.connector_id, acr=identity.acr, at=now))
                link = LinkedIdentity(
                    account_id=account.id,
                    connector_id=identity.connector_id,
                    upstream_subject=identity.subject,
                    acr=identity.acr,
                    created_at=now,
                    last_login_at=now,
                )
                s.add(link)
                s.flush()
            else:
                link.last_login_at = now
                link.acr = identity.acr
            self._record_attributes(s, link.account_id, identity, now)
            return ResolvedAccount(account_id=link.account_id, created=created)

    @staticmethod
    def _locked_link(s: Session, identity: UpstreamIdentity) -> LinkedIdentity | None:
        """The credential's link, locked, with its account's row locked (FOR SHARE) first; or
        None when it is not linked (its account closed: :meth:`close` removed it). The order
        is :meth:`close`'s (the account, then its links): a sign-in racing the close neither
        deadlocks nor writes to a closed account; it waits, then sees the credential gone."""
        credential = (LinkedIdentity.connector_id == identity.connector_id,
                      LinkedIdentity.upstream_subject == identity.subject)
        while True:
            account_id = s.scalars(select(LinkedIdentity.account_id)
                                   .where(*credential)).one_or_none()
            if account_id is None:
                return None
            account = s.get(ConstituentAccount, account_id, with_for_update={"read": True})
            # read again, locked: close() or unlink() may have removed it meanwhile
            link = s.scalars(select(LinkedIdentity).where(*credential)
                             .with_for_update()).one_or_none()
            if link is None:
                return None
            if link.account_id != account_id:
                continue  # removed and linked to another account meanwhile: lock that one
            if account is None or account.deleted_at is not None:
                # left on a closed account (linked as it closed, before link() locked it):
                # removed as close() would have, so the sign-in makes a new account
                s.delete(link)
                s.flush()
                return None
            return link

    def _record_attributes(self, s: Any, account_id: str, identity: UpstreamIdentity,
                           now: Any) -> None:
        existing = {
            a.name: a
            for a in s.scalars(
                select(AccountAttribute).where(
                    AccountAttribute.account_id == account_id,
                    AccountAttribute.source_connector == identity.connector_id,
                )
            )
        }
        for name, value in identity.attributes.items():
            token = self._cipher.encrypt(json.dumps(value))
            row = existing.get(name)
            if row is None:
                s.add(AccountAttribute(
                    account_id=account_id, name=name, value_encrypted=token,
                    source_connector=identity.connector_id, acr=identity.acr, asserted_at=now,
                ))
            else:
                row.value_encrypted, row.acr, row.asserted_at = token, identity.acr, now

    def _event(self, s: Session, event: AccountEvent) -> None:
        s.add(event)
        if self._on_event is not None:
            self._on_event(event, s)

    def exists(self, account_id: str) -> bool:
        """True while the account exists and has not been deleted."""
        return bool(self._live.rows({"account_id": account_id}))

    def account_for_credential(self, connector_id: str, upstream_subject: str) -> str | None:
        """The account a linked credential belongs to (an officer's lookup), if any."""
        with self._db.session() as s:
            return s.scalars(select(LinkedIdentity.account_id).where(
                LinkedIdentity.connector_id == connector_id,
                LinkedIdentity.upstream_subject == upstream_subject)).one_or_none()

    def link(self, account_id: str, identity: UpstreamIdentity) -> bool:
        """Link a credential the citizen just proved to their account (never by attribute).

        Returns False if it was already linked to this account. Raises
        :class:`CredentialAlreadyLinked` if another account holds it.
        """
        now = utcnow()
        try:
            with self._db.session() as s:
                # FOR SHARE: close() (FOR UPDATE) waits for this link, and removes it with
                # the others; or this waits for close() and is refused
                account = s.get(ConstituentAccount, account_id, with_for_update={"read": True})
                if account is None or account.deleted_at is not None:
                    raise CredentialAlreadyLinked()
                link = s.scalars(select(LinkedIdentity).where(
                    LinkedIdentity.connector_id == identity.connector_id,
                    LinkedIdentity.upstream_subject == identity.subject,
                )).one_or_none()
                if link is not None:
                    if link.account_id != account_id:
                        raise CredentialAlreadyLinked()
                    return False
                s.add(LinkedIdentity(account_id=account_id, connector_id=identity.connector_id,
                                     upstream_subject=identity.subject, acr=identity.acr,
                                     created_at=now, last_login_at=now))
                self._event(s, AccountEvent(account_id=account_id, kind="linked",
                                   connector_id=identity.connector_id, acr=identity.acr, at=now))
                self._record_attributes(s, account_id, identity, now)
                return True
        except IntegrityError as exc:  # linked concurrently by someone else
            raise CredentialAlreadyLinked() from exc

    def unlink(self, account_id: str, link_id: int) -> LinkedIdentity:
        """Remove one credential while another remains; its attributes go with it."""
        with self._db.session() as s:
            links = list(s.scalars(select(LinkedIdentity).where(
                LinkedIdentity.account_id == account_id).with_for_update()))
            target = next((link for link in links if link.id == link_id), None)
            if target is None:
                raise NotYourCredential()
            if len(links) <= 1:
                raise LastCredential()
            s.delete(target)
            for attr in s.scalars(select(AccountAttribute).where(
                    AccountAttribute.account_id == account_id,
                    AccountAttribute.source_connector == target.connector_id)):
                s.delete(attr)
            self._event(s, AccountEvent(account_id=account_id, kind="unlinked",
                               connector_id=target.connector_id, acr=target.acr, at=utcnow()))
            return target

    def close(self, account_id: str) -> bool:
        """Right to erasure, its first step: the account is closed at once (``deleted_at``:
        no session, token, claim or refresh from then on), its linked credentials are
        removed (signing in with one of them again makes a new account) and its ``deleted``
        event recorded. False when there is no such live account. :meth:`erase` finishes it
        once its grants and consents have ended."""
        return self._erasure_step(account_id, ready=lambda a: a.deleted_at is None,
                                  remove=LinkedIdentity, stamp="deleted_at", kind="deleted")

    def erase(self, account_id: str) -> bool:
        """Right to erasure, its last step (once the closed account's grants and consents
        have ended): remove its personal attributes, keep the pseudonymous id and its
        events, which audit records refer to, and record the ``erased`` event. Idempotent;
        False when there was nothing to erase (the account is unknown, not closed, or
        erased already)."""
        return self._erasure_step(
            account_id, ready=lambda a: a.deleted_at is not None and a.erased_at is None,
            remove=AccountAttribute, stamp="erased_at", kind="erased")

    def _erasure_step(self, account_id: str, *, ready: Callable[[ConstituentAccount], bool],
                      remove: type[LinkedIdentity] | type[AccountAttribute],
                      stamp: str, kind: str) -> bool:
        """One step of an erasure, in one transaction with the account's row locked: if the
        account is ``ready`` for it, delete its ``remove`` rows, set its ``stamp`` time and
        record the ``kind`` event (and so its ``account.<kind>`` ledger entry)."""
        with self._db.session() as s:
            account = s.get(ConstituentAccount, account_id, with_for_update=True)
            if account is None or not ready(account):
                return False
            for row in s.scalars(select(remove).where(remove.account_id == account_id)):
                s.delete(row)
            at = utcnow()
            setattr(account, stamp, at)
            self._event(s, AccountEvent(account_id=account_id, kind=kind, at=at))
            return True

    def erasures_pending(self, *, closed_before: datetime, limit: int = 100) -> list[str]:
        """Accounts closed before ``closed_before`` whose erasure did not finish (the request
        that closed them was cut off part-way), oldest first."""
        with self._db.reader() as conn:
            return list(conn.scalars(
                select(_ACCOUNTS.c.id).where(_ACCOUNTS.c.deleted_at.is_not(None),
                                             _ACCOUNTS.c.erased_at.is_(None),
                                             _ACCOUNTS.c.deleted_at < closed_before)
                .order_by(_ACCOUNTS.c.deleted_at).limit(limit)))

    def events(self, account_id: str) -> list[AccountEvent]:
        with self._db.session() as s:
            return list(s.scalars(select(AccountEvent).where(
                AccountEvent.account_id == account_id).order_by(AccountEvent.at.desc(),
                                                                AccountEvent.id.desc())))

    def _rank(self, record: AccountAttribute | Row[Any]) -> tuple[int, float]:
        # Operator's ranking first; among unranked sources, the most recent assertion.
        return (self._ranking.get(record.source_connector, len(self._ranking)),
                -record.asserted_at.timestamp())

    def attribute_records(self, account_id: str) -> list[AttributeRecord]:
        """Every value of every attribute with its source; ``released`` marks the value
        agencies get (from the source the operator ranks highest)."""
        with self._db.session() as s:
            rows = list(s.scalars(select(AccountAttribute).where(
                AccountAttribute.account_id == account_id)))
        rows.sort(key=lambda r: (r.name, self._rank(r)))
        records: list[AttributeRecord] = []
        seen: set[str] = set()
        for r in rows:
            records.append(AttributeRecord(
                name=r.name, value=jsonfast.loads(self._cipher.decrypt(r.value_encrypted)),
                source=r.source_connector, acr=r.acr, asserted_at=r.asserted_at,
                released=r.name not in seen))
            seen.add(r.name)
        return records

    def attributes(self, account_id: str) -> dict[str, Any]:
        """One value per attribute: the one from the highest-ranked source."""
        return self.live_attributes(account_id) or {}

    def live_attributes(self, account_id: str,
                        names: Collection[str] | None = None) -> dict[str, Any] | None:
        """:meth:`attributes` of an account that exists and is not deleted, else None: the
        account and its attributes in one read (userinfo's path). With ``names``, only those
        attributes are decrypted and returned: what a request can release, no more."""
        with self._db.reader() as conn:
            rows = conn.execute(LIVE_ATTRIBUTES, {"account_id": account_id}).all()
        return self.attributes_from_rows(rows, names)

    def attributes_from_rows(self, rows: Sequence[Any],
                             names: Collection[str] | None = None) -> dict[str, Any] | None:
        """:meth:`live_attributes` from the rows of :data:`LIVE_ATTRIBUTES` (read by the
        caller, perhaps with more columns)."""
        if not rows or rows[0].deleted_at is not None:
            return None
        best: dict[str, tuple[tuple[int, float], Any]] = {}
        for row in rows:
            if row.name is None or (names is not None and row.name not in names):
                continue  # an account without attributes, or one not asked for
            rank = self._rank(row)
            if row.name not in best or rank < best[row.name][0]:
                best[row.name] = (rank, row.value_encrypted)
        return {name: jsonfast.loads(self._cipher.decrypt(token))
                for name, (_, token) in best.items()}

    def linked_identities(self, account_id: str) -> list[LinkedIdentity]:
        with self._db.session() as s:
            return list(s.scalars(
                select(LinkedIdentity).where(LinkedIdentity.account_id == account_id)
                .order_by(LinkedIdentity.created_at)
            ))
