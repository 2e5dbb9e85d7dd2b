"""Mutual TLS 1.3 under a certificate authority made in memory for each session.

How this works
--------------
The driver makes a fresh CA (ECDSA P-256) when its session starts; the CA's private key
lives only in the driver's memory. Every participant gets its own *leaf*: a key pair
and a certificate signed by the CA, valid for both server and client use. The driver
keeps a leaf for itself; each machine receives only its own leaf and the CA's
certificate (never the CA key). Both ends of every connection require and verify the
peer's certificate against the session CA, so a peer without a certificate of this
session fails the TLS handshake and not a single byte of its is decoded by bigmrun.

Certificates name the session in their subject (``O=bigmrun session <id>``) so that
leaves of two sessions are told apart in logs; trust comes only from the CA signature.
Hostnames are not checked: machines are identified by the certificate, and addresses
(loopback, private EC2 IPs, SSH hosts) are not stable names.

Only ``cryptography`` is needed to *make* certificates (on the driver); a machine needs
just the standard library ``ssl`` module to use them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import ssl
import tempfile
from dataclasses import dataclass

SESSION_ORG_PREFIX = "bigmrun session "


@dataclass(frozen=True)
class Leaf:
    """A participant's credentials: its certificate and key (PEM) and the CA certificate.

    ``key_pem`` is a secret: it is never logged and ``repr`` hides it.
    """

    name: str
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def __repr__(self) -> str:
        return f"Leaf(name={self.name!r}, key=<hidden>)"

    def to_dict(self) -> dict[str, str]:
        """A JSON-friendly form, for handing to a machine over a private channel."""
        return {
            "name": self.name,
            "cert": self.cert_pem.decode(),
            "key": self.key_pem.decode(),
            "ca": self.ca_pem.decode(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> Leaf:
        return cls(d["name"], d["cert"].encode(), d["key"].encode(), d["ca"].encode())


class CertificateAuthority:
    """A session's CA. Its key never leaves this object (and this process)."""

    def __init__(self, session_id: str, valid_days: int = 7) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.session_id = session_id
        self._valid = datetime.timedelta(days=valid_days)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self._name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, SESSION_ORG_PREFIX + session_id),
                x509.NameAttribute(NameOID.COMMON_NAME, "bigmrun CA " + session_id),
            ]
        )
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + self._valid)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem: bytes = self._cert.public_bytes(serialization.Encoding.PEM)

    def __repr__(self) -> str:
        return f"CertificateAuthority(session={self.session_id!r}, key=<hidden>)"

    def issue(
        self,
        name: str,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> Leaf:
        """Issue a leaf certificate (server and client use) for participant ``name``."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name(
            [
                x509.NameAttribute(
                    NameOID.ORGANIZATION_NAME, SESSION_ORG_PREFIX + self.session_id
                ),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
            .not_valid_after(not_after or now + self._valid)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return Leaf(
            name=name,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            ca_pem=self.cert_pem,
        )


def _load_chain(ctx: ssl.SSLContext, leaf: Leaf) -> None:
    """Load the leaf into ``ctx`` without leaving the key on disk.

    ``ssl`` reads certificate chains only from files. On Linux we use an anonymous
    in-memory file (memfd); elsewhere a private temporary file, deleted at once.
    """
    data = leaf.cert_pem + leaf.key_pem
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("bigmrun-leaf", 0)
        try:
            os.write(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except OSError:
            pass
        finally:
            os.close(fd)
    tmpdir = tempfile.mkdtemp(prefix="bigmrun-tls-")
    path = os.path.join(tmpdir, "leaf.pem")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        ctx.load_cert_chain(path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)


def _context(purpose: ssl.Purpose, leaf: Leaf) -> ssl.SSLContext:
    server = purpose is ssl.Purpose.CLIENT_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=leaf.ca_pem.decode())
    _load_chain(ctx, leaf)
    return ctx


def server_context(leaf: Leaf) -> ssl.SSLContext:
    """TLS 1.3 server context that *requires* a client certificate from the session CA."""
    return _context(ssl.Purpose.CLIENT_AUTH, leaf)


def client_context(leaf: Leaf) -> ssl.SSLContext:
    """TLS 1.3 client context presenting ``leaf`` and verifying the server against the CA."""
    return _context(ssl.Purpose.SERVER_AUTH, leaf)


def peer_name(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The common name of a verified peer certificate, or None."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for attr in rdn:
            if attr[0] == "commonName":
                return str(attr[1])
    return None
