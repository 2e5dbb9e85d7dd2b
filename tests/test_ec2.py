"""The EC2 system against the moto EC2 emulator, with real boto3 calls.

Instances are mapped onto hosts in network namespaces that run a real sshd: a VPC
10.77.0.0/16 with a subnet ``{PREFIX}.0/24`` (a /24 of this run's own, so a parallel
run of the SSH tests on 10.77.0.0/24 cannot collide) and explicit private IPs equal to
the namespace hosts' addresses, so ``bigmrun --system ec2`` runs bigpi end to end.

Network rule (../shared/TESTING.md): nothing here may dial anything but loopback and
the namespace subnet this module creates. Every test runs under a guard wrapping
``socket.socket.connect``/``connect_ex`` in this process and -- through a
``sitecustomize`` module put on PYTHONPATH -- in every driver and CLI subprocess: any
other address is refused and recorded, and the test fails. The in-process tests also
check the address of every SSH host the system created.

Stubs (named as such; moto cannot do these): a botocore ``before-call`` handler on the
system's own client fails a spot request for lack of capacity and refuses an operation
for lack of an IAM permission; an ``after-call`` handler installs a new key pair's
public key on the namespace hosts, as cloud-init does on a real instance.
"""

from __future__ import annotations

import getpass
import io
import ipaddress
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

import bigmrun
from bigmrun.backends import _aws
from bigmrun.bootstrap.program import Program
from bigmrun.testing.sshd import NetnsHosts, Unavailable, free_port

REPO = Path(__file__).resolve().parent.parent
BIGPI = REPO / "examples" / "bigpi.py"
PY = sys.executable
REGION = "us-east-1"


def _free_prefix() -> str:
    """``10.77.N`` for a /24 no interface here uses (another run's bridge, say)."""
    try:
        used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True,
                              text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        used = ""
    free = [n for n in range(100, 250) if f" 10.77.{n}." not in used]
    return f"10.77.{random.SystemRandom().choice(free or [100])}"


PREFIX = _free_prefix()
ALLOWED = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network(f"{PREFIX}.0/24")]
KEY_NAME = "bigmrun-test-own-key"  # not "bigmrun-<session>": a key pair the user named

pytestmark = pytest.mark.timeout(240)


# --- the network guard -----------------------------------------------------------------

def _allowed(address: Any) -> bool:
    if not isinstance(address, tuple):
        return True  # a Unix socket
    try:
        ip = ipaddress.ip_address(address[0])
    except ValueError:
        return False  # a host name: nothing here dials by name
    return ip.is_loopback or any(ip in net for net in ALLOWED)


@pytest.fixture(autouse=True)
def network_guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Refuse (and record) any connection from this process outside the allowed nets."""
    refused: list[Any] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(address: Any) -> None:
        if not _allowed(address):
            refused.append(address)
            raise OSError(f"test network guard: refusing to dial {address!r}")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield refused
    assert not refused, f"dialed outside loopback and {PREFIX}.0/24: {refused}"


GUARD_SITECUSTOMIZE = """\
# Test network guard for subprocesses (tests/test_ec2.py): refuse and record any
# connection outside loopback and the nets in $BMR_GUARD_NETS.
import ipaddress, os, socket
_nets = [ipaddress.ip_network(n) for n in os.environ["BMR_GUARD_NETS"].split(",")]
_log = os.environ["BMR_GUARD_LOG"]
def _check(address):
    if not isinstance(address, tuple):
        return
    try:
        ip = ipaddress.ip_address(address[0])
        ok = ip.is_loopback or any(ip in n for n in _nets)
    except ValueError:
        ok = False
    if not ok:
        with open(_log, "a") as f:
            f.write(repr(address) + "\\n")
        raise OSError("test network guard: refusing to dial %r" % (address,))
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
def connect(self, address):
    _check(address)
    return _connect(self, address)
def connect_ex(self, address):
    _check(address)
    return _connect_ex(self, address)
socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
"""


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("guard")
    (d / "sitecustomize.py").write_text(GUARD_SITECUSTOMIZE)
    return d


# --- moto, AWS settings, namespace hosts -------------------------------------------------

@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@dataclass
class AWS:
    url: str
    client: Any
    vpc: str
    subnet: str
    env: dict[str, str]  # for subprocesses: fake credentials and the network guard
    guard_log: Path

    def instances(self) -> list[dict[str, Any]]:
        """Every instance bigmrun tagged, any state, oldest first."""
        resp = self.client.describe_instances(
            Filters=[{"Name": "tag-key", "Values": [_aws.TAG_SESSION]}])
        return [i for r in resp["Reservations"] for i in r["Instances"]]

    def group(self, name: str) -> dict[str, Any] | None:
        groups = self.client.describe_security_groups(
            Filters=[{"Name": "group-name", "Values": [name]}])["SecurityGroups"]
        return groups[0] if groups else None

    def key_pairs(self) -> set[str]:
        return {p["KeyName"] for p in self.client.describe_key_pairs()["KeyPairs"]}

    def state(self, instance_id: str) -> str:
        resp = self.client.describe_instances(InstanceIds=[instance_id])
        return str(resp["Reservations"][0]["Instances"][0]["State"]["Name"])


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        guard_dir: Path) -> Iterator[AWS]:
    """A freshly reset moto with a VPC 10.77.0.0/16 and our subnet; fake credentials."""
    import boto3

    req = urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
    for var in list(os.environ):
        if var.startswith(("AWS_", "BIGMRUN_")):
            monkeypatch.delenv(var)
    fake = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
            "AWS_CONFIG_FILE": str(tmp_path / "no-config")}
    for k, v in fake.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("ec2", endpoint_url=moto_url, region_name=REGION)
    vpc = client.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    subnet = client.create_subnet(VpcId=vpc, CidrBlock=f"{PREFIX}.0/24")["Subnet"]["SubnetId"]
    log = tmp_path / "guard.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BIGMRUN_"))}
    env.update(fake, PYTHONPATH=str(guard_dir), BMR_GUARD_LOG=str(log),
               BMR_GUARD_NETS=",".join(str(n) for n in ALLOWED), NO_COLOR="1")
    yield AWS(moto_url, client, vpc, subnet, env, log)
    refused = log.read_text() if log.exists() else ""
    assert not refused, f"a subprocess dialed outside loopback and {PREFIX}.0/24: {refused}"


@pytest.fixture(scope="module")
def hosts() -> Iterator[NetnsHosts]:
    try:
        h = NetnsHosts(3, subnet=PREFIX)
    except Unavailable as e:
        pytest.skip(f"namespace hosts need root, sshd and iproute2: {e}")
    with h:
        yield h


@pytest.fixture(scope="module")
def remote_cache(hosts: NetnsHosts) -> Iterator[str]:
    """One bigmrun cache for the three hosts (they share a file system anyway).

    Uploads and extraction are the SSH tests' subject; here, sharing them means the
    ~460 MB environment is extracted (and later deleted) once, not three times.
    """
    import pwd

    path = tempfile.mkdtemp(prefix="bigmrun-ec2-cache-")
    user = pwd.getpwnam(hosts.user)
    os.chown(path, user.pw_uid, user.pw_gid)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def machine_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A driver that starts machines, says READY and blocks until stdin closes.

    The in-process tests use it as the machines' program too (a small package, shared).
    """
    d = tmp_path_factory.mktemp("prog")
    path = d / "blocker.py"
    path.write_text(
        "import sys\n"
        "import bigmrun\n\n"
        "b = bigmrun.start()  # on a machine, this never returns\n"
        "with b:\n"
        "    machines = b.start()\n"
        "    for m in machines:\n"
        "        m.wait(bigmrun.State.RUNNING, timeout=180)\n"
        "        if m.err is not None:\n"
        "            raise SystemExit(f'{m.name} failed: {m.err}')\n"
        "    print('READY', b.session_id, flush=True)\n"
        "    sys.stdin.readline()\n")
    return path


