"""
Tests for popd.auth.throttle and its use by the protocol: the failure
delay, the growing penalty per address and per user, its decay, LOGIN-DELAY,
and the log lines of login attempts.  Time is a L{Clock}; nothing sleeps.
"""

from __future__ import annotations

import hashlib
import re
from base64 import b64encode

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from popd.auth.chain import CheckerChain
from popd.auth.errors import AuthUnavailable
from popd.auth.throttle import (
    FREE_FAILURES,
    MAX_DELAY,
    PENALTY_START,
    QUIET_PERIOD,
    LoginThrottle,
    address_key,
    user_key,
)
from popd.protocol import POP3Factory, POP3Server, SessionPolicy
from popd.realm import MaildropRealm
from popd.testing import MemoryMaildropProvider

OK_USER = b"+OK\r\n"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"


def peer(host: str, port: int = 40000):
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


class Session:
    """
    One session on an in-memory transport; the factory's clock is the time.
    """

    def __init__(self, factory: POP3Factory, host: str = "192.0.2.7") -> None:
        self.clock: Clock = factory.reactor
        address = peer(host)
        self.transport = StringTransport(peerAddress=address)
        self.protocol = factory.buildProtocol(address)
        self.protocol.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def send(self, data: bytes) -> bytes:
        self.protocol.dataReceived(data)
        self.clock.advance(0)
        return self.take()

    def wait(self, seconds: float) -> bytes:
        """
        Let C{seconds} pass, in steps of at most half a second so that
        calls scheduled meanwhile run too.
        """
        steps = max(1, int(seconds * 2 + 0.999))
        for _ in range(steps):
            self.clock.advance(seconds / steps)
        return self.take()

    def login(self, user: bytes, password: bytes) -> bytes:
        return self.send(b"USER " + user + b"\r\nPASS " + password + b"\r\n")

    def failure_delay(self, user: bytes, password: bytes = b"wrong") -> float:
        """
        Send a failing USER/PASS and return how long its reply took: the
        reply is not there a moment before, and is there at that time.
        """
        assert self.login(user, password) == OK_USER
        start = self.clock.seconds()
        # The earliest call is the reply's: idle timeouts are minutes away,
        # and other sessions' timers (an abort after their idle timeout) are
        # not this session's business.
        delay = (
            min(
                call.getTime()
                for call in self.clock.getDelayedCalls()
                if not isinstance(getattr(call.func, "__self__", None), POP3Server)
                or call.func.__self__ is self.protocol
            )
            - start
        )
        self.clock.advance(delay - 0.01)
        assert self.take() == b""
        self.clock.advance(0.01)
        assert self.take().startswith(AUTH_FAILED)
        return round(delay, 3)


class RefusingChecker:
    """
    A user database that knows carol but refuses her (a disabled user).
    """

    credentialInterfaces = InMemoryUsernamePasswordDatabaseDontUse.credentialInterfaces

    def requestAvatarId(self, credentials):
        return fail(UnauthorizedLogin("disabled"))


class UnavailableChecker:
    credentialInterfaces = InMemoryUsernamePasswordDatabaseDontUse.credentialInterfaces

    def requestAvatarId(self, credentials):
        return fail(AuthUnavailable("database down"))


@pytest.fixture
def provider() -> MemoryMaildropProvider:
    store = MemoryMaildropProvider()
    store.deliver("alice", b"Subject: one\n\nbody\n")
    store.deliver("bob", b"Subject: two\n\nbody\n")
    return store


def make_factory(provider, checkers=None, **policy) -> POP3Factory:
    if checkers is None:
        checkers = [
            InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret", bob=b"hunter2")
        ]
    portal = Portal(MaildropRealm(provider), [CheckerChain(checkers)])
    policy = {"plaintext": "always", "hostname": "pop.example", **policy}
    return POP3Factory(portal, SessionPolicy(**policy), reactor=Clock())


# The throttle on its own


def delays(throttle, count, base=2.0, host="192.0.2.1", user=b"alice", now=0.0):
    return [throttle.failed(base, host, user, now) for _ in range(count)]


