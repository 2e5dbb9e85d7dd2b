"""The SSH system against real OpenSSH servers: on loopback and on three hosts in
network namespaces (10.77.0.11-13, or another free 10.77.N.0/24 if a parallel run holds
that one; each host with its own sshd and its own bigmrun cache).

Needs root, ``/usr/sbin/sshd`` and ``ip`` (see TESTING.md); skipped with the reason
otherwise. The servers are module-scoped (one loopback sshd, one set of namespace
hosts): a host's first package upload and extraction costs seconds, later machines
reuse them. The driver's package cache is a private directory for this module, so the
tests neither read nor fill the user's own cache.

Machines started in-process (``SSHSystem`` used directly, for its observables:
``uploaded_bytes``, ``B._ca``) run a tiny program, ``main.py`` beside the ``sshsvc``
service module, written by the ``prog`` fixture. Launcher tests run ``bigmrun`` (or
``python -m bigmrun``) as a subprocess. Every wait is bounded; nothing asserts a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import pwd
import random
import re
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import wait_until

import bigmrun
from bigmrun import State
from bigmrun.backends.ssh import SSHSystem
from bigmrun.bootstrap.program import Program
from bigmrun.testing.sshd import (
    DEFAULT_USER,
    Keys,
    NetnsHosts,
    SSHServer,
    Unavailable,
    check_available,
    free_port,
)

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parent.parent
BIGPI = REPO / "examples" / "bigpi.py"
#: Keepalive timeout for tests that wait for it to lapse.
KEEPALIVE = 3.0
#: Bound for machines to come up (a first upload and extraction takes seconds).
UP = 120.0

SERVICES = '''\
"""Services for the SSH tests (shipped in the package beside main.py)."""
import os
import time


class Probe:
    def pid(self):
        return os.getpid()

    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds
'''

MAIN = '''\
"""A machine program: on a machine, bigmrun.start() serves calls and never returns."""
import os
import sys

import bigmrun
import sshsvc  # noqa: F401  (the services' module, importable on the machine)

if os.environ.get("SSHTEST_EXIT"):
    sys.exit(int(os.environ["SSHTEST_EXIT"]))  # a machine that fails to start
bigmrun.start()
'''


# --- availability and module-scoped servers -----------------------------------------------

def scratch_dir(prefix: str) -> str:
    """A new directory on tmpfs (/dev/shm) when it has room, else in /tmp.

    Extracting a virtualenv on a host writes ~300 MB in ~15,000 files, and deleting it
    again takes seconds per host on a disk mounted with ``discard``: the hosts' caches
    and the driver's package cache live in memory when they can.
    """
    base = "/dev/shm"
    try:
        st = os.statvfs(base)
        roomy = st.f_bavail * st.f_frsize >= 6 * 2**30
    except OSError:
        roomy = False
    return tempfile.mkdtemp(prefix=prefix, dir=base if roomy else None)


def _require(netns: bool = False) -> None:
    try:
        check_available(netns=netns)
    except Unavailable as e:
        pytest.skip(f"real OpenSSH servers unavailable here: {e}")


@pytest.fixture(scope="module", autouse=True)
def driver_env_for_module() -> Iterator[str]:
    """A private driver package cache; no SSH agent; no user config file."""
    cache = scratch_dir("bigmrun-test-ssh-driver-")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BIGMRUN_CACHE", cache)
        mp.setenv("BIGMRUN_CONFIG", os.path.join(cache, "no-config.toml"))
        mp.delenv("SSH_AUTH_SOCK", raising=False)
        for name in list(os.environ):
            if name.startswith(("BIGMRUN_SSH_", "BIGMRUN_SYSTEM", "BIGMRUN_NMACH")):
                mp.delenv(name)
        yield cache
    shutil.rmtree(cache, ignore_errors=True)


@dataclass
class Lo:
    """The loopback sshd, its keys, a known_hosts file that trusts it, its host cache."""

    server: SSHServer
    keys: Keys
    known_hosts: str
    cache: str
    #: A directory the login user can read (wrappers, spies); removed at teardown.
    shared: str

    @property
    def target(self) -> str:
        return self.server.target


def _user_owned_dir(path: str, mode: int = 0o700) -> str:
    pw = pwd.getpwnam(DEFAULT_USER)
    os.makedirs(path, exist_ok=True)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, mode)
    return path


@pytest.fixture(scope="module")
def lo() -> Iterator[Lo]:
    _require()
    keys = Keys.make()
    cache = os.path.join(scratch_dir("bigmrun-test-ssh-lo-"), "cache")
    os.chmod(os.path.dirname(cache), 0o755)  # the login user reaches its cache in there
    shared = tempfile.mkdtemp(prefix="bigmrun-test-ssh-shared-")
    os.chmod(shared, 0o755)
    server = SSHServer(keys, env={"BIGMRUN_CACHE": cache})
    try:
        server.start()
        _user_owned_dir(cache)  # exists from the start, so it can be watched
        known = os.path.join(keys.dir, "known_hosts")
        Path(known).write_text(server.known_hosts_line())
        yield Lo(server, keys, known, cache, shared)
    finally:
        server.stop()
        kill_processes_mentioning([cache])
        shutil.rmtree(os.path.dirname(cache), ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)
        keys.cleanup()


@dataclass
class Ns:
    hosts: NetnsHosts
    known_hosts: str

    def cache(self, k: int) -> str:
        return f"/tmp/bigmrun-host-{self.hosts.tag}-{k}"

    @property
    def caches(self) -> list[str]:
        return [self.cache(k) for k in range(self.hosts.n)]

    def sshd_pid(self, k: int) -> int:
        proc = self.hosts.servers[k].proc
        assert proc is not None
        return proc.pid


def free_subnet() -> str:
    """``10.77.0`` unless an interface here already uses it (a parallel run): then a free
    ``10.77.N`` with N in 1-99 (the EC2 tests pick theirs in 100-249)."""
    used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                          timeout=10).stdout
    for n in [0, *random.SystemRandom().sample(range(1, 100), 99)]:
        if f" 10.77.{n}." not in used:
            return f"10.77.{n}"
    pytest.skip("no free 10.77.N.0/24 subnet for the namespace hosts")


@pytest.fixture(scope="module")
def ns() -> Iterator[Ns]:
    _require(netns=True)
    with NetnsHosts(3, subnet=free_subnet()) as hosts:
        ns = Ns(hosts, os.path.join(hosts.keys.dir, "known_hosts"))
        Path(ns.known_hosts).write_text(hosts.known_hosts())
        # Each host's cache (the path its sshd gives it) is a link to a scratch directory.
        scratch = scratch_dir("bigmrun-test-ssh-ns-")
        os.chmod(scratch, 0o755)  # the login user reaches its directory in there
        for k in range(hosts.n):
            os.symlink(_user_owned_dir(os.path.join(scratch, str(k))), ns.cache(k))
        try:
            yield ns
        finally:
            for k in range(hosts.n):
                with contextlib.suppress(Exception):
                    hosts.heal(k)
            kill_processes_mentioning([f"/tmp/bigmrun-host-{hosts.tag}-"])
            for k in range(hosts.n):
                with contextlib.suppress(OSError):
                    os.unlink(ns.cache(k))
            shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class Prog:
    dir: Path
    program: Program


def write_prog(d: Path, token: str = "") -> Prog:
    d.mkdir(parents=True, exist_ok=True)
    (d / "sshsvc.py").write_text(SERVICES)
    (d / "main.py").write_text(MAIN + (f"# {token}\n" if token else ""))
    return Prog(d, Program([sys.executable, str(d / "main.py")], False, []))


@pytest.fixture(scope="module")
def prog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prog]:
    """The in-process tests' machine program; ``sshsvc`` importable here too."""
    p = write_prog(tmp_path_factory.mktemp("sshprog"))
    sys.path.insert(0, str(p.dir))
    try:
        import sshsvc  # noqa: F401
        yield p
    finally:
        sys.path.remove(str(p.dir))
        sys.modules.pop("sshsvc", None)


