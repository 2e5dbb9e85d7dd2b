"""Smoke test of the benchmarks: ``bench/run.py --quick --runs 1`` runs and prints every row.

No timing is asserted (figures on a shared 2-vCPU machine are noise at these sizes):
only that the command works end to end, floor and bigmrun, and reports each figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"

ROWS = [
    "round trips, 1 caller, 64 B",
    "round trip latency",
    "round trips, async def method",
    "64 in flight, submit",
    "64 in flight, acall",
    "bulk to machine",
    "bulk from machine",
    "startup of 4 machines",
    "bigpi 1 machine, wall",
    "bigpi 2 machines, wall",
    "bigpi 1 machine, sampling",
    "bigpi 2 machines, sampling",
    "bigpi speedup, wall",
    "bigpi speedup, sampling",
]


def test_bench_quick_run_prints_every_figure(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    env = dict(os.environ)
    env.pop("BIGMRUN_SYSTEM", None)  # the benchmarks run on the local system
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--runs", "1", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for row in ROWS:
        matching = [line for line in lines if line.startswith(row)]
        assert matching, f"no row {row!r} in:\n{proc.stdout}"
        # Every row shows a bigmrun figure (a number), whatever its value.
        assert any(ch.isdigit() for ch in matching[0][len(row):]), matching[0]
    assert "% of floor" in proc.stdout and "target" in proc.stdout

    data = json.loads(out_json.read_text())
    assert data["runs"] == 1 and data["quick"] is True
    assert len(data["floor_runs"]) == 1 and len(data["bigmrun_runs"]) == 1
    figures = {r["figure"]: r for r in data["medians"]}
    assert set(ROWS) <= set(figures)
    for key in ("rt_per_s", "pipe_per_s", "bulk_up_mbps", "bulk_down_mbps"):
        assert data["floor_runs"][0][key] > 0
    for key in ("rt_per_s", "pipe_submit_per_s", "pipe_acall_per_s", "bulk_up_mbps",
                "bulk_down_mbps", "startup_s", "bigpi1_wall_s", "bigpi2_wall_s"):
        assert data["bigmrun_runs"][0][key] > 0
