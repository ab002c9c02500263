"""
The LMTP and SMTP delivery servers (popd.delivery.server) against an
in-memory store, over an in-memory transport: replies, per-recipient
outcomes, pipelining, size limits, headers.
"""

from __future__ import annotations

import re

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from popd.delivery.agent import LocalDelivery
from popd.delivery.recipients import RecipientResolver
from popd.delivery.server import (
    MAX_BAD_COMMANDS,
    LMTPFactory,
    SMTPDeliveryFactory,
)
from popd.interfaces import IMaildropProvider, MaildropUnavailable, NoSuchUser
from popd.testing import MemoryMaildropProvider

USERS = {"alice", "bob", "carol@example.test"}
HOST = "pop.example.test"


def lookup(name: str) -> str | None:
    name = name.lower()
    if name == "broken":
        raise MaildropUnavailable("the user database is down")
    return name if name in USERS else None


def synchronous(function, *args):
    return maybeDeferred(function, *args)


@implementer(IMaildropProvider)
class ControlledProvider:
    """
    A store whose deliveries wait until the test fires them, and which
    fails for the users in C{failing}.
    """

    def __init__(self, failing=()) -> None:
        self.memory = MemoryMaildropProvider()
        self.failing = dict(failing)
        self.pending: list[tuple[Deferred, str, bytes, str | None]] = []
        self.hold = False

    def deliver(self, avatar_id, message, folder=None, uid=None):
        content = message.read()
        if avatar_id in self.failing:
            return fail(self.failing[avatar_id])
        if not self.hold:
            return self.memory.deliver(avatar_id, content, folder)
        deferred: Deferred = Deferred()
        self.pending.append((deferred, avatar_id, content, folder))
        return deferred

    def release_next(self) -> None:
        deferred, avatar_id, content, folder = self.pending.pop(0)
        self.memory.deliver(avatar_id, content, folder).chainDeferred(deferred)

    def folders(self, avatar_id):
        return self.memory.folders(avatar_id)

    def open(self, avatar_id, folder=None):
        return self.memory.open(avatar_id, folder)

    def contents(self, avatar_id, folder=None):
        return self.memory.contents(avatar_id, folder)


class Client:
    """
    One connection to a delivery server over a StringTransport.
    """

    def __init__(
        self,
        tmp_path,
        *,
        smtp: bool = False,
        provider=None,
        max_size: int = 10_000,
        detail_folders: bool = False,
        mode: str = "auto",
    ) -> None:
        self.provider = provider or ControlledProvider()
        resolver = RecipientResolver(
            lookup,
            self.provider,
            mode=mode,
            detail_folders=detail_folders,
            run_blocking=synchronous,
        )
        self.agent = LocalDelivery(
            self.provider,
            resolver,
            spool_dir=tmp_path / "spool",
            max_message_size=max_size,
            hostname=HOST,
        )
        factory = (SMTPDeliveryFactory if smtp else LMTPFactory)(self.agent)
        self.server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 24))
        self.transport = StringTransport(
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)
        )
        self.server.makeConnection(self.transport)
        self.greeting = self.replies()

    def send(self, data: bytes) -> list[bytes]:
        self.server.dataReceived(data)
        return self.replies()

    def replies(self) -> list[bytes]:
        value = self.transport.value()
        self.transport.clear()
        return value.split(b"\r\n")[:-1]

    def codes(self, data: bytes) -> list[int]:
        return [int(line[:3]) for line in self.send(data) if line[3:4] == b" "]

    def stored(self, user: str, folder: str | None = None) -> list[bytes]:
        return self.provider.contents(user, folder)

    def close(self) -> None:
        self.server.connectionLost(None)


MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n..dot\r\n"
STORED_BODY = b"From: a@example.org\nSubject: hi\n\nbody\n.dot\n"


