"""Ledger throughput: append, seal, export and offline verify, with verify's peak memory.

    .venv/bin/python bench/ledger_bench.py [--entries N] [--threads T] [--single S]
                                           [--database-url URL] [--keep DIR] [--workers W]
                                           [--hashlib] [--verify-only DIR]

Appends go through the real :class:`consent.ledger.Ledger` into SQLite (or ``--database-url``):
``S`` single appends, each its own transaction, from ``T`` threads (the decision API's
workers); the same appends inside a caller's transaction (what the decision API pays when the
entry rides in its own commit); then the rest of the ``N`` entries in batches of 10,000 to
fill the ledger quickly. The sealer then seals everything (checkpoints every 100,000 entries),
the export writes JSON Lines, and verification runs in a child process so its peak RSS is its
own; a second verify of a smaller window shows that memory does not grow with the export.
Verify runs twice on the full export: in one process, then with ``W`` worker processes (default:
one per CPU), which is what ``civitas audit verify`` does with a large file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.fernet import Fernet  # noqa: E402

from consent.ledger import Ledger  # noqa: E402
from consent.ledger.export import export_ledger  # noqa: E402
from kernel.crypto import FieldCipher  # noqa: E402
from kernel.db import Base, Database, utcnow  # noqa: E402

TABLES = ["ledger_entries", "ledger_checkpoints", "ledger_nodes", "ledger_keys"]

VERIFY = """
import resource, sys, time
from consent.ledger import hashing, scan
from consent.ledger.verify import verify_export
if sys.argv[4] == "hashlib":  # the fallback, as where the compiled core is not built
    scan.leaf_hashes, scan.perfect_root = hashing.py_leaf_hashes, hashing.py_perfect_root
    hashing.perfect_root = hashing.py_perfect_root
elif not hashing.COMPILED:
    sys.exit("the compiled hashing core is not built (consent/ledger/_hashing.c)")
t = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    report = verify_export(f, open(sys.argv[2]).read().strip(), workers=int(sys.argv[3]) or None)
elapsed = time.perf_counter() - t
status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(report.entries, elapsed, int(status) / 1024, report.workers, worker)
"""


def decision(i: int) -> dict[str, object]:
    return {"sub": f"{i:032x}", "agency": "benefits-agency", "claims": ["email", "address"],
            "purpose": "eligibility", "decision": i % 7 != 0, "request": f"r-{i}"}


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>12,.0f} entries/s  ({n:,} in {seconds:.1f} s)"


def verify_child(path: Path, key_file: Path, workers: int = 0, hashing: str = "compiled"
                 ) -> tuple[int, float, float, int, float]:
    """Verify in a fresh interpreter: entries, seconds, that process's own peak RSS in MiB
    (VmHWM: getrusage's maxrss would carry the forking parent's over the exec), how many
    processes hashed, and the largest worker's peak RSS (pages it shares with the parent it
    was forked from included)."""
    out = subprocess.run([sys.executable, "-c", VERIFY, str(path), str(key_file), str(workers),
                          hashing],
                         check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    return int(out[0]), float(out[1]), float(out[2]), int(out[3]), float(out[4])


def verify_all(full: Path, tenth: Path, key_file: Path, workers: int, hashing: str) -> None:
    small, small_s, small_rss, _, _ = verify_child(tenth, key_file, 1, hashing)
    count, seconds, rss, _, _ = verify_child(full, key_file, 1, hashing)
    print(f"verify hashes with {'the compiled core' if hashing == 'compiled' else 'hashlib'}")
    print(f"{'verify, one process:':<35}{rate(count, seconds)}")
    print(f"{'verify peak RSS, one process:':<35}{rss:,.1f} MiB for {count:,} entries, "
          f"{small_rss:,.1f} MiB for {small:,} entries (in {small_s:.1f} s)")
    count, seconds, rss, used, worker_rss = verify_child(full, key_file, workers, hashing)
    print(f"{f'verify, {used} processes:':<35}{rate(count, seconds)}")
    print(f"{f'verify peak RSS, {used} processes:':<35}{rss:,.1f} MiB, largest worker "
          f"{worker_rss:,.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--single", type=int, default=10_000,
                        help="single-transaction appends to time (default 10,000)")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--keep", default=None, help="directory to keep the files in")
    parser.add_argument("--workers", type=int, default=0,
                        help="verify processes for the second full verify (default: one per CPU)")
    parser.add_argument("--hashlib", action="store_true",
                        help="verify with the hashlib fallback instead of the compiled core")
    parser.add_argument("--verify-only", metavar="DIR", default=None,
                        help="only verify the files a run with --keep DIR left there")
    args = parser.parse_args()
    if args.verify_only:
        kept = Path(args.verify_only)
        print(f"ledger bench: verify only, {os.cpu_count()} CPUs, Python "
              f"{sys.version.split()[0]}")
        verify_all(kept / "export.jsonl", kept / "export-window.jsonl", kept / "pubkey.txt",
                   args.workers, "hashlib" if args.hashlib else "compiled")
        return
    work = Path(args.keep or tempfile.mkdtemp(prefix="ledger-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    url = args.database_url or f"sqlite:///{work}/ledger.db"
    db = Database(url)
    Base.metadata.create_all(db.engine, tables=[Base.metadata.tables[t] for t in TABLES])
    ledger = Ledger(db, FieldCipher([Fernet.generate_key().decode()]),
                    origin="bench.civitas.example/ledger", seal_batch=100_000)
    n, single = args.entries, min(args.single, args.entries)
    print(f"ledger bench: {n:,} entries, {db.engine.dialect.name}, {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}")

    # 1. single appends, one transaction each, from several threads
    per = single // args.threads
    def worker(w: int) -> None:
        for i in range(per):
            ledger.append("decision.query", decision(w * per + i))
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.threads)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    done = per * args.threads
    elapsed = time.perf_counter() - t
    print(f"append, own transaction ({args.threads} threads): {rate(done, elapsed)}")

    # 2. appends inside the caller's transaction (the decision API's case: no extra commit)
    inside = min(single, n - done)
    t = time.perf_counter()
    for start in range(0, inside, 100):
        with db.session() as s:
            for i in range(start, min(inside, start + 100)):
                ledger.append("decision.query", decision(done + i), session=s)
    print(f"append, in caller's transaction:   {rate(inside, time.perf_counter() - t)}")
    done += inside

    # 3. fill the rest in batches
    t = time.perf_counter()
    while done < n:
        batch = min(10_000, n - done)
        ledger.append_many(("decision.query", decision(done + i)) for i in range(batch))
        done += batch
    fill = time.perf_counter() - t
    if fill > 0.01:
        print(f"append_many (batches of 10,000):   {rate(n - single - inside, fill)}")

    # 4. seal
    t = time.perf_counter()
    ledger.seal_all()
    print(f"seal (sign every 100,000):         {rate(n, time.perf_counter() - t)}")

    # 5. export: everything, and a window near the end (extended to checkpoint boundaries)
    key_file = work / "pubkey.txt"
    key_file.write_text(ledger.public_key())
    full, tenth = work / "export.jsonl", work / "export-window.jsonl"
    t = time.perf_counter()
    with open(full, "wb") as out:
        export_ledger(ledger, out)
    print(f"export:                            {rate(n, time.perf_counter() - t)}  "
          f"{full.stat().st_size / 2**20:,.0f} MiB")
    with db.session() as s:
        from sqlalchemy import select

        from consent.ledger.models import LedgerEntry
        since = s.scalar(select(LedgerEntry.created_at)
                         .where(LedgerEntry.leaf_index == n - n // 10))
    with open(tenth, "wb") as out:
        export_ledger(ledger, out, since=since or utcnow() - timedelta(0))

    # 6. verify offline, in child processes
    verify_all(full, tenth, key_file, args.workers, "hashlib" if args.hashlib else "compiled")
    db.dispose()
    if not args.keep:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()


if __name__ == "__main__":
    main()
