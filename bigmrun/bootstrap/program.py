"""How to run *this same program* again as a machine.

A machine runs the driver's own program with the same arguments: the script's path
(``python prog.py ...``) or its module (``python -m pkg.mod ...``). When the driver is
not a program of its own (pytest, an interactive session, ``python -c``), machines run
the bare entry point ``python -m bigmrun.machine`` with the driver's ``sys.path``, so
services and arguments defined in importable modules (a test module, say) still work.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

# __main__ modules that are tools running user code, not the user's program.
_RUNNERS = ("pytest", "_pytest", "py.test", "IPython", "ipykernel", "ipykernel_launcher",
            "bigmrun.machine", "runpy")


@dataclass(frozen=True)
class Program:
    """The command line that makes a new process run this program as a machine."""

    argv: list[str]
    #: True when machines run the bare entry point (they then need ``pythonpath``).
    bare: bool
    pythonpath: list[str]


def _is_runner(name: str) -> bool:
    base = os.path.basename(name)
    return any(base == r or base.startswith(r + ".") or name.startswith(r + ".")
               or name == r for r in _RUNNERS)


def current_program(python: str | None = None) -> Program:
    """The program to re-run on machines, as this process was started."""
    python = python or sys.executable
    path = [p for p in sys.path if p and os.path.isdir(p)]
    override = os.environ.get("BIGMRUN_PROGRAM")  # set by the launcher
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if override:
        import json

        return Program([python, *json.loads(override)], False, path)
    if spec is not None and spec.name:
        mod = spec.name.removesuffix(".__main__")
        if not _is_runner(mod) and mod != "__main__":
            return Program([python, "-m", mod, *sys.argv[1:]], False, path)
    file = getattr(main, "__file__", None)
    if file and not _is_runner(os.path.splitext(os.path.basename(file))[0]) \
            and not _is_runner(os.path.basename(os.path.dirname(file))):
        return Program([python, os.path.abspath(file), *sys.argv[1:]], False, path)
    return Program([python, "-m", "bigmrun.machine"], True, path)