def test_documented_numbers():
    assert (FREE_FAILURES, PENALTY_START, MAX_DELAY, QUIET_PERIOD) == (
        3,
        4.0,
        15.0,
        300.0,
    )


def test_penalty_doubles_up_to_the_cap():
    assert delays(LoginThrottle(), 8) == [2, 2, 2, 4, 8, 15, 15, 15]


def test_penalty_without_a_base_delay():
    assert delays(LoginThrottle(), 6, base=0) == [0, 0, 0, 4, 8, 15]


def test_a_long_base_delay_is_kept():
    assert delays(LoginThrottle(), 6, base=20) == [20] * 6


def test_penalty_per_address_across_user_names():
    throttle = LoginThrottle()
    got = [throttle.failed(2, "192.0.2.1", f"u{i}", 0) for i in range(6)]
    assert got == [2, 2, 2, 4, 8, 15]
    assert throttle.failed(2, "192.0.2.2", "u0", 0) == 2


def test_penalty_per_user_across_addresses():
    throttle = LoginThrottle()
    got = [throttle.failed(2, f"198.51.100.{i}", b"Alice", 0) for i in range(6)]
    assert got == [2, 2, 2, 4, 8, 15]
    assert throttle.failed(2, "198.51.100.99", b"ALICE", 0) == 15
    assert throttle.failed(2, "198.51.100.99", b"bob", 0) == 2


def test_penalty_decays_by_one_step_per_quiet_period():
    throttle = LoginThrottle()
    delays(throttle, 10)
    assert throttle.delay(2, "192.0.2.1", b"alice", 0) == 15
    assert throttle.delay(2, "192.0.2.1", b"alice", QUIET_PERIOD - 1) == 15
    assert throttle.delay(2, "192.0.2.1", b"alice", QUIET_PERIOD) == 8
    assert throttle.delay(2, "192.0.2.1", b"alice", 2 * QUIET_PERIOD) == 4
    assert throttle.delay(2, "192.0.2.1", b"alice", 3 * QUIET_PERIOD) == 2
    # Past the cap the count stopped growing: six quiet periods forget it.
    assert throttle.failed(2, "192.0.2.1", b"alice", 3 * QUIET_PERIOD) == 4
    assert throttle.delay(2, "192.0.2.1", b"alice", 4 * QUIET_PERIOD) == 2


def test_a_failure_restarts_the_quiet_period():
    throttle = LoginThrottle()
    delays(throttle, 6)
    throttle.failed(2, "192.0.2.1", b"alice", QUIET_PERIOD - 1)
    assert throttle.delay(2, "192.0.2.1", b"alice", QUIET_PERIOD + 1) == 15


def test_forgotten_keys_are_dropped():
    throttle = LoginThrottle()
    delays(throttle, 6)
    throttle.delay(2, "192.0.2.1", b"alice", 6 * QUIET_PERIOD)
    assert len(throttle._addresses) == len(throttle._users) == 0


def test_delay_counts_nothing():
    throttle = LoginThrottle()
    for _ in range(10):
        assert throttle.delay(2, "192.0.2.1", b"alice", 0) == 2
    assert delays(throttle, 4) == [2, 2, 2, 4]


def test_memory_is_bounded():
    throttle = LoginThrottle(max_keys=3)
    for i in range(10):
        throttle.failed(2, f"192.0.2.{i}", f"user{i}", 0)
        throttle.logged_in(f"user{i}", 0)
    assert len(throttle._addresses) == len(throttle._users) == 3
    assert len(throttle._logins) == 3
    assert throttle.login_wait("user9", 1, 60) == 59
    assert throttle.login_wait("user0", 1, 60) == 0


@pytest.mark.parametrize(
    "host, key",
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.9", "192.0.2.9"),
        ("/run/popd.sock", None),
        (None, None),
    ],
)
def test_address_keys(host, key):
    assert address_key(host) == key


def test_user_keys():
    assert user_key(b"Alice") == user_key("ALICE") == "alice"
    assert user_key(b"\xff") == "\ufffd"
    assert len(user_key("x" * 1000)) == 256
    assert user_key(b"") is None


