"""
The Maildir store: one directory per user with C{tmp/}, C{new/} and C{cur/}
(U{https://cr.yp.to/proto/maildir.html}), Maildir++ folders as C{.Name}
subdirectories, and Dovecot's C{,W=} size field understood.

Every filesystem call runs in a thread pool, never on the reactor thread.

Files popd keeps inside a Maildir (they never start with a dot, so no other
program mistakes them for folders):

  - C{popd.lock}: the session lock (see L{popd.maildrops.locking}).
  - C{popd-sizes}: a cache of CRLF sizes computed by reading messages whose
    names carry no C{,W=}.  It is keyed by base name, which the Maildir
    convention never reuses for another message, and is only written while
    the session lock is held.  Losing it only costs time.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from popd.interfaces import (
    IMaildrop,
    IMaildropProvider,
    MaildropError,
    MaildropUnavailable,
    MessageInfo,
    NoSuchUser,
)
from popd.maildrops.locking import MaildropLock, acquire_lock
from popd.maildrops.paths import (
    UnsafeNameError,
    check_template,
    expand_path,
    validate_folder_name,
)
from popd.stream import WireSizeCounter, file_wire_size

#: How much of a message is read or copied at a time.
CHUNK_SIZE = 64 * 1024

LOCK_FILE = "popd.lock"
SIZE_CACHE_FILE = "popd-sizes"
_SIZE_CACHE_HEADER = b"popd-sizes 1\n"

_SUBDIRS = ("tmp", "new", "cur")
_MODE = 0o700
_UIDL = re.compile(r"[!-~]{1,70}")
_W_FIELD = re.compile(r",W=([0-9]+)(?=,|\Z)")
_LEADING_NUMBER = re.compile(r"[0-9]+")
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})
_delivery_counter = itertools.count(1)


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


@dataclass(slots=True)
class _Message:
    """
    One message of a snapshot, with where it was last seen.
    """

    base: str
    path: str
    info: MessageInfo


@implementer(IMaildropProvider)
class MaildirProvider:
    """
    Opens and delivers into the Maildirs found by a path template (see
    L{popd.maildrops.paths.expand_path}), e.g. C{/var/vmail/%d/%n/Maildir}.

    @param create: create a missing Maildir (or folder) with mode 0700 on
        open and delivery; without it a missing Maildir is L{NoSuchUser}.
    @param reactor: the reactor to report results on (default: the global
        one, looked up when first needed).
    @param threadpool: where blocking work runs (default: the reactor's).
    """

    def __init__(
        self,
        path_template: str,
        *,
        create: bool = True,
        reactor: Any = None,
        threadpool: Any = None,
    ) -> None:
        check_template(path_template)
        self._template = path_template
        self._create = create
        self._reactor = reactor
        self._threadpool = threadpool

    def open(self, avatar_id: str, folder: str | None = None) -> Deferred:
        """
        Lock and snapshot a user's Maildir (or one of its folders).

        @return: a L{Deferred} firing with an L{IMaildrop}.
        """
        return self._run(self._open_blocking, avatar_id, folder)

    def deliver(
        self, avatar_id: str, message: bytes | BinaryIO, folder: str | None = None
    ) -> Deferred:
        """
        Store a message durably in C{new/}, without taking the session lock.

        @param message: the message as C{bytes}, or a binary file read to its
            end in the thread pool.
        @return: a L{Deferred} firing with the new message's UID.
        """
        return self._run(self._deliver_blocking, avatar_id, message, folder)

    def folders(self, avatar_id: str) -> Deferred:
        """
        @return: a L{Deferred} firing with the sorted Maildir++ folder names
            (C{Sent}, C{Lists.python}, ...); none if the Maildir is missing.
        """
        return self._run(self._folders_blocking, avatar_id)

    def _run(self, function: Callable[..., Any], *args: Any) -> Deferred:
        """
        Run blocking C{function} in the thread pool, turning C{OSError} into
        L{MaildropUnavailable}.
        """
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        if self._threadpool is None:
            self._threadpool = self._reactor.getThreadPool()
        return deferToThreadPool(
            self._reactor, self._threadpool, _translating_os_errors, function, *args
        )

    def _open_blocking(self, avatar_id: str, folder: str | None) -> MaildirMaildrop:
        root = self._prepared_maildir(avatar_id, folder)
        lock = acquire_lock(os.path.join(root, LOCK_FILE))
        try:
            messages = _snapshot(root)
        except BaseException:
            lock.release()
            raise
        return MaildirMaildrop(root, messages, lock, self._run)

    def _deliver_blocking(
        self, avatar_id: str, message: bytes | BinaryIO, folder: str | None
    ) -> str:
        root = self._prepared_maildir(avatar_id, folder)
        return _deliver(root, message)

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

    def _prepared_maildir(self, avatar_id: str, folder: str | None) -> str:
        """
        The Maildir to use, created first if allowed.

        @raise NoSuchUser: it is missing and may not be created.
        """
        root = self._maildir_path(avatar_id, folder)
        if _is_maildir(root):
            return root
        if not self._create:
            if _is_root(folder):
                raise NoSuchUser(f"no Maildir for {avatar_id!r}")
            raise MaildropError(f"no folder {folder!r} for {avatar_id!r}")
        if not _is_root(folder):
            # A Maildir++ folder only exists inside a Maildir.
            self._prepared_maildir(avatar_id, None)
        _make_maildir(root, is_folder=not _is_root(folder))
        return root

    def _maildir_path(self, avatar_id: str, folder: str | None) -> str:
        """
        The Maildir of C{avatar_id}, or of one of its folders.

        @raise NoSuchUser: the user name is not a safe path component.
        @raise MaildropError: the folder name is not.
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
            raise MaildropError(str(e)) from None
        return os.path.join(root, "." + folder)


@implementer(IMaildrop)
class MaildirMaildrop:
    """
    An open, locked Maildir: the snapshot taken at open, in delivery order.
    """

    def __init__(
        self,
        root: str,
        messages: list[_Message],
        lock: MaildropLock,
        run: Callable[..., Deferred],
    ) -> None:
        self.root = root
        self.messages = tuple(message.info for message in messages)
        self._messages = messages
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
        return self._run(self._read_blocking, message)

    def commit(self, deleted: Iterable[int], retrieved: Iterable[int] = ()) -> Deferred:
        """
        Remove the messages at C{deleted}, make that durable, then release
        the lock (also on error).  Once closed, further calls do nothing.
        """
        doomed = [self._message(index) for index in sorted(set(deleted))]
        if self._closed:
            return succeed(None)
        self._closed = True
        return self._run(self._commit_blocking, doomed)

    def release(self) -> Deferred:
        """
        Release the lock, changing nothing.  Once closed, does nothing.
        """
        if self._closed:
            return succeed(None)
        self._closed = True
        return self._run(self._lock.release)

    def _message(self, index: int) -> _Message:
        if not 0 <= index < len(self._messages):
            raise IndexError(f"no message at index {index}")
        return self._messages[index]

    def _read_blocking(self, message: _Message) -> BinaryIO:
        try:
            return _open_message(message.path)
        except FileNotFoundError:
            pass
        path = _find(self.root, message.base)
        if path is None:
            raise MaildropError(
                f"message {message.info.uid} was removed by another program"
            )
        message.path = path
        return _open_message(path)

    def _commit_blocking(self, doomed: list[_Message]) -> None:
        try:
            for message in doomed:
                _remove(self.root, message)
            for subdir in ("new", "cur"):
                _fsync_directory(os.path.join(self.root, subdir))
        finally:
            self._lock.release()


def _translating_os_errors(function: Callable[..., Any], *args: Any) -> Any:
    """
    Call C{function}, reporting any C{OSError} as a temporary failure: a
    full disk, a permission or an I/O error may well be gone next time.
    """
    try:
        return function(*args)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise MaildropUnavailable(f"{e.strerror or e}{where}") from e


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


def _snapshot(root: str) -> list[_Message]:
    """
    List the messages in C{new/} and C{cur/} with their UIDs and CRLF sizes,
    in delivery order.
    """
    cache = _SizeCache(os.path.join(root, SIZE_CACHE_FILE))
    messages = []
    for _, base, path in sorted(_scan(root)):
        size = _size_from_name(base)
        if size is None:
            size = cache.get(base)
        if size is None:
            size = _computed_size(path)
            if size is None:
                continue
            cache.put(base, size)
        messages.append(_Message(base, path, MessageInfo(uid_for(base), size)))
    cache.save_if_changed(message.base for message in messages)
    return messages


def _scan(root: str) -> Iterator[tuple[int, str, str]]:
    """
    Yield C{(timestamp, base name, path)} of each message, which sorts in
    delivery order: by the leading number of the name, then by the name.

    Skips dot files, anything that is not a regular file (symbolic links
    included) and a second file with a base name already seen.
    """
    seen = set()
    for sub in ("new", "cur"):
        with os.scandir(os.path.join(root, sub)) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                base = base_name(entry.name)
                if base not in seen:
                    seen.add(base)
                    timestamp = _LEADING_NUMBER.match(base)
                    yield int(timestamp.group()) if timestamp else 0, base, entry.path


def _size_from_name(base: str) -> int | None:
    """
    The CRLF size from a Dovecot C{,W=<size>} field, if the name has one.
    """
    match = _W_FIELD.search(base)
    return int(match.group(1)) if match else None


def _computed_size(path: str) -> int | None:
    """
    The CRLF size of a message by reading it, or C{None} if it vanished or
    is no longer a regular file.
    """
    try:
        with _open_message(path) as message:
            return file_wire_size(message, CHUNK_SIZE)
    except (FileNotFoundError, _NotRegularFileError):
        return None


class _NotRegularFileError(OSError):
    """
    A message path leads to a symbolic link, a directory or a device.
    """


def _open_message(path: str) -> BinaryIO:
    """
    Open a message for reading, refusing symbolic links and anything that is
    not a regular file: a user with shell access must not be able to read
    other files through popd.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _NotRegularFileError(errno.ELOOP, "not a regular file", path) from e
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _NotRegularFileError(errno.EINVAL, "not a regular file", path)
        return os.fdopen(fd, "rb")
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


def _deliver(root: str, message: bytes | BinaryIO) -> str:
    """
    Write C{message} to C{tmp/}, sync it, link it into C{new/} with its
    stored (C{S=}) and CRLF (C{W=}) sizes in the name, and sync C{new/}.

    @return: the UID of the new message.
    """
    unique = _unique_name()
    tmp_path = os.path.join(root, "tmp", unique)
    try:
        stored, crlf = _write_synced(tmp_path, message)
        base = f"{unique},S={stored},W={crlf}"
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


class _SizeCache:
    """
    The C{popd-sizes} file: a header line, then C{<base name> <size>} per
    line, each ending in LF.  A malformed line makes the whole cache count as
    empty, so it is rebuilt.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._sizes = self._load()
        self._changed = False

    def get(self, base: str) -> int | None:
        return self._sizes.get(base)

    def put(self, base: str, size: int) -> None:
        if "\n" not in base:
            self._sizes[base] = size
            self._changed = True

    def save_if_changed(self, live: Iterable[str]) -> None:
        """
        If sizes were added, rewrite the file atomically, keeping only the
        entries of C{live} base names.  A failure to write is ignored: the
        cache only saves time.
        """
        if not self._changed:
            return
        lines = [_SIZE_CACHE_HEADER]
        for base in live:
            size = self._sizes.get(base)
            if size is not None:
                lines.append(b"%s %d\n" % (os.fsencode(base), size))
        tmp_path = self._path + ".tmp"
        try:
            with open(tmp_path, "wb") as out:
                out.writelines(lines)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_path, self._path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)

    def _load(self) -> dict[str, int]:
        try:
            with open(self._path, "rb") as cache:
                data = cache.read()
        except FileNotFoundError:
            return {}
        if not data.startswith(_SIZE_CACHE_HEADER):
            return {}
        sizes = {}
        # The last element is what follows the final LF: empty, or a line cut
        # off by a crash, which is ignored rather than trusted.
        for line in data[len(_SIZE_CACHE_HEADER) :].split(b"\n")[:-1]:
            name, _, size = line.rpartition(b" ")
            if not name or not size.isdigit():
                return {}
            sizes[os.fsdecode(name)] = int(size)
        return sizes
