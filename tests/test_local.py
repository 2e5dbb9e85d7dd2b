"""Local-system specifics: crashes, output, env, orphans, re-running the program, refusal.

Tests that need a real driver program (output on the driver's stderr, a driver killed
with SIGKILL, a program run as a script or with ``-m``) write a small driver into
``tmp_path`` and run it as a subprocess with a bounded timeout.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
import services as S
from conftest import wait_until

import bigmrun
from bigmrun import State
from bigmrun._output import Output
from bigmrun.backends.local import LocalSystem
from bigmrun.bootstrap.program import Program
from bigmrun.rpc._tls import CertificateAuthority

pytestmark = pytest.mark.timeout(90)

#: Generous bound for "at once" / "promptly" (real figures are milliseconds).
PROMPT = 5.0


def running(b: bigmrun.B, n: int = 1, env: dict[str, str] | None = None,
            **services: Any) -> list[bigmrun.Machine]:
    ms = b.start(n, services=services, env=env)
    for m in ms:
        assert m.wait(State.RUNNING, timeout=60) == State.RUNNING, m.err
    return ms


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def driver_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIGMRUN_")}
    env.pop("PYTHONPATH", None)
    env["NO_COLOR"] = "1"
    return env


def write(path: Path, code: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(code))
    return path


def run_driver(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=driver_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def patient_b() -> Any:
    """A local session whose keepalive timeout is long: anything noticed within PROMPT
    seconds was noticed because the process ended, not because keepalives lapsed."""
    b = bigmrun.start("local", keepalive_timeout=30)
    try:
        yield b
    finally:
        b.shutdown()


# --- machines are processes ----------------------------------------------------------------

def test_each_machine_is_its_own_process(local_b: bigmrun.B) -> None:
    ms = running(local_b, 2, E=S.Echo())
    pids = [m.call("E.pid") for m in ms]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    for m, pid in zip(ms, pids, strict=True):
        assert m.info["pid"] == pid
        assert psutil.Process(pid).ppid() == os.getpid()
        # Under pytest, machines run the bare entry point with the driver's sys.path.
        assert "bigmrun.machine" in " ".join(psutil.Process(pid).cmdline())


def test_env_reaches_the_machine_process(local_b: bigmrun.B) -> None:
    key = "BIGMRUN_TEST_ENV_" + uuid.uuid4().hex[:8].upper()
    (m,) = running(local_b, env={key: "hello world", "BIGMRUN_TEST_NUM": 42}, E=S.Echo())  # type: ignore[dict-item]
    assert m.call("E.getenv", key) == "hello world"
    assert m.call("E.getenv", "BIGMRUN_TEST_NUM") == "42"
    assert key not in os.environ  # not applied to the driver
    # The driver's own environment is inherited too.
    assert m.call("E.getenv", "PATH") == os.environ["PATH"]
    (plain,) = running(local_b, E=S.Echo())
    assert plain.call("E.getenv", key) is None


# --- crashes -------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["sigkill", "exit7"])
def test_machine_crashing_mid_call(patient_b: bigmrun.B, how: str) -> None:
    m, other = running(patient_b, 2, X=S.Crash(), Z=S.Sleeper(), E=S.Echo())
    pid = m.call("E.pid")
    tok = uuid.uuid4().hex
    pending = m.submit("Z.wait_cancel", tok, 60)
    wait_until(lambda: m.call("Z.status", tok) == "running", what="the pending call to start")
    t0 = time.monotonic()
    with pytest.raises(bigmrun.MachineLostError) as ei:
        if how == "sigkill":
            m.call("X.kill_self")
        else:
            m.call("X.exit_now", 7)
    assert time.monotonic() - t0 < PROMPT, "the crash was not noticed promptly"
    # Not a mere network error: the machine is known to be gone, and why.
    assert not isinstance(ei.value, bigmrun.NetworkError)
    assert m.state == State.STOPPED
    err = m.err
    assert isinstance(err, bigmrun.MachineLostError)
    if how == "sigkill":
        assert "SIGKILL" in str(err) and err.exit_status == -signal.SIGKILL  # type: ignore[attr-defined]
    else:
        assert "status 7" in str(err) and err.exit_status == 7  # type: ignore[attr-defined]
    assert m.name in str(err)
    assert ei.value.__cause__ is err
    assert str(err) in str(ei.value)
    # Every other call pending on it failed the same way, at once.
    with pytest.raises(bigmrun.MachineLostError) as ei2:
        pending.result(timeout=PROMPT)
    assert ei2.value.__cause__ is err
    # Later calls fail at once; the process is gone; the rest of the cluster serves.
    with pytest.raises(bigmrun.MachineLostError):
        m.call("E.pid", timeout=PROMPT)
    wait_until(lambda: process_gone(pid), PROMPT, what="the crashed process to be gone")
    assert other.call("E.combine", 1, 2) == 3
    assert other.state == State.RUNNING


def test_machine_killed_from_outside_is_noticed_at_once(patient_b: bigmrun.B) -> None:
    (m,) = running(patient_b, E=S.Echo())
    pid = m.call("E.pid")
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    assert m.wait(State.STOPPED, timeout=PROMPT) == State.STOPPED
    assert time.monotonic() - t0 < PROMPT
    assert isinstance(m.err, bigmrun.MachineLostError)
    assert "SIGTERM" in str(m.err)
    with pytest.raises(bigmrun.MachineLostError, match="SIGTERM"):
        m.call("E.pid")


def test_frozen_machine_is_declared_lost_after_the_keepalive_timeout(local_b: bigmrun.B) -> None:
    keepalive = local_b.system.keepalive_timeout
    frozen, other = running(local_b, 2, Z=S.Sleeper(), E=S.Echo())
    pid = frozen.call("E.pid")
    pending = frozen.submit("Z.nap", 30)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)  # alive but silent: only keepalives can tell
    try:
        assert frozen.wait(State.STOPPED, timeout=keepalive + 2 * PROMPT) == State.STOPPED
        assert time.monotonic() - t0 < keepalive + 2 * PROMPT
        assert isinstance(frozen.err, bigmrun.MachineLostError)
        assert "keepalive" in str(frozen.err)
        with pytest.raises(bigmrun.MachineLostError):
            pending.result(timeout=PROMPT)
        # The driver does not leave the frozen process behind.
        wait_until(lambda: process_gone(pid), PROMPT, what="the frozen machine to be killed")
        assert other.call("E.combine", 1, 1) == 2
    finally:
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)


# --- start failures ------------------------------------------------------------------------

def _start_with_program(argv: list[str], **options: Any) -> tuple[bigmrun.B, bigmrun.Machine]:
    system = LocalSystem(keepalive_timeout=5, program=Program(argv, False, []), **options)
    b = bigmrun.start(system)
    (m,) = b.start(1, services={"E": S.Echo()})
    return b, m


def test_program_that_never_calls_start(tmp_path: Path) -> None:
    code = ("import sys\n"
            "print('stdout: I am a program that forgot bigmrun.start()')\n"
            "print('stderr: about to leave', file=sys.stderr)\n"
            "sys.exit(0)\n")
    b, m = _start_with_program([sys.executable, "-c", code])
    try:
        assert m.wait(State.RUNNING, timeout=60) == State.STOPPED
        err = m.err
        assert isinstance(err, bigmrun.StartError)
        msg = str(err)
        assert m.name in msg and "status 0" in msg and "bigmrun.start()" in msg
        # Its last output, from both streams, is in the error.
        assert "I am a program that forgot bigmrun.start()" in msg
        assert "stderr: about to leave" in msg
        with pytest.raises(bigmrun.MachineLostError) as ei:
            m.call("E.pid")
        assert ei.value.__cause__ is err
    finally:
        b.shutdown()


def test_program_that_fails_to_import(tmp_path: Path) -> None:
    prog = write(tmp_path / "broken_prog.py", """
        import no_such_module_for_bigmrun_tests  # noqa
        import bigmrun
        bigmrun.start()
    """)
    b, m = _start_with_program([sys.executable, str(prog)])
    try:
        assert m.wait(State.RUNNING, timeout=60) == State.STOPPED
        msg = str(m.err)
        assert isinstance(m.err, bigmrun.StartError)
        assert "status 1" in msg
        assert "ModuleNotFoundError" in msg and "no_such_module_for_bigmrun_tests" in msg
    finally:
        b.shutdown()


def test_program_that_never_reports_times_out(tmp_path: Path) -> None:
    code = "import time; print('hanging', flush=True); time.sleep(120)"
    b, m = _start_with_program([sys.executable, "-c", code], start_timeout=1.5)
    try:
        t0 = time.monotonic()
        assert m.wait(State.RUNNING, timeout=60) == State.STOPPED
        assert time.monotonic() - t0 < 1.5 + PROMPT
        assert isinstance(m.err, bigmrun.StartError)
        assert "within 1.5s" in str(m.err)
        assert "hanging" in str(m.err)  # its last output
        # The hung process was killed, not left behind.
        kids = [p for p in psutil.Process().children()
                if "hanging" in " ".join(p.cmdline()) and not process_gone(p.pid)]
        wait_until(lambda: all(process_gone(p.pid) for p in kids), PROMPT,
                   what="the hung machine process to be killed")
    finally:
        b.shutdown()


# --- TLS refusal (simple; tests/test_tls.py goes deep) ----------------------------------

def _refused(addr: str, ctx: ssl.SSLContext | None) -> bool:
    """True if the machine refuses this client: it closes the connection (or fails the
    handshake) without waiting for a single frame. An accepted client would instead
    see the machine wait quietly for its first request (a read timeout)."""
    host, _, port = addr.rpartition(":")
    raw = socket.create_connection((host, int(port)), timeout=PROMPT)
    try:
        if ctx is None:  # not even TLS: bytes that look like a frame
            raw.sendall(b"\x00" * 64)
            return raw.recv(4096) == b""
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            # TLS 1.3 reports a refused client certificate after the client's handshake.
            s.settimeout(1.0)
            return s.recv(4096) == b""
    except TimeoutError:
        return False  # the machine is waiting for our request: accepted
    except (ssl.SSLError, ConnectionError):
        return True
    finally:
        raw.close()


def _client_ctx(tmp_path: Path, cert_pem: bytes | None = None, key_pem: bytes | None = None,
                ca_pem: bytes | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert_pem is not None and key_pem is not None:
        name = uuid.uuid4().hex
        (tmp_path / f"{name}.crt").write_bytes(cert_pem)
        (tmp_path / f"{name}.key").write_bytes(key_pem)
        ctx.load_cert_chain(tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
    return ctx


def test_client_without_session_certificate_is_refused(local_b: bigmrun.B,
                                                       tmp_path: Path) -> None:
    (m,) = running(local_b, C=S.Counter())
    assert m.call("C.add", 1) == 1

    # Control: a client holding a certificate of this session is accepted.
    mine = local_b._ca.issue("probe")  # type: ignore[union-attr]
    assert not _refused(m.addr, _client_ctx(tmp_path, mine.cert_pem, mine.key_pem))

    assert _refused(m.addr, _client_ctx(tmp_path))  # no certificate at all
    other = CertificateAuthority("another-session").issue("intruder")
    assert _refused(m.addr, _client_ctx(tmp_path, other.cert_pem, other.key_pem))
    assert _refused(m.addr, None)  # plain TCP

    # The machine keeps serving, with its state intact.
    assert m.state == State.RUNNING
    assert m.call("C.add", 1) == 2
    assert local_b.dial(m.addr).call("C.get") == 2


# --- output --------------------------------------------------------------------------------

OUTPUT_DRIVER = """
    import os, sys, signal, time
    import bigmrun

    class Printer:
        def shout(self, tag, n, width=200):
            pad = "x" * width
            for i in range(n):
                print(f"{tag} out {i} {pad} end")
                print(f"{tag} err {i} {pad} end", file=sys.stderr)
            return n

        def print_then_die(self, tag, n):
            for i in range(n):
                print(f"{tag} out {i}")
                print(f"{tag} err {i}", file=sys.stderr)
            sys.stdout.write(f"{tag} last-partial-line")
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)

    if __name__ == "__main__":
        n = int(sys.argv[1])
        with bigmrun.start("local", keepalive_timeout=30) as b:
            ms = b.start(2, services={"P": Printer()})
            fs = [m.submit("P.shout", m.name, n) for m in ms]
            print("SHOUTED", [f.result(timeout=60) for f in fs], flush=True)
            try:
                ms[0].call("P.print_then_die", "dying", n, timeout=60)
            except bigmrun.MachineLostError as e:
                print("LOST", type(e).__name__, flush=True)
            print("DONE", flush=True)
