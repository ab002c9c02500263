"""
Cred credentials particular to POP3.
"""

from __future__ import annotations

import hashlib
import hmac

from twisted.cred.credentials import IUsernameHashedPassword
from zope.interface import implementer


@implementer(IUsernameHashedPassword)
class APOPCredentials:
    """
    What an APOP command proves (RFC 1939, section 7): the client knows the
    password whose MD5 digest, after the greeting's challenge, it sent.

    A checker that can recover the user's plaintext password calls
    L{checkPassword} with it; no other checker can verify APOP.

    @ivar username: the name as the client sent it.
    @ivar challenge: the server's greeting timestamp, angle brackets included
        (C{b"<1896.697170952@dbc.mtview.ca.us>"}).
    @ivar digest: the hex digest the client sent, in either letter case.
    """

    def __init__(self, username: bytes, challenge: bytes, digest: bytes) -> None:
        self.username = username
        self.challenge = challenge
        self.digest = digest

    def checkPassword(self, password: bytes | str) -> bool:
        """
        Is C{digest} the MD5 of C{challenge + password}?  Compared in
        constant time so the reply's timing says nothing about the digest.
        """
        if isinstance(password, str):
            password = password.encode("utf-8")
        expected = hashlib.md5(self.challenge + password).hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.digest.lower())

    def __repr__(self) -> str:
        # Never show the digest: it is a password equivalent for this session.
        return f"<APOPCredentials username={self.username!r}>"
