"""Decision latency as the data grows, and the plan of every statement the decision path runs.

    .venv/bin/python bench/decision_scale.py [--accounts 1000000] [--events 10000000]
        [--steps 0.001,0.1,1] [--decisions 2000] [--agencies 50] [--without-index NAME]

Starts PostgreSQL (tests/servers.py, a temporary cluster) and the hub in-process on it
(``create_app``: migrations, 50 bench agencies), then for each step loads data up to that
fraction of the full size with bench/load_data.py (COPY, incremental), runs VACUUM ANALYZE,
and times ``--decisions`` single ``POST /access/v1/evaluation`` requests through the Flask
test client (HTTP Basic agency authentication, the decision row and its ledger entry written
and committed each time): half for citizens sampled across everything loaded so far (their
claims and purposes drawn from the agency's declaration), half for subjects that have no
record. It prints p50/p99 per step and the ratio of the last step to the first.

At every step the SQL of one decision with and one without a record is captured (SQLAlchemy
``before_cursor_execute``) and each statement is run again under EXPLAIN (ANALYZE, BUFFERS)
(INSERTs under plain EXPLAIN); a Seq Scan on a loaded table is reported.
``--without-index`` then drops one index and measures once more, to show what it is worth.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import Connection  # noqa: E402

from bench.load_data import (  # noqa: E402
    TABLES,
    Templates,
    analyze,
    bench_settings,
    build_templates,
    load,
    start_hub,
)
from civitas.app import Hub  # noqa: E402
from config import settings_from_mapping  # noqa: E402
from tests import servers  # noqa: E402

# -- capturing SQL and reading plans -------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    sql: str
    parameters: Any


@contextlib.contextmanager
def capture_sql() -> Iterator[list[Statement]]:
    """Every statement this thread sends to PostgreSQL while the block runs, with its
    parameters: taken at the driver (psycopg's ``Cursor.execute``), so that statements sent
    through SQLAlchemy and those a ``kernel.db.Prepared`` sends straight are both seen."""
    import threading

    import psycopg

    seen: list[Statement] = []
    me = threading.get_ident()
    execute = psycopg.Cursor.execute

    def record(cursor: Any, query: Any, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == me and isinstance(query, str):
            seen.append(Statement(query, params))
        return execute(cursor, query, params, *args, **kwargs)

    psycopg.Cursor.execute = record  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        psycopg.Cursor.execute = execute  # type: ignore[method-assign]


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from plan_nodes(child)


@dataclass(frozen=True)
class Explained:
    statement: Statement
    plan: dict[str, Any]  # the top node of EXPLAIN (FORMAT JSON)
    execution_ms: float | None

    @property
    def scans(self) -> list[tuple[str, str, str | None]]:
        """(node type, table, index) of every node that reads a table; a Bitmap Heap Scan's
        index is its Bitmap Index Scans' (several under a BitmapOr, joined by ``|``)."""
        found = []
        for n in plan_nodes(self.plan):
            if "Relation Name" not in n:
                continue
            index = n.get("Index Name")
            if n["Node Type"] == "Bitmap Heap Scan":
                names = dict.fromkeys(c["Index Name"] for c in plan_nodes(n)
                                      if c["Node Type"] == "Bitmap Index Scan")
                index = "|".join(names) or None
            found.append((n["Node Type"], n["Relation Name"], index))
        return found

    def seq_scans(self, tables: Sequence[str] = TABLES) -> list[str]:
        return [table for kind, table, _ in self.scans
                if kind == "Seq Scan" and table in tables]


def explain(conn: Connection, statement: Statement, *, analyze: bool = False) -> Explained:
    """EXPLAIN one captured statement with its own parameters (psycopg binds them, so the
    planner sees the values, as for the real query). With ``analyze`` it also runs, in a
    savepoint that is rolled back, so an INSERT leaves nothing behind."""
    options = "ANALYZE, BUFFERS, FORMAT JSON" if analyze else "FORMAT JSON"
    with conn.begin_nested() as savepoint:
        result = conn.exec_driver_sql(f"EXPLAIN ({options}) {statement.sql}",
                                      statement.parameters).scalar_one()
        savepoint.rollback()
    document = json.loads(result) if isinstance(result, str) else result
    return Explained(statement, document[0]["Plan"], document[0].get("Execution Time"))


def describe(explained: Explained) -> str:
    sql = " ".join(explained.statement.sql.split())
    scans = ", ".join(f"{kind} {table}" + (f" using {index}" if index else "")
                      for kind, table, index in explained.scans) or explained.plan["Node Type"]
    took = (f"{explained.execution_ms:.3f} ms" if explained.execution_ms is not None else "")
    return f"    {took:>10}  {scans}\n               {sql[:150]}"


# -- the decision requests -----------------------------------------------------------------


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def absent_subject() -> str:
    """Shaped like a pairwise sub (43 base64url characters) but nobody's."""
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


class Decider:
    """Builds and sends evaluation requests as the bench agencies."""

    def __init__(self, app: Any, templates: Templates, secrets: dict[str, str]) -> None:
        self.client = app.test_client()
        self.templates = templates
        self.auth = {cid: basic(cid, secret) for cid, secret in secrets.items()
                     if cid in templates.policies}
        self.rng = random.Random(11)  # noqa: S311 (test data)

    def request(self, client_id: str, subject: str) -> dict[str, Any]:
        policy = self.templates.policies[client_id]
        claim = self.rng.choice(policy.claims)
        purpose = self.rng.choice(claim.purposes)
        return {"subject": {"type": "user", "id": subject}, "action": {"name": "use"},
                "resource": {"type": "claim", "id": claim.claim},
                "context": {"purpose": purpose}}

    def one(self, client_id: str, subject: str) -> tuple[float, bool]:
        body = self.request(client_id, subject)
        started = time.perf_counter()
        r = self.client.post("/access/v1/evaluation", json=body,
                             headers={"Authorization": self.auth[client_id]})
        took = time.perf_counter() - started
        if r.status_code != 200:
            raise RuntimeError(f"decision failed: {r.status_code} {r.get_data(as_text=True)}")
        return took, bool(r.get_json()["decision"])

    def absent(self) -> tuple[str, str]:
        return self.rng.choice(sorted(self.auth)), absent_subject()


@dataclass
class StepResult:
    label: str
    rows: int
    existing: list[float]
    absent: list[float]
    permits: int

    @staticmethod
    def pct(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def row(self) -> str:
        both = self.existing + self.absent
        return (f"{self.label:<34} {self.rows:>12,} {self.pct(both, .5):>7.2f} "
                f"{self.pct(both, .99):>7.2f} {self.pct(self.existing, .5):>7.2f} "
                f"{self.pct(self.existing, .99):>7.2f} {self.pct(self.absent, .5):>7.2f} "
                f"{self.pct(self.absent, .99):>7.2f} {self.permits:>7}")


HEADER = (f"{'size':<34} {'rows':>12} {'p50':>7} {'p99':>7} {'ex p50':>7} {'ex p99':>7} "
          f"{'ab p50':>7} {'ab p99':>7} {'permits':>7}")


def measure(decider: Decider, sample: list[tuple[str, str]], count: int, label: str,
            rows: int) -> StepResult:
    rng = random.Random(5)  # noqa: S311 (test data)
    for _ in range(min(200, count // 4)):  # warm-up: connections, caches, prepared statements
        decider.one(*decider.absent())
    result = StepResult(label, rows, [], [], 0)
    for i in range(count):
        if sample and i % 2 == 0:
            took, permit = decider.one(*rng.choice(sample))
            result.existing.append(took)
        else:
            took, permit = decider.one(*decider.absent())
            result.absent.append(took)
        result.permits += permit
    return result


def plans(hub: Hub, decider: Decider, sample: list[tuple[str, str]]) -> list[Explained]:
    """The statements of one decision with a record and one without, explained."""
    with capture_sql() as seen:
        if sample:
            decider.one(*sample[0])
        decider.one(*decider.absent())
    statements = [s for s in seen if s.sql.lstrip().split()[0].upper() in (
        "SELECT", "INSERT", "UPDATE", "DELETE", "WITH")]
    with hub.db.engine.connect() as conn:
        # an INSERT again would hit its own primary key: its plan is a plain Insert anyway
        # (the decision rows and ledger entries are one WITH ... INSERT statement)
        return [explain(conn, s, analyze=re.search(r"\bINSERT\b", s.sql, re.I) is None)
                for s in statements]


def step(hub: Hub, decider: Decider, sample: list[tuple[str, str]], count: int,
         label: str) -> StepResult:
    """Plans, then timed decisions, at the current size."""
    print(f"\nplans at {label}:")
    for e in plans(hub, decider, sample):
        print(describe(e))
        for table in e.seq_scans():
            print(f"    !! Seq Scan on {table}")
    result = measure(decider, sample, count, label, table_rows(hub))
    print("\n" + HEADER + "\n" + result.row() + "\n", flush=True)
    return result


def table_rows(hub: Hub) -> int:
    with hub.db.engine.connect() as conn:
        return sum(int(conn.execute(text(
            "SELECT reltuples::bigint FROM pg_class WHERE relname = :t"), {"t": t}).scalar_one())
            for t in TABLES)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accounts", type=int, default=1_000_000)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--steps", default="0.001,0.1,1",
                    help="fractions of the full size to measure at, ascending")
    ap.add_argument("--decisions", type=int, default=2000, help="timed decisions per step")
    ap.add_argument("--agencies", type=int, default=50)
    ap.add_argument("--without-index", default=None,
                    help="drop this index before the last step (e.g. "
                         "ix_consent_records_client_subject) after the last step and "
                         "measure again, to see what it is worth")
    ap.add_argument("--without-index-decisions", type=int, default=40,
                    help="timed decisions without the index (each may scan a table)")
    args = ap.parse_args(argv)
    steps = [float(s) for s in args.steps.split(",")]
    results: list[StepResult] = []
    with tempfile.TemporaryDirectory(prefix="civitas-scale-") as workdir, \
            servers.run_postgres(Path(workdir) / "pg") as url:
        mapping = bench_settings(url, args.agencies)
        app = start_hub(settings_from_mapping(mapping))
        hub: Hub = app.extensions["civitas"]
        templates = build_templates(hub, Path(workdir))
        decider = Decider(app, templates, {a["client_id"]: a["client_secret"]
                                           for a in mapping["agencies"]})
        sample: list[tuple[str, str]] = []
        loaded_accounts = loaded_events = 0
        for fraction in steps:
            accounts = round(args.accounts * fraction) - loaded_accounts
            events = round(args.events * fraction) - loaded_events
            if accounts > 0:
                print(f"loading {accounts:,} accounts, ~{events:,} events ...", flush=True)
                loaded = load(hub, accounts=accounts, events=events, templates=templates)
                print(loaded.report(), flush=True)
                sample.extend(loaded.sample)
                loaded_accounts += accounts
                loaded_events += events
                started = time.perf_counter()
                analyze(hub)
                print(f"  VACUUM ANALYZE {time.perf_counter() - started:.1f} s", flush=True)
            label = f"{fraction:g} x ({loaded_accounts:,} accounts)"
            results.append(step(hub, decider, sample, args.decisions, label))
        if args.without_index:
            with hub.db.engine.begin() as conn:
                conn.execute(text(f'DROP INDEX "{args.without_index}"'))
            without = step(hub, decider, sample, args.without_index_decisions,
                           f"same, without {args.without_index}")
        hub.db.dispose()
    print("\ndecision latency, ms (ex = citizen with a record, ab = subject without one):")
    print(HEADER)
    for r in results:
        print(r.row())
    if args.without_index:
        print(without.row())
    first, last = results[0], results[-1]
    for name, q in (("p50", .5), ("p99", .99)):
        a = StepResult.pct(first.existing + first.absent, q)
        b = StepResult.pct(last.existing + last.absent, q)
        print(f"ratio last/first {name}: {b / a:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
