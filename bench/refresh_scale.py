"""The refresh_token grant as the refresh tables grow, and the plan of its lookup.

    .venv/bin/python bench/refresh_scale.py [--lengths 1,1000,10000,100000] [--uses 300]
        [--grants 20]

Each use of a refresh token rotates it (RFC 9700 4.14.2). Until migration 0012 the used
token stayed in ``refresh_tokens`` so that presenting it again would revoke the grant, and
the grant's new token was one row more: a client that refreshes every five minutes for the
30 days a grant lives (the default) left 8,640 rows behind. Since 0012 a grant is one row of
``refresh_grants`` whose live token is rewritten in place, and the tokens from before stay
in ``refresh_tokens`` (read only) until their grants end.

Starts PostgreSQL (tests/servers.py, a temporary cluster) and the hub in-process on it
(migrations as in production). Then ``--grants`` background grants and the measured one
are given histories of the given length: used tokens from before 0012, COPYed in as the hub
wrote them, so that ``refresh_tokens`` holds ``grants x length`` rows. The measured grant
gets ``--uses`` calls of ``RefreshTokens.use`` (read its grant, claim the token) each
followed by ``issue`` (the rotated token), timed in-process. It prints p50/p99 per length,
the ratio of the longest to the shortest, and the plan of the lookup (EXPLAIN ANALYZE,
BUFFERS) at the longest: the rows it reads should not grow. Last, it times the revocation
of one of the other grants, and of all the grants of their account (``revoke_account``, as
a consent withdrawal does), at the longest history.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from sqlalchemy import text  # noqa: E402

from bench.load_data import bench_settings, conninfo, start_hub  # noqa: E402
from civitas.app import Hub  # noqa: E402
from config import settings_from_mapping  # noqa: E402
from idp.tokens import _GRANT, digest, new_grant_id  # noqa: E402
from kernel.db import utcnow  # noqa: E402
from tests import servers  # noqa: E402

COLUMNS = ("token_hash", "grant_id", "client_id", "account_id", "scope", "sid", "acr", "amr",
           "auth_time", "created_at", "expires_at", "used_at")


def add_history(hub: Hub, grant_ids: list[str], length: int, serial: list[int]) -> None:
    """``length`` used tokens more for every grant, as the hub leaves them (COPY)."""
    now = utcnow()
    expires = now + timedelta(days=30)
    with psycopg.connect(conninfo(hub.settings.database_url)) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY refresh_tokens ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for grant_id in grant_ids:
                for _ in range(length):
                    serial[0] += 1
                    copy.write_row((digest(f"used-{serial[0]}"), grant_id, "agency-one",
                                    "a" * 32, "openid profile offline_access", "s" * 43,
                                    "urn:civitas:acr:basic", json.dumps(["pwd"]), 1_700_000_000,
                                    now, expires, now))
        conn.commit()
    with psycopg.connect(conninfo(hub.settings.database_url), autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) refresh_tokens")


def issued(grant_id: str) -> dict[str, Any]:
    """What RefreshTokens.issue needs for one of the bench's grants (all of one account)."""
    return dict(grant_id=grant_id, client_id="agency-one", account_id="a" * 32,
                scope="openid profile offline_access", sid="s" * 43,
                acr="urn:civitas:acr:basic", amr=("pwd",), auth_time=1_700_000_000)


def measure(hub: Hub, live: dict[str, str], grant_id: str, uses: int) -> list[float]:
    """``uses`` refreshes of a grant, timed; ``live`` holds each grant's live token."""
    tokens = hub.server.hub.refresh_tokens
    times = []
    for _ in range(uses):
        started = time.perf_counter()
        grant = tokens.use(live[grant_id], "agency-one")
        if grant is None:
            raise SystemExit("a live token was refused")
        live[grant_id] = tokens.issue(**issued(grant_id), family_expires_at=grant.expires_at)
        times.append((time.perf_counter() - started) * 1000)
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1,1000,10000,100000",
                    help="history lengths (used tokens per grant) to measure at, ascending")
    ap.add_argument("--uses", type=int, default=300, help="timed uses per length")
    ap.add_argument("--grants", type=int, default=20,
                    help="other grants with the same history beside the measured one")
    args = ap.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    rows: list[tuple[int, int, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="civitas-refresh-") as workdir, \
            servers.run_postgres(Path(workdir) / "pg") as url:
        app = start_hub(settings_from_mapping(bench_settings(url, 2)))
        hub: Hub = app.extensions["civitas"]
        measured = new_grant_id()
        others = [new_grant_id() for _ in range(args.grants)]
        live = {grant_id: hub.server.hub.refresh_tokens.issue(**issued(grant_id))
                for grant_id in (measured, *others)}  # each grant's row, and its first token
        have, serial = 0, [0]
        plan = ""
        for length in lengths:
            print(f"history of {length:,} used tokens per grant ...", flush=True)
            add_history(hub, [measured, *others], length - have, serial)
            have = length
            measure(hub, live, measured, 20)  # warm up: connections, statement caches
            times = measure(hub, live, measured, args.uses)
            with hub.db.engine.connect() as conn:
                table = conn.execute(text("SELECT count(*) FROM refresh_tokens")).scalar_one()
                # the lookup as psycopg sends it: its SQL, the grant's id bound to it
                plan = "\n".join(r[0] for r in conn.exec_driver_sql(
                    "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) "
                    + str(_GRANT.compile(conn)), {"of_grant": measured}))
            rows.append((length, table, pct(times, 0.5), pct(times, 0.99)))
            print(f"  {table:,} rows: use + rotate p50 {rows[-1][2]:.2f} ms, "
                  f"p99 {rows[-1][3]:.2f} ms", flush=True)
        refresh = hub.server.hub.refresh_tokens
        started = time.perf_counter()
        refresh.revoke_grant(others[0])
        one = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        refresh.revoke_account("a" * 32, "agency-one")
        every = (time.perf_counter() - started) * 1000
        hub.db.dispose()
    print("\nrefresh (use + rotate, in-process), ms:")
    print(f"{'history/grant':>14} {'tokens rows':>11} {'p50':>7} {'p99':>7}")
    for length, table, p50, p99 in rows:
        print(f"{length:>14,} {table:>11,} {p50:7.2f} {p99:7.2f}")
    print(f"longest / shortest: p50 x{rows[-1][2] / rows[0][2]:.2f}, "
          f"p99 x{rows[-1][3] / rows[0][3]:.2f}")
    print(f"\nat {lengths[-1]:,} tokens per grant: revoking one grant {one:.2f} ms, "
          f"the other {len(others)} of the account {every:.2f} ms")
    print("\nthe lookup's plan at the longest history:\n" + plan)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
