"""
SASL over POP3 (RFC 5034) through the protocol: which mechanisms are
offered when, and every built-in mechanism's exchange and error paths,
against a real passwd-file checker and an in-memory store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest
from helpers.sasl_session import (
    LOOPBACK,
    UNTRUSTED,
    Session,
    auth_list,
    make_factory,
    passwd_checker,
    sasl_line,
)
from helpers.scram_client import ScramClient
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer
from zope.interface import implementer

from popd import sasl
from popd.auth import scram
from popd.auth.credentials import (
    IScramSecretSource,
    IScramSHA256Credentials,
)
from popd.auth.errors import AuthUnavailable
from popd.auth.schemes import hash_password
from popd.parser import MAX_BUFFERED_LINE

# Dovecot's own output for the password "password" (doveadm pw -s SCHEME).
DOVECOT_SCRAM_SHA_256 = (
    "{SCRAM-SHA-256}4096,0zoYprpVPdKZ3w5tk4KT1Q==,"
    "aK39wT2gmjtQkdFsaWMqjkdQmKUyZPdIvhPAWTiI42c=,"
    "a58940OTLStwqDlO9utTlt/meUFjpjuR6eDTZXM8cMk="
)
DOVECOT_SCRAM_SHA_1 = (
    "{SCRAM-SHA-1}4096,30DFiLDV02ql5AziDhu1Mw==,"
    "QFGXQoqNQ7p5FYitbzIrYk029o4=,eu2VmpBb/U1MEdS37WehcKWR8kc="
)
DOVECOT_CRAM_MD5 = (
    "{CRAM-MD5}9186d855e11eba527a7a52ca82b313e180d62234f0acc9051b527243d41e2740"
)
HASHED = hash_password(b"secret", "SHA512-CRYPT", rounds=1000)

EVERYONE = f"""\
alice:{{PLAIN}}secret
bob:{hash_password(b"bobpass", "SCRAM-SHA-256")}
carol:{hash_password(b"carolpass", "SCRAM-SHA-1")}
dave:{hash_password(b"davepass", "CRAM-MD5")}
erin:{HASHED}
frank:{DOVECOT_SCRAM_SHA_256}
grace:{DOVECOT_SCRAM_SHA_1}
heidi:{DOVECOT_CRAM_MD5}
ivan:{{PLAIN}}secret::::::nologin
"""

ALL = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN")
FAILED = b"-ERR [AUTH] Authentication failed.\r\n"


def plain(authzid: bytes, user: bytes, password: bytes) -> bytes:
    return base64.b64encode(authzid + b"\0" + user + b"\0" + password)


def logged_in(reply: bytes) -> bool:
    return reply.startswith(b"+OK Logged in")


@pytest.fixture
def checker(tmp_path):
    return passwd_checker(tmp_path / "passwd", EVERYONE)


@pytest.fixture
def factory(checker):
    return make_factory(checker, plaintext="always", max_auth_failures=100)


@pytest.fixture
def session(factory):
    return Session(factory)


# What is offered


def test_everything_usable_is_offered_strongest_first(session):
    expected = b"SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN"
    assert sasl_line(session) == expected
    assert auth_list(session) == expected


def test_plaintext_mechanisms_only_after_tls_or_from_trusted_networks(checker):
    factory = make_factory(checker)
    untrusted = Session(factory, UNTRUSTED)
    assert sasl_line(untrusted) == b"SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5"
    assert auth_list(untrusted) == b"SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5"
    assert untrusted.line(b"STLS").startswith(b"+OK")
    assert sasl_line(untrusted) == " ".join(ALL).encode()
    assert sasl_line(Session(factory, LOOPBACK)) == " ".join(ALL).encode()


@pytest.mark.parametrize("mechanism", [b"PLAIN", b"LOGIN"])
def test_plaintext_mechanism_refused_before_tls(checker, mechanism):
    session = Session(make_factory(checker), UNTRUSTED)
    reply = session.line(b"AUTH " + mechanism)
    assert reply.startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    assert session.line(b"NOOP").startswith(b"-ERR")  # still AUTHORIZATION


@pytest.mark.parametrize(
    "users, offered, apop",
    [
        # Only hashes: nothing needs more than a password.
        (f"erin:{HASHED}\n", b"PLAIN LOGIN", False),
        # A plaintext serves everything.
        ("alice:{PLAIN}secret\n", " ".join(ALL).encode(), True),
        (f"frank:{DOVECOT_SCRAM_SHA_256}\n", b"SCRAM-SHA-256 PLAIN LOGIN", False),
        (f"grace:{DOVECOT_SCRAM_SHA_1}\n", b"SCRAM-SHA-1 PLAIN LOGIN", False),
        (f"heidi:{DOVECOT_CRAM_MD5}\n", b"CRAM-MD5 PLAIN LOGIN", False),
        # A user who may not log in does not count.
        ("ivan:{PLAIN}secret::::::nologin\n", b"PLAIN LOGIN", False),
        ("", b"PLAIN LOGIN", False),
    ],
)
def test_offered_after_what_the_passwd_file_holds(tmp_path, users, offered, apop):
    checker = passwd_checker(tmp_path / "passwd", users)
    factory = make_factory(checker, plaintext="always", apop=True)
    session = Session(factory)
    assert sasl_line(session) == offered
    assert auth_list(session) == offered
    assert bool(re.search(rb"<[^>]+@pop\.example>", session.greeting)) is apop


def test_what_is_offered_follows_the_file(tmp_path, monkeypatch):
    path = tmp_path / "passwd"
    checker = passwd_checker(path, f"erin:{HASHED}\n")
    factory = make_factory(checker, plaintext="always")
    assert sasl_line(Session(factory)) == b"PLAIN LOGIN"
    path.write_text(f"erin:{HASHED}\nalice:{{PLAIN}}secret\n")
    # The answer is refreshed (in the "thread pool") once it is stale.
    monkeypatch.setattr("popd.auth.passwdfile.KINDS_MAX_AGE", -1)
    sasl_line(Session(factory))
    assert sasl_line(Session(factory)) == " ".join(ALL).encode()


def test_configured_mechanisms_and_order(checker):
    mechanisms = sasl.registry.select(["PLAIN", "SCRAM-SHA-1"])
    session = Session(make_factory(checker, mechanisms, plaintext="always"))
    assert sasl_line(session) == b"PLAIN SCRAM-SHA-1"
    assert session.line(b"AUTH CRAM-MD5") == (
        b"-ERR Unsupported authentication mechanism.\r\n"
    )


def test_unusable_mechanism_is_refused_like_an_unknown_one(tmp_path):
    checker = passwd_checker(tmp_path / "passwd", f"erin:{HASHED}\n")
    session = Session(make_factory(checker, plaintext="always"))
    for name in (b"CRAM-MD5", b"SCRAM-SHA-256", b"EXTERNAL", b"X-NONE"):
        assert session.line(b"AUTH " + name) == (
            b"-ERR Unsupported authentication mechanism.\r\n"
        )


def test_no_sasl_line_when_nothing_is_usable(tmp_path):
    checker = passwd_checker(tmp_path / "passwd", f"erin:{HASHED}\n")
    session = Session(make_factory(checker), UNTRUSTED)
    assert sasl_line(session) is None
    assert auth_list(session) == b""


def test_a_checker_without_usable_answer_is_taken_at_its_word():
    # Twisted's in-memory checker lists IUsernameHashedPassword: it knows
    # plaintexts, so CRAM-MD5 works with it; it cannot give SCRAM secrets.
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
    session = Session(make_factory(checker, plaintext="always"))
    assert sasl_line(session) == b"CRAM-MD5 PLAIN LOGIN"
    challenge = session.challenge(session.line(b"AUTH CRAM-MD5"))
    digest = hmac.new(b"secret", challenge, hashlib.md5).hexdigest().encode()
    assert logged_in(session.respond(b"alice " + digest))


# PLAIN


def test_plain_initial_response(session):
    assert logged_in(session.line(b"AUTH PLAIN " + plain(b"", b"alice", b"secret")))


def test_plain_continuation(session):
    assert session.line(b"AUTH PLAIN") == b"+ \r\n"
    assert logged_in(session.line(plain(b"", b"alice", b"secret")))


def test_plain_with_its_own_authzid(session):
    reply = session.line(b"AUTH PLAIN " + plain(b"alice", b"alice", b"secret"))
    assert logged_in(reply)


def test_plain_against_every_stored_scheme(checker):
    for user, password in [
        (b"bob", b"bobpass"),
        (b"carol", b"carolpass"),
        (b"dave", b"davepass"),
        (b"erin", b"secret"),
        (b"frank", b"password"),
        (b"grace", b"password"),
        (b"heidi", b"password"),
    ]:
        session = Session(make_factory(checker, plaintext="always"))
        reply = session.line(b"AUTH PLAIN " + plain(b"", user, password))
        assert logged_in(reply), (user, reply)
        session = Session(make_factory(checker, plaintext="always"))
        reply = session.line(b"AUTH PLAIN " + plain(b"", user, password + b"x"))
        assert reply == FAILED, user


@pytest.mark.parametrize(
    "response, error",
    [
        (b"=", b"Malformed PLAIN response."),
        (base64.b64encode(b"alice\0secret"), b"Malformed PLAIN response."),
        (base64.b64encode(b"\0\0secret"), b"Malformed PLAIN response."),
        (b"!!!", b"Invalid base64 data in SASL response."),
        (b"YWJj", b"Malformed PLAIN response."),
        (
            plain(b"bob", b"alice", b"secret"),
            b"Authorization identity must match the user.",
        ),
    ],
)
def test_plain_malformed_or_refused(session, response, error):
    assert session.line(b"AUTH PLAIN " + response) == b"-ERR [AUTH] " + error + b"\r\n"
    # The session goes on.
    assert logged_in(session.line(b"AUTH PLAIN " + plain(b"", b"alice", b"secret")))


def test_unknown_user_and_wrong_password_look_the_same(session):
    wrong = session.line(b"AUTH PLAIN " + plain(b"", b"alice", b"wrong"))
    unknown = session.line(b"AUTH PLAIN " + plain(b"", b"nobody", b"secret"))
    nologin = session.line(b"AUTH PLAIN " + plain(b"", b"ivan", b"secret"))
    assert wrong == unknown == nologin == FAILED


# LOGIN


def test_login_mechanism(session):
    assert session.challenge(session.line(b"AUTH LOGIN")) == b"Username:"
    assert session.challenge(session.respond(b"alice")) == b"Password:"
    assert logged_in(session.respond(b"secret"))


def test_login_with_initial_user_name(session):
    reply = session.line(b"AUTH LOGIN " + base64.b64encode(b"alice"))
    assert session.challenge(reply) == b"Password:"
    assert logged_in(session.respond(b"secret"))


def test_login_wrong_password_and_empty_user(session):
    session.line(b"AUTH LOGIN")
    session.respond(b"alice")
    assert session.respond(b"nope") == FAILED
    session.line(b"AUTH LOGIN")
    assert session.line(b"") == b"-ERR [AUTH] Malformed LOGIN user name.\r\n"
    assert session.line(b"AUTH LOGIN =") == (
        b"-ERR [AUTH] Malformed LOGIN user name.\r\n"
    )


# CRAM-MD5


def cram(session: Session, user: bytes, password: bytes) -> bytes:
    challenge = session.challenge(session.line(b"AUTH CRAM-MD5"))
    assert re.fullmatch(rb"<[^@>]+@pop\.example>", challenge)
    digest = hmac.new(password, challenge, hashlib.md5).hexdigest().encode()
    return session.respond(user + b" " + digest)


@pytest.mark.parametrize(
    "user, password",
    [(b"alice", b"secret"), (b"dave", b"davepass"), (b"heidi", b"password")],
)
def test_cram_md5_with_plaintext_and_stored_contexts(session, user, password):
    assert logged_in(cram(session, user, password))


@pytest.mark.parametrize(
    "user, password",
    [
        (b"alice", b"wrong"),
        (b"heidi", b"wrong"),
        (b"erin", b"secret"),  # only a hash: CRAM-MD5 cannot work for erin
        (b"bob", b"bobpass"),  # only SCRAM secrets
        (b"nobody", b"secret"),
        (b"ivan", b"secret"),
    ],
)
def test_cram_md5_refusals_look_the_same(session, user, password):
    assert cram(session, user, password) == FAILED


def test_cram_md5_challenges_differ(session):
    first = session.line(b"AUTH CRAM-MD5")
    session.line(b"*")
    assert session.line(b"AUTH CRAM-MD5") != first


def test_cram_md5_malformed(session):
    assert session.line(b"AUTH CRAM-MD5 " + base64.b64encode(b"x")) == (
        b"-ERR [AUTH] CRAM-MD5 takes no initial response.\r\n"
    )
    session.line(b"AUTH CRAM-MD5")
    assert session.respond(b"alice nothex") == (
        b"-ERR [AUTH] Malformed CRAM-MD5 response.\r\n"
    )
    session.line(b"AUTH CRAM-MD5")
    assert session.line(b"") == b"-ERR [AUTH] Malformed CRAM-MD5 response.\r\n"


def test_cram_md5_uppercase_hex_accepted(session):
    challenge = session.challenge(session.line(b"AUTH CRAM-MD5"))
    digest = hmac.new(b"secret", challenge, hashlib.md5).hexdigest().upper()
    assert logged_in(session.respond(b"alice " + digest.encode()))


# SCRAM


def scram_login(
    session: Session,
    algorithm: str,
    user: str,
    password: bytes,
    initial: bool = True,
    proof_password: bytes | None = None,
) -> tuple[ScramClient, bytes]:
    """
    A whole SCRAM exchange; returns the client and the server's last reply.
    """
    client = ScramClient(algorithm, user, password)
    command = b"AUTH SCRAM-" + algorithm.encode()
    if initial:
        reply = session.line(command + b" " + base64.b64encode(client.first()))
    else:
        assert session.line(command) == b"+ \r\n"
        reply = session.respond(client.first())
    server_first = session.challenge(reply)
    reply = session.respond(client.final(server_first, proof_password))
    if reply.startswith(b"-ERR"):
        return client, reply
    server_final = session.challenge(reply)
    assert client.verify(server_final), server_final
    return client, session.line(b"")


@pytest.mark.parametrize("initial", [True, False])
@pytest.mark.parametrize(
    "algorithm, user, password",
    [
        ("SHA-256", "alice", b"secret"),  # derived from {PLAIN}
        ("SHA-1", "alice", b"secret"),
        ("SHA-256", "bob", b"bobpass"),  # popd's {SCRAM-SHA-256}
        ("SHA-1", "carol", b"carolpass"),
        ("SHA-256", "frank", b"password"),  # Dovecot's own secrets
        ("SHA-1", "grace", b"password"),
    ],
)
def test_scram_logs_in(session, algorithm, user, password, initial):
    client, reply = scram_login(session, algorithm, user, password, initial)
    assert logged_in(reply), reply
    assert client.iterations == 4096 and len(client.salt) == 16
    assert session.protocol.state == "TRANSACTION"


def test_scram_server_signature_comes_as_a_challenge_before_ok(session):
    client = ScramClient("SHA-256", "alice", b"secret")
    reply = session.line(b"AUTH SCRAM-SHA-256 " + base64.b64encode(client.first()))
    reply = session.respond(client.final(session.challenge(reply)))
    # RFC 5034 section 4: "+ v=..." then the client's empty line, then +OK.
    assert reply.startswith(b"+ ") and b"+OK" not in reply
    assert session.challenge(reply).startswith(b"v=")
    assert session.protocol.state == "AUTHORIZATION"
    assert session.factory.provider.is_locked("alice")
    assert logged_in(session.line(b""))


@pytest.mark.parametrize("answer", [b"*", b"dGhpcyBpcyBub3QgZW1wdHk="])
def test_scram_client_refusing_the_server_unlocks(session, answer):
    client = ScramClient("SHA-256", "alice", b"secret")
    reply = session.line(b"AUTH SCRAM-SHA-256 " + base64.b64encode(client.first()))
    session.respond(client.final(session.challenge(reply)))
    assert session.factory.provider.is_locked("alice")
    reply = session.line(answer)
    assert reply.startswith(b"-ERR")
    assert not session.factory.provider.is_locked("alice")
    assert session.protocol.state == "AUTHORIZATION"
    _client, reply = scram_login(session, "SHA-256", "alice", b"secret")
    assert logged_in(reply)


def test_scram_connection_lost_before_the_last_answer_unlocks(session):
    client = ScramClient("SHA-1", "alice", b"secret")
    reply = session.line(b"AUTH SCRAM-SHA-1 " + base64.b64encode(client.first()))
    session.respond(client.final(session.challenge(reply)))
    assert session.factory.provider.is_locked("alice")
    session.lost()
    assert not session.factory.provider.is_locked("alice")


def test_scram_overlong_last_answer_unlocks(session):
    client = ScramClient("SHA-1", "alice", b"secret")
    reply = session.line(b"AUTH SCRAM-SHA-1 " + base64.b64encode(client.first()))
    session.respond(client.final(session.challenge(reply)))
    reply = session.line(b"A" * (MAX_BUFFERED_LINE + 10))
    assert reply.startswith(b"-ERR [AUTH] SASL response too long")
    assert not session.factory.provider.is_locked("alice")


@pytest.mark.parametrize(
    "algorithm, user, password",
    [
        ("SHA-256", "alice", b"wrong"),
        ("SHA-256", "frank", b"wrong"),
        ("SHA-1", "grace", b"wrong"),
        ("SHA-256", "nobody", b"secret"),
        ("SHA-256", "erin", b"secret"),  # only a hash: no SCRAM secret
        ("SHA-1", "bob", b"bobpass"),  # a SHA-256 secret only
        ("SHA-256", "ivan", b"secret"),  # nologin
    ],
)
def test_scram_refusals_look_the_same(session, algorithm, user, password):
    client, reply = scram_login(session, algorithm, user, password)
    assert reply == FAILED
    assert client.iterations == 4096 and len(client.salt) == 16


def salt_of(factory, user: str, algorithm: str = "SHA-256") -> bytes:
    session = Session(factory)
    client = ScramClient(algorithm, user, b"x")
    reply = session.line(
        b"AUTH SCRAM-" + algorithm.encode() + b" " + base64.b64encode(client.first())
    )
    client.final(session.challenge(reply))
    return client.salt


def test_scram_salts_do_not_reveal_who_exists(factory):
    # An unknown user's salt is made up but stable, like that of a user
    # whose keys are derived from a plaintext password.
    assert salt_of(factory, "nobody") == salt_of(factory, "nobody")
    assert salt_of(factory, "NoBody") == salt_of(factory, "nobody")
    assert salt_of(factory, "nobody") != salt_of(factory, "somebody")
    assert salt_of(factory, "alice") == salt_of(factory, "alice")
    assert salt_of(factory, "alice") == scram.stable_salt("alice")
    # A stored secret's salt is its own.
    stored = DOVECOT_SCRAM_SHA_256.split(",")[1]
    assert salt_of(factory, "frank") == base64.b64decode(stored)


def test_scram_unknown_user_costs_a_lookup_like_a_known_one(checker, factory):
    pool = checker._threadpool
    before = pool.calls
    scram_login(Session(factory), "SHA-256", "nobody", b"x")
    unknown = pool.calls - before
    before = pool.calls
    scram_login(Session(factory), "SHA-256", "alice", b"x")
    assert pool.calls - before == unknown == 2  # the secret, then the check


def test_scram_with_authzid(session):
    client = ScramClient("SHA-256", "alice", b"secret", authzid="alice")
    reply = session.line(b"AUTH SCRAM-SHA-256 " + base64.b64encode(client.first()))
    reply = session.respond(client.final(session.challenge(reply)))
    assert client.verify(session.challenge(reply))
    assert logged_in(session.line(b""))
    other = ScramClient("SHA-256", "alice", b"secret", authzid="bob")
    session = Session(session.factory)
    assert session.line(b"AUTH SCRAM-SHA-256 " + base64.b64encode(other.first())) == (
        b"-ERR [AUTH] Authorization identity must match the user.\r\n"
    )


def test_scram_client_flag_y_is_accepted(session):
    client = ScramClient("SHA-256", "alice", b"secret", flag="y")
    reply = session.line(b"AUTH SCRAM-SHA-256 " + base64.b64encode(client.first()))
    reply = session.respond(client.final(session.challenge(reply)))
    assert client.verify(session.challenge(reply))
    assert logged_in(session.line(b""))


def test_scram_user_name_escapes(tmp_path):
    checker = passwd_checker(tmp_path / "passwd", "a=b:{PLAIN}pw\n")
    session = Session(make_factory(checker, plaintext="always"))
    client = ScramClient("SHA-256", "a=b", b"pw")
    assert b"n=a=3Db," in client.first()
    reply = session.line(b"AUTH SCRAM-SHA-256 " + base64.b64encode(client.first()))
    reply = session.respond(client.final(session.challenge(reply)))
    assert client.verify(session.challenge(reply))
    assert logged_in(session.line(b""))


@pytest.mark.parametrize(
    "first, error",
    [
        (
            b"p=tls-unique,,n=alice,r=abc",
            b"SCRAM channel binding is not supported here.",
        ),
        (b"n,,m=ext,n=alice,r=abc", b"Unsupported mandatory SCRAM extension."),
        (b"x,,n=alice,r=abc", b"Malformed SCRAM message."),
        (b"n,,n=alice", b"Malformed SCRAM message."),
        (b"n,,r=abc,n=alice", b"Malformed SCRAM message."),
        (b"n,,n=,r=abc", b"Malformed SCRAM user name."),
        (b"n,,n=a=2Xb,r=abc", b"Malformed SCRAM user name."),
        (b"n,,n=alice,r=a\x7fc", b"Malformed SCRAM nonce."),
        (b"n,,n=alice,r=", b"Malformed SCRAM nonce."),
        (b"n,b=x,n=alice,r=abc", b"Malformed SCRAM message."),
        (b"n,,n=\xff,r=abc", b"Malformed SCRAM message."),
        (b"", b"Malformed SCRAM message."),
    ],
)
def test_scram_malformed_client_first(session, first, error):
    reply = session.line(b"AUTH SCRAM-SHA-256 " + (base64.b64encode(first) or b"="))
    assert reply == b"-ERR [AUTH] " + error + b"\r\n"
    assert session.protocol.state == "AUTHORIZATION"


def _nonce_of(server_first: bytes) -> bytes:
    return dict(f.split(b"=", 1) for f in server_first.split(b","))[b"r"]


@pytest.mark.parametrize(
    "spoil, error",
    [
        (
            lambda final, nonce: final.replace(nonce, nonce + b"x"),
            b"SCRAM nonce does not match.",
        ),
        (
            lambda final, nonce: final.replace(b"c=biws", b"c=eSws"),
            b"SCRAM channel binding data does not match.",
        ),
        (lambda final, nonce: final.split(b",p=")[0], b"Malformed SCRAM message."),
        (
            lambda final, nonce: final.split(b",p=")[0] + b",p=!!",
            b"Malformed SCRAM proof.",
        ),
        (lambda final, nonce: b"c=biws,p=AAAA", b"Malformed SCRAM message."),
        (lambda final, nonce: final + b"\xff", b"Malformed SCRAM message."),
    ],
)
def test_scram_malformed_client_final(session, spoil, error):
    client = ScramClient("SHA-256", "alice", b"secret")
    reply = session.line(b"AUTH SCRAM-SHA-256 " + base64.b64encode(client.first()))
    server_first = session.challenge(reply)
    bad = spoil(client.final(server_first), _nonce_of(server_first))
    assert session.respond(bad) == b"-ERR [AUTH] " + error + b"\r\n"
    assert session.protocol.state == "AUTHORIZATION"


def test_scram_proof_of_the_wrong_size_is_simply_wrong(session):
    client = ScramClient("SHA-256", "alice", b"secret")
    reply = session.line(b"AUTH SCRAM-SHA-256 " + base64.b64encode(client.first()))
    bad = client.final(session.challenge(reply)).split(b",p=")[0] + b",p=AAAA"
    assert session.respond(bad) == FAILED


def test_scram_against_the_rfc_7677_example(monkeypatch):
    """
    The exact exchange of RFC 7677 section 3, with its nonce and salt.
    """
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    secret = scram.derive_secret(b"pencil", "SHA-256", salt, 4096)

    @implementer(IScramSecretSource)
    class Source:
        def scram_secret(self, username, algorithm):
            assert (username, algorithm) == (b"user", "SHA-256")
            return defer.succeed(secret)

    monkeypatch.setattr(
        "popd.sasl.scram.server_nonce", lambda: "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    )
    context = sasl.SASLContext(secure=True, plaintext_allowed=True, portal=None)
    exchange = sasl.registry.get("SCRAM-SHA-256").start(context)
    exchange.source = Source()
    results = []
    exchange.step(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO").addCallback(results.append)
    assert results == [
        sasl.Challenge(
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
            b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        )
    ]
    credentials = exchange.step(
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    assert IScramSHA256Credentials.providedBy(credentials)
    assert credentials.checkSecret(secret)
    assert not credentials.checkSecret(scram.derive_secret(b"pencil", "SHA-256"))
    assert exchange.success_data() == (
        b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    )


def test_scram_against_the_rfc_5802_example(monkeypatch):
    salt = base64.b64decode("QSXCR+Q6sek8bf92")
    secret = scram.derive_secret(b"pencil", "SHA-1", salt, 4096)

    @implementer(IScramSecretSource)
    class Source:
        def scram_secret(self, username, algorithm):
            return secret  # a plain value is fine too

    monkeypatch.setattr("popd.sasl.scram.server_nonce", lambda: "3rfcNHYJY1ZVvWVs7j")
    context = sasl.SASLContext(secure=True, plaintext_allowed=True, portal=None)
    exchange = sasl.registry.get("SCRAM-SHA-1").start(context)
    exchange.source = Source()
    results = []
    exchange.step(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL").addCallback(results.append)
    assert results[0].data == (
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
    )
    credentials = exchange.step(
        b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,"
        b"p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
    )
    assert credentials.checkSecret(secret)
    assert exchange.success_data() == b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="


def test_scram_with_folder_suffix(checker):
    provider = make_factory(checker).provider
    provider.deliver("alice", b"Subject: archived\r\n\r\nold\r\n", folder="Archive")
    factory = make_factory(checker, provider=provider, plaintext="always")
    session = Session(factory)
    _client, reply = scram_login(session, "SHA-256", "alice#Archive", b"secret")
    assert reply == b"+OK Logged in, 1 messages (26 octets).\r\n"
    assert provider.is_locked("alice", "Archive")


class FailingSource:
    """
    A checker whose user database is down.
    """

    credentialInterfaces = (IScramSHA256Credentials,)

    def requestAvatarId(self, credentials):
        return defer.fail(AuthUnavailable("database down"))

    def scram_secret(self, username, algorithm):
        return defer.fail(AuthUnavailable("database down"))


def test_scram_secret_lookup_failure_is_sys_temp():
    checker = implementer(IScramSecretSource)(FailingSource)()
    session = Session(make_factory(checker))
    assert sasl_line(session) == b"SCRAM-SHA-256"
    client = ScramClient("SHA-256", "alice", b"secret")
    reply = session.line(b"AUTH SCRAM-SHA-256 " + base64.b64encode(client.first()))
    assert reply == (b"-ERR [SYS/TEMP] Authentication is temporarily unavailable.\r\n")
    assert session.line(b"QUIT") == b"+OK Logging out.\r\n"


def test_scram_secret_lookup_crash_is_logged_and_sys_temp():
    class Broken(FailingSource):
        def scram_secret(self, username, algorithm):
            raise RuntimeError("bug")

    session = Session(make_factory(implementer(IScramSecretSource)(Broken)()))
    client = ScramClient("SHA-256", "alice", b"secret")
    reply = session.line(b"AUTH SCRAM-SHA-256 " + base64.b64encode(client.first()))
    assert reply.startswith(b"-ERR [SYS/TEMP]")
    assert session.protocol.state == "AUTHORIZATION"


# What every exchange shares


@pytest.mark.parametrize(
    "command",
    [b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH CRAM-MD5", b"AUTH SCRAM-SHA-256"],
)
def test_cancel_at_the_first_challenge(session, command):
    assert session.line(command).startswith(b"+ ")
    assert session.line(b"*") == b"-ERR Authentication cancelled.\r\n"
    assert logged_in(session.line(b"AUTH PLAIN " + plain(b"", b"alice", b"secret")))


def test_cancel_later_in_the_exchange(session):
    session.line(b"AUTH LOGIN")
    session.respond(b"alice")
    assert session.line(b"*") == b"-ERR Authentication cancelled.\r\n"
    client = ScramClient("SHA-1", "alice", b"secret")
    session.line(b"AUTH SCRAM-SHA-1 " + base64.b64encode(client.first()))
    assert session.line(b"*") == b"-ERR Authentication cancelled.\r\n"
    assert session.protocol.state == "AUTHORIZATION"


def test_cancel_as_initial_response(session):
    assert session.line(b"AUTH PLAIN *") == b"-ERR Authentication cancelled.\r\n"


@pytest.mark.parametrize(
    "command", [b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH CRAM-MD5", b"AUTH SCRAM-SHA-1"]
)
def test_malformed_base64_in_a_continuation(session, command):
    session.line(command)
    assert session.line(b"not base64!") == (
        b"-ERR [AUTH] Invalid base64 data in SASL response.\r\n"
    )
    # "=" is the empty response, which no mechanism takes here.
    session.line(command)
    assert session.line(b"=").startswith(b"-ERR [AUTH]")
    assert logged_in(session.line(b"AUTH PLAIN " + plain(b"", b"alice", b"secret")))


def test_long_responses_are_fine_overlong_ones_refused(session):
    # RFC 5034: responses may be longer than 255 octets.
    long_password = b"p" * 5000
    reply = session.line(b"AUTH PLAIN " + plain(b"", b"alice", long_password))
    assert reply == FAILED
    session.line(b"AUTH PLAIN")
    reply = session.line(b"A" * (MAX_BUFFERED_LINE + 100))
    assert reply == (
        b"-ERR [AUTH] SASL response too long (over %d octets).\r\n" % MAX_BUFFERED_LINE
    )
    assert session.protocol.state == "AUTHORIZATION"
    assert logged_in(session.line(b"AUTH PLAIN " + plain(b"", b"alice", b"secret")))


def test_long_initial_response(session):
    # RFC 2449's 255 octets per command do not apply to an initial response.
    reply = session.line(b"AUTH PLAIN " + plain(b"", b"alice", b"p" * 300))
    assert reply == FAILED
    assert session.line(b"AUTH " + b"X" * 300) == b"-ERR Command line too long.\r\n"
    reply = session.line(b"AUTH PLAIN " + b"A" * (MAX_BUFFERED_LINE + 10))
    assert reply == b"-ERR Command line too long.\r\n"


def test_sasl_failures_count_towards_the_limit(checker):
    session = Session(make_factory(checker, plaintext="always"))
    session.line(b"AUTH PLAIN !!!")
    session.line(b"AUTH PLAIN " + plain(b"", b"alice", b"wrong"))
    reply = session.line(b"AUTH CRAM-MD5 " + base64.b64encode(b"x"))
    assert reply.endswith(b"-ERR [AUTH] Too many authentication failures.\r\n")
    assert session.transport.disconnecting


def test_auth_in_transaction_is_refused(session):
    session.line(b"AUTH PLAIN " + plain(b"", b"alice", b"secret"))
    assert session.line(b"AUTH PLAIN") == b"-ERR AUTH is not valid in this state.\r\n"


def test_pipelined_exchange(session):
    client = ScramClient("SHA-256", "alice", b"secret")
    reply = session.send(
        b"CAPA\r\nAUTH SCRAM-SHA-256 " + base64.b64encode(client.first()) + b"\r\n"
    )
    server_first = session.challenge(reply[reply.index(b"+ ") :])
    reply = session.respond(client.final(server_first))
    assert client.verify(session.challenge(reply))
    reply = session.send(b"\r\nSTAT\r\n")
    assert reply.startswith(b"+OK Logged in") and reply.endswith(b"+OK 0 0\r\n")


# Through a chain of checkers, as the service builds its portal


def test_through_a_checker_chain(tmp_path):
    from popd.auth.chain import CheckerChain

    hashed = passwd_checker(tmp_path / "hashed", f"erin:{HASHED}\n")
    plain_users = passwd_checker(
        tmp_path / "plain", f"alice:{{PLAIN}}secret\nfrank:{DOVECOT_SCRAM_SHA_256}\n"
    )
    chain = CheckerChain([hashed, plain_users])
    factory = make_factory(chain, plaintext="always")
    session = Session(factory)
    assert sasl_line(session) == " ".join(ALL).encode()
    # The second checker's secrets serve SCRAM; the first has none.
    for user, password in (("alice", b"secret"), ("frank", b"password")):
        _client, reply = scram_login(Session(factory), "SHA-256", user, password)
        assert logged_in(reply), (user, reply)
    _client, reply = scram_login(Session(factory), "SHA-256", "erin", b"secret")
    assert reply == FAILED
    fresh = make_factory(chain, plaintext="always")
    assert logged_in(cram(Session(fresh), b"alice", b"secret"))
    only_hashes = make_factory(CheckerChain([hashed]), plaintext="always")
    assert sasl_line(Session(only_hashes)) == b"PLAIN LOGIN"
