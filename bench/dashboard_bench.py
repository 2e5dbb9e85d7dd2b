"""Overhead of the statistics sampling on a busy machine: bigpi with and without it.

    python bench/dashboard_bench.py                 # 3 runs per mode, -n 6e7, 0.5 s
    python bench/dashboard_bench.py --runs 5 -n 4e7 --interval 0.5 --json out.json

Runs ``examples/bigpi.py --nmach 2`` (CPU-bound sampling on 2 local machines, one core
each) as a fresh driver process per run, in three modes, interleaved and rotated
(A B C, B C A, C A B, ...) so every mode sees the same state of this noisy machine:

* ``off``: ``BIGMRUN_SAMPLE_INTERVAL=0``: the driver never calls ``Supervisor.stats``;
* ``sampling``: the monitor samples every machine every ``--interval`` seconds (a busy
  interval: the default is 2 s);
* ``dashboard``: the same, plus a reader doing what an open dashboard page does at that
  interval: every ``max(1, interval)`` s it fetches ``/api/session``, ``/api/machines``,
  ``/debug/vars`` and ``/api/timeseries?since=...`` with the session's token (and
  ``/metrics``, to report how long each ``Supervisor.stats`` call took on the busy
  machines: mostly waits for the GIL, which the sampling thread holds).

Then, as a figure the noise of this machine barely disturbs, it measures the cost of one
``Supervisor.stats`` call on an idle local machine (200 calls; the time each took on the
machine, from its own RPC statistics) and what that costs per second at the interval.

It prints, per mode, the medians of: the CPU seconds (user + system) of the whole
program, driver and machines (``getrusage(RUSAGE_CHILDREN)``: the driver reaps its
machines); bigpi's own "sampling took" figure; and the program's wall time; and the
overhead of each mode against ``off`` in percent. CPU time is the figure to read on a
shared machine: times swing with whatever else runs, CPU seconds much less. Nothing is
asserted; the per-run figures are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
BIGPI = os.path.join(os.path.dirname(HERE), "examples", "bigpi.py")
SAMPLING = re.compile(r"sampling took ([0-9.]+)s")
MODES = ("off", "sampling", "dashboard")


class DashboardReader(threading.Thread):
    """Polls a session's debug server as the dashboard page does, until stopped."""

    def __init__(self, state_dir: str, every: float, proc: subprocess.Popen[str]) -> None:
        super().__init__(name="dashboard-reader", daemon=True)
        self.state_dir = state_dir
        self.proc = proc
        self.every = every
        self.stop = threading.Event()
        self.fetches = 0
        self.points = 0  # time-series points received
        self.stats_calls = 0.0  # Supervisor.stats calls served, over the machines
        self.stats_seconds = 0.0  # and the time they took there
        self.error: str | None = None

    def _session(self) -> dict[str, Any] | None:
        d = os.path.join(self.state_dir, "sessions")
        try:
            names = [n for n in os.listdir(d) if n.endswith(".json")]
        except OSError:
            return None
        for n in names:
            try:
                with open(os.path.join(d, n)) as f:
                    info: dict[str, Any] = json.load(f)
                return info
            except (OSError, ValueError):
                continue
        return None

    def run(self) -> None:
        import requests

        info = None
        while info is None and not self.stop.wait(0.05):
            info = self._session()
        if info is None:
            return
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {info['token']}"
        since = 0.0
        while not self.stop.is_set():
            try:
                for path in ("/api/session", "/api/machines", "/debug/vars"):
                    http.get(info["url"] + path, timeout=5).raise_for_status()
                    self.fetches += 1
                r = http.get(info["url"] + "/api/timeseries", params={"since": since},
                             timeout=5)
                r.raise_for_status()
                self.fetches += 1
                for per in r.json()["series"].values():
                    for pts in per.values():
                        self.points += len(pts)
                        if pts:
                            since = max(since, pts[-1][0])
                self._stats_cost(http.get(info["url"] + "/metrics", timeout=5).text)
            except Exception as e:  # the driver is shutting down: stop quietly
                time.sleep(0.5)
                if not self.stop.is_set() and self.proc.poll() is None:
                    self.error = f"{type(e).__name__}: {e}"
                return
            self.stop.wait(self.every)

    def _stats_cost(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        calls = secs = 0.0
        for fam in text_string_to_metric_families(text):
            if fam.name != "bigmrun_rpc_latency_seconds":
                continue
            for s in fam.samples:
                if s.labels.get("method") != "Supervisor.stats":
                    continue
                if s.name.endswith("_count"):
                    calls += s.value
                elif s.name.endswith("_sum"):
                    secs += s.value
        if calls >= self.stats_calls:
            self.stats_calls, self.stats_seconds = calls, secs


def run_once(mode: str, samples: int, interval: float) -> dict[str, float]:
    env = dict(os.environ)
    env.pop("BIGMRUN_SYSTEM", None)  # local processes
    env["BIGMRUN_SAMPLE_INTERVAL"] = "0" if mode == "off" else str(interval)
    with tempfile.TemporaryDirectory(prefix="bigmrun-dashbench-") as state:
        env["BIGMRUN_STATE_DIR"] = state
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, BIGPI, "-n", str(samples), "--nmach", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        reader = None
        if mode == "dashboard":
            reader = DashboardReader(state, max(1.0, interval), proc)
            reader.start()
        try:
            out, err = proc.communicate(timeout=600)
        finally:
            if reader is not None:
                reader.stop.set()
                reader.join(timeout=10)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"bigpi ({mode}) failed ({proc.returncode}):\n{err}")
    found = SAMPLING.search(err + out)
    if found is None or "π = " not in out:
        raise SystemExit(f"bigpi ({mode}): unexpected output:\n{err}")
    result = {"wall_s": wall, "sampling_s": float(found.group(1)), "cpu_s": cpu}
    if reader is not None:
        if reader.error:
            print(f"  dashboard reader: {reader.error}", file=sys.stderr)
        result["fetches"] = float(reader.fetches)
        result["points"] = float(reader.points)
        result["stats_calls"] = reader.stats_calls
        result["stats_ms"] = (1000 * reader.stats_seconds / reader.stats_calls
                              if reader.stats_calls else float("nan"))
    return result