"""


@pytest.mark.timeout(120)
def test_output_reaches_driver_stderr_prefixed_whole_and_complete(tmp_path: Path) -> None:
    n = 2000
    prog = write(tmp_path / "output_driver.py", OUTPUT_DRIVER)
    r = run_driver([str(prog), str(n)], tmp_path, timeout=100)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == ["SHOUTED [2000, 2000]", "LOST MachineLostError", "DONE"]

    lines = r.stderr.splitlines()
    pad = "x" * 200
    shout = re.compile(rf"^(m[01]): (m[01]) (out|err) (\d+) {pad} end$")
    seen: dict[tuple[str, str], list[int]] = {}
    for line in lines:
        if "xxxx" in line or " end" in line:
            mo = shout.match(line)
            # Whole lines, never two machines' lines mixed into one.
            assert mo, f"mangled output line: {line!r}"
            assert mo.group(1) == mo.group(2), f"line under the wrong prefix: {line!r}"
            seen.setdefault((mo.group(1), mo.group(3)), []).append(int(mo.group(4)))
    assert sorted(seen) == [("m0", "err"), ("m0", "out"), ("m1", "err"), ("m1", "out")]
    for key, idx in seen.items():
        # Nothing lost, nothing doubled, and each stream's lines in order.
        assert idx == list(range(n)), f"{key}: {len(idx)} lines, out of order or missing"

    # A machine that crashes right after printing loses nothing, not even a last
    # line without a newline.
    dying = [ln for ln in lines if "dying" in ln]
    want = {f"m0: dying out {i}" for i in range(n)} | {f"m0: dying err {i}" for i in range(n)}
    want.add("m0: dying last-partial-line")
    assert set(dying) == want, sorted(want - set(dying))[:5]
    assert len(dying) == len(want)


def test_output_prefix_is_coloured_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Sink:
        def __init__(self, tty: bool) -> None:
            self.tty = tty
            self.text = ""

        def isatty(self) -> bool:
            return self.tty

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

    monkeypatch.delenv("NO_COLOR", raising=False)
    tty, pipe = Sink(True), Sink(False)
    Output(tty).line("m3", "stdout", b"hello\n")  # type: ignore[arg-type]
    Output(pipe).line("m3", "stderr", b"hello\r\n")  # type: ignore[arg-type]
    assert pipe.text == "m3: hello\n"
    assert tty.text.startswith("\x1b[") and "m3:" in tty.text and tty.text.endswith(" hello\n")
    monkeypatch.setenv("NO_COLOR", "1")
    plain = Sink(True)
    Output(plain).line("m3", "stdout", b"hello")  # type: ignore[arg-type]
    assert plain.text == "m3: hello\n"


# --- the driver killed with SIGKILL leaves no machine behind --------------------------------

ORPHAN_DRIVER = """
    import os, sys, time
    import bigmrun

    class E:
        def pid(self):
            return os.getpid()

    if __name__ == "__main__":
        b = bigmrun.start("local", keepalive_timeout=float(sys.argv[1]))
        ms = b.start(2, services={"E": E()})
        print("PIDS", *[m.call("E.pid", timeout=60) for m in ms], flush=True)
        time.sleep(600)
