"""
What the built-in mechanisms share: a mechanism described by its name, its
exchange class and the credentials interface its exchange ends with.
"""

from __future__ import annotations

from zope.interface import implementer

from popd.sasl.base import ISASLExchange, ISASLMechanism, SASLContext, SASLError

__all__ = ["Exchange", "Mechanism", "check_authzid"]


@implementer(ISASLMechanism)
class Mechanism:
    """
    A mechanism available whenever the portal can check C{credentials}.

    @ivar exchange: called with the L{SASLContext} to start an exchange.
    @ivar credentials: the interface the exchange's credentials provide.
    """

    def __init__(self, name: str, exchange, credentials, plaintext: bool) -> None:
        self.name = name
        self.exchange = exchange
        self.credentials = credentials
        self.plaintext = plaintext

    def available(self, context: SASLContext) -> bool:
        return context.can_check(self.credentials)

    def start(self, context: SASLContext):
        return self.exchange(context)

    def __repr__(self) -> str:
        return f"<SASL mechanism {self.name}>"


@implementer(ISASLExchange)
class Exchange:
    """
    An exchange with no additional data with success.
    """

    def __init__(self, context: SASLContext) -> None:
        self.context = context

    def step(self, response: bytes | None):
        raise NotImplementedError

    def success_data(self) -> bytes | None:
        return None


def check_authzid(authzid: bytes, authcid: bytes) -> None:
    """
    Refuse an authorization identity other than the authentication
    identity: popd lets no user act as another (no proxy logins).

    @raise SASLError: C{authzid} is given and differs from C{authcid}.
    """
    if authzid and authzid != authcid:
        raise SASLError("Authorization identity must match the user.")
