"""
The exclusive session lock of the SQL store, one implementation per
database.

SQLite (L{FileLocks}): C{flock} on a lock file per maildrop in a directory
next to the database (C{<db>.locks/<hash>.lock}, see
L{popd.maildrops.locking}).  The kernel drops it when the holder dies; the
file is named by a hash of the user and folder names, so no name ever
reaches the filesystem.  One small file per maildrop ever opened stays
behind, like Maildir's C{popd.lock}.

PostgreSQL (L{AdvisoryLocks}): a session-level advisory lock
(C{pg_try_advisory_lock(key)}, C{key} a 64-bit hash of user and folder),
taken on B{one} dedicated connection per provider (per popd process) that
holds the locks of all of that process's sessions.  It works across
processes and hosts, and a crashed process's locks go away with its
connection: at once when its socket closes, or, if its host vanished,
after the server's TCP keepalive (set to about a minute on that connection).

Why one lock connection per process and not one per session: advisory
locks belong to a server session, so "a connection per POP3 session" would
mean thousands of PostgreSQL backends (each a process, C{max_connections}
is 100 by default) for thousands of POP3 sessions.  With one lock
connection a process costs the database one extra backend however many
sessions it serves, and lock and unlock are quick statements serialised on
that connection.  The trade-offs:

  - An advisory lock is re-entrant within its server session, so the lock
    connection cannot tell two sessions of one process apart: an
    in-process table of held keys does (and answers C{[IN-USE]} without a
    round trip).
  - If the lock connection drops while popd lives (network trouble, a
    server restart, a C{pg_terminate_backend}), every lock of the process
    is gone at once while its sessions go on.  Commit therefore checks, in
    its own transaction, that the lock connection it locked with (by
    backend pid) still holds the key in C{pg_locks}; if not, it fails with
    L{MaildropUnavailable} and changes nothing.  The window left (the lock
    lost between that check and the commit) is harmless here: deletions
    are by row id, so a concurrent session can never lose a message it
    was not shown.
  - Lock and unlock wait behind each other on the one connection: fine for
    thousands of logins a second, the rate at which PostgreSQL answers
    short statements.
  - A connection pooler in transaction mode (PgBouncer) cannot carry
    session-level locks: popd must reach PostgreSQL directly or through a
    session-mode pool.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from popd.interfaces import MaildropInUse, MaildropUnavailable
from popd.maildrops.locking import MaildropLock, acquire_lock

_log = Logger()

#: Server-side keepalive of the lock connection: a PostgreSQL server notices
#: a vanished popd host after about idle + interval * count seconds.
LOCK_KEEPALIVE = {
    "tcp_keepalives_idle": 30,
    "tcp_keepalives_interval": 10,
    "tcp_keepalives_count": 3,
}


def maildrop_digest(user: str, folder: str) -> bytes:
    """
    A hash naming one maildrop (C{folder} is C{''} for INBOX).
    """
    return hashlib.sha256(
        b"popd maildrop\0" + user.encode("utf-8") + b"\0" + folder.encode("utf-8")
    ).digest()


def describe(user: str, folder: str) -> str:
    """
    A maildrop's name in messages.
    """
    return repr(user) if not folder else f"{user!r} folder {folder!r}"


def advisory_key(user: str, folder: str) -> int:
    """
    The PostgreSQL advisory lock key of a maildrop: a signed 64-bit integer.
    """
    return int.from_bytes(maildrop_digest(user, folder)[:8], "big", signed=True)


def lock_tag(key: int) -> tuple[int, int]:
    """
    How C{pg_locks} shows advisory lock C{key}: C{(classid, objid)}, the
    high and low 32 bits (with C{objsubid} 1 for a single-key lock).
    """
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


class FileLock:
    """
    A held SQLite session lock.
    """

    def __init__(self, lock: MaildropLock) -> None:
        self._lock = lock

    @property
    def held(self) -> bool:
        return self._lock.held

    def check(self, cursor: Any) -> None:
        """
        Nothing to check: a C{flock} cannot be lost while its file is open.
        """

    def release(self) -> Deferred:
        # flock(LOCK_UN) and close(2) never block.
        self._lock.release()
        return succeed(None)


class FileLocks:
    """
    C{flock}-based locks for the SQLite store.

    @param directory: where the lock files go (created with mode 0700).
    @param in_thread: runs a blocking call in a thread, returning a
        L{Deferred}.
    """

    def __init__(self, directory: str, in_thread: Any) -> None:
        self.directory = directory
        self._in_thread = in_thread

    def path(self, user: str, folder: str) -> str:
        name = maildrop_digest(user, folder).hex()[:40] + ".lock"
        return os.path.join(self.directory, name)

    def acquire(self, user: str, folder: str) -> Deferred:
        """
        @return: a L{Deferred} firing with a L{FileLock}, or failing with
            L{MaildropInUse}.
        """
        return self._in_thread(self._acquire_blocking, user, folder)

    def _acquire_blocking(self, user: str, folder: str) -> FileLock:
        os.makedirs(self.directory, 0o700, exist_ok=True)
        try:
            lock = acquire_lock(self.path(user, folder))
        except MaildropInUse:
            raise MaildropInUse(
                f"the maildrop of {describe(user, folder)} is locked by another session"
            ) from None
        return FileLock(lock)

    def close(self) -> Deferred:
        """
        Nothing to do: each lock is dropped by its own release.
        """
        return succeed(None)


class AdvisoryLock:
    """
    A held PostgreSQL session lock.

    @ivar key: the advisory lock key.
    @ivar pid: the backend pid of the lock connection that took it.
    """

    def __init__(self, owner: AdvisoryLocks, key: int, description: str) -> None:
        self._owner = owner
        self.key = key
        self.pid: int | None = None
        self.description = description
        self.held = False

    def check(self, cursor: Any) -> None:
        """
        Make sure, inside the caller's transaction, that the lock connection
        still holds this lock.

        @raise MaildropUnavailable: it does not (its connection was lost).
        """
        classid, objid = lock_tag(self.key)
        cursor.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND pid = %s AND classid::bigint = %s AND objid::bigint = %s"
            " AND objsubid = 1 AND granted",
            (self.pid, classid, objid),
        )
        row = cursor.fetchone()
        if not row or not row[0]:
            raise MaildropUnavailable(
                f"the session lost its lock on the maildrop of {self.description}"
                " (the database connection holding it was lost); nothing was changed"
            )

    def release(self) -> Deferred:
        return self._owner.release(self)


class AdvisoryLocks:
    """
    PostgreSQL advisory locks, all held on the one connection of C{pool}
    (an C{adbapi.ConnectionPool} of exactly one autocommit connection).
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._held: dict[int, AdvisoryLock] = {}
        self._closed = False

    def acquire(self, user: str, folder: str) -> Deferred:
        """
        @return: a L{Deferred} firing with an L{AdvisoryLock}, or failing
            with L{MaildropInUse}.
        """
        description = describe(user, folder)
        key = advisory_key(user, folder)
        in_use = MaildropInUse(
            f"the maildrop of {description} is locked by another session"
        )
        if self._closed:
            return fail(MaildropUnavailable("the SQL store is closed"))
        if key in self._held:
            return fail(in_use)
        lock = AdvisoryLock(self, key, description)
        self._held[key] = lock

        def locked(result: tuple[bool, int]) -> AdvisoryLock:
            got, pid = result
            if not got:
                self._forget(lock)
                raise in_use
            lock.pid = pid
            lock.held = True
            return lock

        def failed(failure: Any) -> Any:
            self._forget(lock)
            return failure

        return self._pool.runWithConnection(_try_lock, key).addCallbacks(locked, failed)

    def release(self, lock: AdvisoryLock) -> Deferred:
        """
        Give up C{lock}.  Never fails: if the lock connection is broken, the
        lock went with it.
        """
        if not lock.held:
            return succeed(None)
        lock.held = False
        if self._closed:
            self._forget(lock)
            return succeed(None)

        def failed(failure: Any) -> None:
            _log.failure(
                "Could not unlock the maildrop of {description}; its lock"
                " connection is probably gone, and the lock with it",
                failure,
                description=lock.description,
            )

        d = self._pool.runWithConnection(_unlock, lock.key, lock.pid)
        d.addErrback(failed)
        d.addCallback(lambda _: self._forget(lock))
        return d

    def close(self) -> Deferred:
        """
        Give up every lock (so the next holder need not wait for the server
        to notice the connection closing) and refuse new ones.
        """
        self._closed = True
        self._held.clear()

        def failed(failure: Any) -> None:
            _log.failure("Could not unlock the maildrops at close", failure)

        return self._pool.runWithConnection(_unlock_all).addErrback(failed)

    def _forget(self, lock: AdvisoryLock) -> None:
        if self._held.get(lock.key) is lock:
            del self._held[lock.key]


