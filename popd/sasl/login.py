"""
LOGIN (draft-murchison-sasl-login): the user name and the password, each
asked for with a challenge, as Outlook and old clients do.

The challenges are C{Username:} and C{Password:}, which some clients
expect verbatim.  An initial response is taken as the user name.
"""

from __future__ import annotations

from twisted.cred.credentials import IUsernamePassword, UsernamePassword

from popd.sasl.base import Challenge, SASLError
from popd.sasl.simple import Exchange, Mechanism

__all__ = ["LOGIN", "LoginExchange"]


class LoginExchange(Exchange):
    def __init__(self, context) -> None:
        super().__init__(context)
        self._username: bytes | None = None
        self._asked = False

    def step(self, response: bytes | None) -> Challenge | UsernamePassword:
        if self._username is None:
            if response is None and not self._asked:
                self._asked = True
                return Challenge(b"Username:")
            if not response or b"\0" in response:
                raise SASLError("Malformed LOGIN user name.")
            self._username = response
            return Challenge(b"Password:")
        if response is None or b"\0" in response:
            raise SASLError("Malformed LOGIN password.")
        return UsernamePassword(self._username, response)


LOGIN = Mechanism("LOGIN", LoginExchange, IUsernamePassword, plaintext=True)
