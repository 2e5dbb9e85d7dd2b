"""SSH connections to hosts (paramiko), with errors translated once, here.

How this works
--------------
A host is named ``[user@]host[:port]``; ``~/.ssh/config`` fills in what is missing
(HostName, User, Port, IdentityFile), then the SSH agent and key files are tried, as
OpenSSH does. Host keys are checked against ``~/.ssh/known_hosts`` (and the system's);
an unknown host is refused unless ``accept_new_host_keys`` is set, in which case its key
is recorded in known_hosts (OpenSSH's ``StrictHostKeyChecking=accept-new``). A *changed*
host key is always refused. Every paramiko, socket and OS error becomes a
:class:`StartError` or :class:`NetworkError` saying what failed and what to do, with the
original as ``__cause__``.
"""

from __future__ import annotations

import getpass
import logging
import os
import shlex
import socket
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, StartError


@dataclass(frozen=True)
class HostSpec:
    """Where to log in: as given by the user, before ~/.ssh/config is applied."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> HostSpec:
        text = text.strip()
        if not text:
            raise ConfigError("empty host name in the host list")
        user = None
        if "@" in text:
            user, _, text = text.rpartition("@")
        port = None
        if text.startswith("["):  # [ipv6]:port
            host, _, rest = text[1:].partition("]")
            if rest.startswith(":"):
                port = _port(rest[1:], text)
        elif text.count(":") == 1:
            host, _, p = text.partition(":")
            port = _port(p, text)
        else:
            host = text
        return cls(host, user or None, port)

    def __str__(self) -> str:
        s = f"{self.user}@{self.host}" if self.user else self.host
        return f"{s}:{self.port}" if self.port else s


def _port(p: str, text: str) -> int:
    if not p.isdigit() or not 0 < int(p) < 65536:
        raise ConfigError(f"bad port in host {text!r}: expected host:PORT with 1-65535")
    return int(p)


def parse_hosts(hosts: str | list[str]) -> list[HostSpec]:
    """``"u@h1,h2:2222"`` or a list of such entries."""
    items = hosts.split(",") if isinstance(hosts, str) else list(hosts)
    specs = [HostSpec.parse(h) for h in items if h.strip()]
    if not specs:
        raise ConfigError("the ssh system needs at least one host: --hosts user@host[:port]")
    return specs


class _AcceptNew:
    """paramiko host key policy: record an unknown host's key (accept-new)."""

    def __init__(self, path: str, lock: threading.Lock) -> None:
        self.path = path
        self.lock = lock

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        import paramiko

        with self.lock:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            entry = paramiko.hostkeys.HostKeyEntry([hostname], key)
            with open(self.path, "a") as f:
                f.write(entry.to_line())
        client.get_host_keys().add(hostname, key.get_name(), key)


_known_hosts_lock = threading.Lock()
# paramiko narrates every login and SFTP session at INFO; our users' logs are theirs.
logging.getLogger("paramiko").setLevel(logging.WARNING)