def transaction(*recipients: str, sender: str = "a@example.org") -> bytes:
    lines = [b"LHLO mta.example.test", f"MAIL FROM:<{sender}>".encode()]
    lines += [f"RCPT TO:<{rcpt}>".encode() for rcpt in recipients]
    lines.append(b"DATA")
    return b"".join(line + b"\r\n" for line in lines)


def split_trace(stored: bytes) -> tuple[list[bytes], bytes]:
    """
    The Return-Path, Delivered-To and Received fields on top, and the rest.
    """
    match = re.match(
        rb"(Return-Path: [^\n]*\n)(Delivered-To: [^\n]*\n)"
        rb"(Received: [^\n]*\n\t[^\n]*\n\t[^\n]*\n)",
        stored,
    )
    assert match, stored
    return list(match.groups()), stored[match.end() :]


# Greeting and LHLO


def test_greeting_and_lhlo_extensions(tmp_path):
    client = Client(tmp_path)
    assert client.greeting == [f"220 {HOST} LMTP popd ready".encode()]
    lines = client.send(b"LHLO mta.example.test\r\n")
    assert lines[0] == f"250-{HOST}".encode()
    extensions = [line[4:] for line in lines[1:]]
    assert b"PIPELINING" in extensions
    assert b"ENHANCEDSTATUSCODES" in extensions
    assert b"8BITMIME" in extensions
    assert b"SIZE 10000" in extensions
    assert lines[-1].startswith(b"250 ")


def test_helo_and_ehlo_are_not_lmtp(tmp_path):
    client = Client(tmp_path)
    assert client.send(b"EHLO x\r\n") == [b"500 5.5.1 This is LMTP: use LHLO"]
    assert client.send(b"HELO x\r\n")[0].startswith(b"500 5.5.1")


def test_mail_needs_lhlo_first(tmp_path):
    client = Client(tmp_path)
    assert client.send(b"MAIL FROM:<a@b>\r\n")[0].startswith(b"503 5.5.1")


def test_commands_out_of_order(tmp_path):
    client = Client(tmp_path)
    client.send(b"LHLO x\r\n")
    assert client.codes(b"RCPT TO:<alice>\r\n") == [503]
    assert client.codes(b"DATA\r\n") == [503]
    assert client.codes(b"MAIL FROM:<a@b>\r\n") == [250]
    assert client.codes(b"MAIL FROM:<a@b>\r\n") == [503]
    # No accepted recipient: DATA fails with 503 (RFC 2033 section 4.2).
    assert client.codes(b"RCPT TO:<ghost>\r\nDATA\r\n") == [550, 503]


def test_noop_rset_vrfy_help_quit(tmp_path):
    client = Client(tmp_path)
    assert client.send(b"NOOP\r\n") == [b"250 2.0.0 OK"]
    assert client.send(b"RSET\r\n") == [b"250 2.0.0 OK"]
    assert client.codes(b"VRFY alice\r\n") == [252]
    assert client.codes(b"HELP\r\n") == [214]
    assert client.codes(b"BOGUS\r\n") == [500]
    assert client.send(b"QUIT\r\n") == [b"221 2.0.0 Bye"]
    assert client.transport.disconnecting


def test_too_many_bad_commands_hang_up(tmp_path):
    client = Client(tmp_path)
    replies = client.send(b"BOGUS\r\n" * (MAX_BAD_COMMANDS + 5))
    assert len(replies) == MAX_BAD_COMMANDS + 1
    assert replies[-1].startswith(b"421 4.7.0")
    assert client.transport.disconnecting


def test_overlong_command_line(tmp_path):
    client = Client(tmp_path)
    assert client.codes(b"NOOP " + b"x" * 10000) == [500]
    # The rest of that line is thrown away, the next one is a command.
    assert client.send(b"yyy\r\nNOOP\r\n") == [b"250 2.0.0 OK"]


# Recipients


