"""
Several worker processes sharing the listening sockets (C{[server]
workers}, L{popd.workers}): sessions are spread over the workers, a
maildrop is locked across them, a worker that dies is restarted, and the
master forwards SIGHUP and stops its workers.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest
from helpers.ops_e2e import session_ends, wait_for
from helpers.popd_e2e import HOST, RawPOP3

#: The APOP timestamp in the greeting starts with the serving process's pid.
GREETING_PID = re.compile(rb"<(\d+)\.")
STARTED = re.compile(r"worker (\d+) started pid=(\d+)")
ATTEMPTS = 60


def serving(server) -> bool:
    """
    Whether both workers have adopted the POP3 socket.
    """
    pids = worker_pids(server)
    return len(pids) == 2 and all(
        f"[worker {n} pid {p}] POP3 accepting on" in server.output()
        for n, p in pids.items()
    )


def worker_pids(server) -> dict[int, int]:
    """
    The latest pid of each worker, from the master's log.
    """
    return {int(n): int(p) for n, p in STARTED.findall(server.output())}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Session(RawPOP3):
    @property
    def pid(self) -> int:
        return int(GREETING_PID.search(self.greeting).group(1))


def session_on(port: int, wanted=lambda pid: True) -> Session:
    """
    A new session on a worker whose pid C{wanted} accepts; which worker
    takes a connection is the kernel's choice, so try a bounded number of
    times.
    """
    for _ in range(ATTEMPTS):
        session = Session(port)
        if wanted(session.pid):
            return session
        session.close()
        time.sleep(0.01)
    raise AssertionError(f"no session on a wanted worker in {ATTEMPTS} tries")


@pytest.fixture(scope="module")
def workers(popd_factory):
    server = popd_factory(
        "workers", apop=True, plaintext="always", server_extra="workers = 2"
    )
    for user in ("wes", "wyn", "wil"):
        server.add_plain_user(user, f"{user}-pass")
    wait_for(lambda: serving(server), timeout=30)
    return server


def login(session: Session, user: str) -> bytes:
    assert session.command(f"USER {user}").startswith(b"+OK")
    return session.command(f"PASS {user}-pass")


def test_sessions_served_by_different_workers(workers):
    pids = set(worker_pids(workers).values())
    first = session_on(workers.pop3_port)
    second = session_on(workers.pop3_port, lambda pid: pid != first.pid)
    try:
        assert {first.pid, second.pid} == pids
        # Both logged in at once, each in its own process.
        assert login(first, "wes").startswith(b"+OK")
        assert login(second, "wyn").startswith(b"+OK")
        assert first.command("QUIT").startswith(b"+OK")
        assert second.command("QUIT").startswith(b"+OK")
    finally:
        first.close()
        second.close()
    ends = wait_for(
        lambda: {(user, pid) for user, _c, _e, pid in session_ends(workers)}.issuperset(
            {("wes", first.pid), ("wyn", second.pid)}
        )
    )
    assert ends
    # The master accepts nothing itself: it is neither of the two.
    assert workers.process.pid not in pids


def test_maildrop_locked_across_workers(workers):
    holder = session_on(workers.pop3_port)
    try:
        assert login(holder, "wil").startswith(b"+OK")
        other = session_on(workers.pop3_port, lambda pid: pid != holder.pid)
        try:
            assert login(other, "wil").startswith(b"-ERR [IN-USE]")
        finally:
            other.close()
    finally:
        holder.command("QUIT")
        holder.close()


def test_sighup_reaches_every_worker(workers):
    before = workers.output().count("TLS certificates reloaded")
    workers.process.send_signal(signal.SIGHUP)
    wait_for(lambda: workers.output().count("TLS certificates reloaded") >= before + 2)
    reloaded = re.findall(
        r"\[worker (\d) pid \d+\] TLS certificates reloaded", workers.output()
    )
    assert {"1", "2"} <= set(reloaded)


def test_a_dead_worker_is_restarted(workers):
    old = worker_pids(workers)
    victim = old[1]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: worker_pids(workers)[1] != victim)
    new = worker_pids(workers)
    assert new[2] == old[2] and alive(new[1])
    assert f"worker 1 pid={victim} died (signal 9); restarting it" in workers.output()
    # The new worker serves, once it has started up.
    wait_for(
        lambda: f"[worker 1 pid {new[1]}] POP3 accepting on" in workers.output(),
        timeout=30,
    )
    session = session_on(workers.pop3_port, lambda pid: pid == new[1])
    try:
        assert login(session, "wes").startswith(b"+OK")
        session.command("QUIT")
    finally:
        session.close()


def test_sigterm_stops_the_workers_too(popd_factory):
    server = popd_factory("workers-stop", server_extra="workers = 2")
    wait_for(lambda: serving(server), timeout=30)
    pids = list(worker_pids(server).values())
    output = server.kill(signal.SIGTERM)
    # twistd ends itself with the signal it got, as a process should.
    assert server.process.returncode in (0, -signal.SIGTERM), output
    assert "Main loop terminated" in output
    for pid in pids:
        assert f"pid={pid} exited" in output
        wait_for(lambda pid=pid: not alive(pid), timeout=5)
    with pytest.raises(OSError):
        socket.create_connection((HOST, server.pop3_port), timeout=2).close()


def test_a_worker_dies_with_its_master(popd_factory):
    server = popd_factory("workers-orphan", server_extra="workers = 2")
    wait_for(lambda: len(worker_pids(server)) == 2)
    pids = list(worker_pids(server).values())
    server.kill(signal.SIGKILL)
    for pid in pids:
        wait_for(lambda pid=pid: not alive(pid), timeout=10)
