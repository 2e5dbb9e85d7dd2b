"""Mutual TLS under a per-session CA, and what a machine refuses.

The refusal tests run a real :class:`Supervisor` on bigmrun's I/O loop (loopback, port
0) and attack it with blocking sockets from the test thread. Each attacker sends a
REQUEST frame whose pickled arguments hold a *tripwire*: an object whose unpickling
creates a file. Spies record every ``Dispatcher.lookup`` and every byte handed to a
``ServerConnection``. A refused peer must leave all of them untouched, and the machine
must still serve a valid client afterwards (a real call succeeds, which also proves the
spies are live).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import pickle
import socket
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import bigmrun
from bigmrun import _loop
from bigmrun._supervisor import Supervisor
from bigmrun.backends._base import BootSpec
from bigmrun.backends.test import TestSystem
from bigmrun.errors import NetworkError
from bigmrun.rpc import _codec as C
from bigmrun.rpc import _protocol as P
from bigmrun.rpc._server import Handler, ServerConnection
from bigmrun.rpc._tls import (
    SESSION_ORG_PREFIX,
    CertificateAuthority,
    Leaf,
    client_context,
    peer_name,
    server_context,
)

pytestmark = pytest.mark.timeout(60)

UTC = datetime.timezone.utc


# --- helpers ---------------------------------------------------------------------------

TRIPPED: list[str] = []


def _tripwire(path: str) -> str:
    """Runs only if a Tripwire is unpickled: that must never happen for an attacker."""
    TRIPPED.append(path)
    Path(path).write_text("unpickled!")
    return "tripped"


@dataclass
class Tripwire:
    path: str

    def __reduce__(self) -> tuple[Any, ...]:
        return (_tripwire, (self.path,))


def request_frame(method: str, args: tuple[Any, ...], sid: int = 1) -> bytes:
    name = method.encode()
    body = pickle.dumps((args, {}, None), 5)
    return P.encode_frame(P.REQUEST, sid, struct.pack(">H", len(name)) + name + body)


def ca_key_pem(ca: CertificateAuthority) -> bytes:
    return ca._key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def pem_body_lines(pem: bytes) -> list[bytes]:
    return [line for line in pem.splitlines() if line and not line.startswith(b"-----")]


def attacker_context(tmp_path: Path, cert_pem: bytes | None = None,
                     key_pem: bytes | None = None,
                     max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client that does not care who the server is and presents what it has."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    if cert_pem is not None:
        assert key_pem is not None
        path = tmp_path / f"attacker-{len(list(tmp_path.iterdir()))}.pem"
        path.write_bytes(cert_pem + key_pem)
        ctx.load_cert_chain(str(path))
    return ctx


def attack(port: int, ctx: ssl.SSLContext | None, payload: bytes) -> str:
    """Connect (TLS with ``ctx``, or plain TCP), send ``payload``, and report the outcome.

    Returns a description of how the server refused. Fails the test if the server
    answered with application data.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if ctx is not None:
            try:
                s = ctx.wrap_socket(s, server_hostname="127.0.0.1")
            except (ssl.SSLError, OSError) as e:
                return f"handshake failed: {e}"
        try:
            s.sendall(payload)
            data = s.recv(65536)
        except (ssl.SSLError, OSError) as e:
            return f"refused after the client's handshake: {e}"
        assert data == b"", f"server answered a refused peer with {data!r}"
        return "closed"
    finally:
        s.close()


