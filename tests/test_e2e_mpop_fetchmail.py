"""
End to end with the mail retrieval agents people run, mpop and fetchmail,
against a real C{twistd -n popd}: each fetches over STLS and over POP3S,
verifying the server against the test CA, and delivers locally (Maildir,
mbox, an MDA).  What they deliver must be the message that was sent, in
local (LF) line endings, after the header line the agent adds, if any.
With C{keep} the mail stays on the server; without it, it is deleted.
"""

from __future__ import annotations

import mailbox
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.popd_e2e import MESSAGES, downloaded

pytestmark = pytest.mark.e2e

PASSWORD = "mra-pass"
# mpop gets every seeded message.  fetchmail drops every CR on its way to
# an MDA, even a bare one inside a line, and answers a message of zero
# octets with a warning mail of its own: those two are not sent to it.
SENT = list(MESSAGES.values())
FETCHMAIL_SENT = [
    message for name, message in MESSAGES.items() if name not in ("bare_cr", "empty")
]
# Enough for the runs that check the other transport and deletion.
FEW = [MESSAGES[name] for name in ("plain", "dots", "crlf", "no_final_newline")]


def program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def local_form(message: bytes) -> bytes:
    """
    The message as a local delivery stores it: LF line endings.
    """
    return downloaded(message).replace(b"\r\n", b"\n")


def without_received(message: bytes) -> bytes:
    """
    The message without the C{Received:} header an agent put on top.
    """
    assert message.startswith(b"Received: "), message[:200]
    lines = message.split(b"\n")
    end = 1
    while lines[end][:1] in (b" ", b"\t"):
        end += 1
    return b"\n".join(lines[end:])


def assert_same_messages(got: list[bytes], sent: list[bytes]) -> None:
    """
    The same messages, in any order, byte for byte.
    """
    expected = sorted(local_form(message) for message in sent)
    assert len(got) == len(expected)
    for index, (mine, theirs) in enumerate(zip(sorted(got), expected, strict=True)):
        assert mine == theirs, f"message {index} of {len(got)} differs"


def count(server, pki, user: str) -> int:
    client = server.poplib_ssl(pki.client_context())
    try:
        client.user(user)
        client.pass_(PASSWORD)
        return client.stat()[0]
    finally:
        client.quit()


@pytest.fixture(scope="module")
def server(popd_factory):
    server = popd_factory("mra")
    # mia and fred get ARGON2ID hashes; max and fay {PLAIN} passwords.
    server.add_hashed_users({"mia": PASSWORD, "fred": PASSWORD})
    server.add_plain_user("max", PASSWORD)
    server.add_plain_user("fay", PASSWORD)
    deliveries = [("mia", message) for message in SENT]
    deliveries += [("fred", message) for message in FETCHMAIL_SENT]
    deliveries += [(user, message) for user in ("max", "fay") for message in FEW]
    server.deliver_all(deliveries)
    return server


