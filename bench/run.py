"""Run every benchmark, floor and bigmrun interleaved (A B A B ...), and print medians.

    python bench/run.py                  # 5 runs of each (make bench)
    python bench/run.py --runs 3 --json results.json
    python bench/run.py --quick --runs 1 # smoke run: small sizes, a few seconds

Each run of ``floor.py`` (A) and of ``bigmrun_bench.py`` (B) is a fresh process (the
floor starts its own server process; bigmrun starts its own machines), run one after
the other so both see the same state of this noisy machine. The table shows the median
of each figure over the runs, bigmrun as a percentage of the floor, and the target the
issue sets. Nothing here asserts a timing: a missed target is printed, not raised.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))

# (label, floor key, bigmrun key, unit, target kind, target value, format)
# target kinds: "pct" = bigmrun at least this % of the floor; "lt" = bigmrun below the
# value; "ge" = bigmrun at least the value; None = shown for context only.
ROWS: list[tuple[str, str | None, str | None, str, str | None, float, str]] = [
    ("round trips, 1 caller, 64 B", "rt_per_s", "rt_per_s", "calls/s", "pct", 60, ",.0f"),
    ("round trip latency", "rt_us", "rt_us", "µs", None, 0, ",.0f"),
    ("round trips, async def method", "rt_per_s", "rt_async_per_s", "calls/s", None, 0,
     ",.0f"),
    ("round trips, --pin-cpus", "rt_per_s", "rt_pinned_per_s", "calls/s", None, 0, ",.0f"),
    ("round trips, async def, --pin-cpus", "rt_per_s", "rt_async_pinned_per_s", "calls/s",
     None, 0, ",.0f"),
    ("64 in flight, submit", "pipe_per_s", "pipe_submit_per_s", "calls/s", "pct", 25, ",.0f"),
    ("64 in flight, acall", "pipe_per_s", "pipe_acall_per_s", "calls/s", "pct", 25, ",.0f"),
    ("bulk to machine", "bulk_up_mbps", "bulk_up_mbps", "MB/s", "pct", 50, ",.0f"),
    ("bulk from machine", "bulk_down_mbps", "bulk_down_mbps", "MB/s", "pct", 50, ",.0f"),
    ("startup of 4 machines", None, "startup_s", "s", "lt", 1.0, ".3f"),
    ("bigpi 1 machine, wall", None, "bigpi1_wall_s", "s", None, 0, ".2f"),
    ("bigpi 2 machines, wall", None, "bigpi2_wall_s", "s", None, 0, ".2f"),
    ("bigpi 1 machine, sampling", None, "bigpi1_sampling_s", "s", None, 0, ".2f"),
    ("bigpi 2 machines, sampling", None, "bigpi2_sampling_s", "s", None, 0, ".2f"),
    ("bigpi speedup, wall", None, "bigpi_wall_speedup", "x", "ge", 1.7, ".2f"),
    ("bigpi speedup, sampling", None, "bigpi_sampling_speedup", "x", "ge", 1.7, ".2f"),
]


def run_one(script: str, extra: list[str], label: str) -> dict[str, float]:
    fd, path = tempfile.mkstemp(prefix="bigmrun-bench-", suffix=".json")
    os.close(fd)
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, script), *extra, "--json", path],
            capture_output=True, text=True, timeout=600,
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"{label} failed with exit status {proc.returncode}")
        with open(path) as f:
            result: dict[str, float] = json.load(f)
        print(f"  {label}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        return result
    finally:
        os.unlink(path)


def _cpu_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return sum(fields), fields[3] + fields[4]  # total, idle + iowait


def busy_percent(seconds: float = 1.0) -> float | None:
    """CPU busy % of the whole machine over ``seconds`` (None where /proc is absent)."""
    try:
        t1, i1 = _cpu_ticks()
        time.sleep(seconds)
        t2, i2 = _cpu_ticks()
    except OSError:
        return None
    return 100.0 * (1 - (i2 - i1) / max(1, t2 - t1))


def wait_idle(limit: float, threshold: float = 10.0) -> float | None:
    """Wait (up to ``limit`` s) until the machine is idle; return the last busy %."""
    deadline = time.monotonic() + limit
    while True:
        busy = busy_percent()
        if busy is None or busy < threshold or time.monotonic() >= deadline:
            return busy
        print(f"  machine busy ({busy:.0f}% CPU): waiting", file=sys.stderr, flush=True)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def build_table(floor: list[dict[str, float]], bigm: list[dict[str, float]]) -> tuple[
        list[dict[str, Any]], str]:
    rows = []
    for label, fkey, bkey, unit, kind, target, fmt in ROWS:
        f = median([r[fkey] for r in floor if fkey in r]) if fkey else None
        b = median([r[bkey] for r in bigm if bkey in r]) if bkey else None
        pct = 100.0 * b / f if f and b is not None and unit != "µs" else None
        bvals = [r[bkey] for r in bigm if bkey and bkey in r]
        spread = (f"{format(min(bvals), fmt)} to {format(max(bvals), fmt)}"
                  if len(bvals) > 1 else "")
        met: bool | None = None
        if kind == "pct" and pct is not None:
            met = pct >= target
            target_s = f"≥ {target:g}% of floor"
        elif kind == "lt" and b is not None:
            met = b < target
            target_s = f"< {target:g} {unit}"
        elif kind == "ge" and b is not None:
            met = b >= target
            target_s = f"≥ {target:g}{unit}"
        else:
            target_s = ""
        rows.append({"figure": label, "unit": unit, "floor": f, "bigmrun": b,
                     "pct_of_floor": pct, "target": target_s, "met": met,
                     "bigmrun_range": spread, "fmt": fmt})
    head = ("figure", "unit", "floor", "bigmrun", "% of floor", "target", "met",
            "bigmrun range")
    cells = [head]
    for r in rows:
        fmt = r["fmt"]
        cells.append((
            r["figure"], r["unit"],
            "" if r["floor"] is None else format(r["floor"], fmt),
            "" if r["bigmrun"] is None else format(r["bigmrun"], fmt),
            "" if r["pct_of_floor"] is None else f"{r['pct_of_floor']:.1f}%",
            r["target"],
            "" if r["met"] is None else ("yes" if r["met"] else "NO"),
            r["bigmrun_range"],
        ))
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    right = {2, 3, 4}
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(
            c[i].rjust(widths[i]) if i in right else c[i].ljust(widths[i])
            for i in range(len(head))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        del r["fmt"]
    return rows, "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs of each side (default 5)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: short durations and small sizes (figures not meaningful)")
    p.add_argument("--json", metavar="PATH", help="also write every run and the medians here")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECS",
                   help="before each floor/bigmrun pair, wait up to SECS for the machine "
                        "to be idle (under 10%% CPU busy); default 0: do not wait")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.quick:
        floor_args = ["--duration", "0.3", "--bulk-mib", "16"]
        bigm_args = [*floor_args, "--bigpi-samples", "200000"]
    else:
        floor_args = ["--duration", "1.5", "--bulk-mib", "256"]
        bigm_args = [*floor_args, "--bigpi-samples", "4000000"]

    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    floor: list[dict[str, float]] = []
    bigm: list[dict[str, float]] = []
    busy: list[float] = []
    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}", file=sys.stderr, flush=True)
        b = wait_idle(args.wait_idle) if args.wait_idle > 0 else busy_percent()
        if b is not None:
            busy.append(b)
        floor.append(run_one("floor.py", floor_args, "floor"))
        bigm.append(run_one("bigmrun_bench.py", bigm_args, "bigmrun"))
    elapsed = time.perf_counter() - t0

    rows, table = build_table(floor, bigm)
    cmd = "python bench/run.py " + " ".join(sys.argv[1:])
    print(f"\nbigmrun benchmarks: medians of {args.runs} run(s) each, floor and bigmrun "
          f"interleaved{' (QUICK: sizes too small to mean anything)' if args.quick else ''}")
    print(f"{started:%Y-%m-%d %H:%M %Z}, {platform.python_implementation()} "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, {elapsed:.0f}s; "
          f"command: {cmd.strip()}\n")
    print(table)
    load_after = os.getloadavg()
    idle_note = (f"; CPU busy before each pair: {', '.join(f'{b:.0f}%' for b in busy)}"
                 if busy else "")
    print(f"\nload average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}"
          f"{idle_note}.\nOther work on this machine skews these figures (it favours "
          "bigmrun's extra threads over the floor's one): quote only idle runs.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": started.isoformat(), "command": cmd.strip(),
                       "runs": args.runs, "quick": args.quick,
                       "python": platform.python_version(), "cpus": os.cpu_count(),
                       "loadavg_before": load_before, "loadavg_after": load_after,
                       "busy_percent_before_each_pair": busy,
                       "floor_runs": floor, "bigmrun_runs": bigm, "medians": rows},
                      f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
