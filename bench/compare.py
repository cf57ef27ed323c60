"""Before and after: bench/run.py alternated between two revisions of the hub.

    .venv/bin/python bench/compare.py BEFORE [AFTER] [--rounds 3] -- --scenarios 1,3 --no-peer
    .venv/bin/python bench/compare.py BEFORE [AFTER] --tool app_cpu -- --scenarios 3

Checks each git revision (AFTER defaults to HEAD) out into a temporary worktree, with this
checkout's ``.venv`` and ``demo/upstream/node_modules`` linked in, and runs that worktree's
own ``bench/run.py`` (the hub, its bench and its wrk scripts of that revision), or with
``--tool app_cpu`` its ``bench/app_cpu.py`` (this checkout's, for a revision older than it), with
the arguments after ``--``: before, after, before, after... ``--rounds`` times each. Alternating
spreads the machine's drift (here ±10-15% between runs minutes apart) over both sides
instead of charging it to one. Prints every run's req/s per scenario, the medians, their
ratio and the largest worker RSS of each side, then removes the worktrees. Both sides use
the dependencies installed here: a change of dependencies is not measured this way.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: a scenario's row of bench/run.py's table: its name (44 columns), requests, req/s, ...
ROW = re.compile(r"^([0-9F][0-9a-z]?\s.{40,43}?)\s+(\d+)\s+(\d+)\s")
RSS = re.compile(r"^hub worker pid \d+: RSS ([0-9.]+) MB")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def worktree(rev: str, where: Path) -> Path:
    path = where / rev.replace("/", "_")
    git("worktree", "add", "--detach", str(path), git("rev-parse", "--verify", rev))
    for link in (".venv", "demo/upstream/node_modules"):
        if (ROOT / link).exists() and not (path / link).exists():
            (path / link).symlink_to(ROOT / link)
    return path


def run(tree: Path, args: list[str], tool: str = "run") -> tuple[dict[str, int], float]:
    """One run of ``bench/<tool>.py`` in ``tree``: req/s by scenario (for app_cpu,
    operations per CPU-second), and the largest worker RSS (MB; 0 for app_cpu)."""
    script = tree / "bench" / f"{tool}.py"
    if not script.exists() and tool != "run":
        # a revision older than the tool: this checkout's copy drives that revision's app
        # (it imports the hub and bench/run.py from the tree it sits in)
        shutil.copy(ROOT / "bench" / f"{tool}.py", script)
    out = subprocess.run([sys.executable, str(script), *args], cwd=tree,
                         capture_output=True, text=True)
    rates: dict[str, int] = {}
    rss = 0.0
    for line in out.stdout.splitlines():
        if (m := ROW.match(line)) is not None:
            rates[m.group(1).strip()] = int(m.group(3))
        elif (m := RSS.match(line)) is not None:
            rss = max(rss, float(m.group(1)))
    if out.returncode != 0 or not rates:
        sys.stderr.write(out.stdout[-2000:] + out.stderr[-2000:])
        raise SystemExit(f"bench/{tool}.py failed in {tree} (exit {out.returncode})")
    return rates, rss


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after", nargs="?", default="HEAD")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tool", choices=["run", "app_cpu"], default="run",
                    help="run: bench/run.py (req/s through the HTTP server, wrk); app_cpu: "
                         "bench/app_cpu.py (the app's CPU per operation, a few per cent of "
                         "spread where wrk runs spread 10-25%%)")
    opts = ap.parse_args(argv[:split])
    bench_args = argv[split + 1:]
    sides = {"before": opts.before, "after": opts.after}
    results: dict[str, list[dict[str, int]]] = {side: [] for side in sides}
    rss: dict[str, float] = dict.fromkeys(sides, 0.0)
    with tempfile.TemporaryDirectory(prefix="civitas-compare-") as tmp:
        trees = {}
        try:
            for side, rev in sides.items():
                trees[side] = worktree(rev, Path(tmp))
            for n in range(1, opts.rounds + 1):
                for side in sides:
                    print(f"round {n}/{opts.rounds}: {side} ({sides[side]})", flush=True)
                    rates, most = run(trees[side], bench_args, opts.tool)
                    results[side].append(rates)
                    rss[side] = max(rss[side], most)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                               capture_output=True)
    unit = "operations per CPU-second" if opts.tool == "app_cpu" else "req/s"
    print(f"\nbench/{opts.tool}.py {' '.join(bench_args)}: before {sides['before']}, after "
          f"{sides['after']}, {opts.rounds} alternated rounds ({unit} of each run)")
    for name in results["before"][0]:
        before = [r.get(name, 0) for r in results["before"]]
        after = [r.get(name, 0) for r in results["after"]]
        mb, ma = statistics.median(before), statistics.median(after)
        ratio = f"{ma / mb:.2f}" if mb else "-"
        print(f"{name:<44} before {', '.join(map(str, before))} (median {mb:g})  "
              f"after {', '.join(map(str, after))} (median {ma:g})  after/before {ratio}")
    if opts.tool == "run":
        print(f"largest worker RSS: before {rss['before']:.1f} MB, after {rss['after']:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
