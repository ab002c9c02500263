"""
Errors a Cred checker may fail with besides L{UnauthorizedLogin}.
"""

from __future__ import annotations

__all__ = ["AuthUnavailable"]


class AuthUnavailable(Exception):
    """
    The user database cannot answer now (a database that is down, a PAM
    module's system error, a checkpassword program exiting 111): the client
    gets C{-ERR [SYS/TEMP]} and may try again later.  It says nothing about
    whether the user exists or the password was right.
    """
