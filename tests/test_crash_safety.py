"""
Crash safety, for every store (Maildir, mbox, SQLite, PostgreSQL): real
C{twistd -n popd} servers and C{popd deliver} commands are killed with
SIGKILL at random moments, and after each crash a fresh server must show
every user a maildrop the ledger allows (L{helpers.crash.Ledger}):

  - every acknowledged message that was not deleted is there, intact;
  - a message whose delivery or deletion the kill cut off is there intact
    or not at all, and stays that way: nothing comes back once gone;
  - nothing is there twice, and nothing partial or foreign shows;
  - on mbox, SQLite and PostgreSQL an interrupted commit removed all of
    its messages or none;
  - the first login after the crash is not refused C{[IN-USE]} for
    longer than L{helpers.crash.LOGIN_BOUND} seconds (the dead process's
    locks do not lock its users out).

Two kinds of crash, each a test per store:

  - B{the server} (L{helpers.crash.run_server_trial}): for each of four
    users at once, a POP3 session deletes 60% of its maildrop and sends
    QUIT after its own random pause, while an LMTP connection delivers
    three messages (a sixth of them 0.6-1.5 MB) into the same maildrop;
    the server is killed at a random moment of the commits (within twice
    the slowest commit time), the moment the first QUIT reply arrives, at
    a random moment of the deliveries, while a large message's data is
    being sent, or the moment the first C{250} arrives.  The next server
    was started before the kill (as a second worker process would be
    running) and checks the store at once.
  - B{popd deliver} (L{helpers.crash.run_deliver_trial}): four commands
    at once, each killed once it is storing its message (its C{wchar} in
    C{/proc/PID/io} grows; for PostgreSQL, once the database shows its
    INSERT), in the middle of writing a large message, or at a random
    moment after the end of its input; a server that is never killed
    checks the store after each batch.  (PostgreSQL: one command at a
    time, so that the INSERT the database shows is the killed one's.)

And one deterministic case: a process killed halfway through appending
to an mbox, whose partial message the next process must cut off.

The first server trial is a calibration (nothing is killed before every
reply came) that measures how long the work takes, so that kills land
inside it.  A test reports what it did: how each kill was timed, how far
the QUITs and deliveries got, and how each interrupted commit ended
(none, some or all of its messages removed).

CI runs C{POPD_CRASH_TRIALS} (default 8) crashes per store and kind
(server kills, or killed commands), within C{POPD_CRASH_SECONDS} (default
8) seconds per test but at least L{MIN_TRIALS}: about 60-90 s for the
module, most of it starting servers (about 0.5 s of CPU each).  The long
run:

    POPD_CRASH_TRIALS=500 POPD_CRASH_SECONDS=3600 \\
        python -m pytest tests/test_crash_safety.py -s

C{POPD_CRASH_SEED} repeats a run's random choices (kill moments still
vary with timing).  PostgreSQL tests skip, saying why, without a server
at C{POPD_TEST_POSTGRESQL}.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers.crash import (
    STORES,
    CrashStore,
    TrialStats,
    kill_mode,
    new_ids,
    run_deliver_trial,
    run_server_trial,
    top_up,
)

pytest_plugins = ["sqlsupport"]
pytestmark = pytest.mark.e2e

TRIALS = int(os.environ.get("POPD_CRASH_TRIALS", "8"))
BUDGET = float(os.environ.get("POPD_CRASH_SECONDS", "8"))
SEED = int(os.environ.get("POPD_CRASH_SEED", str(random.randrange(1 << 30))))
#: Fewer crashes than this within the budget fails the test.
MIN_TRIALS = min(TRIALS, 4)
#: Users of a store: one POP3 session and one LMTP connection each per
#: server crash.
USERS = 4
#: popd deliver commands killed at once.
DELIVER_BATCH = 4
#: Messages each user has before a QUIT trial.
QUIT_TARGET = 16
#: Messages each LMTP connection sends in a trial.
LMTP_PER_USER = 3


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


def report(store: CrashStore, kind: str, stats: TrialStats, started: float) -> None:
    ledger = store.ledger.stats
    startup = statistics.median(store.startups) if store.startups else 0.0
    print(
        f"\n[{store.kind} {kind}] seed={SEED} crashes={stats.trials} "
        f"in {time.monotonic() - started:.1f} s; {dict(sorted(stats.outcomes.items()))}"
        f"; interrupted commits: {dict(ledger.commits)}; messages that may have"
        f" been there: present {ledger.maybe_present}, absent {ledger.maybe_absent}"
        f"; server start {startup:.2f} s (median of {len(store.startups)})"
        f"; longest first login {max(store.login_waits, default=0):.3f} s"
    )
    assert stats.trials >= MIN_TRIALS, (
        f"only {stats.trials} crashes within {BUDGET} s (POPD_CRASH_SECONDS)"
    )


def test_kill_server_during_quit_and_lmtp(store: CrashStore):
    """
    Killing the server while sessions commit their deletions at QUIT and
    LMTP delivers into the same maildrops loses nothing, removes only what
    was deleted, shows nothing partial and leaves no lock.

    The next server is started before each kill (as a second worker
    process would be running) and checks the store right after it.
    """
    stats = TrialStats()
    started = time.monotonic()
    deadline = started + BUDGET
    rng = random.Random(SEED)
    next_id = new_ids("s")
    large = 0.03 if store.kind == "mbox" else 0.0
    users = store.users
    with ThreadPoolExecutor(1) as starter:
        standby = starter.submit(store.start_server)
        server = store.start_server()
        windows = None
        for _trial in range(TRIALS + 1):
            maps = store.verify(server, users)
            counts = {user: len(maps[user]) for user in users}
            top_up(store, server, users, QUIT_TARGET, counts, next_id, rng, large)
            if windows is None:
                timing = run_server_trial(
                    store,
                    server,
                    users,
                    rng,
                    stats,
                    next_id,
                    mode=None,
                    per_user=LMTP_PER_USER,
                )
                # Kill within twice the slowest commit, or within the time
                # the deliveries took.
                windows = (
                    max(0.002, 2 * max(timing.quit, default=0.005)),
                    max(0.01, 1.2 * max(timing.lmtp, default=0.1)),
                )
            else:
                run_server_trial(
                    store,
                    server,
                    users,
                    rng,
                    stats,
                    next_id,
                    mode=kill_mode(rng),
                    quit_window=windows[0],
                    lmtp_window=windows[1],
                    per_user=LMTP_PER_USER,
                )
            server = standby.result()
            if stats.trials >= TRIALS or (
                time.monotonic() > deadline and stats.trials >= MIN_TRIALS
            ):
                break
            standby = starter.submit(store.start_server)
        store.verify(server, users)
    report(store, "server", stats, started)


def test_kill_deliver_command(store: CrashStore):
    """
    Killing C{popd deliver} at any moment of its delivery leaves the
    message whole or absent, and no lock behind that stops the next
    delivery or login.
    """
    stats = TrialStats()
    started = time.monotonic()
    deadline = started + BUDGET
    rng = random.Random(SEED)
    next_id = new_ids("d")
    server = store.start_server()
    # PostgreSQL: one at a time, so that the INSERT the database shows is
    # the killed command's (see helpers.crash.SOCKET_KILL_MODES).
    batch = store.users[: 1 if store.kind == "postgresql" else DELIVER_BATCH]
    for _ in range(TRIALS):
        run_deliver_trial(store, batch, rng, stats, next_id)
        store.verify(server, batch, delete=True)
        if stats.trials >= TRIALS or (
            time.monotonic() > deadline and stats.trials >= MIN_TRIALS
        ):
            break
    report(store, "deliver", stats, started)


_KILLED_MID_APPEND = """
import os, signal, sys
from popd.maildrops.mbox import MboxProvider
from popd.testing import wait_for

