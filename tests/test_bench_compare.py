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


def test_repeated_runs_report_the_median_run_and_every_runs_figure():
    """bench/run.py --repeat: the run with the median req/s (or p99) is the row's figure, each
    run's figure in the order they ran in its note, the peer's beside the hub's."""
    from bench.run import median_run

    def run(rps: float, p99_ms: float, cores: float) -> dict:
        return {"requests": int(rps * 10), "good_rps": rps, "p50_us": 5000,
                "p99_us": int(p99_ms * 1000), "non2xx": 0, "hub_cores_busy": cores}

    runs = [run(1040, 9.0, 1.50), run(920, 12.5, 1.44), run(1010, 8.1, 1.47)]
    middle = median_run(runs, "good_rps")
    assert middle["good_rps"] == 1010
    assert middle["runs_note"] == ("median of 3 runs by req/s; req/s 1040, 920, 1010, "
                                   "hub cores 1.50, 1.44, 1.47; ")
    slowest_tail = median_run(runs, "p99_us")
    assert slowest_tail["p99_us"] == 9000
    assert "p99s 9.0, 12.5, 8.1 ms" in slowest_tail["runs_note"]
    peer = median_run([run(2000, 3, 1.2), run(2100, 3, 1.2)], "good_rps", "peer: ")
    assert peer["good_rps"] == 2100 and peer["runs_note"].startswith("peer: median of 2")
    row = fmt_row("3 SSO 2nd agency: logins/s (authorize+token)", middle, peer, 2,
                  note="latency per request")
    assert "median of 3 runs" in row and "peer: median of 2 runs" in row
    assert row.endswith("latency per request")
    assert ROW.match(row).group(3) == "1010"
    # one run: its own figures, no note
    assert "runs_note" not in median_run(runs[:1], "good_rps")
    assert runs[1] == run(920, 12.5, 1.44)  # the runs themselves are left as they were
