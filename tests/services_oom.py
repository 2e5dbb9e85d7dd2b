"""A service that gets itself OOM-killed inside a memory-limited cgroup (tests only)."""

from __future__ import annotations

import os


class Hog:
    def eat(self, cgroup_dir: str, limit: int) -> int:
        """Move this machine into ``cgroup_dir`` (limit ``limit`` bytes) and overrun it."""
        v2 = os.path.exists(os.path.join(os.path.dirname(cgroup_dir), "cgroup.controllers"))
        limit_file = "memory.max" if v2 else "memory.limit_in_bytes"
        with open(os.path.join(cgroup_dir, limit_file), "w") as f:
            f.write(str(limit))
        with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        hoard = [bytearray(16 * 2**20) for _ in range(8 * limit // (16 * 2**20))]
        return len(hoard)