provider = MboxProvider(sys.argv[1] + "/%u")
wait_for(provider.deliver("bob", b"Subject: first\\n\\nfirst\\n"))
real, calls = os.pwrite, []

def dying(fd, data, offset):
    calls.append(offset)
    if len(calls) == 3:  # the record, the envelope, then the first chunk
        real(fd, bytes(data[: len(data) // 2]), offset)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(fd, data, offset)

os.pwrite = dying
wait_for(provider.deliver("bob", b"Subject: second\\n\\n" + b"x" * 300000 + b"\\n"))
"""

_SERVED = """
import json, sys
from popd.maildrops.mbox import MboxProvider
from popd.testing import stop_reactor_threadpool, wait_for

provider = MboxProvider(sys.argv[1] + "/%u")

def served():
    drop = wait_for(provider.open("bob"))
    try:
        texts = []
        for index in range(len(drop.messages)):
            message = wait_for(drop.read(index))
            texts.append(message.read().decode())
            message.close()
        return texts
    finally:
        wait_for(drop.release())

before = served()
wait_for(provider.deliver("bob", b"Subject: third\\n\\nthird\\n"))
print(json.dumps([before, served()]))
stop_reactor_threadpool()
"""


def test_mbox_append_cut_off_by_a_kill_is_never_served(tmp_path):
    """
    A process killed in the middle of appending to an mbox leaves part of
    a message on disk; the next process to lock the mbox cuts it off
    before anything reads or appends (the C{.popd-append} record), so it
    is neither served nor sealed in by the next delivery.
    """
    import json
    import subprocess
    import sys

    from helpers.popd_e2e import popd_env

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            env=popd_env(),
            capture_output=True,
            timeout=60,
            check=False,
        )

    killed = run(_KILLED_MID_APPEND)
    assert killed.returncode == -9, killed.stderr.decode()
    on_disk = (tmp_path / "bob").read_bytes()
    assert b"Subject: second" in on_disk and not on_disk.endswith(b"x\n\n")
    checked = run(_SERVED)
    assert checked.returncode == 0, checked.stderr.decode()
    before, after = json.loads(checked.stdout)
    assert before == ["Subject: first\n\nfirst\n"]
    assert after == ["Subject: first\n\nfirst\n", "Subject: third\n\nthird\n"]
    assert b"Subject: second" not in (tmp_path / "bob").read_bytes()
