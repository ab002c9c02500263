"""
The Maildir store: one directory per user with C{tmp/}, C{new/} and C{cur/}
(U{https://cr.yp.to/proto/maildir.html}), Maildir++ folders as C{.Name}
subdirectories, and Dovecot's C{,W=} size field and C{dovecot-uidlist}
understood.

Scans and writes run in a thread pool, never on the reactor thread; what
costs a few system calls whatever the size of the Maildir (opening one
message, releasing the lock) runs where it is called.  A snapshot of an
unchanged Maildir is kept in memory and reused by the next session (see
L{popd.maildrops.snapshot_cache}).

Folders: opening a folder that does not exist is L{NoSuchFolder} and
creates nothing; delivering into one creates it (when C{create} is on), as
C{deliver} to a user without a Maildir creates that.  C{INBOX} in any case
is the Maildir itself.

UIDs, first match wins:

  1. the UID given to C{deliver(..., uid=...)}, kept in C{popd-uids};
  2. with C{dovecot_uidl} on, the UIDL Dovecot gave a message listed in
     C{dovecot-uidlist} (its C{P} field, else C{dovecot_uidl_format},
     by default Dovecot's C{%08Xu%08Xv}), so a site moving from Dovecot's
     POP3 server keeps its UIDLs and clients do not download everything
     again.  Meant for a Maildir that Dovecot no longer writes: while
     Dovecot still serves it, a message popd has listed before Dovecot
     numbered it would change its UIDL, so turn C{dovecot_uidl} off then.
     Only the C{dovecot-uidlist} inside the Maildir is read (not one in a
     separate control directory);
  3. the base name (before the C{:} of the flags), or its SHA-1 in hex when
     it is not a valid UIDL (see L{uid_for}).

A snapshot never lists one UID twice: should two messages come out with the
same one, the later falls back to rule 3.

Files popd keeps inside a Maildir (they never start with a dot, so no other
program mistakes them for folders).  Each is a header line then one
C{<base name> <value>} line per message, LF-terminated, replaced atomically
(written to C{<name>.tmp}, fsynced, renamed over, directory fsynced); a line
cut off by a crash is ignored:

  - C{popd.lock}: the session lock (see L{popd.maildrops.locking}).
  - C{popd-sizes} (C{popd-sizes 1}): a cache of CRLF sizes computed by
    reading messages whose names carry no C{,W=}.  It is keyed by base
    name, which the Maildir convention never reuses for another message,
    and is only written while the session lock is held.  Losing it only
    costs time.
  - C{popd-retrieved} (C{popd-retrieved 1}): when a session first retrieved
    each message, in POSIX seconds (the clock of RFC 2449 EXPIRE).  Written
    by a C{commit} that records a first retrieval or removes messages,
    under the session lock; the lines of messages no longer in the Maildir
    are dropped then.  Losing it only restarts that clock.
  - C{popd-uids} (C{popd-uids 1}): the UIDs given to C{deliver}, by base
    name.  A delivery with a UID takes C{popd-uids.lock} (C{flock}, held
    only while it checks the UID is unused, writes the message and the map
    and links the message into C{new/}: the map entry is durable before the
    message is visible); C{commit} takes it to drop the lines of messages
    that are gone.  Losing this file changes those UIDs.
  - C{popd-index}: the last settled snapshot (every message's place, UID,
    size and retrieval time, with the stamps of what it was built from),
    as JSON, so another worker process or a restarted popd need not scan
    an unchanged Maildir.  Written after the login that built it, replaced
    atomically, not fsynced, checked field by field when read (it is the
    Maildir owner's to write): losing or breaking it only costs a scan.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
import re
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from popd.interfaces import (
    IMaildrop,
    IMaildropProvider,
    MaildropError,
    MaildropInUse,
    MessageInfo,
    NoSuchFolder,
    NoSuchUser,
)
from popd.maildrops.locking import MaildropLock, acquire_lock
from popd.maildrops.paths import (
    UnsafeNameError,
    check_template,
    expand_path,
    validate_folder_name,
)
from popd.maildrops.snapshot_cache import (
    BoundedCache,
    Stamp,
    file_stamp,
    is_settled,
)
from popd.maildrops.threads import BlockingRunner, unavailable
from popd.stream import WireSizeCounter, wire_size

#: How much of a message is read or copied at a time.
CHUNK_SIZE = 64 * 1024

LOCK_FILE = "popd.lock"
SIZE_CACHE_FILE = "popd-sizes"
_SIZE_CACHE_HEADER = b"popd-sizes 1\n"
RETRIEVED_FILE = "popd-retrieved"
_RETRIEVED_HEADER = b"popd-retrieved 1\n"
UID_MAP_FILE = "popd-uids"
INDEX_FILE = "popd-index"
_INDEX_VERSION = 2
_INDEX_NAMES = re.compile(r"(?:(?:new|cur)/[^./\n\0][^/\n\0]*\n)*")
UID_MAP_LOCK_FILE = "popd-uids.lock"
_UID_MAP_HEADER = b"popd-uids 1\n"
DOVECOT_UIDLIST_FILE = "dovecot-uidlist"
#: Dovecot's default C{pop3_uidl_format}.
DOVECOT_DEFAULT_UIDL_FORMAT = "%08Xu%08Xv"

_SUBDIRS = ("tmp", "new", "cur")
_MODE = 0o700
_UIDL = re.compile(r"[!-~]{1,70}")
_UIDL_LINES = re.compile(r"(?:[!-~]{1,70}\n)*")
_W_FIELD = re.compile(r",W=([0-9]+)(?=,|\Z)")
_LEADING_NUMBER = re.compile(r"[0-9]+")
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})
_delivery_counter = itertools.count(1)
_log = Logger()
# How os.fsdecode decodes file names; popd's files are decoded whole.
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()
#: The default of L{MaildirProvider}'s C{cache_messages}.
DEFAULT_CACHE_MESSAGES = 250_000


def uid_for(base: str) -> str:
    """
    The UIDL of a message: its Maildir base name when that is a valid UIDL
    (1 to 70 characters in 0x21-0x7E), else the SHA-1 of the name in hex.
    Both survive moves from C{new/} to C{cur/} and flag changes.
    """
    if _UIDL.fullmatch(base):
        return base
    return hashlib.sha1(os.fsencode(base)).hexdigest()


def base_name(file_name: str) -> str:
    """
    The part of a Maildir file name that never changes: before the C{:}
    that starts the flags.
    """
    return file_name.partition(":")[0]


def is_valid_uid(uid: object) -> bool:
    """
    Whether C{uid} can be a UIDL: a C{str} of 1 to 70 characters in
    0x21-0x7E.
    """
    return isinstance(uid, str) and _UIDL.fullmatch(uid) is not None


@dataclass(slots=True)
class _Message:
    """
    One message of a snapshot (L{_Snapshot.message}): where it is in the
    snapshot, its base name, where it was last seen and what a session
    lists of it.
    """

    index: int
    base: str
    path: str
    info: MessageInfo


def _base_of(path: str) -> str:
    return base_name(path.rpartition(os.sep)[2])


@implementer(IMaildropProvider)
class MaildirProvider:
    """
    Opens and delivers into the Maildirs found by a path template (see
    L{popd.maildrops.paths.expand_path}), e.g. C{/var/vmail/%d/%n/Maildir}.

    @param create: create a missing Maildir with mode 0700 on open and
        delivery, and a missing folder on delivery; without it a missing
        Maildir is L{NoSuchUser} and a missing folder L{NoSuchFolder}.
        Opening a missing folder never creates it.
    @param dovecot_uidl: give a message listed in C{dovecot-uidlist} the
        UIDL Dovecot's POP3 server gave it (see the module docstring).
    @param dovecot_uidl_format: Dovecot's C{pop3_uidl_format} at the site:
        C{%u} the IMAP UID, C{%v} the UIDVALIDITY, C{%g} the message GUID
        (C{G} field, else the base name), C{%f} the base name, C{%%} a
        C{%}; a width (C{%08}) and C{X}/C{x} for hexadecimal may come
        between.  A message with its own C{P} field uses that instead.
    @param cache_messages: how many messages' snapshots to keep in memory
        (about 300 bytes each), so a login to an unchanged Maildir does not
        scan it again (see L{popd.maildrops.snapshot_cache}); 0 keeps none.
    @param index: also keep each Maildir's snapshot in its C{popd-index}
        file, for the other worker processes and after a restart.
    @param reactor: the reactor to report results on (default: the global
        one, looked up when first needed).
    @param threadpool: where blocking work runs (default: the reactor's).
    @raise ValueError: C{dovecot_uidl_format} uses something else.
    """

    def __init__(
        self,
        path_template: str,
        *,
        create: bool = True,
        dovecot_uidl: bool = True,
        dovecot_uidl_format: str = DOVECOT_DEFAULT_UIDL_FORMAT,
        cache_messages: int = DEFAULT_CACHE_MESSAGES,
        index: bool = True,
        reactor: Any = None,
        threadpool: Any = None,
    ) -> None:
        check_template(path_template)
        self._template = path_template
        self._create = create
        self._dovecot = _DovecotUidl(dovecot_uidl_format) if dovecot_uidl else None
        self._index = index
        self._snapshots: BoundedCache[str, _Snapshot] | None = None
        if cache_messages > 0:
            self._snapshots = BoundedCache(
                cache_messages, lambda snapshot: len(snapshot.infos) + 1
            )
        self._runner = BlockingRunner(reactor, threadpool)

    def open(self, avatar_id: str, folder: str | None = None) -> Deferred:
        """
        Lock and snapshot a user's Maildir (or one of its folders).

        A Maildir whose snapshot in memory is still good is opened on the
        calling thread (the lock and a few C{stat} calls); scanning one
        runs in the thread pool.

        @return: a L{Deferred} firing with an L{IMaildrop}.
        """
        cached = self._cached(avatar_id, folder)
        if cached is None:
            return self._run(self._open_blocking, avatar_id, folder, None)
        root, previous = cached
        try:
            lock = acquire_lock(os.path.join(root, LOCK_FILE))
        except MaildropInUse:
            return fail()
        except OSError:
            return self._run(self._open_blocking, avatar_id, folder, None)
        try:
            _, directories, tables = _stamps(root, self._dovecot)
        except OSError:
            return self._run(self._open_blocking, avatar_id, folder, lock)
        if not previous.reusable(directories, tables):
            return self._run(self._open_blocking, avatar_id, folder, lock)
        return succeed(MaildirMaildrop(root, previous, lock, self._run))

    def deliver(
        self,
        avatar_id: str,
        message: bytes | BinaryIO,
        folder: str | None = None,
        uid: str | None = None,
    ) -> Deferred:
        """
        Store a message durably in C{new/}, without taking the session lock.

        @param message: the message as C{bytes}, or a binary file read to its
            end in the thread pool.
        @param uid: the UID to keep (kept in C{popd-uids}), or C{None}.
        @return: a L{Deferred} firing with the new message's UID; failing
            with C{ValueError} if C{uid} is invalid or already in use in
            that Maildir.
        """
        if uid is not None and not is_valid_uid(uid):
            return fail(ValueError(f"{uid!r} is not a valid UID"))
        return self._run(self._deliver_blocking, avatar_id, message, folder, uid)

    def folders(self, avatar_id: str) -> Deferred:
        """
        @return: a L{Deferred} firing with the sorted Maildir++ folder names
            (C{Sent}, C{Lists.python}, ...); none if the Maildir is missing.
        """
        return self._run(self._folders_blocking, avatar_id)

    def _run(self, function: Callable[..., Any], *args: Any) -> Deferred:
        """
        Run blocking C{function} in the thread pool (see L{BlockingRunner}).
        """
        return self._runner.run(function, *args)

    def _cached(
        self, avatar_id: str, folder: str | None
    ) -> tuple[str, _Snapshot] | None:
        """
        The Maildir of C{avatar_id} (or C{folder}) and its snapshot in
        memory, if there is one.
        """
        if self._snapshots is None:
            return None
        try:
            root = self._maildir_path(avatar_id, folder)
        except MaildropError:
            # The thread pool path says what is wrong.
            return None
        previous = self._snapshots.get(root)
        return None if previous is None else (root, previous)

    def _open_blocking(
        self, avatar_id: str, folder: str | None, lock: MaildropLock | None
    ) -> MaildirMaildrop:
        """
        Open in the thread pool, with the session lock if it is held already.
        """
        try:
            root = self._prepared_maildir(avatar_id, folder, for_delivery=False)
            if lock is None:
                lock = acquire_lock(os.path.join(root, LOCK_FILE))
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        try:
            snapshot = _snapshot(root, self._dovecot, self._snapshots, self._index)
        except BaseException:
            lock.release()
            raise
        index = self._index and snapshot.worth_saving
        if index or snapshot.unsaved_sizes is not None:
            # For the other worker processes and the next start: the
            # session need not wait for it.
            snapshot.saved = snapshot.saved or index
            sizes, snapshot.unsaved_sizes = snapshot.unsaved_sizes, None
            self._run(_save_snapshot, root, snapshot, index, sizes).addErrback(
                _not_saved
            )
        return MaildirMaildrop(root, snapshot, lock, self._run)

    def _deliver_blocking(
        self,
        avatar_id: str,
        message: bytes | BinaryIO,
        folder: str | None,
        uid: str | None,
    ) -> str:
        root = self._prepared_maildir(avatar_id, folder, for_delivery=True)
        if uid is None:
            return _deliver(root, message)
        return _deliver_with_uid(root, message, uid, self._dovecot)

    def _folders_blocking(self, avatar_id: str) -> list[str]:
        root = self._maildir_path(avatar_id, None)
        try:
            with os.scandir(root) as scan:
                entries = list(scan)
        except FileNotFoundError:
            return []
        return sorted(
            entry.name[1:]
            for entry in entries
            if _is_folder_name(entry.name)
            and entry.is_dir(follow_symlinks=False)
            and _is_maildir(entry.path)
        )

    def _prepared_maildir(
        self, avatar_id: str, folder: str | None, *, for_delivery: bool
    ) -> str:
        """
        The Maildir to use, created first if allowed: the user's own on open
        and delivery, a folder only on delivery.

        @raise NoSuchUser: the Maildir is missing and may not be created.
        @raise NoSuchFolder: the folder is missing and may not be created.
        """
        root = self._maildir_path(avatar_id, folder)
        if _is_maildir(root):
            return root
        if _is_root(folder):
            if not self._create:
                raise NoSuchUser(f"no Maildir for {avatar_id!r}")
        elif not (self._create and for_delivery):
            raise NoSuchFolder(f"no folder {folder!r} for {avatar_id!r}")
        else:
            # A Maildir++ folder only exists inside a Maildir.
            self._prepared_maildir(avatar_id, None, for_delivery=True)
        _make_maildir(root, is_folder=not _is_root(folder))
        return root

    def _maildir_path(self, avatar_id: str, folder: str | None) -> str:
        """
        The Maildir of C{avatar_id}, or of one of its folders.

        @raise NoSuchUser: the user name is not a safe path component.
        @raise NoSuchFolder: the folder name is not.
        """
        try:
            root = expand_path(self._template, avatar_id)
        except UnsafeNameError as e:
            raise NoSuchUser(str(e)) from None
        if _is_root(folder):
            return root
        try:
            validate_folder_name(folder)
        except UnsafeNameError as e:
            raise NoSuchFolder(str(e)) from None
        return os.path.join(root, "." + folder)


@implementer(IMaildrop)
class MaildirMaildrop:
    """
    An open, locked Maildir: the snapshot taken at open, in delivery order.

    Opening a message, and a commit that changes nothing on disk, run on
    the caller's thread: each is a few system calls whatever the size of
    the Maildir, as reading the message is.  Looking for a message another
    program moved, and commits that write, run in the thread pool.
    """

    def __init__(
        self,
        root: str,
        snapshot: _Snapshot,
        lock: MaildropLock,
        run: Callable[..., Deferred],
    ) -> None:
        self.root = root
        self.messages = snapshot.infos
        self._snapshot = snapshot
        self._lock = lock
        self._run = run
        self._closed = False

    def read(self, index: int) -> Deferred:
        """
        Open message C{index} for reading, following it if another program
        moved it to C{cur/} or changed its flags.

        @return: a L{Deferred} firing with a binary file the caller closes.
        @raise IndexError: C{index} is not in the snapshot.
        """
        message = self._message(index)
        if self._closed:
            return fail(MaildropError("the maildrop is closed"))
        try:
            return succeed(_open_message(message.path))
        except FileNotFoundError:
            return self._run(self._read_moved, message)
        except OSError as error:
            return fail(unavailable(error))

    def commit(self, deleted: Iterable[int], retrieved: Iterable[int] = ()) -> Deferred:
        """
        Record first-retrieval times of the messages at C{retrieved}, remove
        those at C{deleted}, make that durable, then release the lock (also
        on error).  Once closed, further calls do nothing.

        @raise IndexError: an index is not in the snapshot.
        """
        doomed = [self._message(index) for index in sorted(set(deleted))]
        fetched = [self._message(index) for index in sorted(set(retrieved))]
        if self._closed:
            return succeed(None)
        self._closed = True
        first_fetched = [m for m in fetched if m.info.retrieved_at is None]
        if not doomed and not first_fetched:
            return self._release_now()
        return self._run(self._commit_blocking, doomed, first_fetched)

    def release(self) -> Deferred:
        """
        Release the lock, changing nothing.  Once closed, does nothing.
        """
        if self._closed:
            return succeed(None)
        self._closed = True
        return self._release_now()

    def _release_now(self) -> Deferred:
        try:
            self._lock.release()
        except OSError as error:
            return fail(unavailable(error))
        return succeed(None)

    def _message(self, index: int) -> _Message:
        if not 0 <= index < len(self.messages):
            raise IndexError(f"no message at index {index}")
        return self._snapshot.message(index)

    def _read_moved(self, message: _Message) -> BinaryIO:
        """
        Open a message that is no longer where the snapshot saw it.
        """
        path = _find(self.root, message.base)
        if path is None:
            raise MaildropError(
                f"message {message.info.uid} was removed by another program"
            )
        self._snapshot.paths[message.index] = path
        return _open_message(path)

    def _commit_blocking(self, doomed: list[_Message], fetched: list[_Message]) -> None:
        try:
            _record_retrievals(self.root, self._snapshot.bases(), doomed, fetched)
            for message in doomed:
                _remove(self.root, message)
            if doomed:
                for subdir in ("new", "cur"):
                    _fsync_directory(os.path.join(self.root, subdir))
                _prune_uid_map(self.root)
        finally:
            self._lock.release()


def _is_root(folder: str | None) -> bool:
    """
    Whether C{folder} names the Maildir itself: C{None} or any case of
    C{INBOX}.
    """
    return folder is None or folder.upper() == "INBOX"


def _is_folder_name(name: str) -> bool:
    if not name.startswith("."):
        return False
    try:
        validate_folder_name(name[1:])
    except UnsafeNameError:
        return False
    return True


def _is_maildir(path: str) -> bool:
    return all(os.path.isdir(os.path.join(path, sub)) for sub in _SUBDIRS)


def _make_maildir(root: str, *, is_folder: bool) -> None:
    """
    Create a Maildir (mode 0700) and make the new directories durable; a
    Maildir++ folder also gets its C{maildirfolder} marker file.
    """
    os.makedirs(root, _MODE, exist_ok=True)
    for sub in _SUBDIRS:
        with contextlib.suppress(FileExistsError):
            os.mkdir(os.path.join(root, sub), _MODE)
    if is_folder:
        marker = os.open(
            os.path.join(root, "maildirfolder"), os.O_WRONLY | os.O_CREAT, 0o600
        )
        os.close(marker)
    _fsync_directory(root)
    _fsync_directory(os.path.dirname(root))


@dataclass(slots=True)
class _Snapshot:
    """
    What one look at a Maildir found, with the stamps of what it was built
    from (see L{popd.maildrops.snapshot_cache}).

    @ivar directories: the stamps of C{new/} and C{cur/}.
    @ivar tables: the stamps of C{popd-uids}, C{dovecot-uidlist} (when
        read) and C{popd-retrieved}.
    @ivar paths: where each message was last seen, in delivery order (a
        session that finds one moved updates it).
    @ivar infos: their L{MessageInfo}s, as a session lists them.
    """

    directories: tuple[Stamp, Stamp]
    directories_settled: bool
    tables: tuple[Stamp, Stamp, Stamp]
    tables_settled: bool
    paths: list[str]
    infos: tuple[MessageInfo, ...]
    #: Whether C{popd-index} holds this snapshot (or is being written).
    saved: bool = False
    #: Sizes read for this snapshot, not yet in C{popd-sizes}.
    unsaved_sizes: _SizeCache | None = None

    @property
    def worth_saving(self) -> bool:
        """
        Whether to write this snapshot to C{popd-index}: it is not there yet
        and another process could reuse it.
        """
        return not self.saved and self.directories_settled and self.tables_settled

    def message(self, index: int) -> _Message:
        path = self.paths[index]
        return _Message(index, _base_of(path), path, self.infos[index])

    def bases(self) -> list[str]:
        return [_base_of(path) for path in self.paths]

    def listing_reusable(self, directories: tuple[Stamp, Stamp]) -> bool:
        return self.directories_settled and self.directories == directories

    def reusable(
        self, directories: tuple[Stamp, Stamp], tables: tuple[Stamp, Stamp, Stamp]
    ) -> bool:
        return (
            self.listing_reusable(directories)
            and self.tables_settled
            and self.tables == tables
        )


def _snapshot(
    root: str,
    dovecot: _DovecotUidl | None = None,
    cache: BoundedCache[str, _Snapshot] | None = None,
    index: bool = False,
) -> _Snapshot:
    """
    List the messages in C{new/} and C{cur/} with their UIDs, CRLF sizes
    and retrieval times, in delivery order.

    With a C{cache} (or, failing that, with C{index}: the one in
    C{popd-index}), a snapshot of an unchanged Maildir is reused whole;
    when only popd's files changed, the directory listing and sizes are;
    otherwise the sizes of messages seen before are.
    """
    looked_at, directories, tables = _stamps(root, dovecot)
    previous = cache.get(root) if cache is not None else None
    if previous is None and index:
        previous = _load_index(root)
    if previous is not None and previous.reusable(directories, tables):
        if cache is not None:
            cache.put(root, previous)
        return previous
    records = dovecot.records(root) if dovecot is not None else {}
    sizes = None
    if previous is not None and previous.listing_reusable(directories):
        found = [
            (_base_of(path), path, info.size)
            for path, info in zip(previous.paths, previous.infos, strict=True)
        ]
    else:
        known = None
        if previous is not None:
            known = {
                base: info.size
                for base, info in zip(previous.bases(), previous.infos, strict=True)
                if _size_from_name(base) is None
            }
        found, sizes = _listing(root, records, known)
    retrieved = _retrieval_times(root)
    uids = _assign_uids(root, [base for base, _, _ in found], dovecot, records)
    snapshot = _Snapshot(
        directories,
        is_settled(directories, looked_at),
        tables,
        is_settled(tables, looked_at),
        [path for _, path, _ in found],
        _message_infos(
            zip(
                [uids[base] for base, _, _ in found],
                [size for _, _, size in found],
                [retrieved.get(base) for base, _, _ in found],
                strict=True,
            )
        ),
        unsaved_sizes=sizes if sizes is not None and sizes.changed else None,
    )
    if cache is not None:
        cache.put(root, snapshot)
    return snapshot


#: Makes a MessageInfo of a row of three in C: MessageInfo's own __new__
#: (and _make) are Python functions, a tenth of a second for 100,000.
_message_info = partial(tuple.__new__, MessageInfo)


def _message_infos(rows: Iterable[Iterable[Any]]) -> tuple[MessageInfo, ...]:
    """
    A L{MessageInfo} of each row of C{(uid, size, retrieved_at)}.  A row
    of another length makes a MessageInfo of that length: check where rows
    come from outside.
    """
    return tuple(map(_message_info, rows))


def _load_index(root: str) -> _Snapshot | None:
    """
    The snapshot saved in C{popd-index}, or C{None} if there is none or it
    is not in the form L{_save_index} writes (the file only saves time, and
    belongs to whoever owns the Maildir: it is checked, never trusted).
    """
    try:
        with open(os.path.join(root, INDEX_FILE), "rb") as index_file:
            data = index_file.read().decode("utf-8", "surrogateescape")
        version, directories, tables, names, rows = json.loads(data)
        if version != _INDEX_VERSION or len(directories) != 2 or len(tables) != 3:
            return None
        if len(names) != len(rows) or not _indexed_names_valid(names):
            return None
        infos = _message_infos(rows)
        if not all(len(info) == 3 for info in infos):
            return None
        if not _indexed_infos_valid(infos):
            return None
        return _Snapshot(
            (_indexed_stamp(directories[0]), _indexed_stamp(directories[1])),
            True,
            tuple(_indexed_stamp(stamp) for stamp in tables),
            True,
            [root + os.sep + name for name in names],
            infos,
            saved=True,
        )
    except (OSError, ValueError, TypeError):
        return None


def _indexed_stamp(stamp: Any) -> Stamp:
    if stamp is None:
        return None
    if len(stamp) != 4 or not all(type(field) is int for field in stamp):
        raise ValueError("not a stamp")
    return tuple(stamp)


def _indexed_names_valid(names: list[Any]) -> bool:
    """
    Whether every name is C{new/<name>} or C{cur/<name>}, the name not
    starting with a dot and holding no slash, LF or NUL.
    """
    return _every_line_matches(_INDEX_NAMES, names)


def _indexed_infos_valid(infos: tuple[MessageInfo, ...]) -> bool:
    """
    Whether every UID could be a UIDL, every size is a count and every
    retrieval time a number or C{None}.
    """
    uids = [info.uid for info in infos]
    return (
        _all_valid_uids(uids)
        and len(set(uids)) == len(uids)
        and all(type(info.size) is int and info.size >= 0 for info in infos)
        and all(
            info.retrieved_at is None or type(info.retrieved_at) in (int, float)
            for info in infos
        )
    )


def _save_index(root: str, snapshot: _Snapshot) -> None:
    """
    Write C{snapshot} to C{popd-index}, replacing it atomically; no fsync:
    losing it only costs a scan.  Several processes may write at once.
    """
    start = len(root) + 1
    data = json.dumps(
        [
            _INDEX_VERSION,
            snapshot.directories,
            snapshot.tables,
            [path[start:] for path in snapshot.paths],
            [(info.uid, info.size, info.retrieved_at) for info in snapshot.infos],
        ],
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8", "surrogateescape")
    _replace_file(os.path.join(root, INDEX_FILE), data, durable=False)


def _save_snapshot(
    root: str, snapshot: _Snapshot, index: bool, sizes: _SizeCache | None
) -> None:
    """
    Keep what a scan found for next time: sizes it read in C{popd-sizes},
    and the whole snapshot in C{popd-index} if C{index}.
    """
    if sizes is not None:
        sizes.save_if_changed(snapshot.bases())
    if index:
        _save_index(root, snapshot)


def _not_saved(failure: Any) -> None:
    """
    A failure to write C{popd-index} or C{popd-sizes} is not worth a
    session: the next login scans or reads instead.  Only the unexpected is
    logged.
    """
    if not failure.check(MaildropError):
        _log.failure("saving a Maildir's snapshot", failure)


def _stamps(
    root: str, dovecot: _DovecotUidl | None
) -> tuple[float, tuple[Stamp, Stamp], tuple[Stamp, Stamp, Stamp]]:
    """
    When the sources of a snapshot are looked at, and their stamps: those
    of the directories, and of popd's and Dovecot's files.
    """
    looked_at = time.time()
    directories = (
        file_stamp(os.path.join(root, "new")),
        file_stamp(os.path.join(root, "cur")),
    )
    tables = (
        file_stamp(os.path.join(root, UID_MAP_FILE)),
        file_stamp(os.path.join(root, DOVECOT_UIDLIST_FILE)) if dovecot else None,
        file_stamp(os.path.join(root, RETRIEVED_FILE)),
    )
    return looked_at, directories, tables


def _listing(
    root: str, records: dict[str, dict[str, str]], known: dict[str, int] | None
) -> tuple[list[tuple[str, str, int]], _SizeCache]:
    """
    The C{(base name, path, CRLF size)} of each message in delivery order.

    A size comes from the name's C{,W=} field, else C{known} (sizes seen
    by an earlier snapshot) or the C{popd-sizes} file, else Dovecot's
    record, else reading the message; sizes read are for C{popd-sizes}
    (L{_SizeCache.save_if_changed}, which the caller runs once the session
    has its snapshot).  A message that vanishes meanwhile is left out.
    """
    cache = _SizeCache(os.path.join(root, SIZE_CACHE_FILE), known)
    found = []
    for _, base, path in sorted(_scan(root)):
        size = _size_from_name(base)
        if size is None:
            size = cache.get(base)
        if size is None and base in records:
            size = _DovecotUidl.vsize(records[base])
        if size is None:
            size = _computed_size(path)
            if size is None:
                continue
            cache.put(base, size)
        found.append((base, path, size))
    return found, cache


def _retrieval_times(root: str) -> dict[str, float]:
    """
    When each message was first retrieved, by base name, from
    C{popd-retrieved}; a malformed line counts as never.
    """
    table = _load_table(os.path.join(root, RETRIEVED_FILE), _RETRIEVED_HEADER) or {}
    return {base: float(value) for base, value in table.items() if value.isdigit()}


def _assign_uids(
    root: str,
    bases: Iterable[str],
    dovecot: _DovecotUidl | None,
    records: dict[str, dict[str, str]],
) -> dict[str, str]:
    """
    The UID of each message by base name: given, Dovecot's, or its own
    (see the module docstring), never the same for two messages.
    """
    given = _load_uid_map(root)
    bases = list(bases)
    if not given and not records and _all_valid_uids(bases):
        # The usual case, and a hundred thousand times cheaper in one
        # regular expression: every base name is its own UID (the scan
        # lists each once).
        return dict(zip(bases, bases, strict=True))
    used: set[str] = set()
    uids = {}
    for base in bases:
        uid = given.get(base)
        if uid is None or uid in used:
            record = records.get(base)
            uid = dovecot.uidl(record) if dovecot and record else None
        if uid is None or uid in used:
            uid = uid_for(base)
        if uid in used:
            uid = hashlib.sha1(os.fsencode(base)).hexdigest()
        if uid in used:
            raise MaildropError(f"message {base!r} has no UID of its own")
        used.add(uid)
        uids[base] = uid
    return uids


def _all_valid_uids(names: list[str]) -> bool:
    """
    Whether every name could be a UIDL (L{is_valid_uid}).
    """
    return _every_line_matches(_UIDL_LINES, names)


def _every_line_matches(lines_pattern: re.Pattern, items: list[str]) -> bool:
    """
    Whether each of C{items} (none holding a LF) is one line of
    C{lines_pattern}, which matches LF-terminated lines: one regular
    expression over them all, where a hundred thousand checks one by one
    would be most of the time a login to a large Maildir takes.

    @raise TypeError: an item is not a C{str}.
    """
    if not items:
        return True
    joined = "\n".join(items)
    return (
        joined.count("\n") == len(items) - 1
        and lines_pattern.fullmatch(joined + "\n") is not None
    )


def _scan(root: str) -> list[tuple[int, str, str]]:
    """
    The C{(timestamp, base name, path)} of each message, which sorts in
    delivery order: by the leading number of the name, then by the name.

    Skips dot files, anything that is not a regular file (symbolic links
    included) and a second file with a base name already seen.
    """
    seen = set()
    found = []
    for sub in ("new", "cur"):
        with os.scandir(os.path.join(root, sub)) as entries:
            for entry in entries:
                name = entry.name
                if name[0] == "." or not entry.is_file(follow_symlinks=False):
                    continue
                base = name.partition(":")[0]
                if base in seen:
                    continue
                seen.add(base)
                found.append((_timestamp(base), base, entry.path))
    return found


def _timestamp(base: str) -> int:
    """
    The leading number of a base name (its delivery time), or 0.
    """
    head = base.partition(".")[0]
    if head.isascii() and head.isdigit():
        return int(head)
    match = _LEADING_NUMBER.match(base)
    return int(match.group()) if match else 0


def _size_from_name(base: str) -> int | None:
    """
    The CRLF size from a Dovecot C{,W=<size>} field, if the name has one.
    """
    if ",W=" not in base:
        return None
    match = _W_FIELD.search(base)
    return int(match.group(1)) if match else None


def _computed_size(path: str) -> int | None:
    """
    The CRLF size of a message by reading it, or C{None} if it vanished or
    is not a regular file.  A message shorter than L{CHUNK_SIZE} (most are)
    costs an open, a read and a close: a first login to a large Maildir
    does this for every message.  There is no C{fstat}: C{O_NOFOLLOW}
    refuses a symbolic link, C{O_NONBLOCK} keeps a FIFO from blocking, and
    reading a directory fails; only a size is learnt.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        raise
    try:
        data = os.read(fd, CHUNK_SIZE)
        if len(data) < CHUNK_SIZE:
            return wire_size(data)
        counter = WireSizeCounter()
        counter.feed(data)
        while chunk := os.read(fd, CHUNK_SIZE):
            counter.feed(chunk)
        return counter.size
    except OSError as e:
        if e.errno in (errno.EISDIR, errno.EAGAIN):
            return None
        raise
    finally:
        os.close(fd)


