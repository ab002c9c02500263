"""
Tests for L{popd.maildrops.dotlock}: the dot-lock and C{fcntl} lock that
MTAs take on an mbox, against other threads and processes.
"""

import errno
import fcntl
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from popd.interfaces import MaildropUnavailable
from popd.maildrops import dotlock
from popd.maildrops.dotlock import (
    MailboxLockTimeout,
    acquire_dot_lock,
    dot_lock_path,
    locked_mailbox,
    try_write_lock,
    write_lock,
    write_unlock,
)

REPO = Path(__file__).resolve().parents[1]

# Another process holding a classic fcntl (lockf) lock, as Postfix does.
LOCKF_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


def soon(seconds: float = 0.3) -> float:
    return time.monotonic() + seconds


def start(snippet: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", snippet, *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(30):
            process.kill()
            pytest.fail("the child process did not answer")
    assert process.stdout.readline() == b"locked\n"
    return process


def stop(process: subprocess.Popen) -> None:
    process.communicate(b"\n", timeout=30)


@pytest.fixture
def mbox(tmp_path: Path) -> Path:
    path = tmp_path / "bob"
    path.write_bytes(b"")
    return path


def test_dot_lock_created_and_removed(mbox: Path) -> None:
    lock = acquire_dot_lock(str(mbox), deadline=soon())
    lock_file = Path(dot_lock_path(str(mbox)))
    assert lock_file == mbox.with_name("bob.lock")
    assert lock_file.read_bytes() == (
        f"popd {socket.gethostname()} {os.getpid()}\n".encode()
    )
    lock.release()
    assert not lock_file.exists()
    lock.release()
    # Nothing else is left in the directory (the unique file is gone).
    assert sorted(p.name for p in mbox.parent.iterdir()) == ["bob"]


def test_dot_lock_excludes_a_second_holder(mbox: Path) -> None:
    lock = acquire_dot_lock(str(mbox), deadline=soon())
    try:
        started = time.monotonic()
        with pytest.raises(MailboxLockTimeout) as caught:
            acquire_dot_lock(str(mbox), deadline=soon(0.3))
        assert 0.25 <= time.monotonic() - started < 5
        assert isinstance(caught.value, MaildropUnavailable)
    finally:
        lock.release()
    acquire_dot_lock(str(mbox), deadline=soon()).release()


def test_dot_lock_waits_for_the_holder(mbox: Path) -> None:
    lock = acquire_dot_lock(str(mbox), deadline=soon())
    timer = threading.Timer(0.3, lock.release)
    timer.start()
    try:
        started = time.monotonic()
        second = acquire_dot_lock(str(mbox), deadline=soon(20))
        assert 0.2 <= time.monotonic() - started < 10
        second.release()
    finally:
        timer.join()


def test_fresh_foreign_dot_lock_is_respected(mbox: Path) -> None:
    lock_file = Path(dot_lock_path(str(mbox)))
    lock_file.write_bytes(b"")
    with pytest.raises(MailboxLockTimeout):
        acquire_dot_lock(str(mbox), deadline=soon(0.2), stale_seconds=300)
    assert lock_file.exists()


def test_stale_dot_lock_is_broken(mbox: Path) -> None:
    lock_file = Path(dot_lock_path(str(mbox)))
    lock_file.write_bytes(b"")
    old = time.time() - 301
    os.utime(lock_file, (old, old))
    lock = acquire_dot_lock(str(mbox), deadline=soon(), stale_seconds=300)
    assert lock_file.read_bytes().startswith(b"popd ")
    lock.release()


def test_stale_time_is_configurable(mbox: Path) -> None:
    lock_file = Path(dot_lock_path(str(mbox)))
    lock_file.write_bytes(b"")
    old = time.time() - 20
    os.utime(lock_file, (old, old))
    with pytest.raises(MailboxLockTimeout):
        acquire_dot_lock(str(mbox), deadline=soon(0.1), stale_seconds=60)
    acquire_dot_lock(str(mbox), deadline=soon(), stale_seconds=10).release()


def test_lock_of_a_dead_popd_is_broken_at_once(mbox: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        check=True,
    )
    dead = int(finished.stdout)
    lock_file = Path(dot_lock_path(str(mbox)))
    lock_file.write_bytes(f"popd {socket.gethostname()} {dead}\n".encode())
    acquire_dot_lock(str(mbox), deadline=soon(), stale_seconds=300).release()


def test_lock_of_a_popd_elsewhere_is_respected(mbox: Path) -> None:
    lock_file = Path(dot_lock_path(str(mbox)))
    lock_file.write_bytes(b"popd some-other-host 1\n")
    with pytest.raises(MailboxLockTimeout):
        acquire_dot_lock(str(mbox), deadline=soon(0.1))
    # A living process of this host is respected too.
    lock_file.write_bytes(f"popd {socket.gethostname()} 1\n".encode())
    with pytest.raises(MailboxLockTimeout):
        acquire_dot_lock(str(mbox), deadline=soon(0.1))


def test_release_leaves_someone_elses_lock(mbox: Path) -> None:
    lock = acquire_dot_lock(str(mbox), deadline=soon())
    lock_file = Path(dot_lock_path(str(mbox)))
    # Someone judged ours stale and took the lock.
    lock_file.unlink()
    lock_file.write_bytes(b"theirs")
    lock.release()
    assert lock_file.read_bytes() == b"theirs"


def test_refresh_renews_the_lock(mbox: Path) -> None:
    lock = acquire_dot_lock(str(mbox), deadline=soon())
    lock_file = Path(dot_lock_path(str(mbox)))
    old = time.time() - 200
    os.utime(lock_file, (old, old))
    lock.refresh(every=3600)
    assert lock_file.stat().st_mtime < time.time() - 100
    lock.refresh(every=0)
    assert lock_file.stat().st_mtime > time.time() - 100
    lock.release()


def test_exclusive_create_without_hard_links(
    mbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(source, target):
        raise OSError(errno.EPERM, "no hard links here")

    monkeypatch.setattr(dotlock.os, "link", no_links)
    lock = acquire_dot_lock(str(mbox), deadline=soon())
    assert Path(dot_lock_path(str(mbox))).exists()
    with pytest.raises(MailboxLockTimeout):
        acquire_dot_lock(str(mbox), deadline=soon(0.1))
    lock.release()
    assert sorted(p.name for p in mbox.parent.iterdir()) == ["bob"]


def test_link_errors_are_reported(mbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(source, target):
        raise OSError(errno.EACCES, "denied")

    monkeypatch.setattr(dotlock.os, "link", broken)
    with pytest.raises(PermissionError):
        acquire_dot_lock(str(mbox), deadline=soon())
    assert sorted(p.name for p in mbox.parent.iterdir()) == ["bob"]


def test_write_lock_conflicts_with_another_process(mbox: Path) -> None:
    holder = start(LOCKF_HOLDER, str(mbox))
    fd = os.open(mbox, os.O_RDWR)
    try:
        assert not try_write_lock(fd)
        with pytest.raises(MailboxLockTimeout):
            write_lock(fd, deadline=soon(0.2))
        stop(holder)
        write_lock(fd, deadline=soon(10))
        write_unlock(fd)
    finally:
        os.close(fd)


@pytest.mark.skipif(not dotlock._USE_OFD, reason="needs Linux OFD locks")
def test_write_lock_survives_closing_another_descriptor(mbox: Path) -> None:
    """
    A classic POSIX lock would be dropped when this process closes any
    descriptor of the file; the OFD lock popd takes is not, and it also
    excludes a second descriptor of this very process.
    """
    fd = os.open(mbox, os.O_RDWR)
    other = os.open(mbox, os.O_RDONLY)
    try:
        assert try_write_lock(fd)
        second = os.open(mbox, os.O_RDWR)
        try:
            assert not try_write_lock(second)
        finally:
            os.close(second)
        os.close(other)
        other = -1
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys\n"
                "fd = os.open(sys.argv[1], os.O_RDWR)\n"
                "try:\n"
                "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                "except OSError:\n"
                "    sys.exit(3)\n",
                str(mbox),
            ],
            timeout=30,
        )
        assert probe.returncode == 3
        write_unlock(fd)
    finally:
        os.close(fd)
        if other >= 0:
            os.close(other)


def test_locked_mailbox_takes_both_and_releases(mbox: Path) -> None:
    with locked_mailbox(str(mbox), timeout=1) as box:
        assert box.fd >= 0 and not box.created
        assert Path(dot_lock_path(str(mbox))).exists()
        probe = os.open(mbox, os.O_RDWR)
        try:
            if dotlock._USE_OFD:
                assert not try_write_lock(probe)
        finally:
            os.close(probe)
    assert not Path(dot_lock_path(str(mbox))).exists()
    probe = os.open(mbox, os.O_RDWR)
    try:
        assert try_write_lock(probe)
        write_unlock(probe)
    finally:
        os.close(probe)


def test_locked_mailbox_missing_and_created(tmp_path: Path) -> None:
    path = tmp_path / "new"
    with locked_mailbox(str(path)) as box:
        assert box.fd == -1
    assert not path.exists()
    with locked_mailbox(str(path), create=True, mode=0o600) as box:
        assert box.created and box.fd >= 0
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


def test_locked_mailbox_refuses_links_and_directories(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(OSError):
        with locked_mailbox(str(link)):
            pass
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):
        with locked_mailbox(str(tmp_path / "dir")):
            pass
    assert not Path(dot_lock_path(str(link))).exists()
    assert not Path(dot_lock_path(str(tmp_path / "dir"))).exists()


def test_locked_mailbox_times_out_on_fcntl(mbox: Path) -> None:
    holder = start(LOCKF_HOLDER, str(mbox))
    try:
        started = time.monotonic()
        with pytest.raises(MailboxLockTimeout):
            with locked_mailbox(str(mbox), timeout=0.3):
                pass
        assert time.monotonic() - started < 5
        # The dot-lock taken first was given up again.
        assert not Path(dot_lock_path(str(mbox))).exists()
    finally:
        stop(holder)


def test_lockf_is_the_fallback(mbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dotlock, "_USE_OFD", False)
    calls = []
    real = fcntl.lockf

    def recording(fd, operation, *args):
        calls.append(operation)
        return real(fd, operation, *args)

    monkeypatch.setattr(dotlock.fcntl, "lockf", recording)
    with locked_mailbox(str(mbox), timeout=1):
        pass
    assert calls == [fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_UN]
