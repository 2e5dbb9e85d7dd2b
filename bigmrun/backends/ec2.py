"""The EC2 system: machines on EC2 instances that bigmrun starts, tags and terminates.

How this works
--------------
EC2 provisions, SSH bootstraps. This module only deals with AWS (boto3, through
``_aws``); everything from the SSH login on is the SSH system's own code path: the
system holds an :class:`~bigmrun.backends.ssh.SSHSystem` created with no hosts, adds
each instance as a host (``add_host``) and starts the machine with ``launch_on``, which
probes the interpreter, uploads the package if missing and launches the machine
detached, exactly as for ``--system ssh``.

Once per session (at the first launch): resolve the AMI (default: the newest image of
a distribution whose own ``python3`` has the driver's minor version, so the
interpreter check passes: see :data:`DEFAULT_IMAGES`), make a key pair and a security
group named ``bigmrun-<session>`` unless ``key_name``/``security_group`` name the
user's own. The group admits SSH (22) and the RPC port (:data:`DEFAULT_RPC_PORT`; every
machine binds it) only from the group itself and from the driver's address (/32): given
as ``driver_cidr``, else learnt per instance -- the local address that routes to a
private IP, or the driver's public address (checkip.amazonaws.com) for a public IP.

Per machine, one instance: ``RunInstances`` (spot first when asked, falling back to
on-demand when spot capacity is missing, and saying so) with
InstanceInitiatedShutdownBehavior=terminate, tags of the ``bigmrun:`` family
(session, user, program, machine), the given subnet, private IP, instance profile,
disk size and extra tags. Wait until it runs, dial its public IP if it has one else its
private IP, wait for its SSH banner and login (bounded by ``boot_timeout``), then
bootstrap as above. If anything fails, the instance is terminated before the error
(naming the instance) becomes the machine's ``err``; the other machines go on.

Cost safety: the machine's boot record carries ``on_keepalive_loss`` (default
``sudo -n poweroff``), which the supervisor runs when the driver's keepalives stop, so an
instance whose driver died powers off, and with shutdown behaviour "terminate" is gone
within minutes. A machine that ends or is stopped has its instance terminated at once;
at shutdown the driver terminates every instance of its session (also any the API lost
track of, found by tag), then deletes the per-session key pair and, once the instances
are gone, the security group. ``bigmrun down`` removes whatever a killed driver left.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import ipaddress
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..bootstrap.package import Package, split_program
from ..bootstrap.program import Program
from ..errors import BigmrunError, ConfigError, StartError
from . import _aws
from ._aws import call, tag_list
from ._base import BootSpec, MachineHandle, OutputSink, System, default_keepalive_timeout
from ._sshconn import HostSpec
from .ssh import SSHHandle, SSHSystem, _Host

#: The TCP port every EC2 machine serves RPC on (the security group opens only it and 22).
DEFAULT_RPC_PORT = 7707
#: Seconds for an instance to run and answer SSH.
DEFAULT_BOOT_TIMEOUT = 300.0
#: What a machine runs when the driver's keepalives stop: power the instance off.
DEFAULT_POWEROFF = "sudo -n poweroff || sudo -n /sbin/shutdown -h now"
_STATES_GONE = ("shutting-down", "terminated", "stopping", "stopped")


@dataclass(frozen=True)
class ImageChoice:
    """A default AMI: the newest image of ``owner`` whose name matches ``pattern``."""

    owner: str
    pattern: str  # "{arch}" becomes amd64 or arm64
    user: str  # the image's SSH login user
    distro: str


#: Default images by the driver's Python (major, minor): each distribution's own python3
#: has that version. Debian's images come from account 136693071363, Canonical's from
#: 099720109477.
DEFAULT_IMAGES: dict[tuple[int, int], ImageChoice] = {
    (3, 10): ImageChoice("099720109477",
                         "ubuntu/images/hvm-ssd*/ubuntu-jammy-22.04-{arch}-server-*",
                         "ubuntu", "Ubuntu 22.04"),
    (3, 11): ImageChoice("136693071363", "debian-12-{arch}-*", "admin", "Debian 12"),
    (3, 12): ImageChoice("099720109477",
                         "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-{arch}-server-*",
                         "ubuntu", "Ubuntu 24.04"),
    (3, 13): ImageChoice("136693071363", "debian-13-{arch}-*", "admin", "Debian 13"),
}

#: Login users of well-known images, guessed from an AMI's name when --ami is given.
_USERS = (("ubuntu", "ubuntu"), ("debian", "admin"), ("al2023", "ec2-user"),
          ("amzn", "ec2-user"), ("amazon linux", "ec2-user"), ("rhel", "ec2-user"),
          ("suse", "ec2-user"), ("fedora", "fedora"), ("centos", "centos"),
          ("rocky", "rocky"), ("almalinux", "ec2-user"))


def arch() -> str:
    """The driver's CPU architecture in AMI names: ``amd64`` or ``arm64``."""
    return "arm64" if platform.machine().lower() in ("aarch64", "arm64") else "amd64"


