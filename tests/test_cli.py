"""The bigmrun command: launching programs, options from flags, environment and config
file, and ps/logs against a real running driver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from bigmrun.cli import load_config, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def private_state(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGMRUN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BIGMRUN_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("BIGMRUN_SAMPLE_INTERVAL", "0.3")


def bigmrun(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "bigmrun", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, **(env or {})))


SHOW = textwrap.dedent("""
    import os, sys, bigmrun
    class Echo:
        def env(self, k):
            return os.environ.get(k)
    if __name__ == "__main__":
        b = bigmrun.start()
        print("system", b.system.name, "nmach", os.environ.get("BIGMRUN_NMACH"))
        print("argv", sys.argv[1:])
        print("keepalive", b.system.keepalive_timeout)
        with b:
            ms = b.start(services={"E": Echo()})
            print("machines", len(ms), ms[0].call("Supervisor.ping"))
        sys.exit(int(os.environ.get("EXIT", "0")))
""")


def test_program_flags_pass_through_and_defaults_apply(tmp_path):
    prog = tmp_path / "show.py"
    prog.write_text(SHOW)
    r = bigmrun("--system", "test", "--nmach", "2", "--keepalive-timeout", "7",
                str(prog), "--nmach", "9", "-x", "--system=foo")
    assert r.returncode == 0, r.stderr
    assert "system test nmach 2" in r.stdout
    assert "argv ['--nmach', '9', '-x', '--system=foo']" in r.stdout
    assert "keepalive 7.0" in r.stdout
    assert "machines 2 m0" in r.stdout


def test_exit_code_is_the_programs(tmp_path):
    prog = tmp_path / "show.py"
    prog.write_text(SHOW)
    r = bigmrun("--system", "test", str(prog), env={"EXIT": "3"})
    assert r.returncode == 3, r.stderr


def test_module_programs_run_like_python_m(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "job.py").write_text(SHOW)
    r = subprocess.run([sys.executable, "-m", "bigmrun", "--nmach", "1", "-m", "mypkg.job",
                        "a", "--b"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    assert "system local nmach 1" in r.stdout and "argv ['a', '--b']" in r.stdout
    assert "machines 1 m0" in r.stdout  # a local machine re-ran the module


def test_options_from_environment_and_config_file(tmp_path):
    prog = tmp_path / "show.py"
    prog.write_text(SHOW)
    cfg = tmp_path / "config.toml"
    cfg.write_text('system = "test"\nnmach = 3\nkeepalive-timeout = 4\n')
    r = bigmrun(str(prog), env={"BIGMRUN_CONFIG": str(cfg)})
    assert r.returncode == 0, r.stderr
    assert "system test nmach 3" in r.stdout and "keepalive 4.0" in r.stdout
    # The environment beats the config file, and a flag beats both.
    r = bigmrun(str(prog), env={"BIGMRUN_CONFIG": str(cfg), "BIGMRUN_NMACH": "2"})
    assert "nmach 2" in r.stdout
    r = bigmrun("--nmach", "1", str(prog), env={"BIGMRUN_CONFIG": str(cfg),
                                                 "BIGMRUN_NMACH": "2"})
    assert "nmach 1" in r.stdout
    assert load_config(str(cfg)) == {"system": "test", "nmach": 3, "keepalive_timeout": 4}


def test_bad_input_gets_clear_errors(tmp_path):
    r = bigmrun("--system", "test", str(tmp_path / "nope.py"))
    assert r.returncode == 2 and "nope.py" in r.stderr
    r = bigmrun("--nmach", "0", "examples/bigpi.py")
    assert r.returncode == 2 and "--nmach" in r.stderr
    r = bigmrun("--system", "mars", "examples/bigpi.py")
    assert r.returncode == 2 and "mars" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("system = [unclosed")
    r = bigmrun("examples/bigpi.py", env={"BIGMRUN_CONFIG": str(bad)})
    assert r.returncode != 0 and "config file" in r.stderr


def test_help_documents_every_option():
    out = CliRunner().invoke(main, ["--help"]).output
    for opt in ("--system", "--nmach", "--keepalive-timeout", "--hosts", "--procs-per-host",
                "--ssh-key", "--known-hosts", "--accept-new-host-keys", "--python",
                "BIGMRUN_SYSTEM", "config.toml"):
        assert opt in out, opt
    for cmd in ("ps", "logs", "down", "run"):
        assert cmd in out


BUSY = textwrap.dedent("""
    import sys, time, bigmrun
    class Talk:
        def say(self, i):
            print(f"said {i}", flush=True)
            return i
    if __name__ == "__main__":
        with bigmrun.start("local") as b:
            ms = b.start(2, services={"T": Talk()})
            for i, m in enumerate(ms):
                m.call("T.say", i)
            print("SESSION", b.session_id, flush=True)
            sys.stdin.readline()   # until the test says stop
""")


def test_ps_and_logs_against_a_running_driver(tmp_path):
    prog = tmp_path / "busy.py"
    prog.write_text(BUSY)
    proc = subprocess.Popen([sys.executable, str(prog)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        line = proc.stdout.readline()
        assert line.startswith("SESSION "), line
        sid = line.split()[1]
        deadline = time.monotonic() + 30
        while True:  # wait for the first stats samples
            r = bigmrun("ps", "--json")
            rows = json.loads(r.stdout)
            if all(row.get("rss") for row in rows) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert {(row["session"], row["machine"], row["state"]) for row in rows} == {
            (sid, "m0", "RUNNING"), (sid, "m1", "RUNNING")}
        table = bigmrun("ps")
        assert table.returncode == 0 and "m0" in table.stdout and sid[:12] in table.stdout
        r = bigmrun("logs")
        assert r.returncode == 0
        assert "m0: said 0" in r.stdout and "m1: said 1" in r.stdout
        r = bigmrun("logs", "m1", "--session", sid[:6])
        assert r.stdout.strip() == "m1: said 1"
        r = bigmrun("logs", "m7")
        assert r.returncode == 1 and "no machine 'm7'" in r.stderr
        url = bigmrun("dashboard").stdout.strip()
        assert url.startswith("http://127.0.0.1:") and "/?token=" in url
        import requests

        page = requests.get(url, timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert requests.get(url.split("?")[0], timeout=10).status_code == 401
    finally:
        proc.communicate("stop\n", timeout=60)
    assert proc.returncode == 0
    r = bigmrun("ps")
    assert "no running bigmrun sessions" in r.stdout
    r = bigmrun("logs", "--session", sid)   # after the fact
    assert "m0: said 0" in r.stdout and "m1: said 1" in r.stdout