def run(arguments: list[str], home: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        arguments,
        env={**os.environ, "HOME": str(home), "LC_ALL": "C"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        f"{arguments[0]} exited with {result.returncode}:\n"
        f"{result.stdout.decode(errors='replace')[-4000:]}\n"
        f"{result.stderr.decode(errors='replace')[-4000:]}"
    )
    return result


# mpop


def mpop(
    server, pki, tmp_path: Path, user: str, *, starttls: bool, delivery: str, keep: bool
) -> None:
    port = server.pop3_port if starttls else server.pop3s_port
    config = tmp_path / "mpoprc"
    config.write_text(
        "defaults\n"
        "tls on\n"
        f"tls_starttls {'on' if starttls else 'off'}\n"
        f"tls_trust_file {pki.ca_file}\n"
        "account test\n"
        "host 127.0.0.1\n"
        f"port {port}\n"
        "auth user\n"
        f"user {user}\n"
        f"passwordeval echo {PASSWORD}\n"
        f"delivery {delivery}\n"
        f"keep {'on' if keep else 'off'}\n"
        "only_new off\n"
        "received_header off\n"
        f"uidls_file {tmp_path / 'uidls'}\n"
    )
    config.chmod(0o600)
    run([program("mpop"), "-C", str(config), "--half-quiet", "test"], tmp_path)


def test_mpop_stls_maildir_keep(server, pki, tmp_path):
    maildir = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    mpop(
        server,
        pki,
        tmp_path,
        "mia",
        starttls=True,
        delivery=f"maildir {maildir}",
        keep=True,
    )
    got = [path.read_bytes() for path in (maildir / "new").iterdir()]
    assert_same_messages(got, SENT)
    assert count(server, pki, "mia") == len(SENT)


def test_mpop_pop3s_mbox_delete(server, pki, tmp_path):
    mbox = tmp_path / "mbox"
    mbox.touch()
    mpop(
        server,
        pki,
        tmp_path,
        "max",
        starttls=False,
        delivery=f"mbox {mbox}",
        keep=False,
    )
    box = mailbox.mbox(mbox, create=False)
    try:
        got = [box.get_bytes(key) for key in box.keys()]
    finally:
        box.close()
    assert_same_messages(got, FEW)
    # Without keep, mpop deleted what it fetched.
    assert count(server, pki, "max") == 0


# fetchmail


def fetchmail(
    server, pki, tmp_path: Path, user: str, *, implicit_tls: bool, keep: bool
) -> list[bytes]:
    """
    Run fetchmail once with an MDA that stores each message in its own
    file; return the files' contents.
    """
    out = tmp_path / "delivered"
    out.mkdir()
    mda = tmp_path / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "$(mktemp {out}/msg.XXXXXXXX)"\n')
    mda.chmod(0o755)
    port = server.pop3s_port if implicit_tls else server.pop3_port
    rcfile = tmp_path / "fetchmailrc"
    rcfile.write_text(
        f"poll 127.0.0.1 service {port} protocol POP3 auth password\n"
        f'  user "{user}" there password "{PASSWORD}" is "{user}" here\n'
        f"  {'ssl ' if implicit_tls else ''}sslproto TLS1.2+ sslcertck\n"
        f'  sslcertfile "{pki.ca_file}" sslcommonname localhost\n'
        f'  fetchall {"keep" if keep else "nokeep"} mda "{mda}"\n'
    )
    rcfile.chmod(0o600)
    arguments = [
        program("fetchmail"),
        "-f",
        str(rcfile),
        "--nosyslog",
        "-N",
        "--pidfile",
        str(tmp_path / "fetchmail.pid"),
        "--idfile",
        str(tmp_path / "fetchids"),
    ]
    if keep:
        arguments.append("--keep")
    run(arguments, tmp_path)
    return [without_received(path.read_bytes()) for path in out.iterdir()]


def test_fetchmail_stls_keep(server, pki, tmp_path):
    got = fetchmail(server, pki, tmp_path, "fred", implicit_tls=False, keep=True)
    assert_same_messages(got, FETCHMAIL_SENT)
    assert count(server, pki, "fred") == len(FETCHMAIL_SENT)


def test_fetchmail_pop3s_delete(server, pki, tmp_path):
    got = fetchmail(server, pki, tmp_path, "fay", implicit_tls=True, keep=False)
    assert_same_messages(got, FEW)
    assert count(server, pki, "fay") == 0


def test_fetchmail_refuses_unverified_server(server, pki, tmp_path):
    # The test CA is what makes the server trusted: with only the system's
    # CAs fetchmail refuses it, so the runs above really verified it.
    other = tmp_path / "other"
    other.mkdir()
    rcfile = other / "fetchmailrc"
    rcfile.write_text(
        f"poll 127.0.0.1 service {server.pop3s_port} protocol POP3\n"
        f'  user "fred" there password "{PASSWORD}" is "fred" here\n'
        "  ssl sslproto TLS1.2+ sslcertck sslcommonname localhost keep\n"
        '  mda "cat > /dev/null"\n'
    )
    rcfile.chmod(0o600)
    result = subprocess.run(
        [
            program("fetchmail"),
            "-f",
            str(rcfile),
            "--nosyslog",
            "-N",
            "--pidfile",
            str(other / "pid"),
            "--idfile",
            str(other / "ids"),
        ],
        env={**os.environ, "HOME": str(other), "LC_ALL": "C"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result  # PS_SOCKET: TLS failed
