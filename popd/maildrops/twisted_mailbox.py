"""
Serve an existing L{twisted.mail.pop3.IMailbox} with popd.

A site that wrote a mailbox for Twisted's own POP3 server keeps it: wrap the
function that finds a user's mailbox in L{MailboxProvider} and hand that to
popd's realm::

    from twisted.mail.maildir import MaildirMailbox
    from popd.maildrops.twisted_mailbox import MailboxProvider

    provider = MailboxProvider(lambda user: MaildirMailbox(path_of(user)))

How the two contracts meet:

  - C{mailbox_for(avatar_id)} is called at every open (and delivery); it
    returns an C{IMailbox} or a L{Deferred} firing with one.  It must give
    a fresh view each time (as C{MaildirMailbox} does, listing its
    directories when made): a mailbox that never changes its listing never
    shows new mail.  An exception other than L{MaildropError} from it
    becomes L{NoSuchUser}; validate user names there.
  - The snapshot is C{listMessages()} at open, with each UID from
    C{getUidl(i)} (one that is not a valid UIDL is replaced by its SHA-1;
    one that an earlier message of the listing has is replaced by the SHA-1
    of it and a counter, as a UID must be unique).
    C{IMailbox} sizes count stored octets, so the CRLF size of each message
    is counted by reading it (C{getMessage(i)}) in the reactor's thread
    pool, unless C{sizes_are_crlf=True} says the mailbox already reports
    them.  That reads every message at every open: fine for small
    mailboxes, slow for big ones.
  - C{read(i)} is C{getMessage(i)}.  A file opened in text mode (Twisted's
    C{MaildirMailbox} does that) is read through its binary C{buffer}, so
    8-bit mail and bare CRs arrive unchanged; a text file without one is
    encoded as UTF-8.
  - C{commit} calls C{deleteMessage(i)} for each deleted message (one that
    is already gone, C{FileNotFoundError}, C{IndexError} or C{KeyError}, is
    skipped), then C{sync()}; C{release} calls C{undeleteMessages()}.
    Retrieval times are not kept: C{retrieved} is ignored and
    C{MessageInfo.retrieved_at} is always C{None}.
  - The lock is in this process only, one session per avatar id: two popd
    processes serving the same mailboxes are not kept apart.
  - C{deliver} uses the mailbox's C{addMessage(file, (), None)} (the IMAP
    C{IMailbox} signature) or C{appendMessage(file)} (Twisted's
    C{MaildirMailbox}); without either it fails with L{MaildropError}.  The
    new message's UID is the UID of the message the call added to the
    mailbox's listing.  Durability is the mailbox's (C{MaildirMailbox} does
    not fsync).  A UID cannot be given (L{MaildropError}).
  - There are no folders: any folder but C{INBOX} is L{NoSuchFolder}.

C{IMailbox} methods are called on the reactor thread, as Twisted's POP3
server calls them; a mailbox doing slow I/O there blocks the reactor, which
is one more reason to move to a native store.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

from twisted.internet.defer import (
    Deferred,
    ensureDeferred,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.threads import deferToThreadPool
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
from popd.stream import file_wire_size

_UIDL = re.compile(r"[!-~]{1,70}")
_log = Logger()
_VANISHED = (FileNotFoundError, IndexError, KeyError)


@implementer(IMaildropProvider)
class MailboxProvider:
    """
    An L{IMaildropProvider} over C{twisted.mail.pop3.IMailbox} objects.

    @param mailbox_for: returns the mailbox of an avatar id, or a
        L{Deferred} firing with it.
    @param sizes_are_crlf: trust C{listMessages()} to give CRLF sizes
        instead of reading every message at open.
    @param reactor: the reactor (default: the global one).
    @param threadpool: where message files are read to size them (default:
        the reactor's).
    """

    def __init__(
        self,
        mailbox_for: Callable[[str], Any],
        *,
        sizes_are_crlf: bool = False,
        reactor: Any = None,
        threadpool: Any = None,
    ) -> None:
        self._mailbox_for = mailbox_for
        self._sizes_are_crlf = sizes_are_crlf
        self._reactor = reactor
        self._threadpool = threadpool
        self._locked: set[str] = set()

    def open(self, avatar_id: str, folder: str | None = None) -> Deferred:
        if not _is_root(folder):
            return fail(NoSuchFolder(f"{avatar_id!r} has no folder {folder!r}"))
        if avatar_id in self._locked:
            return fail(MaildropInUse(f"{avatar_id!r} is in use"))
        self._locked.add(avatar_id)
        d = ensureDeferred(self._open(avatar_id))

        def unlock(failure):
            self._locked.discard(avatar_id)
            return failure

        return d.addErrback(unlock)

    def deliver(
        self,
        avatar_id: str,
        message: bytes | BinaryIO,
        folder: str | None = None,
        uid: str | None = None,
    ) -> Deferred:
        if not _is_root(folder):
            return fail(NoSuchFolder(f"{avatar_id!r} has no folder {folder!r}"))
        if uid is not None:
            return fail(MaildropError("an IMailbox cannot keep a given UID"))
        return ensureDeferred(self._deliver(avatar_id, message))

    def folders(self, avatar_id: str) -> Deferred:
        return succeed([])

    def _unlock(self, avatar_id: str) -> None:
        self._locked.discard(avatar_id)

    async def _mailbox(self, avatar_id: str) -> Any:
        try:
            return await maybeDeferred(self._mailbox_for, avatar_id)
        except MaildropError:
            raise
        except Exception as e:
            raise NoSuchUser(f"no mailbox for {avatar_id!r}: {e}") from e

    async def _open(self, avatar_id: str) -> MailboxMaildrop:
        mailbox = await self._mailbox(avatar_id)
        sizes = await maybeDeferred(mailbox.listMessages)
        uids = await _uids(mailbox, len(sizes))
        infos = []
        for index, (uid, stored_size) in enumerate(zip(uids, sizes, strict=True)):
            if self._sizes_are_crlf:
                size = stored_size
            else:
                message = _binary(await maybeDeferred(mailbox.getMessage, index))
                size = await self._in_thread(_sized_and_closed, message)
            infos.append(MessageInfo(uid, size))
        return MailboxMaildrop(mailbox, infos, lambda: self._unlock(avatar_id))

    async def _deliver(self, avatar_id: str, message: bytes | BinaryIO) -> str:
        mailbox = await self._mailbox(avatar_id)
        add = getattr(mailbox, "addMessage", None)
        append = getattr(mailbox, "appendMessage", None)
        if add is None and append is None:
            raise MaildropError(
                f"the mailbox of {avatar_id!r} has neither addMessage nor "
                "appendMessage, so it cannot take deliveries"
            )
        if isinstance(message, bytes | bytearray):
            message = io.BytesIO(bytes(message))
        before = len(await maybeDeferred(mailbox.listMessages))
        if add is not None:
            await maybeDeferred(add, message, (), None)
        else:
            await maybeDeferred(append, message)
        after = len(await maybeDeferred(mailbox.listMessages))
        if after != before + 1:
            raise MaildropError(
                f"the message was handed to the mailbox of {avatar_id!r}, but "
                "it did not show in its listing, so its UID is unknown"
            )
        return (await _uids(mailbox, after))[-1]

    def _in_thread(self, function: Callable[..., Any], *args: Any) -> Deferred:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        if self._threadpool is None:
            self._threadpool = self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, self._threadpool, function, *args)


@implementer(IMaildrop)
class MailboxMaildrop:
    """
    An opened C{IMailbox}: the snapshot taken at open.
    """

    def __init__(
        self, mailbox: Any, messages: list[MessageInfo], unlock: Callable[[], None]
    ) -> None:
        self.mailbox = mailbox
        self.messages = tuple(messages)
        self._unlock = unlock
        self._closed = False

    def read(self, index: int) -> Deferred:
        self._check(index)
        if self._closed:
            return fail(MaildropError("the maildrop is closed"))

        def gone(failure):
            failure.trap(*_VANISHED, OSError)
            uid = self.messages[index].uid
            raise MaildropError(f"message {uid} cannot be read: {failure.value}")

        d = maybeDeferred(self.mailbox.getMessage, index)
        return d.addCallbacks(_binary, gone)

    def commit(self, deleted: Iterable[int], retrieved: Iterable[int] = ()) -> Deferred:
        doomed = sorted(set(deleted))
        for index in doomed:
            self._check(index)
        if self._closed:
            return succeed(None)
        self._closed = True
        return ensureDeferred(self._commit(doomed))

    def release(self) -> Deferred:
        if self._closed:
            return succeed(None)
        self._closed = True
        d = maybeDeferred(self.mailbox.undeleteMessages)

        def unlocked(result):
            self._unlock()
            return result

        return d.addBoth(unlocked).addCallback(lambda _: None)

    async def _commit(self, doomed: list[int]) -> None:
        try:
            for index in doomed:
                try:
                    await maybeDeferred(self.mailbox.deleteMessage, index)
                except _VANISHED as e:
                    _log.info(
                        "message {uid} was already gone: {error}",
                        uid=self.messages[index].uid,
                        error=e,
                    )
            sync = getattr(self.mailbox, "sync", None)
            if sync is not None:
                await maybeDeferred(sync)
        finally:
            self._unlock()

    def _check(self, index: int) -> None:
        if not 0 <= index < len(self.messages):
            raise IndexError(f"no message at index {index}")


def _is_root(folder: str | None) -> bool:
    return folder is None or folder.upper() == "INBOX"


async def _uids(mailbox: Any, count: int) -> list[str]:
    """
    The UIDs of the first C{count} messages of C{mailbox}, valid and unique.
    """
    used: set[str] = set()
    uids = []
    for index in range(count):
        uid = _valid_uid(await maybeDeferred(mailbox.getUidl, index))
        uids.append(_unused(uid, used))
    return uids


def _unused(uid: str, used: set[str]) -> str:
    """
    C{uid}, or if a message before it in the listing has it already, the
    SHA-1 of it and a counter: a mailbox whose UIDs hash the content (such
    as Twisted's C{StringListMailbox}) gives identical messages the same.
    """
    candidate, count = uid, 1
    while candidate in used:
        count += 1
        candidate = hashlib.sha1(f"{uid}\0{count}".encode()).hexdigest()
    used.add(candidate)
    return candidate


def _valid_uid(uid: str | bytes) -> str:
    """
    C{uid} as a str if it is a valid UIDL, else the SHA-1 of it in hex.
    """
    raw = uid if isinstance(uid, bytes) else str(uid).encode("utf-8", "replace")
    text = raw.decode("ascii", "replace")
    if _UIDL.fullmatch(text):
        return text
    return hashlib.sha1(raw).hexdigest()


class _EncodedText(io.RawIOBase):
    """
    A text file read as UTF-8 octets.
    """

    def __init__(self, text: Any) -> None:
        self._text = text
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = self._text.read(len(buffer))
            if not chunk:
                return 0
            self._pending = chunk.encode("utf-8", "surrogateescape")
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def close(self) -> None:
        self._text.close()
        super().close()


class _BinaryBuffer(io.RawIOBase):
    """
    The binary buffer under a text file, closing the text file with it.
    """

    def __init__(self, text: Any) -> None:
        self._text = text
        self._buffer = text.buffer

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._buffer.read(size)

    def readinto(self, buffer: Any) -> int:
        return self._buffer.readinto(buffer)

    def close(self) -> None:
        self._text.close()
        super().close()


def _binary(message: Any) -> BinaryIO:
    """
    C{message} as a binary file: itself, the buffer under a text file, or
    a text file encoded as UTF-8.
    """
    if isinstance(message, io.TextIOBase) or isinstance(
        getattr(message, "encoding", None), str
    ):
        if getattr(message, "buffer", None) is not None:
            return _BinaryBuffer(message)
        return io.BufferedReader(_EncodedText(message))
    if isinstance(message, bytes | bytearray):
        return io.BytesIO(bytes(message))
    return message


def _sized_and_closed(message: BinaryIO) -> int:
    try:
        return file_wire_size(message)
    finally:
        message.close()
