"""Security, against LIVE local machines and a live driver (test_tls.py covers the
in-process refusals in detail; this adds what it does not):

* a machine refuses a real machine certificate (and the driver certificate) of ANOTHER
  live session, no client certificate, an expired certificate, and plain TCP, with
  nothing unpickled (a tripwire argument that would create a file when decoded);
* every port the driver and its machine processes listen on is scanned
  (``psutil``): each machine port refuses a TLS client without a session certificate;
  the driver's only listener is the debug server, on loopback, which refuses requests
  without the token (and non-loopback clients);
* no secret (CA key, leaf keys, the debug token, AWS credentials from the environment)
  appears in the driver's output, the machines' output or the session logs.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from reliability_services import Secrets, Tripwire, Worker
from test_tls import attack, attacker_context, pem_body_lines, request_frame, tls_call

import bigmrun
from bigmrun import State
from bigmrun.debug import server as debug_server
from bigmrun.rpc._tls import CertificateAuthority, Leaf, client_context

pytestmark = pytest.mark.timeout(120)

UTC = datetime.timezone.utc


def listening_ports(pid: int) -> list[tuple[str, int]]:
    return sorted({(c.laddr.ip, c.laddr.port)
                   for c in psutil.Process(pid).net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN})


def machine_pid(m: bigmrun.Machine) -> int:
    return int(m.call("W.pid", timeout=10))


def test_live_machine_refuses_other_sessions_and_bad_certificates(tmp_path: Path) -> None:
    wire = tmp_path / "tripped"
    payload = request_frame("W.echo", (Tripwire(str(wire)),))
    with bigmrun.start("local", keepalive_timeout=10) as b1, \
            bigmrun.start("local", keepalive_timeout=10) as b2:
        (m1,) = b1.start(1, services={"W": Worker()})
        (m2,) = b2.start(1, services={"S": Secrets()})
        assert m1.wait(State.RUNNING, timeout=60) == State.RUNNING, m1.err
        assert m2.wait(State.RUNNING, timeout=60) == State.RUNNING, m2.err
        port = int(m1.addr.rpartition(":")[2])
        other_machine = Leaf.from_dict(m2.call("S.leaf", timeout=10))  # a real one
        assert other_machine.name == "m0"  # same name as m1's machine: only the CA differs
        other_driver = b2._leaf
        expired = b1._ca.issue("driver", datetime.datetime(2020, 1, 1, tzinfo=UTC),  # type: ignore[union-attr]
                               datetime.datetime(2020, 1, 2, tzinfo=UTC))
        forged = CertificateAuthority(b1.session_id).issue("driver")  # same id, other key
        attempts = {
            "another session's machine certificate": attacker_context(
                tmp_path, other_machine.cert_pem, other_machine.key_pem),
            "another session's driver certificate": attacker_context(
                tmp_path, other_driver.cert_pem, other_driver.key_pem),
            "a CA with the same session id": attacker_context(
                tmp_path, forged.cert_pem, forged.key_pem),
            "an expired certificate of this session": attacker_context(
                tmp_path, expired.cert_pem, expired.key_pem),
            "no client certificate": attacker_context(tmp_path),
            "plain TCP": None,
        }
        outcomes = {what: attack(port, ctx, payload) for what, ctx in attempts.items()}
        assert not wire.exists(), "a refused peer's bytes were unpickled"
        for what, outcome in outcomes.items():
            assert outcome != "", what
        # Control: the same payload from the session's own driver certificate IS decoded
        # (so the tripwire works), and the machine still serves.
        assert tls_call(port, client_context(b1._leaf), "W.echo", "ok") == "ok"
        assert tls_call(port, client_context(b1._leaf), "W.echo",
                        Tripwire(str(wire))) == "tripped"
        assert wire.exists()
        assert m1.call("W.echo", 1, timeout=10) == 1


def test_every_listening_port_is_protected(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIGMRUN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("BIGMRUN_DEBUG_SERVER", raising=False)
    with bigmrun.start("local", keepalive_timeout=10) as b:
        ms = b.start(2, services={"W": Worker()})
        for m in ms:
            assert m.wait(State.RUNNING, timeout=60) == State.RUNNING, m.err
        assert b.debug is not None, "the debug server did not start"
        scanned = []
        for m in ms:
            ports = listening_ports(machine_pid(m))
            assert ports, f"{m.name} listens nowhere?"
            for _host, port in ports:
                outcome = attack(port, attacker_context(tmp_path),
                                 request_frame("Supervisor.ping", ()))
                scanned.append((m.name, port, outcome))
            assert int(m.addr.rpartition(":")[2]) in [p for _, p in ports]
        driver = listening_ports(os.getpid())
        debug_port = int(b.debug.url.rpartition(":")[2])
        # Our own process's listeners: only this session's debug server (other
        # sessions of this test process are shut down by now).
        assert driver == [("127.0.0.1", debug_port)], driver
        url = b.debug.url + "/debug/status"
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            req = urllib.request.Request(url, headers=headers)
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=10)
            assert err.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "?token=" + "x" * 43, timeout=10)
        assert err.value.code == 401
        good = urllib.request.Request(b.debug.url + "/",
                                      headers={"Authorization": f"Bearer {b.debug.token}"})
        try:
            urllib.request.urlopen(good, timeout=10).close()
            answered = 200
        except urllib.error.HTTPError as e:
            answered = e.code
        assert answered not in (401, 403), answered  # the token is what let it through
        # A non-loopback client is refused even with the token.
        assert not debug_server._is_loopback("10.77.0.11")
        assert not debug_server._is_loopback("192.168.1.2")
        assert not debug_server._is_loopback("not-an-address")
        assert debug_server._is_loopback("127.0.0.1") and debug_server._is_loopback("::1")
        monkeypatch.setattr(debug_server, "_is_loopback", lambda host: False)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(good, timeout=10)
        assert err.value.code == 403
    assert len(scanned) >= 2, scanned


DRIVER = '''\
import json, os, sys
import bigmrun
sys.path.insert(0, {tests!r})
from reliability_services import Secrets

b = bigmrun.start("local", keepalive_timeout=10)
with b:
    ms = b.start(2, services={{"S": Secrets()}})
    from cryptography.hazmat.primitives import serialization
    ca_key = b._ca._key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode()
    leaves = [b._leaf.key_pem.decode()]
    for m in ms:
        m.wait(bigmrun.State.RUNNING, timeout=60)
        leaves.append(m.call("S.leaf")["key"])
        try:
            m.call("S.noisy")
        except bigmrun.BigmrunError as e:
            print("driver saw:", e, file=sys.stderr)
    with open(sys.argv[1], "w") as f:
        json.dump({{"ca_key": ca_key, "leaves": leaves, "token": b.debug.token}}, f)
    print("driver done", flush=True)
# The EC2 error path with credentials in the environment (nothing listens on port 1).
try:
    e = bigmrun.start("ec2", endpoint_url="http://127.0.0.1:1", region="us-east-1")
    with e:
        e.start(1)
except Exception as err:
    print("ec2 error:", type(err).__name__, err, file=sys.stderr)
'''


def test_no_secret_in_any_output_or_log(tmp_path: Path) -> None:
    state = tmp_path / "state"
    out = tmp_path / "secrets.json"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(Path(__file__).parent)))
    aws_secret = "FAKEsecretKEY/abcdefghijklmnopqrstuvwxyz0123456789"
    aws_token = "FAKEsessionTOKENzyxwvutsrqponmlkjihgfedcba9876543210"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BIGMRUN_", "AWS_"))}
    env.update(BIGMRUN_STATE_DIR=str(state), AWS_ACCESS_KEY_ID="AKIAFAKEFAKEFAKEFAKE",
               AWS_SECRET_ACCESS_KEY=aws_secret, AWS_SESSION_TOKEN=aws_token,
               AWS_MAX_ATTEMPTS="1", BIGMRUN_LOG_LEVEL="DEBUG")
    r = subprocess.run([sys.executable, str(script), str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=100)
    assert "driver done" in r.stdout, r.stderr[-3000:]
    assert "cannot reach EC2" in r.stderr, r.stderr[-3000:]  # the EC2 error path ran
    # The machines' output did come back (so we really looked at it).
    assert re.search(r"^m0: .*machine stdout line", r.stdout + r.stderr, re.M), r.stderr
    assert "a failing method" in r.stderr
    secrets = json.loads(out.read_text())
    out.unlink()  # our own oracle, not a log
    needles = [aws_secret, aws_token, secrets["token"]]
    for pem in [secrets["ca_key"], *secrets["leaves"]]:
        needles += [line.decode() for line in pem_body_lines(pem.encode())]
    texts = {"driver stdout": r.stdout, "driver stderr": r.stderr}
    logs = [p for p in state.rglob("*") if p.is_file() and "sessions" not in p.parts]
    print("session logs:", [str(p.relative_to(state)) for p in logs])
    for p in logs:
        texts[str(p)] = p.read_text(errors="replace")
    assert len(logs) >= 2, "no per-machine session logs?"
    assert all("machine stdout line" in texts[str(p)] for p in logs), "logs without output?"
    for where, text in texts.items():
        assert "PRIVATE KEY" not in text, where
        for needle in needles:
            assert needle not in text, f"a secret leaked into {where}"
    # Session files (which must hold the token for `bigmrun ps`) are private.
    for p in state.rglob("*"):
        if p.is_file() and "sessions" in p.parts:
            assert p.stat().st_mode & 0o077 == 0, p
