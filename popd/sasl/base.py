"""
The contract between the POP3 protocol and a SASL mechanism (RFC 4422).

The protocol carries the exchange: it decodes each base64 response, sends
each L{Challenge} as C{+ base64}, handles C{*} (cancel), sends the portal
whatever credentials the exchange ends with, and answers C{-ERR [AUTH]} with
the message of a L{SASLError}.  A mechanism only turns responses into
challenges and finally into Cred credentials.
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from zope.interface import Attribute, Interface

from popd.auth.credentials import usable_credential_interfaces

__all__ = [
    "MECHANISM_NAME",
    "Challenge",
    "ISASLExchange",
    "ISASLMechanism",
    "SASLContext",
    "SASLError",
    "decode_response",
    "usable_interfaces",
]

#: RFC 4422 section 3.1: 1 to 20 of A-Z, 0-9, hyphen and underscore.
MECHANISM_NAME = re.compile(r"[A-Z0-9_-]{1,20}")


class SASLError(Exception):
    """
    The client's response is malformed or refused; the exchange is over and
    the protocol answers C{-ERR [AUTH] <message>}, counting a failed login.
    """


@dataclass(frozen=True)
class Challenge:
    """
    A server challenge to send as C{+ base64} and wait for a response.
    """

    data: bytes


class ISASLMechanism(Interface):
    """
    A server-side SASL mechanism: what the protocol offers in CAPA's SASL
    line and in AUTH's list, and starts on C{AUTH <name>}.

    Mechanisms are found in L{popd.sasl.registry} (the built-in ones, those
    registered with L{popd.sasl.register_mechanism} and Twisted plugins
    providing this interface and C{twisted.plugin.IPlugin}); the
    configuration's C{[auth] mechanisms} chooses which a server offers.
    """

    name = Attribute("str: the mechanism's registered name, upper case.")
    plaintext = Attribute(
        "bool: whether the exchange reveals the password to an eavesdropper;"
        " such mechanisms are refused wherever USER/PASS is."
    )

    def available(context):
        """
        Whether the mechanism can work in this session now (the checkers can
        check its credentials, TLS is up, ...): only available mechanisms are
        listed.  Called for every CAPA and AUTH, on the reactor thread: it
        must be quick and must not block.

        @param context: the session's L{SASLContext}.
        """

    def start(context):
        """
        Begin one exchange.

        @param context: the session's L{SASLContext}.
        @return: an L{ISASLExchange}.
        """


class ISASLExchange(Interface):
    """
    One authentication exchange in progress.
    """

    def step(response):
        """
        Take the client's next response.

        @param response: the decoded response (C{bytes}, possibly empty), or
            C{None} for an C{AUTH} without an initial response.
        @return: a L{Challenge} to send, or the finished Cred credentials
            for the portal, or a L{Deferred} firing with either.
        @raise SASLError: the response is malformed or refused.
        """

    def success_data():
        """
        The mechanism's additional data with success (SCRAM's server
        signature), or C{None}.  Asked once the portal has accepted the
        credentials; POP3 has no room for it in C{+OK}, so the protocol sends
        it as a last challenge and waits for an empty response (RFC 5034
        section 4) before C{+OK}.
        """


def usable_interfaces(portal: Any) -> frozenset:
    """
    The credentials interfaces a portal's checkers can check now: those
    each checker registered, less what a checker providing
    L{popd.auth.credentials.IUsableCredentials} (or, for a chain, its
    members) says cannot succeed for anyone at the moment.
    """
    usable = set()
    answers: dict[int, frozenset] = {}
    for interface, checker in getattr(portal, "checkers", {}).items():
        if id(checker) not in answers:
            answers[id(checker)] = usable_credential_interfaces(checker)
        if interface in answers[id(checker)]:
            usable.add(interface)
    return frozenset(usable)


@dataclass(frozen=True)
class SASLContext:
    """
    What a mechanism may know about the session it runs in.

    @ivar secure: whether the connection is inside TLS.
    @ivar plaintext_allowed: whether mechanisms that reveal the password may
        be used (TLS, a trusted network, or C{plaintext = "always"}).
    @ivar portal: the Cred portal the credentials will go to.
    @ivar peer_certificate: the client's TLS certificate, verified against
        the configured client CAs (a C{cryptography} certificate), or
        C{None}.
    @ivar hostname: the server's host name (for challenges).
    @ivar folder_separator: what separates a folder from the user name in
        a login name (C{alice#Archive}); empty when folders are off.
    """

    secure: bool
    plaintext_allowed: bool
    portal: Any
    peer_certificate: Any = None
    hostname: str = "localhost"
    folder_separator: str = ""

    @cached_property
    def usable_interfaces(self) -> frozenset:
        """
        L{usable_interfaces} of the portal, asked once per context.
        """
        return usable_interfaces(self.portal)

    def can_check(self, interface) -> bool:
        """
        Whether credentials providing C{interface} reach a checker that can
        accept them now.  Credentials that provide an interface also provide
        what it extends, so a checker of L{IUsernameHashedPassword} (which
        knows plaintexts) also takes CRAM-MD5's L{ICramMD5Credentials}.
        """
        return any(interface.isOrExtends(usable) for usable in self.usable_interfaces)

    def checker_for(self, interface):
        """
        The checker the portal sends C{interface} credentials to, or C{None}.
        """
        return getattr(self.portal, "checkers", {}).get(interface)

    def account_name(self, username: bytes) -> bytes:
        """
        The user a login name names: C{username} without a folder suffix.
        """
        separator = self.folder_separator.encode("utf-8")
        if separator and separator in username:
            return username.partition(separator)[0]
        return username


def decode_response(response: bytes) -> bytes:
    """
    Decode one base64 client response.  An initial response of C{=} is the
    empty response (RFC 5034 section 4); a later one is an empty line, but
    C{=} is taken there too (curl sends it), as it cannot mean anything else.

    @raise SASLError: the response is not valid base64.
    """
    if response == b"=":
        return b""
    try:
        return b64decode(response, validate=True)
    except (binascii.Error, ValueError) as error:
        raise SASLError("Invalid base64 data in SASL response.") from error
