"""The node's TLS identity: a self-signed certificate made on first start, and its fingerprint.

Node-to-node signalling runs over TLS (RFC 3261 section 26.2.1), but who a peer *is* is proven
by signed node records and ZRTP/OpenPGP, not by a CA: a self-signed certificate is the normal
case.  Its identity is the SHA-256 of the public key (SubjectPublicKeyInfo, as in RFC 7469 pins),
so re-issuing the certificate with the same key (new dates, new name) keeps the fingerprint.

The contexts made here are what the daemon hands to :class:`freecall.transport.SipTransport`.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .storage import PUBLIC_MODE, SECRET_MODE, atomic_write

__all__ = [
    "certificate_fingerprint",
    "client_context",
    "make_self_signed",
    "server_context",
]

CERT_VALIDITY_DAYS = 3650
"""Self-signed: nobody checks the dates against a CA policy, so a long life avoids surprises."""


def make_self_signed(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    common_name: str,
    *,
    days: int = CERT_VALIDITY_DAYS,
) -> x509.Certificate:
    """The node certificate at ``cert_path``, created (with its key) on first start.

    An existing pair is loaded as is.  A key without a certificate gets a new certificate for
    the same key, so the node keeps its fingerprint; a certificate without its key is replaced
    together with a new key.  The key is written first, mode 0600, with
    :func:`freecall.storage.atomic_write`, so a crash never leaves a certificate without a key.
    """
    cert_file, key_file = Path(cert_path), Path(key_path)
    key: ec.EllipticCurvePrivateKey | None = None
    if key_file.exists():
        loaded = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            # Keys from elsewhere (RSA, Ed25519) are fine if a certificate goes with them.
            if cert_file.exists():
                return x509.load_pem_x509_certificate(cert_file.read_bytes())
            raise ValueError(f"{key_file}: not an EC key; remove it to generate a new pair")
        key = loaded
        if cert_file.exists():
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            if _spki(cert.public_key()) == _spki(key.public_key()):
                return cert
            # The certificate is for another key: re-issue it for the key we hold.
    if key is None:
        # P-256: every TLS stack that SIP peers use accepts ECDSA P-256 (Ed25519 certificates
        # are still refused by some).
        key = ec.generate_private_key(ec.SECP256R1())
        atomic_write(
            key_file,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            mode=SECRET_MODE,
        )
    cert = _issue(key, common_name, days)
    atomic_write(cert_file, cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC_MODE)
    return cert


def _issue(key: ec.EllipticCurvePrivateKey, common_name: str, days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    san: x509.GeneralName
    try:
        san = x509.IPAddress(ipaddress.ip_address(common_name))
    except ValueError:
        san = x509.DNSName(common_name)
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # tolerate peers' clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _spki(public_key: object) -> bytes:
    encode = getattr(public_key, "public_bytes", None)
    if encode is None:
        raise TypeError(f"not a public key: {type(public_key).__name__}")
    der = encode(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert isinstance(der, bytes)
    return der


def certificate_fingerprint(cert: x509.Certificate | bytes) -> str:
    """The node's TLS identity: SHA-256 of the certificate's SubjectPublicKeyInfo, lower-case hex.

    ``cert`` is a certificate object or its DER or PEM bytes (``getpeercert(binary_form=True)``
    gives DER).
    """
    if isinstance(cert, bytes | bytearray | memoryview):
        raw = bytes(cert)
        if raw.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(raw)
        else:
            cert = x509.load_der_x509_certificate(raw)
    return hashlib.sha256(_spki(cert.public_key())).hexdigest()


def server_context(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    *,
    ca_file: str | os.PathLike[str] | None = None,
    verify_peer: bool = False,
) -> ssl.SSLContext:
    """Context for the ``tls:`` listeners.

    Python's ssl module cannot accept an arbitrary client certificate (there is no verify
    callback), so a client certificate is only requested when there is something to check it
    against: ``verify_peer`` requires one chaining to ``ca_file`` (else the system store);
    ``ca_file`` alone asks for one and checks it when presented (peers pinned by certificate).
    Without either, the server sees no client certificate and peer identity comes from the
    node records and ZRTP.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996: no TLS 1.0/1.1
    ctx.load_cert_chain(os.fspath(cert_path), os.fspath(key_path))
    if verify_peer or ca_file is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_OPTIONAL
        if ca_file is not None:
            ctx.load_verify_locations(cafile=os.fspath(ca_file))
        else:
            ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    return ctx


def client_context(
    cert_path: str | os.PathLike[str] | None = None,
    key_path: str | os.PathLike[str] | None = None,
    *,
    ca_file: str | os.PathLike[str] | None = None,
    verify_peer: bool = False,
) -> ssl.SSLContext:
    """Context for outgoing TLS connections to peers.

    Without ``verify_peer`` any server certificate is accepted (peers are self-signed); it is
    still available to the caller (``SipTransport.peer_fingerprint``) for an identity check
    against the peer's signed node record.  The node certificate, when given, is offered to
    servers that ask for one.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify_peer:
        if ca_file is not None:
            ctx.load_verify_locations(cafile=os.fspath(ca_file))
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_path is not None:
        ctx.load_cert_chain(os.fspath(cert_path), os.fspath(key_path) if key_path else None)
    return ctx
