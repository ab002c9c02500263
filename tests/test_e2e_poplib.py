"""
End to end with Python's poplib (and a bare socket where the exact bytes
matter) against a real C{twistd -n popd}: plain POP3 from loopback, STLS,
POP3S, APOP, every command, the deletion rules, locking, pipelining, and a
server that only allows plaintext logins over TLS.
"""

from __future__ import annotations

import base64
import poplib
import re

import pytest
from helpers.popd_e2e import (
    MESSAGES,
    RawPOP3,
    dot_stuffed,
    downloaded,
    fresh_loopback,
    joined,
    login_when_unlocked,
    messages_by_number,
    to_crlf,
    top_form,
    wire_form,
)

pytestmark = pytest.mark.e2e

# PASS takes the rest of the line: a password may hold spaces.
PASSWORD = "correct horse battery staple"
APOP_SECRET = "tanstaaf"
SMALL = ("dots", "crlf")

# Users whose maildrop the tests change, one per test.  Tests that fail
# logins on purpose connect from addresses of their own (fresh_loopback):
# popd delays failures more and more per client address.
STATEFUL_USERS = ("bob", "carol", "dave", "erin", "pipe", "drop", "burst")


@pytest.fixture(scope="module")
def server(popd_factory):
    return popd_factory("poplib", apop=True)


@pytest.fixture(scope="module")
def mail(server) -> dict[str, dict[str, bytes]]:
    """
    The users and what was delivered to them: user -> {UID: message}.

    alice (ARGON2ID, added with C{popd adduser}) has every seeded message;
    the users that change their maildrop have two small ones; paul is the
    {PLAIN} user for APOP.
    """
    server.add_user("alice", PASSWORD)
    # {PLAIN} passwords log in quickly; alice has the default hash.
    for user in STATEFUL_USERS:
        server.add_plain_user(user, PASSWORD)
    server.add_plain_user("paul", APOP_SECRET)
    deliveries = [("alice", MESSAGES[name]) for name in MESSAGES]
    deliveries += [(user, MESSAGES[name]) for user in STATEFUL_USERS for name in SMALL]
    deliveries += [("paul", MESSAGES["plain"]), ("paul", MESSAGES["eight_bit"])]
    uids = server.deliver_all(deliveries)
    mail: dict[str, dict[str, bytes]] = {}
    for (user, message), uid in zip(deliveries, uids, strict=True):
        mail.setdefault(user, {})[uid] = message
    return mail


