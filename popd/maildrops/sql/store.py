"""
The SQL store: maildrops in SQLite or PostgreSQL, reached through DB-API in
a C{twisted.enterprise.adbapi} connection pool, so the reactor never waits
on the database.

Users and folders: a maildrop is C{(user_name, folder)}, with C{folder}
C{''} for INBOX (C{None} or any case of C{INBOX} opens it).  User and
folder names are checked with L{popd.maildrops.paths} like every other
store, and only ever reach SQL as bound parameters.  A folder exists once
mail was delivered into it; opening one that does not is L{NoSuchFolder}.

UIDs: a new message gets C{uuid4().hex} (32 hex digits): unique without a
round trip, never reused after deletion, and still unique if mail moves to
another store.  C{deliver(uid=...)} keeps a given UID; one the maildrop
already has fails with C{ValueError} (the unique constraint decides, so two
deliveries at once cannot both win).

Delivery: one transaction (the folder's row if new, and the message's),
acknowledged once committed: SQLite runs in WAL mode with a full sync at
each commit, and on PostgreSQL the transaction sets C{synchronous_commit}
on whatever the server's default.  The message (read from its file in the
pool thread) is held in memory once while it is inserted; the CRLF size is
counted with L{popd.stream.WireSizeCounter} on the way.  Delivery never
takes the session lock.

Snapshot: C{open} takes the lock, then reads C{(id, uid, wire_size,
retrieved_at)} of the maildrop ordered by C{id}; the session sees exactly
those rows.  Later deliveries wait for the next session.

Reading: L{SQLMaildrop.read} copies the message in a pool thread, 256 KiB
per query (C{substr}), into memory if it is at most 1 MiB, else into an
unlinked temporary file (in C{TMPDIR}).  The stream then reads that copy on
the reactor thread (as it reads a Maildir file): memory per message being
sent stays bounded whatever its size, and the reactor never waits on the
database.  The price of a large message is one local copy on disk while it
is sent.

Schema: on first use the store checks the schema version.  SQLite, being
embedded, upgrades itself; PostgreSQL, shared by hosts that may run
different popd versions, must be upgraded by an administrator with
C{popd db upgrade} (L{popd.maildrops.sql.schema.upgrade}): until then
every operation fails with L{SchemaOutOfDate}, and the store retries the
check at the next operation, so no restart is needed after the upgrade.

Locking: see L{popd.maildrops.sql.locks}.  The statements themselves are
in L{popd.maildrops.sql.queries}.
"""

from __future__ import annotations

import re
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, BinaryIO

from twisted.enterprise import adbapi
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from popd.interfaces import (
    IMaildrop,
    IMaildropProvider,
    MaildropError,
    MaildropUnavailable,
    MessageInfo,
    NoSuchFolder,
    NoSuchUser,
)
from popd.maildrops.paths import (
    UnsafeNameError,
    validate_folder_name,
    validate_user_name,
)
from popd.maildrops.sql import queries
from popd.maildrops.sql.dialects import Target, parse_dsn, prepare_connection
from popd.maildrops.sql.locks import (
    AdvisoryLocks,
    FileLocks,
    prepare_lock_connection,
)
from popd.maildrops.sql.schema import SchemaError

#: Default pool sizes (connections, and so threads).
POOL_MAX = {"sqlite": 4, "postgresql": 10}

_UIDL = re.compile(r"[!-~]{1,70}")
_log = Logger()


