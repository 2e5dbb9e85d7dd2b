"""The ``__main__.py`` of every bigmrun package (standard library only).

This file is copied verbatim into each package built by :mod:`bigmrun.bootstrap.package`
and runs when a host executes ``python PACKAGE.pyz ARGS...``. It must not import
bigmrun (bigmrun is *inside* the package) and runs on Python 3.7+, so that even a
host with the wrong Python gets a clear message instead of a syntax error.

How this works
--------------
A zip file on ``sys.path`` cannot hold importable C extensions, so (like shiv) the
package's environment is extracted once to the host's cache and imported from there:

* ``bigmrun-env/`` (site-packages and editable sources) goes to
  ``<cache>/env/<env_digest>/``: keyed by the environment's own content hash, so
  packages that differ only in the program share one extracted environment;
* ``bigmrun-prog/`` (the program's directory) goes to ``<cache>/prog/<digest>/``.

``<cache>`` is ``$BIGMRUN_CACHE``, else ``$XDG_CACHE_HOME/bigmrun``, else
``~/.cache/bigmrun``. Extraction is safe under concurrent starts: one process takes an
exclusive ``flock`` on ``<target>.lock`` and extracts into a temporary directory beside
the target, then ``os.rename``\\ s it into place; a directory that exists is therefore
always complete, and a process that finds it (before or after waiting for the lock)
uses it as is. Without ``flock`` (rare file systems) several processes may extract,
but the rename still lets exactly one win and the others discard their copy.

Then ``sys.path`` becomes: the program's directory (the script's directory, or the
program root for ``-m``) and the directories in it that the package lists, the
standard library, the package's own directories (added with ``site.addsitedir`` so
their ``.pth`` files work), then whatever else the host had (its own site-packages
last, so the driver's versions win). The program runs as
``__main__`` with the arguments given to the package (``runpy``).

Environment: ``BIGMRUN_PROGRAM_CWD=1`` changes into the program's directory first (the
remote launcher sets it); ``BIGMRUN_BOOTSTRAP_DEBUG=1`` reports each extraction on
stderr; ``BIGMRUN_SKIP_PYTHON_CHECK=1`` runs even on a mismatched interpreter.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import site
import sys
import sysconfig
import tempfile
import time
import zipfile
from typing import Any

META = "bigmrun-package.json"
ENV_PREFIX = "bigmrun-env/"
PROG_PREFIX = "bigmrun-prog/"


def cache_root() -> str:
    root = os.environ.get("BIGMRUN_CACHE")
    if root:
        return os.path.abspath(os.path.expanduser(root))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "bigmrun")


def _debug(msg: str) -> None:
    if os.environ.get("BIGMRUN_BOOTSTRAP_DEBUG"):
        sys.stderr.write(f"bigmrun-bootstrap[{os.getpid()}]: {msg}\n")
        sys.stderr.flush()


def platform_key(platform: str) -> str:
    """The part of a ``sysconfig.get_platform()`` string that binary wheels depend on."""
    if platform.startswith("macosx-"):  # macosx-11.0-arm64: the OS version is not binding
        return "macosx-" + platform.rsplit("-", 1)[-1]
    return platform


def _check_python(meta: dict[str, Any]) -> None:
    if os.environ.get("BIGMRUN_SKIP_PYTHON_CHECK"):
        return
    want = tuple(meta["python_version"])
    have = sys.version_info[:2]
    here = sysconfig.get_platform()
    problem = None
    if tuple(have) != want:
        problem = f"Python {want[0]}.{want[1]}"
    elif meta.get("native") and (platform_key(here) != platform_key(meta["platform"])
                                 or (meta.get("abi") or "") != (
                                     sysconfig.get_config_var("SOABI") or "")):
        problem = "{} ({})".format(meta["platform"], meta.get("abi"))
    if problem:
        soabi = sysconfig.get_config_var("SOABI")
        sys.stderr.write(
            f"bigmrun: this package was built for {problem}, but {sys.executable} is "
            f"Python {have[0]}.{have[1]} on {here} ({soabi}). Pass --python PATH for a "
            f"matching interpreter on the host, or use a matching image/AMI.\n")
        sys.exit(2)


def extract(zf: zipfile.ZipFile, prefix: str, target: str) -> bool:
    """Extract the members under ``prefix`` to ``target`` once; True if this call did."""
    if os.path.isdir(target):
        return False
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    with open(target + ".lock", "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass  # no locking here: the rename below still keeps the result whole
        if os.path.isdir(target):
            return False
        t0 = time.monotonic()
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        try:
            for info in zf.infolist():
                name = info.filename
                if not name.startswith(prefix) or name.endswith("/"):
                    continue
                parts = name[len(prefix):].split("/")
                if any(p in ("", ".", "..") for p in parts):
                    raise ValueError(f"unsafe member name in package: {name!r}")
                dest = os.path.join(tmp, *parts)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    os.chmod(dest, mode)
            try:
                os.rename(tmp, target)
            except OSError:
                if not os.path.isdir(target):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
                return False
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _debug(f"extracted {prefix.rstrip('/')} to {target} in {time.monotonic() - t0:.2f}s")
    return True


def _is_stdlib(path: str) -> bool:
    if "site-packages" in path or "dist-packages" in path:
        return False
    if path.endswith(".zip"):
        return True
    for name in ("stdlib", "platstdlib"):
        std = sysconfig.get_path(name)
        if std and (path == std or path.startswith(std.rstrip(os.sep) + os.sep)):
            return True
    return False


def main() -> None:
    loader = globals().get("__loader__")
    archive = getattr(loader, "archive", None) or sys.argv[0]
    with zipfile.ZipFile(archive) as zf:
        meta = json.loads(zf.read(META).decode())
        _check_python(meta)
        root = cache_root()
        env_dir = os.path.join(root, "env", meta["env_digest"])
        prog_dir = os.path.join(root, "prog", meta["digest"])
        extract(zf, ENV_PREFIX, env_dir)
        extract(zf, PROG_PREFIX, prog_dir)

    entry = meta["entry"]
    if meta["entry_kind"] == "script":
        script = os.path.join(prog_dir, *entry.split("/"))
        first = os.path.dirname(script)
    else:
        script = ""
        first = prog_dir
    before = [p for p in sys.path
              if os.path.abspath(p or ".") != os.path.abspath(archive)]
    sys.path[:] = before
    for d in meta["env_dirs"]:  # "src", "sp0", ...: in sys.path order
        site.addsitedir(os.path.join(env_dir, d))
    added = [p for p in sys.path if p not in before]
    std = [p for p in before if _is_stdlib(p)]
    rest = [p for p in before if not _is_stdlib(p)]
    extra = [os.path.join(prog_dir, *p.split("/")) for p in meta.get("paths", ())]
    sys.path[:] = [first, *extra, *std, *added, *rest]
    os.environ["BIGMRUN_PACKAGE"] = meta["digest"]
    if os.environ.pop("BIGMRUN_PROGRAM_CWD", "") == "1":
        os.chdir(prog_dir)
    args = sys.argv[1:]
    if script:
        sys.argv = [script, *args]
        runpy.run_path(script, run_name="__main__")
    else:
        sys.argv = [entry, *args]
        runpy.run_module(entry, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
