"""``bigmrun profile --merged``: merge and renderers (pure), real py-spy on real processes,
the CLI as a real subprocess against a running 2-machine driver, ``/debug/profile``
through the debug server, machines on SSH hosts, and the flamegraph's script in Chromium.

Everything runs the real py-spy. The one stand-in is a script that prints py-spy's
permission-denied message (the real one, as ``test_real_ptrace_denial_is_explained``
shows by provoking it) and exits 1, to take the ptrace error path through the CLI: this
machine runs as root, so real machines cannot be denied. Every wait is bounded;
nothing asserts a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

import bigmrun
from bigmrun.debug import sessions
from bigmrun.profiling import capture
from bigmrun.profiling.capture import ProfileError, PtraceDeniedError, profile_self
from bigmrun.profiling.cluster import SelectionError, profile_cluster, render_bundle
from bigmrun.profiling.render import WIDTH, flamegraph_svg, speedscope
from bigmrun.profiling.stacks import (
    frame_stats,
    merge,
    parse_collapsed,
    split_frame,
    to_collapsed,
    total,
)

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent
SVG = "{http://www.w3.org/2000/svg}"
#: What py-spy prints when the kernel refuses it ptrace (py-spy 0.3 and 0.4).
PY_SPY_DENIED = ("Permission Denied: Try running again with elevated permissions by going "
                 "'sudo env \"PATH=$PATH\" !!'")
HOT = "Circle.sample_circle "  # the sampling function's frame, as py-spy names it

CIRCLE = '''\
import random
import time


class Circle:
    """bigpi's service: sample points in the unit square, count those in the circle."""

    def sample_circle(self, seconds):
        r = random.random
        inside = n = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(2000):
                x = r() - 0.5
                y = r() - 0.5
                inside += x * x + y * y < 0.25
            n += 2000
        return inside, n
'''

DRIVER = CIRCLE + '''

if __name__ == "__main__":
    import sys

    import bigmrun

    nmach, seconds = int(sys.argv[1]), float(sys.argv[2])
    with bigmrun.start("local") as b:
        ms = b.start(nmach, services={"Circle": Circle()})
        for m in ms:
            if m.wait(bigmrun.State.RUNNING, timeout=90) != bigmrun.State.RUNNING:
                sys.exit(f"machine {m.name} did not start: {m.err}")
        futures = [m.submit("Circle.sample_circle", seconds) for m in ms]
        print("READY", b.session_id, flush=True)
        sys.stdin.read()  # busy until the test closes our standard input