@dataclass
class World:
    """moto with an AMI and our own key pair, and the namespace hosts it maps onto."""

    aws: AWS
    hosts: NetnsHosts
    ami: str
    known_hosts: str
    program: Path
    cache: str

    def addrs(self, n: int = 3) -> list[str]:
        return [self.hosts.addr(k) for k in range(n)]

    def options(self, **overrides: Any) -> dict[str, Any]:
        """EC2System arguments for in-process tests."""
        opts: dict[str, Any] = dict(
            region=REGION, endpoint_url=self.aws.url, ami=self.ami, subnet=self.aws.subnet,
            private_ips=self.addrs(), key_name=KEY_NAME, key_filename=self.hosts.keys.client_key,
            ssh_user=self.hosts.user, known_hosts=self.known_hosts, keepalive_timeout=5.0,
            boot_timeout=60.0, program=Program([PY, str(self.program)], False, []),
            remote_cache=self.cache)
        opts.update(overrides)
        return opts

    def cli_args(self) -> list[str]:
        """The same, as launcher options."""
        return ["--region", REGION, "--ec2-endpoint", self.aws.url, "--ami", self.ami,
                "--subnet", self.aws.subnet, "--ec2-private-ips", ",".join(self.addrs()),
                "--key-name", KEY_NAME, "--ssh-key", self.hosts.keys.client_key,
                "--ssh-user", self.hosts.user, "--known-hosts", self.known_hosts]


@pytest.fixture
def world(aws: AWS, hosts: NetnsHosts, machine_program: Path, remote_cache: str,
          tmp_path: Path) -> World:
    ami = aws.client.register_image(Name="debian-12-amd64-bigmrun-test",
                                    RootDeviceName="/dev/xvda")["ImageId"]
    with open(hosts.keys.client_key + ".pub", "rb") as f:
        aws.client.import_key_pair(KeyName=KEY_NAME, PublicKeyMaterial=f.read())
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(hosts.known_hosts())
    aws.env["BIGMRUN_REMOTE_CACHE"] = remote_cache  # for drivers started by the launcher
    return World(aws, hosts, ami, str(known_hosts), machine_program, remote_cache)


# --- helpers -----------------------------------------------------------------------------

def run_cli(aws: AWS, *args: str, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "bigmrun", *args], env=aws.env, input=input,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def machine_pids(hosts: NetnsHosts, k: int) -> list[int]:
    """PIDs of bigmrun machines (python running a package) in host ``k``'s namespace."""
    out = []
    for pid in hosts.pids(k):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b".pyz" in cmd:
            out.append(pid)
    return out


def group_rules(group: dict[str, Any]) -> set[tuple[Any, ...]]:
    """Ingress rules as (protocol, from port, to port, source) tuples."""
    rules = set()
    for p in group["IpPermissions"]:
        key = (p["IpProtocol"], p.get("FromPort"), p.get("ToPort"))
        rules.update((*key, r["CidrIp"]) for r in p.get("IpRanges", []))
        rules.update((*key, r["CidrIpv6"]) for r in p.get("Ipv6Ranges", []))
        rules.update((*key, g["GroupId"]) for g in p.get("UserIdGroupPairs", []))
    return rules


def expected_rules(group_id: str, driver: str) -> set[tuple[Any, ...]]:
    return {("tcp", port, port, source) for port in (22, 7707) for source in (driver, group_id)}


def assert_only_namespace_hosts(system: Any) -> None:
    for host in system._ssh._hosts:
        assert _allowed((host.conn.address, 22)), host.conn.address


class StubResponse:
    """Stub (for botocore ``before-call``): the HTTP side of a canned error reply."""

    status_code = 400
    headers: dict[str, str] = {}


def stub_error(code: str, message: str) -> tuple[StubResponse, dict[str, Any]]:
    return StubResponse(), {"Error": {"Code": code, "Message": message},
                            "ResponseMetadata": {}}


