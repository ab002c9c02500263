"""
Fuzzing the POP3 protocol over an in-memory transport: random bytes and
command-like lines (every command, SASL exchanges, STLS, over-long lines,
NULs, bare CRs and LFs, invalid UTF-8), cut into random chunks, fed to one
session with a passwd-file checker and an in-memory store.

Whatever arrives:

  - no exception escapes the protocol;
  - every line it writes ends with CRLF and is a status line (C{+OK},
    C{-ERR} or a C{+ } SASL challenge, at most 512 octets as RFC 2449
    section 4 asks) or part of a multi-line reply that ends with its
    lone-dot line;
  - the session is left either closed, or open and answering CAPA;
  - once the connection is gone the maildrop is unlocked and no timer of
    the session is left behind.

Budget: the C{ci} profile (the default) runs a few hundred sessions;
C{POPD_HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz_protocol.py}
many thousands.
"""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from helpers.pop3_wire import hypothesis_settings, weighted
from helpers.sasl_session import passwd_checker
from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from popd.auth.schemes import hash_password
from popd.auth.throttle import LoginThrottle
from popd.protocol import POP3Factory, SessionPolicy
from popd.realm import MaildropRealm
from popd.testing import MemoryMaildropProvider

SETTINGS = hypothesis_settings(ci={"max_examples": 300}, long={"max_examples": 20000})

UNTRUSTED = IPv4Address("TCP", "192.0.2.7", 40000)
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)

USERS = f"""\
alice:{{PLAIN}}secret
bob:{hash_password(b"bobpass", "SCRAM-SHA-256")}
ivan:{{PLAIN}}secret::::::nologin
"""
# No line of these starts with "+" or "-", so that a status line is never
# mistaken for one of a message (the check below tells them apart so).
MESSAGES = [
    b"Subject: one\n\nfirst body\n",
    b"Subject: two\r\n\r\n.dotted line\r\n.\r\nsecond\r\n",
    b"Subject: three\n\nno newline at end",
    b"",
    b"Subject: nul\n\n\x00\xff\r bare CR\n",
    b"Subject: long\n\n" + b"x" * 70000 + b"\n" + b".\n" * 100,
]
STATUS = (b"+OK", b"-ERR", b"+ ")


class TLSStringTransport(StringTransport):
    """
    An in-memory transport where STLS "succeeds" at once.
    """

    def startTLS(self, options) -> None:
        self.tls_started_with = options