def probe_service() -> Any:
    import sshsvc

    return sshsvc.Probe()


# --- helpers --------------------------------------------------------------------------------

@contextlib.contextmanager
def ssh_session(hosts: str | list[str], key: str, known_hosts: str, prog: Prog,
                **options: Any) -> Iterator[bigmrun.B]:
    options.setdefault("keepalive_timeout", 10.0)
    system = SSHSystem(hosts=hosts, key_filename=key, known_hosts=known_hosts,
                       ssh_config=os.devnull, program=prog.program, **options)
    b = bigmrun.start(system)
    try:
        yield b
    finally:
        b.shutdown()


def lo_session(lo: Lo, prog: Prog, **options: Any) -> contextlib.AbstractContextManager[
        bigmrun.B]:
    options.setdefault("hosts", lo.target)
    options.setdefault("key", lo.keys.client_key)
    options.setdefault("known_hosts", lo.known_hosts)
    return ssh_session(options.pop("hosts"), options.pop("key"), options.pop("known_hosts"),
                       prog, **options)


def start_one(b: bigmrun.B, **services: Any) -> bigmrun.Machine:
    (m,) = b.start(1, services=services or {"P": probe_service()})
    return m


def up(m: bigmrun.Machine) -> bigmrun.Machine:
    assert m.wait(State.RUNNING, timeout=UP) == State.RUNNING, m.err
    return m