class SSHHost:
    """A logged-in SSH connection to one host (thread-safe: channels are independent)."""

    def __init__(self, spec: HostSpec, *, key_filename: str | None = None,
                 known_hosts: str | None = None, accept_new_host_keys: bool = False,
                 ssh_config: str | None = None, connect_timeout: float = 15.0,
                 system_host_keys: bool = True) -> None:
        self.spec = spec
        # False: trust only ``known_hosts`` (EC2: ~/.ssh/known_hosts may hold stale keys
        # of an address that a new instance now has).
        self._system_host_keys = system_host_keys
        self._key_filename = key_filename
        self._known_hosts = known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        self._accept_new = accept_new_host_keys
        self._ssh_config = ssh_config or os.path.expanduser("~/.ssh/config")
        self._timeout = connect_timeout
        self._client: Any = None
        self.hostname = spec.host
        self.user = spec.user or getpass.getuser()
        self.port = spec.port or 22
        self.address = spec.host  # the IP the driver reaches, once resolved

    def __repr__(self) -> str:
        return f"<SSHHost {self.user}@{self.hostname}:{self.port}>"

    @property
    def _known_name(self) -> str:
        """The host's name in known_hosts: ``host``, or ``[host]:port`` off port 22."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    @property
    def label(self) -> str:
        return f"{self.user}@{self.hostname}" + (f":{self.port}" if self.port != 22 else "")

    def _apply_config(self) -> list[str]:
        """Apply ~/.ssh/config; return its IdentityFiles."""
        import paramiko

        if not os.path.exists(self._ssh_config):
            return []
        cfg = paramiko.SSHConfig.from_path(self._ssh_config).lookup(self.spec.host)
        self.hostname = cfg.get("hostname", self.spec.host)
        if self.spec.user is None and cfg.get("user"):
            self.user = cfg["user"]
        if self.spec.port is None and cfg.get("port"):
            self.port = int(cfg["port"])
        return [os.path.expanduser(p) for p in cfg.get("identityfile", [])]

    def connect(self) -> SSHHost:
        """Log in (idempotent). Raises StartError with the reason and the fix."""
        if self._client is not None:
            return self
        import paramiko

        identity = self._apply_config()
        keys = [self._key_filename] if self._key_filename else identity
        client = paramiko.SSHClient()
        try:
            if self._system_host_keys:
                client.load_system_host_keys()
        except OSError:
            pass
        if os.path.exists(self._known_hosts):
            try:
                client.load_host_keys(self._known_hosts)
            except Exception as e:
                raise ConfigError(f"cannot read known_hosts {self._known_hosts}: {e}") from e
        if self._accept_new:
            client.set_missing_host_key_policy(_AcceptNew(self._known_hosts, _known_hosts_lock))
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            self.address = socket.gethostbyname(self.hostname)
            client.connect(
                self.hostname, port=self.port, username=self.user,
                key_filename=[k for k in keys if os.path.exists(k)] or None,
                timeout=self._timeout, banner_timeout=self._timeout,
                auth_timeout=self._timeout, allow_agent=True, look_for_keys=not keys,
            )
        except paramiko.BadHostKeyException as e:
            client.close()
            raise StartError(
                f"host key of {self.label} does not match known_hosts ({self._known_hosts}): "
                f"refusing to connect. If the host was legitimately re-installed, remove its "
                f"old key with `ssh-keygen -R {shlex.quote(self._known_name)} -f "
                f"{shlex.quote(self._known_hosts)}`."
            ) from e
        except paramiko.AuthenticationException as e:
            client.close()
            raise StartError(
                f"SSH login to {self.label} was refused ({e}). Check the user name, that "
                f"your key is in the host's authorized_keys, and --ssh-key / your SSH agent."
            ) from e
        except paramiko.SSHException as e:
            client.close()
            if "not found in known_hosts" in str(e):
                raise StartError(
                    f"unknown host key for {self.label}: it is not in {self._known_hosts}. "
                    f"Verify the host and add its key (ssh-keyscan, or log in once with ssh), "
                    f"or pass --accept-new-host-keys to record it on first use."
                ) from e
            raise StartError(f"SSH to {self.label} failed: {e}") from e
        except (OSError, EOFError) as e:
            client.close()
            raise StartError(f"cannot reach {self.label}: {e}") from e
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(5)
        self._client = client
        return self

    def run(self, command: list[str] | str, stdin: bytes | None = None,
            timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        """Run a command; return (exit status, stdout, stderr)."""
        import paramiko

        cmd = command if isinstance(command, str) else shlex.join(command)
        try:
            chan = self._require().get_transport().open_session(timeout=timeout)
            chan.settimeout(timeout)
            chan.exec_command(cmd)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            out = _read_all(chan, False)
            err = _read_all(chan, True)
            status = chan.recv_exit_status()
            chan.close()
            return status, out, err
        except (paramiko.SSHException, OSError, EOFError) as e:
            from ..errors import NetworkError

            raise NetworkError(f"running {cmd.split()[0]!r} on {self.label} failed: {e}") from e

    def open_stream(self, command: list[str] | str) -> Any:
        """Run a command and return its channel, to read its output as it comes."""
        cmd = command if isinstance(command, str) else shlex.join(command)
        chan = self._require().get_transport().open_session()
        chan.exec_command(cmd)
        chan.shutdown_write()
        return chan

    def sftp(self) -> Any:
        return self._require().open_sftp()

    def _require(self) -> Any:
        if self._client is None:
            self.connect()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _read_all(chan: Any, stderr: bool) -> bytes:
    parts: list[bytes] = []
    recv = chan.recv_stderr if stderr else chan.recv
    while True:
        data = recv(65536)
        if not data:
            return b"".join(parts)
        parts.append(data)