def test_ipv6_neighbours_share_a_penalty():
    throttle = LoginThrottle()
    got = [throttle.failed(2, f"2001:db8::{i}", f"u{i}", 0) for i in range(1, 6)]
    assert got == [2, 2, 2, 4, 8]


def test_login_wait():
    throttle = LoginThrottle()
    assert throttle.login_wait("alice", 0, 60) == 0
    throttle.logged_in(b"Alice", 100)
    assert throttle.login_wait("alice", 130, 60) == 30
    assert throttle.login_wait("bob", 130, 60) == 0
    assert throttle.login_wait("alice", 160, 60) == 0


# The protocol


def test_failed_login_reply_waits_for_the_failure_delay(provider):
    session = Session(make_factory(provider, failure_delay=2))
    assert session.login(b"alice", b"wrong") == OK_USER
    assert session.wait(1.99) == b""
    assert session.wait(0.02) == AUTH_FAILED


def test_default_failure_delay_is_two_seconds(provider):
    assert SessionPolicy().failure_delay == 2.0
    session = Session(make_factory(provider))
    assert session.failure_delay(b"alice") == 2.0


def test_other_clients_are_served_during_the_delay(provider):
    factory = make_factory(provider, failure_delay=2)
    waiting = Session(factory)
    assert waiting.login(b"alice", b"wrong") == OK_USER
    good = Session(factory, host="192.0.2.8")
    assert good.login(b"bob", b"hunter2").startswith(b"+OK\r\n+OK Logged in")
    assert waiting.take() == b""
    assert waiting.wait(2) == AUTH_FAILED


def test_commands_wait_behind_the_delayed_reply(provider):
    session = Session(make_factory(provider, failure_delay=2))
    reply = session.send(b"USER alice\r\nPASS wrong\r\nNOOP\r\nCAPA\r\n")
    assert reply == OK_USER
    later = session.wait(2)
    assert later.startswith(AUTH_FAILED + b"-ERR NOOP is not valid")
    assert b"+OK Capability list follows" in later


def test_correct_password_is_not_delayed(provider):
    factory = make_factory(provider, failure_delay=2)
    for _ in range(10):
        Session(factory).failure_delay(b"alice")
    session = Session(factory)
    assert session.login(b"alice", b"secret").startswith(b"+OK\r\n+OK Logged in")


def test_growing_penalty_per_address(provider):
    factory = make_factory(provider, failure_delay=2, max_auth_failures=100)
    session = Session(factory)
    got = [session.failure_delay(b"user%d" % i) for i in range(7)]
    assert got == [2, 2, 2, 4, 8, 15, 15]
    assert Session(factory, host="192.0.2.99").failure_delay(b"someone") == 2


def test_growing_penalty_per_user(provider):
    factory = make_factory(provider, failure_delay=2)
    got = [
        Session(factory, host=f"198.51.100.{i}").failure_delay(b"alice")
        for i in range(6)
    ]
    assert got == [2, 2, 2, 4, 8, 15]
    stranger = Session(factory, host="203.0.113.5")
    assert stranger.failure_delay(b"ALICE") == 15
    assert Session(factory, host="203.0.113.6").failure_delay(b"bob") == 2


def test_penalty_decays_after_quiet_periods(provider):
    factory = make_factory(provider, failure_delay=2)
    host = "192.0.2.50"
    for i in range(6):
        Session(factory, host).failure_delay(b"u%d" % i)
    assert Session(factory, host).failure_delay(b"u6") == 15
    factory.reactor.advance(QUIET_PERIOD)
    assert Session(factory, host).failure_delay(b"u7") == 15  # 5, then 6 again
    factory.reactor.advance(3 * QUIET_PERIOD)
    assert Session(factory, host).failure_delay(b"u8") == 4  # 3, then 4
    factory.reactor.advance(6 * QUIET_PERIOD)
    assert Session(factory, host).failure_delay(b"u9") == 2