"""


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        pytest.fail("the driver printed nothing in time")
    return proc.stdout.readline()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
def test_driver_gone_leaves_no_machine(tmp_path: Path, how: str) -> None:
    """SIGKILL: the driver is dead. SIGSTOP: it is frozen (its pipes stay open, only
    keepalives stop). Either way every machine exits within the keepalive timeout."""
    keepalive = 2.0
    prog = write(tmp_path / "orphan_driver.py", ORPHAN_DRIVER)
    proc = subprocess.Popen([sys.executable, str(prog), str(keepalive)], cwd=tmp_path,
                            env=driver_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = _read_line(proc, 30)
        assert line.startswith("PIDS "), line
        pids = [int(p) for p in line.split()[1:]]
        assert len(pids) == 2
        for pid in pids:
            p = psutil.Process(pid)
            assert p.ppid() == proc.pid
            assert str(prog) in " ".join(p.cmdline())  # machines re-run the script
        if how == "sigkill":
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        else:
            proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        wait_until(lambda: all(process_gone(pid) for pid in pids), keepalive + PROMPT,
                   what=f"every machine process to exit after the driver got {how}")
        assert time.monotonic() - t0 < keepalive + PROMPT
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- one program: run as a script and as `python -m module` ----------------------------------

APP = """
    import dataclasses, json, os, sys
    import bigmrun

    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    def double(p):
        return Point(p.x * 2, p.y * 2)

    class Geo:
        def __init__(self, origin):
            self.origin = origin

        def move(self, p, fn):
            q = fn(p)
            assert isinstance(q, Point)
            return Point(q.x + self.origin.x, q.y + self.origin.y)

        def whoami(self):
            main = sys.modules["__main__"]
            spec = getattr(main, "__spec__", None)
            return {"argv": sys.argv[1:], "pid": os.getpid(),
                    "main_spec": spec.name if spec else None,
                    "point_module": Point.__module__}

    def main():
        print("ENTERED", os.environ.get("BIGMRUN_MACHINE_NAME", "driver"), flush=True)
        with bigmrun.start("local", keepalive_timeout=10) as b:
            (m,) = b.start(1, services={"G": Geo(Point(1, 1))})
            r = m.call("G.move", Point(2, 3), double, timeout=60)
            assert type(r) is Point, type(r)
            info = m.call("G.whoami")
            print("RESULT", json.dumps({"x": r.x, "y": r.y, "driver_pid": os.getpid(),
                                        "driver_argv": sys.argv[1:], **info}), flush=True)

    if __name__ == "__main__":
        main()
