"""
The crash-safety and concurrency harness: real C{twistd -n popd}
processes and C{popd deliver} commands killed with SIGKILL at random
moments, and a ledger that says, after each crash, what every user's
maildrop must hold, may hold and must never hold again.

  - L{CrashStore}: one store (Maildir, mbox, SQLite or PostgreSQL) in a
    directory of its own, with its users and the configuration that
    servers started on it share; L{CrashStore.start_server} starts a fresh
    server (POP3 and LMTP on ephemeral loopback ports).
  - L{make_message}: a test message carrying its unique C{X-Crash-Id}
    header, with lone-dot, C{From } and C{>From } lines, rebuilt the same
    from its id and size whenever a check needs the whole text.
  - L{Ledger}: per user, the ids that I{must} be there (acknowledged and
    not deleted), I{may} be there (a delivery or a QUIT the kill cut off)
    and must I{never} be seen (deleted for sure, data never completed, or
    seen missing once).  L{Ledger.check} compares a download with it:
    nothing lost, nothing duplicated, nothing resurrected, no partial or
    foreign message, and, for the stores that promise it, an interrupted
    commit that removed all of its messages or none.
  - L{download}: log in (retrying a bounded time on C{[IN-USE]}, and
    timing how long that took), UIDL and RETR everything, optionally
    delete it, QUIT.
  - L{LMTPClient}: a bare LMTP client that records how far each
    transaction got (terminating dot not sent / sent / acknowledged).
  - L{run_quit_trial}, L{run_lmtp_trial} and L{run_deliver_trial}: one
    crash each, with the sessions, transactions or commands it interrupts
    running concurrently, each at a different point of its work.

Every wait is bounded, every server listens on 127.0.0.1 only, and every
process started here is killed before its function returns (servers by
their L{CrashStore}, which keeps a list).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from helpers.delivery_e2e import delivery_listeners, split_trace
from helpers.popd_e2e import (
    HOST,
    SERVER_ERRORS,
    Pki,
    PopdServer,
    config_text,
    downloaded,
    popd_env,
    wire_form,
)

STORES = ("maildir", "mbox", "sqlite", "postgresql")
#: Stores whose commit removes all of its messages or none, whenever the
#: process dies (one rename, one transaction).  Maildir removes one file
#: at a time: a crash mid-commit may leave some of them.
ATOMIC_COMMIT = {"maildir": False, "mbox": True, "sqlite": True, "postgresql": True}
PASSWORD = "crash-test-pass"
SENDER = "mta@crash.test"
#: Bound on the first login after a crash: a lock the dead process held
#: must not keep its user out longer.
LOGIN_BOUND = 5.0
#: Bound on any one socket operation.
IO_TIMEOUT = 30.0

_CRASH_ID = re.compile(rb"^X-Crash-Id: ([!-~]+)\r?$", re.M)


# Messages


def make_message(ident: str, size: int) -> bytes:
    """
    A message of about C{size} octets (LF line ends) carrying
    C{X-Crash-Id: ident}; the same bytes for the same arguments.

    Its body has lines that only survive intact if the store and the wire
    treat them right: a lone dot, leading dots, C{From } and C{>From }.
    """
    head = (
        f"From: {SENDER}\n"
        f"To: user@crash.test\n"
        f"Subject: crash test {ident} ({size} octets)\n"
        f"Message-ID: <{ident}@crash.test>\n"
        f"X-Crash-Id: {ident}\n"
        f"\n"
    ).encode()
    seed = hashlib.sha256(ident.encode()).hexdigest().encode()
    lines = [head]
    total = len(head)
    number = 0
    while total < size:
        number += 1
        if number % 31 == 0:
            line = b".\n"
        elif number % 29 == 0:
            line = b"From the crash harness, line %d\n" % number
        elif number % 23 == 0:
            line = b">From quoted, line %d\n" % number
        elif number % 19 == 0:
            line = b"..%d two leading dots\n" % number
        else:
            line = b"%06d %s\n" % (number, seed[: 16 + number % 48])
        lines.append(line)
        total += len(line)
    lines.append(b"end of %s\n" % ident.encode())
    return b"".join(lines)


def message_size(rng: random.Random, large: float = 0.05) -> int:
    """
    A random message size: mostly small, some medium, a few of 0.6-1.5 MB
    (with probability C{large}) whose writing takes long enough for a
    kill to land in the middle of it.
    """
    roll = rng.random()
    if roll < large:
        return rng.randint(600_000, 1_500_000)
    if roll < large + 0.2:
        return rng.randint(20_000, 200_000)
    return rng.randint(300, 4_000)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The ledger


class CheckFailed(AssertionError):
    """
    A maildrop is not what the ledger allows.
    """


@dataclass
class UserLedger:
    """
    What one user's maildrop must, may and must never hold (by crash id).

    @ivar sizes: the size argument of L{make_message} of every id sent.
    @ivar groups: the ids of each interrupted commit, checked for
        all-or-nothing on stores with L{ATOMIC_COMMIT}.
    """

    user: str
    must: set[str] = field(default_factory=set)
    maybe: set[str] = field(default_factory=set)
    never: set[str] = field(default_factory=set)
    sizes: dict[str, int] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    groups: list[set[str]] = field(default_factory=list)

    def sent(self, ident: str, size: int, message: bytes) -> None:
        self.sizes[ident] = size
        self.digests[ident] = digest(downloaded(message))

    def delivery(self, ident: str, stage: str) -> None:
        """
        How far the delivery of C{ident} got: C{"acked"} (the store said
        it is durable), C{"final"} (the end of the data was sent, or the
        command was killed: it may or may not be there) or C{"unsent"}
        (the data never ended: it must not be there).
        """
        if stage == "acked":
            self.must.add(ident)
        elif stage == "final":
            self.maybe.add(ident)
        elif stage == "unsent":
            self.never.add(ident)
        else:
            raise ValueError(stage)

    def deleted(self, idents: Iterable[str], confirmed: bool) -> None:
        """
        A QUIT deleting C{idents} got C{+OK} (C{confirmed}), or was cut off.
        """
        idents = set(idents)
        self.must -= idents
        if confirmed:
            self.maybe -= idents
            self.never |= idents
        else:
            self.maybe |= idents
            self.groups.append(idents)


@dataclass
class CheckReport:
    """
    What one check saw, for the statistics of a run.
    """

    present: int = 0
    maybe_present: int = 0
    maybe_absent: int = 0
    commits: Counter = field(default_factory=Counter)


class Ledger:
    """
    The ledgers of every user of a store, and their checks.

    @ivar atomic: whether an interrupted commit must have removed all of
        its messages or none.
    """

    def __init__(self, users: Iterable[str], atomic: bool) -> None:
        self.users = {user: UserLedger(user) for user in users}
        self.atomic = atomic
        self.stats = CheckReport()
        self._lock = threading.Lock()

    def __getitem__(self, user: str) -> UserLedger:
        return self.users[user]

    def check(self, user: str, found: list[tuple[str, bytes]]) -> dict[str, str]:
        """
        Compare a download of C{user}'s maildrop (C{(uid, message)} in
        order, as received) with the ledger, then settle what the last
        crash left open: an id that may have been there is now there for
        good, or must never be seen again.

        @return: the crash id of each UID.
        @raise CheckFailed: saying everything that is wrong.
        """
        book = self.users[user]
        problems = []
        seen: dict[str, str] = {}
        for uid, data in found:
            _trace, message = split_trace(data)
            header_end = message.find(b"\r\n\r\n")
            match = _CRASH_ID.search(message[: header_end if header_end >= 0 else 4096])
            if match is None:
                problems.append(
                    f"UID {uid}: no X-Crash-Id (a partial or foreign message, "
                    f"{len(data)} octets): {data[:300]!r}"
                )
                continue
            ident = match.group(1).decode()
            if ident in seen:
                problems.append(
                    f"{ident} is there twice (UIDs {seen[ident]} and {uid})"
                )
                continue
            seen[ident] = uid
            if ident not in book.digests:
                problems.append(f"UID {uid}: {ident} was never sent to {user}")
                continue
            if digest(message) != book.digests[ident]:
                problems.append(_describe_damage(uid, ident, book, message))
            if ident in book.never:
                problems.append(
                    f"UID {uid}: {ident} is back although it was deleted, never"
                    " completed, or already seen missing"
                )
        present = set(seen)
        lost = book.must - present
        if lost:
            problems.append(f"lost (acknowledged, not deleted): {sorted(lost)}")
        for group in book.groups:
            kept = group & present
            if self.atomic and 0 < len(kept) < len(group):
                problems.append(
                    f"an interrupted commit removed only {len(group) - len(kept)}"
                    f" of its {len(group)} messages: kept {sorted(kept)}"
                )
        if problems:
            raise CheckFailed(
                f"maildrop of {user}:\n  "
                + "\n  ".join(problems[:20])
                + (
                    f"\n  ... and {len(problems) - 20} more"
                    if len(problems) > 20
                    else ""
                )
            )
        with self._lock:
            for group in book.groups:
                kept = len(group & present)
                kind = (
                    "none removed"
                    if kept == len(group)
                    else "all removed"
                    if kept == 0
                    else "some removed"
                )
                self.stats.commits[kind] += 1
            self.stats.present += len(present)
            self.stats.maybe_present += len(book.maybe & present)
            self.stats.maybe_absent += len(book.maybe - present)
        book.must |= book.maybe & present
        book.never |= book.maybe - present
        book.maybe.clear()
        book.groups.clear()
        return {uid: ident for ident, uid in seen.items()}


def _describe_damage(uid: str, ident: str, book: UserLedger, message: bytes) -> str:
    expected = downloaded(make_message(ident, book.sizes[ident]))
    if expected.startswith(message):
        how = "a truncated copy (a partial message)"
    elif message.startswith(expected):
        how = "the message with more after it"
    else:
        prefix = os.path.commonprefix([expected, message])
        how = f"different from octet {len(prefix)}"
    return (
        f"UID {uid}: {ident} is damaged: {len(message)} octets where "
        f"{len(expected)} were sent: {how}"
    )


# POP3


class POP3Error(Exception):
    """
    A POP3 command failed.
    """


class POP3:
    """
    A bare POP3 client over a socket, reading exact octets (buffered, so
    that multi-line replies of megabytes cost little).
    """

    #: The most a multi-line reply may hold.
    MAX_REPLY = 64 * 1024 * 1024

    def __init__(self, port: int, timeout: float = IO_TIMEOUT) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self._buffer = bytearray()
        self.greeting = self.line()

    def _fill(self) -> None:
        data = self.sock.recv(256 * 1024)
        if not data:
            raise EOFError("the server closed the connection")
        self._buffer += data

    def line(self) -> bytes:
        for _ in range(100_000):
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 2])
                del self._buffer[: end + 2]
                return line
            if len(self._buffer) > 1 << 20:
                raise POP3Error("line too long")
            self._fill()
        raise POP3Error("no line")

    def send(self, command: str) -> None:
        self.sock.sendall(command.encode() + b"\r\n")

    def command(self, command: str) -> bytes:
        self.send(command)
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise POP3Error(f"{command.split()[0]}: {reply!r}")
        return reply

    def multi(self, command: str) -> bytes:
        """
        A multi-line reply's body, dot-stuffing undone, CRLF kept.
        """
        self.command(command)
        searched = 0
        for _ in range(100_000):
            if self._buffer.startswith(b".\r\n"):
                del self._buffer[:3]
                return b""
            end = self._buffer.find(b"\r\n.\r\n", max(0, searched - 4))
            if end >= 0:
                body = bytes(self._buffer[: end + 2])
                del self._buffer[: end + 5]
                return re.sub(rb"(?m)^\.", b"", body)
            if len(self._buffer) > self.MAX_REPLY:
                raise POP3Error("reply too long")
            searched = len(self._buffer)
            self._fill()
        raise POP3Error("endless reply")

    def login(self, user: str, password: str = PASSWORD) -> None:
        self.command(f"USER {user}")
        self.command(f"PASS {password}")

    def uidl(self) -> list[tuple[int, str]]:
        return [
            (int(number), uid.decode())
            for number, uid in (
                line.split() for line in self.multi("UIDL").splitlines()
            )
        ]

    def retr(self, number: int) -> bytes:
        return self.multi(f"RETR {number}")

    def crash_id(self, number: int) -> str | None:
        match = _CRASH_ID.search(self.multi(f"TOP {number} 0"))
        return match.group(1).decode() if match else None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def login(port: int, user: str, bound: float = LOGIN_BOUND) -> tuple[POP3, float]:
    """
    Connect and log in, trying again while the maildrop is C{[IN-USE]},
    for at most C{bound} seconds.

    @return: the client and how long the login waited for the lock.
    @raise CheckFailed: still C{[IN-USE]} after C{bound} seconds.
    """
    started = time.monotonic()
    for _ in range(10_000):
        client = POP3(port)
        try:
            client.login(user)
        except POP3Error as error:
            client.close()
            waited = time.monotonic() - started
            if "[IN-USE]" not in str(error):
                raise
            if waited > bound:
                raise CheckFailed(
                    f"{user} still locked out ([IN-USE]) {waited:.1f} s after"
                    " the crash: a stale lock"
                ) from None
            time.sleep(0.02)
            continue
        return client, time.monotonic() - started
    raise CheckFailed(f"could not log {user} in")


def download(
    port: int, user: str, *, delete: bool = False, bound: float = LOGIN_BOUND
) -> tuple[list[tuple[str, bytes]], float, bool]:
    """
    Every message of C{user}, as received, in order; deleting them all at
    QUIT if C{delete}.

    @return: C{(uid, message)} pairs, the time the login waited for the
        lock, and whether QUIT said C{+OK}.
    """
    client, waited = login(port, user, bound)
    try:
        found = [(uid, client.retr(number)) for number, uid in client.uidl()]
        if delete:
            for number in range(1, len(found) + 1):
                client.command(f"DELE {number}")
        client.send("QUIT")
        quit_ok = client.line().startswith(b"+OK")
    finally:
        client.close()
    return found, waited, quit_ok


# LMTP


class LMTPClient:
    """
    A bare LMTP client (one recipient per transaction).
    """

    def __init__(self, port: int, timeout: float = IO_TIMEOUT) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self._expect(220)
        self._command("LHLO crash.test", 250)

    def _reply(self) -> tuple[int, bytes]:
        for _ in range(1000):
            line = self.file.readline(1 << 16)
            if not line:
                raise EOFError("the server closed the connection")
            if line[3:4] != b"-":
                return int(line[:3]), line
        raise OSError("endless reply")

    def _expect(self, code: int) -> None:
        got, line = self._reply()
        if got != code:
            raise OSError(f"expected {code}, got {line!r}")

    def _command(self, command: str, code: int) -> None:
        self.sock.sendall(command.encode() + b"\r\n")
        self._expect(code)

    def deliver(
        self,
        user: str,
        message: bytes,
        stage: Callable[[str], None],
        data_started: Callable[[], None] | None = None,
    ) -> None:
        """
        One transaction; C{stage} is told C{"final"} just before the chunk
        holding the terminating dot is sent and C{"acked"} on C{250}.

        @raise OSError: or L{EOFError}: the connection failed (or the
            server refused; then C{stage} was not told C{"acked"}).
        """
        self._command(f"MAIL FROM:<{SENDER}>", 250)
        self._command(f"RCPT TO:<{user}>", 250)
        self._command("DATA", 354)
        data = wire_form(message)
        chunk = 64 * 1024
        pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        for index, piece in enumerate(pieces):
            if index == len(pieces) - 1:
                stage("final")
            self.sock.sendall(piece)
            if index == 0 and data_started is not None:
                data_started()
        self._expect(250)
        stage("acked")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"QUIT\r\n")
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


# Stores and servers


class CrashStore:
    """
    One store in C{directory}, its users, and the servers started on it.

    @param kind: one of L{STORES}.
    @param dsn: the PostgreSQL DSN (an empty, upgraded schema) for
        C{"postgresql"}.
    """

    def __init__(
        self,
        kind: str,
        directory: Path,
        pki: Pki,
        users: Iterable[str],
        dsn: str | None = None,
        extra: str = "",
    ) -> None:
        self.kind = kind
        self.dsn = dsn
        self.directory = directory
        self.users = list(users)
        self.ledger = Ledger(self.users, ATOMIC_COMMIT[kind])
        self.servers: list[PopdServer] = []
        self.startups: list[float] = []
        self.login_waits: list[float] = []
        self._lock = threading.Lock()
        maildrop = {
            "maildir": '[maildrop]\ntype = "maildir"\n',
            "mbox": '[maildrop]\ntype = "mbox"\n',
            "sqlite": '[maildrop]\ntype = "sql"\n',
            "postgresql": f'[maildrop]\ntype = "sql"\ndsn = {json.dumps(dsn)}\n',
        }[kind]
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "popd.toml"
        self.config.write_text(
            config_text(
                pki,
                plaintext="always",
                lmtp_listen=["tcp:0:interface=127.0.0.1"],
                extra="failure_delay = 0\n" + maildrop + extra,
            )
        )
        passwd = directory / "data" / "passwd"
        passwd.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        passwd.write_text("".join(f"{user}:{{PLAIN}}{PASSWORD}\n" for user in users))
        passwd.chmod(0o600)

    def start_server(self) -> Server:
        """
        A fresh C{twistd -n popd} on this store, listening.
        """
        started = time.monotonic()
        server = PopdServer(self.directory, self.config)
        with self._lock:
            self.servers.append(server)
        server.start()
        lmtp = delivery_listeners(server)["LMTP"]
        with self._lock:
            self.startups.append(time.monotonic() - started)
        return Server(server, server.pop3_port, int(lmtp[0]))

    def deliver_command(self, user: str) -> list[str]:
        """
        The C{popd deliver} command line for C{user}.
        """
        return [
            sys.executable,
            "-m",
            "popd.cli",
            "--config",
            str(self.config),
            "deliver",
            "-v",
            user,
        ]

    def verify(self, server: Server, users: Iterable[str], *, delete: bool = False):
        """
        Download every user's maildrop from C{server} and check it against
        the ledger (the first login after a crash must not wait longer than
        L{LOGIN_BOUND}); with C{delete}, remove what was checked.

        @return: the crash id of each UID, by user.
        """
        maps = {}
        for user in users:
            found, waited, quit_ok = download(server.pop3, user, delete=delete)
            with self._lock:
                self.login_waits.append(waited)
            maps[user] = self.ledger.check(user, found)
            if delete:
                if not quit_ok:
                    raise CheckFailed(f"QUIT deleting {user}'s messages failed")
                self.ledger[user].deleted(maps[user].values(), confirmed=True)
                maps[user] = {}
        return maps

    def stop_all(self) -> list[str]:
        """
        Stop every server still running; return the problems seen in
        servers' output (tracebacks, unhandled errors).
        """
        problems = []
        with self._lock:
            servers = list(self.servers)
        for server in servers:
            output = server.stop()
            for marker in SERVER_ERRORS:
                if marker in output:
                    problems.append(
                        f"a popd server logged {marker!r}:\n{output[-4000:]}"
                    )
                    break
        return problems


@dataclass
class Server:
    """
    A running server and its ports.
    """

    process: PopdServer
    pop3: int
    lmtp: int

    def kill(self) -> None:
        """
        SIGKILL, and wait (bounded) until it is gone.
        """
        self.process.kill(signal.SIGKILL)


# Trials


@dataclass
class TrialStats:
    """
    What the trials of one test did, for its report.
    """

    trials: int = 0
    outcomes: Counter = field(default_factory=Counter)
    timings: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, outcome: str, n: int = 1) -> None:
        with self._lock:
            self.outcomes[outcome] += n

    def crashed(self, n: int = 1) -> None:
        with self._lock:
            self.trials += n


class _Counter:
    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._next = 0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            self._next += 1
            return f"{self._prefix}-{self._next}-{os.urandom(3).hex()}"


def new_ids(prefix: str) -> Callable[[], str]:
    """
    A source of unique crash ids starting with C{prefix}.
    """
    return _Counter(prefix)


def top_up(
    store: CrashStore,
    server: Server,
    users: list[str],
    target: int,
    counts: dict[str, int],
    next_id: Callable[[], str],
    rng: random.Random,
    large: float = 0.02,
) -> None:
    """
    Deliver over LMTP until each user has C{target} messages (C{counts}
    says how many each has), one connection per user at once; every
    delivery must be acknowledged.
    """
    plans = []
    for user in users:
        for _ in range(max(0, target - counts.get(user, 0))):
            ident = next_id()
            size = message_size(rng, large)
            plans.append((user, ident, size))

    def deliver_all(user: str) -> None:
        book = store.ledger[user]
        client = LMTPClient(server.lmtp)
        try:
            for owner, ident, size in plans:
                if owner != user:
                    continue
                message = make_message(ident, size)
                book.sent(ident, size, message)
                stage = ["unsent"]
                try:
                    client.deliver(user, message, stage.append)
                finally:
                    book.delivery(ident, stage[-1])
                if stage[-1] != "acked":
                    raise CheckFailed(f"delivery of {ident} to {user} failed")
        finally:
            client.close()

    with ThreadPoolExecutor(len(users)) as pool:
        for future in [pool.submit(deliver_all, user) for user in users]:
            future.result()


@dataclass
class _Session:
    user: str
    deleted: list[str] = field(default_factory=list)
    outcome: str = "not started"
    quit_latency: float | None = None
    error: BaseException | None = None


#: How a server trial picks the moment of the kill, and how often.
KILL_MODES = {
    "quit": 0.35,  # a random moment while the QUITs commit
    "quit-reply": 0.15,  # the moment the first QUIT reply arrives
    "lmtp": 0.25,  # a random moment while LMTP delivers
    "lmtp-data": 0.15,  # while a large message's data is being sent
    "lmtp-reply": 0.10,  # the moment the first 250 after DATA arrives
}


def kill_mode(rng: random.Random) -> str:
    return rng.choices(list(KILL_MODES), weights=list(KILL_MODES.values()))[0]


@dataclass
class Timing:
    """
    How long a calibration trial's work took.
    """

    quit: list[float] = field(default_factory=list)
    lmtp: list[float] = field(default_factory=list)


def run_server_trial(
    store: CrashStore,
    server: Server,
    users: list[str],
    rng: random.Random,
    stats: TrialStats,
    next_id: Callable[[], str],
    *,
    mode: str | None,
    quit_window: float = 0.0,
    lmtp_window: float = 0.0,
    per_user: int = 4,
) -> Timing:
    """
    Crash the server while, for each user at once, a POP3 session commits
    its deletions at QUIT and an LMTP connection delivers into the same
    maildrop.

    Each session deletes a random 60% of its maildrop (and retrieves a few
    other messages), then waits for everyone; then each sends QUIT after
    a random pause while each LMTP connection delivers C{per_user}
    messages (a sixth of them 0.6-1.5 MB) one after another.  The kill comes
    as C{mode} says (see L{KILL_MODES}): a random moment within twice the
    QUIT pauses' range (C{quit_window}) or within the deliveries' time
    (C{lmtp_window}), while a large message's data is on its way, or the
    moment the first reply arrives.  C{mode} C{None} calibrates: the kill
    waits for every reply.

    The ledger learns what each QUIT and each delivery got to.
    """
    sessions = [_Session(user) for user in users]
    barrier = threading.Barrier(2 * len(users) + 1, timeout=IO_TIMEOUT)
    quit_replied = threading.Event()
    acked = threading.Event()
    in_data = threading.Event()
    timing = Timing()
    errors: list[BaseException] = []
    pause = {"quit": quit_window / 2, "quit-reply": quit_window / 2}.get(
        mode or "", lmtp_window
    )
    pauses = [rng.uniform(0, pause) for _ in users]

    def session(state: _Session, pause: float) -> None:
        client = None
        try:
            client, _waited = login(server.pop3, state.user)
            numbers = client.uidl()
            chosen = [number for number, _ in numbers if rng.random() < 0.6]
            for number in chosen:
                ident = client.crash_id(number)
                if ident is None:
                    raise CheckFailed(f"{state.user}: message {number} has no crash id")
                client.command(f"DELE {number}")
                state.deleted.append(ident)
            for number, _ in [n for n in numbers if n[0] not in chosen][:3]:
                client.retr(number)
            barrier.wait()
            time.sleep(pause)
            sent = time.monotonic()
            state.outcome = "sent"
            client.send("QUIT")
            reply = client.line()
            state.quit_latency = time.monotonic() - sent
            state.outcome = "+OK" if reply.startswith(b"+OK") else "-ERR"
            quit_replied.set()
        except (OSError, EOFError) as error:
            if state.outcome == "sent":
                state.outcome = "cut off"
            else:
                state.error = error
        except BaseException as error:  # reported below
            state.error = error
            barrier.abort()
        finally:
            if client is not None:
                client.close()

    def connection(user: str) -> None:
        book = store.ledger[user]
        client = None
        running = False
        try:
            client = LMTPClient(server.lmtp)
            barrier.wait()
            running = True
            started = time.monotonic()
            for _ in range(per_user):
                ident = next_id()
                size = message_size(rng, 0.16)
                message = make_message(ident, size)
                book.sent(ident, size, message)
                stage = ["unsent"]

                def note(value: str, stage: list[str] = stage) -> None:
                    stage[0] = value
                    if value == "acked":
                        acked.set()

                try:
                    client.deliver(
                        user, message, note, in_data.set if size > 500_000 else None
                    )
                finally:
                    book.delivery(ident, stage[0])
                    stats.count(f"LMTP {stage[0]}")
            timing.lmtp.append(time.monotonic() - started)
        except (OSError, EOFError) as error:
            if not running:
                errors.append(error)
                barrier.abort()
        except threading.BrokenBarrierError:
            pass
        except BaseException as error:  # reported below
            errors.append(error)
            barrier.abort()
        finally:
            if client is not None:
                client.close()

    threads = [
        threading.Thread(target=session, args=(state, pause), daemon=True)
        for state, pause in zip(sessions, pauses, strict=True)
    ] + [
        threading.Thread(target=connection, args=(user,), daemon=True) for user in users
    ]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        mode = "broken"
    if mode is None:
        for thread in threads:
            thread.join(IO_TIMEOUT * 4)
    elif mode == "quit":
        time.sleep(rng.uniform(0, quit_window))
    elif mode == "quit-reply":
        quit_replied.wait(IO_TIMEOUT)
    elif mode == "lmtp":
        time.sleep(rng.uniform(0, lmtp_window))
    elif mode == "lmtp-data":
        in_data.wait(2 * lmtp_window)
        time.sleep(rng.uniform(0, 0.002))
    elif mode == "lmtp-reply":
        acked.wait(2 * lmtp_window)
    server.kill()
    for thread in threads:
        thread.join(IO_TIMEOUT)
    problems = [f"{s.user}: {s.error!r}" for s in sessions if s.error is not None]
    problems += [repr(error) for error in errors]
    if problems:
        raise CheckFailed(f"a session or an LMTP connection failed: {problems}")
    for state in sessions:
        store.ledger[state.user].deleted(state.deleted, state.outcome == "+OK")
        stats.count(f"QUIT {state.outcome}")
        if state.quit_latency is not None:
            timing.quit.append(state.quit_latency)
    stats.count(f"kill on {mode or 'calibration'}")
    if mode is not None:
        stats.crashed()
    return timing


def _blocked_reading_stdin(pid: int) -> bool:
    """
    Whether process C{pid} sits in read(2) on its standard input (x86-64
    and arm64 number read 0 and 63), or at least in a pipe read.
    """
    try:
        with open(f"/proc/{pid}/syscall") as file:
            fields = file.read().split()
        if len(fields) > 1 and fields[1] == "0x0" and fields[0] in ("0", "63"):
            return True
        with open(f"/proc/{pid}/wchan") as file:
            wchan = file.read()
        return "pipe_read" in wchan or "pipe_wait" in wchan
    except OSError:
        return False


def _written(pid: int) -> int:
    """
    The octets process C{pid} has passed to write(2) and its kin so far
    (C{wchar} of C{/proc/PID/io}, all threads), or -1.
    """
    try:
        with open(f"/proc/{pid}/io", "rb") as file:
            for line in file:
                if line.startswith(b"wchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def _wait_for_write(process: subprocess.Popen, before: int, deadline: float) -> None:
    """
    Wait, polling without pause, until C{process} has written more than
    C{before} octets (it is storing the message), it has exited, or the
    monotonic C{deadline} has passed.
    """
    for count in range(10_000_000):
        now = _written(process.pid)
        if now < 0 or now > before or time.monotonic() > deadline:
            return
        if count % 64 == 0 and process.poll() is not None:
            return


@dataclass
class _DeliverRun:
    user: str
    ident: str
    outcome: str = "not started"
    mode: str = ""
    stderr: bytes = b""


#: How a deliver trial picks the moment of each kill, and how often.
DELIVER_KILL_MODES = {
    # once it has written 1000 octets (past lock files and records: in the
    # middle of writing the message, for a large one)
    "mid write": 0.35,
    "after write": 0.35,  # once it has written half the message, + 0-3 ms
    "on first write": 0.1,  # once it writes anything after its input ended
    "random": 0.2,  # a random moment of RANDOM_WINDOW after its input ended
}
#: PostgreSQL's client library send(2)s, which C{wchar} does not count:
#: the database is asked instead which statement the command's connection
#: is at.
SOCKET_KILL_MODES = {
    # once its INSERT has reached the server (before or around COMMIT),
    # + 0-2 ms
    "at insert": 0.8,
    "random": 0.2,
}
#: Seconds after the end of its input within which a "random" kill lands.
RANDOM_WINDOW = 0.25


def run_deliver_trial(
    store: CrashStore,
    users: list[str],
    rng: random.Random,
    stats: TrialStats,
    next_id: Callable[[], str],
    *,
    kill: bool = True,
) -> None:
    """
    One C{popd deliver} per user at once.  Each is fed its message (some of
    0.6-1.5 MB) up to its last chunk; once it is waiting on its standard
    input (it has started up and spooled the rest), the last chunk is sent
    and the input closed, and it is killed as L{DELIVER_KILL_MODES} says:
    the moment it is storing the message is found from its C{wchar}
    (C{/proc/PID/io}, every octet it passes to write(2)), or for
    PostgreSQL from C{pg_stat_activity} (L{_wait_for_insert}).  With
    C{kill} false, none is killed.
    """
    runs = []
    errors: list[BaseException] = []

    def one(user: str) -> None:
        ident = next_id()
        size = message_size(rng, 0.25)
        message = make_message(ident, size)
        book = store.ledger[user]
        book.sent(ident, size, message)
        run = _DeliverRun(user, ident)
        runs.append(run)
        process = subprocess.Popen(
            store.deliver_command(user),
            cwd=store.directory,
            env=popd_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert process.stdin is not None and process.stdout is not None
            tail = min(len(message), 512)
            process.stdin.write(message[:-tail])
            process.stdin.flush()
            deadline = time.monotonic() + 20
            while not _blocked_reading_stdin(process.pid):
                if time.monotonic() > deadline or process.poll() is not None:
                    break
                time.sleep(0.005)
            modes = (
                SOCKET_KILL_MODES
                if store.kind == "postgresql"
                else (DELIVER_KILL_MODES)
            )
            mode = rng.choices(list(modes), list(modes.values()))[0] if kill else ""
            run.mode = mode or "not killed"
            written = _written(process.pid)
            process.stdin.write(message[-tail:])
            process.stdin.close()
            ended = time.monotonic()
            deadline = ended + 5
            if mode == "random":
                time.sleep(rng.uniform(0, RANDOM_WINDOW))
            elif mode == "at insert":
                _wait_for_insert(store.dsn, process, deadline)
                time.sleep(rng.uniform(0, 0.002))
            elif mode == "on first write":
                _wait_for_write(process, written, deadline)
            elif mode == "mid write":
                _wait_for_write(process, written + 1000, deadline)
            elif mode == "after write":
                _wait_for_write(process, written + len(message) // 2, deadline)
                time.sleep(rng.uniform(0, 0.003))
            if mode:
                process.send_signal(signal.SIGKILL)
            process.wait(IO_TIMEOUT)
            run.stderr = process.stderr.read() if process.stderr else b""
            if process.returncode == 0:
                run.outcome = "delivered"
                book.delivery(ident, "acked")
            elif process.returncode == -signal.SIGKILL:
                run.outcome = "killed"
                book.delivery(ident, "final")
            else:
                run.outcome = f"exit {process.returncode}"
                book.delivery(ident, "final")
        except BaseException as error:
            errors.append(error)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(IO_TIMEOUT)
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    threads = [threading.Thread(target=one, args=(u,), daemon=True) for u in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(IO_TIMEOUT * 2)
    if errors:
        raise CheckFailed(f"a deliver command failed: {errors!r}")
    for run in runs:
        stats.count(f"deliver {run.mode}: {run.outcome}")
        if run.outcome not in ("delivered", "killed"):
            raise CheckFailed(
                f"popd deliver for {run.user}: {run.outcome}\n"
                f"{run.stderr.decode(errors='replace')}"
            )
    if kill:
        stats.crashed(len(runs))


def _wait_for_insert(dsn: str | None, process: subprocess.Popen, deadline: float):
    """
    Wait until a popd connection to PostgreSQL has sent its INSERT (the
    server shows it active on it, or idle in its transaction after it),
    C{process} has exited, or the monotonic C{deadline} has passed.

    Only the commands of a trial insert, so with one command at a time
    (L{run_deliver_trial} runs them so for PostgreSQL) it is its own.
    """
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as watcher:
        for _ in range(1_000_000):
            if process.poll() is not None or time.monotonic() > deadline:
                return
            row = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name"
                " = 'popd' AND state <> 'idle' AND query LIKE 'INSERT%'"
            ).fetchone()
            if row and row[0]:
                return
