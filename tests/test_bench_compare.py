"""bench/compare.py reads bench/run.py's table: each scenario's name and req/s, from rows made
by run.py's own formatter, so that a change to the table's layout fails here and not in a
comparison that silently reports nothing."""

from __future__ import annotations

import re
from pathlib import Path

from bench.compare import ROW
from bench.run import fmt_row

RUN_PY = Path(__file__).resolve().parents[1] / "bench" / "run.py"


def test_compare_reads_every_scenario_row_that_run_py_prints():
    names = re.findall(r'fmt_row\(f?"([^"]+)"', RUN_PY.read_text())
    names = [n.replace("{server}", "granian") for n in names]
    assert len(set(names)) >= 11
    result = {"requests": 123456, "good_rps": 2547.4, "p50_us": 5690, "p99_us": 13600,
              "non2xx": 0, "hub_cores_busy": 1.63, "worker_cores_busy": [0.81, 0.83],
              "storage_cores_busy": 0.14}
    peer = {"good_rps": 7465.0, "hub_cores_busy": 1.28}
    for name in set(names):
        row = fmt_row(name, result, peer, 2, note="JWT access token")
        m = ROW.match(row)
        assert m is not None, row
        assert (m.group(1).strip(), m.group(2), m.group(3)) == (name, "123456", "2547")
    # a scenario that did not run has no figures to compare
    assert ROW.match(fmt_row("3 SSO 2nd agency: logins/s (authorize+token)", None, None, 2)) \
        is None


def test_compare_reads_every_row_that_app_cpu_prints():
    """bench/app_cpu.py's rows: the column compared is operations per CPU-second."""
    from bench.app_cpu import NAMES
    from bench.app_cpu import fmt_row as app_row

    for name in NAMES.values():
        row = app_row(name, 3000, [2090.4, 2101.0, 2088.7])
        m = ROW.match(row)
        assert m is not None, row
        assert (m.group(1).strip(), m.group(2), m.group(3)) == (name, "3000", "478")
