"""Self-packaging and the stdlib-only remote bootstrap, with real interpreters and processes.

Packages are run by a *different, clean* interpreter (``python -I``: no virtualenv, no
PYTHONPATH, e.g. the system /usr/bin/python3 when its minor version matches), so a
passing run proves the package carries its own dependencies, C extensions included.
``remote.py`` runs the way the SSH system will run it: its source fed to ``python3 -``
on stdin. Only loopback is used; every wait is bounded; nothing asserts a duration.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import logging
import os
import signal
import subprocess
import sys
import sysconfig
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bigmrun
from bigmrun.backends._base import BootSpec
from bigmrun.bootstrap import _zip, remote
from bigmrun.bootstrap.package import (
    ENV_PREFIX,
    PROG_PREFIX,
    IgnoreRules,
    Package,
    PackageSizeWarning,
    build,
    build_for,
    default_site_packages,
    read_meta,
    split_program,
)
from bigmrun.bootstrap.program import Program
from bigmrun.errors import ConfigError

pytestmark = pytest.mark.timeout(600)

MINOR = "{}.{}".format(*sys.version_info[:2])


def wait_for(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def _find_clean_python() -> tuple[str | None, str]:
    """An interpreter of our minor version that is not this virtualenv's."""
    candidates = ["/usr/bin/python3", os.path.join(sys.base_prefix, "bin", f"python{MINOR}")]
    tried = []
    for exe in candidates:
        if not os.path.isfile(exe):
            tried.append(f"{exe}: missing")
            continue
        r = subprocess.run([exe, "-I", "-c", "import sys; print('%d.%d' % sys.version_info[:2],"
                            " sys.prefix == sys.base_prefix)"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode == 0 and r.stdout.split() == [MINOR, "True"]:
            return exe, ""
        tried.append(f"{exe}: {r.stdout.strip() or r.stderr.strip()}")
    return None, f"no clean Python {MINOR} interpreter ({'; '.join(tried)})"


@pytest.fixture(scope="module")
def clean_python() -> str:
    exe, why = _find_clean_python()
    if exe is None:
        pytest.skip(why)
    return exe


def clean_env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "BIGMRUN_"))}
    env["BIGMRUN_CACHE"] = str(cache)
    env.update(extra)
    return env


def run_package(python: str, pkg: Package, cache: Path, *args: str,
                **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python, "-I", pkg.path, *args], capture_output=True, text=True,
                          env=clean_env(cache, **env), timeout=180, cwd=str(cache.parent))


MAIN = """\
import json, os, sys
import psutil
import bigmrun
import helper
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "data.txt")) as f:
    data = f.read()
print(json.dumps({
    "psutil": psutil.__file__,
    "psutil_ext": psutil._psutil_linux.__file__ if sys.platform == "linux" else "",
    "cpus": psutil.cpu_count(),
    "bigmrun": bigmrun.__file__,
    "helper": helper.VALUE,
    "argv": sys.argv[1:],
    "file": __file__,
    "name": __name__,
    "data": data,
    "executable": sys.executable,
}))
"""