@implementer(IMaildropProvider)
class SQLProvider:
    """
    Opens and delivers into maildrops kept in an SQL database.

    @param target: the database (see L{from_dsn}).
    @param reactor: the reactor (default: the global one, looked up at
        first use).
    @param pool_max: the most connections (and threads) the pool opens.
    @param lock_directory: SQLite only: where the lock files go (default
        C{<database file>.locks}).

    The connection pools are created and started at first use, not here, so
    a provider built before C{twistd} forks into the background starts its
    threads in the daemon.
    """

    def __init__(
        self,
        target: Target,
        *,
        reactor: Any = None,
        pool_max: int | None = None,
        lock_directory: str | None = None,
    ) -> None:
        self.target = target
        self._reactor = reactor
        self._pool_max = pool_max or POOL_MAX[target.dialect]
        self._lock_directory = lock_directory or (
            f"{target.path}.locks" if target.is_sqlite else None
        )
        self._dbpool: adbapi.ConnectionPool | None = None
        self._lockpool: adbapi.ConnectionPool | None = None
        self._locks: Any = None
        self._schema_ok = False
        self._schema_waiters: list[Deferred] | None = None
        self._busy = 0
        self._idle_waiters: list[Deferred] = []
        self._closed = False
        self._closing: Deferred | None = None

    @classmethod
    def from_dsn(cls, dsn: str, *, reactor: Any = None, **options: Any) -> SQLProvider:
        """
        A provider for the database named by C{dsn} (see
        L{popd.maildrops.sql.dialects}).  Connects to nothing yet.

        @raise ValueError: the DSN is not one popd supports.
        """
        return cls(parse_dsn(dsn), reactor=reactor, **options)

    def __repr__(self) -> str:
        return f"<SQLProvider {self.target.display}>"

    # IMaildropProvider

    def open(self, avatar_id: str, folder: str | None = None) -> Deferred:
        """
        Lock and snapshot a maildrop.

        @return: a L{Deferred} firing with an L{SQLMaildrop}.
        """
        try:
            user, folder = _names(avatar_id, folder)
        except MaildropError as e:
            return fail(e)
        d = self._ready()
        if folder:
            d.addCallback(lambda _: self._interact(queries.check_folder, user, folder))
        d.addCallback(lambda _: self._acquire(user, folder))

        def locked(lock: Any) -> Deferred:
            def failed(failure: Failure) -> Deferred:
                # Fail only once the lock is given up again.
                return lock.release().addBoth(lambda _: failure)

            snapshot = self._interact(queries.snapshot, user, folder, retry=True)
            snapshot.addCallbacks(
                lambda rows: SQLMaildrop(self, user, folder, rows, lock), failed
            )
            return snapshot

        d.addCallback(locked)
        return self._track(d)

    def deliver(
        self,
        avatar_id: str,
        message: bytes | BinaryIO,
        folder: str | None = None,
        uid: str | None = None,
    ) -> Deferred:
        """
        Store C{message} (bytes, or a binary file read to its end in a pool
        thread) in one transaction, without taking the session lock.

        @return: a L{Deferred} firing with the message's UID once committed.
        """
        try:
            user, folder = _names(avatar_id, folder)
        except MaildropError as e:
            return fail(e)
        if uid is None:
            uid = uuid.uuid4().hex
        elif not isinstance(uid, str) or not _UIDL.fullmatch(uid):
            return fail(ValueError(f"UID {uid!r} is not 1-70 characters in 0x21-0x7E"))
        d = self._ready()
        d.addCallback(
            lambda _: self._interact(queries.deliver, user, folder, message, uid)
        )
        return self._track(d)

    def folders(self, avatar_id: str) -> Deferred:
        """
        @return: a L{Deferred} firing with the sorted folder names of the
            user (INBOX not included).
        """
        try:
            user, _ = _names(avatar_id, None)
        except MaildropError as e:
            return fail(e)
        d = self._ready()
        d.addCallback(lambda _: self._interact(queries.list_folders, user, retry=True))
        return self._track(d)

    # Life cycle

    def check(self) -> Deferred:
        """
        Connect and check (SQLite: upgrade) the schema now rather than at
        the first login, e.g. at start-up.

        @return: a L{Deferred} firing with C{None}, or failing with
            L{SchemaOutOfDate} or L{MaildropError}.
        """
        return self._track(self._ready())

    def close(self) -> Deferred:
        """
        Wait for operations in progress, then close the connection pools
        (which also drops PostgreSQL locks still held).  Maildrops still
        open can only be released afterwards.

        @return: a L{Deferred} firing with C{None}.
        """
        if self._closing is None:
            self._closed = True
            self._closing = self._when_idle()
            self._closing.addCallback(lambda _: self._close_pools())
            self._closing.addErrback(
                lambda failure: _log.failure(
                    "Closing {store} failed", failure, store=self
                )
            )
        d = Deferred()

        def closed(result: None) -> None:
            d.callback(None)

        self._closing.addCallback(closed)
        return d

    # Internals

    def _get_reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def _pool(self) -> adbapi.ConnectionPool:
        """
        The connection pool, created and started at first use.
        """
        if self._dbpool is None:
            target = self.target
            self._dbpool = _start_pool(
                target,
                self._get_reactor(),
                cp_min=1,
                cp_max=self._pool_max,
                cp_reconnect=not target.is_sqlite,
                cp_openfun=lambda connection: prepare_connection(target, connection),
            )
        return self._dbpool

    def _lock_manager(self) -> Any:
        if self._locks is None:
            if self.target.is_sqlite:
                self._locks = FileLocks(self._lock_directory, self._in_thread)
            else:
                self._lockpool = _start_pool(
                    self.target,
                    self._get_reactor(),
                    cp_min=1,
                    cp_max=1,
                    cp_reconnect=True,
                    cp_openfun=prepare_lock_connection,
                )
                self._locks = AdvisoryLocks(self._lockpool)
        return self._locks

    def _acquire(self, user: str, folder: str) -> Deferred:
        if self._closed:
            return fail(MaildropUnavailable("the SQL store is closed"))
        return self._lock_manager().acquire(user, folder)

    def _in_thread(self, function: Callable[..., Any], *args: Any) -> Deferred:
        pool = self._pool()
        return deferToThreadPool(
            self._get_reactor(), pool.threadpool, function, *args
        ).addErrback(self._translate)

    def _interact(
        self, interaction: Callable[..., Any], *args: Any, retry: bool = False
    ) -> Deferred:
        """
        Run C{interaction(cursor, target, *args)} in a transaction in the
        pool.  With C{retry} (for reads only: a write may have committed
        before its connection broke), a connection found broken is replaced
        and the interaction tried once more.
        """
        if self._closed:
            return fail(MaildropUnavailable("the SQL store is closed"))
        d = self._pool().runInteraction(interaction, self.target, *args)
        if retry:

            def again(failure: Failure) -> Any:
                if self._closed or not self._broken(failure):
                    return failure
                return self._pool().runInteraction(interaction, self.target, *args)

            d.addErrback(again)
        return d.addErrback(self._translate)

    def _broken(self, failure: Failure) -> bool:
        """
        Whether C{failure} says a pooled connection was broken (and adbapi
        has replaced it): PostgreSQL restarted, or ended the connection.
        """
        if failure.check(adbapi.ConnectionLost):
            return True
        if self.target.is_sqlite:
            return False
        return failure.check(self.target.dbapi().OperationalError) is not None

    def _ready(self) -> Deferred:
        """
        A L{Deferred} firing once the schema is known to be current; the
        check runs once, and again after a failure.
        """
        if self._closed:
            return fail(MaildropUnavailable("the SQL store is closed"))
        if self._schema_ok:
            return succeed(None)
        d = Deferred()
        if self._schema_waiters is not None:
            self._schema_waiters.append(d)
            return d
        self._schema_waiters = [d]

        def done(result: Any) -> None:
            waiters, self._schema_waiters = self._schema_waiters or [], None
            if not isinstance(result, Failure):
                self._schema_ok = True
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(None)

        check = self._pool().runWithConnection(
            queries.prepare_schema, self.target, self.target.is_sqlite
        )
        check.addErrback(self._translate).addBoth(done)
        return d

    def _translate(self, failure: Failure) -> Failure:
        """
        Report database and filesystem trouble as L{MaildropUnavailable},
        an unusable schema as L{MaildropError}.
        """
        if failure.check(MaildropError, ValueError, IndexError, CancelledError):
            return failure
        where = self.target.display
        if failure.check(SchemaError):
            return Failure(MaildropError(f"{where}: {failure.value}"))
        if failure.check(adbapi.ConnectionLost):
            return Failure(
                MaildropUnavailable(f"lost the connection to the database {where}")
            )
        if failure.check(self.target.dbapi().Error, OSError):
            detail = str(failure.value).strip().splitlines()
            text = detail[0] if detail else type(failure.value).__name__
            _log.warn(
                "Database {where} failed: {error}", where=where, error=failure.value
            )
            return Failure(MaildropUnavailable(f"database {where}: {text}"))
        return failure

    def _track(self, d: Deferred) -> Deferred:
        """
        Count C{d} as an operation in progress until it fires.
        """
        self._busy += 1

        def finished(result: Any) -> Any:
            self._busy -= 1
            if not self._busy:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    waiter.callback(None)
            return result

        return d.addBoth(finished)

    def _when_idle(self) -> Deferred:
        if not self._busy:
            return succeed(None)
        d = Deferred()
        self._idle_waiters.append(d)
        return d

    def _close_pools(self) -> Deferred:
        d = succeed(None) if self._locks is None else self._locks.close()

        def close(_: Any) -> None:
            for pool in (self._lockpool, self._dbpool):
                if pool is not None:
                    pool.close()

        return d.addCallback(close)


