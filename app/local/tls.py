"""The local stack's internal TLS: its own certificate authority and the certificate its services serve,
kept in `<state>/tls/` (git-ignored) and made again when missing, expired or close to expiry.

    ca.pem       the CA certificate: what clients trust (TXROUTE_INTERNAL_CA_FILE, `curl --cacert`)
    ca.key       the CA's private key (0600); it signs the server certificate, nothing else
    server.pem   the server certificate, shared by every local service: SAN IP:127.0.0.1 and DNS:localhost
    server.key   its private key, PKCS#8 as granian requires (0600)

Keys are EC P-256 (the same curve the ALB's certificates use; fast handshakes). Services read the files at
start: after a renewal, restart them (`txroute down && txroute up` renews what is due).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from app import limits

LOOPBACK_IP = "127.0.0.1"
LOOPBACK_NAME = "localhost"


@dataclass(frozen=True)
class LocalTls:
    """Where the local stack's TLS files are; `ensure_local_tls` makes them."""

    folder: Path

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key_file(self) -> Path:
        return self.folder / "ca.key"

    @property
    def cert_file(self) -> Path:
        return self.folder / "server.pem"

    @property
    def key_file(self) -> Path:
        return self.folder / "server.key"


def ensure_local_tls(folder: Path, *, now: datetime.datetime | None = None) -> LocalTls:
    """The CA and server certificate in `folder`, made (again) when missing, unreadable or due for renewal;
    a new CA always brings a new server certificate."""
    now = now or datetime.datetime.now(datetime.UTC)
    tls = LocalTls(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    ca = _load(tls.ca_file, tls.ca_key_file)
    if ca is None or _due(ca[0], now):
        ca = _new_ca(now)
        _write(tls.ca_file, tls.ca_key_file, *ca)
        server = None
    else:
        server = _load(tls.cert_file, tls.key_file)
    if server is None or _due(server[0], now) or not _signed_by(server[0], ca[0]):
        _write(tls.cert_file, tls.key_file, *_new_server(ca[0], ca[1], now))
    return tls


def _due(cert: x509.Certificate, now: datetime.datetime) -> bool:
    renew_before = datetime.timedelta(days=limits.LOCAL_CERT_RENEW_BEFORE_DAYS)
    return not cert.not_valid_before_utc <= now < cert.not_valid_after_utc - renew_before


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _load(cert_file: Path, key_file: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    return cert, key


def _new_ca(now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "txroute local CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "txroute local stack")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=limits.LOCAL_CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _new_server(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + datetime.timedelta(days=limits.LOCAL_SERVER_CERT_VALIDITY_DAYS), ca.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK_NAME)]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK_IP)),
                                                    x509.DNSName(LOOPBACK_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _write(cert_file: Path, key_file: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """Key first, each file written whole under a temporary name and renamed (a reader never sees half)."""
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _atomic(key_file, key_pem, 0o600)
    _atomic(cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
