"""Start-up progress lines (plain, when stderr is not a terminal)."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **env_extra)
    return subprocess.run(
        [sys.executable, "examples/bigpi.py", "-n", "20000", "--nmach", "2"],
        capture_output=True, text=True, timeout=120, env=env,
    )


def test_progress_lines_under_the_launcher():
    r = _run({"BIGMRUN_PROGRESS": "1"})
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("bigmrun: ")]
    for name in ("m0", "m1"):
        assert f"bigmrun: {name} STARTING" in lines
        assert any(ln.startswith(f"bigmrun: {name} RUNNING at 127.0.0.1:") for ln in lines)
    assert "π = " in r.stdout


def test_no_progress_lines_when_off():
    r = _run({"BIGMRUN_PROGRESS": "0"})
    assert r.returncode == 0, r.stderr
    assert not [ln for ln in r.stderr.splitlines() if ln.startswith("bigmrun: ")]
