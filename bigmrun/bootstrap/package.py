"""Self-packaging: the program and the driver's environment as one content-addressed zipapp.

How this works
--------------
:func:`build` packs into one zip file, named ``<digest>.pyz`` after its content hash:

``__main__.py``
    the bootstrap (``_zipmain.py``, standard library only): it extracts the rest once to
    the host's cache, sets up ``sys.path`` and runs the program (see that module);
``bigmrun-package.json``
    what the package needs: entry point, Python version, platform, ABI, digests;
``bigmrun-prog/``
    the program's directory: for a script, its directory; for ``-m pkg.mod``, the
    ``sys.path`` directory that holds ``pkg`` (normally the current directory). Left
    out: version-control and cache directories (``.git``, ``__pycache__``,
    ``.mypy_cache``...), ``*.pyc``, virtual environments (any directory holding a
    ``pyvenv.cfg``), bigmrun's own cache, and whatever the program root's
    ``.bigmrunignore`` names (gitignore-like, see :class:`IgnoreRules`);
``bigmrun-env/src/``
    source of packages that live outside site-packages: bigmrun itself (always, unless
    it is installed in an included site-packages) and every package an editable install
    points at: the ``MAPPING`` of setuptools' ``__editable___*_finder.py`` files, and
    top-level packages and modules in directories named by ``.pth`` path lines. Other
    directories the driver put on ``sys.path`` are not shipped, except those inside the
    program root named by ``pythonpath`` (``build_for`` passes a bare program's);
``bigmrun-env/sp0/``, ``sp1/``...
    the driver's site-packages directories when it runs in a virtualenv
    (``sys.prefix != sys.base_prefix``); outside one, none (the host must provide
    third-party packages). ``__pycache__``/``*.pyc`` and the editable-install finders
    (replaced by ``src/``) are left out; ``.pth`` files keep only their lines that still
    make sense on another host.
``bigmrun-env/bin/``
    self-contained executables that wheels in those site-packages installed into the
    virtualenv's ``bin/`` and that bigmrun runs on machines: py-spy, for ``bigmrun
    profile`` (:data:`TOOLS`). Console scripts are not shipped: they name the driver's
    interpreter.

Determinism: entries are sorted, timestamps fixed (1980-01-01), modes reduced to 644 or
755, so the same inputs give the same bytes. ``digest`` is the SHA-256 of the metadata
and of every entry's name, mode and content hash (it is stored in the package, so it
cannot be the hash of the file's own bytes; the file's bytes are a function of it).
``env_digest`` covers ``bigmrun-env/`` alone: the host extracts the environment once
per environment, not once per program edit.

Caching, in ``<cache>/manifests`` (``<cache>`` is ``cache_dir``, ``$BIGMRUN_CACHE``,
``$XDG_CACHE_HOME/bigmrun`` or ``~/.cache/bigmrun``; packages go to
``<cache>/packages``):

* a *tree manifest*, keyed by the hash of every input's (path, size, mtime, mode) and
  the build options: when nothing changed, :func:`build` stats the files and returns
  the existing package without reading or zipping anything
  (``Package.cache_hit == "manifest"``);
* a *file-hash cache* keyed by (path, size, mtime): after a touch or an unrelated
  change only changed files are read; if the resulting digest names an existing
  package it is returned as is (``cache_hit == "package"``);
* a *reuse index* of the last package written (content hash -> compressed bytes in
  that file): a new package copies every unchanged member verbatim from it instead of
  compressing it again, so editing the program re-zips only what changed (about a
  second for a 400 MB virtualenv, against several seconds from scratch). Members
  that must be compressed are compressed in worker threads (``_zip``).

Like git, this trusts (size, mtime): a file rewritten with the same size within the
same mtime tick is not noticed by the manifest. Zipping re-hashes every file it
reads and starts over if one changed meanwhile.

A package bigger than ``warn_size`` (default 200 MB) emits a :class:`PackageSizeWarning`
naming its largest parts, and how to leave things out.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import stat
import sys
import sysconfig
import tempfile
import time
import warnings
import zipfile
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from ..errors import ConfigError
from . import _zip
from .program import Program

log = logging.getLogger("bigmrun.package")

#: Bump when the package layout changes (it is part of every digest).
FORMAT = 1
META = "bigmrun-package.json"
ENV_PREFIX = "bigmrun-env/"
PROG_PREFIX = "bigmrun-prog/"
#: Packages above this size (bytes) warn, naming their largest parts.
DEFAULT_WARN_SIZE = 200 * 1024 * 1024
IGNORE_FILE = ".bigmrunignore"

#: Left out of the program directory and of editable sources (gitignore syntax).
DEFAULT_IGNORE = (
    ".git/", ".hg/", ".svn/", ".bzr/", "__pycache__/", "*.pyc", "*.pyo",
    ".venv/", "venv/", ".mypy_cache/", ".pytest_cache/", ".ruff_cache/", ".tox/", ".nox/",
    ".hypothesis/", ".ipynb_checkpoints/", ".eggs/", ".DS_Store",
)
#: Self-contained executables that wheels put in a virtualenv's ``bin/``, shipped as
#: ``bigmrun-env/bin/NAME`` (see :func:`_tool_inputs`): distribution -> executable.
TOOLS = {"py_spy": "py-spy"}
#: Left out of site-packages.
SITE_IGNORE = ("__pycache__/", "*.pyc", "*.pyo", "__editable__*")

_NATIVE_SUFFIXES = (*importlib.machinery.EXTENSION_SUFFIXES, ".so", ".pyd", ".dylib")


class PackageSizeWarning(UserWarning):
    """A package is larger than the warning threshold; the message names its largest parts."""


@dataclass(frozen=True)
class Package:
    """A built package: one zipapp file named by its content hash."""

    #: Absolute path of the ``<digest>.pyz`` file.
    path: str
    #: SHA-256 (hex) of the package's content; also its file name.
    digest: str
    #: SHA-256 of the environment part (site-packages and sources) alone.
    env_digest: str
    #: File size in bytes.
    size: int
    #: Python ``major.minor`` the package was built for, e.g. ``"3.11"``.
    python: str
    #: ``sys.implementation.name``, e.g. ``"cpython"``.
    implementation: str
    #: ``sysconfig.get_platform()`` of the driver, e.g. ``"linux-x86_64"``.
    platform: str
    #: The ABI tag of extension modules (``SOABI``), e.g. ``"cpython-311-x86_64-linux-gnu"``.
    abi: str
    #: True when the package contains native extension modules (``.so``...).
    native: bool
    #: Script path relative to the program directory, or the module name.
    entry: str
    #: ``"script"`` or ``"module"``.
    entry_kind: str
    #: Uncompressed bytes per part (``program/<top>``, ``site-packages/<top>``, ``source/<pkg>``).
    parts: dict[str, int] = field(default_factory=dict, compare=False)
    #: ``"manifest"`` (nothing read or zipped), ``"package"`` (files hashed, zip reused)
    #: or ``None`` (zipped now).
    cache_hit: str | None = field(default=None, compare=False)
    #: Seconds :func:`build` took.
    build_seconds: float = field(default=0.0, compare=False)

    @property
    def python_version(self) -> tuple[int, int]:
        major, minor = self.python.split(".")
        return int(major), int(minor)

    def largest_parts(self, n: int = 5) -> list[tuple[str, int]]:
        return sorted(self.parts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


# --- ignore rules --------------------------------------------------------------------


class IgnoreRules:
    """gitignore-like patterns: blank lines and ``#`` comments are skipped; a pattern
    without ``/`` matches a name at any depth, one with a ``/`` (other than a trailing
    one) is anchored at the root; a trailing ``/`` matches directories only; ``*``,
    ``?`` and ``[...]`` are ``fnmatch`` wildcards (``*`` also crosses ``/`` in anchored
    patterns); a leading ``**/`` matches at any depth; ``!pattern`` re-includes (the
    last matching pattern wins). An ignored directory is not entered at all.
    """

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.rules: list[tuple[bool, bool, bool, str]] = []
        for raw in patterns:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:]
            dir_only = line.endswith("/")
            line = line.rstrip("/")
            while line.startswith("**/"):
                line = line[3:]
            anchored = "/" in line
            line = line.lstrip("/")
            if line:
                self.rules.append((negate, dir_only, anchored, line))

    @classmethod
    def from_file(cls, path: str, extra: Iterable[str] = ()) -> IgnoreRules:
        lines = list(extra)
        with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
            lines += f.read().splitlines()
        return cls(lines)

    def match(self, rel: str, is_dir: bool) -> bool:
        """True when ``rel`` (``/``-separated, relative to the root) is ignored."""
        base = rel.rsplit("/", 1)[-1]
        ignored = False
        for negate, dir_only, anchored, pattern in self.rules:
            if dir_only and not is_dir:
                continue
            if fnmatchcase(rel if anchored else base, pattern):
                ignored = not negate
        return ignored


# --- inputs --------------------------------------------------------------------------


@dataclass
class _Input:
    arc: str                 # name in the zip
    part: str                # size accounting group
    src: str | None = None   # file to read, or
    data: bytes | None = None  # synthetic content
    size: int = 0
    mtime_ns: int = 0
    exe: bool = False
    sha: str = ""

    def key(self) -> str:
        if self.data is not None:
            return f"{self.arc}\0=\0{hashlib.sha256(self.data).hexdigest()}"
        return f"{self.arc}\0{self.src}\0{self.size}\0{self.mtime_ns}\0{int(self.exe)}"

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.src is not None
        with open(self.src, "rb") as f:
            return f.read()


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """bigmrun's local cache: ``cache_dir``, ``$BIGMRUN_CACHE``, or ``~/.cache/bigmrun``."""
    root = os.fspath(cache_dir) if cache_dir else os.environ.get("BIGMRUN_CACHE")
    if root:
        return os.path.abspath(os.path.expanduser(root))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "bigmrun")


