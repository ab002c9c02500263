"""
The mbox store: one file per maildrop (C{/var/mail/%u}, say), shared with
the MTA that appends to it and with mail readers, and folders as more mbox
files in a per-user directory.

The file format, the quoting variants, how message boundaries are found and
how UIDs are derived are described in L{popd.maildrops.mboxfile}.  Every
filesystem call runs in a thread pool, never on the reactor thread.

Locking
=======

Two kinds of lock, for two different jobs:

  - The I{session lock} keeps a maildrop to one POP3 session at a time
    (C{[IN-USE]}): C{flock} on C{<mbox>.popd-lock}
    (L{popd.maildrops.locking}), held from open to commit or release.  MTAs
    know nothing of it, so a session never delays delivery.
  - The I{MTA lock}, a dot-lock C{<mbox>.lock} plus a C{fcntl} write lock on
    the mbox (L{popd.maildrops.dotlock}), is what Postfix and Exim take
    while they append.  popd takes it only briefly: while it indexes the
    file at open, while it appends (deliver), while it looks again after
    another program changed the file, and while it rewrites the file at
    commit.  Holding it for a whole session would hold up delivery for
    minutes.  Waiting for it is bounded by C{lock_timeout} (15 seconds by
    default); a dot-lock older than C{stale_lock_seconds} (300 by default;
    Postfix's C{stale_lock_time} is 500) is broken.

The session lock is always taken before the MTA lock, and nothing holding
the MTA lock waits for a session lock, so the two never deadlock.

Snapshots
=========

At open popd indexes the file as it is under the MTA lock: the snapshot is
the messages in the first I{n} octets, where I{n} is the size then.  Mail
appended later belongs to the next session.  popd keeps the file open and
remembers its identity (device, inode, size, modification and change
times); before serving a message it compares them with the file at the path
again.  If they differ (mail was appended, or a mail reader rewrote the
file) it indexes the file once more under the MTA lock and finds each
message of the snapshot again by UID; one that is gone, or whose size
changed, can no longer be read (L{MaildropError}).

Commit
======

Deleting rewrites the file, and never loses or corrupts mail, whenever the
process dies:

  1. Under the MTA lock the file is indexed again as it is now, so mail
     appended during the session (and changes other programs made) are
     seen.  The messages whose UIDs the session deleted are left out; if
     none is found, nothing is written.
  2. Every other message, including all mail appended after the snapshot,
     is copied octet for octet into C{.<name>.popd-new} in the same
     directory, which gets the mode and owner of the mbox (if the owner
     cannot be kept, nothing is deleted), and is fsynced.
  3. It is renamed over the mbox, and the directory is fsynced.  Only then
     is the MTA lock released.

Until the rename the mbox is untouched; the rename replaces it with a
complete, synced file at once.  A leftover C{.popd-new} file is removed by
the next commit.  No MTA can write between the index and the rename (it
waits for the locks), and one that waits for the dot-lock opens the file
only after getting it, so it opens the new file.  This relies on every
writer taking the dot-lock before opening the mbox, or checking after
locking that the file it opened is still the one at the path, as Postfix,
Exim, procmail and mutt do.  A rename also breaks a hard link to the mbox.

Appends
=======

A delivery appends under the MTA lock and fsyncs the mbox before it is
acknowledged.  A process killed in the middle of the append (or a power
cut before that fsync) would leave the first part of a message at the end
of the file, which would be served and then sealed in by the next
delivery.  So before writing, popd records durably in
C{.<name>.popd-append} next to it which file (device, inode) it appends
to and the
octets it is about to fill, and empties the record when done.  Whoever
takes the MTA lock next in popd finds a record that still applies (the
same file, ending inside that range, changed last within
C{stale_lock_seconds} of the record) and cuts the file back to where the
append began: an unfinished message is never visible.  Another MTA can
only write after breaking the dead process's dot-lock as stale, so the
age test keeps popd from ever cutting its mail; popd breaks a dead popd's
dot-lock at once and recovers first.  Where the record cannot be written
(a file of another user's), the append goes on as every mbox delivery
agent's does, unprotected.

Retrieval times
===============

C{commit(deleted, retrieved)} records when messages were first retrieved
in C{<mbox>.popd-retrieved} (a header line, then C{<uid> <seconds>} per
line), rewritten atomically (temporary file, fsync, rename), and only while
the session lock is held.  Entries of messages no longer in the maildrop
are dropped.  It is written before the mbox is rewritten, so a failed
rewrite can only lose times of messages that were to be deleted.

Sizes
=====

Sizes are computed at open by reading every message (undoing the quoting,
counting LF as CRLF); there is no size index, so opening a large mbox reads
it whole, as indexing it has to anyway.

Names
=====

User and folder names are checked by L{popd.maildrops.paths}.  Names that
would collide with the files popd or the MTAs keep next to an mbox (ending
in C{.lock}, C{.popd-lock}, C{.popd-retrieved}, or starting with a dot)
are refused, and are never listed as folders.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from popd.interfaces import (
    IMaildrop,
    IMaildropProvider,
    MaildropError,
    MessageInfo,
    NoSuchFolder,
    NoSuchUser,
)
from popd.maildrops import mboxfile
from popd.maildrops.dotlock import (
    DEFAULT_STALE_SECONDS,
    DEFAULT_TIMEOUT,
    LockedMailbox,
    locked_mailbox,
)
from popd.maildrops.locking import MaildropLock, acquire_lock
from popd.maildrops.mboxfile import (
    MboxFormatError,
    MboxMessage,
    MessageReader,
    Quoter,
    assign_uids,
    check_variant,
    envelope_sender,
    is_valid_uid,
    line_ending,
    popd_lines,
    scan,
)
from popd.maildrops.paths import (
    UnsafeNameError,
    check_template,
    expand_path,
    validate_folder_name,
)
from popd.maildrops.threads import BlockingRunner

LOCK_SUFFIX = ".popd-lock"
RETRIEVED_SUFFIX = ".popd-retrieved"
_RESERVED_SUFFIXES = (".lock", LOCK_SUFFIX, RETRIEVED_SUFFIX)
_APPEND_HEADER = b"popd-append 1 "
_RETRIEVED_HEADER = b"popd-retrieved 1\n"
_DIRECTORY_MODE = 0o700
_FILE_MODE = 0o600
#: Messages bigger than this are spooled to a temporary file on delivery.
_SPOOL_IN_MEMORY = 1024 * 1024


@implementer(IMaildropProvider)
class MboxProvider:
    """
    Opens and delivers into mbox files found by a path template (see
    L{popd.maildrops.paths.expand_path}), e.g. C{/var/mail/%u}.

    @param folder_dir_template: the directory holding a user's folders, one
        mbox file each (e.g. C{/var/mail/folders/%u}); C{None} for no
        folders.
    @param create: create a missing mbox (mode 0600) and its directory
        (mode 0700) on delivery; a missing mbox then opens as an empty
        maildrop.  Without it a missing mbox is L{NoSuchUser}.  Opening a
        missing folder is always L{NoSuchFolder}; delivering creates it.
    @param stale_lock_seconds: how old another program's dot-lock must be
        to be broken (default 300).
    @param lock_timeout: how long to wait for the MTA locks (default 15 s)
        before failing with L{MaildropUnavailable}.
    @param variant: C{"mboxrd"} (default) or C{"mboxo"}: how C{From } lines
        are quoted and unquoted (see L{popd.maildrops.mboxfile}).
    @param reactor: the reactor to report results on (default: the global
        one, looked up when first needed).
    @param threadpool: where blocking work runs (default: the reactor's).
    """

    def __init__(
        self,
        path_template: str,
        *,
        folder_dir_template: str | None = None,
        create: bool = True,
        stale_lock_seconds: int = DEFAULT_STALE_SECONDS,
        lock_timeout: float = DEFAULT_TIMEOUT,
        variant: str = "mboxrd",
        reactor: Any = None,
        threadpool: Any = None,
    ) -> None:
        check_template(path_template)
        if folder_dir_template is not None:
            check_template(folder_dir_template)
        self._template = path_template
        self._folder_template = folder_dir_template
        self._create = create
        self.variant = check_variant(variant)
        self._stale_seconds = stale_lock_seconds
        self._lock_timeout = lock_timeout
        self._runner = BlockingRunner(reactor, threadpool)

    def open(self, avatar_id: str, folder: str | None = None) -> Deferred:
        """
        Take the session lock and snapshot a user's mbox (or folder).

        @return: a L{Deferred} firing with an L{MboxMaildrop}.
        """
        return self._run(self._open_blocking, avatar_id, folder)

    def deliver(
        self,
        avatar_id: str,
        message: bytes | BinaryIO,
        folder: str | None = None,
        uid: str | None = None,
    ) -> Deferred:
        """
        Append a message under the MTA lock and fsync it; never waits for a
        session.

        @param message: C{bytes}, or a binary file read to its end (in the
            thread pool, before any lock is taken).
        @param uid: the UID to keep, or C{None} for a new one; it is
            written as the message's C{X-UIDL} header.
        @return: a L{Deferred} firing with the message's UID; failing with
            C{ValueError} for an invalid UID or one the mbox already has.
        """
        return self._run(self._deliver_blocking, avatar_id, message, folder, uid)

    def folders(self, avatar_id: str) -> Deferred:
        """
        @return: a L{Deferred} firing with the sorted names of the mbox
            files in the user's folder directory.
        """
        return self._run(self._folders_blocking, avatar_id)

    def mbox_path(self, avatar_id: str, folder: str | None = None) -> str:
        """
        The mbox file of a user's maildrop or folder.

        @raise NoSuchUser: the user name is not safe, or not usable here.
        @raise NoSuchFolder: the folder name is not, or there are no
            folders.
        """
        if _is_inbox(folder):
            try:
                path = expand_path(self._template, avatar_id)
            except UnsafeNameError as e:
                raise NoSuchUser(str(e)) from None
            if _is_reserved(os.path.basename(path)):
                raise NoSuchUser(f"user name {avatar_id!r} names a lock file")
            return path
        directory = self._folder_directory(avatar_id)
        try:
            validate_folder_name(folder)
        except UnsafeNameError as e:
            raise NoSuchFolder(str(e)) from None
        if _is_reserved(folder):
            raise NoSuchFolder(f"folder name {folder!r} names a lock file")
        return os.path.join(directory, folder)

    def _folder_directory(self, avatar_id: str) -> str:
        if self._folder_template is None:
            raise NoSuchFolder("this store has no folders")
        try:
            return expand_path(self._folder_template, avatar_id)
        except UnsafeNameError as e:
            raise NoSuchUser(str(e)) from None

    def _run(self, function: Callable[..., Any], *args: Any) -> Deferred:
        """
        Run blocking C{function} in the thread pool, a file that is not an
        mbox reported as L{MaildropError} (see L{BlockingRunner}).
        """
        return self._runner.run(_mbox_errors, function, *args)

    @contextlib.contextmanager
    def _locked(self, path: str, *, create: bool = False) -> Iterator[LockedMailbox]:
        """
        Hold the MTA lock, first undoing an append a dead process left
        unfinished (see L{_recover_append}).
        """
        with locked_mailbox(
            path,
            create=create,
            mode=_FILE_MODE,
            timeout=self._lock_timeout,
            stale_seconds=self._stale_seconds,
        ) as box:
            if box.fd >= 0:
                _recover_append(box, self._stale_seconds)
            yield box

    def _open_blocking(self, avatar_id: str, folder: str | None) -> MboxMaildrop:
        path = self.mbox_path(avatar_id, folder)
        directory = os.path.dirname(path)
        if not _is_inbox(folder):
            if not os.path.isfile(path):
                raise NoSuchFolder(f"no folder {folder!r} for {avatar_id!r}")
        elif not os.path.lexists(path):
            if not self._create:
                raise NoSuchUser(f"no mbox for {avatar_id!r}")
            _make_directories(directory)
        session = acquire_lock(path + LOCK_SUFFIX)
        try:
            view = self._index(path)
            retrieved = _load_retrieved(path + RETRIEVED_SUFFIX)
        except BaseException:
            session.release()
            raise
        return MboxMaildrop(self, path, session, view, retrieved)

    def _index(self, path: str) -> _View:
        """
        Index the mbox under the MTA lock, keeping it open for reading.
        """
        with self._locked(path) as box:
            return _View.of(box, self.variant)

    def _deliver_blocking(
        self,
        avatar_id: str,
        message: bytes | BinaryIO,
        folder: str | None,
        uid: str | None,
    ) -> str:
        if uid is not None and not is_valid_uid(uid):
            raise ValueError(f"UID {uid!r} is not 1-70 characters in 0x21-0x7E")
        path = self.mbox_path(avatar_id, folder)
        missing = NoSuchUser if _is_inbox(folder) else NoSuchFolder
        if not self._create and not os.path.lexists(path):
            raise missing(f"no mbox {os.path.basename(path)!r} for {avatar_id!r}")
        with _spooled(message, self.variant) as spool:
            new_uid = uid if uid is not None else _new_uid()
            eol = line_ending(spool.head)
            envelope = b"From %s %s%s" % (
                envelope_sender(spool.head),
                time.asctime().encode("ascii"),
                eol,
            )
            lines = popd_lines(
                new_uid, eol, spool.head, unterminated=spool.unterminated
            )
            # An unterminated message gets a LF (which X-Popd-Unterminated
            # says to drop), then every message gets the separating line.
            ending = (b"\n" if spool.unterminated else b"") + eol
            directory = os.path.dirname(path)
            if self._create:
                _make_directories(directory)
            with self._locked(path, create=self._create) as box:
                if box.fd < 0:
                    raise missing(f"no mbox {os.path.basename(path)!r}")
                _append(box, uid, self.variant, [envelope + lines, spool, ending], eol)
                if box.created:
                    _fsync_directory(directory)
        return new_uid

    def _folders_blocking(self, avatar_id: str) -> list[str]:
        if self._folder_template is None:
            return []
        directory = self._folder_directory(avatar_id)
        try:
            with os.scandir(directory) as scan_:
                entries = list(scan_)
        except FileNotFoundError:
            return []
        return sorted(
            entry.name
            for entry in entries
            if _is_folder_name(entry.name) and entry.is_file(follow_symlinks=False)
        )


@dataclass
class _View:
    """
    The mbox as popd last indexed it: the open file, its identity then, and
    its messages with their UIDs.
    """

    fd: int
    identity: tuple | None
    messages: list[MboxMessage]
    uids: list[str]

    @classmethod
    def of(cls, box: LockedMailbox, variant: str) -> _View:
        """
        Index the file held locked in C{box}; a missing one is empty.
        """
        if box.fd < 0:
            return cls(-1, None, [], [])
        status = os.fstat(box.fd)
        messages = scan(box.fd, status.st_size, variant)
        # A duplicate shares the open file description: the locks the box
        # releases go with it, while this keeps the file open for reading.
        fd = os.dup(box.fd)
        return cls(fd, _identity(status), messages, assign_uids(messages))

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


@implementer(IMaildrop)
class MboxMaildrop:
    """
    An mbox held by the session lock: the snapshot indexed at open.
    """

    def __init__(
        self,
        provider: MboxProvider,
        path: str,
        session: MaildropLock,
        view: _View,
        retrieved: dict[str, float],
    ) -> None:
        self.path = path
        self._provider = provider
        self._session = session
        self._view = view
        self._uids = list(view.uids)
        self._sizes = [message.size for message in view.messages]
        # Where each message of the snapshot is in the file as last indexed.
        self._where: list[MboxMessage | None] = list(view.messages)
        self._retrieved = retrieved
        self.messages = tuple(
            MessageInfo(uid, size, retrieved.get(uid))
            for uid, size in zip(self._uids, self._sizes, strict=True)
        )
        # _closed: no more calls are taken (reactor thread); _released: the
        # file is closed, for a read already under way in the pool.
        self._closed = False
        self._released = False
        self._sync = threading.Lock()

    def read(self, index: int) -> Deferred:
        """
        Open message C{index} for reading, streaming from the file.

        @return: a L{Deferred} firing with a binary file the caller closes.
        @raise IndexError: C{index} is not in the snapshot.
        """
        self._check_index(index)
        if self._closed:
            return fail(MaildropError("the maildrop is closed"))
        return self._provider._run(self._read_blocking, index)

    def commit(self, deleted: Iterable[int], retrieved: Iterable[int] = ()) -> Deferred:
        """
        Record retrieval times, remove the messages at C{deleted} (see the
        module docstring), then release the session lock (also on error).
        Once closed, further calls do nothing.
        """
        doomed = {self._uids[self._check_index(i)] for i in deleted}
        fetched = {self._uids[self._check_index(i)] for i in retrieved}
        if self._closed:
            return succeed(None)
        self._closed = True
        return self._provider._run(self._commit_blocking, doomed, fetched)

    def release(self) -> Deferred:
        """
        Release the session lock, changing nothing.  Once closed, does
        nothing.
        """
        if self._closed:
            return succeed(None)
        self._closed = True
        return self._provider._run(self._close)

    def _check_index(self, index: int) -> int:
        if not 0 <= index < len(self._uids):
            raise IndexError(f"no message at index {index}")
        return index

    def _read_blocking(self, index: int) -> MessageReader:
        with self._sync:
            if self._released:
                raise MaildropError("the maildrop is closed")
            self._follow_changes()
            where = self._where[index]
            if where is None:
                raise MaildropError(
                    f"message {self._uids[index]} was removed or changed"
                    " by another program"
                )
            fd = os.dup(self._view.fd)
        return MessageReader(fd, where.content, where.end, self._provider.variant)

    def _follow_changes(self) -> None:
        """
        If the file at the path is not the one last indexed, index it again
        and find the snapshot's messages in it by UID.
        """
        try:
            now = _identity(os.stat(self.path, follow_symlinks=False))
        except FileNotFoundError:
            now = None
        if now is not None and now == self._view.identity:
            return
        view = self._provider._index(self.path)
        found = dict(zip(view.uids, view.messages, strict=True))
        for index, uid in enumerate(self._uids):
            message = found.get(uid)
            if message is not None and message.size != self._sizes[index]:
                message = None
            self._where[index] = message
        self._view.close()
        self._view = view

    def _commit_blocking(self, doomed: set[str], fetched: set[str]) -> None:
        try:
            self._save_retrieved(doomed, fetched)
            if doomed:
                self._delete(doomed)
        finally:
            self._close()

    def _close(self) -> None:
        try:
            with self._sync:
                self._released = True
                self._view.close()
        finally:
            self._session.release()

    def _save_retrieved(self, doomed: set[str], fetched: set[str]) -> None:
        now = time.time()
        times = dict(self._retrieved)
        for uid in fetched:
            if times.get(uid) is None:
                times[uid] = now
        live = set(self._uids) - doomed
        times = {uid: when for uid, when in times.items() if uid in live}
        if times != self._retrieved:
            _save_retrieved(self.path + RETRIEVED_SUFFIX, times)

    def _delete(self, doomed: set[str]) -> None:
        with self._provider._locked(self.path) as box:
            if box.fd < 0:
                return
            status = os.fstat(box.fd)
            messages = scan(box.fd, status.st_size, self._provider.variant)
            uids = assign_uids(messages)
            kept = [
                m for m, uid in zip(messages, uids, strict=True) if uid not in doomed
            ]
            if len(kept) == len(messages):
                return
            _rewrite(box, status, kept)


def _rewrite(
    box: LockedMailbox, status: os.stat_result, kept: list[MboxMessage]
) -> None:
    """
    Replace the mbox held in C{box} by the messages C{kept}, copied octet
    for octet, crash-safely (see the module docstring).
    """
    directory, name = os.path.split(box.path)
    new_path = os.path.join(directory, f".{name}.popd-new")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(new_path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(new_path, flags, _FILE_MODE)
    try:
        try:
            for message in kept:
                mboxfile.copy_range(
                    box.fd, message.start, message.next, lambda data: _write(fd, data)
                )
                box.dot_lock.refresh()
            os.fchmod(fd, stat.S_IMODE(status.st_mode))
            mine = os.fstat(fd)
            if (mine.st_uid, mine.st_gid) != (status.st_uid, status.st_gid):
                os.fchown(fd, status.st_uid, status.st_gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(new_path, box.path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(new_path)
        raise
    _fsync_directory(directory)


def _append(
    box: LockedMailbox,
    uid: str | None,
    variant: str,
    parts: list[Any],
    eol: bytes,
) -> None:
    """
    Append one message to the mbox held in C{box} and fsync it; on failure
    cut the file back to its old size.

    @param uid: a given UID, checked against those in the file.
    @param parts: C{bytes} and spooled files, written in order.
    """
    size = os.fstat(box.fd).st_size
    if size and os.pread(box.fd, 5, 0) != b"From ":
        raise MboxFormatError(f"{box.path} is not an mbox")
    if uid is not None and uid in assign_uids(scan(box.fd, size, variant)):
        raise ValueError(f"UID {uid!r} is already in this mbox")
    separator = _separator_needed(box.fd, size, eol)
    length = len(separator) + sum(
        len(part) if isinstance(part, bytes) else part.size() for part in parts
    )
    journal = _journal_append(box, size, size + length)
    offset = size
    try:
        offset = _write_at(box.fd, offset, separator)
        for part in parts:
            if isinstance(part, bytes):
                offset = _write_at(box.fd, offset, part)
            else:
                for data in part.chunks():
                    offset = _write_at(box.fd, offset, data)
                    box.dot_lock.refresh()
        os.fsync(box.fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(box.fd, size)
            os.fsync(box.fd)
        raise
    finally:
        if journal >= 0:
            # Done (or undone): the record is obsolete.  Not synced: one
            # that survives a power cut finds the append complete.
            with contextlib.suppress(OSError):
                os.ftruncate(journal, 0)
            os.close(journal)


def _append_record_path(mbox: str) -> str:
    directory, name = os.path.split(mbox)
    return os.path.join(directory, f".{name}.popd-append")


def _journal_append(box: LockedMailbox, start: int, end: int) -> int:
    """
    Record durably, in C{.<name>.popd-append}, that octets C{start} to
    C{end} of the mbox held in C{box} are about to be written, so that
    whoever locks the mbox next can cut off what a process killed during
    the append left (L{_recover_append}).

    @return: the record's descriptor, or -1 where it cannot be written (a
        file of another user's, say): the append goes on unprotected, as
        every mbox delivery agent's does.
    """
    path = _append_record_path(box.path)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    existed = os.path.lexists(path)
    try:
        fd = os.open(path, flags, _FILE_MODE)
    except PermissionError:
        return -1
    try:
        status = os.fstat(box.fd)
        record = _APPEND_HEADER + b"%d %d %d %d\n" % (
            status.st_dev,
            status.st_ino,
            start,
            end,
        )
        os.ftruncate(fd, 0)
        _write_at(fd, 0, record)
        os.fsync(fd)
        if not existed:
            _fsync_directory(os.path.dirname(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _recover_append(box: LockedMailbox, stale_seconds: float) -> None:
    """
    Cut off the part of a message that a process killed while appending
    left at the end of the mbox held in C{box}, as its C{.popd-append}
    record (L{_journal_append}) says: the same file, ending between the
    append's start and its end.  A partial message would otherwise be
    served, and sealed in by the next delivery.

    Only an append whose record is younger than the mbox's last change by
    less than C{stale_seconds} is undone: an MTA that knows nothing of the
    record may only write after breaking the dead process's dot-lock as
    stale, and its mail must never be cut.  (popd itself breaks a dead
    popd's dot-lock at once, and so recovers first.)
    """
    path = _append_record_path(box.path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, PermissionError):
        return
    try:
        record = os.pread(fd, 256, 0)
        if not record:
            return
        fields = record[len(_APPEND_HEADER) :].split()
        if (
            record.startswith(_APPEND_HEADER)
            and record.endswith(b"\n")
            and len(fields) == 4
            and all(field.isdigit() for field in fields)
        ):
            dev, ino, start, end = (int(field) for field in fields)
            status = os.fstat(box.fd)
            age = status.st_mtime - os.fstat(fd).st_mtime
            if (
                (status.st_dev, status.st_ino) == (dev, ino)
                and start <= status.st_size < end
                and age < stale_seconds
            ):
                os.ftruncate(box.fd, start)
                os.fsync(box.fd)
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _separator_needed(fd: int, size: int, eol: bytes) -> bytes:
    """
    What must come before a new message so that the mbox ends with an
    empty line.
    """
    if size == 0:
        return b""
    tail = os.pread(fd, 3, max(0, size - 3))
    if tail.endswith((b"\n\n", b"\n\r\n")):
        return b""
    if tail.endswith(b"\n"):
        return eol
    return eol + eol


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_at(fd: int, offset: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        offset += written
        view = view[written:]
    return offset


@dataclass
class _Spool:
    """
    A message read to its end and quoted, before any lock is taken.
    """

    file: Any
    head: bytes
    unterminated: bool

    def chunks(self) -> Iterator[bytes]:
        self.file.seek(0)
        return iter(lambda: self.file.read(mboxfile.CHUNK_SIZE), b"")

    def size(self) -> int:
        return self.file.seek(0, os.SEEK_END)


@contextlib.contextmanager
def _spooled(message: bytes | BinaryIO, variant: str) -> Iterator[_Spool]:
    quoter = Quoter(variant)
    head = bytearray()
    last = b""
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
        for chunk in _chunks(message):
            if not chunk:
                continue
            if len(head) < mboxfile.HEADER_LIMIT:
                head += chunk[: mboxfile.HEADER_LIMIT - len(head)]
            spool.write(quoter.feed(chunk))
            last = chunk[-1:]
        spool.write(quoter.flush())
        yield _Spool(spool, bytes(head), bool(last) and last != b"\n")


def _chunks(message: bytes | BinaryIO) -> Iterator[bytes]:
    if isinstance(message, bytes | bytearray | memoryview):
        yield bytes(message)
    else:
        yield from iter(lambda: message.read(mboxfile.CHUNK_SIZE), b"")


def _new_uid() -> str:
    """
    A new UID for a delivery: the time, the process and 48 random bits.
    """
    return f"{time.time_ns() // 1000:x}.{os.getpid():x}.{os.urandom(6).hex()}"


def _identity(status: os.stat_result) -> tuple:
    return (
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
    )


def _load_retrieved(path: str) -> dict[str, float]:
    """
    The retrieval times; a missing or malformed file counts as empty (it
    only delays expiry).
    """
    try:
        with open(path, "rb") as source:
            data = source.read()
    except FileNotFoundError:
        return {}
    if not data.startswith(_RETRIEVED_HEADER):
        return {}
    times = {}
    for line in data[len(_RETRIEVED_HEADER) :].split(b"\n")[:-1]:
        uid, _, when = line.partition(b" ")
        try:
            times[uid.decode("ascii")] = float(when)
        except ValueError:
            return {}
    return times


def _save_retrieved(path: str, times: dict[str, float]) -> None:
    """
    Replace the retrieval times file atomically (or remove it if empty).
    """
    directory, name = os.path.split(path)
    if not times:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            _fsync_directory(directory)
        return
    lines = [_RETRIEVED_HEADER]
    lines += [b"%s %r\n" % (uid.encode("ascii"), when) for uid, when in times.items()]
    new_path = os.path.join(directory, f".{name}.new")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(new_path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(new_path, flags, _FILE_MODE)
    try:
        try:
            _write(fd, b"".join(lines))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(new_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(new_path)
        raise
    _fsync_directory(directory)


def _make_directories(directory: str) -> None:
    """
    Create C{directory} (mode 0700) and any missing parents, durably.
    """
    if os.path.isdir(directory):
        return
    missing = []
    path = directory
    while path and not os.path.isdir(path) and len(missing) < 64:
        missing.append(path)
        path = os.path.dirname(path)
    os.makedirs(directory, _DIRECTORY_MODE, exist_ok=True)
    for created in missing:
        _fsync_directory(os.path.dirname(created))


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_inbox(folder: str | None) -> bool:
    """
    Whether C{folder} names the user's mbox itself: C{None} or any case of
    C{INBOX}.
    """
    return folder is None or folder.upper() == "INBOX"


def _is_reserved(name: str) -> bool:
    """
    Whether a file name is one popd or an MTA keeps next to an mbox.
    """
    return name.startswith(".") or name.endswith(_RESERVED_SUFFIXES)


def _is_folder_name(name: str) -> bool:
    if _is_reserved(name) or _is_inbox(name):
        return False
    try:
        validate_folder_name(name)
    except UnsafeNameError:
        return False
    return True


def _mbox_errors(function: Callable[..., Any], *args: Any) -> Any:
    """
    Call C{function}, reporting a file that is not an mbox as
    L{MaildropError}.
    """
    try:
        return function(*args)
    except MboxFormatError as e:
        raise MaildropError(str(e)) from e
