"""
Server-side SASL mechanisms (RFC 4422) for POP3 AUTH (RFC 5034).

A mechanism is a plug-in: an L{ISASLMechanism} whose exchanges
(L{ISASLExchange}) turn the client's responses into challenges and finally
into Twisted Cred credentials, which the portal's checkers check.  The
protocol carries the base64 lines, cancellation and errors; a new mechanism
(OAUTHBEARER with a site's token validator, say) needs no change to it:
register it (L{register_mechanism} or a Twisted plugin) and name it in the
configuration's C{[auth] mechanisms}.

Built in: PLAIN, LOGIN, CRAM-MD5, SCRAM-SHA-1, SCRAM-SHA-256, EXTERNAL.
"""

from popd.sasl.base import (
    Challenge,
    ISASLExchange,
    ISASLMechanism,
    SASLContext,
    SASLError,
    decode_response,
    usable_interfaces,
)
from popd.sasl.registry import (
    BUILTIN_MECHANISMS,
    DEFAULT_MECHANISMS,
    MechanismRegistry,
    UnknownMechanism,
    default_mechanisms,
    register_mechanism,
    registry,
)
from popd.sasl.simple import Exchange, Mechanism, check_authzid

__all__ = [
    "BUILTIN_MECHANISMS",
    "DEFAULT_MECHANISMS",
    "Challenge",
    "Exchange",
    "ISASLExchange",
    "ISASLMechanism",
    "Mechanism",
    "MechanismRegistry",
    "SASLContext",
    "SASLError",
    "UnknownMechanism",
    "check_authzid",
    "decode_response",
    "default_mechanisms",
    "register_mechanism",
    "registry",
    "usable_interfaces",
]
