"""
Fuzzing the SASL mechanisms' message parsing (PLAIN, LOGIN, CRAM-MD5,
SCRAM-SHA-1, SCRAM-SHA-256, EXTERNAL) and the base64 decoding of
responses: whatever a client sends, an exchange step gives a challenge or
credentials, or refuses with L{SASLError}; the credentials it gives are
answered by a real passwd-file checker with a login or
L{UnauthorizedLogin}; nothing else is ever raised.

Responses are random bytes, and messages built from the grammar of each
mechanism with random (often wrong) parts: unknown and empty names, bad
escapes, NULs, wrong nonces, bad proofs, and now and then a correct one,
so that the success path is fuzzed too.

Budget: the C{ci} profile (the default) runs a few hundred exchanges;
C{POPD_HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz_sasl.py}
many thousands.
"""

from __future__ import annotations

import base64
import datetime
import hmac

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers.pop3_wire import hypothesis_settings, weighted
from helpers.sasl_session import passwd_checker
from helpers.scram_client import ScramClient
from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from zope.interface import implementer, providedBy

from popd import sasl
from popd.auth.credentials import ICertificateCredentials
from popd.auth.schemes import hash_password
from popd.interfaces import IMaildrop, MaildropError
from popd.realm import LoginRequest, MaildropRealm
from popd.testing import MemoryMaildropProvider

SETTINGS = hypothesis_settings(ci={"max_examples": 150}, long={"max_examples": 5000})

USERS = f"""\
alice:{{PLAIN}}secret
bob:{hash_password(b"bobpass", "SCRAM-SHA-256")}
carol:{hash_password(b"carolpass", "SCRAM-SHA-1")}
dave:{hash_password(b"davepass", "CRAM-MD5")}
ivan:{{PLAIN}}secret::::::nologin
"""
PASSWORDS = {b"alice": b"secret", b"bob": b"bobpass", b"carol": b"carolpass"}
PASSWORDS |= {b"dave": b"davepass", b"ivan": b"secret"}
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256", "EXTERNAL")


def _client_certificate() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name("alice@example.org")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> sasl.SASLContext:
    """
    A session's SASL context: TLS with a client certificate for alice, a
    portal with a passwd-file checker (its hashing done at once, on this
    thread) and an in-memory store.
    """
    path = tmp_path_factory.mktemp("sasl-fuzz") / "passwd"
    checker = passwd_checker(path, USERS)
    portal = Portal(MaildropRealm(MemoryMaildropProvider()), [checker])
    portal.registerChecker(CertificateChecker())
    return sasl.SASLContext(
        secure=True,
        plaintext_allowed=True,
        portal=portal,
        peer_certificate=_client_certificate(),
        hostname="pop.example",
        folder_separator="#",
    )


@implementer(ICredentialsChecker)
class CertificateChecker:
    """
    EXTERNAL's credentials need a checker of their own: this one accepts
    whoever the certificate names (the checker is not what is fuzzed).
    """

    credentialInterfaces = (ICertificateCredentials,)

    def requestAvatarId(self, credentials):
        return succeed(credentials.username)


# What clients send


# Mostly users who exist: a name nobody has costs the checker a dummy
# ARGON2 verification (a second), to take as long as a wrong password.
names = weighted(
    (12, st.sampled_from([b"alice", b"bob", b"carol", b"dave", b"ivan", b"ALICE"])),
    (2, st.sampled_from([b"alice#Archive", b"alice#", b"bob#x"])),
    (1, st.sampled_from([b"", b"nobody", b"a\xffb", b"alice\0"])),
    (1, st.binary(max_size=20)),
)
secrets = weighted(
    (3, st.sampled_from(list(PASSWORDS.values()))), (1, st.binary(max_size=20))
)
raw = st.one_of(st.binary(max_size=120), st.text(max_size=60).map(str.encode))


