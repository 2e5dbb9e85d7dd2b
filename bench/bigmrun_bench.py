"""The floor's figures through bigmrun, on the local system (one process per machine).

This program is also what its machines run (bigmrun re-runs the driver's program on
each machine): ``bigmrun.start()`` never returns there, so everything after it is the
driver's part. Keep the imports above it light: they count in machine startup.

Figures (one JSON object on stdout, or written with ``--json PATH``):

* ``startup_s``: from ``B.start(4)`` to all 4 machines RUNNING (a fresh session);
* ``rt``: ``m.call`` round trips, one caller, a 64-byte argument: calls/s and µs each,
  to a regular ``def`` method (run in the machine's worker threads); ``rt_async``: the
  same to an ``async def`` method (run on the machine's event loop), for context;
* ``pipe_submit`` / ``pipe_acall``: 64 calls in flight to one machine, calls/s, with
  ``m.submit`` from one thread and with ``await m.acall`` from 64 coroutines on the
  caller's own asyncio loop;
* ``bulk_up``: ``--bulk-mib`` MiB streamed to a machine (an iterator of 1 MiB
  ``bytes`` as the argument; the service reads the file object it gets and counts);
* ``bulk_down``: as many MiB streamed back (the service is a generator yielding 1 MiB
  ``bytes``; the caller iterates and counts); MB/s (MB = 10^6 bytes) each way;
* ``bigpi``: ``examples/bigpi.py -n 4000000`` as a subprocess with ``--nmach 1`` and
  ``--nmach 2``: wall time of the whole program, and the sampling phase it logs
  ("sampling took X s"); speedups (1 machine / 2 machines) of both.

    python bench/bigmrun_bench.py [--duration 1.5] [--bulk-mib 256] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import subprocess
import sys
import time

from _results import emit

import bigmrun

MIB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
BIGPI = os.path.join(os.path.dirname(HERE), "examples", "bigpi.py")


class Bench:
    """The service the benchmark calls."""

    def echo(self, x: bytes) -> bytes:
        return x

    async def aecho(self, x: bytes) -> bytes:
        return x

    def sink(self, f) -> int:  # type: ignore[no-untyped-def]
        """Read a streamed argument to its end; return how many bytes came."""
        n = 0
        while True:
            data = f.read(MIB)
            if not data:
                return n
            n += len(data)

    def source(self, total: int, chunk: int = MIB):  # type: ignore[no-untyped-def]
        """Yield ``total`` bytes in ``chunk``-sized ``bytes`` items."""
        data = os.urandom(chunk)
        sent = 0
        while sent < total:
            n = min(chunk, total - sent)
            yield data if n == chunk else data[:n]
            sent += n


def _running(m: bigmrun.Machine) -> bigmrun.Machine:
    if m.wait(bigmrun.State.RUNNING) != bigmrun.State.RUNNING:
        raise SystemExit(f"machine {m.name} failed to start: {m.err}")
    return m


def bench_machine(b: bigmrun.B) -> bigmrun.Machine:
    """One machine with the Bench service, RUNNING."""
    (m,) = b.start(1, services={"Bench": Bench()})
    return _running(m)


def measure_startup(n: int = 4) -> float:
    """A fresh session: time from B.start(n) to all n machines RUNNING."""
    with bigmrun.start() as b:
        t0 = time.perf_counter()
        machines = b.start(n, services={"Bench": Bench()})
        for m in machines:
            _running(m)
        return time.perf_counter() - t0


def measure_rt(m: bigmrun.Machine, duration: float, method: str = "Bench.echo",
               key: str = "rt") -> dict[str, float]:
    payload = os.urandom(64)
    for _ in range(200):  # warm up
        m.call(method, payload)
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + duration
    while True:
        for _ in range(50):
            reply = m.call(method, payload)
        n += 50
        now = time.perf_counter()
        if now >= deadline:
            break
    assert reply == payload
    elapsed = now - t0
    return {f"{key}_per_s": n / elapsed, f"{key}_us": elapsed / n * 1e6}


def measure_pipe_submit(m: bigmrun.Machine, duration: float, depth: int = 64) -> float:
    payload = os.urandom(64)

    def run(secs: float) -> tuple[int, float]:
        futs: collections.deque = collections.deque(
            m.submit("Bench.echo", payload) for _ in range(depth))
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + secs
        while True:
            for _ in range(depth):
                futs.popleft().result()
                n += 1
                futs.append(m.submit("Bench.echo", payload))
            now = time.perf_counter()
            if now >= deadline:
                break
        for f in futs:
            f.result()
        return n, now - t0

    run(min(0.2, duration))  # warm up
    n, elapsed = run(duration)
    return n / elapsed


def measure_pipe_acall(m: bigmrun.Machine, duration: float, depth: int = 64) -> float:
    payload = os.urandom(64)

    async def run(secs: float) -> tuple[int, float]:
        count = [0]
        stop = [False]

        async def worker() -> None:
            while not stop[0]:
                await m.acall("Bench.echo", payload)
                count[0] += 1

        tasks = [asyncio.ensure_future(worker()) for _ in range(depth)]
        t0 = time.perf_counter()
        await asyncio.sleep(secs)
        n, elapsed = count[0], time.perf_counter() - t0
        stop[0] = True
        await asyncio.gather(*tasks)
        return n, elapsed

    async def main() -> tuple[int, float]:
        await run(min(0.2, duration))  # warm up
        return await run(duration)

    n, elapsed = asyncio.run(main())
    return n / elapsed


def measure_bulk(m: bigmrun.Machine, mib: int) -> dict[str, float]:
    chunk = os.urandom(MIB)
    total = mib * MIB

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(mib):
            yield chunk

    t0 = time.perf_counter()
    got = m.call("Bench.sink", chunks())
    up = time.perf_counter() - t0
    assert got == total, (got, total)
    t0 = time.perf_counter()
    received = 0
    for item in m.call("Bench.source", total):
        received += len(item)
    down = time.perf_counter() - t0
    assert received == total, (received, total)
    return {"bulk_up_mbps": total / up / 1e6, "bulk_down_mbps": total / down / 1e6}


SAMPLING = re.compile(r"sampling took ([0-9.]+)s")


def run_bigpi(nmach: int, samples: int) -> tuple[float, float]:
    """Wall time of the whole bigpi program, and the sampling time it logs."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, BIGPI, "-n", str(samples), "--nmach", str(nmach)],
        capture_output=True, text=True, timeout=300,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bigpi --nmach {nmach} failed ({proc.returncode}):\n{proc.stderr}")
    found = SAMPLING.search(proc.stderr + proc.stdout)
    if found is None or "π = " not in proc.stdout:
        raise SystemExit(f"bigpi --nmach {nmach}: unexpected output:\n{proc.stderr}")
    return wall, float(found.group(1))


