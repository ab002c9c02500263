"""
The Cred realm: an authenticated avatar id becomes an opened, locked maildrop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred
from zope.interface import implementer

from popd.interfaces import IMaildrop, IMaildropProvider


def _nothing() -> None:
    """
    Logging out needs no work here: the session itself commits or releases
    its maildrop, because only it knows whether QUIT was reached.
    """


@dataclass
class LoginRequest:
    """
    The Cred "mind" of a POP3 login: what the session asks of the realm
    besides the avatar id, and what the realm hands back besides the
    maildrop.

    @ivar folder: the folder to open, C{None} for INBOX.
    @ivar list_folders: set by the realm: returns a L{Deferred} firing with
        the user's folder names.
    """

    folder: str | None = None
    list_folders: Callable[[], Deferred] | None = None


@implementer(IRealm)
class MaildropRealm:
    """
    Opens the avatar's maildrop through an L{IMaildropProvider}.
    """

    def __init__(self, provider: IMaildropProvider) -> None:
        self.provider = provider

    def requestAvatar(self, avatarId, mind, *interfaces) -> Deferred:
        if IMaildrop not in interfaces:
            raise NotImplementedError("popd's realm only serves IMaildrop")
        avatar_id = (
            avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        )
        folder = None
        if isinstance(mind, LoginRequest):
            folder = mind.folder
            mind.list_folders = lambda: self.provider.folders(avatar_id)
        return self.provider.open(avatar_id, folder).addCallback(
            lambda maildrop: (IMaildrop, maildrop, _nothing)
        )
