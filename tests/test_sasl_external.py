"""
SASL EXTERNAL with TLS client certificates: asking for (not requiring)
client certificates in TLS, and logging in as the user a verified
certificate names.
"""

from __future__ import annotations

import datetime
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers.sasl_session import Session, make_factory, passwd_checker, sasl_line
from OpenSSL import SSL
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse

from popd import sasl
from popd.config import ConfigError
from popd.sasl.external import certificate_identities
from popd.tls import create_self_signed, load_certificate_options

FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
WITH_EXTERNAL = ("SCRAM-SHA-256", "PLAIN", "EXTERNAL")

USERS = """\
alice@example.org:{PLAIN}secret
alice:*
bob:*
ivan:*::::::nologin
"""


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str | None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "popd tests")]
    if cn is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attributes)


def _certificate(subject, issuer, public_key, signing_key, ca=False, emails=()):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if emails:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(e) for e in emails]),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256())


class CA:
    def __init__(self, name: str) -> None:
        self.key = _key()
        self.name = _name(name)
        self.certificate = _certificate(
            self.name, self.name, self.key.public_key(), self.key, ca=True
        )

    def issue(self, cn: str | None, emails=()):
        key = _key()
        certificate = _certificate(
            _name(cn), self.name, key.public_key(), self.key, emails=emails
        )
        return certificate, key


@pytest.fixture(scope="module")
def ca():
    return CA("popd client CA")


@pytest.fixture
def checker(tmp_path):
    return passwd_checker(tmp_path / "passwd", USERS)


def tls_session(checker, certificate, mechanisms=WITH_EXTERNAL, **policy):
    factory = make_factory(
        checker, sasl.registry.select(mechanisms), max_auth_failures=100, **policy
    )
    session = Session(factory, certificate=certificate)
    assert session.line(b"STLS") == b"+OK Begin TLS negotiation now.\r\n"
    return session


# Which names a certificate carries


def test_identities_are_common_names_then_emails(ca):
    certificate, _ = ca.issue("alice", emails=["alice@example.org", "a@example.net"])
    assert certificate_identities(certificate) == [
        "alice",
        "alice@example.org",
        "a@example.net",
    ]
    assert certificate_identities(ca.issue("bob")[0]) == ["bob"]
    assert certificate_identities(ca.issue(None)[0]) == []


# Offering EXTERNAL


def test_offered_only_over_tls_with_a_certificate(checker, ca):
    certificate, _ = ca.issue("alice", emails=["alice@example.org"])
    factory = make_factory(checker, sasl.registry.select(WITH_EXTERNAL))
    plain = Session(factory, certificate=certificate)
    assert b"EXTERNAL" not in (sasl_line(plain) or b"")
    assert plain.line(b"AUTH EXTERNAL =") == (
        b"-ERR Unsupported authentication mechanism.\r\n"
    )
    without = tls_session(checker, None)
    assert sasl_line(without) == b"SCRAM-SHA-256 PLAIN"
    assert sasl_line(tls_session(checker, certificate)) == (
        b"SCRAM-SHA-256 PLAIN EXTERNAL"
    )


def test_not_offered_unless_configured(checker, ca):
    certificate, _ = ca.issue("bob")
    session = tls_session(checker, certificate, ("PLAIN",))
    assert sasl_line(session) == b"PLAIN"


def test_not_offered_when_no_checker_takes_certificates(ca):
    checker = InMemoryUsernamePasswordDatabaseDontUse(bob=b"x")
    session = tls_session(checker, ca.issue("bob")[0])
    assert b"EXTERNAL" not in sasl_line(session)


# Logging in


def test_empty_authorization_identity_is_the_first_name(checker, ca):
    certificate, _ = ca.issue("alice", emails=["alice@example.org"])
    session = tls_session(checker, certificate)
    assert session.line(b"AUTH EXTERNAL =").startswith(b"+OK Logged in")
    assert session.protocol._avatar_id == "alice"
    certificate, _ = ca.issue(None, emails=["alice@example.org"])
    session = tls_session(checker, certificate)
    assert session.line(b"AUTH EXTERNAL =").startswith(b"+OK Logged in")
    assert session.protocol._avatar_id == "alice@example.org"


def test_without_initial_response(checker, ca):
    session = tls_session(checker, ca.issue("bob")[0])
    assert session.line(b"AUTH EXTERNAL") == b"+ \r\n"
    assert session.line(b"").startswith(b"+OK Logged in")
    assert session.protocol._avatar_id == "bob"


def test_authorization_identity_chooses_among_the_names(checker, ca):
    certificate, _ = ca.issue("alice", emails=["alice@example.org"])
    session = tls_session(checker, certificate)
    reply = session.line(b"AUTH EXTERNAL YWxpY2VAZXhhbXBsZS5vcmc=")
    assert reply.startswith(b"+OK Logged in")
    assert session.protocol._avatar_id == "alice@example.org"


def test_a_name_the_certificate_does_not_carry_is_refused(checker, ca):
    session = tls_session(checker, ca.issue("bob")[0])
    assert session.line(b"AUTH EXTERNAL YWxpY2U=") == (
        b"-ERR [AUTH] The client certificate does not name that user.\r\n"
    )
    # Names are compared exactly: no letter-case games.
    assert session.line(b"AUTH EXTERNAL Qm9i") == (
        b"-ERR [AUTH] The client certificate does not name that user.\r\n"
    )
    assert session.line(b"AUTH EXTERNAL Ym9i").startswith(b"+OK Logged in")


