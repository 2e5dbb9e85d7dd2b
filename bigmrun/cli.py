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
from typing import Any

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
    ("hosts", "BIGMRUN_SSH_HOSTS", str,
     "ssh: hosts to run machines on, e.g. 'me@h1,h2:2222' (~/.ssh/config applies)."),
    ("procs-per-host", "BIGMRUN_PROCS_PER_HOST", click.IntRange(min=1),
     "ssh: machines per host [default: the host's CPU count]."),
    ("ssh-key", "BIGMRUN_SSH_KEY", click.Path(dir_okay=False),
     "ssh/ec2: private key file [default: SSH agent, ~/.ssh/config, ~/.ssh/id_*]."),
    ("known-hosts", "BIGMRUN_SSH_KNOWN_HOSTS", click.Path(dir_okay=False),
     "ssh: known_hosts file to verify host keys against [default: ~/.ssh/known_hosts]."),
    ("accept-new-host-keys", "BIGMRUN_ACCEPT_NEW_HOST_KEYS", bool,
     "ssh: record unknown host keys on first use (like OpenSSH accept-new); a changed "
     "key is always refused."),
    ("python", "BIGMRUN_SSH_PYTHON", str,
     "ssh/ec2: Python interpreter on the hosts [default: python3]."),
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
      bigmrun -m mypkg.job --flag value                # a module, like python -m

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
