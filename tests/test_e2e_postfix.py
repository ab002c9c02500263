"""
End to end with a real Postfix (Debian's C{postfix} package, which
C{.ci/run} installs): mail sent to Postfix over SMTP (smtplib) for
C{alice@example.test} reaches popd over LMTP (Postfix's C{local_transport})
and is downloaded over POP3 (poplib), the same bytes apart from the header
fields the MTA adds.  Mail for C{relay.test} goes to popd's SMTP listener
as Postfix's next hop.

Postfix runs as an isolated instance: its own configuration directory,
queue and data directories in a temporary directory, listening on
127.0.0.1 only, started with C{postfix -c DIR start} and stopped at the end.
Its master must start as root (it switches to C{mail_owner}); the tests
skip, saying why, where Postfix is absent or they do not run as root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from helpers.delivery_e2e import delivery_listeners, download_all, field, split_trace
from helpers.popd_e2e import HOST, MESSAGES, downloaded, to_crlf

POSTFIX = shutil.which("postfix") or (
    "/usr/sbin/postfix" if os.path.exists("/usr/sbin/postfix") else None
)


def _skip_reason() -> str | None:
    if POSTFIX is None:
        return (
            "Postfix is not installed (Debian: DEBIAN_FRONTEND=noninteractive "
            "apt-get install postfix; .ci/run does it)"
        )
    if os.geteuid() != 0:
        return "a Postfix instance must be started as root (its master switches user)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no postfix user for mail_owner"
    return None


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
]

PASSWORD = "postfix-test-pass"
SENDER = "sender@example.org"
COMMAND_TIMEOUT = 60
ARRIVAL_TIMEOUT = 60
USERS = ("alice", "bob", "dora", "rita")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


MASTER_CF = """\
{host}:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
smtp      unix  - - n - - smtp
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixInstance:
    """
    One isolated Postfix: configuration, queue, data and log under
    C{directory}; its SMTP server on 127.0.0.1:C{port}.
    """

    def __init__(self, directory: Path, lmtp_port: int, smtp_next_hop: int) -> None:
        self.directory = directory
        self.config_dir = directory / "conf"
        self.queue_dir = directory / "queue"
        self.data_dir = directory / "data"
        self.log_file = directory / "maillog"
        self.lmtp_port = lmtp_port
        self.smtp_next_hop = smtp_next_hop
        self.port = 0
        self.started = False

    def configure(self) -> None:
        for path in (self.config_dir, self.queue_dir, self.data_dir):
            path.mkdir(parents=True, exist_ok=True)
        # The postfix user must reach the queue, which lives in here.
        self.directory.chmod(0o755)
        os.chown(self.data_dir, pwd.getpwnam("postfix").pw_uid, -1)
        self.port = free_port()
        main = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "mx.example.test",
            "mydomain": "example.test",
            "myorigin": "example.test",
            "mydestination": "example.test",
            "inet_interfaces": HOST,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # Local mail goes to popd over LMTP; Postfix checks no users
            # itself, so popd's RCPT replies decide.
            "local_transport": f"lmtp:inet:{HOST}:{self.lmtp_port}",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            # relay.test has popd's SMTP listener as its next hop.
            "relay_domains": "relay.test",
            "transport_maps": (
                f"inline:{{relay.test=smtp:[{HOST}]:{self.smtp_next_hop}}}"
            ),
            "default_transport": "error:this test instance delivers locally only",
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "maillog_file": self.log_file,
            "maillog_file_prefixes": self.directory,
            "biff": "no",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        (self.config_dir / "main.cf").write_text(
            "".join(f"{key} = {value}\n" for key, value in main.items())
        )
        (self.config_dir / "master.cf").write_text(
            MASTER_CF.format(host=HOST, port=self.port)
        )

    def postfix(self, *arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *arguments],
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def start(self) -> PostfixInstance:
        self.configure()
        result = self.postfix("start")
        if result.returncode != 0:
            raise AssertionError(
                f"postfix start failed ({result.returncode}): "
                f"{result.stdout.decode(errors='replace')}"
                f"{result.stderr.decode(errors='replace')}\n{self.log()}"
            )
        self.started = True
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"Postfix does not listen on {HOST}:{self.port}:\n{self.log()}"
                    ) from None
                time.sleep(0.2)

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """
        C{postfix stop}, then wait (bounded) for the master to go; kill it
        by its PID if it lingers.
        """
        if not self.started:
            return
        pid = self.master_pid()
        self.postfix("stop")
        deadline = time.monotonic() + 15
        while pid is not None and _running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid is not None and _running(pid):
            os.kill(pid, signal.SIGKILL)
        self.started = False

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return "(no Postfix log)"

    def send(self, recipients: list[str], message: bytes, **options) -> dict:
        client = smtplib.SMTP(HOST, self.port, timeout=COMMAND_TIMEOUT)
        try:
            client.ehlo("client.example.org")
            return client.sendmail(SENDER, recipients, message, **options)
        finally:
            client.quit()


def _running(pid: int) -> bool:
    """
    Whether process C{pid} exists and is not a zombie waiting for a parent
    that does not reap it.
    """
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def popd(popd_factory):
    server = popd_factory(
        "postfix",
        lmtp_listen=[f"tcp:0:interface={HOST}"],
        smtp_listen=[f"tcp:0:interface={HOST}"],
    )
    for user in USERS:
        server.add_plain_user(user, PASSWORD)
    return server


