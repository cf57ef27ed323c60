"""The background sealer: seals and signs a checkpoint every ``interval`` seconds.

Every worker may run one; the sealer's database lock lets one seal at a time and the others
find nothing to do. Entries younger than ``settle`` wait for the next round, so entries whose
transactions commit a little out of order usually still enter the tree in ``seq`` order.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from sqlalchemy.exc import SQLAlchemyError

from kernel.metrics import BACKGROUND_JOBS
from kernel.periodic import PeriodicThread

from .errors import LedgerError
from .ledger import Ledger, SignedCheckpoint

log = logging.getLogger(__name__)


class LedgerSealer:
    #: the share of the interval a round may spend resting between chunks
    PACED_SHARE = 0.75

    def __init__(self, ledger: Ledger, *, interval: float = 10.0,
                 settle: timedelta = timedelta(seconds=2), pace: float = 3.0) -> None:
        self._periodic = PeriodicThread("ledger-sealer", interval, self.run_once)
        self.ledger = ledger
        self.interval = interval
        self.settle = settle
        #: after each chunk of entries, rest ``pace`` times as long as it took
        #: (``Ledger.seal``): the sealer then takes at most a quarter of one core's time,
        #: in short bursts, and requests in its worker seldom wait for it (at 5,000
        #: decisions/s over 75 s: p99 14.6-16.6 ms, against 23.1-32.0 resting as long as
        #: each chunk took and 16.0 with no sealing; bench/README.md). Only for the first
        #: ``PACED_SHARE`` of the interval, though: a round that has not finished by then
        #: finishes at full speed, so sealing keeps up with any rate it can keep up with
        #: at all, and the unsealed backlog does not grow from round to round.
        self.pace = pace
        self.last: SignedCheckpoint | None = None
        #: whether the last round completed (None before the first)
        self.healthy: bool | None = None

    def run_once(self) -> SignedCheckpoint | None:
        """One round; a failure is logged and retried next round, never raised."""
        pace_until = time.monotonic() + self.PACED_SHARE * self.interval
        try:
            made = self.ledger.seal_all(settle=self.settle, pace=self.pace,
                                        pace_until=pace_until)
        except (SQLAlchemyError, LedgerError) as exc:
            log.warning("ledger sealing failed, will retry: %s", exc)
            self.healthy = False
            BACKGROUND_JOBS.labels("ledger_seal", "failed").inc()
            return None
        self.healthy = True
        BACKGROUND_JOBS.labels("ledger_seal", "ok").inc()
        if made is not None:
            self.last = made
            log.info("ledger checkpoint signed at size %d", made.size)
        return made

    def start(self) -> None:
        self._periodic.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._periodic.stop(timeout)
