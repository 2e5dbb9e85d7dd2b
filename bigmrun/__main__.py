"""``python -m bigmrun``: the same as the ``bigmrun`` command."""

from .cli import main

main()