def failed(m: bigmrun.Machine, timeout: float = 60.0) -> BaseException:
    assert m.wait(State.STOPPED, timeout=timeout) == State.STOPPED
    assert m.err is not None
    return m.err


def processes_mentioning(fragments: list[str]) -> list[psutil.Process]:
    """Live processes whose command line mentions one of ``fragments`` (host cache dirs:
    machines run ``python -I -u <cache>/packages/<digest>.pyz``; log followers run
    ``tail ... <cache>/logs/...``, under ``sh -c``)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status", "name"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            line = " ".join(p.info["cmdline"] or ())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if p.pid != os.getpid() and any(f in line for f in fragments):
            found.append(p)
    return found


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} {' '.join(p.cmdline())}")
    return out


def kill_processes_mentioning(fragments: list[str]) -> None:
    """Teardown safety net: kill (by pid) anything a failed test left on a host."""
    for p in processes_mentioning(fragments):
        with contextlib.suppress(psutil.Error):
            p.kill()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def packages_on(cache: str) -> dict[str, tuple[int, int, int]]:
    """``digest -> (inode, mtime_ns, size)`` of the packages in a host's cache."""
    d = os.path.join(cache, "packages")
    out = {}
    for name in os.listdir(d) if os.path.isdir(d) else []:
        if name.endswith(".pyz"):
            st = os.stat(os.path.join(d, name))
            out[name[:-4]] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def boot_files(cache: str) -> list[str]:
    return [n for n in os.listdir(cache) if n.startswith("boot-")] if os.path.isdir(cache) \
        else []


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("BIGMRUN_") or k in ("BIGMRUN_CACHE", "BIGMRUN_CONFIG")}
    env.pop("PYTHONPATH", None)
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