def make_program(root: Path, main: str = MAIN) -> Path:
    """A small program with things that must and must not be packaged."""
    files = {
        "main.py": main,
        "helper.py": "VALUE = 42\n",
        "data.txt": "some data\n",
        "sub/keep.txt": "kept\n",
        "sub/drop.log": "dropped by sub/*.log\n",
        "sub/__pycache__/x.cpython-311.pyc": "junk",
        "__pycache__/helper.cpython-311.pyc": "junk",
        "stray.pyc": "junk",
        ".git/config": "[core]\n",
        ".git/objects/ab/cdef": "blob",
        ".mypy_cache/x.json": "{}",
        ".pytest_cache/v": "x",
        "secret.txt": "ignored by name\n",
        "logs/run.log": "ignored as a directory\n",
        "scratch.tmp": "ignored by *.tmp\n",
        "keep.tmp": "re-included by !keep.tmp\n",
        ".venv/pyvenv.cfg": "home = /usr\n",
        ".venv/lib/site.py": "x",
        "otherenv/pyvenv.cfg": "home = /usr\n",
        "otherenv/lib/thing.py": "x",
        ".bigmrunignore": "# a comment\n\nsecret.txt\nlogs/\n*.tmp\n!keep.tmp\nsub/*.log\n",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "main.py"


@pytest.fixture(scope="module")
def driver_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("driver-cache")


@pytest.fixture(scope="module")
def full_pkg(tmp_path_factory: pytest.TempPathFactory, driver_cache: Path) -> Package:
    """The test program packed with this virtualenv (psutil, cryptography, bigmrun...)."""
    if not default_site_packages():
        pytest.skip("the tests do not run in a virtualenv: nothing to pack")
    main = make_program(tmp_path_factory.mktemp("prog"))
    return build(main, cache_dir=driver_cache)


# --- the package itself --------------------------------------------------------------


def test_package_fields_and_contents(full_pkg: Package) -> None:
    assert os.path.basename(full_pkg.path) == full_pkg.digest + ".pyz"
    assert len(full_pkg.digest) == 64 and full_pkg.size == os.path.getsize(full_pkg.path)
    assert full_pkg.python == MINOR
    assert full_pkg.platform == sysconfig.get_platform()
    assert full_pkg.abi == (sysconfig.get_config_var("SOABI") or "")
    assert full_pkg.native is True  # psutil, cryptography
    assert (full_pkg.entry, full_pkg.entry_kind) == ("main.py", "script")
    assert full_pkg.cache_hit is None
    assert "site-packages/psutil" in full_pkg.parts
    meta = read_meta(full_pkg.path)
    assert meta["digest"] == full_pkg.digest and meta["env_digest"] == full_pkg.env_digest
    with zipfile.ZipFile(full_pkg.path) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        infos = zf.infolist()
    assert names == sorted(names) and "__main__.py" in names
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    prog = sorted(n[len(PROG_PREFIX):] for n in names if n.startswith(PROG_PREFIX))
    assert prog == [".bigmrunignore", "data.txt", "helper.py", "keep.tmp", "main.py",
                    "sub/keep.txt"]
    env = [n[len(ENV_PREFIX):] for n in names if n.startswith(ENV_PREFIX)]
    assert not [n for n in env if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in env if "__editable__" in n]  # replaced by the source itself
    assert any(n.endswith("bigmrun/__init__.py") for n in env)
    assert any(n.startswith("sp0/psutil/") and n.endswith(".so") for n in env)


def test_runs_on_a_clean_interpreter_with_native_extensions(
        full_pkg: Package, clean_python: str, tmp_path: Path) -> None:
    host = tmp_path / "host-cache"
    r = run_package(clean_python, full_pkg, host, "a", "--flag", "b c")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    env_dir = str(host / "env" / full_pkg.env_digest) + os.sep
    prog_dir = str(host / "prog" / full_pkg.digest) + os.sep
    assert out["executable"] == clean_python
    assert out["psutil"].startswith(env_dir)
    if sys.platform == "linux":
        assert out["psutil_ext"].startswith(env_dir) and ".so" in out["psutil_ext"]
    assert out["cpus"] >= 1
    assert out["bigmrun"].startswith(env_dir)
    assert out["file"] == prog_dir + "main.py" and out["name"] == "__main__"
    assert out["argv"] == ["a", "--flag", "b c"]
    assert (out["helper"], out["data"]) == (42, "some data\n")
    # A second run uses what the first extracted.
    r2 = run_package(clean_python, full_pkg, host, "again", BIGMRUN_BOOTSTRAP_DEBUG="1")
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout)["argv"] == ["again"]
    assert "extracted" not in r2.stderr


