"""
An in-memory maildrop store for tests, popd's and a site's own.

It keeps the whole contract of L{popd.interfaces} (exclusive lock, fixed
snapshot, deletions only on commit) without touching a disk, so protocol
tests run fast and a third-party store has a reference to compare with.
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
        return self._mailboxes.setdefault((avatar_id, folder), _Mailbox())

    def open(self, avatar_id: str, folder: str | None = None) -> Deferred:
        mailbox = self._mailbox(avatar_id, folder)
        if mailbox.locked:
            return fail(MaildropInUse(f"{avatar_id} is in use"))
        mailbox.locked = True
        return succeed(MemoryMaildrop(mailbox))

    def deliver(
        self, avatar_id: str, message, folder: str | None = None, uid: str | None = None
    ) -> Deferred:
        content = message if isinstance(message, bytes) else message.read()
        mailbox = self._mailbox(avatar_id, folder)
        if uid is None:
            uid = f"mem{next(self._uids)}"
        elif not _UIDL.fullmatch(uid) or any(m.uid == uid for m in mailbox.messages):
            return fail(ValueError(f"UID {uid!r} is invalid or already used"))
        mailbox.messages.append(_StoredMessage(uid, content))
        return succeed(uid)

    def folders(self, avatar_id: str) -> Deferred:
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

    def is_locked(self, avatar_id: str, folder: str | None = None) -> bool:
        """
        Whether a session holds this maildrop, for assertions in tests.
        """
        return self._mailbox(avatar_id, folder).locked
