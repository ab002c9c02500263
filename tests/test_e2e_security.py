"""
Security properties of a real C{twistd -n popd}, as tests:

  - STLS command injection (CVE-2011-0411 and kin): commands sent with STLS
    in one packet are thrown away, never run inside TLS; plain text sent
    after STLS's +OK (or before the handshake on the POP3S port) is not a
    command but a broken handshake;
  - plaintext logins (USER/PASS, AUTH PLAIN, AUTH LOGIN) are refused before
    TLS where configured, for every user name alike;
  - replies do not tell who exists: an unknown user, a wrong password and a
    user who may not log in get the same reply, by USER/PASS, APOP and
    AUTH PLAIN alike (and the same SCRAM challenge shape);
  - user names that differ only in letter case are one maildrop, locked
    once;
  - user and folder names that try to leave the store (C{..}, C{/},
    C{%2f}, NUL, C{alice#../../x}) are refused, and nothing is created or
    read outside the maildrop, for Maildir and mbox, over POP3 and through
    C{popd deliver} and C{popd adduser};
  - TLS below 1.2 is refused on both ports, and below 1.3 where configured.

Clients that fail logins on purpose connect from loopback addresses of
their own (L{fresh_loopback}): popd's penalty for failures counts per
address and per user name.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import ssl
import time
from pathlib import Path

import pytest
from helpers.pop3_wire import Closed, Seeder, Wire, probe
from helpers.popd_e2e import MESSAGES, fresh_loopback, parallel

pytestmark = pytest.mark.e2e

PASSWORD = "secure pass"


LOGIN_WAYS = ["USER/PASS", "APOP", "AUTH PLAIN", "AUTH PLAIN +"]


def add_nologin(server, user: str, password: str) -> None:
    """
    A user whose passwd-file entry says C{nologin} (Dovecot's extra field).
    """
    with server.passwd_file.open("a") as passwd:
        passwd.write(f"{user}:{{PLAIN}}{password}::::::nologin\n")


@pytest.fixture(scope="module")
def server(popd_factory):
    server = popd_factory("security", apop=True)
    for user in ("alice", "bob", "carol"):
        server.add_plain_user(user, PASSWORD)
    # popd's failure penalty counts per user name: each way of logging in
    # gets users of its own to fail with.
    for index in range(len(LOGIN_WAYS)):
        server.add_plain_user(f"wrong{index}", PASSWORD)
        add_nologin(server, f"nolan{index}", PASSWORD)
    seeder = Seeder(server.config)
    try:
        for user in ("alice", "bob"):
            seeder.deliver(user, MESSAGES["plain"])
        seeder.deliver("alice", MESSAGES["dots"], folder="Archive")
    finally:
        seeder.close()
    return server


@pytest.fixture(scope="module")
def strict(popd_factory):
    """
    Plaintext logins only inside TLS, loopback not trusted.
    """
    server = popd_factory("strict-security", trusted_networks=[])
    server.add_plain_user("tina", PASSWORD)
    return server


def tls_context(pki, *, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = pki.client_context()
    if maximum is not None:
        context.maximum_version = maximum
    return context


def old_tls_context(pki) -> ssl.SSLContext:
    """
    A client that offers only TLS 1.0 and 1.1.
    """
    context = pki.client_context()
    try:
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as error:
        pytest.skip(f"this OpenSSL cannot even offer TLS 1.1: {error}")
    return context


def client_hello() -> bytes:
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


def session_end(server, client: str, timeout: float = 5.0) -> str:
    where = re.escape(client)
    pattern = re.compile(
        rf"session end user=\S+ client={where} .* end=(.+?)(?: pid=\d+)?$"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.output().splitlines():
            if match := pattern.search(line):
                return match.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no session end logged for {client}")


# STLS and injection


def test_commands_sent_with_stls_are_not_run(server, pki):
    """
    A man in the middle appends a login and QUIT to the client's STLS: none
    of it runs inside TLS, and the TLS handshake is not disturbed by it.
    """
    with Wire(server.pop3_port, source=fresh_loopback()) as wire:
        wire.send(f"STLS\r\nUSER alice\r\nPASS {PASSWORD}\r\nQUIT\r\n".encode())
        assert wire.line().startswith(b"+OK")
        wire.starttls(pki.client_context())
        assert wire.command("STAT").startswith(b"-ERR")  # not logged in
        assert wire.command(f"PASS {PASSWORD}").startswith(b"-ERR")  # no USER
        assert wire.command("CAPA").startswith(b"+OK")  # QUIT did not run
        assert b"STLS" not in wire.body()
        assert wire.command("QUIT").startswith(b"+OK")


def test_commands_sent_with_stls_in_pieces_are_not_run(server, pki):
    """
    The same, with STLS and the injected commands split across packets that
    arrive before the server has answered.
    """
    with Wire(server.pop3_port, source=fresh_loopback()) as wire:
        wire.send(b"ST")
        time.sleep(0.05)
        wire.send(b"LS\r\nUSER ali")
        wire.send(b"ce\r\n")
        assert wire.line().startswith(b"+OK")
        # Whatever of "USER alice" arrived after STLS was read reaches the
        # TLS layer as garbage: the handshake fails, or it was discarded.
        try:
            wire.starttls(pki.client_context())
        except (ssl.SSLError, OSError):
            return
        assert wire.command(f"PASS {PASSWORD}").startswith(b"-ERR")
        assert wire.command("QUIT").startswith(b"+OK")


def test_plain_text_after_stls_is_no_command(server, pki):
    """
    Plain text sent after STLS's +OK, before the handshake (a client that
    went on in clear, or an injection): the server reads it as TLS, the
    handshake fails, and the text is never answered as a command.
    """
    source = fresh_loopback()
    with Wire(server.pop3_port, source=source, timeout=5) as wire:
        assert wire.command("STLS").startswith(b"+OK")
        wire.send(f"USER alice\r\nPASS {PASSWORD}\r\nSTAT\r\n".encode())
        try:
            for _ in range(5):
                line = wire.line()
                assert not line.startswith((b"+OK", b"-ERR")), line
        except (Closed, TimeoutError):
            pass
    assert session_end(server, source).startswith("TLS error")
    probe(server.pop3_port, "alice", PASSWORD)


def test_plain_text_before_implicit_tls_is_no_command(server, pki):
    source = fresh_loopback()
    with Wire(server.pop3s_port, source=source, greet=False, timeout=5) as wire:
        wire.send(b"CAPA\r\n" + client_hello())
        try:
            for _ in range(5):
                line = wire.line()
                assert not line.startswith((b"+OK", b"-ERR")), line
        except (Closed, TimeoutError):
            pass
    assert session_end(server, source).startswith("TLS error")


def test_stls_is_refused_inside_tls(server, pki):
    with Wire(server.pop3s_port, context=pki.client_context()) as wire:
        assert wire.command("STLS").startswith(b"-ERR")
        assert wire.command("CAPA").startswith(b"+OK")
        assert b"\r\nSTLS\r\n" not in b"\r\n" + wire.body()
    with Wire(server.pop3_port) as wire:
        assert wire.command("STLS").startswith(b"+OK")
        wire.starttls(pki.client_context())
        assert wire.command("STLS").startswith(b"-ERR")
        assert wire.command("QUIT").startswith(b"+OK")


# Plaintext logins


PLAINTEXT_ATTEMPTS = [
    ("USER", "USER {user}"),
    ("AUTH PLAIN", "AUTH PLAIN {plain}"),
    ("AUTH PLAIN +", "AUTH PLAIN"),
    ("AUTH LOGIN", "AUTH LOGIN"),
]


@pytest.mark.parametrize("user", ["tina", "nobody"])
@pytest.mark.parametrize(("how", "line"), PLAINTEXT_ATTEMPTS)
def test_plaintext_login_refused_before_tls(strict, pki, user, how, line):
    plain = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
    with Wire(strict.pop3_port, source=fresh_loopback()) as wire:
        assert wire.command("CAPA").startswith(b"+OK")
        capabilities = wire.body()
        assert b"\r\nUSER\r\n" not in b"\r\n" + capabilities
        sasl = re.search(rb"\r\nSASL ([^\r]*)\r\n", b"\r\n" + capabilities)
        assert sasl is None or b"PLAIN" not in sasl.group(1).split()
        reply = wire.command(line.format(user=user, plain=plain))
        assert reply == (
            b"-ERR [AUTH] Plaintext authentication disallowed on non-secure "
            b"(SSL/TLS) connections.\r\n"
        ), reply
        # The password never gets a hearing.
        assert wire.command(f"PASS {PASSWORD}").startswith(b"-ERR")
        assert wire.command("STAT").startswith(b"-ERR")
        # Inside TLS, the same login works.
        assert wire.command("STLS").startswith(b"+OK")
        wire.starttls(pki.client_context())
        if user == "tina":
            assert wire.command(f"USER {user}").startswith(b"+OK")
            assert wire.command(f"PASS {PASSWORD}").startswith(b"+OK")
        assert wire.command("QUIT").startswith(b"+OK")


# Who exists


def _apop(wire: Wire, user: str, secret: str) -> bytes:
    challenge = re.search(rb"<[^>]*>", wire.greeting).group(0)
    digest = hashlib.md5(challenge + secret.encode()).hexdigest()
    return wire.command(f"APOP {user} {digest}")


def _attempt(server, how: str, user: str, password: str) -> list[bytes]:
    with Wire(server.pop3_port, source=fresh_loopback()) as wire:
        if how == "USER/PASS":
            replies = [wire.command(f"USER {user}"), wire.command(f"PASS {password}")]
        elif how == "APOP":
            replies = [_apop(wire, user, password)]
        elif how == "AUTH PLAIN":
            plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            replies = [wire.command(f"AUTH PLAIN {plain}")]
        else:
            replies = [wire.command("AUTH PLAIN")]
            plain = base64.b64encode(f"{user}\0{user}\0{password}".encode())
            replies.append(wire.command(plain))
        # The session goes on the same way, too.
        replies.append(wire.command("NOOP"))
        replies.append(wire.command("QUIT"))
        return replies


@pytest.mark.parametrize("how", LOGIN_WAYS)
def test_replies_do_not_tell_who_exists(server, how):
    index = LOGIN_WAYS.index(how)
    attempts = {
        "unknown user": (f"nobody{index}", PASSWORD),
        "wrong password": (f"wrong{index}", "not " + PASSWORD),
        "nologin": (f"nolan{index}", PASSWORD),
        "unknown, odd name": (f"../../etc/passwd{index}", PASSWORD),
    }
    replies = {
        what: _attempt(server, how, user, password)
        for what, (user, password) in attempts.items()
    }
    first = replies["unknown user"]
    assert b"[AUTH]" in b"".join(first), first
    for what, reply in replies.items():
        assert reply == first, (what, reply, first)
    # And the right password does get in (the reply before NOOP's).
    assert _attempt(server, how, "bob", PASSWORD)[-3].startswith(b"+OK")


def test_scram_challenge_does_not_tell_who_exists(server):
    def server_first(user: str) -> bytes:
        with Wire(server.pop3_port) as wire:
            first = base64.b64encode(f"n,,n={user},r=clientnonce".encode())
            reply = wire.command(b"AUTH SCRAM-SHA-256 " + first)
            assert reply.startswith(b"+ "), reply
            assert wire.command("*").startswith(b"-ERR")
            return base64.b64decode(reply[2:].strip())

    known = dict(f.split("=", 1) for f in server_first("bob").decode().split(","))
    unknown = dict(f.split("=", 1) for f in server_first("nobody").decode().split(","))
    assert known.keys() == unknown.keys() == {"r", "s", "i"}
    assert known["i"] == unknown["i"]
    assert len(base64.b64decode(known["s"])) == len(base64.b64decode(unknown["s"]))


def test_letter_case_does_not_make_a_second_session(server):
    with Wire(server.pop3_port) as first:
        assert first.command("USER alice").startswith(b"+OK")
        assert first.command(f"PASS {PASSWORD}").startswith(b"+OK")
        for name in ("ALICE", "Alice", "\uff41\uff4c\uff49\uff43\uff45"):
            with Wire(server.pop3_port, source=fresh_loopback()) as second:
                assert second.command(f"USER {name}").startswith(b"+OK")
                reply = second.command(f"PASS {PASSWORD}")
                # Refused, or the same maildrop, locked: never a second
                # session on it.
                assert reply.startswith((b"-ERR [IN-USE]", b"-ERR [AUTH]")), (
                    name,
                    reply,
                )
        assert first.command("QUIT").startswith(b"+OK")


# Names that try to leave the store


def _tree(root: Path) -> dict[str, int]:
    found = {}
    for directory, _dirs, files in os.walk(root):
        for name in [*files, *_dirs]:
            path = Path(directory, name)
            found[str(path.relative_to(root))] = path.lstat().st_mtime_ns
    return found


ESCAPING_FOLDERS = [
    "../../x",
    "..",
    "../bob",
    "/etc",
    "%2f..%2fx",
    "%2e%2e",
    "a\x00b",
    ".",
    "Archive/../../../x",
    "Archive/..",
    ".Archive",
    "INBOX/../..",
    "..Archive",
]
ESCAPING_USERS = ["..", "a/../../x", "evil@..", "..@example.org", "x/y"]


@pytest.fixture(scope="module", params=["maildir", "mbox"])
def store_server(request, popd_factory):
    extra = "" if request.param == "maildir" else '[maildrop]\ntype = "mbox"\n'
    server = popd_factory(f"escape-{request.param}", extra=extra)
    server.add_plain_user("alice", PASSWORD)
    server.add_plain_user("bob", PASSWORD)
    # An administrator's passwd-file may hold names no store can use.
    for user in ESCAPING_USERS:
        server.add_plain_user(user, PASSWORD)
    seeder = Seeder(server.config)
    try:
        seeder.deliver("alice", MESSAGES["plain"])
        seeder.deliver("bob", MESSAGES["dots"])
    finally:
        seeder.close()
    return server


def test_names_that_leave_the_store_are_refused(store_server):
    server = store_server
    outside = server.directory.parent
    before = _tree(outside)
    logins = [f"alice#{folder}" for folder in ESCAPING_FOLDERS] + ESCAPING_USERS
    for name in logins:
        with Wire(server.pop3_port, source=fresh_loopback()) as wire:
            line = b"USER " + name.encode()
            assert wire.command(line).startswith(b"+OK"), name
            reply = wire.command(f"PASS {PASSWORD}")
            assert reply.startswith(b"-ERR"), (name, reply)
            assert wire.command("QUIT").startswith(b"+OK")
    # The right user still gets in, and sees only its own mail.
    with Wire(server.pop3_port) as wire:
        assert wire.command("USER alice").startswith(b"+OK")
        assert wire.command(f"PASS {PASSWORD}").startswith(b"+OK")
        assert wire.command("STAT").startswith(b"+OK 1 ")
        assert wire.command("QUIT").startswith(b"+OK")
    after = _tree(outside)
    created = sorted(set(after) - set(before))
    changed = sorted(p for p in before if p in after and after[p] != before[p])
    mail = str((server.data_dir / "mail" / "alice").relative_to(outside))
    for path in created + changed:
        # Only alice's own maildrop (its lock files, its index) and the
        # directories above it may have been touched.
        assert path.startswith(mail) or mail.startswith(path), (path, created, changed)
    assert not [p for p in created if re.search(r"(^|/)(x|etc|bob|\.\.)$", p)]


def test_deliver_refuses_names_that_leave_the_store(store_server):
    server = store_server
    outside = server.directory.parent
    before = _tree(outside)
    names = ["../x", "alice/../bob", "alice#../../x"]

    def deliver(name: str):
        return server.cli("deliver", name, stdin=MESSAGES["plain"], check=False)

    for result in parallel(deliver, [(name,) for name in names]):
        assert result.returncode != 0, result
    after = _tree(outside)
    created = sorted(set(after) - set(before))
    data = str(server.data_dir.relative_to(outside))
    # The spool (for the message read before the user was refused) is all.
    assert all(p.startswith(f"{data}/spool") for p in created), created


def test_adduser_refuses_names_that_cannot_be_users(server):
    before = server.passwd_file.read_bytes()

    def adduser(name: str):
        return server.cli(
            "adduser", name, "--password-stdin", stdin=b"pw\n", check=False
        )

    for result in parallel(adduser, [("../x",), ("a:b",)]):
        assert result.returncode != 0, result
    assert server.passwd_file.read_bytes() == before


# TLS versions


def test_tls_below_1_2_is_refused(server, pki):
    old = old_tls_context(pki)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        Wire(server.pop3s_port, context=old, timeout=5)
    with Wire(server.pop3_port, timeout=5) as wire:
        assert wire.command("STLS").startswith(b"+OK")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            wire.starttls(old)
    # TLS 1.2 itself is fine.
    twelve = tls_context(pki, maximum=ssl.TLSVersion.TLSv1_2)
    with Wire(server.pop3s_port, context=twelve) as wire:
        assert wire.sock.version() == "TLSv1.2"
        assert wire.command("QUIT").startswith(b"+OK")


def test_tls_below_1_3_is_refused_where_configured(popd_factory, pki):
    server = popd_factory("tls13", min_version="TLSv1.3")
    twelve = tls_context(pki, maximum=ssl.TLSVersion.TLSv1_2)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        Wire(server.pop3s_port, context=twelve, timeout=5)
    with Wire(server.pop3s_port, context=pki.client_context()) as wire:
        assert wire.sock.version() == "TLSv1.3"
        assert wire.command("QUIT").startswith(b"+OK")
