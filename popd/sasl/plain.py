"""
PLAIN (RFC 4616): C{authzid NUL authcid NUL passwd} in one response.
"""

from __future__ import annotations

from twisted.cred.credentials import IUsernamePassword, UsernamePassword

from popd.sasl.base import Challenge, SASLError
from popd.sasl.simple import Exchange, Mechanism, check_authzid

__all__ = ["PLAIN", "PlainExchange"]


class PlainExchange(Exchange):
    def step(self, response: bytes | None) -> Challenge | UsernamePassword:
        if response is None:
            return Challenge(b"")
        fields = response.split(b"\0")
        if len(fields) != 3 or not fields[1]:
            raise SASLError("Malformed PLAIN response.")
        authzid, authcid, password = fields
        check_authzid(authzid, authcid)
        return UsernamePassword(authcid, password)


PLAIN = Mechanism("PLAIN", PlainExchange, IUsernamePassword, plaintext=True)
