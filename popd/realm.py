"""
The Cred realm: an authenticated avatar id becomes an opened, locked maildrop.
"""

from __future__ import annotations

from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred
from zope.interface import implementer

from popd.interfaces import IMaildrop, IMaildropProvider


def _nothing() -> None:
    """
    Logging out needs no work here: the session itself commits or releases
    its maildrop, because only it knows whether QUIT was reached.
    """


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
        return self.provider.open(avatar_id).addCallback(
            lambda maildrop: (IMaildrop, maildrop, _nothing)
        )
