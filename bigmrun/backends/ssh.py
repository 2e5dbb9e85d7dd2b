"""The SSH system: machines on hosts you can log in to, with nothing installed but Python.

How this works
--------------
The driver packs the program and its virtualenv into one content-addressed zipapp
(``bootstrap.package``), once per session (a cached build takes a fraction of a second).
For each host, once: log in (``_sshconn``: ~/.ssh/config, agent, keys, known_hosts),
run the stdlib-only ``bootstrap.remote probe`` to learn the host's Python, platform,
CPUs and cached packages, check the interpreter (a mismatch fails here, naming both
sides and the fix), and upload the package over SFTP only if the host lacks it.

For each machine: write its boot record (its own TLS leaf; never the CA key) to a file
created with mode 0600 in the host's private cache, then ``remote launch``: the
machine starts detached (it outlives the SSH session), reads and deletes the record,
binds a port and reports its address. From then on the driver talks to it directly
with mutual TLS. A ``tail --pid`` over SSH copies its log (stdout and stderr) to the
driver line by line, prefixed with the machine's name, and ends when the process ends:
that is how the driver learns, at once, that a machine is gone. If the host becomes
unreachable instead, keepalives decide; a machine whose keepalives stop exits by itself.

Settings come from the constructor or, when ``bigmrun.start()`` builds the system
(as under the launcher), from ``BIGMRUN_SSH_*`` environment variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import posixpath
import shlex
import threading
from typing import Any

from ..bootstrap import remote
from ..bootstrap.package import Package, build_for, split_program
from ..bootstrap.program import Program
from ..errors import ConfigError, MachineLostError, StartError
from ._base import BootSpec, MachineHandle, OutputSink, System, default_keepalive_timeout
from ._sshconn import HostSpec, SSHHost, parse_hosts


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


class _Host:
    """Per-host state shared by the machines placed on it."""

    def __init__(self, conn: SSHHost) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.probe: dict[str, Any] | None = None
        self.machines = 0
        self._slots = threading.Lock()  # guards machines; never held for long (I/O loop)
        #: Extra boot record fields for machines on this host: the EC2 system sets a
        #: fixed RPC ``port`` (its security group opens only that) and ``advertise``.
        self.boot_extra: dict[str, Any] = {}

    def reserve(self, capacity: int) -> bool:
        """Take a machine slot if fewer than ``capacity`` are taken."""
        with self._slots:
            if self.machines >= capacity:
                return False
            self.machines += 1
            return True

    def release(self) -> None:
        """A machine slot on this host is free again (its machine ended or failed)."""
        with self._slots:
            self.machines = max(0, self.machines - 1)

    @property
    def cache(self) -> str:
        assert self.probe is not None
        return str(self.probe["cache"])


class SSHHandle(MachineHandle):
    def __init__(self, name: str, host: _Host, pid: int, log: str, addr: str, maxprocs: int,
                 loop: asyncio.AbstractEventLoop, output: OutputSink,
                 oom_kills: int | None = None) -> None:
        self.oom_baseline = oom_kills  # the host's OOM-kill count when the machine started
        self.killed = False  # by the driver: not an OOM kill
        self.exited_itself = False  # it said why it exited (keepalives lost, asked to)
        self.name = name
        self.host = host
        self.pid = pid
        self.log = log
        self.addr = addr
        self.maxprocs = maxprocs
        self._loop = loop
        self.exited = loop.create_future()
        self._slot_held = True  # on its host, until it ends or is being stopped
        self.exited.add_done_callback(lambda _: self._free_slot())
        self._tail = threading.Thread(target=self._follow, args=(output,),
                                      name=f"bigmrun-{name}-tail", daemon=True)
        self._tail.start()

    def _follow(self, output: OutputSink) -> None:
        """Copy the machine's log to the driver until its process ends."""
        cmd = (f"tail -n +1 -F -s 0.2 --pid={self.pid} {shlex.quote(self.log)} 2>/dev/null; "
               f"kill -0 {self.pid} 2>/dev/null && echo __BIGMRUN_ALIVE__ >&2; exit 0")
        try:
            chan = self.host.conn.open_stream(cmd)
            buf = b""
            while True:
                data = chan.recv(65536)
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.startswith(b"bigmrun: machine ") and b" exiting: " in line:
                        self.exited_itself = True
                    output.line(self.name, "stdout", line + b"\n")
            if buf:
                output.line(self.name, "stdout", buf)
            # The exit status follows the end of output (it may lag it a little); a
            # broken SSH connection gives -1: the machine may live, keepalives decide.
            status = chan.recv_exit_status()
            alive = b"__BIGMRUN_ALIVE__" in _drain_stderr(chan)
            if status != 0 or alive:
                return
        except Exception:
            return  # cannot follow: keepalives decide
        oom = self._oom_killed()
        if oom:
            message = (f"machine {self.name} on {self.host.conn.label} was killed by the "
                       f"kernel's OOM killer: it ran out of memory (the host's OOM-kill "
                       f"count rose while it ran; its log: {self.log})")
        else:
            message = (f"machine {self.name} on {self.host.conn.label} ended (process "
                       f"{self.pid} is gone; its log: {self.log})")
        err = MachineLostError(message, machine=self.name)
        err.oom = oom  # type: ignore[attr-defined]
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_resolve, self.exited, err)

    def _oom_killed(self) -> bool:
        """Whether the host's OOM killer struck while this machine ran (it ended unasked).

        Unprivileged users cannot read the kernel log on most hosts, but everyone can
        read the kernel's OOM-kill count; a rise while the machine ran, with the machine
        gone without exiting by itself, is the OOM killer's mark.
        """
        if self.oom_baseline is None or self.killed or self.exited_itself:
            return False
        try:
            _, out, _ = self.host.conn.run("grep '^oom_kill ' /proc/vmstat", timeout=15)
            return int(out.split()[1]) > int(self.oom_baseline)
        except Exception:
            return False

    def _free_slot(self) -> None:
        if self._slot_held:  # loop thread only
            self._slot_held = False
            self.host.release()

    async def kill(self, timeout: float = 5.0) -> None:
        self.killed = True
        self._free_slot()  # a machine being stopped no longer counts against its host
        loop = asyncio.get_running_loop()
        if not self.exited.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(loop.run_in_executor(
                    None, self.host.conn.run, f"kill -9 {self.pid} 2>/dev/null; true", None,
                    timeout), timeout)
        if not self.exited.done():
            _resolve(self.exited, MachineLostError(
                f"machine {self.name} on {self.host.conn.label} was stopped",
                machine=self.name))

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "host": self.host.conn.label, "log": self.log}


