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
        # Everything from the program (or -m MODULE) on belongs to the program.
        for i, arg in enumerate(args):
            if arg in ("-m", "--module") or (not arg.startswith("-") and arg not in self.commands
                                             and _looks_like_program(arg)):
                head, tail = args[:i], args[i:]
                return super().parse_args(ctx, [*head, "run", *tail])
            if not arg.startswith("-") and arg in self.commands:
                break
        return super().parse_args(ctx, args)


def _looks_like_program(arg: str) -> bool:
    return arg.endswith(".py") or os.path.isfile(arg)


@click.group(cls=_Launcher, context_settings=CONTEXT, invoke_without_command=True)
@click.option("--system", type=click.Choice(SYSTEM_NAMES), envvar="BIGMRUN_SYSTEM",
              default="local", show_default=True, show_envvar=True,
              help="Where machines run: in-process (test), local processes, SSH hosts, EC2.")
@click.option("--nmach", type=click.IntRange(min=1), envvar="BIGMRUN_NMACH", default=1,
              show_default=True, show_envvar=True,
              help="Machines B.start() starts when the program does not say.")
@click.version_option(__version__, "--version")
@click.pass_context
def main(ctx: click.Context, system: str, nmach: int) -> None:
    """Run an ordinary Python program across machines it starts itself.

    \b
    Examples:
      bigmrun examples/bigpi.py -n 1e7 --nmach 2      # local processes
      bigmrun --system test examples/bigpi.py          # machines inside this process
      bigmrun -m mypkg.job --flag value                # a module, like python -m

    Everything after PROGRAM.py (or -m MODULE) is passed to the program untouched.
    """
    ctx.ensure_object(dict)
    ctx.obj.update(system=system, nmach=nmach)
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
    opts: dict[str, Any] = ctx.obj or {}
    os.environ["BIGMRUN_SYSTEM"] = opts.get("system", "local")
    os.environ["BIGMRUN_NMACH"] = str(opts.get("nmach", 1))
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
