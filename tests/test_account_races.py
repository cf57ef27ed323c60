"""Races on an account's credentials (broker/accounts.py) on the real PostgreSQL (READ
COMMITTED): two threads released at one Barrier call the account directory at once, many
times over; each test states the invariant it checks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from broker.errors import CredentialAlreadyLinked
from broker.models import AccountAttribute, ConstituentAccount, LinkedIdentity
from civitas.app import create_app, stop_background
from connectors import UpstreamIdentity
from tests.conftest import HIGH_ACR, LOW_ACR, bank_id_upstream, hub_config
from tests.races import delete_account, together

#: enough repetitions for each race to show before its fix (it did in nearly all of them)
REPS = 30
#: fewer for the deadlock: PostgreSQL takes its deadlock_timeout (1 s) to find each one
DEADLOCK_REPS = 20


@pytest.fixture
def hub(upstream_issuer: str, pg_database_url: str) -> Iterator[Any]:
    cfg = hub_config(upstream_issuer, pg_database_url, database_pool_size=10,
                     housekeeping_interval_seconds=0, backchannel_dispatcher=False)
    cfg["upstreams"].append(bank_id_upstream(upstream_issuer))
    app = create_app(cfg)
    yield app.extensions["civitas"]
    stop_background(app)
    app.extensions["civitas"].db.dispose()


def count(hub: Any, model: Any, account_id: str) -> int:
    with hub.db.session() as s:
        return s.scalar(select(func.count()).select_from(model).where(
            model.account_id == account_id)) or 0


def closed(hub: Any, account_id: str) -> bool:
    with hub.db.session() as s:
        return s.get(ConstituentAccount, account_id).deleted_at is not None


def name(result: Any) -> str:
    return type(getattr(result, "orig", None) or result).__name__


def test_a_credential_linked_while_the_account_is_deleted_does_not_survive_it(hub):
    """Invariant: link() racing the account's deletion either links before the close (which
    then removes the credential with the others) or is refused; the closed account keeps no
    credential, the erased one no attribute, and signing in with the credential afterwards
    makes a new account."""
    broken = []
    for i in range(REPS):
        me = hub.accounts.resolve(UpstreamIdentity(
            connector_id="op", subject=f"ld-{i}", acr=LOW_ACR,
            attributes={"email": f"ld{i}@example.org"})).account_id
        bank = UpstreamIdentity(connector_id="op-es", subject=f"ld-bank-{i}", acr=HIGH_ACR,
                                attributes={"name": f"Bank Name {i}"})
        linked, deleted = together(lambda me=me, bank=bank: hub.accounts.link(me, bank),
                                   lambda me=me: delete_account(hub, me))
        again = hub.accounts.resolve(bank)  # signing in with the credential afterwards
        links, attributes = count(hub, LinkedIdentity, me), count(hub, AccountAttribute, me)
        if (not closed(hub, me) or links or attributes or again.account_id == me
                or not again.created or deleted is not None
                or not (linked is True or isinstance(linked, CredentialAlreadyLinked))):
            broken.append((i, name(linked), name(deleted), links, attributes,
                           again.account_id == me))
    assert not broken, (
        f"{len(broken)}/{REPS} (rep, link(), deletion, links and attributes left on the "
        f"erased account, a later sign-in lands on it): {broken[:5]}")


def test_a_sign_in_racing_account_deletion_does_not_deadlock(hub):
    """Invariant: a sign-in with a linked credential (which updates the account's attributes)
    racing the account's close fails neither call (no deadlock, no database error), and
    either signs in before the close (whose credential removal then takes it) or sees the
    account closed and makes a new one; the closed account keeps no credential."""
    broken, errors = [], []
    for i in range(DEADLOCK_REPS):
        first = UpstreamIdentity(connector_id="op", subject=f"sd-{i}", acr=LOW_ACR,
                                 attributes={"email": f"sd{i}@example.org"})
        me = hub.accounts.resolve(first).account_id
        again = UpstreamIdentity(connector_id="op", subject=f"sd-{i}", acr=LOW_ACR,
                                 attributes={"email": f"new{i}@example.org", "nickname": "n"})
        resolved, was_closed = together(lambda again=again: hub.accounts.resolve(again),
                                        lambda me=me: hub.accounts.close(me))
        errors += [name(r) for r in (resolved, was_closed) if isinstance(r, Exception)]
        if isinstance(resolved, Exception) or isinstance(was_closed, Exception):
            continue
        hub.accounts.erase(me)
        after = hub.accounts.resolve(first)  # the credential now belongs to a live account
        new_account = resolved.account_id != me and resolved.created
        if (was_closed is not True or (resolved.account_id != me and not new_account)
                or count(hub, LinkedIdentity, me) or count(hub, AccountAttribute, me)
                or after.account_id == me
                or (new_account and after.account_id != resolved.account_id)):
            broken.append((i, resolved, was_closed, after))
    assert not errors, (
        f"{len(errors)} failed calls in {DEADLOCK_REPS} races: {sorted(set(errors))}")
    assert not broken, f"{len(broken)}/{DEADLOCK_REPS} inconsistent outcomes: {broken[:5]}"

