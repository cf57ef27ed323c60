"""Inserting into the decision log's primary key: random (version 4) ids against time-ordered
(version 7) ids, once the index is large.

    .venv/bin/python bench/id_order.py [--preload 5000000] [--rows 100000]

Starts PostgreSQL (tests/servers.py, a temporary cluster, the suite's settings) and, for each
kind of id, makes a table shaped like ``consent_decisions``' key (a 32-hex-digit text primary
key, a time, a little more), loads ``--preload`` rows with ids of that kind, then inserts
``--rows`` more in batches of 20 (a batch of decisions) with the hub's own id functions and
prints the time per row, the WAL written per row and the index's size. Random ids put each new
row on a random page of the index; time-ordered ids put it at the right-hand end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from consent.models import new_id, new_time_ordered_id  # noqa: E402
from tests import servers  # noqa: E402

#: how the preload makes ids of each kind in SQL (the same shape: 32 hex digits)
PRELOAD_IDS = {
    "random (v4)": "md5(random()::text || i::text)",
    "time-ordered (v7)": "lpad(to_hex(i), 32, '0')",
}
MAKE_ID = {"random (v4)": new_id, "time-ordered (v7)": new_time_ordered_id}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preload", type=int, default=5_000_000)
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="civitas-ids-") as tmp, \
            servers.run_postgres(Path(tmp) / "pg") as url:
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                             autocommit=True) as conn:
            print(f"{'ids':<18} {'preload s':>9} {'us/row':>7} {'WAL B/row':>9} {'index MiB':>9}")
            for n, kind in enumerate(PRELOAD_IDS):
                table = f"ids_{n}"
                conn.execute(f"CREATE TABLE {table} (id varchar(32) PRIMARY KEY, "
                             "at timestamptz NOT NULL, reason text)")
                started = time.perf_counter()
                conn.execute(f"INSERT INTO {table} SELECT {PRELOAD_IDS[kind]}, now(), 'consented' "
                             f"FROM generate_series(1, {args.preload}) AS i")
                conn.execute(f"VACUUM ANALYZE {table}")
                preload = time.perf_counter() - started
                lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
                make = MAKE_ID[kind]
                started = time.perf_counter()
                with conn.cursor() as cur:
                    for _ in range(0, args.rows, 20):
                        cur.executemany(f"INSERT INTO {table} VALUES (%s, now(), 'consented')",
                                        [(make(),) for _ in range(20)])
                per_row = (time.perf_counter() - started) / args.rows
                wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)",
                                   (lsn,)).fetchone()[0]
                size = conn.execute(f"SELECT pg_relation_size('{table}_pkey')").fetchone()[0]
                print(f"{kind:<18} {preload:>9.1f} {1e6 * per_row:>7.1f} "
                      f"{float(wal) / args.rows:>9.0f} {size / 2**20:>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