def plain_response(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def login(server, user: str, password: str = PASSWORD) -> poplib.POP3:
    client = server.poplib()
    client.user(user)
    client.pass_(password)
    return client


def check_all_messages(client: poplib.POP3, expected: dict[str, bytes]) -> None:
    """
    RETR of every message gives exactly the delivered bytes in CRLF form,
    and LIST gives their CRLF sizes.
    """
    by_number = messages_by_number(client, expected)
    assert sorted(by_number) == list(range(1, len(expected) + 1))
    _reply, listing, _octets = client.list()
    sizes = {int(n): int(size) for n, size in (line.split() for line in listing)}
    for number, message in sorted(by_number.items()):
        _reply, lines, _octets = client.retr(number)
        assert joined(lines) == downloaded(message), f"message {number}"
        assert sizes[number] in (len(to_crlf(message)), len(downloaded(message)))


# CAPA


def test_capa_plain_from_loopback(server, mail):
    client = server.poplib()
    try:
        capa = client.capa()
    finally:
        client.quit()
    for name in ("TOP", "UIDL", "USER", "RESP-CODES", "PIPELINING", "STLS"):
        assert name in capa, capa
    # Loopback is trusted: plaintext SASL is on offer too.
    assert "PLAIN" in capa.get("SASL", []), capa


def test_capa_after_stls_has_no_stls(server, pki, mail):
    client = server.poplib()
    try:
        client.stls(context=pki.client_context())
        capa = client.capa()
        with pytest.raises(poplib.error_proto, match="-ERR"):
            client._shortcmd("STLS")
    finally:
        client.quit()
    assert "STLS" not in capa, capa
    assert "USER" in capa and "PIPELINING" in capa, capa


def test_capa_pop3s_has_no_stls(server, pki, mail):
    client = server.poplib_ssl(pki.client_context())
    try:
        capa = client.capa()
        with pytest.raises(poplib.error_proto, match="-ERR"):
            client._shortcmd("STLS")
    finally:
        client.quit()
    assert "STLS" not in capa, capa
    assert "USER" in capa and "TOP" in capa, capa


# Retrieval, byte for byte


def test_retr_plain_byte_exact(server, mail):
    client = login(server, "alice")
    try:
        count, octets = client.stat()
        assert count == len(MESSAGES)
        assert octets >= sum(len(to_crlf(m)) for m in MESSAGES.values())
        check_all_messages(client, mail["alice"])
    finally:
        client.quit()


def test_retr_wire_form_exact(server, mail):
    """
    The octets on the wire: CRLF, dot-stuffed, a final CRLF added where
    the message had none, then the lone-dot line.
    """
    expected = mail["alice"]
    with RawPOP3(server.pop3_port) as raw:
        assert raw.greeting.startswith(b"+OK")
        assert raw.command("USER alice").startswith(b"+OK")
        assert raw.command(f"PASS {PASSWORD}").startswith(b"+OK")
        assert raw.command("UIDL").startswith(b"+OK")
        listing = raw.body()
        numbers = {}
        for line in listing.split(b"\r\n")[:-2]:
            number, uid = line.split()
            numbers[int(number)] = expected[uid.decode()]
        for number, message in sorted(numbers.items()):
            status = raw.command(f"RETR {number}")
            assert status.startswith(b"+OK"), status
            assert raw.body() == wire_form(message), f"message {number}"
        assert raw.command("QUIT").startswith(b"+OK")


def test_stls_then_login(server, pki, mail):
    client = server.poplib()
    try:
        client.stls(context=pki.client_context())
        client.user("alice")
        client.pass_(PASSWORD)
        check_all_messages(client, mail["alice"])
    finally:
        client.quit()


def test_pop3s(server, pki, mail):
    client = server.poplib_ssl(pki.client_context())
    try:
        client.user("alice")
        client.pass_(PASSWORD)
        check_all_messages(client, mail["alice"])
    finally:
        client.quit()


def test_top(server, mail):
    client = login(server, "alice")
    try:
        for number, message in messages_by_number(client, mail["alice"]).items():
            for body_lines in (0, 1, 3):
                _reply, lines, _octets = client.top(number, body_lines)
                assert joined(lines) == top_form(message, body_lines), (
                    number,
                    body_lines,
                )
    finally:
        client.quit()


def test_uidl_list_stat_agree(server, mail):
    expected = mail["alice"]
    client = login(server, "alice")
    try:
        _reply, uid_lines, _octets = client.uidl()
        uids = dict(line.decode().split() for line in uid_lines)
        assert sorted(uids.values()) == sorted(expected)
        _reply, list_lines, _octets = client.list()
        sizes = dict(line.decode().split() for line in list_lines)
        count, octets = client.stat()
        assert count == len(uids) == len(sizes)
        assert octets == sum(int(size) for size in sizes.values())
        for uid in uids.values():
            # RFC 1939 section 7: 1 to 70 characters from 0x21 to 0x7E.
            assert re.fullmatch(r"[\x21-\x7e]{1,70}", uid), uid
        for number, uid in uids.items():
            assert client.uidl(number).decode().split()[1:] == [number, uid]
            assert client.list(number).decode().split()[1:] == [number, sizes[number]]
        with pytest.raises(poplib.error_proto, match="-ERR"):
            client.retr(count + 1)
    finally:
        client.quit()


def test_uids_stable_across_sessions(server, mail):
    uidls = []
    for _ in range(2):
        client = login(server, "alice")
        try:
            uidls.append(client.uidl()[1])
        finally:
            client.quit()
    assert uidls[0] == uidls[1]


# APOP and failed logins


def test_apop_plain_user(server, mail):
    client = server.poplib()
    try:
        assert b"<" in client.getwelcome(), client.getwelcome()
        client.apop("paul", APOP_SECRET)
        check_all_messages(client, mail["paul"])
    finally:
        client.quit()


def test_apop_wrong_secret(server, mail):
    client = server.poplib(fresh_loopback())
    try:
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            client.apop("paul", "not the secret")
    finally:
        client.quit()


def test_apop_refused_for_hashed_password(server, mail):
    # APOP needs the plaintext on the server: an ARGON2ID user cannot use it.
    client = server.poplib(fresh_loopback())
    try:
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            client.apop("alice", PASSWORD)
    finally:
        client.quit()


@pytest.mark.parametrize("user", ["alice", "paul", "nobody"])
def test_wrong_password(server, mail, user):
    client = server.poplib(fresh_loopback())
    try:
        client.user(user)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            client.pass_("wrong password")
    finally:
        client.quit()


# Deletion happens at QUIT, and only then


def test_dele_then_quit_removes(server, mail):
    expected = mail["bob"]
    client = login(server, "bob")
    doomed = client.uidl(1).split()[2].decode()
    client.dele(1)
    assert client.stat()[0] == len(expected) - 1
    with pytest.raises(poplib.error_proto, match="-ERR"):
        client.retr(1)
    client.quit()

    client = login(server, "bob")
    try:
        assert client.stat()[0] == len(expected) - 1
        uids = [line.split()[1].decode() for line in client.uidl()[1]]
        assert doomed not in uids
        assert sorted(uids) == sorted(set(expected) - {doomed})
        survivors = {uid: expected[uid] for uid in uids}
        check_all_messages(client, survivors)
    finally:
        client.quit()


def test_rset_undeletes(server, mail):
    expected = mail["dave"]
    client = login(server, "dave")
    client.dele(1)
    client.dele(2)
    assert client.stat()[0] == len(expected) - 2
    client.rset()
    assert client.stat()[0] == len(expected)
    client.quit()

    client = login(server, "dave")
    try:
        assert client.stat()[0] == len(expected)
        check_all_messages(client, expected)
    finally:
        client.quit()


def test_dropped_connection_deletes_nothing(server, mail):
    expected = mail["carol"]
    client = login(server, "carol")
    client.dele(1)
    client.dele(2)
    # Hang up without QUIT: no UPDATE state, nothing may be removed.
    client.close()

    client = login_when_unlocked(server.poplib, "carol", PASSWORD)
    try:
        assert client.stat()[0] == len(expected)
        check_all_messages(client, expected)
    finally:
        client.quit()


def test_dropped_tls_connection_deletes_nothing(server, pki, mail):
    expected = mail["drop"]
    client = server.poplib_ssl(pki.client_context())
    client.user("drop")
    client.pass_(PASSWORD)
    client.dele(1)
    # Cut the TCP connection under TLS, without close_notify or QUIT.
    client.sock.shutdown(2)
    client.close()

    client = login_when_unlocked(server.poplib, "drop", PASSWORD)
    try:
        assert client.stat()[0] == len(expected)
    finally:
        client.quit()


def test_second_session_is_in_use(server, pki, mail):
    first = server.poplib_ssl(pki.client_context())
    first.user("erin")
    first.pass_(PASSWORD)
    try:
        second = server.poplib()
        try:
            second.user("erin")
            with pytest.raises(poplib.error_proto, match=r"-ERR \[IN-USE\]"):
                second.pass_(PASSWORD)
        finally:
            second.quit()
        # The first session is unharmed.
        assert first.stat()[0] == len(mail["erin"])
    finally:
        first.quit()
    # QUIT released the lock before its +OK: a new session gets in at once.
    third = login(server, "erin")
    try:
        assert third.stat()[0] == len(mail["erin"])
    finally:
        third.quit()


# Pipelining (RFC 2449 section 6.6)


def test_pipelined_commands_answered_in_order(server, mail):
    expected = mail["pipe"]
    with RawPOP3(server.pop3_port) as raw:
        raw.send(
            b"CAPA\r\n"
            b"USER pipe\r\n" + f"PASS {PASSWORD}\r\n".encode() + b"STAT\r\n"
            b"LIST\r\n"
            b"UIDL\r\n"
            b"RETR 99\r\n"
            b"RETR 1\r\n"
            b"TOP 2 0\r\n"
            b"DELE 1\r\n"
            b"RETR 1\r\n"
            b"NOOP\r\n"
            b"RSET\r\n"
            b"STAT\r\n"
            b"QUIT\r\n"
        )
        status = raw.line()
        assert status.startswith(b"+OK"), status
        assert b"PIPELINING\r\n" in raw.body()
        assert raw.line().startswith(b"+OK")  # USER
        assert raw.line().startswith(b"+OK")  # PASS
        stat = raw.line()
        assert stat.split()[:2] == [b"+OK", str(len(expected)).encode()], stat
        assert raw.line().startswith(b"+OK")  # LIST
        listing = raw.body()
        assert listing.count(b"\r\n") == len(expected) + 1
        assert raw.line().startswith(b"+OK")  # UIDL
        numbers = {}
        for line in raw.body().split(b"\r\n")[:-2]:
            number, uid = line.split()
            numbers[int(number)] = expected[uid.decode()]
        # A multi-line command that fails has a one-line answer.
        assert raw.line().startswith(b"-ERR")  # RETR 99
        assert raw.line().startswith(b"+OK")  # RETR 1
        assert raw.body() == wire_form(numbers[1])
        assert raw.line().startswith(b"+OK")  # TOP 2 0
        assert raw.body() == dot_stuffed(top_form(numbers[2], 0))
        assert raw.line().startswith(b"+OK")  # DELE 1
        assert raw.line().startswith(b"-ERR")  # RETR 1, deleted
        assert raw.line().startswith(b"+OK")  # NOOP
        assert raw.line().startswith(b"+OK")  # RSET
        stat = raw.line()
        assert stat.split()[:2] == [b"+OK", str(len(expected)).encode()], stat
        assert raw.line().startswith(b"+OK")  # QUIT
        assert raw.at_eof()

    client = login(server, "pipe")
    try:
        assert client.stat()[0] == len(expected)
    finally:
        client.quit()


def test_long_pipeline_is_answered_whole(server, mail):
    """
    Far more pipelined commands than popd queues before it stops reading:
    every one is answered, in order.
    """
    expected = mail["burst"]
    commands = [b"STAT", b"LIST 1", b"RETR 1", b"NOOP", b"UIDL 2"] * 60
    with RawPOP3(server.pop3_port) as raw:
        assert raw.command("USER burst").startswith(b"+OK")
        assert raw.command(f"PASS {PASSWORD}").startswith(b"+OK")
        assert raw.command("UIDL 1").startswith(b"+OK")
        raw.send(b"".join(command + b"\r\n" for command in commands) + b"QUIT\r\n")
        first = None
        for command in commands:
            reply = raw.line()
            assert reply.startswith(b"+OK"), (command, reply)
            if command == b"RETR 1":
                body = raw.body()
                first = first or body
                assert body == first
            elif command == b"STAT":
                assert reply.split()[1] == str(len(expected)).encode()
        assert first in {wire_form(message) for message in expected.values()}
        assert raw.line().startswith(b"+OK")  # QUIT
        assert raw.at_eof()


def test_overlong_and_unknown_commands(server, mail):
    with RawPOP3(server.pop3_port) as raw:
        assert raw.command(b"NOOP " + b"x" * 300).startswith(b"-ERR")
        assert raw.command("XYZZY").startswith(b"-ERR")
        assert raw.command("STAT").startswith(b"-ERR")  # not before login
        # The session goes on.
        assert raw.command("CAPA").startswith(b"+OK")
        assert b"USER\r\n" in raw.body()
        # Until the client has sent too many bad commands.
        replies = []
        try:
            for _ in range(40):
                replies.append(raw.command("XYZZY"))
        except (EOFError, ConnectionError):
            pass
        assert len(replies) < 40, "the server never hung up"
        assert all(reply.startswith(b"-ERR") for reply in replies)


def test_too_many_failed_logins_hang_up(server, mail):
    with RawPOP3(server.pop3_port, source=fresh_loopback()) as raw:
        replies = []
        try:
            for _ in range(10):
                raw.command("USER intruder")
                replies.append(raw.command("PASS wrong"))
        except (EOFError, ConnectionError):
            pass
        assert 1 <= len(replies) < 10, replies
        assert all(reply.startswith(b"-ERR [AUTH]") for reply in replies), replies


def test_user_names_are_case_insensitive(server, mail):
    client = login(server, "ALICE")
    try:
        assert client.stat()[0] == len(mail["alice"])
    finally:
        client.quit()


def test_utf8_user_name(server, mail):
    server.add_user("jürgen", PASSWORD)
    uid = server.deliver("jürgen", MESSAGES["eight_bit"])
    client = server.poplib()
    try:
        assert "UTF8" in client.capa()
        client.utf8()
        client.user("jürgen")
        client.pass_(PASSWORD)
        check_all_messages(client, {uid: MESSAGES["eight_bit"]})
    finally:
        client.quit()


def test_many_sessions_at_once(server, pki, mail):
    sessions = []
    try:
        for index in range(40):
            context = pki.client_context() if index % 2 else None
            port = server.pop3s_port if index % 2 else server.pop3_port
            sessions.append(RawPOP3(port, context))
        for raw in sessions:
            raw.send(b"CAPA\r\n")
        for raw in sessions:
            assert raw.line().startswith(b"+OK")
            assert b"IMPLEMENTATION" in raw.body()
            assert raw.command("QUIT").startswith(b"+OK")
    finally:
        for raw in sessions:
            raw.close()


def test_commands_pipelined_behind_stls_are_discarded(server, pki, mail):
    """
    RFC 2595 / CVE-2011-0411: what a client (or a man in the middle) sent
    after STLS in the same packet is thrown away, not run after TLS starts.
    """
    with RawPOP3(server.pop3_port) as raw:
        raw.send(b"STLS\r\nUSER alice\r\nCAPA\r\n")
        assert raw.line().startswith(b"+OK")
        raw.file.close()
        raw.sock = pki.client_context().wrap_socket(
            raw.sock, server_hostname="127.0.0.1"
        )
        raw.file = raw.sock.makefile("rb")
        # The injected USER did not count: PASS has no user to go with.
        assert raw.command(f"PASS {PASSWORD}").startswith(b"-ERR")
        assert raw.command("QUIT").startswith(b"+OK")


# Plaintext logins only over TLS, loopback not trusted


@pytest.fixture(scope="module")
def strict_server(popd_factory):
    server = popd_factory("strict", plaintext="tls-only", trusted_networks=[])
    server.add_user("tina", PASSWORD)
    uids = server.deliver_all([("tina", MESSAGES[name]) for name in ("plain", "dots")])
    return server, dict(zip(uids, (MESSAGES["plain"], MESSAGES["dots"]), strict=True))


def test_strict_user_refused_over_plain(strict_server):
    server, _expected = strict_server
    client = server.poplib()
    try:
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            client.user("tina")
        with pytest.raises(poplib.error_proto, match="-ERR"):
            client.pass_(PASSWORD)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            client._shortcmd("AUTH PLAIN " + plain_response("tina", PASSWORD))
    finally:
        client.quit()


def test_strict_capa_lacks_user_until_tls(strict_server, pki):
    server, _expected = strict_server
    client = server.poplib()
    try:
        before = client.capa()
        client.stls(context=pki.client_context())
        after = client.capa()
    finally:
        client.quit()
    assert "USER" not in before and "STLS" in before, before
    assert "PLAIN" not in before.get("SASL", []), before
    assert "USER" in after and "STLS" not in after, after


def test_strict_login_after_stls(strict_server, pki):
    server, expected = strict_server
    client = server.poplib()
    try:
        client.stls(context=pki.client_context())
        client.user("tina")
        client.pass_(PASSWORD)
        check_all_messages(client, expected)
    finally:
        client.quit()


def test_strict_login_over_pop3s(strict_server, pki):
    server, expected = strict_server
    client = server.poplib_ssl(pki.client_context())
    try:
        client.user("tina")
        client.pass_(PASSWORD)
        check_all_messages(client, expected)
    finally:
        client.quit()
