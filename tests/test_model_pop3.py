"""
Model-based testing: random POP3 sessions against a real popd, every reply
checked against a small reference model of RFC 1939.

A hypothesis rule-based state machine (L{POP3Machine}) drives a real
C{twistd -n popd} over loopback sockets (plain, STLS and implicit TLS) with
random sequences of every command: USER, PASS, APOP, AUTH PLAIN (initial
response or challenge, cancelled, malformed), STAT, LIST [n], UIDL [n],
RETR n, TOP n k, DELE n, NOOP, RSET, QUIT, CAPA, UTF8, STLS (and STLS
refused inside TLS), unknown and over-long lines, with good and bad
arguments (missing, extra, non-numeric, 0, negative, out of range,
deleted), keywords in any letter case, CRLF or bare LF, one command at a
time or pipelined in one write or dribbled a few bytes per packet.

L{Model} says, independently of popd's code, what each reply must be given
the maildrop and the deletions so far: STAT's count and octets, LIST and
UIDL (whole and per message), RETR's exact octets (CRLF line ends,
dot-stuffed, terminated) and TOP's header block and n body lines, which
commands must be refused with -ERR, when the server must hang up (QUIT,
the third failed login).  After each QUIT a new session checks that
exactly the deleted messages are gone; after each dropped connection
(also mid-RETR) one checks that nothing was deleted.

Each example starts from a fresh maildrop: a session deletes what the last
one left, then the example's messages (dot lines, 8-bit octets, NULs, bare
CRs, C{From } lines, missing final newlines, empty bodies and empty
messages, generated ones) are delivered through the store's own
C{deliver}, the code path of C{popd deliver}, in this process.  One server
runs per store for the whole module: Maildir, mbox, SQLite and PostgreSQL
(skipped, saying so, without a server at C{POPD_TEST_POSTGRESQL}, default
C{postgresql://postgres@127.0.0.1:5432/postgres}; a database of this
run's own is created and dropped).

Budget: the C{ci} profile (the default) runs 25 examples of at most 30
steps per store.  A longer run:

    POPD_HYPOTHESIS_PROFILE=long python -m pytest tests/test_model_pop3.py

(500 examples of at most 60 steps per store).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers.pop3_wire import Closed, Seeder, Wire, hypothesis_settings, weighted
from helpers.popd_e2e import (
    MESSAGES,
    PopdServer,
    config_text,
    dot_stuffed,
    downloaded,
    fresh_loopback,
    run_cli,
    to_crlf,
    top_form,
    wire_form,
)
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

pytestmark = pytest.mark.e2e

USER = "modeluser"
PASSWORD = "model pass word"
# Failed logins hang up the connection after this many (the default).
MAX_AUTH_FAILURES = 3
ADMIN_DSN = os.environ.get(
    "POPD_TEST_POSTGRESQL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SETTINGS = hypothesis_settings(
    ci={"max_examples": 25, "stateful_step_count": 30},
    long={"max_examples": 500, "stateful_step_count": 60},
)


# Messages


def _many_dot_lines() -> bytes:
    return b"Subject: dots all the way\n\n" + b"".join(
        b".%d\n" % number if number % 3 else b".\n" for number in range(2000)
    )


CORPUS = [
    MESSAGES[name]
    for name in (
        "plain",
        "dots",
        "eight_bit",
        "bare_cr",
        "no_final_newline",
        "empty_body",
        "crlf",
        "empty",
    )
] + [
    b"Subject: From lines\n\nFrom the start\n>From quoted\n>>From twice\nFrom \n",
    b"From someone@example.org Mon Jan  1 00:00:00 2024\nSubject: x\n\nbody\n",
    b"Subject: NUL\n\nnul \x00 byte\n\x00\n",
    b"no header section at all\n.\n..\n",
    b"\n\nbody after an empty header\n",
    b"Subject: a long line\n\n" + b"x" * 5000 + b"\n",
    b"Subject: ends in a CR\n\nline\r",
    b"Subject: CR LF mixed\r\n\nline\r\nline\n.\r\n",
    b".\n",
    b"\n",
    _many_dot_lines(),
]

_PIECES = [
    b".",
    b"..",
    b"\r",
    b"\r\n",
    b"\n",
    b"\n\n",
    b"From ",
    b">From ",
    b"\x00",
    b"\xff\xfe",
    b"\xc3\xa9",
    b"Subject: x",
    b" ",
    b"text",
]


messages = st.one_of(
    st.sampled_from(CORPUS),
    st.lists(st.sampled_from(_PIECES), max_size=30).map(b"".join),
    st.binary(max_size=200),
)
# Mostly a few messages, now and then none.
mailboxes = weighted((1, st.just([])), (6, st.lists(messages, min_size=2, max_size=6)))


# Commands


@dataclass(frozen=True)
class Cmd:
    """
    One command line, symbolically: C{verb} and C{args} (bytes, or a
    symbol the machine renders at send time: the user, the password, an
    APOP digest of this connection's greeting...), the keyword's letter
    case and the line ending.
    """

    verb: str
    args: tuple = ()
    case: str = "upper"
    eol: bytes = b"\r\n"


KNOWN_VERBS = frozenset(
    {"CAPA", "USER", "PASS", "APOP", "AUTH", "STLS", "UTF8", "QUIT"}
    | {"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "X-FOLDERS"}
)
_KNOWN_BYTES = frozenset(verb.encode() for verb in KNOWN_VERBS)

# Argument symbols.
GOOD_USER, GOOD_USER_UPPER, UNKNOWN_USER = "good-user", "good-user-upper", "unknown"
GOOD_PASS = "good-pass"
APOP_GOOD, APOP_BAD = "apop-good", "apop-bad"
PLAIN_GOOD, PLAIN_UNKNOWN = "plain-good", "plain-unknown"
PLAIN_MALFORMED, PLAIN_AUTHZID_OTHER = "plain-malformed", "plain-authzid-other"
B64_GARBAGE, CANCEL, EMPTY_RESPONSE = "b64-garbage", "cancel", "empty-response"

_unknown_names = itertools.count()


def _unknown_name() -> bytes:
    # A name no one has, and no other attempt uses: popd's failure penalty
    # counts per user name, and must not slow later examples down.
    return f"nobody{next(_unknown_names)}-{uuid.uuid4().hex[:8]}".encode()


# Mostly numbers of messages that exist (or did): they make for replies
# with something in them.
numbers = weighted(
    (6, st.integers(1, 4).map(lambda n: str(n).encode())),
    (2, st.integers(-2, 9).map(lambda n: str(n).encode())),
    (
        2,
        st.sampled_from(
            [b"abc", b"1a", b"99999999999", b"4294967297", b"", b"1.0"]
            + ["\uff11".encode()]
        ),
    ),
)
line_counts = weighted(
    (5, st.integers(0, 4).map(lambda n: str(n).encode())),
    (1, st.integers(-1, 12).map(lambda n: str(n).encode())),
    (1, st.sampled_from([b"x", b"4294967296", b""])),
)
cases = st.sampled_from(["upper", "lower", "title"])
eols = st.sampled_from([b"\r\n", b"\r\n", b"\n"])


def _cmd(verb: str, args=None):
    return st.builds(
        Cmd, st.just(verb), st.just(()) if args is None else args, cases, eols
    )


def _optional(argument):
    # Mostly the one argument these commands take.
    return weighted(
        (6, st.tuples(argument)),
        (1, st.just(())),
        (1, st.tuples(argument, argument)),
    )


transaction_commands = st.one_of(
    _cmd("STAT", st.sampled_from([(), (), (b"1",)])),
    _cmd("LIST", _optional(numbers)),
    _cmd("UIDL", _optional(numbers)),
    _cmd("RETR", _optional(numbers)),
    _cmd(
        "TOP",
        weighted(
            (5, st.tuples(numbers, line_counts)),
            (1, _optional(numbers)),
        ),
    ),
    _cmd("DELE", _optional(numbers)),
    _cmd("NOOP", st.sampled_from([(), (b"x",)])),
    _cmd("RSET", st.sampled_from([(), (b"x",)])),
)
authorization_commands = st.one_of(
    _cmd("USER", st.sampled_from([(GOOD_USER,), (UNKNOWN_USER,), ()])),
    # Wrong passwords come from unknown users only (USER unknown, PASS
    # good): popd's failure penalty counts per user name, and the user
    # under test must not be slowed down.
    _cmd("PASS", st.just((GOOD_PASS,))),
    _cmd("APOP", st.sampled_from([(APOP_GOOD,), (APOP_BAD,), (b"x",), ()])),
    _cmd(
        "AUTH",
        st.sampled_from(
            [
                (),
                (b"PLAIN",),
                (b"PLAIN", PLAIN_GOOD),
                (b"PLAIN", PLAIN_UNKNOWN),
                (b"PLAIN", PLAIN_MALFORMED),
                (b"PLAIN", PLAIN_AUTHZID_OTHER),
                (b"PLAIN", B64_GARBAGE),
                (b"PLAIN", b"="),
                (b"BOGUS-MECH",),
            ]
        ),
    ),
    _cmd("UTF8", st.sampled_from([(), (b"x",)])),
    _cmd("STLS"),
    # A response to a pending AUTH PLAIN challenge; elsewhere a bad command.
    st.sampled_from(
        [
            Cmd("SASL", (PLAIN_GOOD,)),
            Cmd("SASL", (PLAIN_UNKNOWN,)),
            Cmd("SASL", (B64_GARBAGE,)),
            Cmd("SASL", (CANCEL,)),
            Cmd("SASL", (EMPTY_RESPONSE,)),
        ]
    ),
)
other_commands = st.one_of(
    _cmd("CAPA", st.sampled_from([(), (b"x",)])),
    st.sampled_from(
        [
            Cmd("QUIT", (), "lower"),
            Cmd("GARBAGE", (b"XYZZY",)),
            Cmd("GARBAGE", (b"",)),
            Cmd("GARBAGE", (b"LIST\x00 1",)),
            Cmd("GARBAGE", (b"\xff\xfe\x80 1",)),
            Cmd("GARBAGE", (b"STAT\t",)),
            Cmd("GARBAGE", (b"NOOP " + b"x" * 300,)),
            Cmd("GARBAGE", (b"STAT" + b" " * 300,)),
        ]
    ),
    st.binary(min_size=1, max_size=40)
    .map(lambda b: b"X" + b)
    .filter(lambda b: b"\n" not in b and b"\r" not in b)
    .filter(lambda b: b.split(b" ")[0].upper() not in _KNOWN_BYTES)
    .map(lambda b: Cmd("GARBAGE", (b,))),
)
commands = st.one_of(
    transaction_commands,
    transaction_commands,
    authorization_commands,
    other_commands,
)


# The reference model


@dataclass
class Stored:
    """
    One message of the maildrop: its UID, what was delivered, and its size
    as the server reports it (learned once, then fixed).
    """

    uid: str
    data: bytes
    size: int | None = None

    def allowed_sizes(self) -> set[int]:
        # RFC 1939 sizes count the message in CRLF form; whether the CRLF
        # the wire form adds to a last line without one is counted is not
        # pinned down, so either is accepted, but only ever the same one.
        if self.size is not None:
            return {self.size}
        return {len(to_crlf(self.data)), len(downloaded(self.data))}

    def learn(self, size: int) -> None:
        assert size in self.allowed_sizes(), (
            f"size {size} of {self.uid} is not one of {self.allowed_sizes()} "
            f"for {self.data[:100]!r}"
        )
        self.size = size


@dataclass
class Expect:
    """
    What the model says one reply must be.

    @ivar status: C{"+OK"}, C{"-ERR"} or C{"+"} (a SASL challenge).
    @ivar body: for a multi-line C{+OK}: the exact octets after the status
        line (terminator included), or a callable checking them.
    @ivar check: checks the status line beyond its first word.
    @ivar closes: the server hangs up after this reply.
    @ivar then: what the reply does to the model once checked.
    """

    status: str
    body: bytes | object | None = None
    check: object = None
    closes: bool = False
    then: object = None
    what: str = ""


_NUMBER = re.compile(rb"[1-9][0-9]{0,9}")


@dataclass
class Model:
    """
    RFC 1939 (with RFC 2449 CAPA and pipelining, RFC 2595 STLS, RFC 5034
    AUTH PLAIN, RFC 6856 UTF8) for one user's maildrop and one session.
    """

    mailbox: list[Stored] = field(default_factory=list)
    # The session (None when not connected).
    state: str | None = None
    secure: bool = False
    challenge: bytes | None = None
    user_pending: bytes | None = None
    sasl_pending: bool = False
    auth_failures: int = 0
    deleted: set[int] = field(default_factory=set)

    # The maildrop in the session

    def live(self) -> list[tuple[int, Stored]]:
        return [
            (number, message)
            for number, message in enumerate(self.mailbox, 1)
            if number - 1 not in self.deleted
        ]

    def message(self, word: bytes) -> Stored | None:
        """
        The live message C{word} names, or C{None} (refused).
        """
        if not _NUMBER.fullmatch(word):
            return None
        number = int(word)
        if not 1 <= number <= len(self.mailbox) or number - 1 in self.deleted:
            return None
        return self.mailbox[number - 1]

    # Session events

    def connected(self, secure: bool, greeting: bytes) -> None:
        self.state = "auth"
        self.secure = secure
        match = re.search(rb"<[^<>]*@[^<>]*>", greeting)
        self.challenge = match.group(0) if match else None
        self.user_pending = None
        self.sasl_pending = False
        self.auth_failures = 0
        self.deleted = set()

    def disconnected(self) -> None:
        self.state = None
        self.deleted = set()

    def committed(self) -> None:
        self.mailbox = [m for i, m in enumerate(self.mailbox) if i not in self.deleted]
        self.deleted = set()

    # Replies

    def expect(self, line: bytes) -> Expect:
        """
        The reply to the command C{line} (its terminator stripped).
        """
        if self.sasl_pending:
            self.sasl_pending = False
            return self._sasl_response(line)
        if len(line) + 2 > 255:
            return Expect("-ERR", what="over-long line")
        keyword, _, argument = line.partition(b" ")
        verb = keyword.decode("ascii", "replace").upper()
        words = argument.split()
        if verb not in KNOWN_VERBS:
            return Expect("-ERR", what="unknown command")
        if verb in ("CAPA", "QUIT"):
            return getattr(self, "_" + verb)(words)
        if self.state == "auth":
            if verb in ("USER", "PASS", "APOP", "AUTH", "UTF8", "STLS"):
                return getattr(self, "_" + verb)(argument, words)
            return Expect("-ERR", what=f"{verb} before login")
        if verb in ("STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "NOOP", "RSET"):
            return getattr(self, "_" + verb)(words)
        return Expect("-ERR", what=f"{verb} after login")

    def _failed_login(self, what: str) -> Expect:
        self.auth_failures += 1
        return Expect(
            "-ERR",
            check=_auth_code,
            closes=self.auth_failures >= MAX_AUTH_FAILURES,
            what=what,
        )

    def _logged_in(self) -> Expect:
        def then() -> None:
            self.state = "trans"
            self.deleted = set()

        return Expect("+OK", then=then, what="login")

    # Any state

    def _CAPA(self, words: list[bytes]) -> Expect:
        if words:
            return Expect("-ERR", what="CAPA with an argument")
        secure = self.secure

        def body(octets: bytes) -> None:
            lines = octets.split(b"\r\n")[:-2]
            assert octets.endswith(b"\r\n.\r\n"), octets
            names = {line.split(b" ")[0] for line in lines}
            for name in (b"TOP", b"UIDL", b"PIPELINING", b"USER", b"UTF8", b"SASL"):
                assert name in names, (name, lines)
            assert (b"STLS" in names) == (not secure), lines
            sasl = next(line for line in lines if line.startswith(b"SASL "))
            assert b"PLAIN" in sasl.split(), sasl

        return Expect("+OK", body=body, what="CAPA")

    def _QUIT(self, words: list[bytes]) -> Expect:
        if self.state == "trans":
            return Expect("+OK", closes=True, then=self.committed, what="QUIT commit")
        return Expect("+OK", closes=True, what="QUIT")

    # AUTHORIZATION

    def _USER(self, argument: bytes, words) -> Expect:
        if not argument:
            return Expect("-ERR", what="USER without a name")

        def then() -> None:
            self.user_pending = argument

        return Expect("+OK", then=then, what="USER")

    def _PASS(self, argument: bytes, words) -> Expect:
        user, self.user_pending = self.user_pending, None
        if user is None:
            return Expect("-ERR", what="PASS without USER")
        if user.lower() == USER.encode() and argument == PASSWORD.encode():
            return self._logged_in()
        return self._failed_login("PASS wrong")

    def _APOP(self, argument: bytes, words) -> Expect:
        name, _, digest = argument.rpartition(b" ")
        if self.challenge is None or not name or len(digest) != 32:
            return Expect("-ERR", what="APOP malformed")
        good = hashlib.md5(self.challenge + PASSWORD.encode()).hexdigest().encode()
        if name.lower() == USER.encode() and digest == good:
            return self._logged_in()
        return self._failed_login("APOP wrong")

    def _AUTH(self, argument: bytes, words) -> Expect:
        if not words:

            def body(octets: bytes) -> None:
                assert b"PLAIN\r\n" in octets.split(b"\r\n.\r\n")[0] + b"\r\n"

            return Expect("+OK", body=body, what="AUTH list")
        if words[0].upper() != b"PLAIN":
            return Expect("-ERR", what="AUTH unknown mechanism")
        if len(words) == 1:

            def then() -> None:
                self.sasl_pending = True

            return Expect("+", then=then, what="AUTH PLAIN challenge")
        return self._sasl_response(argument.partition(b" ")[2].strip(b" "))

    def _sasl_response(self, line: bytes) -> Expect:
        # RFC 5034: "*" cancels; else base64 (with "=" for empty).
        if line == b"*":
            return Expect("-ERR", what="AUTH cancelled")
        try:
            response = b"" if line == b"=" else base64.b64decode(line, validate=True)
        except ValueError:
            return self._failed_login("SASL bad base64")
        # RFC 4616: [authzid] NUL authcid NUL passwd.
        fields = response.split(b"\0")
        if len(fields) != 3 or not fields[1]:
            return self._failed_login("PLAIN malformed")
        authzid, authcid, password = fields
        if authzid and authzid != authcid:
            return self._failed_login("PLAIN authzid of another")
        if authcid.lower() == USER.encode() and password == PASSWORD.encode():
            return self._logged_in()
        return self._failed_login("PLAIN wrong")

    def _UTF8(self, argument: bytes, words) -> Expect:
        return Expect("-ERR" if words else "+OK", what="UTF8")

    def _STLS(self, argument: bytes, words) -> Expect:
        if self.secure or words:
            return Expect("-ERR", what="STLS inside TLS")

        def then() -> None:
            self.secure = True
            self.user_pending = None

        return Expect("+OK", then=then, what="STLS")

    # TRANSACTION

    def _STAT(self, words: list[bytes]) -> Expect:
        if words:
            return Expect("-ERR", what="STAT with an argument")
        live = [message for _, message in self.live()]

        def check(status: bytes) -> None:
            match = re.match(rb"\+OK (\d+) (\d+)(?:\r?\n| )", status)
            assert match, status
            assert int(match.group(1)) == len(live), (status, len(live))
            octets = int(match.group(2))
            low = sum(min(m.allowed_sizes()) for m in live)
            high = sum(max(m.allowed_sizes()) for m in live)
            assert low <= octets <= high, (status, low, high)

        return Expect("+OK", check=check, what="STAT")

    def _listing(self, words: list[bytes], uids: bool) -> Expect:
        what = "UIDL" if uids else "LIST"
        if len(words) > 1:
            return Expect("-ERR", what=f"{what} with two arguments")
        if words:
            message = self.message(words[0])
            if message is None:
                return Expect("-ERR", what=f"{what} of no message")
            number = int(words[0])

            def check(status: bytes) -> None:
                parts = status.split()
                assert parts[:2] == [b"+OK", str(number).encode()], status
                if uids:
                    assert parts[2].decode() == message.uid, (status, message.uid)
                else:
                    message.learn(int(parts[2]))

            return Expect("+OK", check=check, what=f"{what} n")
        live = self.live()

        def body(octets: bytes) -> None:
            assert octets.endswith(b".\r\n"), octets
            lines = octets.split(b"\r\n")[:-2]
            assert len(lines) == len(live), (lines, len(live))
            for line, (number, message) in zip(lines, live, strict=True):
                parts = line.split(b" ")
                assert len(parts) == 2 and parts[0] == str(number).encode(), line
                if uids:
                    assert parts[1].decode() == message.uid, (line, message.uid)
                else:
                    message.learn(int(parts[1]))

        return Expect("+OK", body=body, what=what)

    def _LIST(self, words: list[bytes]) -> Expect:
        return self._listing(words, uids=False)

    def _UIDL(self, words: list[bytes]) -> Expect:
        return self._listing(words, uids=True)

    def _RETR(self, words: list[bytes]) -> Expect:
        message = self.message(words[0]) if len(words) == 1 else None
        if message is None:
            return Expect("-ERR", what="RETR refused")
        return Expect("+OK", body=wire_form(message.data), what="RETR")

    def _TOP(self, words: list[bytes]) -> Expect:
        message = self.message(words[0]) if len(words) == 2 else None
        if message is None or not re.fullmatch(rb"[0-9]{1,10}", words[1]):
            return Expect("-ERR", what="TOP refused")
        body = dot_stuffed(top_form(message.data, int(words[1])))
        return Expect("+OK", body=body, what="TOP")

    def _DELE(self, words: list[bytes]) -> Expect:
        message = self.message(words[0]) if len(words) == 1 else None
        if message is None:
            return Expect("-ERR", what="DELE refused")
        index = int(words[0]) - 1

        def then() -> None:
            self.deleted.add(index)

        return Expect("+OK", then=then, what="DELE")

    def _NOOP(self, words: list[bytes]) -> Expect:
        return Expect("-ERR" if words else "+OK", what="NOOP")

    def _RSET(self, words: list[bytes]) -> Expect:
        if words:
            return Expect("-ERR", what="RSET with an argument")
        return Expect("+OK", then=self.deleted.clear, what="RSET")


def _lines(body: bytes) -> list[bytes]:
    """
    The lines of a multi-line reply's body, without the lone-dot line.
    """
    return body.split(b"\r\n")[:-2]


def _auth_code(status: bytes) -> None:
    assert status.startswith(b"-ERR [AUTH]"), status


# The server under test


@dataclass
class Store:
    """
    A popd serving one store for the module, and this process's way into
    the same store for seeding it.
    """

    name: str
    server: PopdServer
    seeder: Seeder
    pki: object

    def deliver(self, message: bytes) -> str:
        return self.seeder.deliver(USER, message)


def _with_database(dsn: str, database: str) -> str:
    base = dsn.partition("?")[0]
    scheme, _, rest = base.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}/{database}"


def _postgresql_database():
    """
    A fresh database of this module's own: (its DSN, a function dropping
    it); skips, saying why, without a reachable server.
    """
    try:
        import psycopg

        admin = psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=3)
    except Exception as error:  # any failure to connect: no server here
        pytest.skip(f"PostgreSQL is not reachable at {ADMIN_DSN}: {error}")
    name = f"popd_model_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return _with_database(ADMIN_DSN, name), drop


def _upgrade(directory: Path, config: Path) -> None:
    """
    Bring the SQL schema up to date: C{popd db upgrade} where the admin
    command has it, else the store's own upgrade function.
    """
    result = run_cli(
        "--config", str(config), "db", "upgrade", cwd=directory, check=False
    )
    if result.returncode == 0:
        return
    from popd.config import load_settings
    from popd.maildrops.sql import upgrade

    upgrade(load_settings(config).dsn)


def _check_store_is_used(store: Store, directory: Path) -> None:
    """
    The configured store, not another, holds a delivered message: a server
    that ignored C{[maildrop] type} would pass every other check here.
    """
    data = directory / "data"
    if store.name == "maildir":
        found = list(data.glob(f"mail/{USER}/Maildir/*/*"))
    elif store.name == "mbox":
        mbox = data / "mail" / USER / "mbox"
        found = [mbox] if mbox.is_file() and mbox.stat().st_size else []
    else:
        from popd.config import load_settings
        from popd.maildrops.sql import parse_dsn

        target = parse_dsn(load_settings(directory / "popd.toml").dsn)
        connection = target.connect()
        try:
            cursor = connection.cursor()
            cursor.execute("SELECT count(*) FROM popd_messages")
            found = [row for row in cursor.fetchall() if row[0]]
        finally:
            connection.close()
    assert found, (
        f'[maildrop] type = "{store.name}" is not the store popd delivered to; '
        f"the data directory holds: {sorted(str(p) for p in data.rglob('*'))[:20]}"
    )


@pytest.fixture(scope="module", params=["maildir", "mbox", "sqlite", "postgresql"])
def store(request, tmp_path_factory, pki):
    name = request.param
    drop_database = None
    maildrop = {"maildir": 'type = "maildir"\n', "mbox": 'type = "mbox"\n'}.get(name)
    if name == "sqlite":
        maildrop = 'type = "sql"\ndsn = "sqlite:data/popd.sqlite3"\n'
    elif name == "postgresql":
        dsn, drop_database = _postgresql_database()
        maildrop = f'type = "sql"\ndsn = "{dsn}"\n'
    directory = tmp_path_factory.mktemp(f"model-{name}")
    config = directory / "popd.toml"
    config.write_text(
        config_text(
            pki,
            apop=True,
            extra="failure_delay = 0\n"
            "[limits]\nmax_bad_commands = 1000000\n"
            f"max_auth_failures = {MAX_AUTH_FAILURES}\n"
            f"[maildrop]\n{maildrop}",
        )
    )
    (directory / "data").mkdir(mode=0o700)
    if name in ("sqlite", "postgresql"):
        _upgrade(directory, config)
    server = PopdServer(directory, config)
    seeder = None
    try:
        server.start()
        server.add_plain_user(USER, PASSWORD)
        seeder = Seeder(config)
        the_store = Store(name, server, seeder, pki)
        the_store.deliver(b"Subject: which store?\n\n")
        _check_store_is_used(the_store, directory)
        yield the_store
    finally:
        if seeder is not None:
            seeder.close()
        try:
            server.finish()
        finally:
            if drop_database is not None:
                drop_database()


# The state machine


def _render(command: Cmd, model: Model) -> bytes:
    """
    The line C{command} is on the wire, terminator included.
    """
    user = USER.encode()
    password = PASSWORD.encode()
    symbols = {
        GOOD_USER: user,
        GOOD_USER_UPPER: user.upper(),
        GOOD_PASS: password,
        CANCEL: b"*",
        EMPTY_RESPONSE: b"",
        B64_GARBAGE: b"!!not base64!!",
        PLAIN_GOOD: base64.b64encode(b"\0" + user + b"\0" + password),
        PLAIN_MALFORMED: base64.b64encode(user + b"\0" + password),
        PLAIN_AUTHZID_OTHER: base64.b64encode(b"other\0" + user + b"\0" + password),
    }
    words = []
    for arg in command.args:
        if isinstance(arg, bytes):
            words.append(arg)
        elif arg == UNKNOWN_USER:
            words.append(_unknown_name())
        elif arg == PLAIN_UNKNOWN:
            words.append(
                base64.b64encode(b"\0" + _unknown_name() + b"\0" + b"whatever")
            )
        elif arg in (APOP_GOOD, APOP_BAD):
            challenge = model.challenge or b"<none@none>"
            secret = password if arg == APOP_GOOD else b"wrong"
            name = user if arg == APOP_GOOD else _unknown_name()
            words += [name, hashlib.md5(challenge + secret).hexdigest().encode()]
        else:
            words.append(symbols[arg])
    if command.verb in ("GARBAGE", "SASL"):
        return b" ".join(words) + command.eol
    verb = {"upper": str.upper, "lower": str.lower, "title": str.title}[command.case](
        command.verb
    ).encode()
    return b" ".join([verb, *words]) + command.eol


class POP3Machine(RuleBasedStateMachine):
    """
    Random POP3 sessions against one store's server, checked by L{Model}.
    """

    store: Store  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.wire: Wire | None = None
        self.log: list[str] = []

    # Seeding

    @initialize(mailbox=mailboxes)
    def seed(self, mailbox: list[bytes]) -> None:
        """
        Empty the maildrop through a session, deliver C{mailbox}, and check
        a new session sees exactly that.
        """
        with self._session() as wire:
            count = int(wire.command("STAT").split()[1])
            if count:
                wire.send(b"".join(b"DELE %d\r\n" % n for n in range(1, count + 1)))
                for _ in range(count):
                    assert wire.line().startswith(b"+OK")
            assert wire.command("QUIT").startswith(b"+OK")
        uids = self.store.seeder.deliver_all(USER, mailbox)
        stored = {
            uid: Stored(uid, message)
            for uid, message in zip(uids, mailbox, strict=True)
        }
        # Delivered at once, they may be in any order: learn it, once.
        with self._session() as wire:
            assert wire.command("UIDL").startswith(b"+OK")
            order = [line.split()[1].decode() for line in _lines(wire.body())]
            assert wire.command("QUIT").startswith(b"+OK")
        assert sorted(order) == sorted(uids), (order, uids)
        self.model.mailbox = [stored[uid] for uid in order]
        self._verify_mailbox("after seeding")

    # Connecting

    @precondition(lambda self: self.wire is None)
    @rule(kind=st.sampled_from(["plain", "plain", "pop3s"]))
    def connect(self, kind: str) -> None:
        server = self.store.server
        if kind == "pop3s":
            context = self.store.pki.client_context()
            self.wire = Wire(
                server.pop3s_port, context=context, source=fresh_loopback()
            )
        else:
            self.wire = Wire(server.pop3_port, source=fresh_loopback())
        self.log.append(f"connect {kind}")
        assert self.wire.greeting.startswith(b"+OK"), self.wire.greeting
        self.model.connected(kind == "pop3s", self.wire.greeting)

    @precondition(
        lambda self: (
            self.model.state == "auth"
            and not self.model.secure
            and not self.model.sasl_pending
        )
    )
    @rule(case=cases)
    def stls(self, case: str) -> None:
        self._run([Cmd("STLS", case=case)])

    @precondition(
        lambda self: self.model.state == "auth" and not self.model.sasl_pending
    )
    @rule(
        how=st.sampled_from(
            ["USER/PASS", "USER upper/PASS", "APOP", "AUTH PLAIN", "AUTH PLAIN +"]
        ),
        then=st.lists(transaction_commands, max_size=4),
    )
    def login(self, how: str, then: list[Cmd]) -> None:
        """
        A correct login, maybe pipelined with commands for after it.
        """
        if how.startswith("USER"):
            user = GOOD_USER_UPPER if "upper" in how else GOOD_USER
            login = [Cmd("USER", (user,)), Cmd("PASS", (GOOD_PASS,))]
        elif how == "APOP":
            login = [Cmd("APOP", (APOP_GOOD,))]
        elif how == "AUTH PLAIN":
            login = [Cmd("AUTH", (b"PLAIN", PLAIN_GOOD))]
        else:
            login = [Cmd("AUTH", (b"PLAIN",)), Cmd("SASL", (PLAIN_GOOD,))]
        self._run(login + then)

    # Commands

    @precondition(lambda self: self.wire is not None)
    @rule(command=commands)
    def one_command(self, command: Cmd) -> None:
        self._run([command])

    @precondition(lambda self: self.wire is not None)
    @rule(
        batch=st.lists(commands, min_size=2, max_size=8),
        chunk=st.sampled_from([None, None, 1, 3, 7]),
    )
    def pipeline(self, batch: list[Cmd], chunk: int | None) -> None:
        """
        Several commands in one write (C{chunk=None}) or dribbled a few
        octets per packet.
        """
        self._run(batch, chunk)

    @precondition(lambda self: self.model.state == "trans")
    @rule(batch=st.lists(transaction_commands, min_size=1, max_size=6))
    def transaction(self, batch: list[Cmd]) -> None:
        """
        Commands of the TRANSACTION state, pipelined.
        """
        self._run(batch)

    # Leaving

    @precondition(lambda self: self.wire is not None)
    @rule(
        how=st.sampled_from(["QUIT", "close", "reset", "RETR, close", "RETR, reset"]),
        data=st.data(),
    )
    def leave(self, how: str, data) -> None:
        """
        QUIT, or hang up without it (maybe while a message comes): then
        nothing may be deleted.  A new session checks either way.
        """
        if how == "QUIT":
            self._run([Cmd("QUIT")])
            return
        logged_in = self.model.state == "trans"
        if how.startswith("RETR") and logged_in and self.model.live():
            number, _message = data.draw(st.sampled_from(self.model.live()))
            self.log.append(f"RETR {number}, then hang up")
            self.wire.send(b"RETR %d\r\n" % number)
        self.log.append(f"hang up ({how})")
        self._hang_up(rude=how.endswith("reset"))
        if logged_in:
            self._verify_mailbox(f"after a dropped connection ({how})")

    def teardown(self) -> None:
        if self.wire is not None:
            self.wire.close()
            self.wire = None

    # Running commands

    def _run(self, batch: list[Cmd], chunk: int | None = None) -> None:
        """
        Send C{batch} (truncated after a STLS that starts TLS, since what
        follows in the same packet is to be discarded), then check each
        reply against the model in order.
        """
        model = self.model
        lines = []
        for command in batch:
            lines.append(_render(command, model))
            if command.verb == "QUIT":
                # Nothing is answered after it; stop sending there.
                break
            if command.verb == "STLS" and model.state == "auth" and not model.secure:
                # Whether it starts TLS depends on the replies before it;
                # stop here either way, and only ever with a clean line.
                break
        data = b"".join(lines)
        self.log.append(f"send {data[:300]!r}" + (f" in {chunk}s" if chunk else ""))
        try:
            for start in range(0, len(data), chunk or len(data) or 1):
                self.wire.send(data[start : start + (chunk or len(data))])
        except (BrokenPipeError, ConnectionResetError):
            # The server hung up (the third failed login) while the rest
            # was on its way: the replies up to then are still to be read.
            self.log.append("  (the server hung up while we were sending)")
        for line in lines:
            text = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            expect = model.expect(text)
            self._check_reply(expect, line)
            if expect.closes:
                break
            if expect.what == "STLS":
                self.wire.starttls(self.store.pki.client_context())
                break

    def _check_reply(self, expect: Expect, line: bytes) -> None:
        where = f"{expect.what}: {line[:80]!r}"
        try:
            status = self.wire.line()
        except (Closed, TimeoutError) as error:
            raise AssertionError(f"{where}: no reply ({error})") from None
        self.log.append(f"  {status[:100]!r}")
        assert status.endswith(b"\r\n"), (where, status)
        if expect.status == "+":
            assert status in (b"+ \r\n", b"+\r\n"), (where, status)
        else:
            first = status.split(b" ", 1)[0].rstrip(b"\r\n")
            assert first == expect.status.encode(), (where, status)
        if expect.check is not None:
            expect.check(status)
        if expect.body is not None and expect.status == "+OK":
            body = self.wire.body()
            if callable(expect.body):
                expect.body(body)
            else:
                assert body == expect.body, (
                    where,
                    len(body),
                    len(expect.body),
                    body[:200],
                    expect.body[:200],
                )
        if expect.then is not None:
            expect.then()
        if expect.closes:
            self._expect_hang_up(where)

    def _expect_hang_up(self, where: str) -> None:
        """
        After QUIT or the last failed login: the server closes the
        connection (a last -ERR line may come first).
        """
        for _ in range(3):
            try:
                extra = self.wire.line()
            except Closed:
                break
            except TimeoutError:
                raise AssertionError(f"{where}: the server did not hang up") from None
            assert extra.startswith(b"-ERR"), (where, extra)
        else:
            raise AssertionError(f"{where}: the server did not hang up")
        committed = self.model.state == "trans"
        self.wire.close()
        self.wire = None
        self.model.disconnected()
        if committed:
            self._verify_mailbox("after QUIT")

    def _hang_up(self, rude: bool) -> None:
        if rude:
            self.wire.abort()
        else:
            self.wire.close()
        self.wire = None
        self.model.disconnected()

    # Checking the maildrop in a session of its own

    def _session(self) -> Wire:
        """
        A logged-in session, trying again (bounded) while the maildrop is
        still locked by a connection the server has not yet seen go.
        """
        deadline = time.monotonic() + 10
        for _ in range(1000):
            wire = Wire(self.store.server.pop3_port)
            assert wire.command(f"USER {USER}").startswith(b"+OK")
            reply = wire.command(f"PASS {PASSWORD}")
            if reply.startswith(b"+OK"):
                return wire
            wire.close()
            assert b"[IN-USE]" in reply and time.monotonic() < deadline, reply
            time.sleep(0.02)
        raise AssertionError("the maildrop stayed locked")

    def _verify_mailbox(self, when: str) -> None:
        """
        A new session sees exactly the model's maildrop: its UIDs in order,
        its sizes; and changes nothing.
        """
        expected = self.model.mailbox
        with self._session() as wire:
            status = wire.command("UIDL")
            assert status.startswith(b"+OK"), (when, status)
            uids = [
                line.split()[1].decode() for line in wire.body().split(b"\r\n")[:-2]
            ]
            assert uids == [m.uid for m in expected], (when, uids, expected)
            assert wire.command("LIST").startswith(b"+OK")
            sizes = [int(line.split()[1]) for line in wire.body().split(b"\r\n")[:-2]]
            for message, size in zip(expected, sizes, strict=True):
                message.learn(size)
            stat = wire.command("STAT").split()
            assert stat[1:3] == [str(len(expected)).encode(), str(sum(sizes)).encode()]
            assert wire.command("QUIT").startswith(b"+OK")


def test_model(store: Store) -> None:
    """
    Random sessions against each store agree with the model, reply by reply.
    """
    POP3Machine.store = store
    run_state_machine_as_test(POP3Machine, settings=SETTINGS)