class _NotRegularFileError(OSError):
    """
    A message path leads to a symbolic link, a directory or a device.
    """


def _open_message(path: str) -> BinaryIO:
    """
    Open a message for reading, refusing symbolic links and anything that is
    not a regular file: a user with shell access must not be able to read
    other files through popd.  C{O_NONBLOCK} keeps a FIFO put in the
    message's place from blocking the open; it changes nothing for a
    regular file.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _NotRegularFileError(errno.ELOOP, "not a regular file", path) from e
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _NotRegularFileError(errno.EINVAL, "not a regular file", path)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _find(root: str, base: str) -> str | None:
    """
    Where the message with base name C{base} is now, if anywhere.
    """
    for _, found_base, path in _scan(root):
        if found_base == base:
            return path
    return None


def _remove(root: str, message: _Message) -> None:
    """
    Unlink one message, wherever it moved; one already gone is fine.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(message.path)
        return
    path = _find(root, message.base)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _deliver(
    root: str,
    message: bytes | BinaryIO,
    before_link: Callable[[str], None] | None = None,
) -> str:
    """
    Write C{message} to C{tmp/}, sync it, link it into C{new/} with its
    stored (C{S=}) and CRLF (C{W=}) sizes in the name, and sync C{new/}.

    @param before_link: called with the base name once the message is
        durable in C{tmp/}, before it becomes visible in C{new/}.
    @return: the UID of the new message (its own, see L{uid_for}).
    """
    unique = _unique_name()
    tmp_path = os.path.join(root, "tmp", unique)
    try:
        stored, crlf = _write_synced(tmp_path, message)
        base = f"{unique},S={stored},W={crlf}"
        if before_link is not None:
            before_link(base)
        _link_or_rename(tmp_path, os.path.join(root, "new", base))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise
    # The message is in new/ now: a leftover tmp/ file is harmless, while
    # failing here would make the sender deliver it twice.
    with contextlib.suppress(OSError):
        os.unlink(tmp_path)
    _fsync_directory(os.path.join(root, "new"))
    return uid_for(base)


