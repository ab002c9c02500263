"""
From an envelope recipient address to the user (and folder) it reaches.

The rules, with C{[delivery] recipient} and C{recipient_delimiter}:

  - C{"full"}: the whole address is the user name (C{alice@example.test});
    an address without C{@} is taken as it is.
  - C{"local"}: the local part is (C{alice}); the domain is ignored, since
    only mail the MTA routed to popd arrives here.
  - C{"auto"} (the default): the whole address if the user database has it,
    else the local part.  One configuration then serves both a passwd-file
    of bare names and one of full addresses.

For each name tried, a name with the delimiter (C{alice+lists}) that is
not itself a user is tried without its detail (C{alice}).  With
C{[delivery] detail_folders} the detail then names the folder to deliver
into (C{alice+Lists@example.test} to C{Lists}), if the user has a folder of
that name (the case of the letters may differ); mail for a folder that does
not exist goes to the INBOX, so a sender cannot make folders.

User names match without regard to case, as the passwd-file's do.  A user
database that cannot be read is a temporary failure, never "no such user":
the MTA keeps the mail and tries again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred

from popd.auth.passwdfile import PasswdFile
from popd.config import RECIPIENT_MODES
from popd.interfaces import IMaildropProvider, MaildropUnavailable, NoSuchUser

__all__ = [
    "RECIPIENT_MODES",
    "PasswdFileUsers",
    "Recipient",
    "RecipientResolver",
    "candidates",
]


@dataclass(frozen=True, slots=True)
class Recipient:
    """
    A recipient that reaches a user.

    @ivar address: the address as the MTA gave it (no angle brackets).
    @ivar avatar_id: the user's maildrop.
    @ivar folder: the folder to deliver into, C{None} for the INBOX.
    """

    address: str
    avatar_id: str
    folder: str | None = None


def candidates(address: str, mode: str, delimiter: str) -> list[tuple[str, str | None]]:
    """
    The C{(user name, detail)} pairs to try for C{address}, best first.
    """
    local, at, _domain = address.rpartition("@")
    if not at:
        local = address
    names = {"full": [address], "local": [local], "auto": [address, local]}[mode]
    tried: list[tuple[str, str | None]] = []
    for name in names:
        pairs = [(name, None)]
        if delimiter:
            name_local, name_at, name_domain = name.rpartition("@")
            if not name_at:
                name_local, name_domain = name, ""
            user, sep, detail = name_local.partition(delimiter)
            if sep and user:
                pairs.append((user + name_at + name_domain, detail or None))
        for pair in pairs:
            if pair not in tried:
                tried.append(pair)
    return tried


class PasswdFileUsers:
    """
    Passwd-files as the user database of delivery, asked in order: blocking
    lookups, to run in a thread.
    """

    def __init__(self, *paths: str | os.PathLike[str]) -> None:
        self.paths = [os.fspath(path) for path in paths]
        self._files = [PasswdFile(path) for path in self.paths]

    def __call__(self, name: str) -> str | None:
        """
        The avatar ID of user C{name}, or C{None} if there is no such user.

        @raise MaildropUnavailable: a file exists but cannot be read.
        """
        for path, passwd in zip(self.paths, self._files, strict=True):
            try:
                # PasswdFile takes an unreadable file for one with no users;
                # only a missing file really has none.
                with open(path, "rb"):
                    pass
            except FileNotFoundError:
                continue
            except OSError as error:
                raise MaildropUnavailable(
                    f"cannot read the passwd-file {path}: {error.strerror}"
                ) from None
            entry = passwd.lookup(name)
            if entry is not None:
                return entry.name
        return None


class RecipientResolver:
    """
    Finds the user of an address (see the module documentation).

    @param lookup: C{name -> avatar ID or None}, blocking; it may raise
        L{MaildropUnavailable}.
    @param provider: the store, asked for the user's folders when a detail
        may name one.
    @param run_blocking: runs C{lookup} off the reactor thread and returns a
        L{Deferred} (default: the reactor's thread pool).
    """

    def __init__(
        self,
        lookup: Callable[[str], str | None],
        provider: IMaildropProvider,
        *,
        mode: str = "auto",
        delimiter: str = "+",
        detail_folders: bool = False,
        run_blocking: Callable[..., Deferred] | None = None,
    ) -> None:
        if mode not in RECIPIENT_MODES:
            raise ValueError(f"unknown recipient mode {mode!r}")
        self._lookup = lookup
        self._provider = provider
        self._mode = mode
        self._delimiter = delimiter
        self._detail_folders = detail_folders
        self._run_blocking = run_blocking or _in_thread

    def resolve(self, address: str) -> Deferred[Recipient]:
        """
        @return: a L{Deferred} firing with the L{Recipient}; it fails with
            L{NoSuchUser} for an address no user has, with
            L{MaildropUnavailable} when the user database cannot tell.
        """
        return ensureDeferred(self._resolve(address))

    async def _resolve(self, address: str) -> Recipient:
        found = await self._run_blocking(self._find, address)
        if found is None:
            raise NoSuchUser(f"no user {address}")
        avatar_id, detail = found
        folder = None
        if detail and self._detail_folders:
            folder = await self._existing_folder(avatar_id, detail)
        return Recipient(address, avatar_id, folder)

    def _find(self, address: str) -> tuple[str, str | None] | None:
        for name, detail in candidates(address, self._mode, self._delimiter):
            avatar_id = self._lookup(name)
            if avatar_id is not None:
                return avatar_id, detail
        return None

    async def _existing_folder(self, avatar_id: str, detail: str) -> str | None:
        if detail.upper() == "INBOX":
            return None
        folders = await self._provider.folders(avatar_id)
        if detail in folders:
            return detail
        matching = [name for name in folders if name.lower() == detail.lower()]
        return matching[0] if len(matching) == 1 else None


def _in_thread(function: Callable[..., Any], *args: Any) -> Deferred:
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThreadPool

    return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)