def test_unknown_recipient_is_550_at_rcpt(tmp_path):
    client = Client(tmp_path)
    client.send(b"LHLO x\r\nMAIL FROM:<a@b>\r\n")
    assert client.send(b"RCPT TO:<ghost@example.test>\r\n") == [
        b"550 5.1.1 <ghost@example.test> User unknown"
    ]


def test_unavailable_user_database_is_451_at_rcpt(tmp_path):
    client = Client(tmp_path)
    client.send(b"LHLO x\r\nMAIL FROM:<a@b>\r\n")
    assert client.send(b"RCPT TO:<broken@example.test>\r\n")[0].startswith(b"451 4.3.0")


@pytest.mark.parametrize(
    ("address", "mode", "user"),
    [
        ("alice@example.test", "auto", "alice"),
        ("ALICE@example.test", "auto", "alice"),
        ("alice", "auto", "alice"),
        ("carol@example.test", "auto", "carol@example.test"),
        ("carol@example.test", "full", "carol@example.test"),
        ("alice@example.test", "local", "alice"),
        ("alice+lists@example.test", "auto", "alice"),
    ],
)
def test_recipient_rules(tmp_path, address, mode, user):
    client = Client(tmp_path, mode=mode)
    client.send(transaction(address))
    assert client.codes(MESSAGE + b".\r\n") == [250]
    assert len(client.stored(user)) == 1


@pytest.mark.parametrize(
    ("address", "mode"),
    [("alice@example.test", "full"), ("carol@example.test", "local")],
)
def test_recipient_rules_refusing(tmp_path, address, mode):
    client = Client(tmp_path, mode=mode)
    client.send(b"LHLO x\r\nMAIL FROM:<a@b>\r\n")
    assert client.codes(f"RCPT TO:<{address}>\r\n".encode()) == [550]


def test_bad_addresses(tmp_path):
    client = Client(tmp_path)
    client.send(b"LHLO x\r\n")
    assert client.codes(b"MAIL FROM alice\r\n") == [501]
    assert client.codes(b"MAIL FROM:<a@b> SIZE=1 FOO=bar\r\n") == [555]
    assert client.codes(b"MAIL FROM:<>\r\n") == [250]
    assert client.codes(b"RCPT TO:<>\r\n") == [501]
    assert client.codes(b"RCPT TO:<alice> NOTIFY=NEVER\r\n") == [555]
    assert client.codes(b"RCPT TO:<\xff@x>\r\n") == [501]


# DATA


def test_one_recipient_message_and_trace_fields(tmp_path):
    client = Client(tmp_path)
    replies = client.send(transaction("alice@example.test", sender="bob@example.org"))
    assert replies[-1].startswith(b"354 ")
    (reply,) = client.send(MESSAGE + b".\r\n")
    assert reply.startswith(b"250 2.0.0 <alice@example.test> Saved as ")
    (stored,) = client.stored("alice")
    trace, rest = split_trace(stored)
    assert rest == STORED_BODY
    assert trace[0] == b"Return-Path: <bob@example.org>\n"
    assert trace[1] == b"Delivered-To: alice@example.test\n"
    assert trace[2].startswith(b"Received: from mta.example.test ([127.0.0.1])\n")
    assert f"\tby {HOST} (popd) with LMTP id ".encode() in trace[2]
    assert b"\tfor <alice@example.test>; " in trace[2]


def test_null_sender(tmp_path):
    client = Client(tmp_path)
    client.send(transaction("alice", sender=""))
    client.send(MESSAGE + b".\r\n")
    (stored,) = client.stored("alice")
    assert stored.startswith(b"Return-Path: <>\nDelivered-To: alice\n")


