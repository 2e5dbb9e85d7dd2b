"""The ``bigmrun`` command: run a program on machines of your choice.

``bigmrun [OPTIONS] PROGRAM.py [ARGS...]`` (or ``bigmrun [OPTIONS] -m MODULE [ARGS...]``)
runs PROGRAM as the driver, with the system and machine count as the defaults for
``bigmrun.start()`` and ``B.start()``. The program's own arguments pass through
untouched. The same program also runs as plain ``python PROGRAM.py`` (local system).
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Any, NoReturn

import click

from . import __version__
from .backends import SYSTEM_NAMES

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Launcher(click.Group):
    """A group whose unknown "command" is the program to run (``bigmrun prog.py``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Everything from the program (or -m MODULE) on belongs to the program. Skip the
        # values of our own options while looking for it (a key file is not a program).
        takes_value = {
            opt for p in self.params if isinstance(p, click.Option) and not p.is_flag
            for opt in p.opts
        }
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in ("-m", "--module") or (not arg.startswith("-") and arg not in self.commands
                                             and _looks_like_program(arg)):
                return super().parse_args(ctx, [*args[:i], "run", *args[i:]])
            if not arg.startswith("-") and arg in self.commands:
                break
            if arg in takes_value:
                i += 1  # its value follows
            i += 1
        return super().parse_args(ctx, args)


def _looks_like_program(arg: str) -> bool:
    return arg.endswith(".py") or os.path.isfile(arg)


#: Launcher options passed to the program's systems as environment variables:
#: (option name, environment variable, click type, help). Each can also be set in the
#: config file (same name, dashes or underscores) or in the environment.
SYSTEM_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("keepalive-timeout", "BIGMRUN_KEEPALIVE_TIMEOUT", click.FloatRange(min=0.5),
     "Seconds without keepalives after which a machine exits by itself [default: 10]."),
    ("pin-cpus", "BIGMRUN_PIN_CPUS", bool,
     "local: bind the driver and each machine process to a CPU of its own. Small calls get "
     "~25% faster on virtual machines (a process's threads hand work over on one CPU); "
     "each machine's maxprocs becomes 1."),
    ("hosts", "BIGMRUN_SSH_HOSTS", str,
     "ssh: hosts to run machines on, e.g. 'me@h1,h2:2222' (~/.ssh/config applies)."),
    ("procs-per-host", "BIGMRUN_PROCS_PER_HOST", click.IntRange(min=1),
     "ssh: machines per host [default: the host's CPU count]."),
    ("ssh-key", "BIGMRUN_SSH_KEY", click.Path(dir_okay=False),
     "ssh/ec2: private key file (ec2: of --key-name's key pair) [default: SSH agent, "
     "~/.ssh/config, ~/.ssh/id_*]."),
    ("known-hosts", "BIGMRUN_SSH_KNOWN_HOSTS", click.Path(dir_okay=False),
     "ssh/ec2: known_hosts file to verify host keys against [default: ~/.ssh/known_hosts; "
     "ec2: each new instance's key is recorded on first use, for the session only]."),
    ("accept-new-host-keys", "BIGMRUN_ACCEPT_NEW_HOST_KEYS", bool,
     "ssh: record unknown host keys on first use (like OpenSSH accept-new); a changed "
     "key is always refused."),
    ("python", "BIGMRUN_SSH_PYTHON", str,
     "ssh/ec2: Python interpreter on the hosts [default: python3]."),
    # EC2 (see bigmrun/backends/ec2.py); boto3's credential chain applies (AWS_PROFILE...).
    ("region", "BIGMRUN_EC2_REGION", str,
     "ec2: AWS region [default: boto3's: AWS_REGION, AWS_DEFAULT_REGION, ~/.aws/config]."),
    ("instance-type", "BIGMRUN_EC2_INSTANCE_TYPE", str,
     "ec2: instance type [default: m7i.large; m7g.large on an arm64 driver]."),
    ("ami", "BIGMRUN_EC2_AMI", str,
     "ec2: image id [default: the newest Debian/Ubuntu image whose python3 matches the "
     "driver's: 3.10 Ubuntu 22.04, 3.11 Debian 12, 3.12 Ubuntu 24.04, 3.13 Debian 13]."),
    ("ssh-user", "BIGMRUN_EC2_SSH_USER", str,
     "ec2: SSH login user [default: the image's: admin (Debian), ubuntu, ec2-user...]."),
    ("spot", "BIGMRUN_EC2_SPOT", bool,
     "ec2: use spot instances, falling back to on-demand where spot capacity is missing."),
    ("key-name", "BIGMRUN_EC2_KEY_NAME", str,
     "ec2: an existing key pair (its private key: --ssh-key or the SSH agent) [default: a "
     "key pair made for the session, deleted at its end]."),
    ("security-group", "BIGMRUN_EC2_SECURITY_GROUP", str,
     "ec2: an existing security group (id or name) admitting SSH and the RPC port "
     "[default: one made for the session, open only to the driver and itself]."),
    ("subnet", "BIGMRUN_EC2_SUBNET", str, "ec2: subnet id [default: the default VPC's]."),
    ("instance-profile", "BIGMRUN_EC2_INSTANCE_PROFILE", str,
     "ec2: IAM instance profile (name or ARN) for the instances."),
    ("disk-size", "BIGMRUN_EC2_DISK_SIZE", click.IntRange(min=1),
     "ec2: root volume size in GiB (gp3) [default: the image's]."),
    ("tags", "BIGMRUN_EC2_TAGS", str,
     "ec2: extra tags for instances and volumes, e.g. 'team=ml,cost-center=42'."),
    ("ec2-endpoint", "BIGMRUN_EC2_ENDPOINT", str,
     "ec2: EC2 endpoint URL, e.g. an emulator's (moto) [default: AWS's]."),
    ("ec2-private-ips", "BIGMRUN_EC2_PRIVATE_IPS", str,
     "ec2: private IP of each machine's instance, in start order (needs --subnet)."),
    ("ec2-driver-cidr", "BIGMRUN_EC2_DRIVER_CIDR", str,
     "ec2: the driver's address range that the session's security group admits "
     "[default: learnt: the local address routing to a private IP, or the public address "
     "from checkip.amazonaws.com]."),
    ("ec2-rpc-port", "BIGMRUN_EC2_RPC_PORT", click.IntRange(1, 65535),
     "ec2: TCP port machines serve RPC on [default: 7707]."),
    ("ec2-boot-timeout", "BIGMRUN_EC2_BOOT_TIMEOUT", click.FloatRange(min=1),
     "ec2: seconds for an instance to run and answer SSH [default: 300]."),
    ("ec2-poweroff-command", "BIGMRUN_EC2_POWEROFF_COMMAND", str,
     "ec2: shell command a machine runs when the driver's keepalives stop, 'none' for "
     "nothing [default: sudo -n poweroff; instances terminate on shutdown]."),
]