def read_ready(proc: subprocess.Popen[str], timeout: float) -> str:
    """The driver's "READY <session>" line (bounded wait)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        pytest.fail(f"the driver did not say READY within {timeout:g}s")
    line = proc.stdout.readline()
    assert line.startswith("READY "), f"driver said {line!r} (exit {proc.poll()})"
    return line.split()[1]


# --- end to end through the launcher -------------------------------------------------------

def test_bigpi_runs_on_three_instances_through_the_launcher(world: World) -> None:
    r = run_cli(world.aws, "--system", "ec2", "--nmach", "3", *world.cli_args(),
                "--ec2-driver-cidr", f"{PREFIX}.1/32", str(BIGPI), "-n", "300000",
                timeout=200)
    assert r.returncode == 0, r.stderr[-4000:]
    assert re.search(r"^π = 3\.1\d+$", r.stdout, re.M), r.stdout
    addrs = world.addrs()
    for addr in addrs:  # every machine served from its own host, on the fixed RPC port
        assert f"{addr}:7707 RUNNING" in r.stderr
    instances = world.aws.instances()
    assert len(instances) == 3
    tags = [_aws.tags_of(i) for i in instances]
    sessions = {t[_aws.TAG_SESSION] for t in tags}
    assert len(sessions) == 1
    session = sessions.pop()
    by_machine = {t[_aws.TAG_MACHINE]: i for t, i in zip(tags, instances, strict=True)}
    assert {m: i["PrivateIpAddress"] for m, i in by_machine.items()} == \
        {f"m{k}": addr for k, addr in enumerate(addrs)}
    for t in tags:
        assert t[_aws.TAG_PROGRAM] == "bigpi.py"
        assert t[_aws.TAG_USER] == getpass.getuser()
    for i in instances:  # the driver terminated them all on its way out
        assert i["State"]["Name"] == "terminated"
        assert i["KeyName"] == KEY_NAME
        attr = world.aws.client.describe_instance_attribute(
            InstanceId=i["InstanceId"], Attribute="instanceInitiatedShutdownBehavior")
        assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    assert world.aws.group(f"bigmrun-{session}") is None  # the session's group is gone
    assert KEY_NAME in world.aws.key_pairs()  # a key pair the user named stays


def test_ps_down_and_power_off_when_the_driver_is_killed(world: World) -> None:
    markers = Path(tempfile.mkdtemp(prefix="bigmrun-ec2-poweroff-"))
    os.chmod(markers, 0o777)  # the machines run as the hosts' login user
    log = open(markers.with_suffix(".driver.log"), "w")  # noqa: SIM115 - closed below
    driver = subprocess.Popen(
        [PY, "-m", "bigmrun", "--system", "ec2", "--nmach", "2", "--keepalive-timeout", "4",
         *world.cli_args(), "--ec2-poweroff-command",
         f"touch {markers}/poweroff-$BIGMRUN_MACHINE_NAME", str(world.program)],
        env=world.aws.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
        text=True, cwd=REPO)
    aws = world.aws
    try:
        try:
            session = read_ready(driver, 180)
        except BaseException:
            log.flush()
            print(markers.with_suffix(".driver.log").read_text()[-4000:])
            raise
        # ps sees the running session's instances
        r = run_cli(aws, "ps", "--system", "ec2", "--json", "--region", REGION,
                    "--ec2-endpoint", aws.url)
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        assert {(row["session"], row["machine"], row["private_ip"], row["state"])
                for row in rows} == {(session, "m0", world.hosts.addr(0), "running"),
                                     (session, "m1", world.hosts.addr(1), "running")}
        assert {row["program"] for row in rows} == {world.program.name}
        ids = sorted(row["instance"] for row in rows)
        r = run_cli(aws, "--region", REGION, "--ec2-endpoint", aws.url,
                    "ps", "--system", "ec2", "--session", session)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("SESSION")
        for iid in ids:
            assert re.search(rf"^{session}\s+{iid}\s+running\s", r.stdout, re.M), r.stdout

        # The session's own group: SSH and RPC only, only from the driver's address (the
        # one that routes to the instances: the bridge) and from the group itself.
        group = aws.group(f"bigmrun-{session}")
        assert group is not None
        assert group_rules(group) == expected_rules(group["GroupId"], f"{PREFIX}.1/32")

        # The driver dies: the machines hear no keepalive and run the power-off command.
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        for name in ("m0", "m1"):
            wait_until(lambda n=name: (markers / f"poweroff-{n}").exists(), timeout=60,
                       what=f"{name}'s power-off marker")
        wait_until(lambda: not machine_pids(world.hosts, 0) and not machine_pids(world.hosts, 1),
                   timeout=30, what="the machines to exit")
        assert not (markers / "poweroff-m2").exists()

        # down asks first; "no" changes nothing.
        r = run_cli(aws, "down", "--region", REGION, "--ec2-endpoint", aws.url, input="n\n")
        assert "nothing done" in r.stdout, r.stdout + r.stderr
        assert {aws.state(i) for i in ids} == {"running"}
        # A session key pair as a killed driver leaves one (this driver used KEY_NAME).
        aws.client.create_key_pair(KeyName=f"bigmrun-{session}", TagSpecifications=[
            {"ResourceType": "key-pair", "Tags": [{"Key": _aws.TAG_SESSION, "Value": session}]}])
        # down --yes terminates the leftovers and deletes the session's key pair and group.
        r = run_cli(aws, "down", "--yes", "--region", REGION, "--ec2-endpoint", aws.url)
        assert r.returncode == 0, r.stderr
        for iid in ids:
            assert f"terminated {iid} (session {session}" in r.stdout
        assert f"deleted key pair bigmrun-{session}" in r.stdout
        assert f"deleted security group {group['GroupId']}" in r.stdout
        assert {aws.state(i) for i in ids} == {"terminated"}
        assert aws.group(f"bigmrun-{session}") is None
        assert aws.key_pairs() == {KEY_NAME}  # the user's own key pair is not bigmrun's
        r = run_cli(aws, "ps", "--system", "ec2", "--region", REGION, "--ec2-endpoint", aws.url)
        assert "no EC2 instances started by bigmrun" in r.stdout
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)
        log.close()
        markers.with_suffix(".driver.log").unlink(missing_ok=True)
        shutil.rmtree(markers, ignore_errors=True)


# --- in-process drivers --------------------------------------------------------------------

@pytest.fixture
def authorized_keys(hosts: NetnsHosts) -> Iterator[Path]:
    path = Path(hosts.keys.dir) / "authorized_keys"
    saved = path.read_bytes()
    yield path
    path.write_bytes(saved)


def test_session_key_pair_and_group_are_made_and_removed(world: World,
                                                         authorized_keys: Path) -> None:
    import paramiko

    from bigmrun.backends.ec2 import EC2System

    # No key pair, no known_hosts given: the session makes its own key pair, and records
    # the new instance's host key on first use in a file of its own.
    system = EC2System(**world.options(key_name=None, key_filename=None, known_hosts=None,
                                       private_ips=world.addrs(1)))

    def install_key_stub(parsed: dict[str, Any], **_: Any) -> None:
        """Stub for cloud-init: put the new key pair's public key on the hosts."""
        key = paramiko.Ed25519Key.from_private_key(io.StringIO(parsed["KeyMaterial"]))
        with open(authorized_keys, "a") as f:
            f.write(f"{key.get_name()} {key.get_base64()}\n")

    system.ec2.meta.events.register("after-call.ec2.CreateKeyPair", install_key_stub)
    b = bigmrun.B(system)
    try:
        [m] = b.start(1)
        assert m.wait(bigmrun.State.RUNNING, timeout=180) == bigmrun.State.RUNNING, m.err
        assert m.call("Supervisor.ping", timeout=30) == "m0"
        session = b.session_id
        name = f"bigmrun-{session}"
        [inst] = world.aws.instances()
        assert inst["KeyName"] == name
        key_file = system._ssh.key_filename
        assert os.stat(key_file).st_mode & 0o777 == 0o600
        assert os.stat(os.path.dirname(key_file)).st_mode & 0o777 == 0o700
        recorded = Path(os.path.dirname(key_file), "known_hosts").read_text()
        assert world.hosts.keys.host_pub in recorded and world.hosts.addr(0) in recorded
        group = world.aws.group(name)
        assert group is not None
        assert [g["GroupId"] for g in inst["SecurityGroups"]] == [group["GroupId"]]
        assert _aws.tags_of(group)[_aws.TAG_SESSION] == session
        # No --ec2-driver-cidr: the driver's address was learnt from the route to the
        # instance's private IP (the bridge's address).
        assert group_rules(group) == expected_rules(group["GroupId"], f"{PREFIX}.1/32")
        assert name in world.aws.key_pairs()
    finally:
        b.shutdown()
    assert world.aws.state(inst["InstanceId"]) == "terminated"
    assert name not in world.aws.key_pairs()
    assert world.aws.group(name) is None
    assert not os.path.exists(key_file) and not os.path.exists(os.path.dirname(key_file))
    assert_only_namespace_hosts(system)


