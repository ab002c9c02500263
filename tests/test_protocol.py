"""
The POP3 protocol against an in-memory transport and an in-memory store.
"""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from popd.interfaces import MaildropError, MaildropUnavailable
from popd.protocol import POP3Factory, SessionPolicy
from popd.realm import MaildropRealm
from popd.testing import MemoryMaildropProvider

UNTRUSTED = IPv4Address("TCP", "192.0.2.7", 40000)
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)

MESSAGES = [
    b"Subject: one\n\nfirst body\n",
    b"Subject: two\r\n\r\n.dotted line\r\nsecond\r\n",
    b"Subject: three\n\nline 1\nline 2\nline 3\nno newline at end",
]


class TLSStringTransport(StringTransport):
    """
    A StringTransport that records STLS's startTLS call.
    """

    tls_started_with = None

    def startTLS(self, options) -> None:
        self.tls_started_with = options


class Session:
    """
    One protocol instance wired to an in-memory transport.
    """

    def __init__(self, factory: POP3Factory, peer=UNTRUSTED) -> None:
        self.clock = factory.reactor
        self.transport = TLSStringTransport(peerAddress=peer)
        self.protocol = factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def send(self, data: bytes, chunk: int | None = None) -> bytes:
        chunk = chunk or len(data) or 1
        for start in range(0, len(data), chunk):
            self.protocol.dataReceived(data[start : start + chunk])
            self.pump()
        self.pump()
        return self.take()

    def pump(self) -> None:
        for _ in range(1000):
            if not self.clock.getDelayedCalls():
                return
            self.clock.advance(0)

    def lost(self) -> None:
        self.protocol.connectionLost(None)


@pytest.fixture
def provider() -> MemoryMaildropProvider:
    store = MemoryMaildropProvider()
    for message in MESSAGES:
        store.deliver("alice", message)
    return store


def make_factory(provider, tls=True, **policy) -> POP3Factory:
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret", bob=b"hunter2")
    portal = Portal(MaildropRealm(provider), [checker])
    factory = POP3Factory(
        portal,
        SessionPolicy(hostname="pop.example", **{"failure_delay": 0, **policy}),
        tls_options=object() if tls else None,
        reactor=Clock(),
    )
    return factory


@pytest.fixture
def factory(provider) -> POP3Factory:
    return make_factory(provider, plaintext="always")


def logged_in(factory, user=b"alice", password=b"secret") -> Session:
    session = Session(factory)
    reply = session.send(b"USER " + user + b"\r\nPASS " + password + b"\r\n")
    assert reply.startswith(b"+OK\r\n+OK"), reply
    return session


def capabilities(reply: bytes) -> list[bytes]:
    lines = reply.split(b"\r\n")
    assert lines[0].startswith(b"+OK") and lines[-2:] == [b".", b""]
    return lines[1:-2]


# Greeting and CAPA


def test_greeting_is_ok_without_apop_by_default(factory):
    session = Session(factory)
    assert session.greeting == b"+OK POP3 server ready.\r\n"


def test_greeting_carries_apop_timestamp_when_enabled(provider):
    session = Session(make_factory(provider, apop=True))
    assert re.fullmatch(
        rb"\+OK POP3 server ready\. <\d+\.\d+@pop\.example>\r\n", session.greeting
    )


def test_capa_before_login_over_plain_untrusted(provider):
    session = Session(make_factory(provider))
    caps = capabilities(session.send(b"CAPA\r\n"))
    for expected in (
        b"CAPA",
        b"TOP",
        b"UIDL",
        b"RESP-CODES",
        b"AUTH-RESP-CODE",
        b"PIPELINING",
        b"UTF8 USER",
        b"STLS",
        b"IMPLEMENTATION popd",
    ):
        assert expected in caps
    assert b"USER" not in caps
    # No plaintext mechanism: only CRAM-MD5 (the checker knows plaintexts).
    assert b"SASL CRAM-MD5" in caps


def test_capa_offers_user_to_trusted_clients(provider):
    session = Session(make_factory(provider), peer=LOOPBACK)
    caps = capabilities(session.send(b"CAPA\r\n"))
    assert b"USER" in caps and b"SASL CRAM-MD5 PLAIN LOGIN" in caps


def test_capa_without_tls_configured_has_no_stls(provider):
    session = Session(make_factory(provider, tls=False))
    assert b"STLS" not in capabilities(session.send(b"CAPA\r\n"))


