"""Real OpenSSH servers for tests: on loopback, or as separate hosts in network namespaces.

Needs root (to add a login user and namespaces) and Debian's ``openssh-server``
(``/usr/sbin/sshd``) and ``iproute2``. Nothing here touches any address but loopback
and the namespace subnet it creates itself.

* :class:`SSHServer` runs ``sshd -D`` on ``127.0.0.1`` (or inside a namespace) with a
  throwaway host key, accepting one throwaway client key for one login user.
* :class:`NetnsHosts` makes a bridge with ``n`` namespaces on it, each a "host" with its
  own address (``10.77.0.11``, ``.12``...) running its own sshd; ``cut(k)``/``heal(k)``
  take a host's link down and up again. Each host gets its own bigmrun cache directory
  (``BIGMRUN_CACHE`` set by sshd), so hosts do not share uploads although they share the
  file system.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

SSHD = "/usr/sbin/sshd"
DEFAULT_USER = "bmr"


class Unavailable(Exception):
    """This machine cannot run the servers (not root, no sshd...): skip, with this reason."""


def check_available(netns: bool = False) -> None:
    """Raise :class:`Unavailable` with the reason when these servers cannot run here."""
    if os.geteuid() != 0:
        raise Unavailable("needs root (to add a login user and run sshd)")
    if not os.path.exists(SSHD):
        raise Unavailable("needs openssh-server (/usr/sbin/sshd)")
    if not shutil.which("ssh-keygen"):
        raise Unavailable("needs ssh-keygen (openssh-client)")
    if netns and not shutil.which("ip"):
        raise Unavailable("needs iproute2 (ip) for network namespaces")


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def ensure_user(user: str = DEFAULT_USER) -> str:
    """Create the login user if needed (unlocked for key-only login); return its home."""
    try:
        import pwd

        return pwd.getpwnam(user).pw_dir
    except KeyError:
        pass
    _run("useradd", "-m", "-s", "/bin/sh", user)
    _run("usermod", "-p", "*", user)  # with UsePAM no, a locked ('!') account is refused
    import pwd

    return pwd.getpwnam(user).pw_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Keys:
    """A throwaway client key pair and host key, in a private directory."""

    dir: str
    client_key: str
    host_key: str
    host_pub: str

    @classmethod
    def make(cls) -> Keys:
        d = tempfile.mkdtemp(prefix="bigmrun-sshd-")
        os.chmod(d, 0o755)  # sshd reads authorized_keys as the login user
        client = os.path.join(d, "client_ed25519")
        host = os.path.join(d, "host_ed25519")
        for path in (client, host):
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path)
        shutil.copy(client + ".pub", os.path.join(d, "authorized_keys"))
        os.chmod(os.path.join(d, "authorized_keys"), 0o644)
        with open(host + ".pub") as f:
            host_pub = " ".join(f.read().split()[:2])
        return cls(d, client, host, host_pub)

    def known_hosts_line(self, host: str, port: int) -> str:
        name = host if port == 22 else f"[{host}]:{port}"
        return f"{name} {self.host_pub}\n"

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class SSHServer:
    """One sshd, started by :meth:`start`, stopped by :meth:`stop` (kills by PID)."""

    keys: Keys
    host: str = "127.0.0.1"
    port: int = 0
    user: str = DEFAULT_USER
    netns: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: str = ""

    def config(self) -> str:
        d = self.keys.dir
        tag = self.netns or "lo"
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {self.keys.host_key}",
            f"PidFile {d}/sshd-{tag}.pid",
            f"AuthorizedKeysFile {d}/authorized_keys",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "UsePAM no",
            "StrictModes no",
            f"AllowUsers {self.user}",
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "Subsystem sftp internal-sftp",
        ]
        if self.env:
            lines.append("SetEnv " + " ".join(f"{k}={v}" for k, v in self.env.items()))
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> SSHServer:
        check_available()
        ensure_user(self.user)
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        if not self.port:
            self.port = free_port() if self.netns is None else 22
        tag = self.netns or "lo"
        cfg = os.path.join(self.keys.dir, f"sshd-{tag}.conf")
        with open(cfg, "w") as f:
            f.write(self.config())
        _run(SSHD, "-t", "-f", cfg)
        self.log_path = os.path.join(self.keys.dir, f"sshd-{tag}.log")
        cmd = [SSHD, "-D", "-e", "-f", cfg]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log)
        self._wait_banner(timeout)
        return self

    def _wait_banner(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                with open(self.log_path) as f:
                    raise RuntimeError(f"sshd exited: {f.read()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError as e:
                last = e
            time.sleep(0.05)
        raise RuntimeError(f"sshd on {self.host}:{self.port} did not answer: {last}")

    @property
    def target(self) -> str:
        """``user@host:port`` for ``--hosts``."""
        return f"{self.user}@{self.host}:{self.port}"

    def known_hosts_line(self) -> str:
        return self.keys.known_hosts_line(self.host, self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self.proc = None


class NetnsHosts:
    """``n`` hosts in network namespaces on a private bridge, each running sshd.

    Host ``k`` (0-based) has address ``{subnet}.{11 + k}``; the bridge (root namespace,
    where the driver runs) is ``{subnet}.1``. Use as a context manager; everything is
    torn down (processes killed by PID, namespaces and links deleted) on exit.
    """

    def __init__(self, n: int = 3, subnet: str = "10.77.0", user: str = DEFAULT_USER,
                 keys: Keys | None = None) -> None:
        check_available(netns=True)
        self.n = n
        self.subnet = subnet
        self.user = user
        self.tag = secrets.token_hex(2)
        self.bridge = f"bm{self.tag}br"
        self.keys = keys or Keys.make()
        self._own_keys = keys is None
        self.servers: list[SSHServer] = []
        self.namespaces = [f"bm{self.tag}h{k}" for k in range(n)]

    def addr(self, k: int) -> str:
        return f"{self.subnet}.{11 + k}"

    def veth(self, k: int) -> str:
        return f"bm{self.tag}h{k}a"

    def __enter__(self) -> NetnsHosts:
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _up(self) -> None:
        ensure_user(self.user)
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for k, ns in enumerate(self.namespaces):
            a, b = self.veth(k), f"bm{self.tag}h{k}b"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            _run("ip", "link", "set", b, "netns", ns)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", b, "name", "eth0")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.addr(k)}/24", "dev",
                 "eth0")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            _run("ip", "link", "set", a, "master", self.bridge)
            _run("ip", "link", "set", a, "up")
        for k, ns in enumerate(self.namespaces):
            cache = f"/tmp/bigmrun-host-{self.tag}-{k}"
            srv = SSHServer(self.keys, host=self.addr(k), port=22, user=self.user, netns=ns,
                            env={"BIGMRUN_CACHE": cache})
            self.servers.append(srv.start())

    def targets(self) -> list[str]:
        """``user@addr`` of every host, for ``--hosts``."""
        return [f"{self.user}@{self.addr(k)}" for k in range(self.n)]

    def known_hosts(self) -> str:
        return "".join(self.keys.known_hosts_line(self.addr(k), 22) for k in range(self.n))

    def cut(self, k: int) -> None:
        """Take host ``k``'s link down: it can neither send nor receive."""
        _run("ip", "link", "set", self.veth(k), "down")

    def heal(self, k: int) -> None:
        _run("ip", "link", "set", self.veth(k), "up")

    def pids(self, k: int) -> list[int]:
        """PIDs of every process running in host ``k``'s namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.namespaces[k]],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def close(self) -> None:
        for srv in self.servers:
            srv.stop()
        self.servers.clear()
        for k, ns in enumerate(self.namespaces):
            with contextlib.suppress(Exception):
                for pid in self.pids(k):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            subprocess.run(["ip", "link", "del", self.veth(k)], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        for k in range(self.n):
            shutil.rmtree(f"/tmp/bigmrun-host-{self.tag}-{k}", ignore_errors=True)
        if self._own_keys:
            self.keys.cleanup()
