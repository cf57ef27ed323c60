"""Account resolution: (connector id, upstream subject) -> one ConstituentAccount.

The first login with a credential creates the account and its LinkedIdentity. Accounts are
never matched or linked by email or any other attribute: an attacker who controls an upstream
can assert any email address.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from connectors import UpstreamIdentity
from kernel.crypto import FieldCipher
from kernel.db import Database, utcnow

from .models import AccountAttribute, ConstituentAccount, LinkedIdentity


@dataclass(frozen=True)
class ResolvedAccount:
    account_id: str
    created: bool


class AccountDirectory:
    def __init__(self, db: Database, cipher: FieldCipher) -> None:
        self._db = db
        self._cipher = cipher

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
            link = s.scalars(
                select(LinkedIdentity).where(
                    LinkedIdentity.connector_id == identity.connector_id,
                    LinkedIdentity.upstream_subject == identity.subject,
                )
            ).one_or_none()
            created = link is None
            if link is None:
                account = ConstituentAccount()
                s.add(account)
                s.flush()
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

    def exists(self, account_id: str) -> bool:
        with self._db.session() as s:
            return s.get(ConstituentAccount, account_id) is not None

    def attributes(self, account_id: str) -> dict[str, Any]:
        """The account's attributes, one value per name: the most recently asserted.

        (Ranking sources by operator preference arrives with attribute provenance.)
        """
        with self._db.session() as s:
            rows = s.scalars(
                select(AccountAttribute)
                .where(AccountAttribute.account_id == account_id)
                .order_by(AccountAttribute.asserted_at)
            ).all()
        return {r.name: json.loads(self._cipher.decrypt(r.value_encrypted)) for r in rows}

    def linked_identities(self, account_id: str) -> list[LinkedIdentity]:
        with self._db.session() as s:
            return list(s.scalars(
                select(LinkedIdentity).where(LinkedIdentity.account_id == account_id)
                .order_by(LinkedIdentity.created_at)
            ))
