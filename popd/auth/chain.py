"""
Several user databases behind one portal, asked in order.

A Twisted Cred portal keeps one checker per credentials interface, so
C{[auth] checkers = ["passwd-file:...", "sql:..."]} becomes one
L{CheckerChain}: each checker that understands the credentials is asked in
turn and the first to accept them wins, like Dovecot's several passdbs.

When none accepts, the login fails with L{UnauthorizedLogin}, unless one of
them could not answer (L{AuthUnavailable}, or an unexpected error, which is
logged): then the user might have been in that database, and the login
fails with L{AuthUnavailable} so the client gets C{[SYS/TEMP]} and tries
again later rather than being told its password is wrong.
"""

from __future__ import annotations

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from popd.auth.errors import AuthUnavailable

__all__ = ["CheckerChain", "avatar_text"]

_log = Logger()


def avatar_text(avatar_id: bytes | str) -> str:
    """
    An avatar ID as C{str}, whatever the checker returned (Twisted's own
    checkers return C{bytes}).

    @raise UnauthorizedLogin: bytes that are not UTF-8.
    """
    if isinstance(avatar_id, bytes):
        try:
            return avatar_id.decode("utf-8")
        except UnicodeDecodeError:
            raise UnauthorizedLogin("Authentication failed") from None
    return avatar_id


@implementer(ICredentialsChecker)
class CheckerChain:
    """
    Asks C{checkers} in order; the first to accept the credentials wins.
    """

    def __init__(self, checkers) -> None:
        self.checkers = list(checkers)
        interfaces: list = []
        for checker in self.checkers:
            for interface in checker.credentialInterfaces:
                if interface not in interfaces:
                    interfaces.append(interface)
        self.credentialInterfaces = tuple(interfaces)

    def _candidates(self, credentials) -> list:
        return [
            checker
            for checker in self.checkers
            if any(i.providedBy(credentials) for i in checker.credentialInterfaces)
        ]

    @defer.inlineCallbacks
    def requestAvatarId(self, credentials):
        """
        @return: a L{Deferred} firing with the first accepting checker's
            avatar ID as C{str}.
        """
        unavailable: AuthUnavailable | None = None
        for checker in self._candidates(credentials):
            try:
                avatar_id = yield defer.maybeDeferred(
                    checker.requestAvatarId, credentials
                )
            except UnauthorizedLogin:
                continue
            except AuthUnavailable as error:
                unavailable = error
                continue
            except Exception as error:
                _log.failure(
                    "checker {checker!r} failed", checker=type(checker).__name__
                )
                unavailable = AuthUnavailable(
                    f"{type(checker).__name__}: {type(error).__name__}"
                )
                continue
            return avatar_text(avatar_id)
        if unavailable is not None:
            raise unavailable
        raise UnauthorizedLogin("Authentication failed")
