"""
SCRAM secrets (RFC 5802, RFC 7677): what a server keeps to check a SCRAM
exchange without knowing the password, and Dovecot's way of storing them.

A secret is the salt and iteration count the client derives its keys with,
and two keys the server checks the client's proof and signs its own answer
with::

    SaltedPassword = PBKDF2-HMAC-H(password, salt, iterations)
    StoredKey      = H(HMAC(SaltedPassword, "Client Key"))
    ServerKey      = HMAC(SaltedPassword, "Server Key")

Dovecot's C{{SCRAM-SHA-256}} and C{{SCRAM-SHA-1}} schemes store them as
C{iterations,base64(salt),base64(StoredKey),base64(ServerKey)}.  Passwords
are used as their bytes without SASLprep, as Dovecot does; for ASCII
passwords that makes no difference.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ITERATIONS",
    "MAX_ITERATIONS",
    "SALT_BYTES",
    "ScramSecret",
    "client_key_from_proof",
    "derive_secret",
    "parse_dovecot",
    "server_signature",
    "stable_salt",
    "unknown_user_secret",
    "verify_password",
    "verify_proof",
]

#: SCRAM hash names (as in the mechanism name) and their hashlib names.
ALGORITHMS = {"SHA-1": "sha1", "SHA-256": "sha256"}

#: Iterations for new secrets, and for those derived from a plaintext
#: password: RFC 7677's minimum, and what doveadm uses.
DEFAULT_ITERATIONS = 4096

#: More iterations than this make a stored secret malformed: each login
#: would cost seconds of CPU for a client that derives it.
MAX_ITERATIONS = 10_000_000

#: Salt bytes of new secrets (doveadm uses 16 as well).
SALT_BYTES = 16

# Signs the salts made up for users without a stored salt: this process's
# own, so the salts cannot be guessed from outside, and stable while it runs.
_SALT_KEY = os.urandom(32)


@dataclass(frozen=True, slots=True)
class ScramSecret:
    """
    One user's SCRAM secret for one hash.

    @ivar algorithm: C{"SHA-1"} or C{"SHA-256"}.
    """

    algorithm: str
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __repr__(self) -> str:
        # The keys are password equivalents for SCRAM: never show them.
        return f"<ScramSecret {self.algorithm} i={self.iterations}>"

    def dovecot(self) -> str:
        """
        The secret as Dovecot stores it, without the C{{SCHEME}} prefix.
        """
        return ",".join(
            [
                str(self.iterations),
                *(
                    base64.b64encode(value).decode("ascii")
                    for value in (self.salt, self.stored_key, self.server_key)
                ),
            ]
        )


def _hmac(algorithm: str, key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, ALGORITHMS[algorithm]).digest()


def derive_secret(
    password: bytes,
    algorithm: str,
    salt: bytes | None = None,
    iterations: int = DEFAULT_ITERATIONS,
) -> ScramSecret:
    """
    The SCRAM secret of C{password}: PBKDF2, so it costs real CPU time;
    call it in a thread where a reactor is waiting.

    @param salt: the salt, or C{None} for a new random one.
    @raise KeyError: C{algorithm} is not one of L{ALGORITHMS}.
    """
    name = ALGORITHMS[algorithm]
    if salt is None:
        salt = os.urandom(SALT_BYTES)
    salted = hashlib.pbkdf2_hmac(name, password, salt, iterations)
    client_key = _hmac(algorithm, salted, b"Client Key")
    return ScramSecret(
        algorithm=algorithm,
        iterations=iterations,
        salt=salt,
        stored_key=hashlib.new(name, client_key).digest(),
        server_key=_hmac(algorithm, salted, b"Server Key"),
    )


def parse_dovecot(data: str, algorithm: str) -> ScramSecret | None:
    """
    Read Dovecot's C{iterations,salt,StoredKey,ServerKey}; C{None} when
    malformed (wrong field count, bad base64, key sizes that do not fit the
    hash, an iteration count outside 1..L{MAX_ITERATIONS}).
    """
    fields = data.split(",")
    if len(fields) != 4 or not fields[0].isdigit():
        return None
    iterations = int(fields[0])
    if not 1 <= iterations <= MAX_ITERATIONS:
        return None
    try:
        salt, stored_key, server_key = (
            base64.b64decode(field.encode("ascii"), validate=True)
            for field in fields[1:]
        )
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    size = hashlib.new(ALGORITHMS[algorithm]).digest_size
    if not salt or len(stored_key) != size or len(server_key) != size:
        return None
    return ScramSecret(algorithm, iterations, salt, stored_key, server_key)


def verify_password(secret: ScramSecret, password: bytes) -> bool:
    """
    Does C{password} give C{secret}'s StoredKey?  (USER/PASS and PLAIN
    against a stored SCRAM secret.)
    """
    derived = derive_secret(password, secret.algorithm, secret.salt, secret.iterations)
    return hmac.compare_digest(derived.stored_key, secret.stored_key)


def client_key_from_proof(
    secret: ScramSecret, auth_message: bytes, proof: bytes
) -> bytes | None:
    """
    Undo the client's proof with C{secret}: the ClientKey it proves, or
    C{None} when the proof has the wrong size.
    """
    signature = _hmac(secret.algorithm, secret.stored_key, auth_message)
    if len(proof) != len(signature):
        return None
    return bytes(p ^ s for p, s in zip(proof, signature, strict=True))


def verify_proof(secret: ScramSecret, auth_message: bytes, proof: bytes) -> bool:
    """
    Is C{proof} the ClientProof of someone holding the password of
    C{secret} for this C{auth_message} (RFC 5802 section 3)?
    """
    client_key = client_key_from_proof(secret, auth_message, proof)
    if client_key is None:
        return False
    digest = hashlib.new(ALGORITHMS[secret.algorithm], client_key).digest()
    return hmac.compare_digest(digest, secret.stored_key)


def server_signature(secret: ScramSecret, auth_message: bytes) -> bytes:
    """
    The ServerSignature that proves to the client that the server, too,
    knows the secret.
    """
    return _hmac(secret.algorithm, secret.server_key, auth_message)


def stable_salt(username: bytes | str) -> bytes:
    """
    A salt for C{username} that stays the same while this process runs and
    cannot be told apart from a stored random one: for users whose SCRAM
    keys are derived from a plaintext password, and for users who do not
    exist, so that SCRAM does not reveal who does.  Names that differ only
    in letter case get the same salt, as they name the same user in a
    case-insensitive database.
    """
    if isinstance(username, bytes):
        username = username.decode("utf-8", "surrogateescape")
    name = username.lower().encode("utf-8", "surrogateescape")
    return hmac.new(_SALT_KEY, b"salt\0" + name, "sha256").digest()[:SALT_BYTES]


def unknown_user_secret(username: bytes | str, algorithm: str) -> ScramSecret:
    """
    A secret for a user who does not exist: the salt and iteration count
    look like those of a real user's, the keys match no password.
    """
    size = hashlib.new(ALGORITHMS[algorithm]).digest_size
    return ScramSecret(
        algorithm=algorithm,
        iterations=DEFAULT_ITERATIONS,
        salt=stable_salt(username),
        stored_key=os.urandom(size),
        server_key=os.urandom(size),
    )