def default_instance_type() -> str:
    return "m7g.large" if arch() == "arm64" else "m7i.large"


def login_user(image: dict[str, Any]) -> str | None:
    """The SSH user of a well-known image, from its name and description (or None)."""
    text = f"{image.get('Name', '')} {image.get('Description', '')}".lower()
    return next((user for key, user in _USERS if key in text), None)


def _env(value: Any, var: str) -> Any:
    return value if value not in (None, "") else (os.environ.get(var) or None)


def _number(value: Any, var: str, option: str, kind: type = int) -> Any:
    """``value`` or ``$var`` as an int/float (None when neither is set)."""
    raw = _env(value, var)
    if raw is None:
        return None
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{option} ({var}) must be a number, got {raw!r}") from None


def _env_bool(var: str) -> bool:
    return os.environ.get(var, "").lower() in ("1", "true", "yes", "on")


def _parse_ips(value: str | list[str] | None) -> list[str]:
    items = (value.split(",") if isinstance(value, str) else list(value or []))
    out = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            out.append(str(ipaddress.ip_address(item)))
        except ValueError:
            raise ConfigError(f"--ec2-private-ips: {item!r} is not an IP address") from None
    return out


def _parse_tags(value: str | dict[str, str] | None) -> dict[str, str]:
    if isinstance(value, dict):
        pairs = list(value.items())
    else:
        pairs = []
        for item in (value or "").split(","):
            if not item.strip():
                continue
            key, sep, val = item.partition("=")
            if not sep:
                raise ConfigError(f"--tags: {item!r} is not KEY=VALUE")
            pairs.append((key.strip(), val.strip()))
    for key, _ in pairs:
        if not key or key.lower().startswith(("aws:", "bigmrun:")):
            raise ConfigError(f"--tags: bad tag key {key!r} (empty, or a reserved prefix "
                              f"aws: or bigmrun:)")
    return dict(pairs)


def _source_address(ip: str) -> str:
    """The local address this host uses to reach ``ip`` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((ip, 22))
        return str(s.getsockname()[0])


def _public_address() -> str:
    """The driver's public address, as AWS's checkip service sees it."""
    import urllib.request

    try:
        with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=10) as r:
            text = r.read(100).decode().strip()
        return str(ipaddress.ip_address(text))
    except (OSError, ValueError) as e:
        raise StartError(
            f"cannot learn the driver's public address from checkip.amazonaws.com ({e}), "
            f"needed to let it through the security group: pass --ec2-driver-cidr "
            f"ADDRESS/32") from e


def _annotated(e: BigmrunError, prefix: str, suffix: str) -> BigmrunError:
    """``e``'s type with a message that names the instance (StartError if impossible)."""
    message = f"{prefix}{e}{suffix}"
    try:
        new = type(e)(message)
    except TypeError:
        new = StartError(message)
    new.temporary = e.temporary
    return new


class EC2Handle(MachineHandle):
    """A machine on its own instance: the SSH handle, plus the instance it lives on."""

    def __init__(self, inner: SSHHandle, instance_id: str, address: str, market: str,
                 instance_type: str, system: EC2System) -> None:
        self.inner = inner
        self.name = inner.name
        self.addr = inner.addr
        self.maxprocs = inner.maxprocs
        self.exited = inner.exited
        self.instance_id = instance_id
        self.address = address
        self.market = market
        self.instance_type = instance_type
        self._system = system

    async def kill(self, timeout: float = 5.0) -> None:
        await self.inner.kill(timeout)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(loop.run_in_executor(
                self._system._pool, self._system._terminate, [self.instance_id],
                f"machine {self.name} stopped"), timeout)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "instance": self.instance_id,
                "instance_type": self.instance_type, "market": self.market,
                "address": self.address}


