"""
TLS for both listeners: the server's certificate options and the
self-signed certificate that lets the embedded defaults work out of the box.

With client CAs (C{[tls] client_ca}, needed by SASL EXTERNAL) the server
asks every client for a certificate but does not require one: a client that
sends one must have it verified by one of those CAs or the handshake fails;
a client that sends none logs in some other way.
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
from OpenSSL.crypto import X509
from twisted.internet._sslverify import OpenSSLAcceptableCiphers
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

from popd.config import ConfigError

log = Logger()

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


def _client_cas(path: Path) -> list[x509.Certificate]:
    try:
        cas = x509.load_pem_x509_certificates(_read(path, "client_ca"))
    except ValueError:
        raise ConfigError(f"[tls] client_ca: {path} holds no PEM certificate") from None
    return cas


def load_certificate_options(
    certificate: Path,
    key: Path,
    min_version: str = "TLSv1.2",
    client_ca: Path | None = None,
    ciphers: str | None = None,
) -> CertificateOptions:
    """
    Build the server side of TLS from PEM files: the leaf certificate first,
    any intermediates after it, TLS 1.2 or newer.

    @param client_ca: PEM file of the CAs whose client certificates are
        accepted (and requested, not required), or C{None} to ask clients
        for none.
    @param ciphers: an OpenSSL cipher string for TLS 1.2 (TLS 1.3's suites
        are OpenSSL's, all of them strong), or C{None} for Twisted's
        default: forward secrecy and AEAD first, no RC4, 3DES or export
        ciphers.
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
    verification: dict = {}
    cas = [] if client_ca is None else _client_cas(client_ca)
    if cas:
        verification = {
            "verify": True,
            "caCerts": [X509.from_cryptography(ca) for ca in cas],
            "requireCertificate": False,
        }
    if ciphers is not None:
        verification["acceptableCiphers"] = (
            OpenSSLAcceptableCiphers.fromOpenSSLCipherString(ciphers)
        )
    try:
        options = CertificateOptions(
            privateKey=private_key,
            certificate=chain[0],
            extraCertChain=chain[1:],
            raiseMinimumTo=_TLS_VERSIONS[min_version],
            **verification,
        )
    except ValueError:
        raise ConfigError(
            f"[tls] ciphers: {ciphers!r} selects no cipher this OpenSSL has"
        ) from None
    try:
        context = options.getContext()
        context.check_privatekey()
    except SSL.Error:
        raise ConfigError(
            f"[tls] key: {key} does not match certificate {certificate}"
        ) from None
    for ca in cas:
        # Name the acceptable CAs in the certificate request, so clients
        # with several certificates pick the right one.
        context.add_client_ca(ca)
    return options


def _sni_matches(pattern: str, name: str) -> bool:
    """
    Whether host C{name} (lower case) is C{pattern}: the same name, or
    for C{*.example.org} any name one label below example.org.
    """
    if pattern.startswith("*."):
        head, dot, rest = name.partition(".")
        return bool(head and dot) and rest == pattern[2:]
    return name == pattern


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLS:
    """
    The server's TLS contexts: the default certificate and those chosen by
    SNI, replaceable while the server runs.

    Every new TLS connection (POP3S, and STLS) gets the contexts current
    when it starts; connections already established keep theirs.
    L{reload} reads the files again and swaps the contexts in one step, or,
    if anything is wrong with them, logs one error and keeps the old ones.

    It is what L{TLSMemoryBIOFactory} and C{startTLS} take: an
    L{IOpenSSLServerConnectionCreator}, and for older callers an
    L{IOpenSSLContextFactory} whose C{getContext} is the current default.

    @ivar loader: makes the contexts: a callable returning the default
        L{SSL.Context} and a list of C{(host name pattern, SSL.Context)};
        it raises L{ConfigError} for anything wrong.
    """

    def __init__(self, loader) -> None:
        self.loader = loader
        self._default, self._by_name = self._load()

    def _load(self) -> tuple[SSL.Context, list[tuple[str, SSL.Context]]]:
        default, by_name = self.loader()
        if by_name:
            # The client's server_name picks the context during the
            # handshake; no name, or no match, keeps the default.
            default.set_tlsext_servername_callback(self._choose)
        return default, list(by_name)

    def _choose(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        if not raw:
            return
        name = raw.decode("ascii", "replace").lower().rstrip(".")
        for pattern, context in self._by_name:
            if _sni_matches(pattern, name):
                connection.set_context(context)
                return

    def getContext(self) -> SSL.Context:
        return self._default

    def serverConnectionForTLS(self, protocol) -> SSL.Connection:
        return SSL.Connection(self._default, None)

    def context_for(self, name: str | None) -> SSL.Context:
        """
        The context a client asking for C{name} gets (for tests and
        C{check-config}).
        """
        for pattern, context in self._by_name:
            if name and _sni_matches(pattern, name.lower().rstrip(".")):
                return context
        return self._default

    def reload(self) -> bool:
        """
        Read the certificates and keys again; the new ones serve every TLS
        handshake from now on.

        @return: whether they were replaced (C{False}: an error was logged
            and the old certificates stay).
        """
        try:
            default, by_name = self._load()
        except ConfigError as error:
            log.error(
                "TLS reload failed, keeping the current certificates: {error}",
                error=str(error),
            )
            return False
        self._default, self._by_name = default, by_name
        log.info("TLS certificates reloaded ({count} SNI names)", count=len(by_name))
        return True


def server_tls(
    certificate: Path,
    key: Path,
    min_version: str = "TLSv1.2",
    client_ca: Path | None = None,
    ciphers: str | None = None,
    sni=(),
) -> ServerTLS:
    """
    L{ServerTLS} for the default C{certificate} and C{key} and the
    L{popd.config.SNICertificate} entries C{sni}, each with the same
    protocol versions, ciphers and client certificate request.

    @raise ConfigError: naming the file or key at fault.
    """

    def load() -> tuple[SSL.Context, list[tuple[str, SSL.Context]]]:
        def context(certificate: Path, key: Path) -> SSL.Context:
            options = load_certificate_options(
                certificate, key, min_version, client_ca=client_ca, ciphers=ciphers
            )
            return options.getContext()

        default = context(certificate, key)
        by_name = []
        for entry in sni:
            try:
                chosen = context(entry.certificate, entry.key)
            except ConfigError as error:
                raise ConfigError(
                    f"[tls] sni {entry.names[0]}: {str(error).removeprefix('[tls] ')}"
                ) from None
            by_name += [(name, chosen) for name in entry.names]
        # Exact names before wildcards.
        by_name.sort(key=lambda pair: pair[0].startswith("*."))
        return default, by_name

    return ServerTLS(load)