@implementer(IMaildrop)
class SQLMaildrop:
    """
    An open, locked maildrop: the rows of C{(user, folder)} at open.

    @ivar user: the user name.
    @ivar folder: the folder, C{''} for INBOX.
    """

    def __init__(
        self,
        provider: SQLProvider,
        user: str,
        folder: str,
        rows: Sequence[tuple[int, str, int, float | None]],
        lock: Any,
    ) -> None:
        self.user = user
        self.folder = folder
        self._provider = provider
        self._ids = tuple(row[0] for row in rows)
        self.messages = tuple(
            MessageInfo(uid, int(size), None if at is None else float(at))
            for _, uid, size, at in rows
        )
        self._lock = lock
        self._closed = False
        # A maildrop dropped without commit or release (a bug elsewhere)
        # must not lock its user out until popd restarts.
        self._abandoned = weakref.finalize(
            self, _release_abandoned, provider._get_reactor(), lock
        )

    def read(self, index: int) -> Deferred:
        """
        The stored message at C{index}, as a binary file the caller closes.

        @raise IndexError: C{index} is not in the snapshot.
        """
        message_id = self._id(index)
        if self._closed:
            return fail(MaildropError("the maildrop is closed"))
        provider = self._provider
        return provider._track(
            provider._interact(
                queries.read, message_id, self.messages[index].uid, retry=True
            )
        )

    def commit(self, deleted: Iterable[int], retrieved: Iterable[int] = ()) -> Deferred:
        """
        In one transaction, delete the messages at C{deleted} and set
        C{retrieved_at} of those at C{retrieved} where it is unset; then
        release the lock (also on error).  Once closed, does nothing.

        @raise IndexError: an index is not in the snapshot.
        """
        doomed = sorted({self._id(index) for index in deleted})
        seen = sorted({self._id(index) for index in retrieved} - set(doomed))
        if self._closed:
            return succeed(None)
        self._close()
        if not doomed and not seen:
            return self._lock.release()
        provider = self._provider
        d = provider._interact(
            queries.commit, self.user, self.folder, self._lock.check, doomed, seen
        )

        def unlock(result: Any) -> Deferred:
            return self._lock.release().addCallback(lambda _: result)

        return provider._track(d.addBoth(unlock))

    def release(self) -> Deferred:
        """
        Release the lock, changing nothing.  Once closed, does nothing.
        """
        if self._closed:
            return succeed(None)
        self._close()
        return self._lock.release()

    def _close(self) -> None:
        self._closed = True
        self._abandoned.detach()

    def _id(self, index: int) -> int:
        if not 0 <= index < len(self._ids):
            raise IndexError(f"no message at index {index}")
        return self._ids[index]


