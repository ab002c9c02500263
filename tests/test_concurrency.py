"""
Concurrent delivery and retrieval, for every store (Maildir, mbox, SQLite,
PostgreSQL): an MTA-like writer delivers thousands of messages over LMTP
(several connections at once) and through C{popd deliver}, while POP3
clients log in, download, delete and quit in a loop, two per maildrop (so
that they meet C{[IN-USE]}), and now and then drop the connection or RSET
instead of quitting.  At the end every acknowledged message was downloaded
and deleted exactly once (a QUIT that said C{+OK} after its DELE), or is
still in the store and is downloaded by the final drain; nothing unknown,
damaged or twice.  Within each session STAT agrees with LIST, and every
RETR with its LIST size.

CI delivers C{POPD_CONCURRENCY_MESSAGES} (default 2000) messages over LMTP
plus C{POPD_CONCURRENCY_DELIVERS} (default 6) through C{popd deliver}, and
stops delivering after C{POPD_CONCURRENCY_SECONDS} (default 40) seconds,
whichever comes first (at least a quarter of the messages must have gone
through).  The long run:

    POPD_CONCURRENCY_MESSAGES=50000 POPD_CONCURRENCY_DELIVERS=200 \\
    POPD_CONCURRENCY_SECONDS=1800 python -m pytest tests/test_concurrency.py -s
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from helpers.crash import (
    POP3,
    STORES,
    CheckFailed,
    CrashStore,
    LMTPClient,
    POP3Error,
    digest,
    download,
    make_message,
)
from helpers.delivery_e2e import split_trace
from helpers.popd_e2e import downloaded, popd_env

pytest_plugins = ["sqlsupport"]
pytestmark = pytest.mark.e2e

MESSAGES = int(os.environ.get("POPD_CONCURRENCY_MESSAGES", "2000"))
DELIVERS = int(os.environ.get("POPD_CONCURRENCY_DELIVERS", "6"))
SECONDS = float(os.environ.get("POPD_CONCURRENCY_SECONDS", "40"))
SEED = int(os.environ.get("POPD_CRASH_SEED", str(random.randrange(1 << 30))))
USERS = 4
LMTP_CONNECTIONS = 4
READERS_PER_USER = 2
#: Bound on the readers' and the final drain's own work after delivery.
DRAIN_SECONDS = 60.0

_CRASH_ID = re.compile(rb"^X-Crash-Id: ([!-~]+)\r?$", re.M)


@dataclass
class Books:
    """
    What was sent, acknowledged and consumed, shared by every thread.
    """

    sent: dict[str, tuple[str, str]] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    consumed: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, ident: str, user: str, message: bytes) -> None:
        with self.lock:
            self.sent[ident] = (user, digest(downloaded(message)))

    def ack(self, ident: str) -> None:
        with self.lock:
            self.acked.add(ident)

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)

    def check_message(self, user: str, data: bytes) -> str | None:
        """
        The crash id of a downloaded message, after checking it is one
        sent to C{user}, intact; C{None} (and a problem noted) otherwise.
        """
        _trace, message = split_trace(data)
        match = _CRASH_ID.search(message[: max(message.find(b"\r\n\r\n"), 0)])
        if match is None:
            self.problem(f"{user}: a message without X-Crash-Id: {data[:200]!r}")
            return None
        ident = match.group(1).decode()
        with self.lock:
            expected = self.sent.get(ident)
        if expected is None or expected[0] != user:
            self.problem(f"{user}: {ident} was never sent to {user}")
        elif digest(message) != expected[1]:
            self.problem(f"{user}: {ident} is damaged ({len(message)} octets)")
        return ident


@pytest.fixture(params=STORES)
def store(request, tmp_path, pki):
    dsn = None
    if request.param == "postgresql":
        from popd.maildrops.sql import upgrade

        dsn = request.getfixturevalue("postgresql_dsn")
        upgrade(dsn)
    users = [f"user{i}" for i in range(USERS)]
    crash_store = CrashStore(request.param, tmp_path / "store", pki, users, dsn)
    try:
        yield crash_store
    finally:
        problems = crash_store.stop_all()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


def lmtp_writer(store, port, books, plan, rng, deadline) -> None:
    """
    Deliver the C{(user, ident, size)} of C{plan} over one LMTP
    connection, until done or the monotonic C{deadline}.
    """
    client = LMTPClient(port)
    try:
        for user, ident, size in plan:
            if time.monotonic() > deadline:
                books.count("LMTP not sent (time)")
                continue
            message = make_message(ident, size)
            books.send(ident, user, message)
            stage = []
            client.deliver(user, message, stage.append)
            if stage[-1] != "acked":
                books.problem(f"LMTP delivery of {ident} failed")
            books.ack(ident)
            books.count("LMTP delivered")
    finally:
        client.close()


def deliver_writer(store, books, users, count, rng, deadline) -> None:
    """
    C{count} deliveries through C{popd deliver}, one after another.
    """
    for number in range(count):
        if time.monotonic() > deadline:
            break
        user = users[number % len(users)]
        ident = f"cmd-{number}-{os.urandom(3).hex()}"
        message = make_message(ident, rng.randint(300, 3000))
        books.send(ident, user, message)
        result = subprocess.run(
            store.deliver_command(user),
            input=message,
            cwd=store.directory,
            env=popd_env(),
            capture_output=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            books.problem(f"popd deliver exited {result.returncode}: {result.stderr!r}")
            continue
        books.ack(ident)
        books.count("popd deliver delivered")


def reader(port, user, books, rng, writing_done, deadline) -> None:
    """
    Sessions one after another until the writers are done (then one more
    that finds the maildrop empty of what it already saw is not needed:
    the final drain takes the rest).
    """
    for _ in range(1_000_000):
        if writing_done.is_set() or time.monotonic() > deadline:
            return
        client = POP3(port)
        try:
            try:
                client.login(user)
            except POP3Error as error:
                if "[IN-USE]" not in str(error):
                    raise
                books.count("login [IN-USE]")
                time.sleep(rng.uniform(0.002, 0.02))
                continue
            session(client, user, books, rng)
        except (OSError, EOFError, POP3Error) as error:
            books.problem(f"{user}: session failed: {error!r}")
            return
        finally:
            client.close()


def session(client: POP3, user: str, books: Books, rng: random.Random) -> None:
    sizes = {
        int(number): int(size)
        for number, size in (line.split() for line in client.multi("LIST").splitlines())
    }
    uids = dict(client.uidl())
    count, total = (int(x) for x in client.command("STAT").split()[1:3])
    if count != len(sizes) or total != sum(sizes.values()) or set(uids) != set(sizes):
        books.problem(f"{user}: STAT {count} {total} disagrees with LIST {sizes}")
    numbers = sorted(sizes)
    if rng.random() < 0.5:
        numbers = [n for n in numbers if rng.random() < 0.5]
    taken = []
    for number in numbers:
        data = client.retr(number)
        if len(data) != sizes[number]:
            books.problem(
                f"{user}: RETR {number} gave {len(data)} octets, LIST {sizes[number]}"
            )
        ident = books.check_message(user, data)
        client.command(f"DELE {number}")
        if ident is not None:
            taken.append(ident)
    books.count("sessions")
    roll = rng.random()
    if roll < 0.1:
        books.count("sessions dropped without QUIT")
        return
    if roll < 0.2:
        client.command("RSET")
        books.count("sessions RSET")
    client.send("QUIT")
    if client.line().startswith(b"+OK"):
        if roll >= 0.2:
            with books.lock:
                books.consumed.extend(taken)
    else:
        books.problem(f"{user}: QUIT failed")


def test_concurrent_delivery_and_retrieval(store: CrashStore):
    started = time.monotonic()
    deadline = started + SECONDS
    rng = random.Random(SEED)
    books = Books()
    server = store.start_server()
    plans: list[list[tuple[str, str, int]]] = [[] for _ in range(LMTP_CONNECTIONS)]
    for number in range(MESSAGES):
        size = rng.randint(50_000, 120_000) if number % 100 == 0 else None
        plans[number % LMTP_CONNECTIONS].append(
            (
                store.users[rng.randrange(USERS)],
                f"lmtp-{number}-{os.urandom(3).hex()}",
                size or rng.randint(200, 2500),
            )
        )
    writing_done = threading.Event()
    reader_deadline = deadline + DRAIN_SECONDS
    errors: list[BaseException] = []

    def guarded(function, *args):
        try:
            function(*args)
        except BaseException as error:  # reported below
            errors.append(error)

    writers = [
        threading.Thread(
            target=guarded,
            args=(
                lmtp_writer,
                store,
                server.lmtp,
                books,
                plan,
                random.Random(rng.random()),
                deadline,
            ),
        )
        for plan in plans
    ]
    writers.append(
        threading.Thread(
            target=guarded,
            args=(
                deliver_writer,
                store,
                books,
                store.users,
                DELIVERS,
                random.Random(rng.random()),
                deadline,
            ),
        )
    )
    readers = [
        threading.Thread(
            target=guarded,
            args=(
                reader,
                server.pop3,
                user,
                books,
                random.Random(rng.random()),
                writing_done,
                reader_deadline,
            ),
        )
        for user in store.users
        for _ in range(READERS_PER_USER)
    ]
    for thread in writers + readers:
        thread.daemon = True
        thread.start()
    for thread in writers:
        thread.join(SECONDS + 120)
    delivered_at = time.monotonic()
    writing_done.set()
    for thread in readers:
        thread.join(DRAIN_SECONDS)
    assert not errors, errors
    # The final drain: whatever the readers left.
    for user in store.users:
        found, _waited, quit_ok = download(server.pop3, user, delete=True, bound=10)
        assert quit_ok
        for _uid, data in found:
            ident = books.check_message(user, data)
            if ident is not None:
                books.consumed.append(ident)
        books.count("left for the final drain", len(found))
    for user in store.users:
        found, _waited, _ok = download(server.pop3, user, bound=10)
        assert not found, f"{user} still has {len(found)} messages after the drain"
    server.process.stop()

    consumed = Counter(books.consumed)
    twice = sorted(ident for ident, n in consumed.items() if n > 1)
    missing = sorted(books.acked - set(consumed))
    unknown = sorted(set(consumed) - set(books.sent))
    elapsed = delivered_at - started
    print(
        f"\n[{store.kind}] seed={SEED} {len(books.acked)} messages delivered in "
        f"{elapsed:.1f} s ({len(books.acked) / elapsed:.0f}/s) while "
        f"{dict(sorted(books.counts.items()))}; total "
        f"{time.monotonic() - started:.1f} s"
    )
    problems = list(books.problems)
    if twice:
        problems.append(f"downloaded and deleted twice: {twice[:20]}")
    if missing:
        problems.append(f"acknowledged but never downloaded: {missing[:20]}")
    if unknown:
        problems.append(f"never sent: {unknown[:20]}")
    if problems:
        raise CheckFailed("\n".join(problems[:30]))
    assert len(books.acked) >= min(MESSAGES, max(MESSAGES // 4, 1)), (
        f"only {len(books.acked)} of {MESSAGES} messages delivered in {SECONDS} s"
    )
    assert books.counts["sessions"] > 0