def test_unknown_or_disabled_users_fail_like_any_login(checker, ca):
    for cn in ("mallory", "ivan"):
        session = tls_session(checker, ca.issue(cn)[0])
        assert session.line(b"AUTH EXTERNAL =") == FAILED


def test_a_certificate_naming_no_user(checker, ca):
    session = tls_session(checker, ca.issue(None)[0])
    assert session.line(b"AUTH EXTERNAL =") == (
        b"-ERR [AUTH] The client certificate names no user.\r\n"
    )
    # A name holding the folder separator does not name its prefix's user.
    session = tls_session(checker, ca.issue("bob#x")[0])
    assert session.line(b"AUTH EXTERNAL =") == (
        b"-ERR [AUTH] The client certificate names no user.\r\n"
    )


def test_folder_suffix_on_the_authorization_identity(checker, ca):
    certificate, _ = ca.issue("bob")
    factory = make_factory(checker, sasl.registry.select(WITH_EXTERNAL))
    factory.provider.deliver("bob", b"Subject: x\r\n\r\nx\r\n", folder="Archive")
    session = Session(factory, certificate=certificate)
    session.line(b"STLS")
    reply = session.line(b"AUTH EXTERNAL " + b"Ym9iI0FyY2hpdmU=")  # bob#Archive
    assert reply.startswith(b"+OK Logged in, 1 messages")
    assert factory.provider.is_locked("bob", "Archive")


def test_cancel_and_bad_base64(checker, ca):
    session = tls_session(checker, ca.issue("bob")[0])
    session.line(b"AUTH EXTERNAL")
    assert session.line(b"*") == b"-ERR Authentication cancelled.\r\n"
    assert session.line(b"AUTH EXTERNAL !!") == (
        b"-ERR [AUTH] Invalid base64 data in SASL response.\r\n"
    )
    assert session.line(b"AUTH EXTERNAL =").startswith(b"+OK Logged in")


# TLS: asking for client certificates


@pytest.fixture
def server_pair(tmp_path):
    certificate, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    create_self_signed(certificate, key, "pop.example")
    return certificate, key


def _pem(path, *objects) -> str:
    data = b""
    for item in objects:
        if isinstance(item, x509.Certificate):
            data += item.public_bytes(serialization.Encoding.PEM)
        else:
            data += item.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
    path.write_bytes(data)
    return str(path)


def handshake(options, client: ssl.SSLContext):
    """
    A TLS handshake in memory; returns the server connection, or raises
    the server's L{SSL.Error}.
    """
    server = SSL.Connection(options.getContext(), None)
    server.set_accept_state()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(incoming, outgoing, server_hostname="pop.example")
    for _ in range(20):
        try:
            tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        server.bio_write(outgoing.read())
        try:
            server.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            incoming.write(server.bio_read(65536))
        except SSL.WantReadError:
            pass
        if done:
            # TLS 1.3: the server sees the client certificate after the
            # client's last flight; let it read that.
            try:
                server.recv(1)
            except SSL.WantReadError:
                pass
            return server
    raise AssertionError("handshake did not finish")


def client_context(server_certificate, certificate=None, key=None, tmp_path=None):
    context = ssl.create_default_context(cafile=str(server_certificate))
    if certificate is not None:
        chain = _pem(tmp_path / "client.pem", certificate)
        key_file = _pem(tmp_path / "client.key", key)
        context.load_cert_chain(chain, key_file)
    return context


def test_client_certificate_requested_not_required(tmp_path, server_pair, ca):
    client_ca = _pem(tmp_path / "clients.pem", ca.certificate)
    options = load_certificate_options(*server_pair, client_ca=tmp_path / "clients.pem")
    assert client_ca
    certificate, key = ca.issue("alice", emails=["alice@example.org"])
    server = handshake(
        options, client_context(server_pair[0], certificate, key, tmp_path)
    )
    peer = server.get_peer_certificate()
    assert peer is not None and peer.to_cryptography() == certificate
    # No certificate: fine, just no EXTERNAL.
    server = handshake(options, client_context(server_pair[0]))
    assert server.get_peer_certificate() is None


def test_certificate_of_another_ca_fails_the_handshake(tmp_path, server_pair, ca):
    _pem(tmp_path / "clients.pem", ca.certificate)
    options = load_certificate_options(*server_pair, client_ca=tmp_path / "clients.pem")
    certificate, key = CA("someone else").issue("alice")
    with pytest.raises((SSL.Error, ssl.SSLError)):
        server = handshake(
            options, client_context(server_pair[0], certificate, key, tmp_path)
        )
        server.recv(1)


def test_no_client_ca_asks_for_no_certificate(tmp_path, server_pair, ca):
    options = load_certificate_options(*server_pair)
    certificate, key = ca.issue("alice")
    server = handshake(
        options, client_context(server_pair[0], certificate, key, tmp_path)
    )
    assert server.get_peer_certificate() is None


def test_unreadable_or_empty_client_ca(tmp_path, server_pair):
    with pytest.raises(ConfigError, match=r"\[tls\] client_ca: cannot read .*missing"):
        load_certificate_options(*server_pair, client_ca=tmp_path / "missing.pem")
    (tmp_path / "empty.pem").write_text("nothing\n")
    with pytest.raises(ConfigError, match=r"\[tls\] client_ca: .* no PEM certificate"):
        load_certificate_options(*server_pair, client_ca=tmp_path / "empty.pem")
