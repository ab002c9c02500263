"""
Delivery of one message read from a pipe, as an MTA's local delivery agent
runs it: C{popd deliver USER [-f SENDER] [-a ADDRESS] < message}.

The message is read to its end into a spool (memory up to 1 MiB, then an
unlinked temporary file) before anything is stored, so that a message over
C{[delivery] max_message_size} is refused without touching the maildrop.
An mbox C{From } envelope line at the top, as Postfix's local(8) writes
for C{mailbox_command}, is removed.

When an MTA runs it (C{-f SENDER} given, or a C{From } line read), the
copy gets the same trace fields as one delivered over LMTP:
C{Return-Path: <SENDER>} (replacing any at the very top) and
C{Delivered-To: ADDRESS} (C{-a}, by default USER).  Without either, the
message is stored exactly as read: C{popd deliver alice < file} by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from twisted.internet.defer import Deferred, ensureDeferred

from popd.config import Settings
from popd.delivery.agent import local_delivery
from popd.delivery.headers import trace_headers
from popd.delivery.spool import MessageTooLarge, Spool, spool_directory
from popd.stream import WireSizeCounter

__all__ = ["SpooledMessage", "deliver_from_file", "spool_message"]

#: How much is read at a time.
CHUNK_SIZE = 64 * 1024
#: The longest envelope or Return-Path line looked at; a longer first line
#: is simply part of the message.
_MAX_LINE = 8192


@dataclass
class SpooledMessage:
    """
    A message read from a pipe.

    @ivar spool: its octets, minus the envelope line and, when C{sender}
        is known, any C{Return-Path} fields at the top.
    @ivar sender: the envelope sender from a C{From } line, or C{None}.
    @ivar size: its size in CRLF octets (RFC 1870).
    """

    spool: Spool
    sender: str | None
    size: int


def _envelope_sender(line: bytes) -> str:
    """
    The sender of an mbox C{From sender date} line (C{""} for C{<>} and
    Postfix's C{MAILER-DAEMON}).
    """
    fields = line.split()
    sender = fields[1].decode("utf-8", "replace") if len(fields) > 1 else ""
    if sender in ("<>", "MAILER-DAEMON"):
        return ""
    return sender.removeprefix("<").removesuffix(">")


def spool_message(
    source: BinaryIO,
    *,
    limit: int | None,
    directory: Path | None,
    replace_return_path: bool = False,
) -> SpooledMessage:
    """
    Read C{source} to its end into a new spool.

    @param replace_return_path: drop C{Return-Path} fields at the very top
        even if there is no C{From } line (a sender was given).
    @raise MessageTooLarge: it is larger than C{limit} CRLF octets; the
        rest of C{source} is not read.
    @raise OSError: the spool cannot be written.
    """
    spool = Spool(directory)
    counter = WireSizeCounter()
    sender = None
    try:

        def store(data: bytes) -> None:
            counter.feed(data)
            if limit is not None and counter.size > limit:
                raise MessageTooLarge(f"the message is larger than {limit} octets")
            spool.write(data)

        line = source.readline(_MAX_LINE)
        if line.startswith(b"From ") and line.endswith(b"\n"):
            sender = _envelope_sender(line)
            line = source.readline(_MAX_LINE)
        if sender is not None or replace_return_path:
            # Drop the Return-Path fields (and their continuation lines) at
            # the top: the one added now says who the sender is.
            while line[:12].lower() == b"return-path:" and line.endswith(b"\n"):
                line = source.readline(_MAX_LINE)
                while line[:1] in (b" ", b"\t") and line.endswith(b"\n"):
                    line = source.readline(_MAX_LINE)
        store(line)
        for chunk in iter(lambda: source.read(CHUNK_SIZE), b""):
            store(chunk)
    except BaseException:
        spool.close()
        raise
    return SpooledMessage(spool, sender, counter.size)


def _spool_dir(settings: Settings) -> Path | None:
    """
    The data directory's spool, or the system's temporary directory when
    this user cannot write there (an MTA may run the command as the
    recipient).
    """
    directory = spool_directory(settings.data_dir)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return None
    return directory if os.access(directory, os.W_OK | os.X_OK) else None


async def _deliver(
    settings: Settings,
    user: str,
    message: SpooledMessage,
    folder: str | None,
    sender: str | None,
    address: str | None,
) -> str:
    from popd.service import build_provider

    provider = build_provider(settings)
    recipient = await local_delivery(settings, provider).resolve(user)
    if sender is None:
        sender = message.sender
    prefix = b""
    if sender is not None:
        prefix = trace_headers(
            sender=sender,
            recipient=address or user,
            head=message.spool.head,
        )
    return await provider.deliver(
        recipient.avatar_id,
        message.spool.reader(prefix),
        folder=folder if folder is not None else recipient.folder,
    )


def deliver_from_file(
    settings: Settings,
    user: str,
    source: BinaryIO,
    folder: str | None = None,
    *,
    sender: str | None = None,
    address: str | None = None,
) -> Deferred[str]:
    """
    Store the message read from C{source} in C{user}'s maildrop.

    C{source} is read to its end into a spool first (blocking: this is for
    the command line), then the user is looked up (C{[delivery]
    recipient} rules: C{user} may be a name, an address or carry a
    C{+detail}), then the message is stored.

    @param folder: the folder to deliver into, over one a C{+detail} names.
    @param sender: the envelope sender (C{-f}; C{""} for C{<>}).
    @param address: the recipient address for C{Delivered-To} (C{-a}).
    @return: a L{Deferred} firing with the new UID once the message is on
        stable storage; it fails with L{MessageTooLarge}, with
        L{NoSuchUser <popd.interfaces.NoSuchUser>} for a user the
        passwd-file does not know, and with
        L{MaildropUnavailable <popd.interfaces.MaildropUnavailable>} or
        L{OSError} when it may work later.
    """
    try:
        message = spool_message(
            source,
            limit=settings.max_message_size,
            directory=_spool_dir(settings),
            replace_return_path=sender is not None,
        )
    except Exception as error:
        from twisted.internet.defer import fail

        return fail(error)
    deferred = ensureDeferred(
        _deliver(settings, user, message, folder, sender, address)
    )

    def close(result: object) -> object:
        message.spool.close()
        return result

    return deferred.addBoth(close)