def test_trusted_networks_get_the_penalty_too(provider):
    factory = make_factory(provider, plaintext="tls-only", failure_delay=2)
    got = [Session(factory, host="127.0.0.1").failure_delay(b"alice") for _ in "abcd"]
    assert got == [2, 2, 2, 4]


@pytest.mark.parametrize("delay", [0, 2])
def test_too_many_failures_still_disconnect(provider, delay):
    session = Session(make_factory(provider, failure_delay=delay))
    replies = session.send(b"USER a\r\nPASS b\r\n" * 3 + b"NOOP\r\n")
    replies += session.wait(60)
    assert replies.count(AUTH_FAILED) == 3
    assert replies.endswith(b"-ERR [AUTH] Too many authentication failures.\r\n")
    assert session.transport.disconnecting


def test_idle_timeout_does_not_cut_a_delayed_reply(provider):
    session = Session(make_factory(provider, failure_delay=10, auth_timeout=5))
    assert session.login(b"alice", b"wrong") == OK_USER
    assert session.wait(10) == AUTH_FAILED
    assert not session.transport.disconnecting
    assert session.wait(5) == b"-ERR Disconnected for inactivity.\r\n"


def test_disconnected_client_gets_nothing_later(provider):
    session = Session(make_factory(provider, failure_delay=2))
    assert session.login(b"alice", b"wrong") == OK_USER
    session.protocol.connectionLost(None)
    assert session.wait(2) == b""


def refusals(provider, **policy) -> dict[str, tuple[bytes, float]]:
    """
    The reply and its delay for each kind of failed login.
    """
    factory = make_factory(
        provider,
        checkers=[
            InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret", bob=b"hunter2"),
            RefusingChecker(),
        ],
        failure_delay=2,
        **policy,
    )
    holder = Session(factory, host="192.0.2.200")
    assert holder.login(b"bob", b"hunter2").startswith(b"+OK\r\n+OK Logged in")
    outcomes = {}
    cases = {
        "unknown user": b"mallory",
        "wrong password": b"alice",
        "disabled user": b"carol",
        "locked maildrop, wrong password": b"bob",
    }
    for number, (case, user) in enumerate(cases.items()):
        # A fresh address each time, so no penalty tells them apart.
        session = Session(factory, host=f"198.51.100.{number}")
        assert session.login(user, b"nope") == OK_USER
        assert session.wait(1.99) == b""
        outcomes[case] = session.wait(0.02)
    return outcomes


def test_refusals_are_indistinguishable(provider):
    outcomes = refusals(provider)
    assert set(outcomes.values()) == {AUTH_FAILED}, outcomes


def test_in_use_after_a_correct_password_waits_the_same_delay(provider):
    factory = make_factory(provider, failure_delay=2)
    Session(factory).login(b"alice", b"secret")
    second = Session(factory, host="192.0.2.9")
    assert second.login(b"alice", b"secret") == OK_USER
    assert second.wait(1.99) == b""
    assert second.wait(0.02) == (
        b"-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n"
    )


def test_unavailable_user_database_is_sys_temp_after_the_delay(provider):
    factory = make_factory(provider, checkers=[UnavailableChecker()], failure_delay=2)
    session = Session(factory)
    assert session.login(b"alice", b"secret") == OK_USER
    assert session.wait(2) == (
        b"-ERR [SYS/TEMP] Authentication is temporarily unavailable.\r\n"
    )
    # Not a wrong password: it does not count towards max_auth_failures.
    assert session.protocol._auth_failures == 0


# LOGIN-DELAY