def plain_responses():
    fields = st.lists(st.one_of(names, secrets), min_size=1, max_size=4)
    well_formed = st.tuples(st.sampled_from(["", "same", "other"]), names, secrets).map(
        lambda t: (
            ({"": b"", "same": t[1], "other": b"alice"}[t[0]] + b"\0" + t[1] + b"\0")
            + t[2]
        )
    )
    return weighted((1, raw), (1, fields.map(b"\0".join)), (3, well_formed))


def cram_responses(challenge: bytes):
    def correct(name: bytes) -> bytes:
        key = PASSWORDS.get(name.lower(), b"wrong")
        return name + b" " + hmac.new(key, challenge, "md5").hexdigest().encode()

    digests = st.one_of(
        st.binary(min_size=16, max_size=16).map(lambda b: b.hex().encode()),
        st.text("0123456789abcdefABCDEFxyz ", max_size=40).map(str.encode),
    )
    return weighted(
        (1, raw),
        (1, st.tuples(names, digests).map(b" ".join)),
        (3, names.map(correct)),
    )


_escape_junk = st.sampled_from(["", "=2C", "=3D", "=", "=2", "=ZZ", ",", "\u00e9"])
scram_names = st.one_of(
    st.sampled_from(["alice", "bob", "carol", "nobody", "alice#Archive", ""]),
    st.tuples(st.sampled_from(["alice", "bob", ""]), _escape_junk).map("".join),
    st.text(max_size=12),
)


def scram_first():
    flags = st.sampled_from(["n", "y", "p=tls-unique", "x", "", "n "])
    authzids = st.one_of(
        st.sampled_from(["", "a=alice", "a=bob", "a=", "a==2C", "a=nobody"]),
        st.text(max_size=8),
    )
    users = st.one_of(scram_names.map(lambda n: "n=" + n), st.just("m=ext"))
    nonces = st.one_of(
        st.sampled_from(["r=abc", "r=", "r=a,b", "r=\u00e9", "r=" + "x" * 500]),
        st.text(max_size=10).map(lambda t: "r=" + t),
    )
    extras = st.lists(st.sampled_from(["", "e=1", "x", "r=again"]), max_size=2)
    structured = st.tuples(flags, authzids, users, nonces, extras).map(
        lambda parts: ",".join([*parts[:4], *parts[4]]).encode()
    )
    correct = st.tuples(
        st.sampled_from(["alice", "bob", "carol"]), st.sampled_from(["", "same"])
    )
    return weighted((1, raw), (2, structured), (2, correct))


def scram_final(algorithm: str, client: ScramClient | None, server_first: bytes):
    text = server_first.decode("utf-8", "replace")
    fields = dict(item.split("=", 1) for item in text.split(",") if "=" in item)
    nonce = fields.get("r", "")
    bindings = st.sampled_from(["c=biws", "c=eSws", "c=", "c=!!", "x=biws"])
    nonces = st.sampled_from([f"r={nonce}", "r=", f"r={nonce}x", "r=other"])
    proofs = st.one_of(
        st.binary(max_size=40).map(lambda b: "p=" + base64.b64encode(b).decode()),
        st.sampled_from(["p=", "p=!!", "p=AAAA=", ""]),
    )
    extras = st.lists(st.sampled_from(["e=1", "", "p=AA=="]), max_size=2)
    structured = st.tuples(bindings, nonces, extras, proofs).map(
        lambda parts: ",".join([parts[0], parts[1], *parts[2], parts[3]]).encode()
    )
    if client is None:
        return st.one_of(raw, structured)
    # client.final() remembers the signature it expects back: call it only
    # for the message that is sent.
    return weighted(
        (1, raw),
        (1, structured),
        (3, st.builds(lambda: client.final(server_first))),
        (1, st.builds(lambda: client.final(server_first, b"not the password"))),
    )


def external_responses():
    return st.one_of(
        raw,
        st.sampled_from([b"", b"alice", b"alice@example.org", b"bob", b"\xff"]),
    )


# Running exchanges


