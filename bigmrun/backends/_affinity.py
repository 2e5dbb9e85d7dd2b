"""CPU pinning for the local system (``pin_cpus``).

A call hands work between threads of one process (event loop → worker thread on a
machine, event loop → calling thread on the driver). When the two threads sit on
different CPUs, each hand-off wakes an idle CPU, which on virtual machines costs tens of
microseconds. Binding every thread of a process to one CPU makes those hand-offs local;
the GIL already lets only one of them run Python at a time. The price: a pinned process
cannot run native code (numpy, compression) on several CPUs at once, which is why this
is an option, not the default.

Plan: of the CPUs this process may use, the driver keeps the first; machine ``k`` gets
CPU ``k + 1`` (round robin over all of them, so with more machines than CPUs they share
evenly and the driver's CPU takes its turn).
"""

from __future__ import annotations

import os

from ..errors import ConfigError


def available_cpus() -> list[int]:
    """The CPUs this process may run on (empty where the OS cannot pin)."""
    getter = getattr(os, "sched_getaffinity", None)
    return sorted(getter(0)) if getter is not None else []


def machine_cpu(cpus: list[int], k: int) -> int:
    """The CPU of the ``k``-th machine (0-based) started by this driver."""
    return cpus[(k + 1) % len(cpus)]


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def pin_process(cpus: set[int]) -> dict[int, set[int]]:
    """Bind every thread of this process to ``cpus`` (threads started later inherit it
    from their creator). Returns what each thread had, for :func:`restore`."""
    old: dict[int, set[int]] = {}
    for tid in _threads():
        try:
            old[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended meanwhile
            continue
    return old


def restore(old: dict[int, set[int]]) -> None:
    """Give every thread back the CPUs :func:`pin_process` took from it; threads started
    since get the CPUs the first thread had."""
    default = next(iter(old.values()), None)
    for tid in _threads():
        cpus = old.get(tid, default)
        if cpus is None:
            continue
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            continue


def pin_option(value: bool | None) -> bool:
    """The ``pin_cpus`` option: the argument, else ``$BIGMRUN_PIN_CPUS``, else off."""
    if value is not None:
        return bool(value)
    raw = os.environ.get("BIGMRUN_PIN_CPUS", "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"BIGMRUN_PIN_CPUS={raw!r}: use 1 or 0 (true/false, yes/no, on/off)")