def test_per_recipient_replies_in_order(tmp_path):
    client = Client(tmp_path)
    client.send(b"LHLO x\r\nMAIL FROM:<a@b>\r\n")
    assert client.codes(b"RCPT TO:<alice@example.test>\r\n") == [250]
    assert client.codes(b"RCPT TO:<ghost@example.test>\r\n") == [550]
    assert client.codes(b"RCPT TO:<bob@example.test>\r\n") == [250]
    assert client.codes(b"DATA\r\n") == [354]
    replies = client.send(MESSAGE + b".\r\n")
    assert len(replies) == 2
    assert replies[0].startswith(b"250 2.0.0 <alice@example.test> ")
    assert replies[1].startswith(b"250 2.0.0 <bob@example.test> ")
    for user in ("alice", "bob"):
        (stored,) = client.stored(user)
        trace, rest = split_trace(stored)
        assert rest == STORED_BODY
        assert trace[1] == f"Delivered-To: {user}@example.test\n".encode()


def test_a_failing_recipient_does_not_lose_the_others(tmp_path):
    provider = ControlledProvider(
        failing={
            "bob": MaildropUnavailable("disk full"),
            "carol@example.test": NoSuchUser("gone"),
        }
    )
    client = Client(tmp_path, provider=provider)
    client.send(transaction("alice", "bob", "carol@example.test", "alice+x"))
    replies = client.send(MESSAGE + b".\r\n")
    assert [reply[:9] for reply in replies] == [
        b"250 2.0.0",
        b"451 4.3.0",
        b"550 5.1.1",
        b"250 2.0.0",
    ]
    assert replies[1].startswith(b"451 4.3.0 <bob> ")
    assert len(client.stored("alice")) == 2


def test_replies_wait_for_durable_storage(tmp_path):
    provider = ControlledProvider()
    provider.hold = True
    client = Client(tmp_path, provider=provider)
    client.send(transaction("alice", "bob"))
    # The message, then a pipelined command: both wait for the deliveries.
    assert client.send(MESSAGE + b".\r\nNOOP\r\n") == []
    assert client.transport.producerState == "paused"
    assert len(provider.pending) == 1
    provider.release_next()
    assert client.codes(b"") == [250]
    # bob is delivered only after alice's copy is stored.
    assert len(provider.pending) == 1 and provider.pending[0][1] == "bob"
    provider.release_next()
    replies = client.replies()
    assert replies[0].startswith(b"250 2.0.0 <bob> ")
    assert replies[1] == b"250 2.0.0 OK"
    assert client.transport.producerState == "producing"


def test_pipelined_transaction_in_one_write(tmp_path):
    client = Client(tmp_path)
    replies = client.send(
        transaction("alice", "ghost", "bob") + MESSAGE + b".\r\nQUIT\r\n"
    )
    codes = [int(line[:3]) for line in replies if line[3:4] == b" "]
    assert codes == [250, 250, 250, 550, 250, 354, 250, 250, 221]


def test_connection_lost_during_delivery_stops_further_copies(tmp_path):
    provider = ControlledProvider()
    provider.hold = True
    client = Client(tmp_path, provider=provider)
    client.send(transaction("alice", "bob"))
    client.send(MESSAGE + b".\r\n")
    client.close()
    provider.release_next()
    assert provider.pending == []
    assert len(client.stored("alice")) == 1
    assert client.stored("bob") == []


def test_connection_lost_during_data_throws_it_away(tmp_path):
    client = Client(tmp_path)
    client.send(transaction("alice"))
    client.send(b"Subject: half\r\n\r\nsome")
    client.close()
    assert client.stored("alice") == []


def test_message_without_header_section_gets_separator(tmp_path):
    client = Client(tmp_path)
    client.send(transaction("alice"))
    client.send(b"just a body line\r\n.\r\n")
    (stored,) = client.stored("alice")
    _trace, rest = split_trace(stored)
    assert rest == b"\njust a body line\n"


def test_empty_message(tmp_path):
    client = Client(tmp_path)
    client.send(transaction("alice"))
    assert client.codes(b".\r\n") == [250]
    (stored,) = client.stored("alice")
    _trace, rest = split_trace(stored)
    assert rest == b""