def test_concurrent_first_runs_extract_once(
        full_pkg: Package, clean_python: str, tmp_path: Path) -> None:
    host = tmp_path / "host-cache"
    env = clean_env(host, BIGMRUN_BOOTSTRAP_DEBUG="1")
    procs = [subprocess.Popen([clean_python, "-I", full_pkg.path, str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    assert sorted(json.loads(out)["argv"][0] for out, _ in results) == ["0", "1", "2", "3"]
    stderr = "".join(err for _, err in results)
    assert stderr.count("extracted bigmrun-env") == 1, stderr
    assert stderr.count("extracted bigmrun-prog") == 1, stderr
    for sub, key in (("env", full_pkg.env_digest), ("prog", full_pkg.digest)):
        left = sorted(os.listdir(host / sub))
        assert left == [key, key + ".lock"], left  # no temporary directory left behind


# --- hashing and caching (small packages: no site-packages) ---------------------------


def small_build(main: Path, cache: Path, **kw: Any) -> Package:
    return build(main, cache_dir=cache, site_packages=[], **kw)


def test_digest_is_deterministic_and_cached(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    main = make_program(tmp_path / "prog")
    first = small_build(main, tmp_path / "c1")
    assert first.cache_hit is None and first.native is False
    again = small_build(main, tmp_path / "c1")
    assert again.cache_hit == "manifest" and again.digest == first.digest
    elsewhere = small_build(main, tmp_path / "c2")  # no cache at all
    assert elsewhere.cache_hit is None and elsewhere.digest == first.digest
    assert filecmp.cmp(first.path, elsewhere.path, shallow=False)  # same bytes

    # Touched but unchanged: files are re-hashed, the existing zip is reused.
    st = os.stat(main)
    os.utime(main, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    touched = small_build(main, tmp_path / "c1")
    assert touched.cache_hit == "package" and touched.digest == first.digest

    # A real change: a new digest, zipped by copying the unchanged members.
    helper = tmp_path / "prog" / "helper.py"
    helper.write_text("VALUE = 43\n")
    with caplog.at_level(logging.DEBUG, logger="bigmrun.package"):
        changed = small_build(main, tmp_path / "c1")
    assert changed.cache_hit is None and changed.digest != first.digest
    copied = [r.getMessage() for r in caplog.records if "copied" in r.getMessage()]
    assert copied, caplog.text
    n_copied, n_total = (int(w) for w in copied[-1].split()[2:5:2])
    assert n_copied >= n_total - 2  # only helper.py and the metadata were compressed
    with zipfile.ZipFile(changed.path) as zf:
        assert zf.read(PROG_PREFIX + "helper.py") == b"VALUE = 43\n"
        assert zf.testzip() is None

    # Back to the old content: the old package again, not a new one.
    helper.write_text("VALUE = 42\n")
    back = small_build(main, tmp_path / "c1")
    assert back.digest == first.digest and back.cache_hit == "package"

    # A newly ignored file changes the package too.
    (tmp_path / "prog" / ".bigmrunignore").write_text("data.txt\n")
    assert small_build(main, tmp_path / "c1").digest != first.digest


def test_size_warning_names_the_largest_part(tmp_path: Path) -> None:
    main = make_program(tmp_path / "prog")
    (tmp_path / "prog" / "big.bin").write_bytes(os.urandom(3_000_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # default threshold: no warning
        small_build(main, tmp_path / "cache")
    with pytest.warns(PackageSizeWarning) as record:
        pkg = small_build(main, tmp_path / "cache", warn_size=1_000_000)
    assert pkg.cache_hit == "manifest"  # the cached path warns too
    msg = str(record[0].message)
    assert "largest parts" in msg and ".bigmrunignore" in msg
    assert pkg.largest_parts(1)[0][0] == "program/big.bin"
    parts = msg.split("largest parts", 1)[1]
    assert parts.index("program/big.bin") < parts.index("source/bigmrun")


def test_module_entry(tmp_path: Path, clean_python: str,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "proj"
    (root / "mypkg").mkdir(parents=True)
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "cli.py").write_text(
        "import json, os, sys\n"
        "print(json.dumps({'name': __name__, 'argv': sys.argv[1:], 'cwd': os.getcwd(),"
        " 'file': __file__}))\n")
    monkeypatch.syspath_prepend(str(root))
    pkg = build(module="mypkg.cli", cache_dir=tmp_path / "cache", site_packages=[])
    assert (pkg.entry, pkg.entry_kind) == ("mypkg.cli", "module")
    host = tmp_path / "host"
    r = run_package(clean_python, pkg, host, "-x", "1", BIGMRUN_PROGRAM_CWD="1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    prog_dir = str(host / "prog" / pkg.digest)
    assert out["name"] == "__main__" and out["argv"] == ["-x", "1"]
    assert out["file"] == os.path.join(prog_dir, "mypkg", "cli.py")
    assert out["cwd"] == prog_dir  # BIGMRUN_PROGRAM_CWD=1: run from the program root
    with pytest.raises(ConfigError, match="no_such_module_xyz"):
        build(module="no_such_module_xyz", cache_dir=tmp_path / "cache", site_packages=[])


def test_build_for_a_bare_program_ships_its_pythonpath(
        tmp_path: Path, clean_python: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "proj"
    (root / "lib").mkdir(parents=True)
    (root / "lib" / "tool.py").write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    monkeypatch.chdir(root)
    # As a pytest driver's machines are described, but running a module of ours.
    prog = Program([sys.executable, "-m", "tool", "a", "b"], True,
                   [str(root / "lib"), str(tmp_path / "elsewhere")])
    assert split_program(prog) == (None, "tool", ["a", "b"])
    assert split_program(Program(["py", "/p/main.py", "-x"], False, [])) == \
        ("/p/main.py", None, ["-x"])
    pkg = build_for(prog, cache_dir=tmp_path / "cache", site_packages=[])
    assert read_meta(pkg.path)["paths"] == ["lib"]
    r = run_package(clean_python, pkg, tmp_path / "host", *split_program(prog)[2])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["a", "b"]


def test_bootstrap_refuses_another_python(tmp_path: Path, clean_python: str) -> None:
    main = make_program(tmp_path / "prog")
    pkg = small_build(main, tmp_path / "cache")
    # The same package, relabelled as built for Python 3.99.
    forged = tmp_path / "forged.pyz"
    with zipfile.ZipFile(pkg.path) as src, zipfile.ZipFile(forged, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "bigmrun-package.json":
                meta = json.loads(data)
                meta["python_version"] = [3, 99]
                data = json.dumps(meta).encode()
            dst.writestr(info, data)
    r = subprocess.run([clean_python, "-I", str(forged)], capture_output=True, text=True,
                       env=clean_env(tmp_path / "host"), timeout=120)
    assert r.returncode == 2
    assert "built for Python 3.99" in r.stderr and f"Python {MINOR}" in r.stderr
    assert "--python PATH" in r.stderr
    assert not (tmp_path / "host").exists()  # refused before extracting anything


def test_ignore_rules() -> None:
    rules = IgnoreRules(["# comment", "", "*.log", "build/", "/top.txt", "docs/*.md",
                         "**/deep", "!keep.log"])
    assert rules.match("a/b/x.log", False) and not rules.match("keep.log", False)
    assert rules.match("build", True) and not rules.match("build", False)
    assert rules.match("top.txt", False) and not rules.match("sub/top.txt", False)
    assert rules.match("docs/a.md", False) and not rules.match("a.md", False)
    assert rules.match("x/y/deep", True) and rules.match("deep", False)
    assert not rules.match("comment", False)


def test_zip_writer_zip64_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Force every zip64 path (sizes, offsets, member count) with tiny limits.
    monkeypatch.setattr(_zip, "ZIP64_SIZE", 10)
    monkeypatch.setattr(_zip, "ZIP64_COUNT", 3)
    members = {f"m{i}/é{i}.txt": os.urandom(i * 7) + b"a" * 50 * i for i in range(6)}
    path = tmp_path / "z.zip"
    with open(path, "wb") as f:
        zw = _zip.ZipWriter(f)
        for name, data in members.items():
            method, crc, payload = _zip.compress(data, 6)
            zw.add(name, 0o755, method, crc, len(data), payload)
        zw.close()
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert {n: zf.read(n) for n in zf.namelist()} == members
        assert {(i.external_attr >> 16) & 0o777 for i in zf.infolist()} == {0o755}


# --- remote.py: probe, check, launch --------------------------------------------------


def run_remote(python: str, *args: str, cache: Path | None = None,
               timeout: float = 180) -> tuple[int, dict[str, Any]]:
    """Run remote.py the way the SSH system does: source on stdin to ``python -``."""
    env = clean_env(cache or Path("/nonexistent"))
    r = subprocess.run([python, "-", *args], input=remote.source(), capture_output=True,
                       text=True, env=env, timeout=timeout)
    assert r.stdout.strip(), f"no output (rc {r.returncode}): {r.stderr}"
    return r.returncode, json.loads(r.stdout)


def test_probe_lists_cached_packages(tmp_path: Path, clean_python: str) -> None:
    cache = tmp_path / "cache"
    (cache / "packages").mkdir(parents=True)
    digests = sorted(os.urandom(32).hex() for _ in range(2))
    for d in digests:
        (cache / "packages" / f"{d}.pyz").write_bytes(b"x")
    for junk in ("notahash.pyz", f".tmp-{digests[0]}.pyz", f"{digests[1]}.txt"):
        (cache / "packages" / junk).write_bytes(b"x")
    rc, out = run_remote(clean_python, "probe", "--cache", str(cache))
    assert rc == 0 and out["ok"] is True
    assert out["packages"] == digests
    assert out["cache"] == str(cache)
    assert out["executable"] == clean_python
    assert "{}.{}".format(*out["version_info"][:2]) == MINOR
    assert out["platform"] == sysconfig.get_platform()
    assert out["cpus"] >= 1 and out["free_bytes"] > 0
    # As a file too, and with an empty cache.
    r = subprocess.run([clean_python, remote.__file__, "probe", "--cache",
                        str(tmp_path / "empty")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["packages"] == []
    remote.check(out)  # the same minor version and platform: fine


def test_check_rejects_mismatched_interpreters(tmp_path: Path) -> None:
    probed = remote.probe(str(tmp_path))
    major, minor = sys.version_info[:2]
    other = dict(probed, python=f"{major}.{minor + 1}.0", version_info=[major, minor + 1, 0],
                 hostname="hostA")
    with pytest.raises(ConfigError) as e:
        remote.check(other)
    msg = str(e.value)
    for needle in ("hostA", f"{major}.{minor + 1}.0", f"{major}.{minor}", "--python PATH",
                   "image/AMI"):
        assert needle in msg, msg
    main = make_program(tmp_path / "prog")
    pkg = small_build(main, tmp_path / "cache")
    with pytest.raises(ConfigError, match="another Python version"):
        remote.check(other, pkg)  # even without native extensions
    arm = dict(probed, platform="linux-aarch64", abi="cpython-311-aarch64-linux-gnu")
    native = dataclasses.replace(pkg, native=True)
    with pytest.raises(ConfigError, match="linux-aarch64") as e:
        remote.check(arm, native)
    assert sysconfig.get_platform() in str(e.value)
    remote.check(arm, pkg)  # pure Python: another platform is fine
    with pytest.raises(ConfigError, match="pypy"):
        remote.check(dict(probed, implementation="pypy"), pkg)


MACHINE_MAIN = """\
import os, sys
print("machine program starting", sys.argv[1:], "FOO=" + os.environ.get("FOO", "?"),
      "cwd=" + os.getcwd(), flush=True)
import bigmrun
b = bigmrun.start()
print("driver part reached on a machine: wrong", flush=True)
"""


def write_boot(path: Path, record: dict[str, Any], mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.chmod(path, mode)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def session() -> Iterator[bigmrun.B]:
    b = bigmrun.start("test")
    try:
        yield b
    finally:
        b.shutdown()


def test_launch_starts_a_detached_machine(
        tmp_path: Path, clean_python: str, driver_cache: Path, session: bigmrun.B) -> None:
    if not default_site_packages():
        pytest.skip("the tests do not run in a virtualenv: nothing to pack")
    (tmp_path / "prog").mkdir()
    (tmp_path / "prog" / "machine.py").write_text(MACHINE_MAIN)
    pkg = build(tmp_path / "prog" / "machine.py", cache_dir=driver_cache)
    host = tmp_path / "host"
    (host / "packages").mkdir(parents=True)
    os.link(pkg.path, host / "packages" / os.path.basename(pkg.path))  # "the upload"

    rc, probed = run_remote(clean_python, "probe", "--cache", str(host))
    assert probed["packages"] == [pkg.digest]
    remote.check(probed, pkg)

    ca = session._ca  # the session's CA: only the driver holds its key
    assert ca is not None
    spec = BootSpec("r0", session.session_id, ca.issue("r0"), keepalive_timeout=60.0)
    boot = tmp_path / "boot-r0.json"
    write_boot(boot, spec.boot_record(bind="127.0.0.1", env={"FOO": "bar"}))
    rc, out = run_remote(clean_python, "launch", "--cache", str(host), "--package",
                         pkg.digest, "--boot", str(boot), "--timeout", "120", "--",
                         "x", "--y")
    pid = int(out.get("pid") or 0)
    try:
        assert rc == 0 and out["ok"] is True, out
        assert not boot.exists()  # the key is not left on disk
        assert out["addr"].startswith("127.0.0.1:")
        assert _alive(pid) and os.getsid(pid) == pid  # its own session: outlives SSH
        log = Path(out["log"])
        assert log.parent == host / "logs" and log.exists()

        m = session.dial(out["addr"], timeout=60)
        info = m.call("Supervisor.info", timeout=60)
        assert info["pid"] == pid
        assert info["python"] == probed["python"]  # the clean interpreter runs it
        assert m.call("Supervisor.ping", timeout=60) == "r0"

        # Stop the keepalives (shorten the timeout): the machine exits by itself.
        assert m.call("Supervisor.keepalive", 1.0, timeout=60) == 1.0
        wait_for(lambda: not _alive(pid), 60, "the machine to exit without keepalives")
        text = log.read_text()
        prog_dir = host / "prog" / pkg.digest
        assert f"machine program starting ['x', '--y'] FOO=bar cwd={prog_dir}" in text, text
        assert "no keepalive from the driver" in text, text
        assert "driver part reached" not in text, text
    finally:
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_launch_reports_failures(tmp_path: Path, clean_python: str) -> None:
    (tmp_path / "prog").mkdir()
    main = tmp_path / "prog" / "dies.py"
    main.write_text("import sys\nprint('kaput: bad config', file=sys.stderr)\nsys.exit(3)\n")
    pkg = small_build(main, tmp_path / "cache")
    host = tmp_path / "host"
    record = {"name": "r1", "session": "s1", "leaf": {}, "keepalive_timeout": 5}

    boot = tmp_path / "boot1.json"
    write_boot(boot, record)
    rc, out = run_remote(clean_python, "launch", "--cache", str(host), "--package",
                         pkg.path, "--boot", str(boot), "--timeout", "120")
    assert rc == 1 and out["ok"] is False
    assert "exited with status 3" in out["error"] and "kaput: bad config" in out["tail"]
    assert not boot.exists() and not _alive(out["pid"])

    loose = tmp_path / "boot2.json"
    write_boot(loose, record, mode=0o644)
    rc, out = run_remote(clean_python, "launch", "--cache", str(host), "--package",
                         pkg.path, "--boot", str(loose))
    assert rc == 1 and "mode 0600" in out["error"] and "pid" not in out
    assert not loose.exists()  # deleted even though refused

    boot3 = tmp_path / "boot3.json"
    write_boot(boot3, record)
    rc, out = run_remote(clean_python, "launch", "--cache", str(host), "--package",
                         "0" * 64, "--boot", str(boot3))
    assert rc == 1 and "no package" in out["error"] and not boot3.exists()
