"""
POP3 sessions for the SASL tests: the protocol over an in-memory transport
(with a TLS client certificate when asked), an in-memory store, and a
passwd-file checker whose "thread pool" runs work at once.
"""

from __future__ import annotations

import base64
from pathlib import Path

from OpenSSL.crypto import X509
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from popd.auth.passwdfile import PasswdFile, PasswdFileChecker
from popd.protocol import POP3Factory, SessionPolicy
from popd.realm import MaildropRealm
from popd.testing import MemoryMaildropProvider
from popd.testing.immediate import ImmediateReactor, ImmediateThreadPool

UNTRUSTED = IPv4Address("TCP", "192.0.2.7", 40000)
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)


def passwd_checker(path: Path, text: str) -> PasswdFileChecker:
    path.write_text(text)
    pool = ImmediateThreadPool()
    return PasswdFileChecker(
        PasswdFile(path), reactor=ImmediateReactor(pool), threadpool=pool
    )


class CertificateTransport(StringTransport):
    """
    A StringTransport that can start TLS and show a client certificate.
    """

    tls_started_with = None

    def __init__(self, peer, certificate=None) -> None:
        super().__init__(peerAddress=peer)
        self.certificate = certificate

    def startTLS(self, options) -> None:
        self.tls_started_with = options

    def getPeerCertificate(self):
        if self.certificate is None:
            return None
        return X509.from_cryptography(self.certificate)


class Session:
    """
    One protocol instance wired to an in-memory transport.
    """

    def __init__(self, factory: POP3Factory, peer=UNTRUSTED, certificate=None):
        self.factory = factory
        self.clock = factory.reactor
        self.transport = CertificateTransport(peer, certificate)
        self.protocol = factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def send(self, data: bytes) -> bytes:
        self.protocol.dataReceived(data)
        # Run what is due now (not the idle timeout).
        for _ in range(10):
            self.clock.advance(0)
        return self.take()

    def line(self, data: bytes) -> bytes:
        return self.send(data + b"\r\n")

    def challenge(self, reply: bytes) -> bytes:
        """
        The decoded data of a C{+ base64} challenge line.
        """
        assert reply.startswith(b"+ ") and reply.endswith(b"\r\n"), reply
        assert reply.count(b"\r\n") == 1, reply
        return base64.b64decode(reply[2:-2], validate=True)

    def respond(self, data: bytes) -> bytes:
        """
        Send one base64 response line.
        """
        return self.line(base64.b64encode(data))

    def lost(self) -> None:
        self.protocol.connectionLost(None)


def make_factory(
    checker, mechanisms=None, provider=None, tls=True, **policy
) -> POP3Factory:
    if provider is None:
        provider = MemoryMaildropProvider()
    policy.setdefault("failure_delay", 0)
    factory = POP3Factory(
        Portal(MaildropRealm(provider), [checker]),
        SessionPolicy(hostname="pop.example", **policy),
        tls_options=object() if tls else None,
        reactor=Clock(),
        mechanisms=mechanisms,
    )
    factory.provider = provider
    return factory


def capabilities(reply: bytes) -> list[bytes]:
    lines = reply.split(b"\r\n")
    assert lines[0].startswith(b"+OK") and lines[-2:] == [b".", b""], reply
    return lines[1:-2]


def sasl_line(session: Session) -> bytes | None:
    """
    CAPA's SASL line (without "SASL "), or C{None} when there is none.
    """
    for capability in capabilities(session.line(b"CAPA")):
        if capability.startswith(b"SASL "):
            return capability[5:]
    return None


def auth_list(session: Session) -> bytes:
    """
    AUTH's list of mechanisms, space-separated like CAPA's SASL line.
    """
    reply = session.line(b"AUTH")
    assert reply.startswith(b"+OK"), reply
    return b" ".join(capabilities(reply))
