"""The decision log's retention purge (``decision_log_retention_days``) on a loaded database.

Loads citizens, consent events and past decisions (bench/load_data.py: decisions spread over
two years, with the time-ordered ids the hub gives them) into a fresh PostgreSQL, then runs
housekeeping's purge for a retention of ``--days`` and prints the rows it deleted, the time
and rate, the largest batch's time (each batch is a transaction: what a concurrent writer
may wait behind), and the run after it, with nothing left to delete (at once, and after a
VACUUM), which is what every housekeeping round costs from then on. Then decision latency
is measured again, to show the purge left the decision path as it was.

    .venv/bin/python bench/purge_scale.py --accounts 200000 --events 2000000 --days 365
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decision_scale import Decider, step  # noqa: E402
from bench.load_data import add_load_arguments, analyze, loaded_hub  # noqa: E402
from consent.models import AgencyDecision  # noqa: E402
from kernel.db import utcnow  # noqa: E402


def count(hub: object) -> int:
    with hub.db.session() as s:  # type: ignore[attr-defined]
        return int(s.scalar(select(func.count()).select_from(AgencyDecision)))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(ap, agencies=20)
    ap.add_argument("--days", type=int, default=365, help="the retention")
    ap.add_argument("--batch", type=int, default=5000)
    args = ap.parse_args(argv)
    with loaded_hub(args, "civitas-purge-") as world:
        app, hub, templates, loaded = world.app, world.hub, world.templates, world.loaded
        mapping = world.settings
        decider = Decider(app, templates, {a["client_id"]: a["client_secret"]
                                           for a in mapping["agencies"]})
        before = step(hub, decider, loaded.sample, 1000, "before the purge")
        total = count(hub)
        cutoff = utcnow() - timedelta(days=args.days)
        batches: list[float] = []
        session = hub.db.session

        @contextlib.contextmanager
        def timed() -> Iterator[object]:  # each batch is one session: time each
            started = time.perf_counter()
            with session() as s:
                yield s
            batches.append(time.perf_counter() - started)

        hub.db.session = timed  # type: ignore[method-assign]
        started = time.perf_counter()
        deleted = hub.consent.decisions.purge(cutoff, batch=args.batch)
        took = time.perf_counter() - started
        hub.db.session = session  # type: ignore[method-assign]
        started = time.perf_counter()
        again = hub.consent.decisions.purge(cutoff, batch=args.batch)
        idle = time.perf_counter() - started
        left = count(hub)
        analyze(hub)  # VACUUM ANALYZE, as autovacuum would after so many deletes
        started = time.perf_counter()
        hub.consent.decisions.purge(cutoff, batch=args.batch)
        vacuumed = time.perf_counter() - started
        after = step(hub, decider, loaded.sample, 1000, "after the purge")
    print(f"\ndecision log: {total:,} rows, retention {args.days} days")
    print(f"purge: {deleted:,} rows deleted in {took:.1f} s ({deleted / took:,.0f} rows/s), "
          f"{len(batches)} batches of up to {args.batch:,}, the longest {max(batches):.3f} s")
    print(f"the next round, nothing past retention: {again} rows, {idle * 1000:.1f} ms at "
          f"once (the index still holds the deleted rows' entries), {vacuumed * 1000:.1f} ms "
          "after VACUUM")
    print(f"left: {left:,} rows ({total - deleted:,} expected)")
    print("decision latency, ms:")
    for r in (before, after):
        print(r.row())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