def default_site_packages() -> list[str]:
    """The driver's virtualenv site-packages directories (none outside a virtualenv)."""
    if sys.prefix == sys.base_prefix:
        return []
    import site

    dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    prefix = os.path.realpath(sys.prefix)
    return [d for d in dirs if os.path.realpath(d).startswith(prefix + os.sep)]


def _inside(path: str, dirs: Iterable[str]) -> bool:
    real = os.path.realpath(path)
    for d in dirs:
        rd = os.path.realpath(d)
        if real == rd or real.startswith(rd.rstrip(os.sep) + os.sep):
            return True
    return False


def _walk(top: str, arc_prefix: str, part_prefix: str, rules: IgnoreRules,
          skip: Sequence[str] = (), venv_check: bool = True) -> list[_Input]:
    """Every regular file under ``top`` not ignored, sorted, as inputs."""
    out: list[_Input] = []
    seen: set[tuple[int, int]] = set()  # (device, inode) of directories entered
    skip_ids = set()
    for d in skip:
        with contextlib.suppress(OSError):
            st = os.stat(d)
            skip_ids.add((st.st_dev, st.st_ino))

    def visit(path: str, rel_dir: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop
            return
        seen.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda d: d.name)
        except OSError as err:
            log.warning("bigmrun package: cannot read %s: %s (left out)", path, err)
            return
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            try:
                st = e.stat()
            except OSError:
                continue  # a dangling symlink
            if stat.S_ISDIR(st.st_mode):
                if rules.match(rel, True) or (st.st_dev, st.st_ino) in skip_ids:
                    continue
                if venv_check and os.path.exists(os.path.join(e.path, "pyvenv.cfg")):
                    continue
                visit(e.path, rel)
            elif stat.S_ISREG(st.st_mode):
                if rules.match(rel, False):
                    continue
                top_name = rel.split("/", 1)[0]
                out.append(_Input(arc_prefix + rel, part_prefix + top_name, src=e.path,
                                  size=st.st_size, mtime_ns=st.st_mtime_ns,
                                  exe=bool(st.st_mode & 0o111)))

    visit(top, "")
    return out


