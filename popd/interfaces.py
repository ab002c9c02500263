"""
The contract between the POP3 protocol and the stores behind it.

The protocol only ever sees L{IMaildrop}; the realm only ever sees
L{IMaildropProvider}.  A store is a provider plus the maildrop it opens:
everything that may wait on a disk or a network returns a L{Deferred}.
"""

from __future__ import annotations

from typing import NamedTuple

from zope.interface import Attribute, Interface


class MessageInfo(NamedTuple):
    """
    One message of a session's snapshot.  A named tuple: a large maildrop's
    snapshot holds a hundred thousand, made in one C call from a store's
    rows (C{map(MessageInfo._make, rows)}).

    @ivar uid: the unique-id listing (RFC 1939 UIDL): 1 to 70 characters in
        the range 0x21 to 0x7E, stable across sessions, never reused.
    @ivar size: the octets of the message with CRLF line endings, before
        dot-stuffing: what STAT and LIST report.
    @ivar retrieved_at: when a session first retrieved the message in full
        (POSIX seconds), or C{None}: the clock that retention
        (RFC 2449 EXPIRE) counts from.
    """

    uid: str
    size: int
    retrieved_at: float | None = None


class MaildropError(Exception):
    """
    A store cannot serve a maildrop; retrying will not help (C{[SYS/PERM]}).
    """


class MaildropUnavailable(MaildropError):
    """
    A store cannot serve a maildrop just now; a later try may (C{[SYS/TEMP]}).
    """


class MaildropInUse(MaildropError):
    """
    Another session holds the maildrop's exclusive lock (C{[IN-USE]}).
    """


class NoSuchFolder(MaildropError):
    """
    The user has no folder of that name.
    """


class NoSuchUser(MaildropError):
    """
    The store has no maildrop for this user and will not create one.
    """


class IMaildrop(Interface):
    """
    An opened, exclusively locked maildrop: a numbered snapshot taken at open.

    Message numbers, sizes and UIDs never change while it is open; mail
    delivered meanwhile belongs to the next session.  Indexes are 0-based.
    """

    messages = Attribute(
        "Sequence[MessageInfo]: the snapshot taken at open, in message order."
    )

    def read(index: int):
        """
        Open one message for reading.

        @return: a L{Deferred} firing with a binary file-like object (C{read},
            C{close}) holding the message as stored (LF or CRLF line endings,
            no dot-stuffing).  The caller closes it.  Fails with
            L{MaildropError} if the message can no longer be read.
        """

    def commit(deleted, retrieved=()):
        """
        Remove the messages whose indexes are in C{deleted}, remember that
        those in C{retrieved} were retrieved now (unless an earlier time is
        already recorded), and release the lock.  A message that vanished
        meanwhile is not an error.

        @return: a L{Deferred} firing with C{None} once the changes are on
            stable storage.
        """

    def release():
        """
        Release the lock and change nothing.

        @return: a L{Deferred} firing with C{None}.
        """


class IMaildropProvider(Interface):
    """
    Opens users' maildrops and delivers mail into them.
    """

    def open(avatar_id: str, folder: str | None = None):
        """
        Lock and snapshot the maildrop of C{avatar_id}.

        @return: a L{Deferred} firing with an L{IMaildrop}; fails with
            L{MaildropInUse} if another session holds it (in this process or
            any other), L{MaildropUnavailable} or L{MaildropError} otherwise.
        """

    def deliver(avatar_id: str, message, folder: str | None = None, uid=None):
        """
        Store one message: C{message} is C{bytes} or a binary file-like
        object read to its end.

        @param uid: the UID to keep (when mail moves between stores), or
            C{None} for a new one.  A UID the maildrop already has, or that
            is not 1-70 characters in 0x21-0x7E, fails with L{ValueError}.

        @return: a L{Deferred} firing with the message's UID only once the
            message is on stable storage.  Delivery never waits for a session
            holding the lock, and never disturbs its snapshot.
        """

    def folders(avatar_id: str):
        """
        @return: a L{Deferred} firing with the list of folder names of this
            user's maildrop (the default folder is not listed).
        """