def _deliver_with_uid(
    root: str, message: bytes | BinaryIO, uid: str, dovecot: _DovecotUidl | None
) -> str:
    """
    Deliver C{message} keeping the UID C{uid}, recorded in C{popd-uids}
    before the message shows in C{new/}.

    @raise ValueError: a message of this Maildir already has that UID.
    """
    with _uid_map_lock(root):
        bases = [base for _, base, _ in _scan(root)]
        records = dovecot.records(root) if dovecot is not None else {}
        in_use = set(_assign_uids(root, bases, dovecot, records).values())
        in_use.update(_load_uid_map(root).values())
        if uid in in_use:
            raise ValueError(f"UID {uid!r} is already in use")

        def record(base: str) -> None:
            table = _load_uid_map(root)
            table[base] = uid
            _save_table(os.path.join(root, UID_MAP_FILE), _UID_MAP_HEADER, table)

        _deliver(root, message, record)
    return uid


@contextlib.contextmanager
def _uid_map_lock(root: str) -> Iterator[None]:
    """
    Hold C{popd-uids.lock} (waiting for it): the short lock over changes to
    C{popd-uids}, apart from the session lock so that delivery never waits
    for a session.
    """
    flags = os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(os.path.join(root, UID_MAP_LOCK_FILE), flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_uid_map(root: str) -> dict[str, str]:
    """
    The given UIDs by base name, from C{popd-uids}.

    @raise MaildropError: the file is in a format this popd does not know;
        ignoring it would change UIDs.
    """
    path = os.path.join(root, UID_MAP_FILE)
    table = _load_table(path, _UID_MAP_HEADER)
    if table is None:
        raise MaildropError(f"{path} is not in a format popd knows")
    return {base: uid for base, uid in table.items() if is_valid_uid(uid)}


def _prune_uid_map(root: str) -> None:
    """
    Drop the lines of messages that are gone from C{popd-uids}.
    """
    path = os.path.join(root, UID_MAP_FILE)
    if not os.path.exists(path):
        return
    with _uid_map_lock(root):
        table = _load_uid_map(root)
        live = {base for _, base, _ in _scan(root)}
        kept = {base: uid for base, uid in table.items() if base in live}
        if kept != table:
            _save_table(path, _UID_MAP_HEADER, kept)


def _record_retrievals(
    root: str, bases: list[str], doomed: list[_Message], fetched: list[_Message]
) -> None:
    """
    Rewrite C{popd-retrieved} if a message was retrieved for the first time
    or lines of messages that are gone can be dropped.
    """
    path = os.path.join(root, RETRIEVED_FILE)
    old = _load_table(path, _RETRIEVED_HEADER) or {}
    gone = {message.base for message in doomed}
    table = {base: old[base] for base in bases if base in old and base not in gone}
    now = str(int(time.time()))
    for message in fetched:
        if message.base not in gone:
            table.setdefault(message.base, now)
    if table != old:
        _save_table(path, _RETRIEVED_HEADER, table)


def _write_synced(path: str, message: bytes | BinaryIO) -> tuple[int, int]:
    """
    Write C{message} to a new file and fsync it.

    @return: the octets written and their CRLF size.
    """
    counter = WireSizeCounter()
    stored = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        for chunk in _chunks(message):
            counter.feed(chunk)
            stored += len(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return stored, counter.size


def _chunks(message: bytes | BinaryIO) -> Iterator[bytes]:
    if isinstance(message, bytes | bytearray):
        yield message
    else:
        yield from iter(lambda: message.read(CHUNK_SIZE), b"")


def _link_or_rename(source: str, target: str) -> None:
    """
    Hard-link C{source} to C{target} (which never overwrites), falling back
    to a rename on filesystems without hard links.
    """
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno not in _NO_LINK_ERRNOS:
            raise
        os.rename(source, target)


def _unique_name() -> str:
    """
    A new Maildir name: C{<seconds>.M<usec>P<pid>Q<count>R<random>.<host>},
    unique across processes, hosts and a reused process id.
    """
    seconds, usec = divmod(time.time_ns() // 1000, 1_000_000)
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
    count = next(_delivery_counter)
    random = os.urandom(4).hex()
    return f"{seconds}.M{usec:06d}P{os.getpid()}Q{count}R{random}.{host}"


def _load_table(path: str, header: bytes) -> dict[str, str] | None:
    """
    Read one of popd's files: C{header}, then C{<base name> <value>} lines.

    @return: the values by base name (empty if the file is missing), or
        C{None} if the file does not start with C{header} or has a
        malformed line.  A last line without its LF, cut off by a crash,
        is ignored.
    """
    try:
        with open(path, "rb") as table_file:
            data = table_file.read()
    except FileNotFoundError:
        return {}
    if not data.startswith(header):
        return None
    text = data[len(header) :].decode(_FS_ENCODING, _FS_ERRORS)
    table = {}
    for line in text.split("\n")[:-1]:
        name, _, value = line.rpartition(" ")
        if not name or not value:
            return None
        table[name] = value
    return table


def _tmp_path(path: str) -> str:
    """
    Where to write a new C{path} before renaming it over: a name of this
    process and thread's own, as two workers may save the same file.
    """
    return f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"


def _save_table(path: str, header: bytes, table: dict[str, str]) -> None:
    """
    Replace one of popd's files atomically and durably.  Names containing
    a LF cannot be kept and are left out.
    """
    lines = [header]
    lines += [
        b"%s %s\n" % (os.fsencode(name), os.fsencode(value))
        for name, value in table.items()
        if "\n" not in name
    ]
    _replace_file(path, b"".join(lines), durable=True)


def _replace_file(path: str, data: bytes, *, durable: bool) -> None:
    """
    Replace C{path} with C{data} atomically: written to a file of its own
    and renamed over.  C{durable}: fsync the file before, and its
    directory after.
    """
    tmp_path = _tmp_path(path)
    try:
        with open(tmp_path, "wb") as out:
            out.write(data)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise
    if durable:
        _fsync_directory(os.path.dirname(path))


class _SizeCache:
    """
    The C{popd-sizes} file: C{<base name> <size>} lines.  A malformed line
    makes the whole cache count as empty, so it is rebuilt.

    @param known: sizes already known (from a snapshot in memory): the
        file is only read for a message not among them.
    """

    def __init__(self, path: str, known: dict[str, int] | None = None) -> None:
        self._path = path
        self._sizes = dict(known or ())
        self._loaded = False
        self._changed = False

    def get(self, base: str) -> int | None:
        size = self._sizes.get(base)
        if size is None and not self._loaded:
            self._loaded = True
            self._sizes = self._load() | self._sizes
            size = self._sizes.get(base)
        return size

    def put(self, base: str, size: int) -> None:
        if "\n" not in base:
            self._sizes[base] = size
            self._changed = True

    @property
    def changed(self) -> bool:
        """
        Whether sizes were added since the file was read.
        """
        return self._changed

    def save_if_changed(self, live: Iterable[str]) -> None:
        """
        If sizes were added, rewrite the file atomically, keeping only the
        entries of C{live} base names.  A failure to write is ignored: the
        cache only saves time.
        """
        if not self._changed:
            return
        table = {base: str(self._sizes[base]) for base in live if base in self._sizes}
        with contextlib.suppress(OSError):
            _save_table(self._path, _SIZE_CACHE_HEADER, table)

    def _load(self) -> dict[str, int]:
        table = _load_table(self._path, _SIZE_CACHE_HEADER)
        if table is None or not all(size.isdigit() for size in table.values()):
            return {}
        return {base: int(size) for base, size in table.items()}


class _DovecotUidl:
    """
    What Dovecot's C{dovecot-uidlist} says about a Maildir's messages: the
    POP3 UIDL Dovecot gave each, and its CRLF ("virtual") size when known.

    The file (version 3, Dovecot 1.1 and later) starts with a header line
    C{3 V<uidvalidity> N<next uid> G<mailbox guid> ...}: fields of a key
    letter and a value, in any order.  Each further line is C{<uid>
    [<key><value> ...] :<file name>}: C{P} is a POP3 UIDL overriding the
    format, C{W} the size with CRLF line endings, C{G} the message GUID,
    C{S} the stored size, C{O} the POP3 order.  The file name is matched by
    its base (before the flags' C{:}), as Dovecot does.  Version 1
    (Courier's C{courierimapuiddb} format) is C{1 <uidvalidity> <next uid>},
    then C{<uid> <file name>}.  A line that does not parse is skipped.

    It is read afresh at each open, like the directories themselves.
    """

    _FIELD = re.compile(r"%(0?)([0-9]*)([xX]?)([uvgf%])")

    def __init__(self, uidl_format: str) -> None:
        rest = self._FIELD.sub("", uidl_format)
        if "%" in rest or not uidl_format:
            raise ValueError(
                f"Dovecot UIDL format {uidl_format!r}: use %u, %v, %g, %f and %%"
                " (with an optional width and X or x)"
            )
        self._format = uidl_format

    def records(self, root: str) -> dict[str, dict[str, str]]:
        """
        The records of the Maildir's C{dovecot-uidlist} by base name (see
        L{parse_dovecot_uidlist}); none if it has none.
        """
        try:
            with open(os.path.join(root, DOVECOT_UIDLIST_FILE), "rb") as uidlist:
                return parse_dovecot_uidlist(uidlist.read())
        except FileNotFoundError:
            return {}

    def uidl(self, record: dict[str, str]) -> str | None:
        """
        The UIDL Dovecot gave the message of C{record}, if a valid one.
        """
        uidl = record.get("P") or self._formatted(record)
        return uidl if is_valid_uid(uidl) else None

    @staticmethod
    def vsize(record: dict[str, str]) -> int | None:
        size = record.get("W", "")
        return int(size) if size.isdigit() else None

    def _formatted(self, record: dict[str, str]) -> str:
        def field(match: re.Match) -> str:
            zero, width, radix, key = match.groups()
            if key == "%":
                return "%"
            if key in "uv":
                return format(int(record[key]), f"{zero}{width}{radix or 'd'}")
            value = (record.get("G") or record["f"]) if key == "g" else record["f"]
            return value.rjust(int(width or 0), "0" if zero else " ")

        return self._FIELD.sub(field, self._format)


def parse_dovecot_uidlist(data: bytes) -> dict[str, dict[str, str]]:
    """
    Parse a C{dovecot-uidlist} (see L{_DovecotUidl}).

    @return: by base name, the record's fields by key letter, plus C{u}
        (the IMAP UID), C{v} (the UIDVALIDITY) and C{f} (the base name).
        Empty for a file in a version this does not know or without a
        UIDVALIDITY.
    """
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    header = lines[0].split(" ")
    version, fields = header[0], header[1:]
    if version == "3":
        values = {field[:1]: field[1:] for field in fields if field}
        validity = values.get("V", "")
    elif version == "1" and len(fields) >= 2:
        validity = fields[0]
    else:
        return {}
    if not validity.isdigit() or int(validity) == 0:
        return {}
    records = {}
    for line in lines[1:]:
        uid, _, rest = line.partition(" ")
        if not uid.isdigit() or int(uid) == 0:
            continue
        record = {"u": uid, "v": validity}
        rest = rest.lstrip(" ")
        if version == "3":
            while rest and not rest.startswith(":"):
                field, _, rest = rest.partition(" ")
                rest = rest.lstrip(" ")
                if "A" <= field[:1] <= "Z":
                    record.setdefault(field[:1], field[1:])
            rest = rest[1:]
        if not rest or "/" in rest:
            continue
        base = base_name(rest)
        record["f"] = base
        records[base] = record
    return records
