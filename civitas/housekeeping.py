"""Periodic housekeeping of a running hub: the jobs that keep its tables true and bounded.

- consent grants whose validity has passed get their ``expired`` event (and its ledger
  entry), so that histories, receipts and officers' searches show the expiry; a grant stops
  being valid at its time whether or not this has run;
- refresh grants that ended more than one access-token lifetime ago are deleted (a grant is
  one row, with its live token; tokens issued before migration 0012 go with their grant):
  without this ``refresh_grants`` keeps a row for every grant ever issued;
- answers of the decision API older than ``decision_log_retention_days`` (when set) are
  deleted, in batches;
- accounts closed by their citizen whose erasure was cut off part-way (the database went
  away after the account was closed) have it finished: refresh grants revoked, consents
  withdrawn, personal data removed (each step idempotent).

Each job is idempotent and safe to run in several workers or hosts at once (consent expiry
locks each record; the purge deletes in small batches; an erasure locks its account), so
every worker may run it on its schedule (``housekeeping_interval_seconds``) and ``civitas
housekeeping`` runs it once, for cron when the schedule is off. A failing job is logged and
tried again next round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from kernel.db import utcnow
from kernel.metrics import BACKGROUND_JOBS
from kernel.periodic import PeriodicThread

if TYPE_CHECKING:
    from .app import Hub

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Round:
    """What one round did; None where the job failed (logged)."""

    consents_expired: int | None
    refresh_grants_purged: int | None
    erasures_finished: int | None
    #: 0 when the decision log is kept for ever
    decisions_purged: int | None = 0

    @property
    def ok(self) -> bool:
        return None not in (self.consents_expired, self.refresh_grants_purged,
                            self.erasures_finished, self.decisions_purged)


#: an account closed less than this long ago may still be being erased by its own request
ERASURE_GRACE = timedelta(minutes=1)


def finish_erasures(hub: Hub, *, grace: timedelta = ERASURE_GRACE, limit: int = 100) -> int:
    """Finish the erasure of every account closed (more than ``grace`` ago) whose
    request was cut off part-way; returns how many were finished. Each account is tried on
    its own; should any fail, the others are still done and the failure is raised after."""
    from .app import end_grants_and_consents

    failed: Exception | None = None
    finished = 0
    for account_id in hub.accounts.erasures_pending(closed_before=utcnow() - grace,
                                                    limit=limit):
        try:
            end_grants_and_consents(hub, account_id)
            if hub.accounts.erase(account_id):
                finished += 1
                log.info("account %s: its erasure, cut off part-way, is finished", account_id)
        except Exception as error:  # noqa: BLE001 - the next account must still be done
            log.exception("account %s: finishing its erasure failed, will retry", account_id)
            failed = error
    if failed is not None:
        raise failed
    return finished


def run_once(hub: Hub) -> Round:
    """One round of every job; a failing job is logged, and the others still run."""
    expired = purged = erased = None
    try:
        expired = hub.consent.expire_due()
    except Exception:  # noqa: BLE001 - logged; the schedule must go on
        log.exception("consent expiry failed, will retry next round")
    try:
        # a replay of a used token still revokes the access tokens of its grant until
        # the last of them has expired (RefreshTokens.purge_expired)
        before = utcnow() - timedelta(seconds=hub.settings.access_token_lifetime_seconds)
        purged = hub.server.hub.refresh_tokens.purge_expired(before=before)
    except Exception:  # noqa: BLE001 - logged; the schedule must go on
        log.exception("refresh grant purge failed, will retry next round")
    try:
        erased = finish_erasures(hub)
    except Exception:  # noqa: BLE001 - logged; the schedule must go on
        log.exception("finishing erasures failed, will retry next round")
    jobs = [("consent_expiry", expired), ("refresh_purge", purged), ("erasure", erased)]
    decisions: int | None = 0
    if hub.settings.decision_log_retention_days:
        try:
            decisions = hub.consent.decisions.purge(
                utcnow() - timedelta(days=hub.settings.decision_log_retention_days))
        except Exception:  # noqa: BLE001 - logged; the schedule must go on
            log.exception("decision log purge failed, will retry next round")
            decisions = None
        jobs.append(("decision_purge", decisions))
    for job, done in jobs:
        BACKGROUND_JOBS.labels(job, "failed" if done is None else "ok").inc()
    if expired or purged or erased or decisions:
        log.info("housekeeping: %s consent grants expired, %s refresh grants purged, "
                 "%s erasures finished, %s decisions past retention deleted",
                 expired, purged, erased, decisions)
    return Round(expired, purged, erased, decisions)


class Housekeeper(PeriodicThread):
    """:func:`run_once` every ``interval`` seconds in a thread of this process."""

    def __init__(self, hub: Hub, *, interval: float) -> None:
        super().__init__("housekeeping", interval, lambda: run_once(hub))
