"""
Hostile and broken clients against a real C{twistd -n popd}: lines of a
megabyte and more, NUL bytes, bare LFs and invalid UTF-8, commands cut
into one-byte packets, thousands of pipelined commands, a client that
pipelines RETR of a big mailbox and never reads (the server's memory for
it stays bounded, measured from C{/proc/<pid>/status}), slow-loris clients
(the idle timeout still applies), connections dropped mid-RETR and
mid-TLS-handshake, a TLS handshake on the plain port and plain text on the
TLS port.

After each, a probe session completes within one second, the server logs
one line for the hostile session (its C{session end}) and never a
traceback or an unhandled error.  Each hostile client connects from a
loopback address of its own (L{fresh_loopback}), so its log lines can be
told from the others'.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from helpers.pop3_wire import Closed, Seeder, Wire, probe, rss_kib
from helpers.popd_e2e import MESSAGES, fresh_loopback, wire_form

pytestmark = pytest.mark.e2e

PASSWORD = "hostile pass"
AUTH_TIMEOUT = 2
TRANSACTION_TIMEOUT = 3
# What popd logs once per session.
SESSION_END = re.compile(
    r"session end user=(\S+) client=(\S+) .* end=(.+?)(?: pid=\d+)?$"
)
BIG = MESSAGES["big"]


@pytest.fixture(scope="module")
def server(popd_factory):
    server = popd_factory(
        "hostile",
        extra=f"[limits]\nauth_timeout = {AUTH_TIMEOUT}\n"
        f"transaction_timeout = {TRANSACTION_TIMEOUT}\n",
    )
    for user in ("alice", "bulk", "dropper", "piper"):
        server.add_plain_user(user, PASSWORD)
    seeder = Seeder(server.config)
    try:
        for message in ("plain", "dots", "eight_bit"):
            seeder.deliver("alice", MESSAGES[message])
            seeder.deliver("piper", MESSAGES[message])
        for _ in range(3):
            seeder.deliver("bulk", BIG)
            seeder.deliver("dropper", BIG)
    finally:
        seeder.close()
    return server


@pytest.fixture
def watch(server):
    """
    After the test: the server still serves a probe session within one
    second, and what it logged meanwhile has no traceback and no unhandled
    error.
    """
    start = len(server.output())
    yield lambda: server.output()[start:]
    probe(server.pop3_port, "alice", PASSWORD, timeout=1.0)
    logged = server.output()[start:]
    assert "Traceback" not in logged and "Unhandled" not in logged, logged


def session_ends(server, client: str, timeout: float = 5.0) -> list[str]:
    """
    The C{session end} lines logged for C{client}, waiting (bounded) for
    the first.
    """
    deadline = time.monotonic() + timeout
    while True:
        lines = [
            line
            for line in server.output().splitlines()
            if (match := SESSION_END.search(line)) and match.group(2) == client
        ]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def one_clear_line(server, client: str) -> str:
    """
    The server logged exactly one line for C{client}'s session end.
    """
    lines = session_ends(server, client)
    assert len(lines) == 1, lines
    return SESSION_END.search(lines[0]).group(3)


def login(port: int, user: str, source: str | None = None, **options) -> Wire:
    wire = Wire(port, source=source, **options)
    assert wire.command(f"USER {user}").startswith(b"+OK")
    reply = wire.command(f"PASS {PASSWORD}")
    assert reply.startswith(b"+OK"), reply
    return wire


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def client_hello(version: ssl.TLSVersion | None = None) -> bytes:
    """
    The first flight of a TLS client, as bytes.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# Long lines, odd bytes, tiny packets


