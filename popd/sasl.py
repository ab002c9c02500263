"""
Server-side SASL mechanisms (RFC 4422) for POP3 AUTH (RFC 5034).

A mechanism turns the client's responses into Cred credentials; the
protocol carries the base64 lines and the portal checks the result, so a
new mechanism is one class added to L{MECHANISMS}.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from dataclasses import dataclass
from typing import Protocol

from twisted.cred.credentials import UsernamePassword


class SASLError(Exception):
    """
    The client's response is malformed; the exchange is over.
    """


@dataclass(frozen=True)
class Challenge:
    """
    A server challenge to send as C{+ base64} and wait for a response.
    """

    data: bytes


class Exchange(Protocol):
    """
    One authentication exchange in progress.
    """

    name: str

    def step(self, response: bytes | None) -> Challenge | object:
        """
        Take the client's base64 response (C{None}: no initial response)
        and return the next L{Challenge} or the finished credentials.
        """


def decode_response(response: bytes) -> bytes:
    """
    Decode one base64 client response; C{=} is the empty initial response.
    """
    if response == b"=":
        return b""
    try:
        return b64decode(response, validate=True)
    except (binascii.Error, ValueError) as error:
        raise SASLError("Invalid base64 data in SASL response.") from error


class PlainExchange:
    """
    RFC 4616 PLAIN: C{authzid NUL authcid NUL passwd} in one response.
    """

    name = "PLAIN"

    def step(self, response: bytes | None) -> Challenge | UsernamePassword:
        if response is None:
            return Challenge(b"")
        fields = decode_response(response).split(b"\0")
        if len(fields) != 3 or not fields[1]:
            raise SASLError("Malformed PLAIN response.")
        authzid, authcid, password = fields
        if authzid and authzid != authcid:
            raise SASLError("Authorization identity must match the user.")
        return UsernamePassword(authcid, password)


@dataclass(frozen=True)
class Mechanism:
    """
    A SASL mechanism as the protocol sees it.

    @ivar plaintext: whether it reveals the password to an eavesdropper, so
        it is refused where plaintext login is.
    """

    factory: type
    plaintext: bool

    def start(self) -> Exchange:
        return self.factory()


MECHANISMS: dict[str, Mechanism] = {
    "PLAIN": Mechanism(PlainExchange, plaintext=True),
}