class EC2System(System):
    """Machines on EC2 instances, one instance per machine.

    Settings default to the launcher's ``BIGMRUN_EC2_*`` variables (see ``bigmrun
    --help``), then to boto3's own chain (region, credentials).

    Args:
        region, endpoint_url: the EC2 region and endpoint (an emulator such as moto).
        instance_type: default ``m7i.large`` (``m7g.large`` on an arm64 driver).
        ami: image id; default: the newest image from :data:`DEFAULT_IMAGES`.
        spot: ask for spot instances, falling back to on-demand without capacity.
        key_name, key_filename: an existing key pair and its private key file; default:
            a key pair made for the session (deleted at shutdown).
        ssh_user: login user; default: the image's (admin, ubuntu, ec2-user...).
        security_group: an existing group (id or name) that admits SSH and ``rpc_port``;
            default: a group made for the session (deleted at shutdown).
        subnet, instance_profile, disk_size (GiB), tags (``"k=v,k2=v2"`` or a dict).
        private_ips: one address per machine, in start order (needs ``subnet``).
        driver_cidr: the address range the session's group admits as the driver.
        rpc_port: the port machines serve on. boot_timeout: seconds for an instance to
            run and answer SSH. poweroff_command: shell command a machine runs when
            keepalives stop (``"none"``: nothing).
        python, known_hosts, accept_new_host_keys, remote_cache, start_timeout: as for
            the SSH system. Without ``known_hosts``, each instance's host key is recorded
            on first use in a file private to the session.
    """

    name = "ec2"
    shutdown_timeout = 180.0

    def __init__(self, *, region: str | None = None, endpoint_url: str | None = None,
                 instance_type: str | None = None, ami: str | None = None,
                 spot: bool | None = None, key_name: str | None = None,
                 key_filename: str | None = None, ssh_user: str | None = None,
                 security_group: str | None = None, subnet: str | None = None,
                 instance_profile: str | None = None, disk_size: int | None = None,
                 tags: str | dict[str, str] | None = None,
                 private_ips: str | list[str] | None = None, driver_cidr: str | None = None,
                 rpc_port: int | None = None, boot_timeout: float | None = None,
                 poweroff_command: str | None = None, python: str | None = None,
                 known_hosts: str | None = None, accept_new_host_keys: bool | None = None,
                 remote_cache: str | None = None, keepalive_timeout: float | None = None,
                 keepalive_interval: float = 1.0, start_timeout: float = 180.0,
                 program: Program | None = None, package: Package | None = None) -> None:
        self.instance_type = (_env(instance_type, "BIGMRUN_EC2_INSTANCE_TYPE")
                              or default_instance_type())
        self.ami = _env(ami, "BIGMRUN_EC2_AMI")
        self.spot = spot if spot is not None else _env_bool("BIGMRUN_EC2_SPOT")
        self.key_name = _env(key_name, "BIGMRUN_EC2_KEY_NAME")
        self.ssh_user = _env(ssh_user, "BIGMRUN_EC2_SSH_USER")
        self.security_group = _env(security_group, "BIGMRUN_EC2_SECURITY_GROUP")
        self.subnet = _env(subnet, "BIGMRUN_EC2_SUBNET")
        self.instance_profile = _env(instance_profile, "BIGMRUN_EC2_INSTANCE_PROFILE")
        self.disk_size = _number(disk_size, "BIGMRUN_EC2_DISK_SIZE", "--disk-size")
        self.tags = _parse_tags(_env(tags, "BIGMRUN_EC2_TAGS"))
        self.private_ips = _parse_ips(_env(private_ips, "BIGMRUN_EC2_PRIVATE_IPS"))
        if self.private_ips and not self.subnet:
            raise ConfigError("--ec2-private-ips needs --subnet (the addresses are in it)")
        cidr = _env(driver_cidr, "BIGMRUN_EC2_DRIVER_CIDR")
        try:
            self.driver_cidr = str(ipaddress.ip_network(cidr, strict=False)) if cidr else None
        except ValueError:
            raise ConfigError(f"--ec2-driver-cidr: {cidr!r} is not an address range "
                              f"such as 203.0.113.7/32") from None
        self.rpc_port = (_number(rpc_port, "BIGMRUN_EC2_RPC_PORT", "--ec2-rpc-port")
                         or DEFAULT_RPC_PORT)
        if not 0 < self.rpc_port < 65536 or self.rpc_port == 22:
            raise ConfigError(f"--ec2-rpc-port {self.rpc_port}: choose a port in 1-65535 "
                              f"other than 22")
        self.boot_timeout = (_number(boot_timeout, "BIGMRUN_EC2_BOOT_TIMEOUT",
                                     "--ec2-boot-timeout", float) or DEFAULT_BOOT_TIMEOUT)
        poweroff = _env(poweroff_command, "BIGMRUN_EC2_POWEROFF_COMMAND") or DEFAULT_POWEROFF
        self.poweroff_command = None if poweroff.strip().lower() == "none" else poweroff
        self.keepalive_timeout = keepalive_timeout or default_keepalive_timeout()
        self.keepalive_interval = keepalive_interval
        self.start_timeout = self.boot_timeout + start_timeout
        # Fails here, before anything starts, without a region or credentials.
        self.ec2 = _aws.ec2_client(_env(region, "BIGMRUN_EC2_REGION"),
                                   _env(endpoint_url, "BIGMRUN_EC2_ENDPOINT"))
        self.region: str = self.ec2.meta.region_name
        #: A 0700 directory for the session's private key and known_hosts (made when
        #: needed, removed at shutdown).
        self._tmp: str | None = None
        given_known_hosts = _env(known_hosts, "BIGMRUN_SSH_KNOWN_HOSTS")
        self._own_known_hosts = not given_known_hosts
        accept_new = (accept_new_host_keys if accept_new_host_keys is not None
                      else _env_bool("BIGMRUN_ACCEPT_NEW_HOST_KEYS"))
        key_filename = _env(key_filename, "BIGMRUN_SSH_KEY") if self.key_name else None
        self._ssh = SSHSystem(
            add_hosts_later=True, procs_per_host=1, python=python,
            key_filename=key_filename, known_hosts=given_known_hosts,
            accept_new_host_keys=accept_new if given_known_hosts else True,
            remote_cache=remote_cache, keepalive_timeout=self.keepalive_timeout,
            keepalive_interval=keepalive_interval, start_timeout=start_timeout,
            program=program, package=package)
        self._pool = ThreadPoolExecutor(64, thread_name_prefix="bigmrun-ec2")
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._setup_lock = threading.Lock()
        self._setup_error: BigmrunError | None = None
        self.session: str | None = None
        self._ready = False
        self.image_id: str | None = None
        self.login: str | None = None
        self._root_device: str | None = None
        self.group_id: str | None = None
        self._made_key: str | None = None
        self._made_group: str | None = None
        self._allowed: set[str] = set()
        self._public: str | None = None
        self._base_tags: dict[str, str] = {}
        self._next = 0
        self._inflight = 0
        self._closing = False
        #: Instance id -> machine name, for every instance this system started.
        self.instances: dict[str, str] = {}
        self._terminated: set[str] = set()
        #: Machines that asked for spot and got on-demand instead.
        self.spot_fallbacks: list[str] = []

    # --- System -------------------------------------------------------------------------

    async def launch(self, spec: BootSpec, output: OutputSink) -> MachineHandle:
        loop = asyncio.get_running_loop()
        slot = self._next
        self._next += 1
        return await loop.run_in_executor(self._pool, self._launch, slot, spec, output, loop)

    def boot_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"keepalive_timeout": self.keepalive_timeout}
        if self.poweroff_command:
            settings["on_keepalive_loss"] = ["sh", "-c", self.poweroff_command]
        return settings

    async def shutdown(self) -> None:
        with self._lock:
            self._closing = True
        await self._ssh.shutdown()
        await asyncio.get_running_loop().run_in_executor(self._pool, self._cleanup)
        self._pool.shutdown(wait=False)

    @property
    def uploaded_bytes(self) -> int:
        return self._ssh.uploaded_bytes

    # --- once per session ---------------------------------------------------------------

    def _setup(self, session: str) -> None:
        """Once: the AMI, key pair and group; a failure fails every machine alike."""
        with self._setup_lock:
            if self._setup_error is not None:
                raise self._setup_error
            if self._ready:
                return
            self.session = session  # from here on, shutdown cleans up what was made
            try:
                self._do_setup(session)
            except BigmrunError as e:
                self._setup_error = e
                raise
            except Exception as e:
                self._setup_error = StartError(
                    f"preparing the EC2 session failed: {type(e).__name__}: {e}")
                raise self._setup_error from e
            self._ready = True

    def _do_setup(self, session: str) -> None:
        try:
            user = getpass.getuser()
        except Exception:
            user = "?"
        self._base_tags = {_aws.TAG_SESSION: session, _aws.TAG_USER: user,
                           _aws.TAG_PROGRAM: self._program_name(),
                           _aws.TAG_DRIVER_HOST: socket.gethostname()}
        self.resolve_image()
        if self._own_known_hosts:  # new instances' keys, recorded on first use
            self._ssh.known_hosts = os.path.join(self._private_dir(), "known_hosts")
        if self.key_name is None:
            self._make_key_pair(session)
        if self.security_group:
            self.group_id = self._find_group(self.security_group)
        else:
            self._make_group(session)

    def _program_name(self) -> str:
        """The program's file or module (never its arguments: tags are widely readable)."""
        try:
            script, module, _ = split_program(self._ssh.program())
        except BigmrunError:
            return "?"
        return os.path.basename(script) if script else f"-m {module}"

    def resolve_image(self) -> tuple[str, str]:
        """Find the AMI (``ami`` or the default for the driver's Python) and its login
        user; returns ``(image id, user)``. Raises ConfigError when there is none."""
        if self.ami:
            images = call(self.ec2, "DescribeImages", f"AMI {self.ami}",
                          ImageIds=[self.ami])["Images"]
            if not images:
                raise ConfigError(f"AMI {self.ami} was not found in {self.region}")
            image = images[0]
            user = self.ssh_user or login_user(image)
            if user is None:
                raise ConfigError(f"cannot tell the SSH login user of AMI {self.ami} "
                                  f"({image.get('Name', '?')}): pass --ssh-user")
        else:
            version = sys.version_info[:2]
            choice = DEFAULT_IMAGES.get((version[0], version[1]))
            if choice is None:
                raise ConfigError(
                    f"no default AMI has Python {version[0]}.{version[1]} (the driver's): "
                    f"pass --ami with an image whose python3 is {version[0]}.{version[1]} "
                    f"(or --python PATH for one installed there), and --ssh-user")
            pattern = choice.pattern.format(arch=arch())
            images = call(self.ec2, "DescribeImages", f"default {choice.distro} image",
                          Owners=[choice.owner],
                          Filters=[{"Name": "name", "Values": [pattern]},
                                   {"Name": "state", "Values": ["available"]}])["Images"]
            if not images:
                raise ConfigError(
                    f"no {choice.distro} image (owner {choice.owner}, name {pattern}) in "
                    f"{self.region}: pass --ami with an image whose python3 is "
                    f"{version[0]}.{version[1]}, and --ssh-user")
            image = max(images, key=lambda i: (i.get("CreationDate", ""), i.get("Name", "")))
            user = self.ssh_user or choice.user
        self.image_id = str(image["ImageId"])
        self.login = user
        self._root_device = image.get("RootDeviceName")
        return self.image_id, user

    def _make_key_pair(self, session: str) -> None:
        name = f"{_aws.RESOURCE_PREFIX}{session}"
        made = call(self.ec2, "CreateKeyPair", "the session's key pair", KeyName=name,
                    KeyType="ed25519", TagSpecifications=[
                        {"ResourceType": "key-pair", "Tags": tag_list(self._base_tags)}])
        self._made_key = name
        path = os.path.join(self._private_dir(), f"{name}.key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(made["KeyMaterial"])
        self._ssh.key_filename = path

    def _private_dir(self) -> str:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="bigmrun-ec2-")  # mode 0700
        return self._tmp

    def _find_group(self, group: str) -> str:
        if group.startswith("sg-"):
            return group
        found = call(self.ec2, "DescribeSecurityGroups", f"security group {group}",
                     Filters=[{"Name": "group-name", "Values": [group]}])["SecurityGroups"]
        if not found:
            raise ConfigError(f"no security group named {group!r} in {self.region}")
        return str(found[0]["GroupId"])

    def _vpc(self) -> str:
        if self.subnet:
            subnets = call(self.ec2, "DescribeSubnets", f"subnet {self.subnet}",
                           SubnetIds=[self.subnet])["Subnets"]
            return str(subnets[0]["VpcId"])
        vpcs = call(self.ec2, "DescribeVpcs", "the default VPC",
                    Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise ConfigError(f"{self.region} has no default VPC: pass --subnet SUBNET-ID")
        return str(vpcs[0]["VpcId"])

    def _permissions(self, group: str | None = None,
                     cidr: str | None = None) -> list[dict[str, Any]]:
        perms = []
        for port in (22, self.rpc_port):
            p: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": port, "ToPort": port}
            if group:
                p["UserIdGroupPairs"] = [{"GroupId": group,
                                          "Description": "bigmrun machines of the session"}]
            if cidr:
                net = ipaddress.ip_network(cidr, strict=False)
                if net.version == 4:
                    p["IpRanges"] = [{"CidrIp": str(net), "Description": "bigmrun driver"}]
                else:
                    p["Ipv6Ranges"] = [{"CidrIpv6": str(net), "Description": "bigmrun driver"}]
            perms.append(p)
        return perms

    def _make_group(self, session: str) -> None:
        name = f"{_aws.RESOURCE_PREFIX}{session}"
        gid = call(self.ec2, "CreateSecurityGroup", "the session's security group",
                   GroupName=name, VpcId=self._vpc(),
                   Description=f"bigmrun session {session}: SSH and RPC from its driver "
                               f"and its machines only",
                   TagSpecifications=[{"ResourceType": "security-group",
                                       "Tags": tag_list(self._base_tags)}])["GroupId"]
        self._made_group = self.group_id = str(gid)
        call(self.ec2, "AuthorizeSecurityGroupIngress", "the session's security group",
             GroupId=gid, IpPermissions=self._permissions(group=gid))
        if self.driver_cidr:
            self._allow(self.driver_cidr)

    def _allow(self, cidr: str) -> None:
        """Let ``cidr`` reach SSH and RPC through the session's own group (once)."""
        with self._lock:
            if cidr in self._allowed or self._made_group is None:
                return
            self._allowed.add(cidr)
        try:
            call(self.ec2, "AuthorizeSecurityGroupIngress", "the driver's address",
                 GroupId=self._made_group, IpPermissions=self._permissions(cidr=cidr))
        except BigmrunError as e:
            if _aws.error_code(e.__cause__) != "InvalidPermission.Duplicate":
                with self._lock:
                    self._allowed.discard(cidr)
                raise

    def _allow_driver_to(self, ip: str) -> None:
        """Open the session's group to the address the driver reaches ``ip`` from."""
        if self._made_group is None or self.driver_cidr:
            return
        if ipaddress.ip_address(ip).is_global:
            with self._lock:
                public = self._public
            if public is None:
                public = _public_address()
                with self._lock:
                    self._public = public
            source = public
        else:
            source = _source_address(ip)
        self._allow(f"{source}/{128 if ':' in source else 32}")

    # --- once per machine -------------------------------------------------------------

    def _launch(self, slot: int, spec: BootSpec, output: OutputSink,
                loop: asyncio.AbstractEventLoop) -> EC2Handle:
        self._setup(spec.session_id)
        wanted = None
        if self.private_ips:
            if slot >= len(self.private_ips):
                raise ConfigError(f"machine {spec.name} has no address: --ec2-private-ips "
                                  f"lists {len(self.private_ips)}, one per machine")
            wanted = self.private_ips[slot]
        deadline = time.monotonic() + self.boot_timeout
        iid, market = self._run_instance(spec, wanted)
        address = "?"
        try:
            inst = self._wait_running(iid, deadline)
            public = inst.get("PublicIpAddress")
            address = str(public or inst["PrivateIpAddress"])
            self._allow_driver_to(address)
            self._wait_ssh(address, deadline)
            assert self.login is not None
            host = self._ssh.add_host(HostSpec(address, self.login, 22),
                                      system_host_keys=False)
            host.boot_extra = {"port": self.rpc_port,
                               "advertise": (public and inst.get("PublicDnsName")) or address}
            self._login(host, deadline)
            inner = self._ssh.launch_on(host, spec, output, loop)
        except BaseException as e:
            self._terminate([iid], f"machine {spec.name} failed to start")
            if isinstance(e, BigmrunError):
                raise _annotated(e, f"instance {iid} ({address}): ",
                                 "; the instance was terminated") from e
            if isinstance(e, Exception):
                raise StartError(f"instance {iid} ({address}): {type(e).__name__}: {e}; "
                                 f"the instance was terminated") from e
            raise
        handle = EC2Handle(inner, iid, address, market, str(inst.get("InstanceType", "")),
                           self)

        def ended(_: Any) -> None:  # one machine per instance: its instance goes with it
            with contextlib.suppress(RuntimeError):
                self._pool.submit(self._terminate, [iid], f"machine {spec.name} ended")

        loop.call_soon_threadsafe(handle.exited.add_done_callback, ended)
        return handle

    def _run_params(self, spec: BootSpec, ip: str | None) -> dict[str, Any]:
        assert self.group_id is not None
        tags = {**self._base_tags, _aws.TAG_MACHINE: spec.name,
                "Name": f"bigmrun-{spec.session_id}-{spec.name}", **self.tags}
        params: dict[str, Any] = {
            "ImageId": self.image_id, "InstanceType": self.instance_type,
            "MinCount": 1, "MaxCount": 1,
            "KeyName": self.key_name or self._made_key,
            "SecurityGroupIds": [self.group_id],
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": "required"},
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tag_list(tags)},
                                  {"ResourceType": "volume", "Tags": tag_list(tags)}],
        }
        if self.subnet:
            params["SubnetId"] = self.subnet
        if ip:
            params["PrivateIpAddress"] = ip
        if self.instance_profile:
            key = "Arn" if self.instance_profile.startswith("arn:") else "Name"
            params["IamInstanceProfile"] = {key: self.instance_profile}
        if self.disk_size:
            params["BlockDeviceMappings"] = [{
                "DeviceName": self._root_device or "/dev/xvda",
                "Ebs": {"VolumeSize": self.disk_size, "VolumeType": "gp3",
                        "DeleteOnTermination": True}}]
        return params

    def _run_instance(self, spec: BootSpec, ip: str | None) -> tuple[str, str]:
        """Start the machine's instance: spot first if asked, else (or then) on-demand."""
        import botocore.exceptions as bce

        params = self._run_params(spec, ip)
        for market in (["spot", "on-demand"] if self.spot else ["on-demand"]):
            p = dict(params)
            if market == "spot":
                p["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                    "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
            with self._lock:
                if self._closing:
                    raise StartError(f"machine {spec.name}: the session is shutting down")
                self._inflight += 1
            try:
                iid = str(self.ec2.run_instances(**p)["Instances"][0]["InstanceId"])
                with self._lock:
                    self.instances[iid] = spec.name
                    closing = self._closing
            except (bce.ClientError, bce.BotoCoreError) as e:
                code = _aws.error_code(e)
                if market == "spot" and (code in _aws.CAPACITY or code == "Unsupported"):
                    _aws.say(f"{spec.name}: no spot instance {self.instance_type} to be had "
                             f"({code}: {e.response['Error'].get('Message', '')}); starting "
                             f"it on demand instead")
                    with self._lock:
                        self.spot_fallbacks.append(spec.name)
                    continue
                raise _aws.translate("RunInstances", e, f"machine {spec.name}, {market} "
                                     f"{self.instance_type}") from e
            finally:
                with self._lock:
                    self._inflight -= 1
                    self._idle.notify_all()
            if closing:
                self._terminate([iid], "the session shut down while it started")
                raise StartError(f"machine {spec.name}: the session shut down while its "
                                 f"instance {iid} started (terminated it)")
            return iid, market
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait_running(self, iid: str, deadline: float) -> dict[str, Any]:
        import botocore.exceptions as bce

        state = "unknown"
        while True:
            inst = None
            try:
                resp = self.ec2.describe_instances(InstanceIds=[iid])
                inst = resp["Reservations"][0]["Instances"][0]
            except bce.ClientError as e:  # a new instance may not be visible yet
                if _aws.error_code(e) != "InvalidInstanceID.NotFound":
                    raise _aws.translate("DescribeInstances", e, iid) from e
            except bce.BotoCoreError as e:
                raise _aws.translate("DescribeInstances", e, iid) from e
            if inst is not None:
                state = inst["State"]["Name"]
                if state == "running" and (inst.get("PublicIpAddress")
                                           or inst.get("PrivateIpAddress")):
                    return dict(inst)
                if state in _STATES_GONE:
                    reason = (inst.get("StateReason") or {}).get("Message") or "no reason given"
                    raise StartError(f"the instance is {state} before it ran: {reason}")
            if time.monotonic() > deadline:
                raise StartError(f"the instance was not running after {self.boot_timeout:g}s "
                                 f"(state {state}); raise --ec2-boot-timeout")
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    def _wait_ssh(self, address: str, deadline: float) -> None:
        """Wait (bounded) for an SSH banner on ``address``: sshd starts after boot."""
        last = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartError(
                    f"no SSH server answered on {address}:22 within {self.boot_timeout:g}s "
                    f"of the launch ({last}). If the instance is up, check that {address} "
                    f"is reachable from here and that the security group admits the driver "
                    f"(--ec2-driver-cidr); or raise --ec2-boot-timeout")
            try:
                with socket.create_connection((address, 22), timeout=min(5.0, left)) as s:
                    s.settimeout(min(5.0, max(0.5, deadline - time.monotonic())))
                    if s.recv(4) == b"SSH-":
                        return
                    last = "no SSH banner"
            except OSError as e:
                last = str(e) or type(e).__name__
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _login(self, host: _Host, deadline: float) -> None:
        """Log in, retrying while the instance finishes booting (its key may come late);
        a host key problem is never retried."""
        import paramiko

        while True:
            try:
                host.conn.connect()
                return
            except StartError as e:
                cause = e.__cause__
                host_key = isinstance(cause, paramiko.BadHostKeyException) or (
                    isinstance(cause, paramiko.SSHException) and "known_hosts" in str(cause))
                if host_key or time.monotonic() > deadline:
                    raise
            time.sleep(2.0)

    # --- cleanup ------------------------------------------------------------------------

    def _terminate(self, ids: list[str], why: str) -> None:
        with self._lock:
            ids = [i for i in ids if i not in self._terminated]
            self._terminated.update(ids)
        if not ids:
            return
        try:
            _aws.terminate(self.ec2, ids, why)
        except BigmrunError as e:
            with self._lock:
                self._terminated.difference_update(ids)
            _aws.say(f"could not terminate {', '.join(ids)} ({why}): {e}. `bigmrun down "
                     f"--session {self.session}` terminates them")

    def _cleanup(self) -> None:
        """Terminate the session's instances; delete its key pair and security group."""
        try:
            with self._idle:
                self._idle.wait_for(lambda: self._inflight == 0, timeout=60)
            session = self.session
            if session is None:
                return  # nothing was ever made
            with self._lock:
                ids = set(self.instances)
            try:  # also instances whose RunInstances reply was lost
                ids.update(r["instance"] for r in _aws.list_instances(self.ec2, session))
            except BigmrunError as e:
                _aws.say(f"cannot list the session's instances: {e}")
            if ids:
                try:
                    _aws.terminate(self.ec2, sorted(ids), "shutdown")
                except BigmrunError as e:
                    _aws.say(f"could not terminate {', '.join(sorted(ids))}: {e}. Run "
                             f"`bigmrun down --session {session}`")
            if self._made_key:
                try:
                    call(self.ec2, "DeleteKeyPair", KeyName=self._made_key)
                except BigmrunError as e:
                    _aws.say(f"could not delete key pair {self._made_key}: {e}")
            if self._made_group:
                left = _aws.wait_terminated(self.ec2, sorted(ids), self.shutdown_timeout - 30)
                try:
                    _aws.delete_security_group(self.ec2, self._made_group, 20.0)
                except BigmrunError as e:
                    _aws.say(f"could not delete security group {self._made_group} "
                             f"({len(left)} instance(s) still shutting down): {e}. "
                             f"`bigmrun down --session {session}` deletes it later")
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
