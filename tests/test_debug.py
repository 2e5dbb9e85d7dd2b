"""The driver's debug server, session files, and the ps/logs client, on real drivers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import requests

import bigmrun
from bigmrun.debug import client, sessions
from bigmrun.debug.server import _is_loopback
from bigmrun.errors import ConfigError


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    monkeypatch.setenv("BIGMRUN_STATE_DIR", str(d))
    monkeypatch.setenv("BIGMRUN_SAMPLE_INTERVAL", "0.3")
    return d


def wait_until(cond, timeout=20.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def test_session_file_is_private_and_removed_on_shutdown(state_dir):
    b = bigmrun.start("test")
    info = [s for s in sessions.running_sessions() if s.session == b.session_id]
    assert len(info) == 1
    path = info[0].path()
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    assert info[0].pid == os.getpid() and info[0].url.startswith("http://127.0.0.1:")
    assert info[0].token not in repr(info[0])
    b.shutdown()
    assert not os.path.exists(path)
    assert b.session_id not in {s.session for s in sessions.running_sessions()}


def test_stale_session_file_is_cleaned_up(state_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = sessions.SessionInfo("deadbeef0000", dead.pid, time.time(), "http://127.0.0.1:9",
                                 "t", "local", "x", proc_start=1.0)
    os.makedirs(sessions.sessions_dir(), exist_ok=True)
    with open(stale.path(), "w") as f:
        json.dump(stale.__dict__, f)
    assert "deadbeef0000" not in {s.session for s in sessions.running_sessions()}
    assert not os.path.exists(stale.path())


def test_debug_server_requires_token(state_dir):
    with bigmrun.start("test") as b:
        info = sessions.find(b.session_id)[0]
        assert requests.get(info.url + "/api/machines", timeout=5).status_code == 401
        bad = {"Authorization": "Bearer " + "x" * len(info.token)}
        assert requests.get(info.url + "/api/machines", headers=bad, timeout=5).status_code == 401
        assert requests.get(info.url + "/api/machines", params={"token": info.token},
                            timeout=5).status_code == 200
        r = requests.get(info.url + "/nope", params={"token": info.token}, timeout=5)
        assert r.status_code == 404 and "/api/machines" in r.json()["routes"]


def test_only_loopback_addresses_are_served():
    assert _is_loopback("127.0.0.1") and _is_loopback("127.3.4.5") and _is_loopback("::1")
    assert not _is_loopback("10.77.0.11") and not _is_loopback("192.168.1.2")
    assert not _is_loopback("not-an-ip")


class Worker:
    def work(self, n):
        import bigmrun.vars as bv

        print(f"working {n}", flush=True)
        bv.counter("units", "work units").add(n)
        return n


def test_ps_rows_and_vars_from_a_running_session(state_dir):
    with bigmrun.start("local", keepalive_timeout=5) as b:
        ms = b.start(2, services={"W": Worker()})
        assert [m.call("W.work", i + 1) for i, m in enumerate(ms)] == [1, 2]
        rows = wait_until(lambda: (r := client.ps_rows(b.session_id))
                          and all(x.get("rss") for x in r) and r)
        assert {r["machine"] for r in rows} == {"m0", "m1"}
        for r in rows:
            assert r["state"] == "RUNNING" and r["system"] == "local"
            assert r["addr"].startswith("127.0.0.1:") and r["pid"] > 0 and r["rss"] > 0
            assert r["error"] is None and r["calls_in_flight"] == 0
        info = client.pick_one(b.session_id)
        v = wait_until(lambda: client.get(info, "/debug/vars").get("units"))
        assert v["kind"] == "counter" and v["machines"] == {"m0": 1, "m1": 2} and v["sum"] == 3
        ms[1].cancel()
        wait_until(lambda: any(r["state"] == "STOPPED" and r["error"]
                               for r in client.ps_rows(b.session_id)))


def test_logs_from_running_and_finished_sessions(state_dir):
    with bigmrun.start("local", keepalive_timeout=5) as b:
        ms = b.start(2, services={"W": Worker()})
        for i, m in enumerate(ms):
            m.call("W.work", 10 + i)
        sid = b.session_id
        got = wait_until(lambda: (x := list(client.read_logs(None, None, sid, False)))
                         and len(x) >= 2 and x)
        assert ("m0", "working 10") in got and ("m1", "working 11") in got
        only = list(client.read_logs("m1", None, sid, False))
        assert only == [("m1", "working 11")]
        with pytest.raises(ConfigError, match="no machine 'm9'"):
            list(client.read_logs("m9", None, sid, False))
    # After the driver is gone, the logs it kept are still readable.
    assert list(client.read_logs("m0", None, sid[:6], False)) == [("m0", "working 10")]
    with pytest.raises(ConfigError, match="no running or finished session"):
        list(client.read_logs(None, None, "ffffffff", False))


def test_logs_follow_sees_new_lines_until_the_driver_ends(state_dir, tmp_path):
    prog = tmp_path / "driver.py"
    prog.write_text(textwrap.dedent("""
        import sys, time, bigmrun
        class P:
            def say(self, i):
                print(f"line {i}", flush=True)
        if __name__ == "__main__":
            with bigmrun.start("local") as b:
                m, = b.start(1, services={"P": P()})
                print("SESSION", b.session_id, flush=True)
                for i in range(6):
                    m.call("P.say", i)
                    time.sleep(0.3)
    """))
    proc = subprocess.Popen([sys.executable, str(prog)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        line = proc.stdout.readline()
        assert line.startswith("SESSION ")
        sid = line.split()[1]
        lines = [text for _, text in client.read_logs(None, None, sid, True, poll=0.1)]
    finally:
        proc.wait(30)
    assert lines == [f"line {i}" for i in range(6)]


def test_pick_one_with_several_sessions_asks_which(state_dir):
    with bigmrun.start("test") as b1, bigmrun.start("test") as b2:
        with pytest.raises(ConfigError, match="2 sessions are running"):
            client.pick_one(None)
        assert client.pick_one(b2.session_id[:8]).session == b2.session_id
        assert b1.session_id != b2.session_id
    with pytest.raises(ConfigError, match="no bigmrun session is running"):
        client.pick_one(None)
