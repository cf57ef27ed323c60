"""How long migration 0012 (refresh grants in their own table) takes on a large
refresh_tokens, and that it keeps every grant.

    .venv/bin/python bench/migrate_refresh.py [--tokens 2000000] [--grants 2000]

Starts PostgreSQL (tests/servers.py, a temporary cluster), brings a database to 0011, COPYs
``--tokens`` refresh tokens in as the hub wrote them until then (``--grants`` grants, each
with one live token and the rest used; one grant in ten revoked on all its tokens), then
times ``upgrade`` to the head and checks the grants it made: one per grant id, revoked where
their tokens were. The tokens stay in refresh_tokens (read only, purged as their grants end).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from sqlalchemy import text  # noqa: E402

from bench.load_data import conninfo  # noqa: E402
from civitas.migrations import upgrade  # noqa: E402
from idp.tokens import digest, new_grant_id  # noqa: E402
from kernel.db import Database, utcnow  # noqa: E402
from tests import servers  # noqa: E402

COLUMNS = ("token_hash", "grant_id", "client_id", "account_id", "scope", "sid", "acr", "amr",
           "auth_time", "created_at", "expires_at", "used_at", "revoked_at")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--grants", type=int, default=2_000)
    args = ap.parse_args(argv)
    per_grant = max(1, args.tokens // args.grants)
    with tempfile.TemporaryDirectory(prefix="civitas-migrate-") as workdir, \
            servers.run_postgres(Path(workdir) / "pg") as url:
        db = Database(url)
        upgrade(db.engine, "0011")
        now = utcnow()
        grants = [new_grant_id() for _ in range(args.grants)]
        started = time.perf_counter()
        with psycopg.connect(conninfo(url)) as conn, conn.cursor() as cur:
            with cur.copy(f"COPY refresh_tokens ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for n, grant_id in enumerate(grants):
                    revoked = now if n % 10 == 0 else None
                    for k in range(per_grant):
                        copy.write_row((
                            digest(f"{grant_id}-{k}"), grant_id, "agency-one", f"{n:032d}",
                            "openid offline_access", "s" * 43, "urn:civitas:acr:basic",
                            json.dumps(["pwd"]), 1_700_000_000, now,
                            now + timedelta(days=20), None if k == per_grant - 1 else now,
                            revoked))
            conn.commit()
        with psycopg.connect(conninfo(url), autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE) refresh_tokens")
        loaded = time.perf_counter() - started
        started = time.perf_counter()
        upgrade(db.engine)
        took = time.perf_counter() - started
        with db.engine.connect() as conn:
            made = conn.execute(text("SELECT count(*), count(revoked_at) FROM refresh_grants")
                                ).one()
            tokens = conn.execute(text("SELECT count(*) FROM refresh_tokens")).scalar_one()
        db.dispose()
    print(f"{tokens:,} tokens of {args.grants:,} grants loaded in {loaded:.1f} s")
    print(f"upgrade 0011 -> head: {took:.2f} s ({took / tokens * 1e6:.2f} s per million tokens)")
    print(f"refresh_grants: {made[0]:,} rows, {made[1]:,} revoked "
          f"(expected {args.grants:,} and {len(grants[::10]):,})")
    return 0 if (made[0], made[1]) == (args.grants, len(grants[::10])) else 1


if __name__ == "__main__":
    raise SystemExit(main())
