"""A real OpenSSH server on loopback for one test, with its own host-side bigmrun cache."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from bigmrun.testing.sshd import DEFAULT_USER, Keys, SSHServer, Unavailable, check_available


@dataclass
class LoopbackSSH:
    server: SSHServer
    keys: Keys
    known_hosts: str  # a known_hosts file holding the server's key
    cache: str  # the host's bigmrun cache (BIGMRUN_CACHE for the login user)
    base: str  # a private scratch directory, removed afterwards


@contextlib.contextmanager
def loopback_ssh(prefix: str = "bigmrun-test-ssh-") -> Iterator[LoopbackSSH]:
    """Start sshd on 127.0.0.1 (skip the test where it cannot run); tear it all down,
    killing whatever still runs from the host cache."""
    try:
        check_available()
    except Unavailable as e:
        pytest.skip(f"real OpenSSH server unavailable here: {e}")
    keys = Keys.make()
    base = tempfile.mkdtemp(prefix=prefix, dir="/dev/shm" if os.path.isdir("/dev/shm")
                            else None)
    os.chmod(base, 0o755)
    cache = os.path.join(base, "hostcache")
    os.makedirs(cache)
    server = SSHServer(keys, env={"BIGMRUN_CACHE": cache})
    try:
        server.start()  # creates the login user if needed
        pw = pwd.getpwnam(DEFAULT_USER)
        os.chown(cache, pw.pw_uid, pw.pw_gid)
        known = os.path.join(keys.dir, "known_hosts")
        with open(known, "w") as f:
            f.write(server.known_hosts_line())
        yield LoopbackSSH(server, keys, known, cache, base)
    finally:
        server.stop()
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if p.pid != os.getpid() and cache in " ".join(p.info["cmdline"] or ()):
                    p.kill()
        shutil.rmtree(base, ignore_errors=True)
        keys.cleanup()

