"""Telling an out-of-memory kill from any other SIGKILL.

The kernel's OOM killer ends a process with SIGKILL, which on its own looks like any
other kill. Two witnesses tell them apart: the kernel log ("Killed process PID (...)",
readable with ``dmesg`` where the user may read it), and the memory cgroup's OOM-kill
counter (cgroup v2 ``memory.events`` or v1 ``memory.oom_control``), which rises when
the OOM killer strikes inside the cgroup. Either is enough; neither is needed.
"""

from __future__ import annotations

import os
import re
import subprocess


def _memory_cgroup_dir(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            d = f"/sys/fs/cgroup/memory{path}"
            if os.path.isdir(d):
                return d
    for line in lines:
        if line.startswith("0::"):
            d = "/sys/fs/cgroup" + line[3:]
            if os.path.exists(os.path.join(d, "memory.events")):
                return d
    return None


def oom_kill_count(pid: int) -> tuple[str, int] | None:
    """(cgroup dir, OOM kills so far) for ``pid``'s memory cgroup, if readable."""
    d = _memory_cgroup_dir(pid)
    if d is None:
        return None
    n = _count_in(d)
    return None if n is None else (d, n)


def _count_in(d: str) -> int | None:
    """The ``oom_kill`` counter of memory cgroup ``d`` (v2 or v1), if readable."""
    for name in ("memory.events", "memory.oom_control"):
        try:
            with open(os.path.join(d, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def kernel_log_says_oom(pid: int) -> bool | None:
    """True/False from the kernel log; None when the log cannot be read."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return re.search(rf"[Kk]illed process {pid} \(", out.stdout) is not None


def was_oom_killed(pid: int, baseline: tuple[str, int] | None) -> bool:
    """Whether the SIGKILLed process ``pid`` was killed by the OOM killer.

    The kernel log names the process, so it decides when it can be read; the cgroup
    counter (which any process of the cgroup can raise) is only a fallback.
    """
    said = kernel_log_says_oom(pid)
    if said is not None:
        return said
    if baseline is not None:
        now = _count_in(baseline[0])
        if now is not None and now > baseline[1]:
            return True
    return False