"""


@pytest.mark.parametrize("mode", ["script", "module"])
def test_program_reruns_as_script_and_module(tmp_path: Path, mode: str) -> None:
    proj = tmp_path / "proj"
    write(proj / "mypkg" / "__init__.py", "")
    write(proj / "mypkg" / "app.py", APP)
    if mode == "script":
        args = ["mypkg/app.py", "--flag", "a b"]
    else:
        args = ["-m", "mypkg.app", "--flag", "a b"]
    r = run_driver(args, proj, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0] == "ENTERED driver"
    result = json.loads(next(ln for ln in lines if ln.startswith("RESULT "))[7:])
    # Classes and functions of the user's __main__ work as services and arguments.
    assert (result["x"], result["y"]) == (5, 7)
    assert result["point_module"] == "__main__"
    # The machine ran the same program, with the same arguments, in its own process.
    assert result["argv"] == result["driver_argv"] == ["--flag", "a b"]
    assert result["pid"] != result["driver_pid"]
    assert result["main_spec"] == (None if mode == "script" else "mypkg.app")
    # The machine's module-level code ran too (it printed, prefixed, on the driver).
    assert "m0: ENTERED m0" in r.stderr.splitlines()


def test_the_open_file_limit_is_raised_on_the_driver_and_the_machines(local_b) -> None:
    import resource

    from bigmrun._loop import raise_open_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
    if want <= 256:
        pytest.skip(f"the hard limit of open files here is only {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        # A machine started now inherits 256 and raises it itself when its loop starts.
        (m,) = local_b.start(1, services={"E": S.Echo()})
        assert m.wait(bigmrun.State.RUNNING, timeout=60) == bigmrun.State.RUNNING, m.err
        assert m.call("E.nofile") == want
        assert raise_open_file_limit() == want
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (want, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
