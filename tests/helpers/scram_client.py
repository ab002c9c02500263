"""
A SCRAM client (RFC 5802, RFC 7677) written from the RFC, independently of
popd's server code, for the tests to log in with.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

HASHES = {"SHA-1": "sha1", "SHA-256": "sha256"}


def _escape(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


class ScramClient:
    """
    One client side of a SCRAM exchange.

    @ivar server_signature: what the server-final message must carry, known
        once L{final} has run.
    """

    def __init__(
        self,
        algorithm: str,
        username: str,
        password: bytes,
        authzid: str = "",
        nonce: str | None = None,
        flag: str = "n",
    ) -> None:
        self.hash = HASHES[algorithm]
        self.username = username
        self.password = password
        self.nonce = nonce or base64.b64encode(os.urandom(18)).decode()
        self.gs2_header = f"{flag},{'a=' + _escape(authzid) if authzid else ''},"
        self.first_bare = f"n={_escape(username)},r={self.nonce}"
        self.server_signature: bytes | None = None
        self.salt: bytes | None = None
        self.iterations: int | None = None

    def first(self) -> bytes:
        return (self.gs2_header + self.first_bare).encode()

    def _hmac(self, key: bytes, message: bytes) -> bytes:
        return hmac.new(key, message, self.hash).digest()

    def final(self, server_first: bytes, proof_password: bytes | None = None) -> bytes:
        """
        The client-final message for C{server_first}, proving
        C{proof_password} (by default the password given).
        """
        text = server_first.decode()
        fields = dict(item.split("=", 1) for item in text.split(","))
        assert fields["r"].startswith(self.nonce) and fields["r"] != self.nonce
        self.salt = base64.b64decode(fields["s"])
        self.iterations = int(fields["i"])
        password = self.password if proof_password is None else proof_password
        salted = hashlib.pbkdf2_hmac(self.hash, password, self.salt, self.iterations)
        client_key = self._hmac(salted, b"Client Key")
        stored_key = hashlib.new(self.hash, client_key).digest()
        binding = base64.b64encode(self.gs2_header.encode()).decode()
        without_proof = f"c={binding},r={fields['r']}"
        auth_message = ",".join([self.first_bare, text, without_proof]).encode()
        signature = self._hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = self._hmac(salted, b"Server Key")
        self.server_signature = self._hmac(server_key, auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> bool:
        """
        Does the server-final message prove the server knew the password?
        """
        expected = b"v=" + base64.b64encode(self.server_signature)
        return hmac.compare_digest(server_final, expected)
