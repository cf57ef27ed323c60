"""Periodic housekeeping of a running hub: the jobs that keep its tables true and bounded.

- consent grants whose validity has passed get their ``expired`` event (and its ledger
  entry), so that histories, receipts and officers' searches show the expiry; a grant stops
  being valid at its time whether or not this has run;
- refresh grants that ended more than one access-token lifetime ago are deleted (a grant is
  one row, with its live token; tokens issued before migration 0012 go with their grant):
  without this ``refresh_grants`` keeps a row for every grant ever issued.

Each job is idempotent and safe to run in several workers or hosts at once (consent expiry
locks each record; the purge deletes in small batches), so every worker may run it on its
schedule (``housekeeping_interval_seconds``) and ``civitas housekeeping`` runs it once, for
cron when the schedule is off. A failing job is logged and tried again next round.
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

    @property
    def ok(self) -> bool:
        return None not in (self.consents_expired, self.refresh_grants_purged)


def run_once(hub: Hub) -> Round:
    """One round of every job; a failing job is logged, and the others still run."""
    expired = purged = None
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
    for job, done in (("consent_expiry", expired), ("refresh_purge", purged)):
        BACKGROUND_JOBS.labels(job, "failed" if done is None else "ok").inc()
    if expired or purged:
        log.info("housekeeping: %s consent grants expired, %s refresh grants purged",
                 expired, purged)
    return Round(expired, purged)


class Housekeeper(PeriodicThread):
    """:func:`run_once` every ``interval`` seconds in a thread of this process."""

    def __init__(self, hub: Hub, *, interval: float) -> None:
        super().__init__("housekeeping", interval, lambda: run_once(hub))