'''


def profile_cmd(*args: str) -> list[str]:
    """``bigmrun profile ARGS`` as a real subprocess, through the launcher."""
    return [sys.executable, "-m", "bigmrun", "profile", *args]


def hot_samples(stacks: Counter[tuple[str, ...]], root: str | None = None) -> int:
    """Samples whose stack runs the sampling function (under machine ``root``)."""
    return sum(n for s, n in stacks.items()
               if (root is None or (s and s[0] == root)) and any(f.startswith(HOT) for f in s))


# --- the merge (pure) ---------------------------------------------------------------------


def test_parse_sums_identical_stacks_and_keeps_frameless_samples() -> None:
    s = parse_collapsed("a;b 2\na;b 3\na;c 1\n 4\n\n")
    assert s == Counter({("a", "b"): 5, ("a", "c"): 1, (): 4})
    assert total(s) == 10
    with pytest.raises(ValueError, match="line 2"):
        parse_collapsed("a;b 1\na;b\n")


def test_merge_sums_identical_stacks_and_by_machine_adds_roots() -> None:
    m0 = parse_collapsed("main;work;sample 10\nmain;idle 2\n")
    m1 = parse_collapsed("main;work;sample 5\nmain;other 1\n")
    merged = merge({"m0": m0, "m1": m1})
    assert merged == Counter({("main", "work", "sample"): 15, ("main", "idle"): 2,
                              ("main", "other"): 1})
    by = merge({"m0": m0, "m1": m1}, by_machine=True)
    assert by == Counter({("m0", "main", "work", "sample"): 10, ("m0", "main", "idle"): 2,
                          ("m1", "main", "work", "sample"): 5, ("m1", "main", "other"): 1})
    assert total(by) == total(merged) == total(m0) + total(m1) == 18


def test_collapsed_round_trips() -> None:
    stacks = Counter({
        ("<module> (app.py:1)", "Pool.map (multiprocessing/pool.py:362)"): 7,
        ("<module> (app.py:1)", "<lambda> (app.py:3)"): 2,
        ("0x7f3a2b (libc.so.6)", "thread_run (libpython3.11.so.1.0)"): 1,
        (): 3,
    })
    text = to_collapsed(stacks)
    assert parse_collapsed(text) == stacks
    assert to_collapsed(parse_collapsed(text)) == text
    shuffled = "".join(reversed(text.splitlines(keepends=True)))
    assert to_collapsed(parse_collapsed(shuffled)) == text  # order does not matter


def test_frame_stats_and_split_frame() -> None:
    stacks = Counter({("main", "work", "sample"): 6, ("main", "work"): 3, ("main", "io"): 1})
    stats = {s.name: s for s in frame_stats(stacks)}
    assert (stats["sample"].self_samples, stats["sample"].total_samples) == (6, 6)
    assert (stats["work"].self_samples, stats["work"].total_samples) == (3, 9)
    assert (stats["main"].self_samples, stats["main"].total_samples) == (0, 10)
    assert [s.name for s in frame_stats(stacks)][:2] == ["sample", "work"]
    by = merge({"m0": stacks}, by_machine=True)
    assert "m0" not in {s.name for s in frame_stats(by, skip_roots=["m0"])}
    assert split_frame("Pi.sample (bigpi.py:38)") == ("Pi.sample", "bigpi.py", 38)
    assert split_frame("f (a b/c.py:1)") == ("f", "a b/c.py", 1)
    assert split_frame("0x7f00 (libc.so.6)") == ("0x7f00", "libc.so.6", None)
    assert split_frame("m0") == ("m0", None, None)


# --- the renderers (pure) -----------------------------------------------------------------

STACKS = Counter({
    ("main (app.py:1)", "work (app.py:5)", "sample_pi (app.py:9)"): 60,
    ("main (app.py:1)", "work (app.py:5)", "<lambda> & co (app.py:12)"): 30,
    ("main (app.py:1)", "io (app.py:20)"): 10,
})


def frames_of(svg: str) -> dict[str, ET.Element]:
    root = ET.fromstring(svg.encode())
    gs = [g for g in root.iter(f"{SVG}g") if g.get("class") == "f"]
    names = [g.get("data-n") for g in gs]
    assert len(names) == len(set(names))  # (true of these test profiles)
    return {str(g.get("data-n")): g for g in gs}


def rect(g: ET.Element) -> dict[str, float]:
    (r,) = g.findall(f"{SVG}rect")
    return {k: float(r.get(k, "nan")) for k in ("x", "y", "width", "height")}


def test_svg_is_well_formed_with_a_rect_and_title_per_frame() -> None:
    svg = flamegraph_svg(STACKS, title="profile <1>", subtitle="m0 & m1")
    root = ET.fromstring(svg.encode())  # well-formed XML, escapes included
    frames = frames_of(svg)
    assert set(frames) == {"all", "main (app.py:1)", "work (app.py:5)", "sample_pi (app.py:9)",
                           "<lambda> & co (app.py:12)", "io (app.py:20)"}
    titles = {n: g.findtext(f"{SVG}title") for n, g in frames.items()}
    assert titles["all"] == "all (100 samples, 100.00%)"
    assert titles["work (app.py:5)"] == "work (app.py:5) (90 samples, 90.00%)"
    assert titles["<lambda> & co (app.py:12)"] == "<lambda> & co (app.py:12) (30 samples, 30.00%)"
    r = {n: rect(g) for n, g in frames.items()}
    full = WIDTH - 2 * r["all"]["x"]
    for name, samples in (("all", 100), ("work (app.py:5)", 90), ("sample_pi (app.py:9)", 60),
                          ("io (app.py:20)", 10)):
        assert r[name]["width"] == pytest.approx(full * samples / 100, abs=0.02)
    # A flame graph: callees stand on their callers, inside their callers' span.
    assert r["main (app.py:1)"]["y"] < r["all"]["y"]
    assert r["sample_pi (app.py:9)"]["y"] < r["work (app.py:5)"]["y"] == r["io (app.py:20)"]["y"]
    child, parent = r["<lambda> & co (app.py:12)"], r["work (app.py:5)"]
    assert parent["x"] <= child["x"] and child["x"] + child["width"] <= \
        parent["x"] + parent["width"] + 0.02
    assert root.findtext(f".//{SVG}text[@id='title']") == "profile <1>"
    assert root.findtext(f".//{SVG}text[@id='subtitle']") == "m0 & m1"
    # Interactive, and self-contained: a script, a search box, no external resources.
    assert root.find(f"{SVG}script") is not None
    assert root.find(".//{http://www.w3.org/1999/xhtml}input[@id='search']") is not None
    for el in root.iter():
        assert not any(k.endswith("href") or k == "src" for k in el.attrib), el.attrib


def test_svg_leaves_out_frames_too_narrow_to_see() -> None:
    frames = frames_of(flamegraph_svg(Counter({("wide",): 100_000, ("tiny",): 1})))
    assert set(frames) == {"all", "wide"}
    assert frames["all"].findtext(f"{SVG}title") == "all (100,001 samples, 100.00%)"


def test_speedscope_is_a_sampled_profile_per_the_schema() -> None:
    doc = json.loads(json.dumps(speedscope(STACKS, name="merged", exporter="bigmrun test")))
    assert doc["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    assert doc["activeProfileIndex"] == 0 and doc["exporter"] == "bigmrun test"
    frames = doc["shared"]["frames"]
    assert all(isinstance(f["name"], str) for f in frames)
    assert {"name": "work", "file": "app.py", "line": 5} in frames
    (p,) = doc["profiles"]
    assert (p["type"], p["name"], p["unit"], p["startValue"]) == ("sampled", "merged", "none", 0)
    assert p["endValue"] == sum(p["weights"]) == 100
    assert len(p["samples"]) == len(p["weights"]) == 3
    decoded: Counter[tuple[str, ...]] = Counter()
    for sample, weight in zip(p["samples"], p["weights"], strict=True):
        decoded[tuple(f"{frames[i]['name']} ({frames[i]['file']}:{frames[i]['line']})"
                      for i in sample)] += weight
    assert decoded == STACKS


def test_render_bundle_merges_participants() -> None:
    bundle = {"session": "s1", "seconds": 1, "options": {"rate": 100},
              "profiles": {"m0": {"collapsed": "main;sample 3\n", "samples": 3},
                           "m1": {"collapsed": "main;sample 2\nmain;io 1\n", "samples": 3}},
              "errors": {"m2": "py-spy was not allowed"}, "skipped": {}}
    assert render_bundle(bundle, "collapsed").decode() == "main;io 1\nmain;sample 5\n"
    by = parse_collapsed(render_bundle(bundle, "collapsed", by_machine=True).decode())
    assert by == Counter({("m0", "main", "sample"): 3, ("m1", "main", "sample"): 2,
                          ("m1", "main", "io"): 1})
    svg = render_bundle(bundle, "svg", by_machine=True).decode()
    names = {g.get("data-n") for g in frames_of_any(svg)}
    assert {"m0", "m1", "all", "main"} <= names and "failed: m2" in svg
    doc = json.loads(render_bundle(bundle, "speedscope"))
    assert doc["profiles"][0]["endValue"] == 6


# --- py-spy on this very process ----------------------------------------------------------


def _spin_here(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        for i in range(1000):
            x += i * i


def test_profile_self_with_real_py_spy_sees_a_busy_thread() -> None:
    stop = threading.Event()
    t = threading.Thread(target=_spin_here, args=(stop,), daemon=True)
    t.start()
    try:
        r = profile_self(1)
    finally:
        stop.set()
        t.join(10)
    stacks = parse_collapsed(r["collapsed"])
    assert r["samples"] == total(stacks) > 0
    assert sum(n for s, n in stacks.items() if any(f.startswith("_spin_here ") for f in s)) > 0
    assert r["pid"] == os.getpid() and os.path.isfile(r["py_spy"])
    assert (r["seconds"], r["rate"]) == (1, 100)


def test_set_ptracer_matches_the_kernel() -> None:
    # With Yama, naming a ptracer works (and is cleared); without it prctl says EINVAL.
    allowed = capture.set_ptracer(os.getpid())
    assert allowed == (capture.yama_scope() is not None)
    if allowed:
        assert capture.set_ptracer(0)


def write_stand_in(d: Path, message: str = PY_SPY_DENIED) -> str:
    """A STAND-IN for py-spy (not py-spy): prints ``message`` like py-spy, exits 1."""
    path = d / "py-spy-stand-in"
    path.write_text("#!/bin/sh\n# Stand-in for py-spy in tests: fails the way py-spy does.\n"
                    f"cat >&2 <<'EOF'\n{message}\nEOF\nexit 1\n")
    path.chmod(0o755)
    return str(path)


def test_ptrace_denial_from_py_spy_says_what_to_grant(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fake = write_stand_in(tmp_path)
    monkeypatch.setenv("BIGMRUN_PY_SPY", fake)
    with pytest.raises(PtraceDeniedError) as e:
        profile_self(1)
    msg = str(e.value)
    assert "kernel.yama.ptrace_scope=0" in msg and "sudo sysctl" in msg
    assert f"setcap cap_sys_ptrace+ep {fake}" in msg and "CAP_SYS_PTRACE" in msg
    assert PY_SPY_DENIED in msg  # and what py-spy itself said


def test_other_py_spy_failures_carry_its_message(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIGMRUN_PY_SPY", write_stand_in(
        tmp_path, "Error: Failed to find python version from target process"))
    with pytest.raises(ProfileError, match="Failed to find python version") as e:
        profile_self(1)
    assert not isinstance(e.value, PtraceDeniedError)


def test_missing_py_spy_says_how_to_install_it(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIGMRUN_PY_SPY", str(tmp_path / "nowhere" / "py-spy"))
    with pytest.raises(ProfileError, match=r"BIGMRUN_PY_SPY=.* is not an executable"):
        capture.find_py_spy()
    # Nowhere to be found: not beside the interpreter, not installed, not on PATH.
    monkeypatch.delenv("BIGMRUN_PY_SPY")
    monkeypatch.delenv("BIGMRUN_PACKAGE", raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python3"))
    monkeypatch.setattr(capture, "_from_distribution", lambda: None)
    monkeypatch.setattr(capture.sysconfig, "get_path", lambda name: str(tmp_path / "scripts"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ProfileError, match=r"-m pip install py-spy") as e:
        capture.find_py_spy()
    assert "BIGMRUN_PY_SPY" in str(e.value)


def _python_for(uid: int) -> str | None:
    """An interpreter user ``uid`` can run that imports bigmrun from this checkout."""
    for exe in (sys.executable, "/usr/bin/python3"):
        r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                            exe, "-c", "import bigmrun.profiling.capture"],
                           env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, cwd="/",
                           timeout=60)
        if r.returncode == 0:
            return exe
    return None


def test_real_ptrace_denial_is_explained() -> None:
    """A real refusal: an unprivileged process that made itself non-dumpable cannot be
    read by its own py-spy child (as under Yama, or in a container without SYS_PTRACE)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run a process as an unprivileged user")
    nobody = 65534
    py_spy = capture.find_py_spy()
    python = _python_for(nobody)
    if python is None:
        pytest.skip("no interpreter that user nobody can run with this checkout importable")
    script = textwrap.dedent("""
        import ctypes, sys
        # PR_SET_DUMPABLE 0: only CAP_SYS_PTRACE may now trace this process.
        assert ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) == 0
        from bigmrun.profiling.capture import PtraceDeniedError, profile_self
        try:
            profile_self(1)
        except PtraceDeniedError as e:
            print("DENIED", e)
        else:
            print("NOT DENIED")
    """)
    r = subprocess.run(["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups",
                        python, "-c", script], capture_output=True, text=True, timeout=60,
                       cwd="/", env=dict(os.environ, PYTHONPATH=str(REPO), BIGMRUN_PY_SPY=py_spy))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("DENIED "), r.stdout + r.stderr
    assert PY_SPY_DENIED in r.stdout  # the stand-in above prints exactly this
    assert "CAP_SYS_PTRACE" in r.stdout and "kernel.yama.ptrace_scope=0" in r.stdout


# --- the driver side, in process --------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "state"
    monkeypatch.setenv("BIGMRUN_STATE_DIR", str(d))
    return d


def test_machines_sharing_a_process_are_profiled_once(state_dir: Path) -> None:
    with bigmrun.start("test") as b:
        ms = b.start(2)
        for m in ms:
            assert m.wait(bigmrun.State.RUNNING, timeout=30) == bigmrun.State.RUNNING
        bundle = profile_cluster(b, 1, driver=True)
        with pytest.raises(SelectionError, match=r"no machine 'm7'.*m0, m1") as e:
            profile_cluster(b, 1, machine="m7")
        assert e.value.status == 404
    assert bundle["errors"] == {}
    (label,) = bundle["profiles"]  # the in-process test system: one process, one py-spy
    assert label == "driver+m0+m1"
    assert bundle["profiles"][label]["pid"] == os.getpid()
    assert bundle["profiles"][label]["samples"] > 0


def test_nothing_running_to_profile(state_dir: Path) -> None:
    with bigmrun.start("test") as b:
        with pytest.raises(SelectionError, match=r"no RUNNING machine.*--driver") as e:
            profile_cluster(b, 1)
        assert e.value.status == 409


# --- a running 2-machine driver, and the CLI as a real subprocess ------------------------


@dataclass
class Driver:
    proc: subprocess.Popen[str]
    session: str
    env: dict[str, str]
    dir: Path

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def start_driver(d: Path, state: Path, nmach: int, **env: str) -> Driver:
    d.mkdir(parents=True, exist_ok=True)
    (d / "busy_driver.py").write_text(DRIVER)
    full = {k: v for k, v in os.environ.items() if not k.startswith("BIGMRUN_")}
    full.update(BIGMRUN_STATE_DIR=str(state), NO_COLOR="1", **env)
    with open(d / "driver.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(d / "busy_driver.py"), str(nmach), "600"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                text=True, env=full, cwd=str(d))
    drv = Driver(proc, "", full, d)
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    line = ""
    while time.monotonic() < deadline and not line.startswith("READY "):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
    if not line.startswith("READY "):
        drv.stop()
        pytest.fail(f"driver did not start: {(d / 'driver.log').read_text()[-3000:]}")
    drv.session = line.split()[1]
    return drv


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("profile-state")


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory, state: Path) -> Iterator[Driver]:
    """A bigpi-like driver: 2 local machines sampling points until the module ends."""
    drv = start_driver(tmp_path_factory.mktemp("busy"), state, 2)
    try:
        yield drv
    finally:
        drv.stop()


def cli(drv: Driver, *args: str, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(profile_cmd(*args), env=env or drv.env, cwd=str(cwd),
                          capture_output=True, text=True, timeout=timeout)


def test_merged_profile_has_the_sampling_function_from_both_machines(busy: Driver,
                                                                     tmp_path: Path) -> None:
    r = cli(busy, "--merged", "-d", "2", "--format", "collapsed", "--by-machine", "-o", "out.txt",
            "--session", busy.session, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    stacks = parse_collapsed((tmp_path / "out.txt").read_text())
    assert {s[0] for s in stacks} == {"m0", "m1"}
    assert hot_samples(stacks, "m0") > 0 and hot_samples(stacks, "m1") > 0
    # The summary: samples per machine, the top frames, where the file went.
    out = r.stdout
    for m in ("m0", "m1"):
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [m])
        assert int(line.split()[1].replace(",", "")) == total(
            Counter({s: n for s, n in stacks.items() if s[0] == m}))
    assert "Top frames" in out and HOT.strip() in out
    assert f"Wrote {tmp_path / 'out.txt'}" in out


def test_default_output_is_an_svg_flamegraph_with_the_function(busy: Driver,
                                                               tmp_path: Path) -> None:
    r = cli(busy, "--merged", "-d", "1", "--session", busy.session, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (svg,) = tmp_path.glob("bigmrun-profile-*.svg")
    assert f"Wrote {svg}" in r.stdout
    frames = frames_of_any(svg.read_text())
    hot = [g for g in frames if str(g.get("data-n")).startswith(HOT)]
    assert hot and all(int(g.get("data-w", "0")) > 0 for g in hot)
    assert HOT.strip() in str(hot[0].findtext(f"{SVG}title"))


def frames_of_any(svg: str) -> list[ET.Element]:
    root = ET.fromstring(svg.encode())
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == "f"]


def test_one_machine_and_an_unknown_machine(busy: Driver, tmp_path: Path) -> None:
    r = cli(busy, "--merged", "-d", "1", "--machine", "m1", "--format", "collapsed",
            "--by-machine", "-o", "m1.txt", "--session", busy.session, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    stacks = parse_collapsed((tmp_path / "m1.txt").read_text())
    assert {s[0] for s in stacks} == {"m1"} and hot_samples(stacks) > 0
    r = cli(busy, "--merged", "-d", "1", "--machine", "m9", "--session", busy.session,
            cwd=tmp_path)
    assert r.returncode == 1
    assert "no machine 'm9'" in r.stderr and "m0, m1" in r.stderr
    assert not list(tmp_path.glob("*.svg"))


def test_native_idle_and_driver_pass_through(busy: Driver, tmp_path: Path) -> None:
    r = cli(busy, "--merged", "-d", "1", "--native", "--idle", "--driver", "--by-machine",
            "--format", "collapsed", "-o", "all.txt", "--session", busy.session, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    stacks = parse_collapsed((tmp_path / "all.txt").read_text())
    assert {s[0] for s in stacks} == {"driver", "m0", "m1"}
    assert hot_samples(stacks, "m0") > 0 and hot_samples(stacks, "m1") > 0
    # --native: frames of native code (C functions in libpython, libc...).
    assert any(".so" in (split_frame(f)[1] or "") for s in stacks for f in s)
    # --idle: the driver's main thread, blocked reading its standard input, is there.
    assert any(s[0] == "driver" and any(f.startswith("<module> (busy_driver.py") for f in s)
               for s in stacks)
    assert re.search(r"^\s+driver\s+[\d,]+ samples", r.stdout, re.M)


def test_without_merged_one_file_per_machine(busy: Driver, tmp_path: Path) -> None:
    r = cli(busy, "-d", "1", "--format", "collapsed", "-o", "p.txt", "--session", busy.session,
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for m in ("m0", "m1"):
        assert hot_samples(parse_collapsed((tmp_path / f"p-{m}.txt").read_text())) > 0


def test_ptrace_denied_on_the_machines_fails_clearly(busy: Driver, state: Path,
                                                     tmp_path: Path) -> None:
    # Machines that find a py-spy STAND-IN printing py-spy's permission error.
    denied = start_driver(tmp_path / "denied", state, 1,
                          BIGMRUN_PY_SPY=write_stand_in(tmp_path))
    try:
        r = cli(denied, "--merged", "-d", "1", "--session", denied.session, cwd=tmp_path)
        assert r.returncode == 1
        assert "no machine could be profiled" in r.stderr and "m0:" in r.stderr
        assert "ptrace" in r.stderr and "kernel.yama.ptrace_scope=0" in r.stderr
        assert "CAP_SYS_PTRACE" in r.stderr
        assert not list(tmp_path.glob("*.svg"))
        # Two sessions now run: the command wants --session.
        r = cli(denied, "--merged", "-d", "1", cwd=tmp_path)
        assert r.returncode == 1 and "2 sessions are running" in r.stderr
        assert busy.session in r.stderr and denied.session in r.stderr
    finally:
        denied.stop()


def test_no_running_session(busy: Driver, tmp_path: Path) -> None:
    env = dict(busy.env, BIGMRUN_STATE_DIR=str(tmp_path / "empty-state"))
    r = cli(busy, "--merged", "-d", "1", cwd=tmp_path, env=env)
    assert r.returncode == 1 and "no bigmrun session is running" in r.stderr


# --- /debug/profile through the debug server ---------------------------------------------


def test_debug_profile_route_with_the_token(busy: Driver, state: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIGMRUN_STATE_DIR", str(state))
    (info,) = sessions.find(busy.session)
    url = info.url + "/debug/profile"
    auth = {"Authorization": f"Bearer {info.token}"}

    def get(headers: dict[str, str] | None = None, **q: Any) -> requests.Response:
        return requests.get(url, params=q, headers=headers if headers is not None else auth,
                            timeout=90)

    assert get({}, seconds=1).status_code == 401
    assert get({"Authorization": "Bearer wrong"}, seconds=1).status_code == 401
    r = get(seconds=1, format="collapsed", by_machine=1)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    stacks = parse_collapsed(r.text)
    assert hot_samples(stacks, "m0") > 0 and hot_samples(stacks, "m1") > 0
    samples = json.loads(r.headers["X-Bigmrun-Samples"])
    assert set(samples) == {"m0", "m1"} and sum(samples.values()) == total(stacks)
    assert "attachment" in r.headers["Content-Disposition"]
    # The token also works as ?token= (for a browser); the default is the SVG, inline.
    browser: dict[str, str | int] = {"seconds": 1, "token": info.token}
    r = requests.get(url, params=browser, timeout=90)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("image/svg+xml")
    assert r.headers["Content-Disposition"].startswith("inline")
    assert any(str(g.get("data-n")).startswith(HOT) for g in frames_of_any(r.text))
    r = get(seconds=1, format="speedscope", machine="m0")
    assert r.status_code == 200
    doc = r.json()
    assert doc["profiles"][0]["type"] == "sampled"
    assert any(f["name"] == HOT.strip() for f in doc["shared"]["frames"])
    assert set(json.loads(r.headers["X-Bigmrun-Samples"])) == {"m0"}
    r = get(seconds=1, format="raw")
    assert r.status_code == 200 and set(r.json()["profiles"]) == {"m0", "m1"}
    assert get(seconds=1, format="pdf").status_code == 400
    assert get(seconds=0).status_code == 400
    r = get(seconds=1, machine="m9")
    assert r.status_code == 404 and "no machine 'm9'" in r.json()["error"]


# --- SSH machines: py-spy shipped in the package ------------------------------------------


@pytest.fixture(scope="module")
def ssh_lo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    from bigmrun.testing.sshd import Keys, SSHServer, Unavailable, check_available

    try:
        check_available()
    except Unavailable as e:
        pytest.skip(f"real OpenSSH server unavailable here: {e}")
    keys = Keys.make()
    cache = f"/tmp/bigmrun-test-profile-ssh-{uuid.uuid4().hex[:8]}"
    server = SSHServer(keys, env={"BIGMRUN_CACHE": cache})
    try:
        server.start()
        known = os.path.join(keys.dir, "known_hosts")
        Path(known).write_text(server.known_hosts_line())
        yield {"target": server.target, "key": keys.client_key, "known_hosts": known,
               "cache": cache, "driver_cache": str(tmp_path_factory.mktemp("pkgcache"))}
    finally:
        server.stop()
        _kill_mentioning(cache)
        shutil.rmtree(cache, ignore_errors=True)
        keys.cleanup()


def _kill_mentioning(fragment: str) -> None:
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and fragment in " ".join(p.info["cmdline"] or ()):
                p.kill()


def test_ssh_machines_are_profiled_with_the_shipped_py_spy(
        ssh_lo: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bigmrun.backends.ssh import SSHSystem
    from bigmrun.bootstrap.package import build_for
    from bigmrun.bootstrap.program import Program

    if sys.prefix == sys.base_prefix:
        pytest.skip("the package ships py-spy from the driver's virtualenv; none here")
    monkeypatch.setenv("BIGMRUN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BIGMRUN_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    prog = tmp_path / "prog"
    prog.mkdir()
    (prog / "profsvc.py").write_text(CIRCLE)
    (prog / "main.py").write_text("import bigmrun\nimport profsvc  # noqa: F401\n\n"
                                  "bigmrun.start()\n")
    monkeypatch.syspath_prepend(str(prog))
    import profsvc  # the service class, pickled by reference

    program = Program([sys.executable, str(prog / "main.py")], False, [])
    # (compresslevel 1: the whole virtualenv zips in half the time; loopback is fast)
    pkg = build_for(program, cache_dir=ssh_lo["driver_cache"], compresslevel=1)
    with zipfile.ZipFile(pkg.path) as zf:
        info = zf.getinfo("bigmrun-env/bin/py-spy")
        assert (info.external_attr >> 16) & 0o111  # executable
    system = SSHSystem(hosts=ssh_lo["target"], key_filename=ssh_lo["key"],
                       known_hosts=ssh_lo["known_hosts"], ssh_config=os.devnull,
                       program=program, package=pkg, keepalive_timeout=10.0)
    try:
        with bigmrun.start(system) as b:
            ms = b.start(2, services={"Circle": profsvc.Circle()})
            for m in ms:
                assert m.wait(bigmrun.State.RUNNING, timeout=180) == bigmrun.State.RUNNING, m.err
            for m in ms:
                m.submit("Circle.sample_circle", 60.0)
            bundle = profile_cluster(b, 2)
    finally:
        sys.modules.pop("profsvc", None)
    assert bundle["errors"] == {}
    assert set(bundle["profiles"]) == {"m0", "m1"}
    env_dir = os.path.join(ssh_lo["cache"], "env", pkg.env_digest)
    for p in bundle["profiles"].values():
        assert p["py_spy"] == os.path.join(env_dir, "bin", "py-spy")  # from the package
        assert p["pid"] != os.getpid()
        assert hot_samples(parse_collapsed(p["collapsed"])) > 0
    merged = merge({k: parse_collapsed(p["collapsed"]) for k, p in bundle["profiles"].items()})
    assert hot_samples(merged) == sum(hot_samples(parse_collapsed(p["collapsed"]))
                                      for p in bundle["profiles"].values())


def test_package_ships_py_spy_from_the_virtualenv() -> None:
    from bigmrun.bootstrap.package import _tool_inputs, default_site_packages

    sites = default_site_packages()
    if not sites:
        pytest.skip("not in a virtualenv")
    (tool,) = _tool_inputs(sites)
    assert tool.arc == "bigmrun-env/bin/py-spy" and tool.exe
    assert tool.src is not None and os.path.samefile(tool.src, capture.find_py_spy())
    assert _tool_inputs([]) == []


# --- the flamegraph's script, in a real browser -------------------------------------------


def test_flamegraph_zoom_and_search_in_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    webdriver = pytest.importorskip("selenium.webdriver")
    if not chromium or not driver_bin:
        pytest.skip("needs chromium and chromedriver (see ../shared/TESTING.md)")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    path = tmp_path / "flame.svg"
    path.write_text(flamegraph_svg(STACKS, title="t"))
    opts = webdriver.ChromeOptions()
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update",
              "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
              "--window-size=1300,600"):
        opts.add_argument(a)
    opts.binary_location = chromium
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=webdriver.ChromeService(driver_bin))
    try:
        d.set_page_load_timeout(30)
        d.get(path.as_uri())

        def frame(name: str) -> Any:
            return d.find_element(By.CSS_SELECTOR, f'g.f[data-n="{name}"]')

        def width(name: str) -> float:
            return float(frame(name).find_element(By.TAG_NAME, "rect").get_attribute("width"))

        full = width("all")
        assert width("io (app.py:20)") == pytest.approx(full * 0.1, abs=0.05)
        frame("work (app.py:5)").click()  # zoom: work fills the width, io disappears
        assert width("work (app.py:5)") == pytest.approx(full, abs=0.05)
        assert width("sample_pi (app.py:9)") == pytest.approx(full * 60 / 90, abs=0.05)
        assert "hide" in str(frame("io (app.py:20)").get_attribute("class"))
        assert "dim" in str(frame("main (app.py:1)").get_attribute("class"))
        d.find_element(By.ID, "unzoom").click()
        assert width("io (app.py:20)") == pytest.approx(full * 0.1, abs=0.05)
        assert "hide" not in str(frame("io (app.py:20)").get_attribute("class"))
        d.find_element(By.ID, "search").click()
        ActionChains(d).send_keys("sample_pi|io").perform()
        assert d.find_element(By.ID, "matched").text == "Matched: 70.0%"
        fill = frame("sample_pi (app.py:9)").find_element(By.TAG_NAME, "rect")
        assert fill.get_attribute("fill") == "rgb(230,0,230)"
        errors = [e for e in d.get_log("browser") if e.get("level") == "SEVERE"]
        assert errors == []
    finally:
        d.quit()