def stats_cost_main(calls: int = 200) -> None:
    """``--stats-cost``: print the milliseconds one ``Supervisor.stats`` call takes on an
    idle local machine. A program of its own: machines run it too (``bigmrun.start()``
    comes first, and there never returns)."""
    import bigmrun

    with bigmrun.start("local") as b:
        (m,) = b.start(1)
        m.wait(bigmrun.State.RUNNING, timeout=60)
        if m.err is not None:
            raise SystemExit(f"machine failed: {m.err}")
        m.call("Supervisor.stats")  # the first call primes psutil
        before = m.call("Supervisor.stats")["rpc"]["Supervisor.stats"]
        for _ in range(calls):
            m.call("Supervisor.stats")
        after = m.call("Supervisor.stats")["rpc"]["Supervisor.stats"]
    n = after["calls"] - before["calls"] - 1  # the last one had not finished yet
    print(json.dumps({"stats_ms": 1000 * (after["latency_sum"] - before["latency_sum"]) / n}))


def measure_stats_cost() -> float:
    env = dict(os.environ, BIGMRUN_SAMPLE_INTERVAL="0", BIGMRUN_DEBUG_SERVER="0")
    env.pop("BIGMRUN_SYSTEM", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--stats-cost"],
                          capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"--stats-cost failed ({proc.returncode}):\n{proc.stderr}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["stats_ms"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", type=int, default=3, help="runs per mode (default 3)")
    p.add_argument("-n", type=lambda s: int(float(s)), default=60_000_000,
                   help="bigpi samples over the 2 machines (default 6e7: ~10 s here)")
    p.add_argument("--interval", type=float, default=0.5,
                   help="sampling interval of the 'on' modes in seconds (default 0.5)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--stats-cost", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stats_cost:
        stats_cost_main()
        return

    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for i in range(args.runs):
        # Rotate the order each round (A B C, B C A, C A B ...): no mode always runs first.
        for mode in MODES[i % len(MODES):] + MODES[:i % len(MODES)]:
            r = run_once(mode, args.n, args.interval)
            results[mode].append(r)
            extra = (f", dashboard fetches {r['fetches']:.0f}, points {r['points']:.0f}, "
                     f"stats calls {r['stats_calls']:.0f} at {r['stats_ms']:.2f} ms"
                     if "fetches" in r else "")
            print(f"  run {i + 1} {mode:9s} cpu {r['cpu_s']:6.2f}s  sampling "
                  f"{r['sampling_s']:6.2f}s  wall {r['wall_s']:6.2f}s{extra}",
                  file=sys.stderr, flush=True)

    keys = ("cpu_s", "sampling_s", "wall_s")
    med = {m: {k: statistics.median(r[k] for r in results[m]) for k in keys} for m in MODES}
    base = med["off"]
    print(f"\nbigpi -n {args.n:.0e} on 2 local machines, median of {args.runs} runs per mode "
          f"(interleaved, rotated), sampling interval {args.interval:g} s")
    print(f"{'mode':<11}" + "".join(f"{h:>10}{'overhead':>10}"
                                    for h in ("cpu", "sampling", "wall")))
    summary: dict[str, Any] = {"samples": args.n, "runs": args.runs,
                               "interval": args.interval, "modes": {}}
    for m in MODES:
        row = f"{m:<11}"
        summary["modes"][m] = {"runs": results[m]}
        for k in keys:
            v = med[m][k]
            pct = 100 * (v / base[k] - 1)
            row += f"{v:>9.2f}s{pct:>+9.1f}%"
            summary["modes"][m][k] = v
            summary["modes"][m][k.replace("_s", "_overhead_pct")] = pct
        print(row)
    stats_ms = [r["stats_ms"] for r in results["dashboard"] if r["stats_ms"] == r["stats_ms"]]
    if stats_ms:
        busy = statistics.median(stats_ms)
        print(f"Supervisor.stats latency on the busy machines: median {busy:.1f} ms "
              f"(mostly waiting for the GIL)")
        summary["stats_busy_latency_ms"] = busy
    idle = measure_stats_cost()
    duty = 100 * idle / 1000 / args.interval
    print(f"Supervisor.stats cost on an idle machine: {idle:.2f} ms per call, i.e. "
          f"{duty:.2f}% of one core at a {args.interval:g} s interval "
          f"({100 * idle / 1000 / 2:.2f}% at the default 2 s)")
    summary["stats_idle_ms"] = idle
    summary["stats_duty_pct"] = duty
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
