"""
Moving mail between stores and enforcing retention outside a session:
what C{popd import}, C{popd export} and C{popd expire} do.

Everything goes through L{IMaildropProvider}, so any two stores work
together, a third party's included, and the usual locking applies: a user
with an open POP3 session is skipped, never disturbed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from popd.interfaces import IMaildropProvider

STORE_KINDS = ("maildir", "mbox", "sql")


@dataclass
class CopyReport:
    """
    What a copy did: messages copied, and those skipped because the target
    already held their UID (so an interrupted copy can simply be re-run).
    """

    copied: int = 0
    skipped: int = 0
    octets: int = 0


def provider_from_spec(spec: str) -> IMaildropProvider:
    """
    A store named on the command line: C{maildir:PATH}, C{mbox:PATH} or
    C{sql:DSN}.  PATH may be a template with C{%u}; without one it is the
    one maildrop to use whatever the user name.

    @raise ValueError: naming what is wrong with C{spec}.
    """
    kind, separator, location = spec.partition(":")
    if not separator or kind not in STORE_KINDS or not location:
        raise ValueError(
            f"{spec!r} is not a store: use maildir:PATH, mbox:PATH or sql:DSN"
        )
    if kind == "sql":
        from popd.maildrops.sql import SQLProvider

        return SQLProvider.from_dsn(location)
    import os

    path = os.path.abspath(location)
    if kind == "mbox":
        from popd.maildrops.mbox import MboxProvider

        return MboxProvider(path)
    from popd.maildrops.maildir import MaildirProvider

    return MaildirProvider(path)


async def copy_mailbox(
    source: IMaildropProvider,
    source_user: str,
    target: IMaildropProvider,
    target_user: str,
    folder: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CopyReport:
    """
    Copy every message of one maildrop into another, keeping its UID so
    clients that leave mail on the server do not download it again.

    The source is opened (and so locked) for the whole copy and left
    unchanged; messages whose UID the target already has are skipped.
    """
    report = CopyReport()
    existing = await _uids(target, target_user, folder)
    maildrop = await source.open(source_user, folder)
    try:
        total = len(maildrop.messages)
        for index, info in enumerate(maildrop.messages):
            if info.uid in existing:
                report.skipped += 1
            else:
                message = await maildrop.read(index)
                try:
                    await target.deliver(target_user, message, folder, uid=info.uid)
                finally:
                    message.close()
                report.copied += 1
                report.octets += info.size
            if progress is not None:
                progress(index + 1, total)
    finally:
        await maildrop.release()
    return report


async def _uids(provider: IMaildropProvider, user: str, folder: str | None) -> set:
    from popd.interfaces import NoSuchFolder

    try:
        maildrop = await provider.open(user, folder)
    except NoSuchFolder:
        return set()
    try:
        return {info.uid for info in maildrop.messages}
    finally:
        await maildrop.release()


async def expire_mailbox(
    provider: IMaildropProvider,
    user: str,
    days: int,
    folder: str | None = None,
    now: float | None = None,
) -> int:
    """
    Remove the messages first retrieved at least C{days} days ago, as the
    EXPIRE policy does at QUIT; never one that was not retrieved.

    @return: how many messages were removed.
    """
    cutoff = (time.time() if now is None else now) - days * 86400
    maildrop = await provider.open(user, folder)
    expired = [
        index
        for index, info in enumerate(maildrop.messages)
        if info.retrieved_at is not None and info.retrieved_at <= cutoff
    ]
    await maildrop.commit(expired)
    return len(expired)


def progress_bar(stream, width: int = 30) -> Callable[[int, int], None]:
    """
    A progress callback drawing C{[####    ] done/total} on C{stream},
    redrawn in place on a terminal and every 10% elsewhere.
    """
    interactive = stream.isatty()
    shown = {"step": -1}

    def draw(done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        step = int(fraction * 10)
        if not interactive and step == shown["step"] and done != total:
            return
        shown["step"] = step
        filled = int(fraction * width)
        bar = "#" * filled + " " * (width - filled)
        end = "\n" if done == total or not interactive else ""
        stream.write(f"\r[{bar}] {done}/{total} messages{end}")
        stream.flush()

    return draw
