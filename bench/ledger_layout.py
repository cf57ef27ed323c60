"""Where the ledger keeps its leaf indices: on the entry row, set by an UPDATE when sealed (the
hub's layout), against a narrow table of their own, so that an entry row is written once.

    .venv/bin/python bench/ledger_layout.py [--entries 200000] [--rounds 2]

Starts PostgreSQL (tests/servers.py, a temporary cluster, the suite's settings) and, for each
layout, makes its tables, inserts ``--entries`` decision entries (the hub's own canonical
text and leaf hash) in statements of 20 (a batch of decisions, as the decision API writes
them: JSON through ``json_to_recordset``), then seals them all in chunks of 1,000 (select the
unsealed, give them leaf indices), then VACUUMs. It prints, per entry, the wall time and the
CPU of the PostgreSQL backend (from /proc) for inserting and for sealing, the WAL written,
and the tables' size after the VACUUM. The layouts run in turn, ``--rounds`` times, so that
a drift of the machine shows as a difference between rounds.

* ``wide update`` (the hub): ``leaf_index`` is a nullable unique column of the entry, with a
  partial index over the unsealed; sealing UPDATEs each entry row (never a HOT update: the
  column is indexed).
* ``narrow update``: entries are insert-only; a row (seq, leaf_index) per entry, inserted
  with it and updated when sealed.
* ``queue + leaves``: entries are insert-only; a queue of unsealed seqs, inserted with the
  entry, and an insert-only table (leaf_index, seq) that sealing fills while it empties the
  queue.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from consent.ledger.ledger import Ledger  # noqa: E402
from consent.models import new_time_ordered_id  # noqa: E402
from tests import servers  # noqa: E402

BATCH = 20
CHUNK = 1_000

_ENTRIES = """
CREATE TABLE e (seq bigserial PRIMARY KEY, {extra} kind varchar(64) NOT NULL,
  entry text NOT NULL, leaf_hash bytea NOT NULL, created_at timestamptz NOT NULL);