def tls_call(port: int, ctx: ssl.SSLContext, method: str, *args: Any) -> Any:
    """A real call at the frame level: REQUEST out, RESPONSE (or ERROR) back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(P.encode_frame(P.REQUEST, 1, C.encode_request(method, args, {})))
        dec = P.FrameDecoder()
        while True:
            data = s.recv(65536)
            assert data, "connection closed before the reply"
            for f in dec.receive_data(data):
                if f.type == P.RESPONSE:
                    return C.loads(f.payload, "reply")
                if f.type == P.ERROR:
                    raise C.decode_error(f.payload, "m0")


@dataclass
class Spies:
    lookups: list[str] = field(default_factory=list)
    connected: list[str | None] = field(default_factory=list)
    received: list[tuple[str | None, int]] = field(default_factory=list)


class SpySupervisor(Supervisor):
    spies: Spies

    def lookup(self, method: str) -> Handler:
        self.spies.lookups.append(method)
        return super().lookup(method)


@dataclass
class RunningMachine:
    ca: CertificateAuthority
    leaf: Leaf  # the machine's own
    driver: Leaf  # a valid client of the session
    sup: SpySupervisor
    port: int
    spies: Spies
    tmp: Path

    @property
    def tripwire_path(self) -> Path:
        return self.tmp / "tripped"

    def attack_payload(self) -> bytes:
        return request_frame("Supervisor.ping", (Tripwire(str(self.tripwire_path)),))

    def assert_untouched(self) -> None:
        assert TRIPPED == []
        assert not self.tripwire_path.exists()
        assert self.spies.lookups == []
        assert self.spies.connected == []
        assert self.spies.received == []
        # Only valid clients' connections (closing asynchronously) may be left.
        assert all(c.peer == "driver" for c in list(self.sup.server.connections))

    def assert_still_serves(self) -> None:
        ctx = client_context(self.driver)
        assert tls_call(self.port, ctx, "Supervisor.ping") == "m0"
        # The spies are live: the valid client was seen, and only it.
        assert self.spies.lookups == ["Supervisor.ping"]
        assert self.spies.connected and set(self.spies.connected) == {"driver"}
        assert self.spies.received and {p for p, _ in self.spies.received} == {"driver"}
        assert TRIPPED == []


@pytest.fixture(scope="module")
def session_ca() -> CertificateAuthority:
    return CertificateAuthority("sess-a")


@pytest.fixture(scope="module")
def machine_sup(session_ca: CertificateAuthority) -> Iterator[tuple[SpySupervisor, int, Leaf]]:
    leaf = session_ca.issue("m0")
    exits: list[tuple[int, str]] = []
    sup = SpySupervisor("m0", leaf, 3600.0, None, lambda c, r: exits.append((c, r)), threads=4)
    sup.spies = Spies()
    _host, port = _loop.run(sup.start("127.0.0.1", 0), timeout=30)
    yield sup, port, leaf
    _loop.get_loop().call_soon_threadsafe(sup.kill)
    assert exits == []


@pytest.fixture
def machine(session_ca: CertificateAuthority, machine_sup: tuple[SpySupervisor, int, Leaf],
            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunningMachine:
    sup, port, leaf = machine_sup
    spies = Spies()
    sup.spies = spies
    TRIPPED.clear()
    orig_made = ServerConnection.connection_made
    orig_received = ServerConnection.data_received

    def connection_made(self: ServerConnection, transport: Any) -> None:
        orig_made(self, transport)
        spies.connected.append(self.peer)

    def data_received(self: ServerConnection, data: bytes) -> None:
        spies.received.append((self.peer, len(data)))
        orig_received(self, data)

    monkeypatch.setattr(ServerConnection, "connection_made", connection_made)
    monkeypatch.setattr(ServerConnection, "data_received", data_received)
    return RunningMachine(session_ca, leaf, session_ca.issue("driver"), sup, port, spies,
                          tmp_path)


# --- certificates ----------------------------------------------------------------------


def test_leaf_certificate_contents(session_ca: CertificateAuthority) -> None:
    leaf = session_ca.issue("m7")
    cert = x509.load_pem_x509_certificate(leaf.cert_pem)
    ca_cert = x509.load_pem_x509_certificate(session_ca.cert_pem)
    assert leaf.ca_pem == session_ca.cert_pem
    assert cert.issuer == ca_cert.subject
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "m7"
    org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    assert org == SESSION_ORG_PREFIX + "sess-a"
    # A leaf cannot act as a CA; the CA cannot sign intermediate CAs.
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ca_bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca_bc.ca is True and ca_bc.path_length == 0
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    # Signed by the CA.
    ca_pub = ca_cert.public_key()
    assert isinstance(ca_pub, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    ca_pub.verify(cert.signature, cert.tbs_certificate_bytes,
                  ec.ECDSA(cert.signature_hash_algorithm))


def test_each_leaf_has_its_own_key(session_ca: CertificateAuthority) -> None:
    a, b = session_ca.issue("a"), session_ca.issue("b")
    assert a.key_pem != b.key_pem and a.cert_pem != b.cert_pem
    ca_key = ca_key_pem(session_ca)
    assert a.key_pem != ca_key and b.key_pem != ca_key


def test_issue_respects_validity_window(session_ca: CertificateAuthority) -> None:
    nb = datetime.datetime(2020, 1, 1, tzinfo=UTC)
    na = datetime.datetime(2020, 1, 2, tzinfo=UTC)
    cert = x509.load_pem_x509_certificate(session_ca.issue("old", nb, na).cert_pem)
    assert cert.not_valid_before_utc == nb
    assert cert.not_valid_after_utc == na


def test_contexts_require_tls13_and_peer_certificates(session_ca: CertificateAuthority) -> None:
    leaf = session_ca.issue("x")
    for ctx in (server_context(leaf), client_context(leaf)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname is False


def test_leaf_dict_round_trip(session_ca: CertificateAuthority) -> None:
    leaf = session_ca.issue("m1")
    d = leaf.to_dict()
    assert set(d) == {"name", "cert", "key", "ca"}
    assert json.loads(json.dumps(d)) == d
    assert Leaf.from_dict(d) == leaf


# --- key material ----------------------------------------------------------------------


def test_repr_hides_key_material(session_ca: CertificateAuthority) -> None:
    leaf = session_ca.issue("m1")
    spec = BootSpec("m1", "sess-a", leaf, 10.0)
    ca_key = ca_key_pem(session_ca)
    for text in (repr(leaf), str(leaf), repr(session_ca), str(session_ca), repr(spec)):
        assert "PRIVATE" not in text
        for line in pem_body_lines(leaf.key_pem) + pem_body_lines(ca_key):
            assert line.decode() not in text
    assert "hidden" in repr(leaf) and "hidden" in repr(session_ca)


class RecordingTestSystem(TestSystem):
    """The real test system, recording the boot specs the driver hands to machines."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__()
        self.specs: list[BootSpec] = []

    async def launch(self, spec: BootSpec, output: Any) -> Any:
        self.specs.append(spec)
        return await super().launch(spec, output)


