"""
Locking an mbox file the way mail transfer agents do while they write it.

Postfix's C{local(8)} (C{mailbox_delivery_lock = fcntl, dotlock} on Linux),
Exim's C{appendfile} and procmail agree on two locks, taken in this order:

  1. a I{dot-lock}: the file C{<mbox>.lock}, created atomically.  It works
     between hosts sharing the mail spool over NFS and between threads of one
     process.  It is created the NFS-safe way: a uniquely named file is
     created first and hard-linked to C{<mbox>.lock}; the link count of the
     unique file (2 on success) is what counts, because an NFS client may
     report a C{link} that succeeded on the server as failed.  Where hard
     links are not allowed, C{open(O_CREAT | O_EXCL)} is used instead.
  2. a C{fcntl} write lock on the whole mbox file.  On Linux popd takes an
     I{open file description} lock (C{F_OFD_SETLK}): it conflicts with the
     classic C{fcntl}/C{lockf} locks MTAs take, but unlike them it is not
     silently dropped when this process closes I{another} descriptor of the
     same file (a finished C{RETR}, say) and it also conflicts between
     threads.  Elsewhere it falls back to C{fcntl.lockf}.

Waiting is bounded: both locks are retried with a growing pause until a
deadline, then L{MailboxLockTimeout} (a L{MaildropUnavailable}) is raised.

A dot-lock left behind by a process that died is I{stale}.  One whose
modification time is older than C{stale_seconds} is removed (popd's default
is 300 seconds; Postfix's C{stale_lock_time} is 500 and Exim's
C{lockfile_timeout} 30 minutes).  While popd holds a dot-lock for long (a
commit rewriting a big mbox) it touches it with L{DotLock.refresh}, so it
never looks stale to others.  popd writes C{popd <host> <pid>} into its own
dot-locks, and removes at once one written by a popd process on this host
that no longer exists.  Two processes that judge the same lock stale at the
same instant may both remove it, and one could then remove the other's fresh
lock; the window is a few microseconds, once per stale lock, and the
C{fcntl} lock still keeps writers on one host apart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from popd.interfaces import MaildropUnavailable

#: popd's default age after which another program's dot-lock is broken.
DEFAULT_STALE_SECONDS = 300
#: popd's default bound on waiting for both locks.
DEFAULT_TIMEOUT = 15.0

_FIRST_PAUSE = 0.01
_LONGEST_PAUSE = 0.5
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})
_BUSY_ERRNOS = frozenset({errno.EACCES, errno.EAGAIN})
_USE_OFD = (
    sys.platform.startswith("linux")
    and hasattr(fcntl, "F_OFD_SETLK")
    and struct.calcsize("l") == 8
)


class MailboxLockTimeout(MaildropUnavailable):
    """
    Another program kept an mbox locked for longer than we wait.
    """


def dot_lock_path(mailbox: str) -> str:
    """
    @return: the dot-lock of C{mailbox}: its path with C{.lock} appended.
    """
    return mailbox + ".lock"


@dataclass
class DotLock:
    """
    A held dot-lock.  L{release} removes it.

    @ivar path: the C{<mbox>.lock} file.
    """

    path: str
    _fd: int
    _touched: float = field(default_factory=time.monotonic)

    def refresh(self, every: float = 30.0) -> None:
        """
        Renew the lock's modification time if C{every} seconds passed since
        the last renewal, so others never judge it stale while it is held.
        """
        now = time.monotonic()
        if self._fd >= 0 and now - self._touched >= every:
            os.utime(self._fd)
            self._touched = now

    def release(self) -> None:
        """
        Remove the lock file.  Releasing twice is harmless.
        """
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            # Only remove the lock if it is still ours: one broken as stale
            # and taken by someone else is theirs now.
            with contextlib.suppress(FileNotFoundError):
                if _same_file(os.fstat(fd), os.lstat(self.path)):
                    os.unlink(self.path)
        finally:
            os.close(fd)


def acquire_dot_lock(
    mailbox: str,
    *,
    deadline: float,
    stale_seconds: float = DEFAULT_STALE_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> DotLock:
    """
    Create C{<mailbox>.lock}, waiting until the monotonic C{deadline} for a
    holder to remove it and breaking it if it is stale.

    @raise MailboxLockTimeout: the lock was still held at the deadline.
    @raise OSError: the lock cannot be created (permissions, I/O).
    """
    path = dot_lock_path(mailbox)
    pause = _FIRST_PAUSE
    while True:
        lock = _try_dot_lock(path)
        if lock is not None:
            return lock
        if _break_if_stale(path, stale_seconds):
            continue
        now = time.monotonic()
        if now >= deadline:
            raise MailboxLockTimeout(f"{path} is held by another program")
        sleep(min(pause, deadline - now))
        pause = min(pause * 2, _LONGEST_PAUSE)


def _try_dot_lock(path: str) -> DotLock | None:
    """
    One attempt at creating the dot-lock; C{None} if it exists.
    """
    directory, name = os.path.split(path)
    unique = os.path.join(
        directory, f".{name}.{_host()}.{os.getpid()}.{os.urandom(6).hex()}"
    )
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(unique, flags, 0o600)
    try:
        os.write(fd, _owner_text())
        try:
            os.link(unique, path)
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno in _NO_LINK_ERRNOS:
                os.close(fd)
                fd = -1
                return _try_exclusive_create(path)
            # An NFS client may report a link the server made as failed;
            # the link count tells the truth.
            if os.fstat(fd).st_nlink != 2:
                raise
        if os.fstat(fd).st_nlink == 2:
            lock = DotLock(path, fd)
            fd = -1
            return lock
        return None
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(unique)


def _try_exclusive_create(path: str) -> DotLock | None:
    """
    The dot-lock by C{O_CREAT | O_EXCL}, for filesystems without hard links.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return None
    try:
        os.write(fd, _owner_text())
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return DotLock(path, fd)