CREATE INDEX e_created ON e (created_at);
"""
_ROWS = """SELECT x.kind, x.entry, decode(x.h, 'hex'), x.t::timestamptz
FROM json_to_recordset(%(rows)s::json) AS x(kind text, entry text, h text, t text)"""
_NUMBERED = """unnest(string_to_array(%(seqs)s, ',')::bigint[]) WITH ORDINALITY AS v(seq, n)"""

#: name: (tables, insert, select the next unsealed chunk, give it leaf indices)
LAYOUTS = {
    "wide update": (
        _ENTRIES.format(extra="leaf_index bigint UNIQUE,")
        + "CREATE INDEX e_unsealed ON e (seq) WHERE leaf_index IS NULL;",
        "INSERT INTO e (kind, entry, leaf_hash, created_at) " + _ROWS,
        "SELECT seq, leaf_hash FROM e WHERE leaf_index IS NULL ORDER BY seq LIMIT %s",
        f"""UPDATE e SET leaf_index = %(first)s + v.n - 1 FROM {_NUMBERED}
            WHERE e.seq = v.seq AND e.leaf_index IS NULL"""),
    "narrow update": (
        _ENTRIES.format(extra="")
        + """CREATE TABLE l (seq bigint PRIMARY KEY, leaf_index bigint UNIQUE);
             CREATE INDEX l_unsealed ON l (seq) WHERE leaf_index IS NULL;""",
        f"""WITH n AS (INSERT INTO e (kind, entry, leaf_hash, created_at) {_ROWS}
            RETURNING seq) INSERT INTO l (seq) SELECT seq FROM n""",
        """SELECT l.seq, e.leaf_hash FROM l JOIN e USING (seq) WHERE l.leaf_index IS NULL
           ORDER BY l.seq LIMIT %s""",
        f"""UPDATE l SET leaf_index = %(first)s + v.n - 1 FROM {_NUMBERED}
            WHERE l.seq = v.seq AND l.leaf_index IS NULL"""),
    "queue + leaves": (
        _ENTRIES.format(extra="")
        + """CREATE TABLE p (seq bigint PRIMARY KEY);
             CREATE TABLE l (leaf_index bigint PRIMARY KEY, seq bigint NOT NULL UNIQUE);""",
        f"""WITH n AS (INSERT INTO e (kind, entry, leaf_hash, created_at) {_ROWS}
            RETURNING seq) INSERT INTO p (seq) SELECT seq FROM n""",
        "SELECT p.seq, e.leaf_hash FROM p JOIN e USING (seq) ORDER BY p.seq LIMIT %s",
        f"""WITH v AS (SELECT * FROM {_NUMBERED}),
            gone AS (DELETE FROM p USING v WHERE p.seq = v.seq RETURNING p.seq)
            INSERT INTO l (leaf_index, seq) SELECT %(first)s + v.n - 1, v.seq
            FROM v JOIN gone USING (seq)"""),
}


def batches(entries: int) -> list[str]:
    """The statements' JSON: decision entries as the decision API makes them."""
    out = []
    for _ in range(entries // BATCH):
        items = [("decision.query", {
            "decision_id": new_time_ordered_id(), "agency": "agency-benefits-0001",
            "subject": "kS1cZ0wWbZ8oQ9-3hOe0k1zG9yPz3m0m2tQe1Yc5Vd4", "action": "use",
            "claim": claim, "purpose": "service-delivery", "decision": True,
            "reason": "consented", "record": new_time_ordered_id()})
            for claim in ("name", "given_name", "family_name", "email") * (BATCH // 4)]
        out.append(json.dumps([
            {"kind": r["kind"], "entry": r["entry"], "h": r["leaf_hash"].hex(),
             "t": r["created_at"].isoformat()} for r in Ledger.entry_rows(items)]))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (the PostgreSQL backend serving this connection)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scalar(conn: psycopg.Connection[Any], query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise SystemExit(f"no row from {query}")
    return row[0]


def run(conn: psycopg.Connection[Any], layout: str, work: list[str]) -> dict[str, float]:
    tables, insert, select, assign = LAYOUTS[layout]
    conn.execute("DROP TABLE IF EXISTS e, l, p")
    conn.execute(tables)
    backend = int(scalar(conn, "SELECT pg_backend_pid()"))
    n = len(work) * BATCH

    def lsn() -> str:
        return str(scalar(conn, "SELECT pg_current_wal_lsn()"))

    def since(mark: str) -> int:
        return int(scalar(conn, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (mark,)))

    out: dict[str, float] = {}
    mark, wall, cpu = lsn(), time.perf_counter(), cpu_seconds(backend)
    for rows in work:
        conn.execute(insert, {"rows": rows})
    out["insert_us"] = (time.perf_counter() - wall) / n * 1e6
    out["insert_cpu_us"] = (cpu_seconds(backend) - cpu) / n * 1e6
    out["insert_wal"] = since(mark) / n
    mark, wall, cpu = lsn(), time.perf_counter(), cpu_seconds(backend)
    sealed = 0
    while True:
        with conn.transaction():
            chunk = conn.execute(select, (CHUNK,)).fetchall()
            if not chunk:
                break
            done = conn.execute(assign, {"first": sealed, "seqs": ",".join(
                str(seq) for seq, _ in chunk)}).rowcount
            if done != len(chunk):
                raise SystemExit(f"{layout}: {done} of {len(chunk)} entries sealed")
            sealed += done
    if sealed != n:
        raise SystemExit(f"{layout}: sealed {sealed} of {n} entries")
    out["seal_us"] = (time.perf_counter() - wall) / n * 1e6
    out["seal_cpu_us"] = (cpu_seconds(backend) - cpu) / n * 1e6
    out["seal_wal"] = since(mark) / n
    wall = time.perf_counter()
    conn.execute("VACUUM")
    out["vacuum_s"] = time.perf_counter() - wall
    out["size_mib"] = int(scalar(
        conn, "SELECT sum(pg_total_relation_size(oid)) FROM pg_class WHERE relname IN "
        "('e', 'l', 'p') AND relkind = 'r'")) / 2**20
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.entries < BATCH or args.rounds < 1:
        ap.error(f"--entries must be at least {BATCH} and --rounds at least 1")
    work = batches(args.entries)
    print(f"{len(work) * BATCH} decision entries, inserted {BATCH} per statement, "
          f"sealed {CHUNK} per chunk; per entry: wall and backend CPU in us, WAL in bytes")
    print(f"{'layout':<15} {'insert':>7} {'cpu':>6} {'WAL':>5} | {'seal':>6} {'cpu':>6} "
          f"{'WAL':>5} | {'vacuum s':>8} {'MiB':>5}")
    with tempfile.TemporaryDirectory(prefix="civitas-layout-") as tmp, \
            servers.run_postgres(Path(tmp) / "pg") as url:
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                             autocommit=True) as conn:
            for _ in range(args.rounds):
                for layout in LAYOUTS:
                    r = run(conn, layout, work)
                    print(f"{layout:<15} {r['insert_us']:7.1f} {r['insert_cpu_us']:6.1f} "
                          f"{r['insert_wal']:5.0f} | {r['seal_us']:6.1f} {r['seal_cpu_us']:6.1f} "
                          f"{r['seal_wal']:5.0f} | {r['vacuum_s']:8.2f} {r['size_mib']:5.0f}",
                          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
