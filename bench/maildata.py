"""
The benchmark's users and mail, made the same way every time.

Every message is a pure function of its user and number, so the load
generator knows each message's exact wire form without reading the Maildir
the servers serve.  The first line of every message is
C{X-Bench-Id: USER/N}, which is how the generator tells which message a
server sent (servers number a maildrop in different orders).

Users (password C{pw-USER}, C{{PLAIN}} in the passwd-file):

  - C{s01} … C{s64}: three small messages each (the C{sessions} scenario,
    one user per concurrent client: POP3 servers lock a maildrop);
  - C{r1}: four messages of 1 MB (C{retr});
  - C{i00001} …: one small message each (C{idle});
  - C{big}: a large maildrop of small messages (C{bigstat}).

The Maildir names carry no C{,S=} or C{,W=} size, as a Maildir written by
an MTA's delivery agent: each server works sizes out itself, once.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

SESSION_USERS = 64
SMALL_MESSAGES = 3
RETR_USER = "r1"
RETR_MESSAGES = 4
RETR_SIZE = 1_000_000
BIG_USER = "big"
STAMP_FILE = "bench-stamp"

_WORDS = (
    b"the message server POP3 =3D quoted-printable caf\xc3\xa9 www.example.org. "
    b"... mailbox retrieve octets maildrop Twisted loopback"
).split()


def session_user(index: int) -> str:
    return f"s{index + 1:02d}"


def idle_user(index: int) -> str:
    return f"i{index + 1:05d}"


def password(user: str) -> str:
    return f"pw-{user}"


def _header(user: str, number: int, subject: str) -> bytes:
    return (
        f"X-Bench-Id: {user}/{number}\n"
        "From: Bench Sender <sender@example.org>\n"
        f"To: {user}@example.org\n"
        f"Subject: {subject}\n"
        f"Message-ID: <{user}.{number}@bench.example.org>\n"
        "Date: Tue, 01 Oct 2024 12:00:00 +0000\n"
        "\n"
    ).encode()


def small_message(user: str, number: int) -> bytes:
    """
    A message of 2–4 KB with LF line endings, whose body has lines that
    dot-stuffing changes (one starting with a dot, one of a lone dot).
    """
    rng = random.Random(f"small/{user}/{number}")
    lines = [_header(user, number, f"bench message {number} for {user}")]
    for line_number in range(rng.randint(30, 60)):
        words = b" ".join(rng.choices(_WORDS, k=rng.randint(0, 12)))
        if line_number == 3:
            words = b"." + words
        elif line_number == 7:
            words = b"."
        lines.append(words + b"\n")
    return b"".join(lines)


def big_message(user: str, number: int, size: int = RETR_SIZE) -> bytes:
    """
    A message of exactly C{size} octets with LF line endings (lines of 0 to
    20 words, one in 50 starting with a dot), ending with a line end.
    """
    rng = random.Random(f"big/{user}/{number}")
    head = _header(user, number, f"big message {number}")
    lines = []
    total = len(head)
    line_number = 0
    while total < size:
        line = b" ".join(rng.choices(_WORDS, k=rng.randint(0, 20)))
        if line_number % 50 == 0:
            line = b"." + line
        lines.append(line)
        total += len(line) + 1
        line_number += 1
    body = b"\n".join(lines) + b"\n"
    message = (head + body)[: size - 1] + b"\n"
    return message


def tiny_message(user: str, number: int) -> bytes:
    """
    A message of 300–1,500 octets for the large maildrop.
    """
    filler = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n"
    return _header(user, number, f"message {number}") + filler * (
        (number * 7919) % 22 + 1
    )


def crlf(message: bytes) -> bytes:
    """
    The message with CRLF line endings: what RETR sends, un-dot-stuffed.
    """
    return message.replace(b"\n", b"\r\n")


def wire(message: bytes) -> bytes:
    """
    The multi-line body a server sends for RETR, dot-stuffed, without the
    terminating C{.CRLF}.
    """
    stuffed = crlf(message).replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed


def unstuff(body: bytes) -> bytes:
    """
    The inverse of L{wire}: the message with CRLF line endings.
    """
    if body.startswith(b".."):
        body = body[1:]
    return body.replace(b"\r\n..", b"\r\n.")


def message_id(body: bytes | bytearray | memoryview) -> bytes | None:
    """
    C{USER/N} from the first line of a wire-form message, or None.
    """
    head = bytes(body[:80])
    if not head.startswith(b"X-Bench-Id: "):
        return None
    end = head.find(b"\r\n")
    return head[12:end] if end > 0 else None


@dataclass(frozen=True)
class Layout:
    """
    How many of each user a workspace holds.
    """

    idle_users: int
    big_messages: int

    def stamp(self) -> str:
        return f"v1 idle={self.idle_users} big={self.big_messages}\n"


def maildir_of(mail_root: Path, user: str) -> Path:
    return mail_root / user / "Maildir"


def _file_name(number: int) -> str:
    # Like a delivery agent's unique name, already seen (":2,S"), no sizes.
    return f"{1_700_000_000 + number}.M{number}P4242.bench.example.org:2,S"


def _write_maildir(path: Path, messages) -> None:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    cur = path / "cur"
    for number, data in messages:
        with open(cur / _file_name(number), "wb") as file:
            file.write(data)


def read_all(maildir: Path) -> None:
    """
    Read every message of C{maildir} once (to warm the page cache).
    """
    for sub in ("new", "cur"):
        for entry in os.scandir(maildir / sub):
            with open(entry.path, "rb") as message:
                message.read()


def users(layout: Layout) -> list[str]:
    return (
        [session_user(i) for i in range(SESSION_USERS)]
        + [RETR_USER, BIG_USER]
        + [idle_user(i) for i in range(layout.idle_users)]
    )


def passwd_line(user: str, uid: int, gid: int, home: Path) -> str:
    return f"{user}:{{PLAIN}}{password(user)}:{uid}:{gid}::{home}::\n"


def build(root: Path, layout: Layout, uid: int, gid: int, log=print) -> Path:
    """
    Make (or keep, if it is already there for this layout) the mail tree
    under C{root}/mail and the passwd-file C{root}/passwd.

    @return: the mail root.
    """
    mail_root = root / "mail"
    stamp = root / STAMP_FILE
    if stamp.exists() and stamp.read_text() == layout.stamp():
        return mail_root
    if mail_root.exists():
        import shutil

        shutil.rmtree(mail_root)
    mail_root.mkdir(parents=True)
    log(f"making the mail tree in {mail_root} ({layout.stamp().strip()})")
    for index in range(SESSION_USERS):
        user = session_user(index)
        _write_maildir(
            maildir_of(mail_root, user),
            ((n, small_message(user, n)) for n in range(1, SMALL_MESSAGES + 1)),
        )
    _write_maildir(
        maildir_of(mail_root, RETR_USER),
        ((n, big_message(RETR_USER, n)) for n in range(1, RETR_MESSAGES + 1)),
    )
    for index in range(layout.idle_users):
        user = idle_user(index)
        _write_maildir(maildir_of(mail_root, user), [(1, small_message(user, 1))])
    _write_maildir(
        maildir_of(mail_root, BIG_USER),
        ((n, tiny_message(BIG_USER, n)) for n in range(1, layout.big_messages + 1)),
    )
    with open(root / "passwd", "w") as file:
        for user in users(layout):
            file.write(passwd_line(user, uid, gid, mail_root / user))
    for dirpath, _dirnames, filenames in os.walk(mail_root):
        os.chown(dirpath, uid, gid)
        for name in filenames:
            os.chown(os.path.join(dirpath, name), uid, gid)
    stamp.write_text(layout.stamp())
    return mail_root


def big_totals(count: int) -> tuple[int, int]:
    """
    The STAT reply the large maildrop should get: count and CRLF octets.
    """
    octets = 0
    for number in range(1, count + 1):
        message = tiny_message(BIG_USER, number)
        octets += len(message) + message.count(b"\n")
    return count, octets
