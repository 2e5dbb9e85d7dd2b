"""One error tree: every error bigmrun raises is a :class:`BigmrunError`.

Each class means one thing (in the spirit of trio's *closed* versus *broken*):

=========================  ==============================================================
``RemoteError``            the service method (or its ``init``) raised on the machine
``MachineLostError``       the machine is gone: its process ended, it was killed, it was
                           cancelled, or its keepalives failed for longer than the timeout
``NetworkError``           the connection to a live machine broke; the call may be retried
``CallTimeoutError``       the call's own ``timeout`` ran out (the machine was told)
``CallCancelledError``     the caller cancelled the call (the machine was told)
``SerializationError``     a service, argument or reply could not be pickled or unpickled
``NoSuchMethodError``      ``"Service.method"`` names no installed service or method
``ProtocolError``          a peer sent bytes that break the wire protocol
``ConfigError``            bad input to the API or launcher (bad ``n``, unknown system...)
``StartError``             a machine could not be started (the system said why)
=========================  ==============================================================

Errors that a retry may cure carry ``temporary = True``; :meth:`Machine.retry_call`
retries exactly those. Third-party errors (ssl, OS, paramiko, botocore) are translated
once, where they enter bigmrun, with the original kept as ``__cause__``.
"""

from __future__ import annotations

import pickle
import threading
from typing import Any

__all__ = [
    "BigmrunError",
    "CallCancelledError",
    "CallTimeoutError",
    "ConfigError",
    "MachineLostError",
    "NetworkError",
    "NoSuchMethodError",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "StartError",
]


class BigmrunError(Exception):
    """Root of every error bigmrun raises."""

    #: True when retrying the same call may succeed (see ``Machine.retry_call``).
    temporary: bool = False


class ConfigError(BigmrunError, ValueError):
    """Bad input to the API or the launcher; the message names the problem and the fix."""


class StartError(BigmrunError):
    """A machine could not be started; the message carries the system's reason."""


class MachineLostError(BigmrunError):
    """The machine is gone (process ended, killed, cancelled, or keepalives failed).

    ``machine`` names the machine; ``__cause__`` holds the underlying reason when known.
    """

    def __init__(self, message: str, machine: str | None = None) -> None:
        super().__init__(message)
        self.machine = machine


class NetworkError(BigmrunError):
    """The connection to a machine broke or could not be made. Temporary: retryable."""

    temporary = True


class CallTimeoutError(BigmrunError, TimeoutError):
    """The call did not finish within its timeout; the machine was told to cancel it."""


class CallCancelledError(BigmrunError):
    """The call was cancelled by its caller; the machine was told to cancel it."""


class SerializationError(BigmrunError, TypeError):
    """A value could not be pickled (nor dill-ed) or unpickled; the message names it."""


class NoSuchMethodError(BigmrunError, AttributeError):
    """The ``"Service.method"`` name matches no installed service or public method."""


class ProtocolError(BigmrunError):
    """A peer sent bytes that violate the wire protocol (bad frame, oversized frame)."""


class RemoteError(BigmrunError):
    """An exception raised by remote code.

    Attributes:
        type_name: the remote exception's qualified type name, e.g. ``"ValueError"``.
        message: ``str()`` of the remote exception.
        remote_traceback: the remote traceback, formatted.
        machine: the machine's name, when known.

    Where the remote type can be imported here, the error raised is an instance of a
    subclass of both ``RemoteError`` and that type, so ``except ValueError`` works too;
    the rebuilt original exception is then also available as ``__cause__``.
    """

    def __init__(
        self,
        type_name: str,
        message: str,
        remote_traceback: str = "",
        machine: str | None = None,
    ) -> None:
        # Not super(): in a subclass that also derives from the remote type (see
        # _remote_subclass) that would call the remote type's own __init__, whose
        # signature may differ (UnicodeDecodeError needs 5 arguments).
        Exception.__init__(self, type_name, message, remote_traceback, machine)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.machine = machine

    def __str__(self) -> str:
        where = f" on {self.machine}" if self.machine else ""
        text = f"{self.type_name}{where}: {self.message}"
        if self.remote_traceback:
            text += "\n--- remote traceback ---\n" + self.remote_traceback.rstrip()
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_remote_error,
            (self.type_name, self.message, self.remote_traceback, self.machine),
        )


def _rebuild_remote_error(
    type_name: str, message: str, remote_traceback: str, machine: str | None
) -> RemoteError:
    return make_remote_error(type_name, message, remote_traceback, machine, None)


_subclass_lock = threading.Lock()
_subclasses: dict[type, type] = {}


def _remote_subclass(cause_type: type) -> type | None:
    """A class deriving from both RemoteError and ``cause_type``, or None if impossible."""
    if not (isinstance(cause_type, type) and issubclass(cause_type, Exception)):
        return None
    if issubclass(cause_type, BigmrunError):
        return None
    with _subclass_lock:
        if cause_type in _subclasses:
            return _subclasses[cause_type]
        try:
            cls = type(
                f"Remote{cause_type.__name__}",
                (RemoteError, cause_type),
                {"__module__": __name__, "__init__": RemoteError.__init__,
                 "__str__": RemoteError.__str__, "__reduce__": RemoteError.__reduce__},
            )
        except TypeError:  # layout conflict with a C base class
            cls = None
        if cls is not None:
            _subclasses[cause_type] = cls
        return cls


def _lookup_type(type_name: str) -> type | None:
    """The class named ``module:Qual.Name`` (or a builtin name), if already imported.

    Only modules this process has already imported are consulted: decoding an error
    never imports code.
    """
    import sys

    if ":" in type_name:
        module, _, qual = type_name.partition(":")
    elif "." not in type_name:
        module, qual = "builtins", type_name
    else:
        module, _, qual = type_name.rpartition(".")
    obj: Any = sys.modules.get(module)
    for part in qual.split("."):
        if obj is None:
            return None
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


def make_remote_error(
    type_name: str,
    message: str,
    remote_traceback: str,
    machine: str | None,
    pickled_exc: bytes | None,
    qualified_type: str | None = None,
) -> RemoteError:
    """Build the ``RemoteError`` a caller sees, catchable by cause where possible."""
    cause: BaseException | None = None
    if pickled_exc is not None:
        try:
            cause = pickle.loads(pickled_exc)
        except Exception:
            cause = None
    # A nested call's RemoteError: find the type from its name, not from RemoteError.
    cause_type: type | None = (
        type(cause) if cause is not None and not isinstance(cause, RemoteError) else None
    )
    if cause_type is None and qualified_type:
        cause_type = _lookup_type(qualified_type)
    if cause_type is None:
        cause_type = _lookup_type(type_name)
    cls = _remote_subclass(cause_type) if cause_type is not None else None
    try:
        err: RemoteError = (cls or RemoteError)(type_name, message, remote_traceback, machine)
    except Exception:  # the remote type's __new__ refuses these arguments
        err = RemoteError(type_name, message, remote_traceback, machine)
    if cause is not None:
        err.__cause__ = cause
        if isinstance(cause, OSError) and isinstance(err, OSError):
            err.errno = cause.errno
    return err
