"""A machine killed by the kernel's OOM killer is reported as such (local system).

Real OOM kill: the machine moves itself into a child memory cgroup with a small limit
and allocates past it. Needs root and a writable memory cgroup (v1 or v2).
"""

from __future__ import annotations

import contextlib
import os
import uuid

import pytest
from services_oom import Hog
from sshhost import loopback_ssh

import bigmrun
from bigmrun.backends._oom import _memory_cgroup_dir


def _child_cgroup() -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a memory cgroup")
    parent = _memory_cgroup_dir(os.getpid())
    if parent is None or not os.access(parent, os.W_OK):
        pytest.skip("no writable memory cgroup here")
    d = os.path.join(parent, f"bigmrun-oom-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(d)
    except OSError as e:
        pytest.skip(f"cannot create a memory cgroup: {e}")
    return d


def _remove_cgroup(cg: str) -> None:
    import time

    for _ in range(50):  # the killed process may take a moment to leave it
        try:
            os.rmdir(cg)
            return
        except OSError:
            time.sleep(0.1)


@pytest.mark.timeout(120)
def test_oom_killed_machine_is_stopped_with_an_error_that_says_so():
    cg = _child_cgroup()
    try:
        with bigmrun.start("local", keepalive_timeout=10) as b:
            m, other = b.start(2, services={"H": Hog()})
            with pytest.raises(bigmrun.MachineLostError) as info:
                m.call("H.eat", cg, 96 * 2**20, timeout=60)
            assert m.wait(bigmrun.State.STOPPED, 10) == bigmrun.State.STOPPED
            assert "OOM killer" in str(m.err) and "out of memory" in str(m.err)
            assert getattr(m.err, "oom", False) is True
            assert "OOM killer" in str(info.value)
            # The rest of the cluster is unaffected.
            assert other.call("Supervisor.ping") == "m1"
            # A machine the driver kills itself is not called an OOM kill.
            other.cancel()
            other.wait(bigmrun.State.STOPPED, 10)
    finally:
        _remove_cgroup(cg)


def test_plain_sigkill_is_not_reported_as_oom(tmp_path):
    import signal

    with bigmrun.start("local", keepalive_timeout=10) as b:
        m, = b.start(1, services={"H": Hog()})
        m.wait()
        os.kill(m.handle.proc.pid, signal.SIGKILL)
        assert m.wait(bigmrun.State.STOPPED, 10) == bigmrun.State.STOPPED
        assert "SIGKILL" in str(m.err) and "OOM" not in str(m.err)
        assert getattr(m.err, "oom", None) is False


@pytest.mark.timeout(300)
def test_oom_killed_ssh_machine_is_reported_as_out_of_memory():
    """On a host where the kernel log is closed to the login user (as here), the OOM
    killer's mark is the host's OOM-kill count rising while the machine ran."""
    import pwd

    from bigmrun.backends.ssh import SSHSystem
    from bigmrun.testing.sshd import DEFAULT_USER

    with loopback_ssh("bigmrun-test-oom-ssh-") as ssh:
        cg = _child_cgroup()
        try:
            pw = pwd.getpwnam(DEFAULT_USER)
            for name in os.listdir(cg):  # the login user may move itself in, set the limit
                with contextlib.suppress(OSError):
                    os.chown(os.path.join(cg, name), pw.pw_uid, pw.pw_gid)
            system = SSHSystem(hosts=ssh.server.target, key_filename=ssh.keys.client_key,
                               known_hosts=ssh.known_hosts, procs_per_host=2,
                               keepalive_timeout=20)
            with bigmrun.start(system) as b:
                m, other = b.start(2, services={"H": Hog()})
                for x in (m, other):
                    assert x.wait(bigmrun.State.RUNNING, 300) == bigmrun.State.RUNNING, x.err
                with pytest.raises(bigmrun.BigmrunError):
                    m.call("H.eat", cg, 96 * 2**20, timeout=120)
                assert m.wait(bigmrun.State.STOPPED, 30) == bigmrun.State.STOPPED
                assert "OOM killer" in str(m.err) and "out of memory" in str(m.err), str(m.err)
                assert getattr(m.err, "oom", False) is True
                assert other.call("Supervisor.ping") == "m1"
                # A machine the driver stops is not called an OOM kill, even on this host.
                other.cancel()
                other.wait(bigmrun.State.STOPPED, 30)
                assert "OOM" not in str(other.err)
        finally:
            _remove_cgroup(cg)
