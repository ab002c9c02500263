"""
TLS for both listeners: the server's certificate options and the
self-signed certificate that lets the embedded defaults work out of the box.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.ssl import CertificateOptions, TLSVersion

from popd.config import ConfigError

_TLS_VERSIONS = {"TLSv1.2": TLSVersion.TLSv1_2, "TLSv1.3": TLSVersion.TLSv1_3}


def create_self_signed(certificate: Path, key: Path, hostname: str) -> None:
    """
    Write a new P-256 key and a ten-year self-signed certificate for
    C{hostname} (and localhost), the key readable by its owner only.
    """
    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    names = {hostname, "localhost"}
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in sorted(names)]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private_key, hashes.SHA256())
    )
    key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(key_pem)
    certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(
            f"[tls] {what}: cannot read {path}: {error.strerror}"
        ) from None


def load_certificate_options(
    certificate: Path, key: Path, min_version: str = "TLSv1.2"
) -> CertificateOptions:
    """
    Build the server side of TLS from PEM files: the leaf certificate first,
    any intermediates after it, TLS 1.2 or newer.
    """
    chain_pem = _read(certificate, "certificate")
    key_pem = _read(key, "key")
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise ConfigError(
            f"[tls] certificate: {certificate} holds no PEM certificate"
        ) from None
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"[tls] key: {key} holds no usable PEM private key") from None
    options = CertificateOptions(
        privateKey=private_key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=_TLS_VERSIONS[min_version],
    )
    try:
        options.getContext().check_privatekey()
    except SSL.Error:
        raise ConfigError(
            f"[tls] key: {key} does not match certificate {certificate}"
        ) from None
    return options