def test_megabyte_lines_and_beyond(server, watch):
    source = fresh_loopback()
    pid = server.process.pid
    before = rss_kib(pid)
    with Wire(server.pop3_port, source=source) as wire:
        wire.send(b"A" * (1 << 20) + b"\r\n")
        assert wire.line().startswith(b"-ERR")
        # Four more megabytes in one line, in pieces, then its end.
        for _ in range(64):
            wire.send(b"\x00B\xff" * 21846)
        wire.send(b"\n")
        assert wire.line().startswith(b"-ERR")
        assert wire.command("CAPA").startswith(b"+OK")
        wire.body()
        # A megabyte SASL response is refused, and the session goes on.
        assert wire.command("AUTH PLAIN").startswith(b"+ ")
        assert wire.command(b"Q" * (1 << 20)).startswith(b"-ERR [AUTH]")
        assert wire.command("USER alice").startswith(b"+OK")
        assert wire.command(f"PASS {PASSWORD}").startswith(b"+OK")
        # And after login, too.
        assert wire.command(b"LIST " + b"9" * (1 << 20)).startswith(b"-ERR")
        assert wire.command("STAT").startswith(b"+OK 3 ")
        assert wire.command("QUIT").startswith(b"+OK")
    grown = rss_kib(pid) - before
    assert grown < 16 * 1024, f"the server grew by {grown} KiB"
    assert one_clear_line(server, source) == "quit"


def test_nul_bytes_bare_lf_and_invalid_utf8(server, watch):
    source = fresh_loopback()
    with Wire(server.pop3_port, source=source) as wire:
        wire.send(b"CAPA\n")
        assert wire.line().startswith(b"+OK")
        assert b"\r\nUSER\r\n" in b"\r\n" + wire.body()
        for line in (b"\x00\x00\x00", b"NO\x00OP", b"\xff\xfe\xfd", b"STAT\x00"):
            assert wire.command(line).startswith(b"-ERR"), line
        # A user name that is no UTF-8, with a NUL: refused like any other.
        assert wire.command(b"USER \xff\xfe\x00al\x1bice").startswith(b"+OK")
        assert wire.command(b"PASS \x00\xff").startswith(b"-ERR [AUTH]")
        wire.send(f"USER alice\nPASS {PASSWORD}\n".encode())
        assert wire.line().startswith(b"+OK")
        assert wire.line().startswith(b"+OK")
        for line in (b"RETR 1\x00", b"LIST \xff", b"TOP 1 \x001", b"DELE \xc3\xa9"):
            assert wire.command(line).startswith(b"-ERR"), line
        wire.send(b"RETR 1\n")
        assert wire.line().startswith(b"+OK")
        assert wire.body() in {wire_form(MESSAGES[n]) for n in ("plain", "dots")} | {
            wire_form(MESSAGES["eight_bit"])
        }
        assert wire.command("QUIT").startswith(b"+OK")
    logged = watch()
    # The user name is logged, but made printable: no NUL, no escape.
    failed = [line for line in logged.splitlines() if f"client={source}" in line]
    assert any("login failed user=" in line for line in failed), failed
    assert "\x00" not in logged and "\x1b" not in logged
    assert one_clear_line(server, source) == "quit"


def test_commands_cut_into_one_byte_packets(server, watch):
    source = fresh_loopback()
    with Wire(server.pop3_port, source=source) as wire:
        script = f"USER alice\r\nPASS {PASSWORD}\r\nSTAT\r\nRETR 1\r\nQUIT\r\n"
        for byte in script.encode():
            wire.send(bytes([byte]))
            time.sleep(0.001)
        assert wire.line().startswith(b"+OK")
        assert wire.line().startswith(b"+OK")
        assert wire.line().startswith(b"+OK 3 ")
        assert wire.line().startswith(b"+OK")
        wire.body()
        assert wire.line().startswith(b"+OK")
        assert wire.closed()
    assert one_clear_line(server, source) == "quit"