def _config_path() -> str:
    return os.environ.get("BIGMRUN_CONFIG") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"),
        "bigmrun", "config.toml")


def load_config(path: str | None = None) -> dict[str, Any]:
    """Launcher defaults from the TOML config file (``$BIGMRUN_CONFIG`` or
    ``~/.config/bigmrun/config.toml``): top-level keys named like the options."""
    path = path or _config_path()
    if not os.path.exists(path):
        return {}
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, ValueError) as e:
        raise click.UsageError(f"cannot read config file {path}: {e}") from e
    out: dict[str, Any] = {}
    for key, value in data.items():
        k = key.replace("-", "_")
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        out[k] = value
    return out


def _system_options(f: Any) -> Any:
    for name, envvar, typ, help_ in reversed(SYSTEM_OPTIONS):
        if typ is bool:
            f = click.option(f"--{name}", envvar=envvar, is_flag=True, default=None,
                             show_envvar=True, help=help_)(f)
        else:
            f = click.option(f"--{name}", envvar=envvar, type=typ, default=None,
                             show_envvar=True, help=help_)(f)
    return f


class _Configured(_Launcher):
    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        extra.setdefault("default_map", load_config())
        return super().make_context(info_name, args, parent, **extra)


@click.group(cls=_Configured, context_settings=CONTEXT, invoke_without_command=True)
@click.option("--system", type=click.Choice(SYSTEM_NAMES), envvar="BIGMRUN_SYSTEM",
              default="local", show_default=True, show_envvar=True,
              help="Where machines run: in-process (test), local processes, SSH hosts, EC2.")
@click.option("--nmach", type=click.IntRange(min=1), envvar="BIGMRUN_NMACH", default=1,
              show_default=True, show_envvar=True,
              help="Machines B.start() starts when the program does not say.")
