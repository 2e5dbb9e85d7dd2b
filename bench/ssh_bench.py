"""SSH system start-up: first run (upload and extract) against second run (cache hit),
and packaging time for this project's own virtualenv. Prints a table; asserts nothing.

    sudo .venv/bin/python bench/ssh_bench.py    # 3 runs of each: 2-4 min here
    sudo .venv/bin/python bench/ssh_bench.py --runs 5 --json /tmp/ssh_bench.json

Needs root, openssh-server and iproute2: the three "hosts" are network namespaces on a
private bridge (``bigmrun.testing.sshd.NetnsHosts``: 10.77.0.11-13, or the first free
10.77.N.0/24 if something else uses that one), each with its own
sshd and its own bigmrun cache directory on this machine's disk (/tmp), so a host's
first run pays what a real host pays: the SFTP upload of the package and its extraction.

What is measured (medians over ``--runs``, each run a fresh ``B`` and fresh SSH logins):

* **3 machines to RUNNING, first run**: every host's cache emptied first; from
  ``bigmrun.start(SSHSystem(...))`` until ``B.start(3)``'s machines are all RUNNING
  (login, probe, interpreter check, upload, boot record, launch, extraction, TLS
  connect, service install). ``SSHSystem.uploaded_bytes`` is reported.
* **3 machines to RUNNING, second run**: right after, the same again with the caches
  kept: nothing may be uploaded (0 bytes) and the issue's target is 3x faster at least.
* **packaging, first**: ``build_for`` of the machine program with this virtualenv into an
  empty package cache (``BIGMRUN_CACHE`` pointed at a fresh directory).
* **packaging, cached**: the same build again with that cache (nothing changed).

The package is built before the start-up runs are timed (a cached build, shown apart),
so the start-up figures are about SSH, upload and extraction alone. The order is
interleaved (first, second, first, second...) so both see the same machine state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

MAIN = '''\
"""The benchmark's machine program: on a machine, bigmrun.start() serves forever."""
import bigmrun

