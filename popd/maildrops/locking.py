"""
The exclusive lock that keeps a maildrop to one POP3 session at a time.

The lock is C{flock(2)} on a lock file.  A C{flock} lock belongs to an open
file description, so it conflicts between processes I{and} between two opens
in the same process (two sessions of one user in one twistd), and the kernel
drops it when its holder dies, so a crash never leaves a stale lock behind.

The lock file itself is never removed: unlinking it while another process
has it open and is about to lock it would let two processes each lock a
different inode of the "same" file.

Limits: C{flock} only protects against processes that use it too, and on NFS
it is not enough for several hosts sharing one maildrop (whether it reaches
the server at all depends on the client, and the server forgets locks when it
restarts).  Maildirs shared between hosts need dot-locks, which popd does not
do yet.
"""

from __future__ import annotations

import fcntl
import os
from types import TracebackType

from popd.interfaces import MaildropInUse


class MaildropLock:
    """
    A held lock; L{release} gives it up.  Also a context manager.

    @ivar path: the lock file.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        # A file object closes the descriptor, and so drops the lock, even if
        # a caller forgets to release it and the object is collected.
        self._file = os.fdopen(fd, "rb", buffering=0)

    @property
    def held(self) -> bool:
        """
        Whether this object still holds the lock.
        """
        return not self._file.closed

    def release(self) -> None:
        """
        Give up the lock.  Releasing twice is harmless.
        """
        if self._file.closed:
            return
        try:
            # Unlock explicitly: a forked child sharing the descriptor would
            # otherwise keep the lock alive after we close our copy.
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        finally:
            self._file.close()

    def __enter__(self) -> MaildropLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def acquire_lock(path: str) -> MaildropLock:
    """
    Take the exclusive lock on C{path}, creating the lock file (mode 0600) if
    needed.  Never waits.

    @raise MaildropInUse: someone else holds the lock.
    @raise OSError: the lock file cannot be opened or locked.
    """
    flags = os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MaildropInUse(f"{path} is locked by another session") from None
    except BaseException:
        os.close(fd)
        raise
    return MaildropLock(path, fd)
