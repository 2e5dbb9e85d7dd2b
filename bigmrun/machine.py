"""Bare machine entry point: ``python -m bigmrun.machine``.

Used when the driver is not a program that can be re-run (pytest, a notebook,
``python -c``): the machine then serves services from importable modules only.
"""

import bigmrun

if __name__ == "__main__":
    bigmrun.start()
    raise SystemExit("bigmrun.machine: not started by a bigmrun driver (no boot channel)")
