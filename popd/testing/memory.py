"""
An in-memory maildrop store for tests, popd's and a site's own.

It keeps the whole contract of L{popd.interfaces} (exclusive lock, fixed
snapshot, deletions only on commit, retrieval times, given UIDs, folders)
without touching a disk, so protocol tests run fast and a third-party store
has a reference to compare with; C{tests/test_contract_memory.py} runs the
contract kit (L{popd.testing.contract}) against it.

User and folder names are checked as if they were paths (L{popd.maildrops.paths}),
so a test against this store refuses what a real store would.  Opening a
folder that was never delivered into is L{NoSuchFolder}; delivering into one
makes it.  C{INBOX}, in any case, is the default folder.
"""

from __future__ import annotations

import io
import itertools
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail, succeed
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
from popd.maildrops.paths import (
    UnsafeNameError,
    validate_folder_name,
    validate_user_name,
)
from popd.stream import wire_size

_UIDL = re.compile(r"[!-~]{1,70}")


@dataclass
class _StoredMessage:
    uid: str
    content: bytes
    retrieved_at: float | None = None


@dataclass
class _Mailbox:
    messages: list[_StoredMessage] = field(default_factory=list)
    locked: bool = False


@implementer(IMaildrop)
class MemoryMaildrop:
    """
    A locked snapshot of one L{_Mailbox}.
    """

    def __init__(self, mailbox: _Mailbox) -> None:
        self._mailbox = mailbox
        self._stored = list(mailbox.messages)
        self.messages = [
            MessageInfo(stored.uid, wire_size(stored.content), stored.retrieved_at)
            for stored in self._stored
        ]
        self.closed = False

    def read(self, index: int) -> Deferred:
        stored = self._stored[index]
        if stored not in self._mailbox.messages:
            return fail(MaildropError(f"message {stored.uid} is gone"))
        return succeed(io.BytesIO(stored.content))

    def commit(self, deleted: Iterable[int], retrieved: Iterable[int] = ()) -> Deferred:
        now = time.time()
        for index in retrieved:
            if self._stored[index].retrieved_at is None:
                self._stored[index].retrieved_at = now
        doomed = {id(self._stored[index]) for index in deleted}
        self._mailbox.messages = [
            message for message in self._mailbox.messages if id(message) not in doomed
        ]
        return self.release()

    def release(self) -> Deferred:
        if not self.closed:
            self.closed = True
            self._mailbox.locked = False
        return succeed(None)


@implementer(IMaildropProvider)
class MemoryMaildropProvider:
    """
    Maildrops kept in a dictionary, one per avatar id and folder.
    """

    def __init__(self) -> None:
        self._mailboxes: dict[tuple[str, str | None], _Mailbox] = {}
        self._uids = itertools.count(1)

    def _mailbox(self, avatar_id: str, folder: str | None) -> _Mailbox:
        return self._mailboxes.setdefault((avatar_id, _folder_key(folder)), _Mailbox())

    def open(self, avatar_id: str, folder: str | None = None) -> Deferred:
        try:
            _check_names(avatar_id, folder)
        except MaildropError as e:
            return fail(e)
        folder = _folder_key(folder)
        if folder is not None and (avatar_id, folder) not in self._mailboxes:
            return fail(NoSuchFolder(f"{avatar_id} has no folder {folder!r}"))
        mailbox = self._mailbox(avatar_id, folder)
        if mailbox.locked:
            return fail(MaildropInUse(f"{avatar_id} is in use"))
        mailbox.locked = True
        return succeed(MemoryMaildrop(mailbox))

    def deliver(
        self, avatar_id: str, message, folder: str | None = None, uid: str | None = None
    ) -> Deferred:
        try:
            _check_names(avatar_id, folder)
        except MaildropError as e:
            return fail(e)
        folder = _folder_key(folder)
        if isinstance(message, bytes | bytearray):
            content = bytes(message)
        else:
            content = b"".join(iter(lambda: message.read(65536), b""))
        mailbox = self._mailbox(avatar_id, folder)
        used = {stored.uid for stored in mailbox.messages}
        if uid is None:
            # Skip the UIDs given to deliveries that kept their own.
            uid = f"mem{next(self._uids)}"
            while uid in used:
                uid = f"mem{next(self._uids)}"
        elif not isinstance(uid, str) or not _UIDL.fullmatch(uid) or uid in used:
            return fail(ValueError(f"UID {uid!r} is invalid or already used"))
        mailbox.messages.append(_StoredMessage(uid, content))
        return succeed(uid)

    def folders(self, avatar_id: str) -> Deferred:
        try:
            _check_names(avatar_id, None)
        except MaildropError as e:
            return fail(e)
        return succeed(
            sorted(
                folder
                for (owner, folder) in self._mailboxes
                if owner == avatar_id and folder is not None
            )
        )

    def contents(self, avatar_id: str, folder: str | None = None) -> list[bytes]:
        """
        The stored messages of a maildrop, for assertions in tests.
        """
        return [stored.content for stored in self._mailbox(avatar_id, folder).messages]

    def remove(self, avatar_id: str, uid: str, folder: str | None = None) -> None:
        """
        Remove one message at once, as another program would, even while a
        session holds the maildrop: for tests of vanished messages.
        """
        mailbox = self._mailbox(avatar_id, folder)
        mailbox.messages = [m for m in mailbox.messages if m.uid != uid]

    def is_locked(self, avatar_id: str, folder: str | None = None) -> bool:
        """
        Whether a session holds this maildrop, for assertions in tests.
        """
        return self._mailbox(avatar_id, folder).locked


def _folder_key(folder: str | None) -> str | None:
    """
    C{None} for the default folder, however named (C{INBOX} in any case).
    """
    return None if folder is None or folder.upper() == "INBOX" else folder


def _check_names(avatar_id: str, folder: str | None) -> None:
    """
    Refuse a user or folder name that a store keeping maildrops in files
    could not safely use as a path component.
    """
    try:
        validate_user_name(avatar_id)
    except UnsafeNameError as e:
        raise NoSuchUser(str(e)) from None
    if folder is not None:
        try:
            validate_folder_name(folder)
        except UnsafeNameError as e:
            raise NoSuchFolder(str(e)) from None