@pytest.fixture(scope="module")
def postfix(popd):
    listeners = delivery_listeners(popd)
    directory = Path(tempfile.mkdtemp(prefix="popd-postfix-", dir="/tmp"))
    instance = PostfixInstance(
        directory, int(listeners["LMTP"][0]), int(listeners["SMTP"][0])
    )
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(directory, ignore_errors=True)


def wait_for_mail(popd, postfix, user: str, count: int) -> dict[str, bytes]:
    """
    Poll C{user}'s maildrop over POP3 (bounded) until it holds C{count}
    messages.
    """
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while True:
        messages = download_all(popd, user, PASSWORD)
        if len(messages) >= count:
            return messages
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{user} has {len(messages)} of {count} messages after "
                f"{ARRIVAL_TIMEOUT}s.\nPostfix log:\n{postfix.log()}\n"
                f"popd log:\n{popd.output()[-5000:]}"
            )
        time.sleep(0.3)


def header_lines(message: bytes) -> list[bytes]:
    """
    The header fields of a CRLF message, unfolded, in order.
    """
    head = message.split(b"\r\n\r\n", 1)[0]
    return [line for line in head.replace(b"\r\n ", b" ").split(b"\r\n") if line]


def check_arrived(stored: bytes, original: bytes, address: str) -> None:
    """
    C{stored} (downloaded) is C{original} with the fields an MTA adds:
    the body the same octets, the original fields all there in order.
    """
    fields, rest = split_trace(stored)
    expected = downloaded(original)
    body = expected.split(b"\r\n\r\n", 1)[1]
    assert rest.split(b"\r\n\r\n", 1)[1] == body
    added = header_lines(rest)
    position = 0
    for line in header_lines(expected):
        assert line in added[position:], (line, added)
        position = added.index(line, position) + 1
    assert field(fields, b"Return-Path") == [f"<{SENDER}>".encode()]
    assert field(fields, b"Delivered-To")[0] == address.encode()
    received = field(fields, b"Received")
    assert b"by mx.example.test (Postfix)" in received[-1]
    return fields


@pytest.mark.parametrize("name", ["plain", "dots", "eight_bit", "big"])
def test_mail_through_postfix_arrives_byte_for_byte(popd, postfix, name):
    before = download_all(popd, "alice", PASSWORD)
    options = {"mail_options": ["BODY=8BITMIME"]} if name == "eight_bit" else {}
    refused = postfix.send(["alice@example.test"], to_crlf(MESSAGES[name]), **options)
    assert refused == {}
    messages = wait_for_mail(popd, postfix, "alice", len(before) + 1)
    (new,) = set(messages) - set(before)
    fields = check_arrived(messages[new], MESSAGES[name], "alice@example.test")
    assert b" with LMTP id " in field(fields, b"Received")[0]


def test_one_message_for_several_recipients(popd, postfix):
    message = to_crlf(MESSAGES["plain"])
    refused = postfix.send(
        ["bob@example.test", "ghost@example.test", "dora@example.test"], message
    )
    assert refused == {}  # Postfix takes them all and asks popd at delivery
    for user in ("bob", "dora"):
        (stored,) = wait_for_mail(popd, postfix, user, 1).values()
        check_arrived(stored, MESSAGES["plain"], f"{user}@example.test")
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while "to=<ghost@example.test>" not in postfix.log():
        assert time.monotonic() < deadline, postfix.log()
        time.sleep(0.2)
    (line,) = [
        line for line in postfix.log().splitlines() if "to=<ghost@example.test>" in line
    ]
    assert "status=bounced" in line and "550 5.1.1" in line, line


def test_temporary_failure_is_retried(popd, postfix):
    """
    While the user database cannot be read, popd answers 451 and Postfix
    keeps the message; once it can, the message arrives, once.
    """
    passwd = popd.passwd_file
    saved = passwd.with_name("passwd.saved")
    passwd.rename(saved)
    passwd.mkdir()  # unreadable as a file, even for root
    try:
        assert postfix.send(["rita@example.test"], to_crlf(MESSAGES["dots"])) == {}
        deadline = time.monotonic() + ARRIVAL_TIMEOUT
        while "status=deferred" not in postfix.log():
            assert time.monotonic() < deadline, postfix.log()
            time.sleep(0.2)
        assert "451 4.3.0" in postfix.log()
    finally:
        passwd.rmdir()
        saved.rename(passwd)
    (stored,) = wait_for_mail(popd, postfix, "rita", 1).values()
    check_arrived(stored, MESSAGES["dots"], "rita@example.test")


def test_postfix_relays_to_the_smtp_listener(popd, postfix):
    before = download_all(popd, "bob", PASSWORD)
    assert postfix.send(["bob@relay.test"], to_crlf(MESSAGES["crlf"])) == {}
    messages = wait_for_mail(popd, postfix, "bob", len(before) + 1)
    (new,) = set(messages) - set(before)
    fields = check_arrived(messages[new], MESSAGES["crlf"], "bob@relay.test")
    assert b" with ESMTP id " in field(fields, b"Received")[0]
