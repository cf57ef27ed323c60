"""Erasure's strip of the agencies' questions on a loaded database, and what migration 0016's
index costs to build.

Loads citizens, consent events and past decisions (bench/load_data.py) into a fresh
PostgreSQL, adds ``--unresolved`` questions that resolved to no one (subjects nobody has,
spread over the agencies, as agencies probing unknown or stale subjects leave them), then:

1. builds ``ix_consent_decisions_unresolved`` again as migration 0016 does (DROP, then the
   model's CREATE INDEX), timed: how long the upgrade blocks writes to the decision log;
2. explains the statements that find an erased account's questions, those that resolved
   to it and those at any agency that named its ``sub`` there without resolving (they must
   use the indexes, not scan the table);
3. erases ``--erase`` loaded citizens as the hub does (close, end_grants_and_consents,
   erase), each with one unresolved question at an agency where it had no record, and
   prints the time per erasure and of its questions' strip alone, and that the questions
   were stripped;
4. measures decision latency before and after (bench/decision_scale.py), to show the
   decision path kept its plans.

    .venv/bin/python bench/erasure_scale.py --accounts 200000 --events 2000000 --unresolved 1000000
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select, text
from sqlalchemy.schema import CreateIndex

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decision_scale import Decider, capture_sql, describe, explain, step  # noqa: E402
from bench.load_data import add_load_arguments, analyze, loaded_hub  # noqa: E402
from civitas.app import end_grants_and_consents  # noqa: E402
from consent.decisions import parse_evaluation  # noqa: E402
from consent.models import AgencyDecision, ConsentRecord  # noqa: E402
from kernel.db import utcnow  # noqa: E402

INDEX = "ix_consent_decisions_unresolved"

#: unresolved questions in bulk: random subjects, time-ordered-looking ids, over the agencies
_FILL = """
INSERT INTO consent_decisions (id, at, client_id, subject, account_id, record_id, action,
                               claim, purpose, decision, reason)
SELECT md5('unresolved' || i), now() - (i % 700) * interval '1 day',
       'bench-agency-' || lpad((i % :agencies)::text, 3, '0'), md5('nobody' || i), NULL, NULL,
       'use', 'email', 'service-delivery', false, 'no_consent'
FROM generate_series(1, :count) AS i
"""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(ap, agencies=50)
    ap.add_argument("--unresolved", type=int, default=1_000_000)
    ap.add_argument("--erase", type=int, default=50)
    args = ap.parse_args(argv)
    with loaded_hub(args, "civitas-erasure-") as world:
        app, hub, templates, loaded = world.app, world.hub, world.templates, world.loaded
        mapping = world.settings
        agencies = [a["client_id"] for a in mapping["agencies"]]
        assert all(a.startswith("bench-agency-") for a in agencies), agencies[:3]
        with hub.db.engine.begin() as conn:
            started = time.perf_counter()
            conn.execute(text(_FILL), {"agencies": len(agencies), "count": args.unresolved})
            print(f"  {args.unresolved:,} unresolved questions added in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
        analyze(hub)
        with hub.db.engine.connect() as conn:
            total = conn.execute(text("SELECT count(*) FROM consent_decisions")).scalar_one()
        decider = Decider(app, templates, {a["client_id"]: a["client_secret"]
                                           for a in mapping["agencies"]})
        before = step(hub, decider, loaded.sample, 1000, "before the erasures")

        # 1. the migration's index build
        index = next(i for i in AgencyDecision.__table__.indexes if i.name == INDEX)
        create = str(CreateIndex(index).compile(dialect=hub.db.engine.dialect))
        with hub.db.engine.begin() as conn:
            conn.execute(text(f"DROP INDEX {INDEX}"))
            started = time.perf_counter()
            conn.execute(text(create))
            built = time.perf_counter() - started
        with hub.db.engine.connect() as conn:
            size = conn.execute(text("SELECT pg_relation_size(:i)"), {"i": INDEX}).scalar_one()
            table = conn.execute(text("SELECT pg_relation_size('consent_decisions')")
                                 ).scalar_one()
        print(f"\n1. {create}\n   {built:.2f} s on {total:,} decision rows "
              f"({args.unresolved:,} unresolved); index {size / 2**20:.1f} MiB, table "
              f"{table / 2**20:.0f} MiB", flush=True)

        # 2. its use by erasure: forget_account's reads, for an account with nothing to strip
        provider = hub.server.hub
        nobody = "0" * 32
        pairs = [(a, provider.subject_for(hub.agencies.client(a), nobody)) for a in agencies]
        with capture_sql() as seen:
            hub.consent.decisions.forget_account(nobody, now=utcnow(), subjects=pairs)
        with hub.db.engine.connect() as conn:
            explained = [explain(conn, st, analyze=True) for st in seen
                         if st.sql.lstrip().upper().startswith("SELECT")]
        print("\n2. an erased account's questions, resolved and not (at all "
              f"{len(agencies)} agencies):", flush=True)
        for e in explained:
            print(describe(e))
            for table in e.seq_scans():
                print(f"    !! Seq Scan on {table}")

        # 3. erasures, each with one unresolved question at an agency without its record
        rng = random.Random(25)  # noqa: S311 (test data)
        whole: list[float] = []
        strip: list[float] = []
        stripped = 0
        forget = hub.consent.decisions.forget_account

        def timed_forget(*a: object, **k: object) -> int:
            started = time.perf_counter()
            try:
                return forget(*a, **k)  # type: ignore[arg-type]
            finally:
                strip.append(time.perf_counter() - started)

        hub.consent.decisions.forget_account = timed_forget  # type: ignore[method-assign]
        for client_id, subject in rng.sample(loaded.sample, args.erase):
            with hub.db.session() as s:
                account_id, = s.execute(select(ConsentRecord.account_id).where(
                    ConsentRecord.client_id == client_id,
                    ConsentRecord.subject == subject)).one()
                has = set(s.scalars(select(ConsentRecord.client_id).where(
                    ConsentRecord.account_id == account_id)))
            elsewhere = hub.agencies.client(next(a for a in agencies if a not in has))
            assert elsewhere is not None
            unknown_there = provider.subject_for(elsewhere, account_id)
            [asked] = hub.consent.decisions.decide(elsewhere.client_id, [parse_evaluation({
                "subject": {"type": "user", "id": unknown_there}, "action": {"name": "use"},
                "resource": {"type": "claim", "id": "email"},
                "context": {"purpose": "service-delivery"}})], now=utcnow())
            started = time.perf_counter()
            assert hub.accounts.close(account_id)
            end_grants_and_consents(hub, account_id)
            assert hub.accounts.erase(account_id)
            whole.append(time.perf_counter() - started)
            with hub.db.session() as s:
                row = s.get(AgencyDecision, asked.decision_id)
                assert row is not None
                stripped += row.subject is None and row.erased_at is not None
        hub.consent.decisions.forget_account = forget  # type: ignore[method-assign]
        print(f"\n3. {args.erase} erasures ({len(agencies)} agencies: one unresolved-question "
              f"lookup each): median {statistics.median(whole) * 1000:.1f} ms, max "
              f"{max(whole) * 1000:.1f} ms each; the questions' strip alone median "
              f"{statistics.median(strip) * 1000:.1f} ms, max {max(strip) * 1000:.1f} ms; "
              f"unresolved questions about them stripped: {stripped} of {args.erase}",
              flush=True)
        after = step(hub, decider, loaded.sample, 1000, "after the erasures")
    print("decision latency, ms:")
    for r in (before, after):
        print(r.row())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