def _finder_mapping(path: str) -> dict[str, str]:
    """The ``MAPPING`` of a setuptools editable finder module (name -> path)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return {}
    target: ast.expr
    expr: ast.expr | None
    for node in tree.body:
        if isinstance(node, ast.AnnAssign):
            target, expr = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, expr = node.targets[0], node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == "MAPPING" and expr is not None:
            try:
                value = ast.literal_eval(expr)
            except ValueError:
                return {}
            if isinstance(value, dict):
                return {str(k): str(v) for k, v in value.items()}
    return {}


def _site_inputs(sites: Sequence[str]) -> tuple[list[_Input], list[tuple[str, str]]]:
    """Inputs for each site-packages dir, and the sources editable installs point at."""
    inputs: list[_Input] = []
    sources: list[tuple[str, str]] = []  # (top-level name, path)
    rules = IgnoreRules(SITE_IGNORE)
    for i, sp in enumerate(sites):
        prefix = f"{ENV_PREFIX}sp{i}/"
        for inp in _walk(sp, prefix, "site-packages/", rules, venv_check=False):
            if not (inp.arc.endswith(".pth") and "/" not in inp.arc[len(prefix):]):
                inputs.append(inp)  # top-level .pth files: filtered below
        for name in sorted(os.listdir(sp)):
            full = os.path.join(sp, name)
            if name.startswith("__editable__") and name.endswith("_finder.py"):
                sources += sorted(_finder_mapping(full).items())
            elif name.endswith(".pth") and os.path.isfile(full):
                kept, external = _filter_pth(full, sp, sites)
                for d in external:
                    sources += _top_level_in(d)
                if kept and not name.startswith("__editable__"):
                    inputs.append(_Input(prefix + name, "site-packages/" + name,
                                         data=("\n".join(kept) + "\n").encode()))
    return inputs, sources


def _tool_inputs(sites: Sequence[str]) -> list[_Input]:
    """The :data:`TOOLS` executables that wheels in ``sites`` installed into the
    virtualenv's ``bin/`` (found through the wheel's ``RECORD``), as ``bigmrun-env/bin/``.

    ``bin/`` is not shipped otherwise (its console scripts name the driver's own
    interpreter), but py-spy is a self-contained binary that ``bigmrun profile`` runs
    on every machine: ``bigmrun.profiling.capture`` looks for it in ``<env>/bin``.
    """
    out: dict[str, _Input] = {}
    for sp in sites:
        try:
            dists = sorted(os.listdir(sp))
        except OSError:
            continue
        for dist in dists:
            tool = TOOLS.get(dist.split("-", 1)[0].lower())
            if tool is None or not dist.endswith(".dist-info") or tool in out:
                continue
            try:
                with open(os.path.join(sp, dist, "RECORD"), encoding="utf-8") as f:
                    rows = [line.split(",", 1)[0] for line in f]
                path = next(os.path.normpath(os.path.join(sp, r)) for r in rows
                            if r.startswith("../") and r.endswith("/bin/" + tool))
                st = os.stat(path)
            except (OSError, UnicodeDecodeError, StopIteration):
                continue
            out[tool] = _Input(f"{ENV_PREFIX}bin/{tool}", f"tools/{tool}", src=path,
                               size=st.st_size, mtime_ns=st.st_mtime_ns,
                               exe=bool(st.st_mode & 0o111))
    return list(out.values())


def _filter_pth(path: str, sp: str, sites: Sequence[str]) -> tuple[list[str], list[str]]:
    """A ``.pth`` file's lines that stay valid on a host, and directories it names that
    lie outside every site-packages (to ship as sources)."""
    kept: list[str] = []
    external: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return [], []
    for line in lines:
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith(("import ", "import\t")):
            if "__editable__" not in s:
                kept.append(line)
            continue
        d = s if os.path.isabs(s) else os.path.join(sp, s)
        if _inside(d, sites):
            kept.append(line)
        elif os.path.isdir(d):
            external.append(d)
    return kept, external


def _top_level_in(d: str) -> list[tuple[str, str]]:
    """Importable top-level packages (with ``__init__.py``) and modules in ``d``."""
    out = []
    for name in sorted(os.listdir(d)):
        full = os.path.join(d, name)
        if os.path.isdir(full) and os.path.isfile(os.path.join(full, "__init__.py")):
            out.append((name, full))
        elif os.path.isfile(full) and name.endswith((".py", *_NATIVE_SUFFIXES)):
            out.append((name.split(".", 1)[0], full))
    return out


def _source_inputs(sources: Sequence[tuple[str, str]], sites: Sequence[str]) -> list[_Input]:
    rules = IgnoreRules(DEFAULT_IGNORE)
    inputs: list[_Input] = []
    done: set[str] = set()
    for name, path in sources:
        if name in done or _inside(path, sites) or not os.path.exists(path):
            continue
        done.add(name)
        if os.path.isdir(path):
            inputs += _walk(path, f"{ENV_PREFIX}src/{name}/", "", rules)
        else:
            st = os.stat(path)
            base = os.path.basename(path)
            inputs.append(_Input(f"{ENV_PREFIX}src/{base}", f"source/{name}", src=path,
                                 size=st.st_size, mtime_ns=st.st_mtime_ns,
                                 exe=bool(st.st_mode & 0o111)))
    for inp in inputs:  # one part per source package
        inp.part = "source/" + inp.arc[len(ENV_PREFIX) + 4:].split("/", 1)[0]
    return inputs


def _module_root(module: str, sites: Sequence[str]) -> str | None:
    """The ``sys.path`` directory holding ``module``'s top-level package (None when it
    lives in site-packages or the standard library: nothing to ship as the program)."""
    top = module.split(".", 1)[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"cannot find module {module!r} to package: {e}") from e
    if spec is None:
        raise ConfigError(f"cannot find module {module!r} to package (not on sys.path)")
    if spec.submodule_search_locations:
        loc = next(iter(spec.submodule_search_locations), None)
        parent = os.path.dirname(os.path.abspath(loc)) if loc else None
    elif spec.origin and os.path.isfile(spec.origin):
        parent = os.path.dirname(os.path.abspath(spec.origin))
    else:
        parent = None
    stdlib = [p for p in (sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")) if p]
    if parent is None or _inside(parent, sites) or _inside(parent, stdlib):
        return None
    return parent


def _is_native(name: str) -> bool:
    return name.endswith(_NATIVE_SUFFIXES) or ".so." in name.rsplit("/", 1)[-1]


# --- caches --------------------------------------------------------------------------


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _save_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- build ---------------------------------------------------------------------------


def _bootstrap_source() -> bytes:
    with open(os.path.join(os.path.dirname(__file__), "_zipmain.py"), "rb") as f:
        return f.read()


def _digest(header: dict[str, Any], inputs: Sequence[_Input]) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode() + b"\n")
    for inp in inputs:
        h.update(f"{inp.arc}\0{int(inp.exe)}\0{inp.sha}\n".encode())
    return h.hexdigest()


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _warn_size(pkg: Package, warn_size: int, root: str | None) -> None:
    if warn_size <= 0 or pkg.size <= warn_size:
        return
    parts = ", ".join(f"{name} {_mb(size)}" for name, size in pkg.largest_parts(5))
    where = f" in {os.path.join(root, IGNORE_FILE)}" if root else ""
    warnings.warn(PackageSizeWarning(
        f"bigmrun package {os.path.basename(pkg.path)} is {_mb(pkg.size)} (warning "
        f"threshold {_mb(warn_size)}); largest parts (uncompressed): {parts}. Leave program "
        f"files out with patterns{where}, or build from a leaner virtualenv."), stacklevel=3)


def build(
    script: str | os.PathLike[str] | None = None,
    *,
    module: str | None = None,
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    site_packages: Sequence[str] | None = None,
    sources: Sequence[tuple[str, str]] = (),
    ignore: Sequence[str] = (),
    pythonpath: Sequence[str] = (),
    warn_size: int = DEFAULT_WARN_SIZE,
    compresslevel: int = 6,
) -> Package:
    """Pack a program and the driver's environment into ``<cache>/packages/<digest>.pyz``.

    Give exactly one of ``script`` (a file) or ``module`` (``pkg.mod``, run like
    ``python -m``). ``root`` is the program directory to ship (default: the script's
    directory, or the ``sys.path`` entry holding the module's top-level package).
    ``site_packages`` overrides the site-packages directories to include (default:
    :func:`default_site_packages`); ``sources`` adds ``(top-level name, path)`` pairs
    of packages to ship as source; ``ignore`` adds patterns to ``.bigmrunignore``'s;
    ``pythonpath`` names directories inside the program root that the host puts on
    ``sys.path`` after the program's own (others are left out, with a log line).
    Returns the :class:`Package`; see the module notes for the caches.
    """
    t0 = time.monotonic()
    if (script is None) == (module is None):
        raise ConfigError("package.build needs exactly one of script= or module=")
    croot = cache_root(cache_dir)
    sites = [os.path.abspath(s) for s in (default_site_packages() if site_packages is None
                                          else site_packages)]
    prog_root: str | None
    if script is not None:
        path = os.path.abspath(os.fspath(script))
        if not os.path.isfile(path):
            raise ConfigError(f"cannot package {path}: no such file")
        prog_root = os.path.abspath(os.fspath(root)) if root else os.path.dirname(path)
        if not _inside(path, [prog_root]):
            raise ConfigError(f"the script {path} is not inside the program root {prog_root}")
        entry, kind = os.path.relpath(path, prog_root).replace(os.sep, "/"), "script"
    else:
        assert module is not None
        if not all(p.isidentifier() for p in module.split(".")):
            raise ConfigError(f"{module!r} is not a module name")
        prog_root = os.path.abspath(os.fspath(root)) if root else _module_root(module, sites)
        entry, kind = module, "module"
    paths: list[str] = []
    for d in pythonpath:
        full = os.path.abspath(d)
        if prog_root and _inside(full, [prog_root]) and full != prog_root:
            rel = os.path.relpath(full, prog_root).replace(os.sep, "/")
            if rel not in paths:
                paths.append(rel)
        elif not prog_root or full != prog_root:
            log.debug("bigmrun package: %s is not inside the program root; not shipped", d)
    for attempt in range(3):
        try:
            pkg = _build(croot, prog_root, entry, kind, sites, sources, ignore, paths,
                         compresslevel)
            break
        except _Changed as e:
            if attempt == 2:
                raise ConfigError(f"{e.path} keeps changing while being packaged") from None
            log.info("bigmrun package: %s changed while packaging; starting over", e.path)
    pkg = _with(pkg, build_seconds=time.monotonic() - t0)
    log.info("bigmrun package %s: %s in %.2fs (cache: %s)", pkg.digest[:12], _mb(pkg.size),
             pkg.build_seconds, pkg.cache_hit or "miss")
    _warn_size(pkg, warn_size, prog_root)
    return pkg


class _Changed(Exception):
    def __init__(self, path: str) -> None:
        self.path = path


def _with(pkg: Package, **changes: Any) -> Package:
    import dataclasses

    return dataclasses.replace(pkg, **changes)


def _build(croot: str, prog_root: str | None, entry: str, kind: str, sites: Sequence[str],
           extra_sources: Sequence[tuple[str, str]], ignore: Sequence[str],
           paths: list[str], compresslevel: int) -> Package:
    import bigmrun

    # 1. The inputs (stat only).
    inputs: list[_Input] = []
    if prog_root is not None:
        rules = IgnoreRules.from_file(os.path.join(prog_root, IGNORE_FILE),
                                      [*DEFAULT_IGNORE, *ignore])
        inputs += _walk(prog_root, PROG_PREFIX, "program/", rules, skip=[croot, *sites])
    site_inputs, sources = _site_inputs(sites)
    site_inputs += _tool_inputs(sites)
    own = os.path.dirname(os.path.abspath(bigmrun.__file__))
    src_inputs = _source_inputs([("bigmrun", own), *extra_sources, *sources], sites)
    inputs += site_inputs + src_inputs
    inputs.append(_Input("__main__.py", "bootstrap", data=_bootstrap_source()))
    inputs.sort(key=lambda i: i.arc)
    env_dirs = (["src"] if src_inputs else []) + [f"sp{i}" for i in range(len(sites))]
    native = any(_is_native(i.arc) for i in inputs)
    header: dict[str, Any] = {
        "format": FORMAT,
        "entry": entry,
        "entry_kind": kind,
        "python": "{}.{}".format(*sys.version_info[:2]),
        "python_version": list(sys.version_info[:2]),
        "implementation": sys.implementation.name,
        "platform": sysconfig.get_platform(),
        "abi": sysconfig.get_config_var("SOABI") or "",
        "native": native,
        "env_dirs": env_dirs,
        "paths": paths,
    }
    parts: dict[str, int] = {}
    for inp in inputs:
        size = inp.size if inp.data is None else len(inp.data)
        parts[inp.part] = parts.get(inp.part, 0) + size

    def package(meta: dict[str, Any], path: str, hit: str | None) -> Package:
        return Package(path=path, digest=meta["digest"], env_digest=meta["env_digest"],
                       size=os.path.getsize(path), python=meta["python"],
                       implementation=meta["implementation"], platform=meta["platform"],
                       abi=meta["abi"], native=meta["native"], entry=meta["entry"],
                       entry_kind=meta["entry_kind"], parts=parts, cache_hit=hit)

    # 2. Fast path: the same tree (paths, sizes, mtimes) and options as a past build.
    tree = hashlib.sha256(json.dumps([header, compresslevel], sort_keys=True).encode())
    for inp in inputs:
        tree.update(inp.key().encode() + b"\n")
    manifest_path = os.path.join(croot, "manifests", tree.hexdigest() + ".json")
    pkg_dir = os.path.join(croot, "packages")
    manifest = _load_json(manifest_path)
    if isinstance(manifest, dict) and "meta" in manifest:
        path = os.path.join(pkg_dir, manifest["meta"]["digest"] + ".pyz")
        with contextlib.suppress(OSError):
            if os.path.getsize(path) == manifest.get("size"):
                return package(manifest["meta"], path, "manifest")

    # 3. Content hashes (reusing the file-hash cache) -> digests.
    hashes_path = os.path.join(croot, "manifests", "files.json")
    cache = _load_json(hashes_path)
    cache = cache if isinstance(cache, dict) else {}
    for inp in inputs:
        if inp.data is not None:
            inp.sha = hashlib.sha256(inp.data).hexdigest()
            continue
        assert inp.src is not None
        hit = cache.get(inp.src)
        if isinstance(hit, list) and hit[:2] == [inp.size, inp.mtime_ns]:
            inp.sha = hit[2]
        else:
            try:
                inp.sha = _sha256_file(inp.src)
            except OSError as e:
                raise ConfigError(f"cannot read {inp.src} to package it: {e}") from e
            cache[inp.src] = [inp.size, inp.mtime_ns, inp.sha]
    env_inputs = [i for i in inputs if i.arc.startswith(ENV_PREFIX)]
    meta = dict(header)
    meta["env_digest"] = _digest({"format": FORMAT}, env_inputs)
    meta["digest"] = _digest({**header, "env_digest": meta["env_digest"]}, inputs)
    _save_json(hashes_path, cache)

    # 4. The zip itself, unless a package with this digest exists already.
    path = os.path.join(pkg_dir, meta["digest"] + ".pyz")
    reused = os.path.isfile(path)
    if not reused:
        _write_zip(croot, path, inputs, meta, compresslevel)
    _save_json(manifest_path, {"meta": meta, "size": os.path.getsize(path)})
    return package(meta, path, "package" if reused else None)


def _write_zip(croot: str, path: str, inputs: Sequence[_Input], meta: dict[str, Any],
               level: int) -> None:
    """Write the zip: members in name order, compressed in worker threads, or copied
    verbatim (by content hash) from the last package built with the same level."""
    pkg_dir = os.path.dirname(path)
    os.makedirs(pkg_dir, exist_ok=True)
    reuse_path = os.path.join(croot, "manifests", f"reuse-{level}.json")
    old = _load_json(reuse_path)
    table: dict[str, list[int]] = {}
    old_fd = -1
    if isinstance(old, dict) and isinstance(old.get("members"), dict):
        old_path = os.path.join(pkg_dir, str(old.get("package")))
        with contextlib.suppress(OSError):
            if os.path.getsize(old_path) == old.get("size"):
                old_fd = os.open(old_path, os.O_RDONLY)
                table = old["members"]
    meta_input = _Input(META, "bootstrap",
                        data=json.dumps(meta, sort_keys=True, indent=1).encode())
    meta_input.sha = hashlib.sha256(meta_input.data or b"").hexdigest()
    items = sorted([*inputs, meta_input], key=lambda i: i.arc)
    reused = [0]

    def produce(inp: _Input) -> tuple[int, int, int, bytes, bool]:
        hit = table.get(inp.sha)
        if hit is not None:
            method, crc, csize, usize, offset = hit
            payload = os.pread(old_fd, csize, offset)
            if len(payload) == csize:
                return method, crc, usize, payload, True
        try:
            data = inp.read()
        except OSError as e:
            raise _Changed(inp.src or inp.arc) from e
        if inp.data is None and hashlib.sha256(data).hexdigest() != inp.sha:
            raise _Changed(inp.src or inp.arc)
        method, crc, payload = _zip.compress(data, level)
        return method, crc, len(data), payload, False

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pyz", dir=pkg_dir)
    members: dict[str, list[int]] = {}
    try:
        workers = max(1, min(4, os.cpu_count() or 1))
        with os.fdopen(fd, "wb") as f, ThreadPoolExecutor(workers) as pool:
            zw = _zip.ZipWriter(f)
            pending: deque[tuple[_Input, Future[tuple[int, int, int, bytes, bool]]]] = deque()

            def write_one() -> None:
                inp, fut = pending.popleft()
                method, crc, usize, payload, copied = fut.result()
                reused[0] += copied
                m = zw.add(inp.arc, 0o755 if inp.exe else 0o644, method, crc, usize, payload)
                members[inp.sha] = [method, crc, m.csize, usize, m.data_offset]

            try:
                for inp in items:
                    pending.append((inp, pool.submit(produce, inp)))
                    if len(pending) > 2 * workers:
                        write_one()
                while pending:
                    write_one()
            finally:
                for _, fut in pending:
                    fut.cancel()
            zw.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        if old_fd >= 0:
            os.close(old_fd)
    log.debug("bigmrun package: %d of %d members copied from an earlier package",
              reused[0], len(items))
    _save_json(reuse_path, {"package": os.path.basename(path),
                            "size": os.path.getsize(path), "members": members})


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata stored in a package file."""
    with zipfile.ZipFile(path) as zf:
        return dict(json.loads(zf.read(META)))


# --- from a Program ------------------------------------------------------------------


def split_program(program: Program) -> tuple[str | None, str | None, list[str]]:
    """``(script, module, args)`` of a :class:`Program`'s command line."""
    argv = program.argv[1:]
    if argv[:1] == ["-m"] and len(argv) >= 2:
        return None, argv[1], argv[2:]
    if not argv:
        raise ConfigError(f"cannot tell the program from {program.argv!r}")
    return argv[0], None, argv[1:]


def build_for(program: Program, **options: Any) -> Package:
    """Build the package for a :class:`Program` (``current_program()``), ``build``'s options.

    A *bare* program (the driver is pytest, a notebook...) runs ``-m bigmrun.machine``:
    its program directory is the current directory, which normally holds the modules
    defining the services, and the driver's ``sys.path`` entries inside it (a tests
    directory, say) go on the host's ``sys.path`` too. The program's arguments are not
    part of the package: pass
    ``split_program(program)[2]`` when running it.
    """
    script, module, _ = split_program(program)
    if program.bare:
        options.setdefault("root", os.getcwd())
        options.setdefault("pythonpath", program.pythonpath)
    return build(script, module=module, **options)


__all__ = [
    "DEFAULT_WARN_SIZE",
    "IgnoreRules",
    "Package",
    "PackageSizeWarning",
    "build",
    "build_for",
    "cache_root",
    "default_site_packages",
    "read_meta",
    "split_program",
]