def _send_in_background(wire: Wire, data: bytes) -> threading.Thread:
    def send() -> None:
        try:
            wire.send(data)
        except OSError:
            pass

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_thousands_of_pipelined_commands(server, watch):
    source = fresh_loopback()
    count = 5000
    with Wire(server.pop3_port, source=source, timeout=30) as wire:
        # Before login: CAPA, the one command that is good in any state.
        sender = _send_in_background(wire, b"CAPA\r\n" * 2000)
        for _ in range(2000):
            assert wire.line().startswith(b"+OK")
            wire.body()
        sender.join(10)
        wire.send(f"USER alice\r\nPASS {PASSWORD}\r\n".encode())
        assert wire.line().startswith(b"+OK")
        assert wire.line().startswith(b"+OK")
        commands = [b"NOOP", b"STAT", b"LIST 2", b"UIDL 3", b"DELE 1", b"RSET"]
        batch = [commands[i % len(commands)] for i in range(count)]
        started = time.monotonic()
        sender = _send_in_background(wire, b"".join(c + b"\r\n" for c in batch))
        for command in batch:
            reply = wire.line()
            assert reply.startswith(b"+OK"), (command, reply)
        sender.join(10)
        assert time.monotonic() - started < 20
        assert wire.command("QUIT").startswith(b"+OK")
    assert one_clear_line(server, source) == "quit"


def test_hundreds_of_idle_connections_do_not_block_others(server, watch):
    """
    Connections that say nothing, half of them stuck in a TLS handshake
    (from several addresses: popd limits connections per address).
    """
    idle = []
    sources = [fresh_loopback() for _ in range(10)]
    try:
        for index in range(200):
            port = server.pop3s_port if index % 2 else server.pop3_port
            sock = socket.create_connection(
                ("127.0.0.1", port), timeout=5, source_address=(sources[index % 10], 0)
            )
            if index % 2:
                sock.sendall(client_hello()[:20])
            idle.append(sock)
        probe(server.pop3_port, "alice", PASSWORD, timeout=1.0)
    finally:
        for sock in idle:
            sock.close()


# A client that never reads


def test_pipelined_retr_never_read_keeps_memory_bounded(server, watch):
    """
    500 RETRs of 2 MB messages (a gigabyte of replies) pipelined, and not
    one octet read: the server stops reading and sending once the socket
    buffers are full, holds about a chunk for it, and drops it when the
    idle timeout has passed.
    """
    pid = server.process.pid
    source = fresh_loopback()
    fds = open_fds(pid)
    before = rss_kib(pid)
    wire = login(server.pop3_port, "bulk", source=source)
    try:
        wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        wire.sock.settimeout(2.0)
        sent = 0
        try:
            for _ in range(500):
                wire.sock.sendall(b"RETR %d\r\n" % (1 + sent % 3))
                sent += 1
        except TimeoutError:
            pass  # the server has stopped reading: back-pressure
        time.sleep(1.0)
        grown = rss_kib(pid) - before
        assert grown < 32 * 1024, f"the server grew by {grown} KiB for {sent} RETRs"
        # Others are served meanwhile.
        probe(server.pop3_port, "alice", PASSWORD, timeout=1.0)
        # The idle timeout applies to a client that reads nothing.
        deadline = time.monotonic() + TRANSACTION_TIMEOUT + 5
        while open_fds(pid) > fds and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open_fds(pid) <= fds, "the server kept the connection of a dead reader"
    finally:
        wire.abort()
    assert one_clear_line(server, source) == "timeout"


# Slow clients


def _dribble(wire: Wire, data: bytes, seconds: float) -> bool:
    """
    Send C{data} a byte every 100 ms for at most C{seconds}; whether the
    server hung up meanwhile (after saying why, or not).
    """
    for byte in data[: int(seconds * 10)]:
        try:
            wire.send(bytes([byte]))
            line = wire.line()
        except TimeoutError:  # before OSError, which it is a kind of
            continue
        except (OSError, Closed):
            return True
        assert line == b"-ERR Disconnected for inactivity.\r\n", line
        return wire.closed(timeout=2)
    return False