def test_long_lines_and_8bit_data(tmp_path):
    client = Client(tmp_path, max_size=10**6)
    body = b"Subject: long\r\n\r\n" + b"\xc3\xa9" * 50000 + b"\r\n"
    client.send(transaction("alice"))
    assert client.codes(body + b".\r\n") == [250]
    (stored,) = client.stored("alice")
    assert split_trace(stored)[1] == body.replace(b"\r\n", b"\n")


def test_large_message_is_spooled_to_disk(tmp_path):
    client = Client(tmp_path, max_size=10 * 2**20)
    line = b"x" * 998 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * 3000
    client.send(transaction("alice", "bob"))
    for start in range(0, len(body), 65536):
        assert client.send(body[start : start + 65536]) == []
    assert not client.server._spool.in_memory
    assert client.codes(b".\r\n") == [250, 250]
    for user in ("alice", "bob"):
        (stored,) = client.stored(user)
        assert split_trace(stored)[1] == body.replace(b"\r\n", b"\n")


# Size


def test_size_is_advertised_and_checked_at_mail(tmp_path):
    client = Client(tmp_path, max_size=100)
    client.send(b"LHLO x\r\n")
    assert client.send(b"MAIL FROM:<a@b> SIZE=101\r\n") == [
        b"552 5.3.4 Message size exceeds fixed maximum message size"
    ]
    assert client.codes(b"MAIL FROM:<a@b> SIZE=100 BODY=8BITMIME\r\n") == [250]


def test_oversize_data_is_552_for_each_recipient(tmp_path):
    client = Client(tmp_path, max_size=100)
    client.send(transaction("alice", "bob"))
    replies = client.send(b"Subject: x\r\n\r\n" + b"y" * 200 + b"\r\n.\r\n")
    assert replies == [
        b"552 5.3.4 <alice> Message too big for system",
        b"552 5.3.4 <bob> Message too big for system",
    ]
    assert client.stored("alice") == [] and client.stored("bob") == []
    # The session goes on.
    assert client.send(b"NOOP\r\n") == [b"250 2.0.0 OK"]


def test_unwritable_spool_is_451(tmp_path):
    (tmp_path / "spool").write_text("not a directory")
    client = Client(tmp_path)
    client.send(b"LHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<alice>\r\n")
    assert client.send(b"DATA\r\n")[0].startswith(b"451 4.3.0")


# Folders from +detail


def test_detail_delivers_into_an_existing_folder(tmp_path):
    provider = ControlledProvider()
    provider.memory.deliver("alice", b"seed\n", "Lists")
    client = Client(tmp_path, provider=provider, detail_folders=True)
    client.send(transaction("alice+lists@example.test", "alice+nosuch@example.test"))
    assert client.codes(MESSAGE + b".\r\n") == [250, 250]
    assert len(client.stored("alice", "Lists")) == 2
    # A folder that does not exist is never made: that copy is in the INBOX.
    assert len(client.stored("alice")) == 1


def test_detail_folders_off(tmp_path):
    provider = ControlledProvider()
    provider.memory.deliver("alice", b"seed\n", "Lists")
    client = Client(tmp_path, provider=provider)
    client.send(transaction("alice+Lists@example.test"))
    assert client.codes(MESSAGE + b".\r\n") == [250]
    assert len(client.stored("alice", "Lists")) == 1
    assert len(client.stored("alice")) == 1


# SMTP


def smtp_transaction(*recipients: str) -> bytes:
    return transaction(*recipients).replace(b"LHLO", b"EHLO")


def test_smtp_greeting_and_ehlo(tmp_path):
    client = Client(tmp_path, smtp=True)
    assert client.greeting == [f"220 {HOST} ESMTP popd ready".encode()]
    lines = client.send(b"EHLO mta\r\n")
    assert b"250-PIPELINING" in lines and lines[-1].startswith(b"250 ")
    assert client.send(b"LHLO mta\r\n")[0].startswith(b"500 5.5.1")
    assert client.send(b"HELO mta\r\n") == [f"250 {HOST}".encode()]


