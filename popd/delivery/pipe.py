"""
Delivery of one message read from a pipe, as an MTA's local delivery agent
runs it: C{popd deliver USER < message}.
"""

from __future__ import annotations

from typing import BinaryIO

from twisted.internet.defer import Deferred, ensureDeferred

from popd.auth.passwdfile import PasswdFile
from popd.config import Settings
from popd.interfaces import NoSuchUser


async def _deliver(
    settings: Settings, user: str, source: BinaryIO, folder: str | None
) -> str:
    from popd.service import build_provider

    entry = PasswdFile(settings.passwd_file).lookup(user)
    if entry is None:
        raise NoSuchUser(f"no user {user} in {settings.passwd_file}")
    return await build_provider(settings).deliver(entry.name, source, folder)


def deliver_from_file(
    settings: Settings, user: str, source: BinaryIO, folder: str | None = None
) -> Deferred[str]:
    """
    Store the message read from C{source} in C{user}'s maildrop.

    @return: a L{Deferred} firing with the new UID once the message is on
        stable storage; it fails with L{NoSuchUser} for a user the
        passwd-file does not know.
    """
    return ensureDeferred(_deliver(settings, user, source, folder))