bigmrun.start()
'''


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n else "0 B"


def _leftovers(fragment: str) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if p.info["status"] != psutil.STATUS_ZOMBIE and \
                    fragment in " ".join(p.info["cmdline"] or ()):
                pids.append(p.pid)
    return pids


def _wait_clean(fragment: str, timeout: float = 30.0) -> None:
    """Wait (bounded) until no process mentions the hosts' caches; kill stragglers."""
    deadline = time.monotonic() + timeout
    while _leftovers(fragment) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in _leftovers(fragment):
        with contextlib.suppress(OSError):
            os.kill(pid, 9)


def free_subnet() -> str:
    """``10.77.0`` unless an interface here uses it (a test run, say): then a free one."""
    import subprocess

    used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                          timeout=10).stdout
    for n in range(100):
        if f" 10.77.{n}." not in used:
            return f"10.77.{n}"
    raise SystemExit("ssh_bench.py: no free 10.77.N.0/24 subnet for the namespace hosts")


def bring_up(hosts: Any, known_hosts: str, program: Any, package: Any) -> tuple[float, int]:
    """Seconds until 3 machines (one per host) are RUNNING, and bytes uploaded."""
    import bigmrun
    from bigmrun.backends.ssh import SSHSystem

    t0 = time.perf_counter()
    system = SSHSystem(hosts=hosts.targets(), key_filename=hosts.keys.client_key,
                       known_hosts=known_hosts, ssh_config=os.devnull, procs_per_host=1,
                       program=program, package=package)
    b = bigmrun.start(system)
    try:
        ms = b.start(3)
        for m in ms:
            if m.wait(bigmrun.State.RUNNING, timeout=300) != bigmrun.State.RUNNING:
                raise SystemExit(f"machine {m.name} did not start: {m.err}")
        elapsed = time.perf_counter() - t0
        hosts_seen = sorted(m.addr.rsplit(":", 1)[0] for m in ms)
        assert hosts_seen == [hosts.addr(k) for k in range(3)], hosts_seen
    finally:
        b.shutdown()
    return elapsed, system.uploaded_bytes


def packaging(program: Any, runs: int) -> tuple[list[float], list[float], int]:
    from bigmrun.bootstrap.package import build_for

    first, cached = [], []
    size = 0
    for _ in range(runs):
        d = tempfile.mkdtemp(prefix="bigmrun-bench-pkgcache-")
        try:
            t0 = time.perf_counter()
            pkg = build_for(program, cache_dir=d)
            first.append(time.perf_counter() - t0)
            assert pkg.cache_hit is None, pkg.cache_hit
            t0 = time.perf_counter()
            again = build_for(program, cache_dir=d)
            cached.append(time.perf_counter() - t0)
            assert again.digest == pkg.digest and again.cache_hit, again.cache_hit
            size = pkg.size
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return first, cached, size


def main() -> int:
    parser = argparse.ArgumentParser(description="SSH system start-up and packaging times.")
    parser.add_argument("--runs", type=int, default=3, help="runs of each figure (default 3)")
    parser.add_argument("--json", help="also write the raw figures and medians here")
    args = parser.parse_args()

    from bigmrun.testing.sshd import NetnsHosts, Unavailable, check_available

    try:
        check_available(netns=True)
    except Unavailable as e:
        print(f"ssh_bench.py: cannot run here: it {e}; it runs only as root, with "
              "openssh-server and iproute2 (network namespaces as hosts)", file=sys.stderr)
        return 2

    import logging
    import warnings

    from bigmrun.bootstrap.package import PackageSizeWarning, build_for
    from bigmrun.bootstrap.program import Program

    logging.getLogger("bigmrun").setLevel(logging.WARNING)
    warnings.simplefilter("ignore", PackageSizeWarning)
    work = tempfile.mkdtemp(prefix="bigmrun-ssh-bench-")
    os.environ["BIGMRUN_CACHE"] = os.path.join(work, "driver-cache")  # not the user's
    prog_dir = os.path.join(work, "prog")
    os.makedirs(prog_dir)
    with open(os.path.join(prog_dir, "main.py"), "w") as f:
        f.write(MAIN)
    program = Program([sys.executable, os.path.join(prog_dir, "main.py")], False, [])
    results: dict[str, Any] = {"runs": args.runs}
    try:
        print(f"packaging {sys.prefix} ({args.runs} runs)...", file=sys.stderr, flush=True)
        pf, pc, size = packaging(program, args.runs)
        results.update(package_first_s=pf, package_cached_s=pc, package_bytes=size)

        package = build_for(program)
        t0 = time.perf_counter()
        package = build_for(program)
        results["package_prebuilt_cached_s"] = time.perf_counter() - t0
        first: list[float] = []
        second: list[float] = []
        up_first: list[int] = []
        up_second: list[int] = []
        with NetnsHosts(3, subnet=free_subnet()) as hosts:
            known = os.path.join(work, "known_hosts")
            with open(known, "w") as f:
                f.write(hosts.known_hosts())
            caches = [f"/tmp/bigmrun-host-{hosts.tag}-{k}" for k in range(3)]
            fragment = f"/tmp/bigmrun-host-{hosts.tag}-"
            for i in range(args.runs):
                for c in caches:  # a first run: every host's cache is empty
                    shutil.rmtree(c, ignore_errors=True)
                os.sync()
                t, n = bring_up(hosts, known, program, package)
                first.append(t)
                up_first.append(n)
                _wait_clean(fragment)
                t, n = bring_up(hosts, known, program, package)
                second.append(t)
                up_second.append(n)
                _wait_clean(fragment)
                print(f"  run {i + 1}: first {first[-1]:.2f}s ({_mb(up_first[-1])}), "
                      f"second {second[-1]:.2f}s ({_mb(up_second[-1])})", file=sys.stderr,
                      flush=True)
            for c in caches:
                shutil.rmtree(c, ignore_errors=True)
        results.update(ssh_first_s=first, ssh_second_s=second,
                       ssh_first_uploaded_bytes=up_first, ssh_second_uploaded_bytes=up_second)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    medians = {
        "ssh_first_s": med(first), "ssh_second_s": med(second),
        "ssh_first_uploaded_bytes": med(up_first), "ssh_second_uploaded_bytes": max(up_second),
        "ssh_speedup": med(first) / med(second),
        "package_first_s": med(pf), "package_cached_s": med(pc), "package_bytes": size,
    }
    results["medians"] = medians

    def span(xs: list[float]) -> str:
        return f"{min(xs):.2f}-{max(xs):.2f}"

    rows = [
        ("3 SSH machines to RUNNING, first run", f"{med(first):.2f} s", span(first),
         _mb(med(up_first)), ""),
        ("3 SSH machines to RUNNING, second run", f"{med(second):.2f} s", span(second),
         _mb(max(up_second)), "0 B: " + ("yes" if max(up_second) == 0 else "NO")),
        ("second run speedup", f"{medians['ssh_speedup']:.1f}x", "", "",
         ">= 3x: " + ("yes" if medians["ssh_speedup"] >= 3 else "NO")),
        ("packaging own venv, empty cache", f"{med(pf):.2f} s", span(pf), _mb(size), ""),
        ("packaging own venv, cached", f"{med(pc):.3f} s", span(pc), "", ""),
    ]
    head = ("figure", f"median of {args.runs}", "range (s)", "uploaded / size", "target")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    print(f"ssh_bench: 3 machines, one per network-namespace host (sshd each), package "
          f"{_mb(size)} (program + {sys.prefix}); Python {sys.version.split()[0]}")
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
