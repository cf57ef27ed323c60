"""bench/app_cpu.py runs every scenario against the real app, PostgreSQL, Redis and upstream OP
(each operation's answer is checked: a refused or failed one stops the tool), and prints one
row per scenario that bench/compare.py can read. Tiny counts: this checks the tool, it does not
measure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.app_cpu import NAMES
from bench.compare import ROW

ROOT = Path(__file__).resolve().parents[1]


def test_app_cpu_runs_every_scenario_and_prints_rows_compare_reads():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "app_cpu.py"), "--count", "4", "--rounds", "2",
         "--warmup", "2"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = {m.group(1).strip(): (int(m.group(2)), int(m.group(3)))
            for m in map(ROW.match, out.stdout.splitlines()) if m is not None}
    assert set(rows) == set(NAMES.values()), out.stdout
    for name, (ops, per_cpu_second) in rows.items():
        assert ops == 8, name
        assert per_cpu_second > 0, name
    # a login costs more than serving the JWKS document from memory
    assert rows[NAMES["3"]][1] < rows[NAMES["0"]][1]
