"""
SCRAM-SHA-256 (RFC 7677) and SCRAM-SHA-1 (RFC 5802), without channel
binding (no C{-PLUS} variants are offered).

The exchange::

    C: n,,n=alice,r=<client nonce>                       (client-first)
    S: r=<client nonce><server nonce>,s=<salt>,i=4096    (server-first)
    C: c=biws,r=<both nonces>,p=<ClientProof>            (client-final)
    S: v=<ServerSignature>                               (server-final)

The salt and iteration count come from the checker (L{IScramSecretSource})
before the client proves anything.  A user who does not exist gets a made-up
salt that stays the same while the process runs and the usual iteration
count, so the exchange looks the same until the proof fails with the same
C{-ERR [AUTH] Authentication failed.} as a wrong password.  The server-final
message is additional data with success: the protocol sends it as a last
challenge, which the client answers with an empty line (RFC 5034).
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from twisted.internet.defer import maybeDeferred
from zope.interface import implementer

from popd.auth import scram as keys
from popd.auth.credentials import (
    SCRAM_INTERFACES,
    ScramCredentials,
    scram_secret_source,
)
from popd.sasl.base import Challenge, ISASLMechanism, SASLContext, SASLError
from popd.sasl.simple import Exchange, check_authzid

__all__ = ["SCRAM_SHA_1", "SCRAM_SHA_256", "ScramExchange", "ScramMechanism"]

# printable = %x21-2B / %x2D-7E: printable ASCII except ",".
_NONCE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
_SERVER_NONCE_BYTES = 18


def server_nonce() -> str:
    """
    The server's part of a nonce: 18 random bytes in base64.
    """
    return base64.b64encode(os.urandom(_SERVER_NONCE_BYTES)).decode()


def _malformed(what: str = "message") -> SASLError:
    return SASLError(f"Malformed SCRAM {what}.")


def _saslname(value: str) -> bytes:
    """
    Unescape a SCRAM saslname: C{=2C} is C{,} and C{=3D} is C{=}; any
    other C{=} is an error, as is an empty name.
    """
    if not value or re.search(r"=(?!2C|3D)", value):
        raise _malformed("user name")
    return value.replace("=2C", ",").replace("=3D", "=").encode("utf-8")


class ScramExchange(Exchange):
    """
    One SCRAM exchange against an L{IScramSecretSource}.
    """

    def __init__(self, context: SASLContext, algorithm: str, source) -> None:
        super().__init__(context)
        self.algorithm = algorithm
        self.source = source
        self._asked = False
        self._gs2_header = b""
        self._first_bare = b""
        self._server_first = b""
        self._nonce = ""
        self._username = b""
        self._secret: keys.ScramSecret | None = None
        self._auth_message: bytes | None = None

    def step(self, response: bytes | None):
        if self._secret is None and not self._gs2_header:
            if response is None and not self._asked:
                self._asked = True
                return Challenge(b"")
            return self._client_first(response or b"")
        if self._secret is not None and self._auth_message is None:
            return self._client_final(response or b"")
        raise _malformed()

    def _client_first(self, message: bytes):
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed() from None
        fields = text.split(",")
        if len(fields) < 4:
            raise _malformed()
        flag, authzid = fields[0], fields[1]
        if flag.startswith("p="):
            raise SASLError("SCRAM channel binding is not supported here.")
        if flag not in ("n", "y") or (authzid and not authzid.startswith("a=")):
            raise _malformed()
        if fields[2].startswith("m="):
            raise SASLError("Unsupported mandatory SCRAM extension.")
        if not fields[2].startswith("n=") or not fields[3].startswith("r="):
            raise _malformed()
        username = _saslname(fields[2][2:])
        nonce = fields[3][2:]
        if not _NONCE.fullmatch(nonce):
            raise _malformed("nonce")
        if authzid:
            check_authzid(_saslname(authzid[2:]), username)
        self._gs2_header = f"{flag},{authzid},".encode()
        self._first_bare = message[len(self._gs2_header) :]
        self._username = username
        self._nonce = nonce + server_nonce()
        account = self.context.account_name(username)
        d = maybeDeferred(self.source.scram_secret, account, self.algorithm)
        return d.addCallback(self._server_first_message, account)

    def _server_first_message(self, secret, account: bytes) -> Challenge:
        if secret is None:
            secret = keys.unknown_user_secret(account, self.algorithm)
        self._secret = secret
        salt = base64.b64encode(secret.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={secret.iterations}".encode()
        return Challenge(self._server_first)

    def _client_final(self, message: bytes) -> ScramCredentials:
        try:
            text = message.decode("ascii")
        except UnicodeDecodeError:
            raise _malformed() from None
        without_proof, separator, proof_text = text.rpartition(",p=")
        if not separator:
            raise _malformed()
        fields = without_proof.split(",")
        if len(fields) < 2:
            raise _malformed()
        binding = "c=" + base64.b64encode(self._gs2_header).decode()
        if fields[0] != binding:
            raise SASLError("SCRAM channel binding data does not match.")
        if fields[1] != "r=" + self._nonce:
            raise SASLError("SCRAM nonce does not match.")
        try:
            proof = base64.b64decode(proof_text, validate=True)
        except (binascii.Error, ValueError):
            raise _malformed("proof") from None
        secret = self._secret
        self._auth_message = b",".join(
            [self._first_bare, self._server_first, without_proof.encode("ascii")]
        )
        return ScramCredentials(
            username=self._username,
            algorithm=self.algorithm,
            auth_message=self._auth_message,
            proof=proof,
            salt=secret.salt,
            iterations=secret.iterations,
        )

    def success_data(self) -> bytes | None:
        if self._secret is None or self._auth_message is None:
            return None
        signature = keys.server_signature(self._secret, self._auth_message)
        return b"v=" + base64.b64encode(signature)


@implementer(ISASLMechanism)
class ScramMechanism:
    """
    SCRAM with one hash: available when the checker of its credentials can
    look up secrets for that hash and has some.
    """

    plaintext = False

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self.name = "SCRAM-" + algorithm
        self.credentials = SCRAM_INTERFACES[algorithm]

    def _source(self, context: SASLContext):
        checker = context.checker_for(self.credentials)
        if checker is None:
            return None
        return scram_secret_source(checker, self.algorithm)

    def available(self, context: SASLContext) -> bool:
        return context.can_check(self.credentials) and self._source(context) is not None

    def start(self, context: SASLContext) -> ScramExchange:
        return ScramExchange(context, self.algorithm, self._source(context))

    def __repr__(self) -> str:
        return f"<SASL mechanism {self.name}>"


SCRAM_SHA_256 = ScramMechanism("SHA-256")
SCRAM_SHA_1 = ScramMechanism("SHA-1")
