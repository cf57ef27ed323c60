"""Helpers of the race tests (tests/test_*_races.py): threads released at once on one
Barrier, against a hub on a fresh PostgreSQL database (READ COMMITTED, as in production),
each race repeated many times."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from civitas.app import end_grants_and_consents
from connectors import UpstreamIdentity
from tests.conftest import LOW_ACR


def together(*fns: Callable[[], Any]) -> list[Any]:
    """Run each function in its own thread, released at once; their results or the
    exceptions they raised, in order."""
    barrier = threading.Barrier(len(fns))
    results: list[Any] = [None] * len(fns)

    def run(i: int, fn: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def person(hub: Any, subject: str, connector: str = "op") -> str:
    """A citizen signed in once through ``connector`` (as a login resolves them)."""
    return str(hub.accounts.resolve(UpstreamIdentity(
        connector_id=connector, subject=subject, acr=LOW_ACR,
        attributes={"email": f"{subject}@example.org", "name": f"Citizen {subject}"}
    )).account_id)


def delete_account(hub: Any, account_id: str) -> None:
    """What POST /account/delete does (broker/views.py): close, end grants and consents,
    erase."""
    if hub.accounts.close(account_id):
        end_grants_and_consents(hub, account_id)
        hub.accounts.erase(account_id)


def policy(hub: Any, client_id: str) -> Any:
    return hub.server.hub.policy_for(hub.agencies.client(client_id))


def subject(hub: Any, client_id: str, account_id: str) -> str:
    return str(hub.server.hub.subject_for(hub.agencies.client(client_id), account_id))


def grant_consent(hub: Any, account_id: str, client_id: str,
                  optional: tuple[str, ...] = ()) -> Any:
    """The citizen presses Allow on the agency's consent page (``optional`` ticked)."""
    return hub.consent.record_decision(account_id, policy(hub, client_id),
                                       subject(hub, client_id, account_id), optional)


def valid_grants(hub: Any, account_id: str) -> list[str]:
    return [g.client_id for g in hub.consent.grants_for_account(account_id) if g.valid]