def bigmrun_cli(args: list[str], timeout: float = 150, cwd: Path = REPO,
                **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bigmrun", *args], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def ssh_args(hosts: str, key: str, known_hosts: str, *more: str) -> list[str]:
    return ["--system", "ssh", "--hosts", hosts, "--ssh-key", key, "--known-hosts",
            known_hosts, *more]


def check_bigpi_output(r: subprocess.CompletedProcess[str], addrs: list[str],
                       samples: int) -> None:
    """bigpi ran on one machine per address in ``addrs`` and printed an estimate of π."""
    assert r.returncode == 0, r.stderr[-3000:]
    found = re.search(r"^π = (\d\.\d+)$", r.stdout, re.M)
    assert found, r.stdout
    # Within 8 standard deviations of π for this many samples (4·sqrt(p(1-p)/n)).
    assert abs(float(found.group(1)) - math.pi) < 8 * 1.65 / math.sqrt(samples), r.stdout
    assert f"nsamples={samples}" in r.stderr, r.stderr
    for k, addr in enumerate(addrs):
        # The driver logs each machine's address; the machine's own log lines come
        # back prefixed with its name.
        assert re.search(rf"machine m{k} {re.escape(addr)}:\d+ RUNNING", r.stderr), r.stderr
        assert re.search(rf"^m{k}: .*0/\d+$", r.stderr, re.M), r.stderr
    assert not re.search(rf"^m{len(addrs)}: ", r.stderr, re.M)


def package_digest_logged(stderr: str) -> str:
    found = re.findall(r"bigmrun package ([0-9a-f]{12})", stderr)
    assert found, stderr
    return found[-1]


# --- the launcher -------------------------------------------------------------------------------

def test_ssh_system_without_hosts_is_a_usage_error() -> None:
    r = bigmrun_cli(["--system", "ssh", "--nmach", "2", str(BIGPI), "-n", "1000"], timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "--hosts" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_bigpi_on_loopback_and_second_run_uploads_nothing(lo: Lo) -> None:
    args = [*ssh_args(lo.target, lo.keys.client_key, lo.known_hosts, "--nmach", "2",
                      "--procs-per-host", "2"), str(BIGPI), "-n", "400000"]
    r1 = bigmrun_cli(args)
    check_bigpi_output(r1, ["127.0.0.1", "127.0.0.1"], 400000)
    digest = package_digest_logged(r1.stderr)
    after_first = packages_on(lo.cache)
    (full,) = [d for d in after_first if d.startswith(digest)]
    assert after_first[full][2] > 0

    r2 = bigmrun_cli(args)
    check_bigpi_output(r2, ["127.0.0.1", "127.0.0.1"], 400000)
    assert package_digest_logged(r2.stderr) == digest
    # Nothing was uploaded: an upload writes a new file and renames it into place, so
    # the package's inode and mtime would change.
    assert packages_on(lo.cache) == after_first
    assert not boot_files(lo.cache)


def test_launcher_host_key_flags(lo: Lo, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    base = [*ssh_args(lo.target, lo.keys.client_key, str(known), "--nmach", "1")]
    r = bigmrun_cli([*base, str(BIGPI), "-n", "1000"])
    assert r.returncode == 1, r.stderr[-3000:]
    assert "machine m0 failed" in r.stderr and "unknown host key" in r.stderr, r.stderr
    assert "--accept-new-host-keys" in r.stderr
    assert known.read_text() == ""
    r = bigmrun_cli([*base, "--accept-new-host-keys", str(BIGPI), "-n", "1000"])
    check_bigpi_output(r, ["127.0.0.1"], 1000)
    assert known.read_text() == lo.server.known_hosts_line()
    wait_until(lambda: not processes_mentioning([lo.cache]), timeout=15,
               what="no process left on the host")


def test_launcher_procs_per_host_limit(lo: Lo) -> None:
    r = bigmrun_cli([*ssh_args(lo.target, lo.keys.client_key, lo.known_hosts, "--nmach", "2",
                               "--procs-per-host", "1"), str(BIGPI), "-n", "1000"])
    assert r.returncode == 1, r.stderr[-3000:]
    assert re.search(r"machine m[01] failed: host \S+ already runs 1 machine\(s\), its limit "
                     r"\(--procs-per-host\)", r.stderr), r.stderr[-3000:]
    wait_until(lambda: not processes_mentioning([lo.cache]), timeout=15,
               what="no process left on the host")


def test_bigpi_across_three_namespace_hosts(ns: Ns) -> None:
    hosts = ",".join(ns.hosts.targets())
    r = bigmrun_cli([*ssh_args(hosts, ns.hosts.keys.client_key, ns.known_hosts, "--nmach", "3"),
                     str(BIGPI), "-n", "600000"], timeout=170)
    check_bigpi_output(r, [ns.hosts.addr(k) for k in range(3)], 600000)
    digest = package_digest_logged(r.stderr)
    for k in range(3):
        # Each host got the package in its own cache, and ran its machine from it.
        assert any(d.startswith(digest) for d in packages_on(ns.cache(k))), k
        logs = os.listdir(os.path.join(ns.cache(k), "logs"))
        assert any(name.endswith(f"-m{k}.log") for name in logs), logs
    wait_until(lambda: not processes_mentioning(ns.caches), timeout=15,
               what="no process left on any host")


# --- package uploads ------------------------------------------------------------------------------

def test_second_session_uploads_nothing_and_a_changed_program_gets_a_new_digest(
        lo: Lo, tmp_path: Path, prog: Prog) -> None:
    # A program no host has seen (its own token), so the first session must upload it.
    mine = write_prog(tmp_path / "prog", token=uuid.uuid4().hex)
    with lo_session(lo, mine) as b:
        system = b.system
        assert isinstance(system, SSHSystem)
        m = up(start_one(b))
        assert m.call("P.pid") > 0
        pkg = system.package()
        assert system.uploaded_bytes == pkg.size > 0
    first = packages_on(lo.cache)
    assert first[pkg.digest][2] == pkg.size

    with lo_session(lo, mine) as b:
        system = b.system
        assert isinstance(system, SSHSystem)
        m = up(start_one(b))
        assert m.call("P.pid") > 0
        assert system.package().digest == pkg.digest
        assert system.uploaded_bytes == 0
    assert packages_on(lo.cache) == first  # same files, not re-written

    with open(mine.dir / "main.py", "a") as f:
        f.write("# changed\n")
    with lo_session(lo, mine) as b:
        system = b.system
        assert isinstance(system, SSHSystem)
        m = up(start_one(b))
        assert m.call("P.pid") > 0
        changed = system.package()
        assert changed.digest != pkg.digest
        assert system.uploaded_bytes == changed.size > 0
    now = packages_on(lo.cache)
    assert now[pkg.digest] == first[pkg.digest]
    assert now[changed.digest][2] == changed.size


# --- the interpreter check --------------------------------------------------------------------

FAKE_VERSION = '''\
"""Runs the real python3 but reports Python {v} to whatever it runs (a test double for a
host whose python3 is another version)."""
import platform
import runpy
import sys

FAKE = ({major}, {minor}, 7)
platform.python_version = lambda: "{v}"
sys.version_info = FAKE + ("final", 0)
args = sys.argv[1:]
if args[:1] == ["-"]:
    sys.argv = args
    exec(compile(sys.stdin.read(), "<stdin>", "exec"), {{"__name__": "__main__"}})
else:
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
'''


def other_python(lo: Lo) -> tuple[str, str]:
    """(interpreter path on the host, its version): a real interpreter of another minor
    version the login user can run if there is one, else a wrapper around python3 that
    reports another version."""
    here = sys.version_info[:2]
    for cand in sorted({*Path("/usr/bin").glob("python3.*"), *Path("/usr/local/bin").glob(
            "python3.*")}):
        if not re.fullmatch(r"python3\.\d+", cand.name) or not os.access(cand, os.X_OK):
            continue
        r = subprocess.run(["runuser", "-u", DEFAULT_USER, "--", str(cand), "-c",
                            "import platform; print(platform.python_version())"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            v = r.stdout.strip()
            if tuple(int(x) for x in v.split(".")[:2]) != here:
                return str(cand), v
    minor = here[1] - 2
    v = f"3.{minor}.7"
    script = Path(lo.shared) / "fakever.py"
    script.write_text(FAKE_VERSION.format(v=v, major=3, minor=minor))
    wrapper = Path(lo.shared) / f"python3.{minor}"
    wrapper.write_text(f"#!/bin/sh\nexec /usr/bin/python3 {script} \"$@\"\n")
    wrapper.chmod(0o755)
    script.chmod(0o644)
    return str(wrapper), v


def test_host_python_of_another_minor_version_fails_naming_both_and_the_fix(
        lo: Lo, prog: Prog) -> None:
    python, version = other_python(lo)
    with lo_session(lo, prog, python=python) as b:
        m = start_one(b)
        err = failed(m)
        system = b.system
        assert isinstance(system, SSHSystem)
        assert system.uploaded_bytes == 0  # refused before uploading anything
    msg = str(err)
    assert isinstance(err, bigmrun.BigmrunError)
    assert version in msg, msg
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" in msg, msg
    assert "--python PATH" in msg, msg


def test_missing_host_python_fails_clearly(lo: Lo, prog: Prog) -> None:
    missing = "/nonexistent/bin/python3"
    with lo_session(lo, prog, python=missing) as b:
        err = failed(start_one(b))
    assert isinstance(err, bigmrun.StartError)
    msg = str(err)
    assert missing in msg and "--python PATH" in msg, msg
    assert lo.target.split("@")[0] in msg and str(lo.server.port) in msg, msg


# --- host keys ----------------------------------------------------------------------------------

def test_unknown_host_key_is_refused_naming_accept_new(lo: Lo, prog: Prog,
                                                      tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    with lo_session(lo, prog, known_hosts=str(known)) as b:
        err = failed(start_one(b))
    assert isinstance(err, bigmrun.StartError)
    assert "--accept-new-host-keys" in str(err) and str(known) in str(err), err
    assert known.read_text() == ""  # nothing recorded without the flag


def test_accept_new_host_keys_records_the_key_and_works(lo: Lo, prog: Prog,
                                                        tmp_path: Path) -> None:
    known = tmp_path / "ssh" / "known_hosts"  # neither the file nor its directory exist
    with lo_session(lo, prog, known_hosts=str(known), accept_new_host_keys=True) as b:
        m = up(start_one(b))
        assert m.call("P.pid") > 0
    name = f"[127.0.0.1]:{lo.server.port}"
    lines = known.read_text().splitlines()
    assert lines == [f"{name} {lo.keys.host_pub}"], lines
    # OpenSSH's own tools read the recorded entry.
    found = subprocess.run(["ssh-keygen", "-F", name, "-f", str(known)], capture_output=True,
                           text=True)
    assert found.returncode == 0 and lo.keys.host_pub in found.stdout, found
    # And it is trusted from now on, without the flag.
    with lo_session(lo, prog, known_hosts=str(known)) as b:
        assert up(start_one(b)).call("P.pid") > 0
    assert known.read_text().splitlines() == lines


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa"])
def test_changed_host_key_is_refused_even_with_accept_new(lo: Lo, prog: Prog, tmp_path: Path,
                                                         key_type: str) -> None:
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-f", str(other)],
                   check=True)
    pub = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{lo.server.port} {pub}\n")
    before = known.read_text()
    with lo_session(lo, prog, known_hosts=str(known), accept_new_host_keys=True) as b:
        err = failed(start_one(b))
    assert isinstance(err, bigmrun.StartError)
    msg = str(err)
    assert "does not match" in msg, msg
    assert f"ssh-keygen -R '[127.0.0.1]:{lo.server.port}'" in msg, msg
    assert known.read_text() == before  # the new key was not recorded


# --- logins that fail, and partial failure ----------------------------------------------------

def test_client_key_not_in_authorized_keys_is_refused(lo: Lo, prog: Prog,
                                                      tmp_path: Path) -> None:
    stranger = tmp_path / "stranger_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True)
    with lo_session(lo, prog, key=str(stranger)) as b:
        err = failed(start_one(b))
    assert isinstance(err, bigmrun.StartError)
    msg = str(err)
    assert "refused" in msg and "authorized_keys" in msg and lo.target.split(":")[0] in msg, msg


def test_unreachable_port_fails_clearly(lo: Lo, prog: Prog) -> None:
    port = free_port()  # nothing listens there
    with lo_session(lo, prog, hosts=f"{DEFAULT_USER}@127.0.0.1:{port}") as b:
        err = failed(start_one(b))
    assert isinstance(err, bigmrun.StartError)
    msg = str(err)
    assert "cannot reach" in msg and f"127.0.0.1:{port}" in msg, msg
    assert isinstance(err.__cause__, OSError)


@pytest.mark.timeout(120)
def test_partial_failure_with_a_host_cut_off(ns: Ns, prog: Prog) -> None:
    good, bad = ns.hosts.targets()[0], ns.hosts.targets()[2]
    ns.hosts.cut(2)
    try:
        with ssh_session([good, bad], ns.hosts.keys.client_key, ns.known_hosts, prog) as b:
            m0, m1 = b.start(2, services={"P": probe_service()})
            pid = up(m0).call("P.pid")
            assert pid in ns.hosts.pids(0)  # it runs on the good host
            err = failed(m1, timeout=60)  # the connect timeout passes first
            assert isinstance(err, bigmrun.StartError)
            assert "cannot reach" in str(err) and ns.hosts.addr(2) in str(err), err
            # The good machine is unaffected and usable.
            assert m0.state == State.RUNNING and m0.err is None
            assert m0.call("P.sleep", 0) == 0
            # Only m0 runs anywhere: nothing on the cut host, one machine on the good one.
            assert set(ns.hosts.pids(2)) == {ns.sshd_pid(2)}
            machines = [p for p in processes_mentioning(ns.caches)
                        if any(a.endswith(".pyz") for a in p.cmdline())]
            assert [p.pid for p in machines] == [pid], describe(machines)
        assert gone(pid)
        wait_until(lambda: not processes_mentioning(ns.caches), timeout=15,
                   what="no process left on any host")
    finally:
        ns.hosts.heal(2)


# --- several machines per host -------------------------------------------------------------------

def test_procs_per_host_and_capacity(lo: Lo, prog: Prog) -> None:
    with lo_session(lo, prog, procs_per_host=2) as b:
        ms = b.start(3, services={"P": probe_service()})
        for m in ms:
            m.wait(State.RUNNING, timeout=UP)
        running = [m for m in ms if m.state == State.RUNNING]
        stopped = [m for m in ms if m.state == State.STOPPED]
        assert len(running) == 2 and len(stopped) == 1, ms
        err = stopped[0].err
        assert isinstance(err, bigmrun.StartError)
        assert "--procs-per-host" in str(err) and "2 machine(s)" in str(err), err
        pids = {m.call("P.pid") for m in running}
        assert len(pids) == 2
        assert all(not gone(p) for p in pids)
        # Capacity frees up when a machine stops: a new machine fits again.
        running[0].cancel()
        assert running[0].wait(State.STOPPED, timeout=30) == State.STOPPED
        (again,) = b.start(1, services={"P": probe_service()})
        assert up(again).call("P.pid") not in pids
    wait_until(lambda: all(gone(p) for p in pids), timeout=15, what="machines to exit")
    wait_until(lambda: not processes_mentioning([lo.cache]), timeout=15,
               what="no process left on the host")


def test_a_machine_that_fails_to_start_frees_its_slot(lo: Lo, prog: Prog) -> None:
    with lo_session(lo, prog, procs_per_host=1) as b:
        (bad,) = b.start(1, services={"P": probe_service()}, env={"SSHTEST_EXIT": "3"})
        err = failed(bad)
        assert isinstance(err, bigmrun.StartError)
        assert "exited with status 3" in str(err), err
        assert not boot_files(lo.cache)  # read and deleted even so
        (good,) = b.start(1, services={"P": probe_service()})
        assert up(good).call("P.pid") > 0


# --- the boot record and the CA key -----------------------------------------------------------

IN_CREATE = 0x100
IN_MOVED_TO = 0x80


class CreationWatch:
    """Records the mode of each ``boot-*`` file the moment it appears in a directory.

    Uses inotify (Linux) through ctypes: the event arrives as the file is created, and
    the file is stat'ed at once, before a separate chmod could come along.
    """

    def __init__(self, path: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.path = path
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self.fd, os.fsencode(path), IN_CREATE | IN_MOVED_TO) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self.seen: list[tuple[str, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            off = 0
            while off + 16 <= len(data):
                _wd, _mask, _cookie, n = struct.unpack_from("iIII", data, off)
                name = data[off + 16:off + 16 + n].rstrip(b"\0").decode()
                off += 16 + n
                if name.startswith("boot-"):
                    try:
                        mode: int | None = stat.S_IMODE(
                            os.lstat(os.path.join(self.path, name)).st_mode)
                    except FileNotFoundError:
                        mode = None
                    self.seen.append((name, mode))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self.fd)


SPY = '''\
#!/bin/sh
# Test double for the host's python3: before running the real one, record how the boot
# record file looks when the remote launcher gets it (mode, owner) and keep a copy.
prev=""
for a in "$@"; do
    if [ "$prev" = "--boot" ]; then
        stat -c '%a %U' "$a" >> {spy}/modes
        cp "$a" {spy}/record-$$.json
    fi
    prev="$a"
done
exec /usr/bin/python3 "$@"
'''


def test_boot_record_is_private_and_deleted_and_the_ca_key_never_leaves(
        lo: Lo, prog: Prog) -> None:
    spy = _user_owned_dir(os.path.join(lo.shared, "spy"))
    wrapper = Path(lo.shared) / "spy-python3"
    wrapper.write_text(SPY.format(spy=spy))
    wrapper.chmod(0o755)
    watch = CreationWatch(lo.cache)
    try:
        with lo_session(lo, prog, python=str(wrapper)) as b:
            ms = b.start(2, services={"P": probe_service()})
            pids = [up(m).call("P.pid") for m in ms]
            assert b._ca is not None
            ca_key = b._ca._key
            # Nothing of the boot records is left on the host once the machines run.
            assert not boot_files(lo.cache)
            environs = [Path(f"/proc/{pid}/environ").read_bytes() for pid in pids]
            cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in pids]
    finally:
        watch.close()
    from cryptography.hazmat.primitives import serialization

    pem = ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    der = ca_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    body = [ln for ln in pem.splitlines() if ln and not ln.startswith(b"-----")]
    assert body

    # Created private: every boot record was 0600 from the moment it existed.
    assert len(watch.seen) == 2, watch.seen
    assert all(mode == 0o600 for _, mode in watch.seen), watch.seen
    # ...and still so, owned by the login user, when the launcher opened it.
    modes = Path(spy, "modes").read_text().split("\n")
    assert [m for m in modes if m] == [f"600 {DEFAULT_USER}"] * 2, modes
    records = sorted(Path(spy).glob("record-*.json"))
    assert len(records) == 2
    for path in records:
        record = json.loads(path.read_text())
        # The record holds the machine's own leaf, and the CA's certificate only.
        assert "PRIVATE KEY" in record["leaf"]["key"]
        assert "CERTIFICATE" in record["leaf"]["ca"]
        raw = path.read_bytes()
        assert not any(line in raw for line in body), "the CA key is in a boot record"
        path.unlink()

    # The CA key is nowhere on the host: not in its cache (logs, packages, extracted
    # files), not in the machines' environment or command line.
    leaks = []
    for root, _dirs, files in os.walk(lo.cache):
        for name in files:
            p = os.path.join(root, name)
            with contextlib.suppress(OSError), open(p, "rb") as f:
                data = f.read()
            if der in data or any(line in data for line in body):
                leaks.append(p)
    assert not leaks
    for blob in (*environs, *cmdlines):
        assert der not in blob and not any(line in blob for line in body)


# --- a host cut off mid-run, and a killed driver ------------------------------------------------

@pytest.mark.timeout(150)
def test_host_cut_off_mid_run(ns: Ns, prog: Prog) -> None:
    k = 1
    cache = ns.cache(k)
    with ssh_session(ns.hosts.targets()[k], ns.hosts.keys.client_key, ns.known_hosts, prog,
                     keepalive_timeout=KEEPALIVE) as b:
        m = up(start_one(b))
        pid = m.call("P.pid")
        assert pid in ns.hosts.pids(k)
        pending = m.submit("P.sleep", 120)
        log = m.handle.describe()["log"]  # type: ignore[union-attr]
        ns.hosts.cut(k)
        try:
            err = pending.exception(timeout=KEEPALIVE + 30)
            assert isinstance(err, (bigmrun.NetworkError, bigmrun.MachineLostError)), err
            assert m.wait(State.STOPPED, timeout=KEEPALIVE + 30) == State.STOPPED
            assert isinstance(m.err, bigmrun.MachineLostError), m.err
            assert "keepalive" in str(m.err), m.err
            # Still cut off, so no one could have killed it: it exits by itself once its
            # keepalives stop.
            wait_until(lambda: gone(pid), timeout=KEEPALIVE + 20,
                       what="the cut-off machine to exit by itself")
        finally:
            ns.hosts.heal(k)
        text = Path(log).read_text()
        assert "no keepalive from the driver" in text, text[-2000:]
    assert gone(pid)
    wait_until(lambda: not processes_mentioning([cache]), timeout=30,
               what="no bigmrun process left on the healed host")
    wait_until(lambda: set(ns.hosts.pids(k)) == {ns.sshd_pid(k)}, timeout=60,
               what="only sshd left on the healed host")


DRIVER = '''\
"""A driver that starts machines, reports their pids, then waits to be killed."""
import os
import sys
import time

import bigmrun


class Pid:
    def pid(self):
        return os.getpid()


b = bigmrun.start()
ms = b.start(services={"P": Pid()})
for m in ms:
    if m.wait(bigmrun.State.RUNNING, timeout=150) != bigmrun.State.RUNNING:
        sys.exit(f"machine {m.name} failed: {m.err}")
print("READY", " ".join(str(m.call("P.pid")) for m in ms), flush=True)
time.sleep(600)
'''


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            return proc.stdout.readline()
        if proc.poll() is not None:
            break
    return ""


@pytest.mark.timeout(170)
def test_driver_killed_with_sigkill_leaves_nothing_on_any_host(ns: Ns, tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    hosts = ",".join(ns.hosts.targets())
    args = [sys.executable, "-m", "bigmrun",
            *ssh_args(hosts, ns.hosts.keys.client_key, ns.known_hosts, "--nmach", "3",
                      "--keepalive-timeout", str(KEEPALIVE)), str(driver)]
    err_path = tmp_path / "driver.err"
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                                stderr=err_file, text=True)
    try:
        line = _read_line(proc, timeout=150)
        assert line.startswith("READY"), (line, err_path.read_text()[-3000:])
        pids = [int(p) for p in line.split()[1:]]
        assert len(pids) == 3
        for k, pid in enumerate(pids):
            assert pid in ns.hosts.pids(k), (k, pid)
        # Each machine has a `tail` on its host copying its log to the driver.
        tails = [p for p in processes_mentioning(ns.caches) if p.info["name"] == "tail"]
        assert len(tails) == 3, describe(tails)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # Within the keepalive timeout and a margin, nothing is left on any host: no
        # machine, no `tail` following a log, no shell around one.
        wait_until(lambda: all(gone(p) for p in pids), timeout=KEEPALIVE + 15,
                   what="the machines to exit by themselves")
        wait_until(lambda: not processes_mentioning(ns.caches), timeout=KEEPALIVE + 15,
                   what="no bigmrun process left on any host")
        tails = [p for p in processes_mentioning(ns.caches) if p.info["name"] == "tail"]
        assert not tails, describe(tails)
        wait_until(lambda: all(set(ns.hosts.pids(k)) == {ns.sshd_pid(k)} for k in range(3)),
                   timeout=15, what="only sshd left on every host")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