def test_capa_after_stls_drops_stls_and_offers_user(provider):
    session = Session(make_factory(provider))
    assert session.send(b"STLS\r\n") == b"+OK Begin TLS negotiation now.\r\n"
    caps = capabilities(session.send(b"CAPA\r\n"))
    assert b"STLS" not in caps and b"USER" in caps
    assert b"SASL CRAM-MD5 PLAIN LOGIN" in caps


def test_capa_in_transaction_announces_authorization_capabilities(factory):
    session = logged_in(factory)
    caps = capabilities(session.send(b"CAPA\r\n"))
    assert b"USER" in caps and b"TOP" in caps and b"STLS" in caps


def test_capa_expire_and_login_delay_as_configured(provider):
    session = Session(make_factory(provider, expire="NEVER", login_delay=900))
    caps = capabilities(session.send(b"CAPA\r\n"))
    assert b"EXPIRE NEVER" in caps and b"LOGIN-DELAY 900" in caps


def test_capa_with_argument_is_refused(factory):
    session = Session(factory)
    assert session.send(b"CAPA x\r\n").startswith(b"-ERR")


# Logging in


def test_user_pass_logs_in(factory):
    session = Session(factory)
    assert session.send(b"USER alice\r\n") == b"+OK\r\n"
    assert session.send(
        b"PASS secret\r\n"
    ) == b"+OK Logged in, 3 messages (%d octets).\r\n" % (
        sum(len(m.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")) for m in MESSAGES)
    )


def test_wrong_password_and_unknown_user_look_the_same(factory):
    session = Session(factory)
    wrong = session.send(b"USER alice\r\nPASS nope\r\n")
    unknown = session.send(b"USER mallory\r\nPASS nope\r\n")
    assert wrong == unknown == b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n"


def test_too_many_auth_failures_disconnect(factory):
    session = Session(factory)
    replies = session.send(b"USER a\r\nPASS b\r\n" * 3 + b"NOOP\r\n")
    assert replies.endswith(b"-ERR [AUTH] Too many authentication failures.\r\n")
    assert session.transport.disconnecting


def test_plaintext_refused_before_tls_for_untrusted_clients(provider):
    session = Session(make_factory(provider))
    reply = session.send(b"USER alice\r\nPASS secret\r\n")
    assert reply.startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    assert b"-ERR No user name given" in reply
    assert session.protocol.state == "AUTHORIZATION"


def test_plaintext_allowed_from_loopback(provider):
    session = Session(make_factory(provider), peer=LOOPBACK)
    assert session.send(b"USER alice\r\nPASS secret\r\n").startswith(
        b"+OK\r\n+OK Logged in"
    )


def test_plaintext_allowed_after_stls(provider):
    session = Session(make_factory(provider))
    session.send(b"STLS\r\n")
    assert session.send(b"USER alice\r\nPASS secret\r\n").startswith(
        b"+OK\r\n+OK Logged in"
    )


def test_pass_without_user(factory):
    session = Session(factory)
    assert (
        session.send(b"PASS secret\r\n")
        == b"-ERR No user name given: USER comes first.\r\n"
    )


def test_password_may_contain_spaces(provider):
    provider.deliver("carol", b"x\n")
    checker = InMemoryUsernamePasswordDatabaseDontUse(carol=b"two words ")
    factory = POP3Factory(
        Portal(MaildropRealm(provider), [checker]),
        SessionPolicy(plaintext="always"),
        reactor=Clock(),
    )
    session = Session(factory)
    assert session.send(b"USER carol\r\nPASS two words \r\n").startswith(
        b"+OK\r\n+OK Logged in"
    )


def test_apop_login(provider):
    session = Session(make_factory(provider, apop=True))
    challenge = re.search(rb"<[^>]+>", session.greeting).group()
    digest = hashlib.md5(challenge + b"secret").hexdigest().encode()
    assert session.send(b"APOP alice " + digest + b"\r\n").startswith(b"+OK Logged in")


def test_apop_wrong_digest(provider):
    session = Session(make_factory(provider, apop=True))
    assert session.send(b"APOP alice " + b"0" * 32 + b"\r\n") == (
        b"-ERR [AUTH] Authentication failed.\r\n"
    )


def test_apop_refused_when_not_enabled(factory):
    session = Session(factory)
    assert (
        session.send(b"APOP alice " + b"0" * 32 + b"\r\n")
        == b"-ERR APOP is not enabled.\r\n"
    )


def test_second_session_gets_in_use(factory):
    logged_in(factory)
    second = Session(factory)
    assert (
        session_reply(second)
        == b"+OK\r\n-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n"
    )


def session_reply(session: Session) -> bytes:
    return session.send(b"USER alice\r\nPASS secret\r\n")


def test_store_unavailable_is_sys_temp(factory, provider, monkeypatch):
    monkeypatch.setattr(provider, "open", lambda *a: fail(MaildropUnavailable("disk")))
    assert session_reply(Session(factory)).endswith(
        b"-ERR [SYS/TEMP] Mailbox is temporarily unavailable.\r\n"
    )


def test_store_error_is_sys_perm(factory, provider, monkeypatch):
    monkeypatch.setattr(provider, "open", lambda *a: fail(MaildropError("broken")))
    assert session_reply(Session(factory)).endswith(
        b"-ERR [SYS/PERM] Mailbox cannot be opened.\r\n"
    )


def test_utf8_command_and_utf8_user_name(provider):
    name = "jürgen"
    provider.deliver(name, b"Subject: \xc3\xa4\n\nk\xc3\xb6rper\n")
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.users[name.encode()] = "pässword".encode()
    factory = POP3Factory(
        Portal(MaildropRealm(provider), [checker]),
        SessionPolicy(plaintext="always"),
        reactor=Clock(),
    )
    session = Session(factory)
    assert session.send(b"UTF8\r\n") == b"+OK UTF8 enabled\r\n"
    reply = session.send("USER jürgen\r\nPASS pässword\r\n".encode())
    assert reply.startswith(b"+OK\r\n+OK Logged in")
    assert session.send(b"RETR 1\r\n").endswith(b"k\xc3\xb6rper\r\n.\r\n")


# SASL


def plain(authzid: bytes, user: bytes, password: bytes) -> bytes:
    return base64.b64encode(authzid + b"\0" + user + b"\0" + password)


def test_auth_lists_mechanisms(factory):
    session = Session(factory)
    assert session.send(b"AUTH\r\n") == (
        b"+OK Methods supported:\r\nCRAM-MD5\r\nPLAIN\r\nLOGIN\r\n.\r\n"
    )


def test_auth_plain_initial_response(factory):
    session = Session(factory)
    reply = session.send(b"AUTH PLAIN " + plain(b"", b"alice", b"secret") + b"\r\n")
    assert reply.startswith(b"+OK Logged in")


def test_auth_plain_continuation(factory):
    session = Session(factory)
    assert session.send(b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert session.send(plain(b"alice", b"alice", b"secret") + b"\r\n").startswith(
        b"+OK Logged in"
    )


def test_auth_cancelled(factory):
    session = Session(factory)
    session.send(b"AUTH PLAIN\r\n")
    assert session.send(b"*\r\n") == b"-ERR Authentication cancelled.\r\n"
    assert session.send(b"NOOP\r\n").startswith(b"-ERR")


def test_auth_bad_base64_and_foreign_authzid(factory):
    session = Session(factory)
    assert (
        session.send(b"AUTH PLAIN !!!\r\n")
        == b"-ERR [AUTH] Invalid base64 data in SASL response.\r\n"
    )
    reply = session.send(b"AUTH PLAIN " + plain(b"bob", b"alice", b"secret") + b"\r\n")
    assert reply == b"-ERR [AUTH] Authorization identity must match the user.\r\n"


def test_auth_wrong_password(factory):
    session = Session(factory)
    reply = session.send(b"AUTH PLAIN " + plain(b"", b"alice", b"bad") + b"\r\n")
    assert reply == b"-ERR [AUTH] Authentication failed.\r\n"


def test_auth_unknown_mechanism(factory):
    assert (
        Session(factory).send(b"AUTH X-NONE\r\n")
        == b"-ERR Unsupported authentication mechanism.\r\n"
    )


def test_auth_plain_refused_before_tls(provider):
    session = Session(make_factory(provider))
    reply = session.send(b"AUTH PLAIN " + plain(b"", b"alice", b"secret") + b"\r\n")
    assert reply.startswith(b"-ERR [AUTH] Plaintext authentication disallowed")


# STLS


def test_stls_discards_bytes_sent_before_handshake(provider):
    session = Session(make_factory(provider))
    reply = session.send(b"STLS\r\nUSER alice\r\nPASS secret\r\nCAPA")
    assert reply == b"+OK Begin TLS negotiation now.\r\n"
    assert session.transport.tls_started_with is not None
    assert session.send(b"\r\n").startswith(b"-ERR Unknown command")
    assert session.protocol.state == "AUTHORIZATION"


def test_stls_twice_and_after_login(factory):
    session = Session(factory)
    session.send(b"STLS\r\n")
    assert session.send(b"STLS\r\n") == b"-ERR TLS is already active.\r\n"
    assert logged_in(factory, b"bob", b"hunter2").send(b"STLS\r\n") == (
        b"-ERR STLS is not valid in this state.\r\n"
    )


def test_stls_without_tls_configured(provider):
    session = Session(make_factory(provider, tls=False))
    assert session.send(b"STLS\r\n") == b"-ERR TLS support isn't enabled.\r\n"


# TRANSACTION commands


def test_stat(factory):
    sizes = [28, 38, 59]
    assert logged_in(factory).send(b"STAT\r\n") == b"+OK 3 %d\r\n" % sum(sizes)


def test_list_and_uidl_in_ascending_order_without_deleted(factory):
    session = logged_in(factory)
    session.send(b"DELE 2\r\n")
    assert session.send(b"LIST\r\n") == b"+OK\r\n1 28\r\n3 59\r\n.\r\n"
    assert session.send(b"UIDL\r\n") == b"+OK\r\n1 mem1\r\n3 mem3\r\n.\r\n"
    assert session.send(b"LIST 3\r\nUIDL 1\r\n") == b"+OK 3 59\r\n+OK 1 mem1\r\n"


def test_retr_is_byte_exact_with_dot_stuffing_and_crlf(factory):
    session = logged_in(factory)
    assert (
        session.send(b"RETR 1\r\n")
        == b"+OK 28 octets\r\nSubject: one\r\n\r\nfirst body\r\n.\r\n"
    )
    assert session.send(b"RETR 2\r\n") == (
        b"+OK 38 octets\r\nSubject: two\r\n\r\n..dotted line\r\nsecond\r\n.\r\n"
    )
    assert session.send(b"RETR 3\r\n").endswith(b"line 3\r\nno newline at end\r\n.\r\n")


def test_top(factory):
    session = logged_in(factory)
    assert (
        session.send(b"TOP 3 0\r\n") == b"+OK 59 octets\r\nSubject: three\r\n\r\n.\r\n"
    )
    assert session.send(b"TOP 3 2\r\n") == (
        b"+OK 59 octets\r\nSubject: three\r\n\r\nline 1\r\nline 2\r\n.\r\n"
    )
    assert session.send(b"TOP 3 99\r\n").endswith(b"no newline at end\r\n.\r\n")


@pytest.mark.parametrize(
    "command, reply",
    [
        (b"LIST 0", b"-ERR There's no message 0.\r\n"),
        (b"LIST 4", b"-ERR There's no message 4.\r\n"),
        (b"LIST -1", b"-ERR Invalid message number: -1\r\n"),
        (b"LIST +1", b"-ERR Invalid message number: +1\r\n"),
        (b"LIST one", b"-ERR Invalid message number: one\r\n"),
        (
            b"LIST 99999999999999999999",
            b"-ERR Invalid message number: 99999999999999999999\r\n",
        ),
        (b"LIST 1 2", b"-ERR Too many arguments.\r\n"),
        (b"RETR", b"-ERR Missing argument.\r\n"),
        (b"RETR 1 2", b"-ERR Too many arguments.\r\n"),
        (b"DELE", b"-ERR Missing argument.\r\n"),
        (b"TOP 1", b"-ERR Missing argument.\r\n"),
        (b"TOP 1 -1", b"-ERR Invalid line count: -1\r\n"),
        (b"TOP 1 x", b"-ERR Invalid line count: x\r\n"),
        (b"TOP 0 1", b"-ERR There's no message 0.\r\n"),
        (b"UIDL 9", b"-ERR There's no message 9.\r\n"),
        (b"STAT 1", b"-ERR This command takes no arguments.\r\n"),
        (b"NOOP x", b"-ERR This command takes no arguments.\r\n"),
        (b"USER bob", b"-ERR USER is not valid in this state.\r\n"),
        (b"PASS x", b"-ERR PASS is not valid in this state.\r\n"),
        (b"FOO", b"-ERR Unknown command: FOO\r\n"),
        (b"", b"-ERR Unknown command: \r\n"),
    ],
)
def test_bad_arguments_get_err_and_session_goes_on(factory, command, reply):
    session = logged_in(factory)
    assert session.send(command + b"\r\n") == reply
    assert session.send(b"NOOP\r\n") == b"+OK\r\n"


@pytest.mark.parametrize(
    "command",
    [b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 1", b"UIDL"],
)
def test_transaction_commands_refused_before_login(factory, command):
    name = command.split()[0]
    assert (
        Session(factory).send(command + b"\r\n")
        == b"-ERR %s is not valid in this state.\r\n" % name
    )


def test_deleted_message_is_refused(factory):
    session = logged_in(factory)
    assert session.send(b"DELE 1\r\n") == b"+OK Message 1 marked for deletion.\r\n"
    for command in (b"DELE 1", b"RETR 1", b"LIST 1", b"TOP 1 0", b"UIDL 1"):
        assert session.send(command + b"\r\n") == b"-ERR Message 1 is deleted.\r\n"
    assert session.send(b"STAT\r\n") == b"+OK 2 97\r\n"


def test_rset_undeletes(factory, provider):
    session = logged_in(factory)
    session.send(b"DELE 1\r\nDELE 2\r\n")
    assert session.send(b"RSET\r\n") == b"+OK Maildrop has 3 messages.\r\n"
    session.send(b"QUIT\r\n")
    assert provider.contents("alice") == MESSAGES


def test_quit_commits_deletions(factory, provider):
    session = logged_in(factory)
    assert session.send(b"DELE 2\r\nQUIT\r\n") == (
        b"+OK Message 2 marked for deletion.\r\n+OK Logging out, messages deleted.\r\n"
    )
    assert session.transport.disconnecting
    assert provider.contents("alice") == [MESSAGES[0], MESSAGES[2]]
    assert not provider.is_locked("alice")


def test_quit_in_authorization(factory):
    session = Session(factory)
    assert session.send(b"QUIT\r\n") == b"+OK Logging out.\r\n"
    assert session.transport.disconnecting


def test_dropped_connection_deletes_nothing_and_unlocks(factory, provider):
    session = logged_in(factory)
    session.send(b"DELE 1\r\nDELE 2\r\n")
    session.lost()
    assert provider.contents("alice") == MESSAGES
    assert not provider.is_locked("alice")


def test_timeout_deletes_nothing(provider):
    factory = make_factory(provider, plaintext="always", transaction_timeout=600)
    session = logged_in(factory)
    session.send(b"DELE 1\r\n")
    session.clock.advance(599)
    assert not session.transport.disconnecting
    session.clock.advance(2)
    assert session.take() == b"-ERR Disconnected for inactivity.\r\n"
    assert session.transport.disconnecting
    session.lost()
    assert provider.contents("alice") == MESSAGES


def test_authorization_timeout_is_shorter(provider):
    session = Session(make_factory(provider, auth_timeout=60))
    session.clock.advance(61)
    assert session.transport.disconnecting


def test_commit_failure_is_reported(factory, provider, monkeypatch):
    session = logged_in(factory)
    maildrop = session.protocol._maildrop
    monkeypatch.setattr(maildrop, "commit", lambda deleted: fail(OSError("disk full")))
    assert session.send(b"DELE 1\r\nQUIT\r\n").endswith(
        b"-ERR [SYS/TEMP] Some deleted messages were not removed.\r\n"
    )


def test_unreadable_message_is_sys_temp_and_session_goes_on(factory, monkeypatch):
    session = logged_in(factory)
    maildrop = session.protocol._maildrop
    monkeypatch.setattr(maildrop, "read", lambda index: fail(MaildropError("gone")))
    assert session.send(b"RETR 1\r\n") == b"-ERR [SYS/TEMP] Message can't be read.\r\n"
    monkeypatch.setattr(
        maildrop, "read", lambda index: succeed(__import__("io").BytesIO(b"x"))
    )
    assert session.send(b"RETR 1\r\n") == b"+OK 28 octets\r\nx\r\n.\r\n"


# Robustness


def test_commands_are_case_insensitive(factory):
    session = Session(factory)
    assert session.send(b"user alice\r\npass secret\r\nstat\r\n").endswith(
        b"+OK 3 125\r\n"
    )


def test_overlong_command_refused_without_harm(factory):
    session = logged_in(factory)
    assert (
        session.send(b"NOOP " + b"x" * 300 + b"\r\n")
        == b"-ERR Command line too long.\r\n"
    )
    assert (
        session.send(b"X" * 100_000 + b"\r\nNOOP\r\n")
        == b"-ERR Command line too long.\r\n+OK\r\n"
    )
    assert (
        session.send(b"NOOP " + b"x" * 248 + b"\r\n")
        == b"-ERR This command takes no arguments.\r\n"
    )


def test_too_many_bad_commands_disconnect(provider):
    session = Session(make_factory(provider, max_bad_commands=5))
    reply = session.send(b"BAD\r\n" * 5)
    assert reply.endswith(b"-ERR Too many bad commands.\r\n")
    assert session.transport.disconnecting


def test_bare_lf_line_endings_accepted(factory):
    assert logged_in(factory).send(b"STAT\n") == b"+OK 3 125\r\n"


SCRIPT = (
    b"CAPA\r\nUSER alice\r\nPASS secret\r\nSTAT\r\nLIST\r\nUIDL\r\n"
    b"RETR 2\r\nTOP 3 1\r\n"
    b"DELE 1\r\nLIST 1\r\nNOOP\r\nRSET\r\nBOGUS\r\nQUIT\r\n"
)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 13, 64])
def test_same_replies_at_every_chunk_size(provider, chunk):
    whole = Session(make_factory(provider, plaintext="always")).send(SCRIPT)
    provider_again = MemoryMaildropProvider()
    for message in MESSAGES:
        provider_again.deliver("alice", message)
    chunked = Session(make_factory(provider_again, plaintext="always")).send(
        SCRIPT, chunk
    )
    assert chunked == whole
    assert whole.count(b"\r\n+OK") + whole.count(b"\r\n-ERR") >= 13
    assert whole.endswith(b"+OK Logging out.\r\n")


def test_pipelined_replies_come_in_order(factory):
    replies = logged_in(factory).send(b"RETR 1\r\nSTAT\r\nLIST 2\r\nRETR 2\r\nNOOP\r\n")
    assert replies == (
        b"+OK 28 octets\r\nSubject: one\r\n\r\nfirst body\r\n.\r\n"
        b"+OK 3 125\r\n+OK 2 38\r\n"
        b"+OK 38 octets\r\nSubject: two\r\n\r\n..dotted line\r\nsecond\r\n.\r\n+OK\r\n"
    )


def test_never_plus_err(factory):
    session = logged_in(factory)
    replies = session.send(SCRIPT.replace(b"USER alice\r\nPASS secret\r\n", b""))
    assert b"+ERR" not in replies


def test_session_log_line_without_password(factory):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        session = logged_in(factory, password=b"secret")
        session.send(b"RETR 1\r\nDELE 2\r\nQUIT\r\n")
        session.lost()
    finally:
        globalLogPublisher.removeObserver(events.append)
    ends = [e for e in events if e.get("log_format", "").startswith("session end")]
    assert len(ends) == 1
    end = ends[0]
    assert (end["user"], end["retrieved"], end["retrieved_octets"]) == ("alice", 1, 28)
    assert (end["deleted"], end["deleted_octets"], end["end"]) == (1, 38, "quit")
    assert end["client"] == "192.0.2.7" and end["tls"] == "no"
    assert not any("secret" in repr(e) for e in events)


def test_session_without_login_is_logged_too(factory):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        session = Session(factory)
        session.send(b"USER alice\r\nPASS wrong-password\r\n")
        session.lost()
    finally:
        globalLogPublisher.removeObserver(events.append)
    (end,) = [e for e in events if e.get("log_format", "").startswith("session end")]
    assert (end["user"], end["end"]) == ("-", "disconnected")
    assert not any("wrong-password" in repr(e) for e in events)


# Folders and retention


def test_folder_selected_with_suffix_and_listed(provider):
    provider.deliver("alice", b"Subject: archived\n\nold\n", folder="Archive")
    provider.deliver("alice", b"x\n", folder="Lists.python")
    session = Session(make_factory(provider, plaintext="always"))
    reply = session.send(b"USER alice#Archive\r\nPASS secret\r\nSTAT\r\nRETR 1\r\n")
    assert b"+OK 1 " in reply and reply.endswith(b"\r\nold\r\n.\r\n")
    assert session.send(b"X-FOLDERS\r\n") == (
        b"+OK Folders follow.\r\nINBOX\r\nArchive\r\nLists.python\r\n.\r\n"
    )
    assert provider.is_locked("alice", "Archive") and not provider.is_locked("alice")
    assert b"X-FOLDERS" in capabilities(session.send(b"CAPA\r\n"))


def test_folder_suffix_off(provider):
    session = Session(make_factory(provider, plaintext="always", folder_separator=""))
    assert session.send(b"USER alice#Archive\r\nPASS secret\r\n").endswith(
        b"-ERR [AUTH] Authentication failed.\r\n"
    )
    session = logged_in(make_factory(provider, plaintext="always", folder_separator=""))
    assert b"X-FOLDERS" not in capabilities(session.send(b"CAPA\r\n"))
    assert session.send(b"X-FOLDERS\r\n") == b"-ERR Unknown command: X-FOLDERS\r\n"


def test_unknown_folder(provider, monkeypatch):
    from popd.interfaces import NoSuchFolder

    monkeypatch.setattr(provider, "open", lambda *a: fail(NoSuchFolder("x")))
    reply = Session(make_factory(provider, plaintext="always")).send(
        b"USER alice#Nope\r\nPASS secret\r\n"
    )
    assert reply.endswith(b"-ERR There is no such folder.\r\n")


def test_retrieved_messages_are_recorded_at_quit(factory, provider):
    session = logged_in(factory)
    session.send(b"RETR 2\r\nTOP 3 1\r\nQUIT\r\n")
    again = logged_in(factory)
    retrieved = [m.retrieved_at for m in again.protocol._maildrop.messages]
    assert retrieved[0] is None and retrieved[2] is None
    assert retrieved[1] is not None


def test_dropped_session_records_no_retrieval(factory):
    session = logged_in(factory)
    session.send(b"RETR 1\r\n")
    session.lost()
    again = logged_in(factory)
    assert all(m.retrieved_at is None for m in again.protocol._maildrop.messages)


def test_expire_removes_old_retrieved_messages_only(provider):
    factory = make_factory(provider, plaintext="always", expire="30")
    assert b"EXPIRE 30" in capabilities(Session(factory).send(b"CAPA\r\n"))
    logged_in(factory).send(b"RETR 1\r\nRETR 2\r\nQUIT\r\n")
    for stored in provider._mailbox("alice", None).messages[:1]:
        stored.retrieved_at -= 31 * 86400
    logged_in(factory).send(b"QUIT\r\n")
    assert provider.contents("alice") == MESSAGES[1:]


def test_expire_zero_removes_what_was_retrieved(provider):
    factory = make_factory(provider, plaintext="always", expire="0")
    logged_in(factory).send(b"RETR 2\r\nTOP 1 0\r\nQUIT\r\n")
    assert provider.contents("alice") == [MESSAGES[0], MESSAGES[2]]


def test_expire_never_keeps_everything(provider):
    factory = make_factory(provider, plaintext="always", expire="NEVER")
    logged_in(factory).send(b"RETR 1\r\nQUIT\r\n")
    assert provider.contents("alice") == MESSAGES


def test_per_user_expire_from_the_realm(provider):
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret", bob=b"hunter2")
    policies = {"alice": "0"}
    realm = MaildropRealm(provider, user_expire=lambda user: policies.get(user))
    factory = POP3Factory(
        Portal(realm, [checker]),
        SessionPolicy(
            plaintext="always", failure_delay=0, expire="30", per_user_expire=True
        ),
        reactor=Clock(),
    )
    assert b"EXPIRE 30 USER" in capabilities(Session(factory).send(b"CAPA\r\n"))
    session = logged_in(factory)
    assert b"EXPIRE 0" in capabilities(session.send(b"CAPA\r\n"))
    session.send(b"RETR 1\r\nQUIT\r\n")
    assert provider.contents("alice") == MESSAGES[1:]
    provider.deliver("bob", b"kept\n")
    bob = logged_in(factory, b"bob", b"hunter2")
    assert b"EXPIRE 30" in capabilities(bob.send(b"CAPA\r\n"))
    bob.send(b"RETR 1\r\nQUIT\r\n")
    assert provider.contents("bob") == [b"kept\n"]
