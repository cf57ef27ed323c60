"""What a request needs to know of a citizen and one agency, read in one statement.

``/authorize`` needs to know that the citizen's account still exists and how their consent
with the agency stands; a code exchange and ``/userinfo`` need the account's attributes and
the claims the citizen granted the agency. Each domain owns its read and how its rows are
read (:data:`broker.accounts.LIVE_ACCOUNT` and :data:`~broker.accounts.LIVE_ATTRIBUTES`,
:data:`consent.decisions.LATEST_BY_ACCOUNT`); this module joins them, so each of those
requests makes one round trip to the database instead of two, and both answers come from one
snapshot of it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import JSON, Select, Text, cast, select, true

from broker.accounts import LIVE_ACCOUNT, LIVE_ATTRIBUTES, AccountDirectory
from consent.decisions import LATEST_BY_ACCOUNT, LatestState, state_from_row
from consent.service import ConsentService
from kernel import jsonfast
from kernel.db import Database, Prepared

_PREFIX = "consent_"


def _with_consent(left: Select[Any]) -> Select[Any]:
    """Every row of ``left`` with the consent record's latest state beside it (its columns
    named ``consent_*``; NULLs when the citizen has no record with the agency). ``left`` has
    no row when the account is gone, and then nothing else is read.

    The state's JSON columns come back as their text (:data:`_JSON_COLUMNS`), parsed once
    by :meth:`CitizenReads._read` from the first row: the claims read has one row per
    attribute, and the driver would parse the same consent JSON on each of them (2-4% of a
    login's CPU)."""
    citizen = left.subquery("citizen")
    latest = LATEST_BY_ACCOUNT.subquery("latest")
    return (select(citizen, *[(cast(column, Text) if column.key in _JSON_COLUMNS else column)
                              .label(_PREFIX + column.key) for column in latest.c])
            .select_from(citizen.outerjoin(latest, true())))


#: the consent state's columns of type JSON, read as text by :func:`_with_consent`
_JSON_COLUMNS: frozenset[str] = frozenset(
    str(column.key) for column in LATEST_BY_ACCOUNT.selected_columns
    if isinstance(column.type, JSON))


_LOGIN = _with_consent(LIVE_ACCOUNT)
_CLAIMS = _with_consent(LIVE_ATTRIBUTES)


class CitizenReads:
    def __init__(self, db: Database, accounts: AccountDirectory,
                 consent: ConsentService) -> None:
        self._accounts = accounts
        self._consent = consent
        # each read runs on every login: compiled once (kernel.db.Prepared)
        self._login = Prepared(db, _LOGIN)
        self._claims = Prepared(db, _CLAIMS)

    def _read(self, statement: Prepared, account_id: str, client_id: str
              ) -> tuple[Sequence[Any], LatestState | None]:
        now = self._consent.clock()
        rows = statement.rows({"account_id": account_id, "key": account_id,
                              "client_id": client_id, "now": now})
        if not rows:
            return rows, None
        first = rows[0]._asdict()  # a new dict (Prepared rows are named tuples)
        for key in _JSON_COLUMNS:  # (NULL: no record, and then no state to make)
            if (text := first[_PREFIX + key]) is not None:
                first[_PREFIX + key] = jsonfast.loads(text)
        return rows, state_from_row(first, now, _PREFIX)

    def login(self, account_id: str, client_id: str) -> tuple[bool, LatestState | None]:
        """Does the account exist (and is it not deleted), and the consent record's state
        with ``client_id`` now (:meth:`ConsentService.latest`)."""
        rows, state = self._read(self._login, account_id, client_id)
        return bool(rows), state

    def claims(self, account_id: str, client_id: str, names: Collection[str]
               ) -> tuple[dict[str, Any] | None, LatestState | None]:
        """The account's attributes among ``names`` (None: the account is gone, as
        :meth:`AccountDirectory.live_attributes`), and the consent record's state with
        ``client_id`` now."""
        rows, state = self._read(self._claims, account_id, client_id)
        return self._accounts.attributes_from_rows(rows, names), state