def test_ca_key_never_reaches_a_machine() -> None:
    system = RecordingTestSystem()
    with bigmrun.start(system) as b:
        ms = b.start(2)
        for m in ms:
            assert m.wait(bigmrun.State.RUNNING, timeout=30) == bigmrun.State.RUNNING
        assert b._ca is not None
        ca_key = ca_key_pem(b._ca)
        ca_pub = b._ca._key.public_key().public_numbers()
        assert len(system.specs) == 2
        leaf_keys = set()
        for spec in system.specs:
            record = json.dumps(spec.boot_record(bind="127.0.0.1"))
            assert ca_key.decode() not in record
            for line in pem_body_lines(ca_key):
                assert line.decode() not in record
            # Exactly one private key: the machine's own leaf key.
            assert record.count("PRIVATE KEY-----") == 2  # its BEGIN and END lines
            leaf = Leaf.from_dict(json.loads(record)["leaf"])
            assert leaf.name == spec.name
            key = serialization.load_pem_private_key(leaf.key_pem, None)
            cert = x509.load_pem_x509_certificate(leaf.cert_pem)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            cert_pub = cert.public_key()
            assert isinstance(cert_pub, ec.EllipticCurvePublicKey)
            assert key.public_key().public_numbers() == cert_pub.public_numbers()
            assert key.public_key().public_numbers() != ca_pub
            assert leaf.ca_pem == b._ca.cert_pem
            leaf_keys.add(leaf.key_pem)
            assert "PRIVATE" not in repr(spec)
        assert len(leaf_keys) == 2  # each machine its own leaf
        assert ms[0].call("Supervisor.ping", timeout=30) == ms[0].name