def test_slow_loris_before_login_times_out(server, watch):
    """
    A byte every 100 ms, never a whole line: the session is ended after
    C{auth_timeout} all the same, and others are served meanwhile.
    """
    source = fresh_loopback()
    started = time.monotonic()
    with Wire(server.pop3_port, source=source, timeout=0.1) as wire:
        dropped = _dribble(wire, b"USER " + b"x" * 200, AUTH_TIMEOUT + 4)
        assert dropped, "a slow-loris client outlived the idle timeout"
    elapsed = time.monotonic() - started
    assert AUTH_TIMEOUT - 0.5 < elapsed < AUTH_TIMEOUT + 3, elapsed
    assert one_clear_line(server, source) == "timeout"


def test_slow_loris_after_login_times_out(server, watch):
    source = fresh_loopback()
    with login(server.pop3_port, "alice", source=source) as wire:
        wire.timeout = 0.1
        started = time.monotonic()
        dropped = _dribble(wire, b"N" * 200, TRANSACTION_TIMEOUT + 4)
        assert dropped, "a slow-loris client outlived the idle timeout"
    elapsed = time.monotonic() - started
    assert TRANSACTION_TIMEOUT - 0.5 < elapsed < TRANSACTION_TIMEOUT + 3, elapsed
    assert one_clear_line(server, source) == "timeout"


# Dropped connections


def test_connection_dropped_mid_retr(server, watch):
    source = fresh_loopback()
    wire = login(server.pop3_port, "dropper", source=source)
    wire.send(b"DELE 2\r\nRETR 1\r\n")
    assert wire.line().startswith(b"+OK")
    assert wire.line().startswith(b"+OK")
    wire.line()  # the first line of the message, then away
    wire.abort()
    assert one_clear_line(server, source).startswith("disconnected")
    # Nothing was deleted.
    probe(server.pop3_port, "dropper", PASSWORD, timeout=5.0)
    with login(server.pop3_port, "dropper") as again:
        assert again.command("STAT").startswith(b"+OK 3 ")
        assert again.command("QUIT").startswith(b"+OK")


@pytest.mark.parametrize("port", ["pop3", "pop3s"])
@pytest.mark.parametrize("cut", [0, 40, -1])
def test_connection_dropped_mid_tls_handshake(server, watch, port, cut):
    """
    STLS (or the POP3S port), then part of a ClientHello (or all of it
    and no more), then a reset.
    """
    source = fresh_loopback()
    hello = client_hello()
    if port == "pop3":
        wire = Wire(server.pop3_port, source=source)
        assert wire.command("STLS").startswith(b"+OK")
    else:
        wire = Wire(server.pop3s_port, source=source, greet=False)
    wire.send(hello[:cut] if cut >= 0 else hello)
    time.sleep(0.1)
    wire.abort()
    assert one_clear_line(server, source) == "disconnected"


def test_tls_handshake_on_the_plain_port(server, watch):
    source = fresh_loopback()
    with Wire(server.pop3_port, source=source) as wire:
        wire.send(client_hello())
        # Binary garbage to a POP3 server: refused, and the session lives on
        # or is ended for too many bad commands; it does not hang.
        try:
            for _ in range(30):
                assert wire.line().startswith(b"-ERR")
        except Closed:
            pass
        except TimeoutError:
            assert wire.command("NOOP").startswith(b"-ERR")
    assert one_clear_line(server, source) in ("timeout", "too many bad commands")


def test_plain_text_on_the_tls_port(server, watch):
    source = fresh_loopback()
    with Wire(server.pop3s_port, source=source, greet=False, timeout=5) as wire:
        wire.send(b"USER alice\r\nPASS x\r\nQUIT\r\n")
        # The TLS layer answers with an alert, or just hangs up.
        try:
            for _ in range(10):
                data = wire.line()
                assert not data.startswith((b"+OK", b"-ERR")), data
        except Closed:
            pass
    assert one_clear_line(server, source).startswith("TLS error: ")