@_system_options
@click.version_option(__version__, "--version")
@click.pass_context
def main(ctx: click.Context, system: str, nmach: int, **system_opts: Any) -> None:
    """Run an ordinary Python program across machines it starts itself.

    \b
    Examples:
      bigmrun examples/bigpi.py -n 1e7 --nmach 2      # local processes
      bigmrun --system test examples/bigpi.py          # machines inside this process
      bigmrun --system ssh --hosts me@h1,me@h2 --nmach 4 examples/bigpi.py
      bigmrun --system ec2 --nmach 5 --spot examples/bigpi.py   # EC2 instances
      bigmrun -m mypkg.job --flag value                # a module, like python -m
      bigmrun ps --system ec2; bigmrun down            # list / remove EC2 leftovers

    Everything after PROGRAM.py (or -m MODULE) is passed to the program untouched.
    Options may also come from environment variables (shown below) and from the config
    file ~/.config/bigmrun/config.toml ($BIGMRUN_CONFIG), e.g.:

    \b
      system = "ssh"
      hosts = ["me@h1", "me@h2"]
      procs_per_host = 4
    """
    ctx.ensure_object(dict)
    env = {"BIGMRUN_SYSTEM": system, "BIGMRUN_NMACH": str(nmach)}
    for name, envvar, _typ, _help in SYSTEM_OPTIONS:
        value = system_opts.get(name.replace("-", "_"))
        if value is None or value is False:
            continue
        env[envvar] = "1" if value is True else str(value)
    if system == "ssh" and not env.get("BIGMRUN_SSH_HOSTS") and ctx.invoked_subcommand == "run":
        raise click.UsageError("--system ssh needs hosts: --hosts user@h1,h2:2222 (or "
                               "$BIGMRUN_SSH_HOSTS, or hosts = [...] in the config file)")
    ctx.obj["env"] = env
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@main.command(context_settings={**CONTEXT, "ignore_unknown_options": True,
                                "allow_interspersed_args": False})
@click.option("-m", "--module", "module", metavar="MODULE",
              help="Run library module MODULE as the program (like python -m).")
@click.argument("program_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, module: str | None, program_args: tuple[str, ...]) -> None:
    """Run PROGRAM.py [ARGS...] (or -m MODULE [ARGS...]) as the driver."""
    os.environ.update((ctx.obj or {}).get("env", {}))
    os.environ.setdefault("BIGMRUN_LAUNCHER", "1")  # progress lines while machines start
    args = list(program_args)
    if module is None:
        if not args:
            raise click.UsageError("missing PROGRAM.py (or -m MODULE) to run")
        program, args = args[0], args[1:]
        if not os.path.isfile(program):
            raise click.UsageError(f"no such program file: {program}")
        sys.argv = [program, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(program)))
        _run(lambda: runpy.run_path(program, run_name="__main__"))
    else:
        sys.argv = [module, *args]
        sys.path.insert(0, os.getcwd())
        _run(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True))


def _aws_options(f: Any) -> Any:
    """--region and --ec2-endpoint for ps and down (also taken from the launcher's own)."""
    f = click.option("--ec2-endpoint", "endpoint", default=None, metavar="URL",
                     help="EC2 endpoint URL (an emulator such as moto).")(f)
    return click.option("--region", default=None,
                        help="AWS region [default: as for the launcher, then boto3's].")(f)


def _ec2_client(ctx: click.Context, region: str | None, endpoint: str | None) -> Any:
    from .backends._aws import ec2_client

    env = (ctx.obj or {}).get("env", {})
    return ec2_client(region or env.get("BIGMRUN_EC2_REGION"),
                      endpoint or env.get("BIGMRUN_EC2_ENDPOINT"))


def _fail(e: Exception) -> NoReturn:
    """A BigmrunError from a command: its message, no traceback, exit status 1."""
    raise click.ClickException(str(e)) from e


@main.command(context_settings=CONTEXT)
@click.option("--system", "ps_system", type=click.Choice(["ec2"]), default=None,
              help="List what a system started: 'ec2' lists the EC2 instances bigmrun "
                   "tagged, of every session (running drivers or not).")
