"""
CRAM-MD5 (RFC 2195): the server sends a unique challenge, the client
answers with its user name and the HMAC-MD5 of the challenge keyed with the
password.  The password never crosses the wire, but the server must know it
(or Dovecot's stored HMAC-MD5 context), so it is only offered when the
checker can check L{ICramMD5Credentials}.
"""

from __future__ import annotations

import os
import re
import time

from popd.auth.credentials import CramMD5Credentials, ICramMD5Credentials
from popd.sasl.base import Challenge, SASLError
from popd.sasl.simple import Exchange, Mechanism

__all__ = ["CRAM_MD5", "CramMD5Exchange"]

_RESPONSE = re.compile(rb"(.+) ([0-9a-fA-F]{32})", re.DOTALL)


class CramMD5Exchange(Exchange):
    def __init__(self, context) -> None:
        super().__init__(context)
        self._challenge: bytes | None = None

    def step(self, response: bytes | None) -> Challenge | CramMD5Credentials:
        if self._challenge is None:
            if response is not None:
                raise SASLError("CRAM-MD5 takes no initial response.")
            unique = f"{os.getpid()}.{time.time_ns()}.{os.urandom(8).hex()}"
            self._challenge = f"<{unique}@{self.context.hostname}>".encode()
            return Challenge(self._challenge)
        match = _RESPONSE.fullmatch(response or b"")
        if match is None or b"\0" in match.group(1):
            raise SASLError("Malformed CRAM-MD5 response.")
        return CramMD5Credentials(match.group(1), self._challenge, match.group(2))


CRAM_MD5 = Mechanism("CRAM-MD5", CramMD5Exchange, ICramMD5Credentials, plaintext=False)