class Session:
    """
    One protocol instance on an in-memory transport and a fake clock.
    """

    def __init__(self, factory: POP3Factory, peer) -> None:
        self.clock = factory.reactor
        self.transport = TLSStringTransport(peerAddress=peer)
        self.protocol = factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)
        self.lost = False

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.lost

    def send(self, data: bytes, sizes: list[int]) -> None:
        start = 0
        for size in [*sizes, len(data)]:
            if start >= len(data) or self.closed:
                break
            self.protocol.dataReceived(data[start : start + size])
            start += size
            self.settle()

    def settle(self) -> None:
        """
        Let time pass until the session has nothing left to do but wait for
        the client: replies paced through the clock and failed logins
        answered after their delay go out; the idle timeout does not fire.
        """
        for _ in range(10000):
            timeout = getattr(self.protocol, "_TimeoutMixin__timeoutCall", None)
            pending = [
                call
                for call in self.clock.getDelayedCalls()
                if call is not timeout and call.active()
            ]
            if not pending:
                return
            due = min(call.getTime() for call in pending)
            self.clock.advance(max(0.0, due - self.clock.seconds()))
        pytest.fail("the session keeps scheduling work")

    def hang_up(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(None)
            self.settle()


def fresh(factory: POP3Factory) -> POP3Factory:
    """
    C{factory} with a new failed-login throttle, so that each example
    starts with no penalties (and runs the same each time).
    """
    factory.policy = replace(factory.policy, throttle=LoginThrottle())
    return factory


def make_factory(tmp_path_factory, **policy) -> POP3Factory:
    provider = MemoryMaildropProvider()
    for message in MESSAGES:
        provider.deliver("alice", message)
    provider.deliver("alice", b"Subject: archived\n\n", folder="Archive")
    checker = passwd_checker(tmp_path_factory.mktemp("fuzz") / "passwd", USERS)
    factory = POP3Factory(
        Portal(MaildropRealm(provider), [checker]),
        SessionPolicy(hostname="pop.example", failure_delay=0, **policy),
        tls_options=object(),
        reactor=Clock(),
    )
    factory.provider = provider
    return factory


@pytest.fixture(scope="module")
def factories(tmp_path_factory) -> dict:
    """
    Factories with a lenient and a strict policy (sessions of one factory
    share its store, which the test checks is left unlocked each time).
    """
    return {
        "lenient": make_factory(
            tmp_path_factory,
            plaintext="always",
            max_bad_commands=1000,
            max_auth_failures=1000,
        ),
        "strict": make_factory(tmp_path_factory, apop=True),
    }


# What the client sends


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


COMMAND_LINES = [
    b"USER alice",
    b"PASS secret",
    b"USER alice#Archive",
    b"USER bob",
    b"PASS wrong",
    b"USER ivan",
    b"APOP alice 0123456789abcdef0123456789abcdef",
    b"APOP",
    b"AUTH",
    b"AUTH PLAIN",
    b"AUTH PLAIN " + _b64(b"\0alice\0secret"),
    b"AUTH PLAIN " + _b64(b"bob\0alice\0secret"),
    b"AUTH PLAIN =",
    b"AUTH LOGIN",
    b"AUTH LOGIN " + _b64(b"alice"),
    b"AUTH CRAM-MD5",
    b"AUTH SCRAM-SHA-256",
    b"AUTH SCRAM-SHA-256 " + _b64(b"n,,n=bob,r=abcdef"),
    b"AUTH SCRAM-SHA-1 " + _b64(b"n,,n=alice,r=abcdef"),
    b"AUTH EXTERNAL",
    b"AUTH NOSUCH",
    _b64(b"\0alice\0secret"),
    _b64(b"alice"),
    _b64(b"secret"),
    _b64(b"alice 0123456789abcdef0123456789abcdef"),
    _b64(b"c=biws,r=abcdef,p=AAAA"),
    b"*",
    b"=",
    b"",
    b"STLS",
    b"CAPA",
    b"UTF8",
    b"STAT",
    b"LIST",
    b"LIST 1",
    b"LIST 0",
    b"UIDL",
    b"UIDL 2",
    b"RETR 1",
    b"RETR 6",
    b"RETR 99",
    b"TOP 1 0",
    b"TOP 6 2",
    b"TOP 2 99999999999",
    b"DELE 1",
    b"DELE 2",
    b"RSET",
    b"NOOP",
    b"QUIT",
    b"X-FOLDERS",
    b"retr 2",
    b"LIST 1 2",
    b"\xff\xfe",
    b"NOOP\x00",
]
lines = weighted(
    (6, st.sampled_from(COMMAND_LINES)),
    (2, st.binary(max_size=60)),
    (1, st.binary(max_size=40).map(_b64)),
    (
        1,
        st.builds(
            lambda n, c: c * n,
            st.sampled_from([250, 256, 300, 8191, 8192, 8193, 20000]),
            st.sampled_from([b"A", b"\0", b"\r", b" "]),
        ),
    ),
)
terminators = weighted(
    (6, st.just(b"\r\n")),
    (2, st.just(b"\n")),
    (1, st.sampled_from([b"\r", b"", b"\r\r\n", b"\n\r"])),
)
inputs = st.lists(st.tuples(lines, terminators).map(b"".join), max_size=25).map(
    b"".join
)
chunkings = st.lists(st.integers(1, 97), max_size=50)


# The checks


def check_output(output: bytes, closed: bool) -> None:
    """
    Every line is CRLF-terminated and a status line, or in a multi-line
    reply (which the next line after a C{+OK} starts unless it is a status
    line itself) that ends with its lone-dot line.
    """
    assert output == b"" or output.endswith(b"\r\n"), output[-200:]
    in_block = False
    after_ok = False
    for line in output.split(b"\r\n")[:-1]:
        if in_block:
            if line == b".":
                in_block = False
            continue
        if after_ok and not line.startswith(STATUS) and line != b"+":
            in_block = line != b"."
            after_ok = False
            continue
        assert line.startswith(STATUS), (line[:200], output[-2000:])
        assert len(line) + 2 <= 512, line
        after_ok = line.startswith(b"+OK")
    assert not in_block or closed, output[-2000:]


def answers_capa(session: Session) -> bool:
    """
    End any partial line (and any pending SASL exchange), then ask CAPA:
    an open session must answer it, whatever state the input left it in.
    """
    session.transport.clear()
    session.send(b"\r\n*\r\n", [])
    if session.closed:
        return False
    session.transport.clear()
    session.send(b"CAPA\r\n", [])
    reply = session.transport.value()
    if session.closed and not reply.startswith(b"+OK"):
        return False
    assert reply.startswith(b"+OK"), reply
    assert reply.endswith(b"\r\n.\r\n"), reply
    assert b"\r\nIMPLEMENTATION " in reply, reply
    return True


@SETTINGS
@given(
    policy=st.sampled_from(["lenient", "strict"]),
    trusted=st.booleans(),
    data=inputs,
    sizes=chunkings,
)
def test_any_input_gets_well_formed_replies(factories, policy, trusted, data, sizes):
    factory = fresh(factories[policy])
    session = Session(factory, LOOPBACK if trusted else UNTRUSTED)
    try:
        session.send(data, sizes)
        check_output(session.transport.value(), session.closed)
        if not session.closed:
            answers_capa(session)
    finally:
        session.hang_up()
    # Nothing is left locked or ticking once the connection is gone.
    for folder in (None, "Archive"):
        assert not factory.provider.is_locked("alice", folder)
    assert not session.clock.getDelayedCalls(), session.clock.getDelayedCalls()


@SETTINGS
@given(data=inputs, sizes=chunkings, split=st.integers(0, 200))
def test_chunking_does_not_change_the_replies(factories, data, sizes, split):
    """
    The same input, whole or in any chunks, gets the same replies (the
    SCRAM nonces and APOP timestamps aside), but for STLS: what follows
    it in the same chunk is thrown away, what comes later is not.
    """
    assume(b"STLS" not in data.upper())
    factory = fresh(factories["lenient"])
    whole = Session(factory, LOOPBACK)
    try:
        whole.send(data, [])
        expected = whole.transport.value()
    finally:
        whole.hang_up()
    chunked = Session(fresh(factory), LOOPBACK)
    try:
        chunked.send(data, [split, *sizes])
        assert _stable(chunked.transport.value()) == _stable(expected)
    finally:
        chunked.hang_up()


def _stable(output: bytes) -> bytes:
    """
    C{output} without what differs from one session to the next: SASL
    challenges (nonces) and UIDs do not, but CRAM-MD5 and SCRAM challenges
    carry time and randomness.
    """
    return b"\r\n".join(
        b"+ <challenge>" if line.startswith(b"+ ") and len(line) > 2 else line
        for line in output.split(b"\r\n")
    )


def test_a_megabyte_line_then_noop(factories):
    session = Session(fresh(factories["lenient"]), LOOPBACK)
    try:
        session.send(b"A" * (1 << 20) + b"\r\nNOOP\r\n", [65536] * 16)
        replies = session.transport.value().split(b"\r\n")
        assert replies[0].startswith(b"+OK")  # the greeting
        assert replies[1].startswith(b"-ERR")  # the megabyte line
        assert replies[2].startswith(b"-ERR")  # NOOP before login
        assert not session.closed
        assert answers_capa(session)
    finally:
        session.hang_up()


# What the end-to-end hostile clients found, pinned down in memory


def test_thousands_of_pipelined_multiline_commands_in_one_read(factories):
    """
    Replies that complete at once (CAPA, LIST, UIDL) used to run the next
    queued command from inside the previous one's callback: a few thousand
    in one read overflowed the stack and left the session hanging.
    """
    session = Session(fresh(factories["lenient"]), LOOPBACK)
    try:
        session.send(b"USER alice\r\nPASS secret\r\n", [])
        session.transport.clear()
        batch = b"CAPA\r\nLIST\r\nUIDL\r\nSTAT\r\n" * 1500
        session.send(batch, [])
        output = session.transport.value()
        check_output(output, session.closed)
        assert output.count(b"+OK") == 6000
        assert answers_capa(session)
    finally:
        session.hang_up()


def test_a_client_dribbling_bytes_is_timed_out(factories):
    """
    A byte every 100 ms never makes a whole line: that is not activity, and
    the idle timeout ends the session.
    """
    factory = fresh(factories["strict"])
    session = Session(factory, UNTRUSTED)
    timeout = factory.policy.auth_timeout
    try:
        for _ in range(int(timeout * 10) + 20):
            if session.closed:
                break
            session.protocol.dataReceived(b"x")
            session.clock.advance(0.1)
        assert session.closed
        assert session.transport.value().endswith(
            b"-ERR Disconnected for inactivity.\r\n"
        )
        # Cut off a moment later if the last reply cannot drain.
        session.clock.advance(5)
        assert session.transport.disconnecting
    finally:
        session.hang_up()
