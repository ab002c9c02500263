"""
End to end: what happens to mail when a session does not end with QUIT
(an idle timeout, twistd stopped, twistd killed) and when mail arrives
during a session.  DESIGN.md: nothing is deleted before QUIT, a crash
leaves no stale lock, and mail delivered during a session shows up in the
next one.
"""

from __future__ import annotations

import poplib
import signal
import time

import pytest
from helpers.popd_e2e import (
    MESSAGES,
    SERVER_ERRORS,
    PopdServer,
    RawPOP3,
    config_text,
    login_when_unlocked,
    to_crlf,
)

pytestmark = pytest.mark.e2e

PASSWORD = "life-cycle"
TWO = (MESSAGES["plain"], MESSAGES["dots"])


@pytest.fixture(scope="module")
def impatient(popd_factory):
    """
    A server with the shortest idle timeouts, and a {PLAIN} user (a quick
    login: a slow hash could outlast the timeout on a busy machine).
    """
    server = popd_factory(
        "impatient", extra="[limits]\nauth_timeout = 1\ntransaction_timeout = 2\n"
    )
    server.add_plain_user("idle", PASSWORD)
    server.deliver_all([("idle", message) for message in TWO])
    return server


@pytest.fixture(scope="module")
def server(popd_factory):
    server = popd_factory("lifecycle")
    server.add_hashed_users({"late": PASSWORD, "pat": PASSWORD})
    return server


def login(server, user: str) -> poplib.POP3:
    client = server.poplib()
    client.user(user)
    client.pass_(PASSWORD)
    return client


def uidl(server, user: str) -> list[bytes]:
    client = login_when_unlocked(server.poplib, user, PASSWORD)
    try:
        return client.uidl()[1]
    finally:
        client.quit()


def test_idle_before_login_times_out(impatient):
    with RawPOP3(impatient.pop3_port) as raw:
        started = time.monotonic()
        reply = raw.line()
        assert reply.startswith(b"-ERR"), reply
        assert raw.at_eof()
        assert time.monotonic() - started < 10


def test_idle_session_times_out_and_deletes_nothing(impatient):
    before = uidl(impatient, "idle")
    assert len(before) == len(TWO)
    with RawPOP3(impatient.pop3_port) as raw:
        assert raw.command("USER idle").startswith(b"+OK")
        assert raw.command(f"PASS {PASSWORD}").startswith(b"+OK")
        assert raw.command("DELE 1").startswith(b"+OK")
        reply = raw.line()  # nothing sent: the server gives up on us
        assert reply.startswith(b"-ERR"), reply
        assert raw.at_eof()
    assert uidl(impatient, "idle") == before


def test_mail_delivered_during_a_session_waits_for_the_next(server):
    server.deliver("late", MESSAGES["plain"])
    client = login(server, "late")
    try:
        # The session holds the maildrop's lock: delivery still works.
        server.deliver("late", MESSAGES["dots"])
        assert client.stat()[0] == 1
        assert len(client.uidl()[1]) == 1
    finally:
        client.quit()
    assert len(uidl(server, "late")) == 2


def test_changed_password_takes_effect_at_once(server):
    assert len(uidl(server, "pat")) == 0
    server.cli("passwd", "pat", "--password-stdin", stdin=b"new password\n")
    client = server.poplib()
    try:
        client.user("pat")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            client.pass_(PASSWORD)
    finally:
        client.quit()
    client = server.poplib()
    try:
        client.user("pat")
        client.pass_("new password")
    finally:
        client.quit()


@pytest.mark.parametrize(
    "how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"]
)
def test_server_stopped_during_session_deletes_nothing(popd_factory, how):
    first = popd_factory(f"stopped-{how.name.lower()}")
    first.add_hashed_users({"sam": PASSWORD})
    first.deliver_all([("sam", message) for message in TWO])
    before = uidl(first, "sam")

    client = login(first, "sam")
    client.dele(1)
    client.dele(2)
    output = first.kill(how)
    client.close()
    if how == signal.SIGTERM:
        assert "Traceback" not in output, output

    second = first.restarted()
    try:
        # No stale lock (flock dies with its process): in at the first try.
        again = login(second, "sam")
        try:
            assert again.uidl()[1] == before
        finally:
            again.quit()
    finally:
        second.finish()


def test_client_hanging_up_during_retr(pki, tmp_path):
    """
    A client that goes away in the middle of a long RETR (a user cancelling
    a download) deletes nothing, leaves no lock, and is an ordinary event:
    nothing in the server's log may look like an internal error.

    This server is the test's own, so that what it logs is judged here.
    """
    config = tmp_path / "popd.toml"
    config.write_text(config_text(pki))
    server = PopdServer(tmp_path, config).start()
    try:
        server.add_plain_user("hugo", PASSWORD)
        server.deliver_all([("hugo", MESSAGES["big"]), ("hugo", MESSAGES["plain"])])
        before = uidl(server, "hugo")
        for port, context in (
            (server.pop3_port, None),
            (server.pop3s_port, pki.client_context()),
        ):
            raw = RawPOP3(port, context)
            assert raw.command("USER hugo").startswith(b"+OK")
            assert raw.command(f"PASS {PASSWORD}").startswith(b"+OK")
            big = str(len(to_crlf(MESSAGES["big"]))).encode()
            number = 1 if raw.command("LIST 1").split()[2] == big else 2
            assert raw.command(f"DELE {3 - number}").startswith(b"+OK")
            assert raw.command(f"RETR {number}").startswith(b"+OK")
            raw.file.read(100_000)
            raw.close()
            assert uidl(server, "hugo") == before
    finally:
        output = server.stop()
    assert not [marker for marker in SERVER_ERRORS if marker in output], output
    assert "#critical]" not in output, output
