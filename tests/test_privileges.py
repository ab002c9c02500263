"""
twistd's C{--uid}/C{--gid}, for real: popd binds a port below 1024 as root
(in C{privilegedStartService}), then serves as an unprivileged user, and the
maildrops it writes have the owner and mode an MTA expects: Maildir files
0600 of the serving user, an mbox rewritten with its owner, group and mode.

Needs root, to bind the port and to create the temporary user (removed
afterwards); skips and says so otherwise.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import secrets
import shutil
import smtplib
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers.delivery_e2e import delivery_listeners
from helpers.ops_e2e import LaunchedPopd, wait_for
from helpers.popd_e2e import HOST, REPO, popd_env, twistd_command

pytestmark = pytest.mark.e2e

if os.geteuid() != 0:
    pytest.skip(
        "needs root: binding a port below 1024 and creating a user",
        allow_module_level=True,
    )
if not shutil.which("useradd") or not shutil.which("userdel"):
    pytest.skip("useradd/userdel are not installed", allow_module_level=True)

CANDIDATE_PORTS = (110, 995, 1009, 1010, 1011, 1012, 1013, 1014, 1015)


def free_privileged_port() -> int:
    for port in CANDIDATE_PORTS:
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
            return port
    pytest.skip(f"none of the ports {CANDIDATE_PORTS} is free on {HOST}")


@pytest.fixture(scope="module")
def user():
    """
    A temporary system user (in the group mail, where it exists, as a
    Debian mail user's mbox is), removed at the end.
    """
    name = f"popdt{secrets.token_hex(3)}"
    groups = ["-G", "mail"] if _group_exists("mail") else []
    result = subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            *groups,
            name,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot create a user: {result.stderr.strip()}")
    try:
        account = pwd.getpwnam(name)
        # Modules imported after privileges are dropped are read as the
        # user: this checkout must be readable by it.
        source = REPO / "popd" / "maildrops" / "mbox.py"
        probe = subprocess.run(
            ["/bin/sh", "-c", 'test -r "$0"', str(source)],
            user=account.pw_uid,
            group=account.pw_gid,
            timeout=60,
        )
        if probe.returncode != 0:
            pytest.skip(f"{REPO} is not readable by an unprivileged user")
        yield account
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)
        with contextlib.suppress(KeyError):
            grp.getgrnam(name)
            subprocess.run(["groupdel", name], capture_output=True, timeout=60)


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def workdir(user):
    """
    A directory the serving user can reach (pytest's own are root's
    alone), removed at the end.
    """
    directory = Path(tempfile.mkdtemp(prefix="popd-uid-"))
    directory.chmod(0o755)
    data = directory / "data"
    data.mkdir(mode=0o700)
    os.chown(data, user.pw_uid, user.pw_gid)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def write_config(directory: Path, pki, port: int, store: str) -> Path:
    config = directory / "popd.toml"
    config.write_text(
        "[server]\n"
        'data_dir = "data"\n'
        "[pop3]\n"
        f'listen = ["tcp:{port}:interface={HOST}"]\n'
        "[pop3s]\n"
        "listen = []\n"
        "[lmtp]\n"
        f'listen = ["tcp:0:interface={HOST}"]\n'
        "[tls]\n"
        f'certificate = "{pki.cert_file}"\n'
        f'key = "{pki.key_file}"\n'
        "[auth]\n"
        'plaintext = "always"\n'
        "failure_delay = 0\n"
        "[maildrop]\n" + store
    )
    return config


def add_user(directory: Path, user, name: str, password: str) -> None:
    passwd = directory / "data" / "passwd"
    passwd.write_text(f"{name}:{{PLAIN}}{password}\n")
    os.chown(passwd, user.pw_uid, user.pw_gid)
    passwd.chmod(0o600)


def start(directory: Path, config: Path, user) -> LaunchedPopd:
    # twistd's own options come before the plugin name.
    command = twistd_command("--config", str(config))
    at = command.index("popd")
    command[at:at] = ["--uid", user.pw_name, "--gid", user.pw_name]
    return LaunchedPopd(directory, config, command, env=popd_env()).start(
        listeners=("POP3",)
    )


def ids_of(pid: int) -> tuple[list[int], list[int]]:
    """
    The real, effective, saved and filesystem uids and gids of C{pid}.
    """
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return [int(v) for v in fields["Uid"]], [int(v) for v in fields["Gid"]]


def pop3(port: int, *commands: str) -> list[bytes]:
    with socket.create_connection((HOST, port), timeout=30) as sock:
        file = sock.makefile("rb")
        replies = [file.readline()]
        for command in commands:
            sock.sendall(command.encode() + b"\r\n")
            reply = file.readline()
            replies.append(reply)
            if command.startswith("RETR") and reply.startswith(b"+OK"):
                while (line := file.readline()) not in (b".\r\n", b""):
                    replies[-1] += line
        file.close()
        return replies


def test_binds_privileged_port_then_serves_as_the_user(workdir, user, pki):
    port = free_privileged_port()
    config = write_config(workdir, pki, port, 'type = "maildir"\n')
    add_user(workdir, user, "una", "uid-pass")
    server = start(workdir, config, user)
    try:
        assert server.pop3_port == port
        # The whole process runs as the user now: no way back to root.
        # (It binds, logs "listening", then drops privileges: wait a moment.)
        wait_for(lambda: ids_of(server.process.pid)[0][0] != 0, timeout=10)
        uids, gids = ids_of(server.process.pid)
        assert uids == [user.pw_uid] * 4
        assert gids == [user.pw_gid] * 4
        # Delivered by the unprivileged process over LMTP.
        lmtp = int(delivery_listeners(server)["LMTP"][0])
        with smtplib.LMTP(HOST, lmtp, timeout=30) as client:
            client.sendmail("s@example.org", ["una"], b"Subject: uid\n\nhello\n")
        replies = pop3(port, "USER una", "PASS uid-pass", "RETR 1", "QUIT")
        assert all(reply.startswith(b"+OK") for reply in replies), replies
        assert b"hello" in replies[3]
        # Maildir files: the serving user's, 0600; directories 0700.
        maildir = workdir / "data" / "mail" / "una" / "Maildir"
        files = [p for p in maildir.rglob("*") if p.is_file()]
        messages = [p for p in files if p.parent.name in ("new", "cur")]
        assert messages
        for path in files:
            status = path.stat()
            assert (status.st_uid, status.st_gid) == (user.pw_uid, user.pw_gid)
            if path in messages:
                assert stat.S_IMODE(status.st_mode) == 0o600, path
        for directory in (maildir, maildir / "new", maildir / "cur"):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
            assert directory.stat().st_uid == user.pw_uid
    finally:
        output = server.stop()
    assert "Traceback" not in output, output


def test_mbox_rewrite_keeps_owner_group_and_mode(workdir, user, pki):
    port = free_privileged_port()
    spool = workdir / "data" / "mail"
    spool.mkdir(mode=0o770)
    os.chown(spool, user.pw_uid, user.pw_gid)
    mbox = spool / "mo"
    mbox.write_bytes(
        b"From a@example.org Thu Jan  1 00:00:00 2026\n"
        b"Subject: one\n\nfirst\n\n"
        b"From b@example.org Thu Jan  1 00:00:01 2026\n"
        b"Subject: two\n\nsecond\n"
    )
    # As Debian's MTAs leave /var/mail/USER: the user's, group mail, 0660.
    group = grp.getgrnam("mail").gr_gid if _group_exists("mail") else user.pw_gid
    os.chown(mbox, user.pw_uid, group)
    mbox.chmod(0o660)
    config = write_config(workdir, pki, port, 'type = "mbox"\npath = "data/mail/%u"\n')
    add_user(workdir, user, "mo", "mbox-pass")
    server = start(workdir, config, user)
    try:
        replies = pop3(port, "USER mo", "PASS mbox-pass", "DELE 1", "QUIT")
        assert all(reply.startswith(b"+OK") for reply in replies), replies
    finally:
        output = server.stop()
    assert "Traceback" not in output, output
    assert b"Subject: one" not in mbox.read_bytes()
    assert b"Subject: two" in mbox.read_bytes()
    status = mbox.stat()
    assert (status.st_uid, status.st_gid) == (user.pw_uid, group)
    assert stat.S_IMODE(status.st_mode) == 0o660