def test_smtp_one_reply_for_all(tmp_path):
    client = Client(tmp_path, smtp=True)
    client.send(smtp_transaction("alice", "bob"))
    assert client.send(MESSAGE + b".\r\n") == [b"250 2.0.0 Delivered to 2 recipient(s)"]
    (stored,) = client.stored("alice")
    trace, rest = split_trace(stored)
    assert b" with ESMTP id " in trace[2]
    assert rest == STORED_BODY


def test_smtp_any_temporary_failure_is_451(tmp_path):
    provider = ControlledProvider(failing={"bob": MaildropUnavailable("disk full")})
    client = Client(tmp_path, smtp=True, provider=provider)
    client.send(smtp_transaction("alice", "bob"))
    (reply,) = client.send(MESSAGE + b".\r\n")
    assert reply.startswith(b"451 4.3.0")
    # alice has her copy; the MTA's retry may give her a second one.
    assert len(client.stored("alice")) == 1


def test_smtp_all_permanent_failures(tmp_path):
    provider = ControlledProvider(failing={"alice": NoSuchUser("gone")})
    client = Client(tmp_path, smtp=True, provider=provider)
    client.send(smtp_transaction("alice"))
    assert client.send(MESSAGE + b".\r\n") == [b"550 5.1.1 User unknown"]


def test_smtp_oversize_is_one_552(tmp_path):
    client = Client(tmp_path, smtp=True, max_size=10)
    client.send(smtp_transaction("alice", "bob"))
    assert client.codes(b"y" * 20 + b"\r\n.\r\n") == [552]


def test_smtp_no_valid_recipients_is_554(tmp_path):
    client = Client(tmp_path, smtp=True)
    client.send(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<ghost>\r\n")
    assert client.codes(b"DATA\r\n") == [554]


def test_helo_session_has_no_parameters(tmp_path):
    client = Client(tmp_path, smtp=True)
    client.send(b"HELO x\r\n")
    assert client.codes(b"MAIL FROM:<a@b> SIZE=10\r\n") == [555]
    client.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<alice>\r\nDATA\r\n")
    client.send(MESSAGE + b".\r\n")
    (stored,) = client.stored("alice")
    assert b" with SMTP id " in split_trace(stored)[0][2]


def test_timeout_says_so(tmp_path):
    client = Client(tmp_path)
    client.server.timeoutConnection()
    assert client.replies()[0].startswith(b"421 4.4.2")
    assert client.transport.disconnecting


def test_resolution_waits_in_order(tmp_path):
    """
    A recipient lookup that has not answered holds the next commands.
    """
    client = Client(tmp_path)
    waiting: list[Deferred] = []

    def slow(address):
        deferred: Deferred = Deferred()
        waiting.append(deferred)
        return deferred

    original = client.agent.resolve
    client.agent.resolve = slow
    client.send(b"LHLO x\r\nMAIL FROM:<a@b>\r\n")
    assert client.send(b"RCPT TO:<alice>\r\nRCPT TO:<bob>\r\n") == []
    assert len(waiting) == 1
    original("alice").chainDeferred(waiting[0])
    assert client.codes(b"") == [250]
    original("bob").chainDeferred(waiting[1])
    assert client.codes(b"") == [250]


def test_spool_failure_during_data_is_451_for_each(tmp_path):
    client = Client(tmp_path)
    new_spool = client.agent.new_spool

    def failing_spool():
        spool = new_spool()

        def write(data):
            raise OSError(28, "No space left on device")

        spool.write = write
        return spool

    client.agent.new_spool = failing_spool
    client.send(transaction("alice", "bob"))
    replies = client.send(MESSAGE + b".\r\n")
    assert [reply[:9] for reply in replies] == [b"451 4.3.0", b"451 4.3.0"]
    assert client.stored("alice") == [] and client.stored("bob") == []
    assert client.send(b"NOOP\r\n") == [b"250 2.0.0 OK"]