def prepare_lock_connection(connection: Any) -> None:
    """
    Set up the lock connection: autocommit (it never holds a transaction
    open), server-side keepalives so a vanished host's locks are freed, and
    no idle timeout (PostgreSQL 14's C{idle_session_timeout} would end it,
    and the locks with it, whenever no session opens or closes for a while).
    """
    connection.autocommit = True
    cursor = connection.cursor()
    try:
        for setting, value in LOCK_KEEPALIVE.items():
            cursor.execute(
                "SELECT set_config(%s, %s, false)", (setting, str(int(value)))
            )
        cursor.execute(
            "SELECT set_config('idle_session_timeout', '0', false)"
            " WHERE current_setting('server_version_num')::int >= 140000"
        )
    finally:
        cursor.close()


def _try_lock(connection: Any, key: int) -> tuple[bool, int]:
    cursor = connection.cursor()
    try:
        cursor.execute("SELECT pg_try_advisory_lock(%s), pg_backend_pid()", (key,))
        got, pid = cursor.fetchone()
    finally:
        cursor.close()
    return bool(got), int(pid)


def _unlock(connection: Any, key: int, pid: int | None) -> None:
    """
    Unlock C{key} if this is still the connection that locked it; a new
    connection never had it (and unlocking there would only warn).
    """
    cursor = connection.cursor()
    try:
        cursor.execute(
            "SELECT CASE WHEN pg_backend_pid() = %s THEN pg_advisory_unlock(%s) END",
            (pid, key),
        )
        cursor.fetchone()
    finally:
        cursor.close()


def _unlock_all(connection: Any) -> None:
    cursor = connection.cursor()
    try:
        cursor.execute("SELECT pg_advisory_unlock_all()")
        cursor.fetchall()
    finally:
        cursor.close()
