"""What test-system machines print reaches the driver's output per machine, as a local
machine's does: prefixed on the driver's stderr, kept for ``bigmrun logs`` and the debug
server, and never mixed with the driver's own output or another machine's."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import threading

import pytest
from click.testing import CliRunner
from conftest import wait_until

import bigmrun
from bigmrun.backends import _capture
from bigmrun.cli import main
from bigmrun.debug import client, sessions


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    monkeypatch.setenv("BIGMRUN_STATE_DIR", str(d))
    return d


class Talker:
    def init(self, b):
        print(f"init of {b.name}")

    def say(self, text):
        print(text)
        return bigmrun.current().name

    def pieces(self, tag):
        sys.stdout.write(f"{tag} first half, ")
        sys.stdout.write("second half\n")
        sys.stderr.write(f"{tag} to stderr\n")
        print(f"{tag} a", f"{tag} b", sep="\n", file=sys.stderr)
        sys.stdout.write(f"{tag} no newline yet")
        return tag

    def many(self, n):
        me = bigmrun.current().name
        for i in range(n):
            print(f"{me} line {i}")
        return n

    async def asay(self, text):
        print(f"async {text}")
        await asyncio.sleep(0.01)
        sys.stderr.write(f"async {text} after await\n")
        return await asyncio.to_thread(print, f"async {text} in to_thread")

    def in_thread(self, text):
        t = threading.Thread(target=contextvars.copy_context().run, args=(print, text))
        t.start()
        t.join()

    def log(self, text):
        logging.getLogger("bigmrun-test-output").warning("logged %s", text)


def lines_of(b, machine):
    return [(ln.stream, ln.text) for ln in b.output.since(machine=machine)]


def test_lines_reach_the_driver_output_per_machine_and_stream(capsys):
    before = sys.stdout, sys.stderr
    with bigmrun.start("test", keepalive_timeout=5) as b:
        m0, m1 = b.start(2, services={"T": Talker()})
        m0.wait(bigmrun.State.RUNNING, timeout=30)
        m1.wait(bigmrun.State.RUNNING, timeout=30)
        assert isinstance(sys.stdout, _capture.StreamProxy)
        assert m0.call("T.say", "hello from m0") == "m0"
        assert m1.call("T.say", "hello from m1") == "m1"
        assert m0.call("T.pieces", "p") == "p"
        m1.call("T.asay", "x")
        print("the driver's own line")
        print("the driver's stderr line", file=sys.stderr)

        assert lines_of(b, "m0") == [
            ("stdout", "init of m0"), ("stdout", "hello from m0"),
            ("stdout", "p first half, second half"), ("stderr", "p to stderr"),
            ("stderr", "p a"), ("stderr", "p b")]
        assert lines_of(b, "m1") == [
            ("stdout", "init of m1"), ("stdout", "hello from m1"), ("stdout", "async x"),
            ("stderr", "async x after await"), ("stdout", "async x in to_thread")]
        texts = [ln.text for ln in b.output.since()]
        assert not any("driver's" in t for t in texts)

        # The debug server (what `bigmrun logs` reads) has them, stream included.
        info = sessions.find(b.session_id)[0]
        data = client.get(info, "/api/logs", machine="m0")
        assert [(s, t) for _, _, m, s, t in data["lines"] if m == "m0"] == lines_of(b, "m0")
        assert [t for _, t in client.read_logs("m1", None, b.session_id, False)] == [
            t for _, t in lines_of(b, "m1")]
    # The unfinished last line arrives when its machine stops; then the streams are back.
    assert lines_of(b, "m0")[-1] == ("stdout", "p no newline yet")
    assert (sys.stdout, sys.stderr) == before

    out, err = capsys.readouterr()
    assert out == "the driver's own line\n"
    err_lines = err.splitlines()
    assert "the driver's stderr line" in err_lines
    for want in ("m0: init of m0", "m0: hello from m0", "m0: p first half, second half",
                 "m0: p to stderr", "m1: async x", "m1: async x in to_thread",
                 "m0: p no newline yet"):
        assert want in err_lines
    assert [ln for ln in err_lines if "hello from" in ln] == [
        "m0: hello from m0", "m1: hello from m1"]


def test_two_machines_printing_at_once_are_not_mixed():
    with bigmrun.start("test", keepalive_timeout=5) as b:
        ms = b.start(2, services={"T": Talker()})
        futures = [m.submit("T.many", 200) for m in ms for _ in range(4)]
        assert [f.result(60) for f in futures] == [200] * 8
        for m in ms:
            got = lines_of(b, m.name)[1:]  # after init's line
            assert len(got) == 800
            assert all(s == "stdout" and t.startswith(f"{m.name} line ") for s, t in got)
            assert sorted(t for _, t in got) == sorted(
                f"{m.name} line {i}" for i in range(200) for _ in range(4))


def test_threads_with_the_context_and_logging_handlers_are_captured():
    logger = logging.getLogger("bigmrun-test-output")
    handler = logging.StreamHandler()  # writes to sys.stderr as it was before machines
    logger.addHandler(handler)
    try:
        stream = handler.stream
        with bigmrun.start("test", keepalive_timeout=5) as b:
            m, = b.start(1, services={"T": Talker()})
            m.call("T.in_thread", "from a thread")
            m.call("T.log", "something")
            assert lines_of(b, "m0")[1:] == [("stdout", "from a thread"),
                                             ("stderr", "logged something")]
        assert handler.stream is stream
    finally:
        logger.removeHandler(handler)


def test_a_restored_stream_is_captured_again_and_a_killed_machine_no_longer():
    before = sys.stdout
    with bigmrun.start("test", keepalive_timeout=5) as b:
        m0, m1 = b.start(2, services={"T": Talker()})
        m0.wait(bigmrun.State.RUNNING, timeout=30)
        proxy = sys.stdout
        sys.stdout = before  # as pytest does between a test's phases
        m0.call("T.say", "captured again")
        assert sys.stdout is proxy
        assert lines_of(b, "m0")[-1] == ("stdout", "captured again")
        b.system.kill(m0)
        wait_until(lambda: m0.state == bigmrun.State.STOPPED, what="m0 to stop")
        assert isinstance(sys.stdout, _capture.StreamProxy)  # m1 still runs
        m1.call("T.say", "still here")
        assert lines_of(b, "m1")[-1] == ("stdout", "still here")
    assert sys.stdout is before


def test_bigmrun_logs_shows_test_machines(capsys):
    with bigmrun.start("test", keepalive_timeout=5) as b:
        ms = b.start(2, services={"T": Talker()})
        for i, m in enumerate(ms):
            m.call("T.say", f"said {i}")
        sid = b.session_id
        r = CliRunner().invoke(main, ["logs"])
        assert r.exit_code == 0, r.output
        assert "m0: said 0" in r.output and "m1: said 1" in r.output
        assert "m0: init of m0" in r.output
        r = CliRunner().invoke(main, ["logs", "m1", "--session", sid[:6]])
        assert r.output.splitlines() == ["m1: init of m1", "m1: said 1"]
    r = CliRunner().invoke(main, ["logs", "--session", sid])  # after the fact, from files
    assert "m0: said 0" in r.output and "m1: said 1" in r.output


@pytest.fixture
def machine_started_in_setup():
    with bigmrun.start("test", keepalive_timeout=5) as b:
        m, = b.start(1, services={"T": Talker()})
        m.wait(bigmrun.State.RUNNING, timeout=30)
        yield b, m


def test_machines_started_in_a_fixture_are_captured_in_the_test(machine_started_in_setup):
    # pytest puts its own sys.stdout back between a fixture's setup and the test.
    b, m = machine_started_in_setup
    m.call("T.say", "in the test body")
    assert lines_of(b, "m0") == [("stdout", "init of m0"), ("stdout", "in the test body")]