def test_spot_with_fallback_to_on_demand(world: World,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from bigmrun.backends.ec2 import EC2System

    system = EC2System(**world.options(spot=True))
    a0, a1, a2 = world.addrs()
    refused = []

    def no_capacity_stub(params: dict[str, Any], **_: Any) -> Any:
        """Stub: no spot capacity for a1's instance, no capacity at all for a2's."""
        body = params["body"]
        spot = body.get("InstanceMarketOptions.MarketType") == "spot"
        ip = body.get("PrivateIpAddress")
        if (spot and ip == a1) or ip == a2:
            refused.append((ip, "spot" if spot else "on-demand"))
            return stub_error("InsufficientInstanceCapacity", "stub: no capacity here")
        return None

    system.ec2.meta.events.register("before-call.ec2.RunInstances", no_capacity_stub)
    b = bigmrun.B(system)
    try:
        ms = b.start(3)
        states = [m.wait(bigmrun.State.RUNNING, timeout=180) for m in ms]
        assert states == [bigmrun.State.RUNNING] * 2 + [bigmrun.State.STOPPED], \
            [m.err for m in ms]
        lifecycle = {i["PrivateIpAddress"]: i.get("InstanceLifecycle", "on-demand")
                     for i in world.aws.instances()}
        assert lifecycle == {a0: "spot", a1: "on-demand"}  # nothing was made for a2
        assert sorted(refused) == [(a1, "spot"), (a2, "on-demand"), (a2, "spot")]
        assert sorted(system.spot_fallbacks) == ["m1", "m2"]
        err = ms[2].err
        assert isinstance(err, bigmrun.StartError)
        assert "InsufficientInstanceCapacity" in str(err) and err.temporary
        assert "m1: no spot instance" in capsys.readouterr().err
        for m in ms[:2]:
            assert m.call("Supervisor.ping", timeout=30) == m.name
    finally:
        b.shutdown()
    assert {i["State"]["Name"] for i in world.aws.instances()} == {"terminated"}
    assert_only_namespace_hosts(system)


def test_partial_failure_an_unreachable_instance_is_terminated(world: World) -> None:
    from bigmrun.backends.ec2 import EC2System

    world.hosts.cut(2)  # the third instance's address leads nowhere
    try:
        system = EC2System(**world.options(boot_timeout=8.0))
        b = bigmrun.B(system)
        try:
            ms = b.start(3)
            states = [m.wait(bigmrun.State.RUNNING, timeout=180) for m in ms]
            assert states == [bigmrun.State.RUNNING] * 2 + [bigmrun.State.STOPPED], \
                [m.err for m in ms]
            by_ip = {i["PrivateIpAddress"]: i for i in world.aws.instances()}
            cut = by_ip[world.hosts.addr(2)]["InstanceId"]
            err = ms[2].err
            assert isinstance(err, bigmrun.StartError)
            assert f"instance {cut} ({world.hosts.addr(2)})" in str(err)
            assert "no SSH server answered" in str(err) and "terminated" in str(err)
            assert world.aws.state(cut) == "terminated"
            for m in ms[:2]:  # the others work
                assert m.call("Supervisor.ping", timeout=30) == m.name
                assert world.aws.state(by_ip[m.addr.split(":")[0]]["InstanceId"]) == "running"
            # A machine whose process ends takes its instance with it.
            first = by_ip[world.hosts.addr(0)]["InstanceId"]
            [pid] = machine_pids(world.hosts, 0)
            os.kill(pid, signal.SIGKILL)
            assert ms[0].wait(bigmrun.State.STOPPED, timeout=30) == bigmrun.State.STOPPED
            assert isinstance(ms[0].err, bigmrun.MachineLostError)
            wait_until(lambda: world.aws.state(first) == "terminated", timeout=30,
                       what="the ended machine's instance to be terminated")
            assert ms[1].call("Supervisor.ping", timeout=30) == "m1"
        finally:
            b.shutdown()
    finally:
        world.hosts.heal(2)
    assert {i["State"]["Name"] for i in world.aws.instances()} == {"terminated"}
    assert_only_namespace_hosts(system)


# --- errors and settings (moto only) ---------------------------------------------------------

def test_missing_credentials_is_a_clear_config_error(aws: AWS, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import NoCredentialsError

    from bigmrun.backends.ec2 import EC2System

    fresh = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8",
             "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "nonexistent-credentials"),
             "AWS_CONFIG_FILE": str(tmp_path / "nonexistent-config"),
             "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance metadata service
             **{k: aws.env[k] for k in ("PYTHONPATH", "BMR_GUARD_LOG", "BMR_GUARD_NETS")}}
    r = subprocess.run([PY, "-m", "bigmrun", "--system", "ec2", "--region", REGION,
                        "--ec2-endpoint", aws.url, str(BIGPI), "-n", "1000"],
                       env=fresh, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode != 0
    assert "ConfigError: no AWS credentials found" in r.stderr
    assert "aws configure" in r.stderr and "AWS_PROFILE" in r.stderr
    r = subprocess.run([PY, "-m", "bigmrun", "ps", "--system", "ec2", "--region", REGION,
                        "--ec2-endpoint", aws.url], env=fresh, capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 1 and "Error: no AWS credentials found" in r.stderr

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    with pytest.raises(bigmrun.ConfigError, match="no AWS credentials found") as info:
        EC2System(region=REGION, endpoint_url=aws.url)
    assert isinstance(info.value.__cause__, NoCredentialsError)


def test_missing_region_is_a_clear_config_error(aws: AWS,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from bigmrun.backends.ec2 import EC2System

    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(bigmrun.ConfigError, match="no AWS region: pass --region"):
        EC2System(endpoint_url=aws.url)


def test_refused_operation_names_the_iam_permission(aws: AWS) -> None:
    from botocore.exceptions import ClientError

    from bigmrun.backends.ec2 import EC2System

    system = EC2System(region=REGION, endpoint_url=aws.url, ami="ami-12345678")

    def denied_stub(**_: Any) -> Any:
        """Stub: this identity may not describe images."""
        return stub_error("UnauthorizedOperation",
                          "You are not authorized to perform this operation.")

    system.ec2.meta.events.register("before-call.ec2.DescribeImages", denied_stub)
    b = bigmrun.B(system)
    try:
        [m] = b.start(1)
        assert m.wait(bigmrun.State.RUNNING, timeout=60) == bigmrun.State.STOPPED
        assert isinstance(m.err, bigmrun.ConfigError)
        assert "needs the IAM permission ec2:DescribeImages" in str(m.err)
        assert isinstance(m.err.__cause__, ClientError)
    finally:
        b.shutdown()
    assert aws.instances() == []  # it stopped before starting anything


def test_default_ami_is_the_newest_image_for_the_drivers_python(
        aws: AWS, monkeypatch: pytest.MonkeyPatch) -> None:
    from bigmrun.backends import ec2

    # moto cannot own images as Debian's account: look for them in our own ("self").
    monkeypatch.setitem(ec2.DEFAULT_IMAGES, sys.version_info[:2],
                        ec2.ImageChoice("self", "debian-12-{arch}-*", "admin", "Debian 12"))
    arch = ec2.arch()
    ids = {name: aws.client.register_image(Name=name, RootDeviceName="/dev/xvda")["ImageId"]
           for name in (f"debian-12-{arch}-20240101-1500",
                        f"debian-12-backports-{arch}-20260101-1500",
                        f"debian-11-{arch}-20260101-1500",
                        f"debian-12-{arch}-20250101-1500")}
    ubuntu = aws.client.register_image(
        Name="ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20250101",
        RootDeviceName="/dev/sda1")["ImageId"]
    default = ec2.EC2System(region=REGION, endpoint_url=aws.url)
    given = ec2.EC2System(region=REGION, endpoint_url=aws.url, ami=ubuntu)
    try:
        assert default.resolve_image() == (ids[f"debian-12-{arch}-20250101-1500"], "admin")
        assert given.resolve_image() == (ubuntu, "ubuntu")  # the user follows the image
    finally:
        for system in (default, given):
            assert system._tmp is None  # nothing written before the first launch


@pytest.mark.parametrize("options, message", [
    ({"private_ips": "10.77.0.11,nope", "subnet": "subnet-1"}, "is not an IP address"),
    ({"private_ips": "10.77.0.11"}, "needs --subnet"),
    ({"tags": "team"}, "is not KEY=VALUE"),
    ({"tags": "bigmrun:session=x"}, "reserved prefix"),
    ({"driver_cidr": "somewhere"}, "is not an address range"),
    ({"rpc_port": 22}, "other than 22"),
])
def test_bad_options_are_config_errors(aws: AWS, options: dict[str, Any], message: str) -> None:
    from bigmrun.backends.ec2 import EC2System

    with pytest.raises(bigmrun.ConfigError, match=message):
        EC2System(region=REGION, endpoint_url=aws.url, **options)