def test_login_delay_is_advertised_and_enforced(provider):
    factory = make_factory(provider, failure_delay=2, login_delay=60)
    first = Session(factory)
    assert b"LOGIN-DELAY 60\r\n" in first.send(b"CAPA\r\n")
    assert first.login(b"alice", b"secret").startswith(b"+OK\r\n+OK Logged in")
    assert first.send(b"QUIT\r\n").startswith(b"+OK")

    factory.reactor.advance(30)
    again = Session(factory)
    assert again.login(b"alice", b"secret") == OK_USER
    assert again.wait(2) == (
        b"-ERR [LOGIN-DELAY] Logged in less than 60 seconds ago; "
        b"wait 30 more seconds.\r\n"
    )
    assert again.protocol.state == "AUTHORIZATION"
    # The refused login released the maildrop, does not count as a failed
    # password, and other users are not held back.
    assert again.protocol._auth_failures == 0
    assert Session(factory).login(b"bob", b"hunter2").startswith(b"+OK\r\n+OK")

    factory.reactor.advance(28)
    assert again.login(b"alice", b"secret").startswith(b"+OK\r\n+OK Logged in")


def test_login_delay_applies_to_sasl(provider):
    factory = make_factory(provider, failure_delay=0, login_delay=60)
    session = Session(factory)
    assert session.login(b"alice", b"secret").startswith(b"+OK\r\n+OK")
    session.send(b"QUIT\r\n")
    again = Session(factory)
    reply = again.send(b"AUTH PLAIN " + b64encode(b"\0alice\0secret") + b"\r\n")
    assert reply.startswith(b"-ERR [LOGIN-DELAY]")


def test_login_delay_counted_from_the_last_successful_login(provider):
    factory = make_factory(provider, failure_delay=0, login_delay=60)
    session = Session(factory)
    assert session.login(b"alice", b"secret").startswith(b"+OK\r\n+OK")
    session.send(b"QUIT\r\n")
    for _ in range(5):
        factory.reactor.advance(11)
        refused = Session(factory).login(b"alice", b"secret")
        assert refused.startswith(b"+OK\r\n-ERR [LOGIN-DELAY]")
    factory.reactor.advance(5)
    assert Session(factory).login(b"alice", b"secret").startswith(b"+OK\r\n+OK")


def test_login_delay_zero_or_unset_enforces_nothing(provider):
    for login_delay in (None, 0):
        factory = make_factory(provider, failure_delay=0, login_delay=login_delay)
        for _ in range(2):
            session = Session(factory)
            assert session.login(b"alice", b"secret").startswith(b"+OK\r\n+OK")
            session.send(b"QUIT\r\n")


# Logging


def captured(action) -> list[dict]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        action()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return events


def attempts(events) -> list[dict]:
    return [
        event
        for event in events
        if re.match(r"login( failed| refused)? user=", event.get("log_format", ""))
    ]


def test_every_attempt_is_logged_with_address_and_mechanism_never_the_secret(
    provider,
):
    factory = make_factory(provider, failure_delay=0, apop=True)

    def run():
        Session(factory, host="192.0.2.1").login(b"alice", b"pass-word-one")
        session = Session(factory, host="192.0.2.2")
        session.send(b"AUTH PLAIN " + b64encode(b"\0bob\0pass-word-two") + b"\r\n")
        session = Session(factory, host="192.0.2.3")
        challenge = re.search(rb"<[^>]+>", session.greeting).group()
        digest = hashlib.md5(challenge + b"pass-word-three").hexdigest().encode()
        session.send(b"APOP alice " + digest + b"\r\n")
        Session(factory, host="192.0.2.4").login(b"bob", b"hunter2")

    events = captured(run)
    logged = [
        (e["log_format"].split(" user=")[0], e["user"], e["client"], e["mechanism"])
        for e in attempts(events)
    ]
    assert logged == [
        ("login failed", "alice", "192.0.2.1", "USER"),
        ("login failed", "bob", "192.0.2.2", "PLAIN"),
        ("login failed", "alice", "192.0.2.3", "APOP"),
        ("login", "bob", "192.0.2.4", "USER"),
    ]
    text = repr(events)
    for secret in ("pass-word-one", "pass-word-two", "pass-word-three", "hunter2"):
        assert secret not in text
    assert b64encode(b"\0bob\0pass-word-two").decode() not in text


def test_logged_user_names_are_printable(provider):
    factory = make_factory(provider, failure_delay=0)
    events = captured(lambda: Session(factory).login(b"evil\x1b[2J", b"x"))
    (event,) = attempts(events)
    assert event["user"] == "evil?[2J"