def measure_bigpi(samples: int) -> dict[str, float]:
    wall1, samp1 = run_bigpi(1, samples)
    wall2, samp2 = run_bigpi(2, samples)
    return {
        "bigpi1_wall_s": wall1, "bigpi1_sampling_s": samp1,
        "bigpi2_wall_s": wall2, "bigpi2_sampling_s": samp2,
        "bigpi_wall_speedup": wall1 / wall2,
        "bigpi_sampling_speedup": samp1 / samp2 if samp2 > 0 else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=1.5,
                   help="seconds for each call-rate figure (default 1.5)")
    p.add_argument("--bulk-mib", type=int, default=256,
                   help="MiB to stream each way for bulk (default 256)")
    p.add_argument("--bigpi-samples", type=lambda s: int(float(s)), default=4_000_000,
                   help="bigpi samples (default 4e6)")
    p.add_argument("--only", default="",
                   help="comma-separated subset: startup,rt,pipe,bulk,bigpi (default all)")
    p.add_argument("--json", metavar="PATH", help="write the results here (else stdout)")
    args = p.parse_args()
    only = set(filter(None, args.only.split(",")))

    def want(name: str) -> bool:
        return not only or name in only

    results: dict[str, float] = {}
    if want("startup"):
        results["startup_s"] = measure_startup(4)
    if want("rt") or want("pipe") or want("bulk"):
        with bigmrun.start() as b:
            m = bench_machine(b)
            if want("rt"):
                results.update(measure_rt(m, args.duration))
                results.update(measure_rt(m, args.duration, "Bench.aecho", "rt_async"))
            if want("pipe"):
                results["pipe_submit_per_s"] = measure_pipe_submit(m, args.duration)
                results["pipe_acall_per_s"] = measure_pipe_acall(m, args.duration)
            if want("bulk"):
                measure_bulk(m, min(16, args.bulk_mib))  # warm up, as the floor does
                results.update(measure_bulk(m, args.bulk_mib))
    if want("rt"):
        # The same round trips with the local system's pin_cpus (the driver and the
        # machine each bound to a CPU of its own), for context.
        with bigmrun.start("local", pin_cpus=True) as b:
            m = bench_machine(b)
            results.update(measure_rt(m, args.duration, key="rt_pinned"))
            results.update(measure_rt(m, args.duration, "Bench.aecho", "rt_async_pinned"))
    if want("bigpi"):
        results.update(measure_bigpi(args.bigpi_samples))
    emit(results, args.json)


if __name__ == "__main__":
    main()  # on a machine, the first bigmrun.start() in it serves and never returns