def _release_abandoned(reactor: Any, lock: Any) -> None:
    """
    Release the lock of a maildrop collected while open; the collector may
    run in any thread, the release belongs on the reactor's.
    """
    _log.warn("A maildrop was dropped while open; releasing its lock")
    reactor.callFromThread(lock.release)


def _names(avatar_id: str, folder: str | None) -> tuple[str, str]:
    """
    The checked user name and folder key (C{''} for INBOX).

    @raise NoSuchUser: the user name is unusable.
    @raise NoSuchFolder: the folder name is.
    """
    try:
        user = validate_user_name(avatar_id)
    except (UnsafeNameError, TypeError, AttributeError) as e:
        raise NoSuchUser(str(e)) from None
    if folder is None or folder.upper() == "INBOX":
        return user, ""
    try:
        return user, validate_folder_name(folder)
    except (UnsafeNameError, TypeError, AttributeError) as e:
        raise NoSuchFolder(str(e)) from None


def _start_pool(target: Target, reactor: Any, **options: Any) -> adbapi.ConnectionPool:
    """
    An adbapi pool for C{target}, started at once: it is only made at first
    use, when the reactor runs (or a test turns it by hand).
    """
    pool = adbapi.ConnectionPool(
        target.module, *target.args, cp_reactor=reactor, **target.kwargs, **options
    )
    # adbapi connects with dbapi.connect(*args, **kwargs): have it create a
    # missing SQLite file with mode 0600 first.
    pool.dbapi = _Connector(target, pool.dbapi)
    pool.start()
    return pool


class _Connector:
    """
    A DB-API module whose C{connect} goes through L{Target.create_file}.
    """

    def __init__(self, target: Target, module: Any) -> None:
        self._target = target
        self._module = module

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        self._target.create_file()
        return self._module.connect(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)