def resolve(result):
    """
    The result of a L{Deferred} that must have fired already (everything
    here runs at once), or C{result} itself.
    """
    if not isinstance(result, Deferred):
        return result
    outcome: list = []
    result.addBoth(outcome.append)
    assert outcome, "a Deferred that never fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def first_response(name: str, data):
    """
    The first response (C{None}: AUTH without an initial response), and a
    SCRAM client when a correct exchange was chosen.
    """
    if data.draw(st.booleans(), label="no initial response"):
        return None, None
    if name == "PLAIN":
        return data.draw(plain_responses()), None
    if name == "LOGIN":
        return data.draw(names), None
    if name.startswith("SCRAM"):
        drawn = data.draw(scram_first())
        if isinstance(drawn, tuple):
            user, authzid = drawn
            client = ScramClient(
                name.removeprefix("SCRAM-"),
                user,
                PASSWORDS[user.encode()],
                authzid=user if authzid else "",
            )
            return client.first(), client
        return drawn, None
    if name == "EXTERNAL":
        return data.draw(external_responses()), None
    return data.draw(raw), None


def next_response(name: str, challenge: bytes, client, data):
    if name == "PLAIN":
        return data.draw(plain_responses())
    if name == "LOGIN":
        return data.draw(st.one_of(names, secrets))
    if name == "CRAM-MD5":
        return data.draw(cram_responses(challenge))
    if name.startswith("SCRAM"):
        return data.draw(scram_final(name, client, challenge))
    return data.draw(external_responses())


@SETTINGS
@given(name=st.sampled_from(MECHANISMS), data=st.data())
def test_exchanges_only_challenge_refuse_or_give_credentials(context, name, data):
    mechanism = sasl.registry.get(name)
    assert mechanism.available(context), name
    exchange = mechanism.start(context)
    response, client = first_response(name, data)
    for _step in range(6):
        try:
            outcome = resolve(exchange.step(response))
        except sasl.SASLError as error:
            assert str(error), "a refusal says why"
            return
        if isinstance(outcome, sasl.Challenge):
            assert isinstance(outcome.data, bytes)
            response = next_response(name, outcome.data, client, data)
            continue
        assert list(providedBy(outcome)), f"{name} gave {outcome!r}"
        try:
            _interface, maildrop, _logout = resolve(
                context.portal.login(outcome, LoginRequest(), IMaildrop)
            )
        except (UnauthorizedLogin, MaildropError):
            return
        try:
            success = exchange.success_data()
            assert success is None or isinstance(success, bytes)
            if client is not None and success is not None:
                assert client.verify(success)
        finally:
            resolve(maildrop.release())
        return
    pytest.fail(f"{name} still asked for more after 6 responses")


@SETTINGS
@given(raw)
def test_decode_response_decodes_or_refuses(response):
    try:
        decoded = sasl.decode_response(response)
    except sasl.SASLError:
        return
    assert isinstance(decoded, bytes)
    assert response == b"=" or base64.b64encode(decoded) == response


@SETTINGS
@given(st.sampled_from(["SHA-1", "SHA-256"]), st.sampled_from(["alice", "bob"]))
def test_a_correct_scram_exchange_succeeds(context, algorithm, user):
    """
    The fuzzing above reaches success: a correct exchange logs in and the
    server proves it knew the secret.
    """
    password = PASSWORDS[user.encode()]
    if algorithm == "SHA-1" and user == "bob":
        user, password = "carol", PASSWORDS[b"carol"]
    client = ScramClient(algorithm, user, password)
    exchange = sasl.registry.get("SCRAM-" + algorithm).start(context)
    server_first = resolve(exchange.step(client.first()))
    credentials = resolve(exchange.step(client.final(server_first.data)))
    _interface, maildrop, _logout = resolve(
        context.portal.login(credentials, LoginRequest(), IMaildrop)
    )
    try:
        assert client.verify(exchange.success_data())
    finally:
        resolve(maildrop.release())
