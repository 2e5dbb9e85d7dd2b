"""Systems: where machines come from. One module per system, behind ``_base.System``."""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError
from ._base import BootSpec, MachineHandle, OutputSink, System

SYSTEM_NAMES = ("local", "test", "ssh", "ec2")


def get_system(system: str | System | None = None, **options: Any) -> System:
    """Resolve a system name (or None: ``$BIGMRUN_SYSTEM``, default "local")."""
    if isinstance(system, System):
        return system
    name = system or os.environ.get("BIGMRUN_SYSTEM") or "local"
    if name == "local":
        from .local import LocalSystem

        return LocalSystem(**options)
    if name == "test":
        from .test import TestSystem

        return TestSystem(**options)
    if name == "ssh":
        from .ssh import SSHSystem

        return SSHSystem(**options)
    if name == "ec2":
        from .ec2 import EC2System

        return EC2System(**options)
    raise ConfigError(
        f"unknown system {name!r}: choose one of {', '.join(SYSTEM_NAMES)} "
        f"(or pass a System object)"
    )


def system_from_boot(boot: dict[str, Any]) -> System:
    """The system object a machine uses for its own B (it never starts machines)."""
    from .local import LocalSystem

    return LocalSystem(keepalive_timeout=float(boot["keepalive_timeout"]))


__all__ = ["BootSpec", "MachineHandle", "OutputSink", "System", "get_system"]