# --- handshakes ------------------------------------------------------------------------


def test_same_session_handshake_succeeds_both_ways(session_ca: CertificateAuthority) -> None:
    server_leaf, client_leaf = session_ca.issue("server-m"), session_ca.issue("client-d")

    async def main() -> tuple[str | None, str | None, str | None, bytes]:
        seen: dict[str, Any] = {}

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen["client"] = peer_name(writer.get_extra_info("ssl_object"))
            writer.write(await reader.readexactly(5))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0,
                                            ssl=server_context(server_leaf))
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(client_leaf), server_hostname="127.0.0.1")
        sslobj = writer.get_extra_info("ssl_object")
        writer.write(b"hello")
        echoed = await reader.readexactly(5)
        writer.close()
        server.close()
        await server.wait_closed()
        return peer_name(sslobj), seen.get("client"), sslobj.version(), echoed

    server_name, client_name, version, echoed = asyncio.run(main())
    assert server_name == "server-m"
    assert client_name == "client-d"
    assert version == "TLSv1.3"
    assert echoed == b"hello"


def test_client_refuses_a_server_of_another_session() -> None:
    ours, theirs = CertificateAuthority("ours"), CertificateAuthority("theirs")
    impostor = theirs.issue("m0")
    handled: list[bool] = []

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handled.append(True)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0,
                                            ssl=server_context(impostor))
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection("127.0.0.1", port,
                                              ssl=client_context(ours.issue("driver")),
                                              server_hostname="127.0.0.1")
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert handled == []


def test_peer_name_without_peer() -> None:
    assert peer_name(None) is None


# --- a running machine refuses -----------------------------------------------------------


def test_valid_client_is_served(machine: RunningMachine) -> None:
    machine.assert_still_serves()


def test_refuses_a_client_without_certificate(machine: RunningMachine, tmp_path: Path) -> None:
    attack(machine.port, attacker_context(tmp_path), machine.attack_payload())
    machine.assert_untouched()
    machine.assert_still_serves()


def test_refuses_a_certificate_from_another_sessions_ca(machine: RunningMachine,
                                                        tmp_path: Path) -> None:
    other = CertificateAuthority("sess-b").issue("driver")
    ctx = attacker_context(tmp_path, other.cert_pem, other.key_pem)
    attack(machine.port, ctx, machine.attack_payload())
    machine.assert_untouched()
    machine.assert_still_serves()


def test_refuses_another_ca_with_the_same_session_id(machine: RunningMachine,
                                                     tmp_path: Path) -> None:
    # Trust comes from the CA's signature, not from the names in the certificate.
    forged = CertificateAuthority(machine.ca.session_id).issue("driver")
    ctx = attacker_context(tmp_path, forged.cert_pem, forged.key_pem)
    attack(machine.port, ctx, machine.attack_payload())
    machine.assert_untouched()
    machine.assert_still_serves()


@pytest.mark.parametrize("when", ["expired", "not-yet-valid"])
def test_refuses_a_certificate_of_the_same_ca_outside_its_validity(
        machine: RunningMachine, tmp_path: Path, when: str) -> None:
    now = datetime.datetime.now(UTC)
    if when == "expired":
        leaf = machine.ca.issue("driver", now - datetime.timedelta(days=2),
                                now - datetime.timedelta(days=1))
    else:
        leaf = machine.ca.issue("driver", now + datetime.timedelta(days=1),
                                now + datetime.timedelta(days=2))
    ctx = attacker_context(tmp_path, leaf.cert_pem, leaf.key_pem)
    attack(machine.port, ctx, machine.attack_payload())
    machine.assert_untouched()
    machine.assert_still_serves()