def _break_if_stale(path: str, stale_seconds: float) -> bool:
    """
    Remove the dot-lock at C{path} if it is stale.

    @return: whether it should be tried again at once (it was removed, or
        it vanished meanwhile).
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return True
    age = time.time() - before.st_mtime
    if age <= stale_seconds and not _left_by_dead_popd(path):
        return False
    with contextlib.suppress(FileNotFoundError):
        # Only remove the file judged stale, not a fresh one that replaced it.
        if _same_file(before, os.lstat(path)):
            os.unlink(path)
    return True


def _left_by_dead_popd(path: str) -> bool:
    """
    Whether the dot-lock was written by a popd process of this host that no
    longer exists.
    """
    try:
        with open(path, "rb") as lock:
            text = lock.read(512)
    except OSError:
        return False
    parts = text.split()
    if len(parts) != 3 or parts[0] != b"popd" or parts[1] != _host().encode():
        return False
    if not parts[2].isdigit():
        return False
    pid = int(parts[2])
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _owner_text() -> bytes:
    return f"popd {_host()} {os.getpid()}\n".encode()


def _host() -> str:
    return socket.gethostname().replace("/", "_").replace(" ", "_") or "localhost"


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def try_write_lock(fd: int) -> bool:
    """
    Try once to take the C{fcntl} write lock on the whole file C{fd}.

    @return: whether it is held now.
    """
    try:
        if _USE_OFD:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK))
        else:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in _BUSY_ERRNOS:
            return False
        raise
    return True


def write_unlock(fd: int) -> None:
    """
    Give up the C{fcntl} lock that L{try_write_lock} took.
    """
    if _USE_OFD:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK))
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)


def write_lock(
    fd: int, *, deadline: float, sleep: Callable[[float], None] = time.sleep
) -> None:
    """
    Take the C{fcntl} write lock on the whole file C{fd}, waiting until the
    monotonic C{deadline}.

    @raise MailboxLockTimeout: it was still held by another at the deadline.
    """
    pause = _FIRST_PAUSE
    while not try_write_lock(fd):
        now = time.monotonic()
        if now >= deadline:
            raise MailboxLockTimeout("the mbox is locked (fcntl) by another program")
        sleep(min(pause, deadline - now))
        pause = min(pause * 2, _LONGEST_PAUSE)


def _flock(kind: int) -> bytes:
    """
    A C{struct flock} for the whole file, as Linux lays it out on 64-bit
    machines (C{l_pid} must be 0 for OFD locks), with the trailing padding.
    """
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)


@dataclass
class LockedMailbox:
    """
    An mbox file held under both locks.

    @ivar fd: the file, opened for reading and writing, or C{-1} if it does
        not exist (and was not to be created).
    @ivar created: whether this lock created the file.
    """

    path: str
    fd: int
    dot_lock: DotLock
    created: bool = False


@contextlib.contextmanager
def locked_mailbox(
    path: str,
    *,
    create: bool = False,
    mode: int = 0o600,
    timeout: float = DEFAULT_TIMEOUT,
    stale_seconds: float = DEFAULT_STALE_SECONDS,
) -> Iterator[LockedMailbox]:
    """
    Hold the dot-lock and the C{fcntl} lock of the mbox at C{path} for the
    duration of a C{with} block: no MTA that locks like Postfix or Exim
    writes it meanwhile.

    The dot-lock is taken first, then the file is opened (created with
    C{mode} if C{create}) and locked, as the MTAs do; leaving the block
    releases them in the opposite order.  A symbolic link or anything but a
    regular file at C{path} is refused.

    @raise MailboxLockTimeout: a lock was not free within C{timeout} seconds.
    @raise OSError: the file or its lock cannot be opened or created.
    """
    deadline = time.monotonic() + timeout
    dot = acquire_dot_lock(path, deadline=deadline, stale_seconds=stale_seconds)
    fd = -1
    try:
        fd, created = _open_mailbox(path, create, mode)
        if fd >= 0:
            write_lock(fd, deadline=deadline)
        yield LockedMailbox(path, fd, dot, created)
    finally:
        try:
            if fd >= 0:
                # Closing drops the lock too; unlocking first also covers a
                # forked child that inherited the descriptor.
                with contextlib.suppress(OSError):
                    write_unlock(fd)
                os.close(fd)
        finally:
            dot.release()


def _open_mailbox(path: str, create: bool, mode: int) -> tuple[int, bool]:
    """
    Open the mbox for reading and writing, refusing what is not a regular
    file.

    @return: the descriptor (C{-1} if the file is missing and not to be
        created) and whether it was created now.
    """
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    created = False
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if not create:
            return -1, False
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
            created = True
        except FileExistsError:
            fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "the mbox is a symbolic link", path) from e
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "the mbox is not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd, created