@click.option("--session", default=None, help="Only this session's.")
@click.option("--all", "show_all", is_flag=True, help="Include terminated instances.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
@_aws_options
@click.pass_context
def ps(ctx: click.Context, ps_system: str | None, session: str | None, show_all: bool,
       as_json: bool, region: str | None, endpoint: str | None) -> None:
    """List bigmrun's machines.

    \b
    Without --system: the machines of every running program (driver session), from
    their debug servers: session, machine, address, system, state, uptime, CPU %,
    memory (HIGH when the host is short of it), load, calls in flight, last error.
    With --system ec2: the EC2 instances bigmrun tagged, of every session (running
    drivers or not): session, instance, state, type, market, public and private IP,
    launch time, machine, program, user.
    """
    if ps_system != "ec2":
        _ps_sessions(ctx, session, as_json)
        return
    from .backends._aws import list_instances
    from .errors import BigmrunError

    try:
        rows = list_instances(_ec2_client(ctx, region, endpoint), session,
                              include_terminated=show_all)
    except BigmrunError as e:
        _fail(e)
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no EC2 instances started by bigmrun"
                   + (f" in session {session}" if session else "")
                   + ("" if show_all else " (running or pending; --all adds terminated ones)"))
        return
    cols = [("SESSION", "session"), ("INSTANCE", "instance"), ("STATE", "state"),
            ("TYPE", "type"), ("MARKET", "market"), ("PUBLIC IP", "public_ip"),
            ("PRIVATE IP", "private_ip"), ("LAUNCHED", "launched"), ("MACHINE", "machine"),
            ("PROGRAM", "program"), ("USER", "user")]
    table = [[h for h, _ in cols]] + [[str(r[k] or "-") for _, k in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _ps_sessions(ctx: click.Context, session: str | None, as_json: bool) -> None:
    """``bigmrun ps`` without --system: the machines of every running driver session."""
    from .debug import client
    from .errors import BigmrunError

    try:
        rows = client.ps_rows(session)
    except BigmrunError as e:
        _fail(e)
    if as_json:
        client.print_json(rows)
        return
    if not rows:
        click.echo("no running bigmrun sessions" + (f" match {session!r}" if session else "")
                   + " (EC2 instances: bigmrun ps --system ec2)")
        return
    client.render_ps(rows)


@main.command(context_settings=CONTEXT)
@click.argument("machine", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the "
              "program ends (Ctrl-C stops).")
@click.option("-n", "--lines", "n", type=click.IntRange(min=1), default=None,
              help="Only the last N lines (of each machine, for a finished session).")
@click.option("--session", default=None,
              help="Session ID (a prefix will do); needed when several are running, and "
                   "to read a finished session's logs.")
def logs(machine: str | None, follow: bool, n: int | None, session: str | None) -> None:
    """Print machine output: one MACHINE's, or every machine's interleaved with prefixes.

    \b
    Examples:
      bigmrun logs                 # the running session's output so far
      bigmrun logs m1 -f           # follow machine m1
      bigmrun logs --session 3fa2  # a session's output, even after it ended
    """
    import sys

    from .debug import client
    from .errors import BigmrunError

    colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    try:
        for name, text in client.read_logs(machine, n, session, follow):
            prefix = click.style(f"{name}:", fg="cyan") if colour else f"{name}:"
            click.echo(f"{prefix} {text}")
    except BigmrunError as e:
        _fail(e)
    except KeyboardInterrupt:
        pass


@main.command(context_settings=CONTEXT)
@click.option("--session", default=None,
              help="Only this session's instances, key pair and security group.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--wait-timeout", type=click.FloatRange(min=0), default=300.0,
              show_default=True,
              help="Seconds to wait for instances to terminate before deleting groups.")
@_aws_options
@click.pass_context
def down(ctx: click.Context, session: str | None, yes: bool, wait_timeout: float,
         region: str | None, endpoint: str | None) -> None:
    """Terminate every EC2 instance bigmrun tagged (of one session with --session) and
    delete the key pairs and security groups bigmrun made for sessions.

    Key pairs and groups you named (--key-name, --security-group) are never touched.
    """
    from .backends._aws import down as ec2_down
    from .errors import BigmrunError

    try:
        client = _ec2_client(ctx, region, endpoint)
        ec2_down(client, session, echo=click.echo, wait_timeout=wait_timeout,
                 confirm=lambda q: yes or click.confirm(q, default=False, err=True))
    except BigmrunError as e:
        _fail(e)


@main.command(context_settings=CONTEXT)
@click.option("--session", default=None, help="Session ID (a prefix will do).")
@click.option("--open", "open_browser", is_flag=True, help="Open it in a web browser.")
def dashboard(session: str | None, open_browser: bool) -> None:
    """Print the URL of a running program's dashboard (it carries the session's token:
    it is for you only)."""
    from .debug import client
    from .errors import BigmrunError

    try:
        info = client.pick_one(session)
    except BigmrunError as e:
        _fail(e)
    url = f"{info.url}/?token={info.token}"
    click.echo(url)
    if open_browser:
        import webbrowser

        webbrowser.open(url)


def _attach_commands() -> None:
    from .profiling.cli import profile

    main.add_command(profile)


_attach_commands()


def _run(fn: Any) -> None:
    try:
        fn()
    except SystemExit as e:
        code = e.code
        if code is None or isinstance(code, int):
            sys.exit(code or 0)
        click.echo(str(code), err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
