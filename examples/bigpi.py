"""bigpi: estimate π by sampling random points, spread over machines.

The walkthrough program of Bigmachine, in Python. Each machine samples points in the
unit square and counts those inside the circle of diameter 1; the driver sums the
counts: π ≈ 4·inside/samples, printed with the precision the sample count warrants.

    python examples/bigpi.py -n 4000000 --nmach 2          # local processes
    bigmrun --system ssh --nmach 3 examples/bigpi.py -n 1e8  # through the launcher

One call per machine: a Python process computes on one core at a time (the GIL), so
the parallelism comes from machines, not from threads inside one.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from decimal import Decimal, localcontext

import bigmrun

log = logging.getLogger("bigpi")

PROGRESS_EVERY = 1_000_000


class CirclePI:
    """The service: samples points and counts those inside the circle."""

    def sample(self, n: int) -> int:
        """Sample ``n`` points in the unit square; return how many fall in the circle."""
        r = random.Random().random  # seeded from the OS: each machine draws its own
        inside = 0
        done = 0
        while done < n:
            if done % PROGRESS_EVERY == 0:
                log.info("%d/%d", done, n)
            k = min(PROGRESS_EVERY, n - done)
            for _ in range(k):
                x = r() - 0.5
                y = r() - 0.5
                if x * x + y * y < 0.25:
                    inside += 1
            done += k
        return inside


def estimate(total: int, nsamples: int) -> str:
    """4·total/nsamples with as many decimals as the sample count warrants."""
    prec = max(1, len(str(nsamples)) - 1)  # ⌊log10 n⌋ digits, as in the Go original
    with localcontext() as ctx:
        ctx.prec = prec + 10
        value = Decimal(4 * total) / Decimal(nsamples)
        return str(value.quantize(Decimal(1).scaleb(-prec)))


def main() -> None:
    parser = argparse.ArgumentParser(description="Estimate π across bigmrun machines.")
    parser.add_argument("-n", type=lambda s: int(float(s)), default=10_000_000,
                        help="number of samples to make (default 1e7; '1e8' works)")
    parser.add_argument("--nmach", type=int, default=None,
                        help="number of machines (default: the launcher's --nmach, or 2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    b = bigmrun.start()  # on a machine, this never returns
    with b:
        nmach = args.nmach or (None if "BIGMRUN_NMACH" in __import__("os").environ else 2)
        machines = b.start(nmach, services={"PI": CirclePI()})
        log.info("waiting for machines to come online")
        for m in machines:
            m.wait(bigmrun.State.RUNNING)
            log.info("machine %s %s %s", m.name, m.addr, m.state)
            if m.err is not None:
                raise SystemExit(f"machine {m.name} failed: {m.err}")
        log.info("all machines are ready")

        # Scatter: an equal share per machine (the remainder goes to the first ones).
        share, extra = divmod(args.n, len(machines))
        t0 = time.perf_counter()
        futures = [m.submit("PI.sample", share + (i < extra)) for i, m in enumerate(machines)]
        log.info("distributing work among %d machines", len(machines))
        # Gather.
        total = sum(f.result() for f in futures)
        elapsed = time.perf_counter() - t0
        log.info("total=%d nsamples=%d sampling took %.2fs", total, args.n, elapsed)
        print(f"π = {estimate(total, args.n)}")


if __name__ == "__main__":
    main()