def _drain_stderr(chan: Any) -> bytes:
    parts = []
    while chan.recv_stderr_ready():
        parts.append(chan.recv_stderr(65536))
    return b"".join(parts)


def _resolve(fut: asyncio.Future[BaseException], err: BaseException) -> None:
    if not fut.done():
        fut.set_result(err)


class SSHSystem(System):
    """Machines on SSH hosts, ``procs_per_host`` per host (default: its CPU count).

    Args:
        hosts: ``"user@h1,h2:2222"`` or a list of such names (default $BIGMRUN_SSH_HOSTS).
        procs_per_host: machines per host (default: the host's CPU count).
        python: the interpreter on the hosts (default ``python3``).
        key_filename: a private key file (default: agent, ~/.ssh/config, ~/.ssh/id_*).
        known_hosts: the known_hosts file (default ~/.ssh/known_hosts).
        accept_new_host_keys: record unknown host keys instead of refusing them
            (OpenSSH's accept-new); a changed key is always refused.
        remote_cache: the hosts' bigmrun cache (default $BIGMRUN_CACHE or ~/.cache/bigmrun).
    """

    name = "ssh"
    # The log follower polls the process every 0.2 s, then checks the host over SSH
    # (is it alive, did the OOM killer strike): a few round trips after the death.
    exit_grace = 5.0

    def __init__(self, hosts: str | list[str] | None = None, procs_per_host: int | None = None,
                 python: str | None = None, key_filename: str | None = None,
                 known_hosts: str | None = None, accept_new_host_keys: bool | None = None,
                 ssh_config: str | None = None, remote_cache: str | None = None,
                 keepalive_timeout: float | None = None, keepalive_interval: float = 1.0,
                 start_timeout: float = 180.0, program: Program | None = None,
                 package: Package | None = None, add_hosts_later: bool = False) -> None:
        env = os.environ
        hosts = hosts if hosts is not None else env.get("BIGMRUN_SSH_HOSTS", "")
        # add_hosts_later: start with no hosts; add_host() adds them (the EC2 system).
        self.hosts: list[HostSpec] = [] if add_hosts_later else parse_hosts(hosts)
        ppH = procs_per_host if procs_per_host is not None else env.get("BIGMRUN_PROCS_PER_HOST")
        self.procs_per_host = int(ppH) if ppH else None
        if self.procs_per_host is not None and self.procs_per_host < 1:
            raise ConfigError("procs_per_host must be at least 1")
        self.python = python or env.get("BIGMRUN_SSH_PYTHON") or "python3"
        self.key_filename = key_filename or env.get("BIGMRUN_SSH_KEY") or None
        self.known_hosts = known_hosts or env.get("BIGMRUN_SSH_KNOWN_HOSTS") or None
        self.accept_new = (accept_new_host_keys if accept_new_host_keys is not None
                           else _env_bool("BIGMRUN_ACCEPT_NEW_HOST_KEYS"))
        self.ssh_config = ssh_config
        self.remote_cache = remote_cache or env.get("BIGMRUN_REMOTE_CACHE") or None
        self.keepalive_timeout = keepalive_timeout or default_keepalive_timeout()
        self.keepalive_interval = keepalive_interval
        self.start_timeout = start_timeout
        self._program = program
        self._package = package
        self._package_lock = threading.Lock()
        self._hosts: list[_Host] = [
            _Host(SSHHost(h, key_filename=self.key_filename, known_hosts=self.known_hosts,
                          accept_new_host_keys=self.accept_new, ssh_config=self.ssh_config))
            for h in self.hosts
        ]
        self._next = 0
        self._handles: list[SSHHandle] = []
        #: Bytes uploaded to hosts by this system (0 when every host had the package).
        self.uploaded_bytes = 0

    def package(self) -> Package:
        """The program's package (built once per system; cached builds are fast)."""
        with self._package_lock:
            if self._package is None:
                self._package = build_for(self.program())
            return self._package

    async def launch(self, spec: BootSpec, output: OutputSink) -> MachineHandle:
        loop = asyncio.get_running_loop()
        slot = self._next
        self._next += 1
        host = self._hosts[slot % len(self._hosts)]
        return await loop.run_in_executor(None, self._launch, host, spec, output, loop)

    def add_host(self, spec: HostSpec, **options: Any) -> _Host:
        """A host that was not in ``hosts`` (the EC2 system adds each instance), with
        this system's login settings (``options`` go to SSHHost too). :meth:`launch_on`
        starts machines on it."""
        host = _Host(SSHHost(spec, key_filename=self.key_filename, known_hosts=self.known_hosts,
                             accept_new_host_keys=self.accept_new, ssh_config=self.ssh_config,
                             **options))
        self._hosts.append(host)  # closed by shutdown()
        return host

    def launch_on(self, host: _Host, spec: BootSpec, output: OutputSink,
                  loop: asyncio.AbstractEventLoop) -> SSHHandle:
        """Start one machine on ``host`` (blocking; run it off the I/O loop): log in,
        probe, check, upload if missing, launch detached. What :meth:`launch` does for
        its round-robin host; the EC2 system calls it for each instance."""
        return self._launch(host, spec, output, loop)

    def _prepare_host(self, host: _Host, pkg: Package) -> None:
        """Log in, probe, check the interpreter, upload the package if missing (once)."""
        conn = host.conn
        conn.connect()
        if host.probe is None:
            args = [self.python, "-", "probe"]
            if self.remote_cache:
                args += ["--cache", self.remote_cache]
            status, out, err = conn.run(args, stdin=remote.source().encode(), timeout=60)
            try:
                probed = json.loads(out)
            except ValueError:
                raise StartError(
                    f"cannot run {self.python} on {conn.label} (exit status {status}): "
                    f"{err.decode(errors='replace').strip() or out.decode(errors='replace')}. "
                    f"Install Python 3 there or pass --python PATH."
                ) from None
            remote.check(probed, pkg)
            host.probe = probed
        if pkg.digest not in host.probe.get("packages", []):
            self._upload(host, pkg)
            host.probe.setdefault("packages", []).append(pkg.digest)

    def _upload(self, host: _Host, pkg: Package) -> None:
        dest_dir = posixpath.join(host.cache, "packages")
        dest = posixpath.join(dest_dir, f"{pkg.digest}.pyz")
        tmp = f"{dest}.tmp-{os.getpid()}-{threading.get_ident()}"
        host.conn.run(["mkdir", "-p", "-m", "700", dest_dir], timeout=30)
        sftp = host.conn.sftp()
        try:
            sftp.put(str(pkg.path), tmp)
            sftp.posix_rename(tmp, dest)
        except OSError as e:
            with contextlib.suppress(OSError):
                sftp.remove(tmp)
            raise StartError(f"uploading the package to {host.conn.label} failed: {e}") from e
        finally:
            sftp.close()
        self.uploaded_bytes += pkg.size

    def _launch(self, host: _Host, spec: BootSpec, output: OutputSink,
                loop: asyncio.AbstractEventLoop) -> SSHHandle:
        pkg = self.package()
        with host.lock:
            self._prepare_host(host, pkg)
            assert host.probe is not None
            capacity = self.procs_per_host or int(host.probe.get("cpus") or 1)
            if not host.reserve(capacity):
                raise StartError(
                    f"host {host.conn.label} already runs {host.machines} machine(s), its "
                    f"limit ({'--procs-per-host' if self.procs_per_host else 'its CPU count'}"
                    f"); add hosts or raise --procs-per-host")
        try:
            return self._boot(host, pkg, spec, output, loop)
        except BaseException:
            host.release()  # a machine that failed to start holds no slot
            raise

    def _boot(self, host: _Host, pkg: Package, spec: BootSpec, output: OutputSink,
              loop: asyncio.AbstractEventLoop) -> SSHHandle:
        """Write the machine's boot record on ``host`` and launch it there."""
        conn = host.conn
        record = spec.boot_record(**{"bind": "0.0.0.0", "advertise": conn.address,
                                     "env": spec.env, **host.boot_extra})
        boot_path = posixpath.join(host.cache, f"boot-{spec.session_id}-{spec.name}.json")
        # Created with mode 0600 (umask 077) and only if absent (noclobber). Not SFTP: it
        # creates files with the server's umask, and a chmod after the open leaves a moment
        # in which another user may open the file and read the key once it is written.
        status, _, err = conn.run(["sh", "-c", 'umask 077 && set -C && cat > "$1"', "sh",
                                   boot_path], stdin=json.dumps(record).encode(), timeout=60)
        if status != 0:
            raise StartError(f"machine {spec.name} on {conn.label}: cannot write its boot "
                             f"record {boot_path}: {err.decode(errors='replace').strip()}")
        _, _, args = split_program(self.program())
        cmd = [self.python, "-", "launch", "--package", pkg.digest, "--boot", boot_path,
               "--cache", host.cache, "--python", self.python, "--name", spec.name,
               "--timeout", str(self.start_timeout), "--", *args]
        status, out, err = conn.run(cmd, stdin=remote.source().encode(),
                                    timeout=self.start_timeout + 30)
        try:
            report = json.loads(out)
        except ValueError:
            raise StartError(
                f"machine {spec.name} on {conn.label}: the bootstrap failed (exit status "
                f"{status}): {err.decode(errors='replace').strip()[-2000:]}") from None
        if not report.get("ok"):
            tail = report.get("tail") or "(no output)"
            raise StartError(f"machine {spec.name} on {conn.label} failed to start: "
                             f"{report.get('error')}. Its last output:\n{tail}")
        handle = SSHHandle(spec.name, host, int(report["pid"]), str(report["log"]),
                           str(report["addr"]), int(report.get("maxprocs", 1)), loop, output,
                           report.get("oom_kills"))
        self._handles.append(handle)
        return handle

    async def shutdown(self) -> None:
        await asyncio.gather(*(h.kill() for h in self._handles), return_exceptions=True)
        self._handles.clear()
        for host in self._hosts:
            host.conn.close()

    def boot_settings(self) -> dict[str, Any]:
        return {"keepalive_timeout": self.keepalive_timeout}
