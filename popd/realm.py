"""
The Cred realm: an authenticated avatar id becomes an opened, locked maildrop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, maybeDeferred, succeed
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
    @ivar expire: set by the realm: the user's own retention policy (days
        after first retrieval, or C{"NEVER"}), or C{None} for the server's.
    """

    folder: str | None = None
    list_folders: Callable[[], Deferred] | None = None
    expire: str | None = None


@implementer(IRealm)
class MaildropRealm:
    """
    Opens the avatar's maildrop through an L{IMaildropProvider}.
    """

    def __init__(
        self,
        provider: IMaildropProvider,
        user_expire: Callable[[str], str | None] | None = None,
    ) -> None:
        """
        @param user_expire: looks up a user's own retention policy (for
            example the passwd-file's C{expire=} extra field): C{None} when
            the user has none, or a L{Deferred} firing with it.
        """
        self.provider = provider
        self.user_expire = user_expire

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
        looked_up = succeed(None)
        if isinstance(mind, LoginRequest) and self.user_expire is not None:
            looked_up = maybeDeferred(self.user_expire, avatar_id)
            looked_up.addCallback(lambda expire: setattr(mind, "expire", expire))
        looked_up.addCallback(lambda _ignored: self.provider.open(avatar_id, folder))
        return looked_up.addCallback(lambda maildrop: (IMaildrop, maildrop, _nothing))