def test_refuses_a_certificate_signed_by_a_leaf(machine: RunningMachine,
                                                tmp_path: Path) -> None:
    # A machine holds a leaf key; it must not be able to mint certificates of its own.
    stolen = machine.ca.issue("m9")
    leaf_key = serialization.load_pem_private_key(stolen.key_pem, None)
    assert isinstance(leaf_key, ec.EllipticCurvePrivateKey)
    leaf_cert = x509.load_pem_x509_certificate(stolen.cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "driver")]))
        .issuer_name(leaf_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(leaf_key, hashes.SHA256())
    )
    chain = forged.public_bytes(serialization.Encoding.PEM) + stolen.cert_pem
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    attack(machine.port, attacker_context(tmp_path, chain, key_pem), machine.attack_payload())
    machine.assert_untouched()
    machine.assert_still_serves()


def test_refuses_tls12_even_with_a_valid_certificate(machine: RunningMachine,
                                                     tmp_path: Path) -> None:
    leaf = machine.ca.issue("driver")
    ctx = attacker_context(tmp_path, leaf.cert_pem, leaf.key_pem,
                           max_version=ssl.TLSVersion.TLSv1_2)
    outcome = attack(machine.port, ctx, machine.attack_payload())
    assert outcome.startswith("handshake failed")
    machine.assert_untouched()
    machine.assert_still_serves()


@pytest.mark.parametrize("prefix", [b"", b"GET / HTTP/1.1\r\n\r\n"], ids=["frames", "http"])
def test_refuses_plain_tcp_with_raw_frames(machine: RunningMachine, prefix: bytes) -> None:
    attack(machine.port, None, prefix + machine.attack_payload())
    machine.assert_untouched()
    machine.assert_still_serves()


def test_plain_tcp_client_that_closes_at_once(machine: RunningMachine) -> None:
    for _ in range(5):
        socket.create_connection(("127.0.0.1", machine.port), timeout=10).close()
    machine.assert_untouched()
    machine.assert_still_serves()


def test_authenticated_peer_with_an_oversized_frame_is_cut_off(machine: RunningMachine) -> None:
    # Even an authenticated peer cannot make the machine buffer a huge frame: the header
    # alone ends the connection, and the payload that follows is never decoded.
    ctx = client_context(machine.driver)
    with socket.create_connection(("127.0.0.1", machine.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(struct.pack(">IBBQ", 2**32 - 1, P.REQUEST, 0, 1)
                  + machine.attack_payload())
        try:
            data = s.recv(65536)
        except (ssl.SSLError, OSError):
            data = b""
        assert data == b""  # cut off, no reply
    assert TRIPPED == [] and not machine.tripwire_path.exists()
    assert machine.spies.lookups == []
    assert machine.spies.connected == ["driver"]
    machine.spies.connected.clear()
    machine.spies.received.clear()
    machine.assert_still_serves()


# --- the same, through the public API --------------------------------------------------


def test_machine_of_the_test_system_refuses_and_keeps_serving(tmp_path: Path) -> None:
    with bigmrun.start("test") as b, bigmrun.start("test") as intruder:
        (m,) = b.start(1)
        assert m.wait(bigmrun.State.RUNNING, timeout=30) == bigmrun.State.RUNNING
        sup = m.handle.supervisor  # type: ignore[union-attr]
        looked_up: list[str] = []
        orig_lookup = sup.lookup

        def spy(method: str) -> Handler:
            looked_up.append(method)
            return orig_lookup(method)

        sup.lookup = spy
        port = int(m.addr.rpartition(":")[2])
        payload = request_frame("Supervisor.ping", (Tripwire(str(tmp_path / "tripped")),))
        attack(port, None, payload)
        attack(port, attacker_context(tmp_path), payload)
        # Another session's driver dialing this machine: both sides refuse each other.
        with pytest.raises(NetworkError):
            intruder.dial(m.addr, timeout=30)
        assert TRIPPED == [] and not (tmp_path / "tripped").exists()
        assert "Supervisor.ping" not in looked_up
        assert m.call("Supervisor.ping", timeout=30) == m.name
        assert "Supervisor.ping" in looked_up
        assert m.state == bigmrun.State.RUNNING

