"""
Dovecot password schemes: verify and make C{{SCHEME}data} password values.

A stored password is written the way Dovecot writes it: C{{SCHEME}data}, or
bare C{data} meaning Dovecot's default scheme CRYPT (crypt(3) formats, told
apart by their C{$id$} prefix).  Scheme names are case-insensitive and may
carry an encoding suffix, C{.B64}/C{.BASE64} or C{.HEX}, as in C{PLAIN.B64}
or C{SHA256.HEX}.  Digest schemes with a fixed size and no suffix accept hex
as well as base64, guessed by length, as Dovecot does.

Verification never raises: an unknown scheme or malformed data is simply a
password that does not match.  L{parse_stored} is the strict reader for
tools that want to tell an administrator what is wrong.

Challenge-response mechanisms need more than a hash to compare with:
L{plaintext_of} gives the password of C{PLAIN} values (APOP, CRAM-MD5 and
SCRAM can all use it), L{cram_md5_context_of} the HMAC-MD5 context of
C{CRAM-MD5} values, L{scram_secret_of} the keys of C{SCRAM-SHA-1} and
C{SCRAM-SHA-256} values; L{secret_kinds} says which of them a value can
serve.

Where this is stricter than Dovecot:

  - a scheme naming one crypt(3) or Argon2 variant (C{SHA512-CRYPT},
    C{MD5-CRYPT}, C{BLF-CRYPT}, C{ARGON2ID}, ...) only accepts data in that
    variant's format; C{CRYPT} and C{ARGON2} accept any of their family;
  - passwords longer than L{MAX_PASSWORD_BYTES} never match (SHA-crypt's cost
    grows with the password's length).

Digests are compared with L{hmac.compare_digest}; the crypt(3) family
(libpass), bcrypt and argon2-cffi compare in constant time themselves.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import argon2
import bcrypt
from argon2.low_level import Type as _Argon2Type
from argon2.low_level import verify_secret as _argon2_verify
from passlib.hash import des_crypt, md5_crypt, sha256_crypt, sha512_crypt

from popd.auth import hmac_md5, scram

__all__ = [
    "DEFAULT_SCHEME",
    "MAX_PASSWORD_BYTES",
    "SCHEMES",
    "UnknownScheme",
    "cram_md5_context_of",
    "dummy_hash",
    "hash_password",
    "is_cheap",
    "parse_stored",
    "plaintext_of",
    "scram_secret_of",
    "secret_kinds",
    "verify_password",
]

DEFAULT_SCHEME = "ARGON2ID"

# The schemes hash_password can produce, strongest first.  SCRAM-SHA-256,
# SCRAM-SHA-1 and CRAM-MD5 also let those mechanisms log users in without
# the plaintext; CRAM-MD5 and PLAIN are password equivalents.
SCHEMES = (
    "ARGON2ID",
    "BLF-CRYPT",
    "SHA512-CRYPT",
    "SHA256-CRYPT",
    "SCRAM-SHA-256",
    "SSHA512",
    "SSHA256",
    "SCRAM-SHA-1",
    "MD5-CRYPT",
    "CRAM-MD5",
    "PLAIN",
)

# Longer passwords never verify and cannot be hashed: real passwords are far
# shorter, and SHA-crypt's work grows with the password's length.
MAX_PASSWORD_BYTES = 4096

# The scheme Dovecot assumes for a value without a {SCHEME} prefix.
_IMPLICIT_SCHEME = "CRYPT"

# Parameters for new hashes.  Argon2id matches libsodium's (and so
# doveadm's) output: t=3, 64 MiB, one lane.  SHA-crypt uses crypt(3)'s
# default 5000 rounds, so the value reads "$6$salt$hash" exactly as doveadm
# prints it.  bcrypt uses cost 12 rather than Dovecot's 5.
_ARGON2_TIME_COST = 3
_ARGON2_MEMORY_KIB = 65536
_SHA_CRYPT_ROUNDS = 5000
_BCRYPT_COST = 12
_BCRYPT_MAX_BYTES = 72
_SSHA_SALT_BYTES = 16  # Dovecot writes 4 and accepts any length.

_NONE, _B64, _HEX = "none", "b64", "hex"
_ENCODING_SUFFIXES = {"B64": _B64, "BASE64": _B64, "HEX": _HEX}


class UnknownScheme(ValueError):  # noqa: N818 - the name the CLI and brief use
    """
    A stored password names a scheme (or encoding) popd does not know.
    """


@dataclass(frozen=True, slots=True)
class _Scheme:
    """
    How to check one scheme's stored value.

    @ivar encoding: how the data is written when no suffix says otherwise.
    @ivar raw_size: the decoded value's fixed size, or 0 when it varies.
    @ivar verify: C{verify(password, raw)} with the decoded stored value.
    @ivar cheap: whether C{verify} costs only a single fast digest or
        compare, so a caller may run it on the reactor thread
        (L{is_cheap}).  C{False} by default: a scheme is slow until shown
        otherwise.
    """

    encoding: str
    raw_size: int
    verify: Callable[[bytes, bytes], bool]
    cheap: bool = False


def _verify_plain(password: bytes, raw: bytes) -> bool:
    return hmac.compare_digest(password, raw)


def _digest(algorithm: str) -> Callable[[bytes, bytes], bool]:
    """
    An unsalted digest: the stored value is C{digest(password)}.
    """

    def verify(password: bytes, raw: bytes) -> bool:
        return hmac.compare_digest(hashlib.new(algorithm, password).digest(), raw)

    return verify


def _salted(algorithm: str) -> Callable[[bytes, bytes], bool]:
    """
    A salted digest: the stored value is C{digest(password + salt) + salt}.
    """
    size = hashlib.new(algorithm).digest_size

    def verify(password: bytes, raw: bytes) -> bool:
        if len(raw) <= size:
            return False
        salt = raw[size:]
        computed = hashlib.new(algorithm, password + salt).digest()
        return hmac.compare_digest(computed, raw[:size])

    return verify


def _verify_bcrypt(password: bytes, raw: bytes) -> bool:
    # bcrypt only ever reads 72 bytes; Dovecot's crypt_blowfish ignores the
    # rest silently where python-bcrypt 5 raises, so cut like Dovecot does.
    return bcrypt.checkpw(password[:_BCRYPT_MAX_BYTES], raw)


def _verify_argon2(password: bytes, raw: bytes) -> bool:
    argon_type = _Argon2Type.ID if raw.startswith(b"$argon2id$") else _Argon2Type.I
    try:
        return _argon2_verify(raw, password, argon_type)
    except argon2.exceptions.VerificationError:
        return False


def _verify_des(password: bytes, raw: bytes) -> bool:
    return len(raw) == 13 and des_crypt.verify(password, raw.decode("ascii"))


def _passlib(handler) -> Callable[[bytes, bytes], bool]:
    def verify(password: bytes, raw: bytes) -> bool:
        return handler.verify(password, raw.decode("ascii"))

    return verify


# crypt(3) and Argon2 formats by the prefix of their data.
_BY_PREFIX: tuple[tuple[tuple[bytes, ...], Callable[[bytes, bytes], bool]], ...] = (
    ((b"$6$",), _passlib(sha512_crypt)),
    ((b"$5$",), _passlib(sha256_crypt)),
    ((b"$1$",), _passlib(md5_crypt)),
    ((b"$2a$", b"$2b$", b"$2y$"), _verify_bcrypt),
    ((b"$argon2id$", b"$argon2i$"), _verify_argon2),
)


def _verify_crypt(password: bytes, raw: bytes) -> bool:
    """
    Dovecot's CRYPT: whatever crypt(3) format the data is in.
    """
    for prefixes, verify in _BY_PREFIX:
        if raw.startswith(prefixes):
            return verify(password, raw)
    return _verify_des(password, raw)


def _only(prefixes: tuple[bytes, ...], verify) -> Callable[[bytes, bytes], bool]:
    """
    A verifier that refuses data not in the format its scheme names.
    """

    def checked(password: bytes, raw: bytes) -> bool:
        return raw.startswith(prefixes) and verify(password, raw)

    return checked


def _verify_md5(password: bytes, raw: bytes) -> bool:
    """
    Dovecot's C{MD5}: MD5-CRYPT, or else a hex (or base64) PLAIN-MD5 digest.
    """
    if raw.startswith(b"$1$"):
        return md5_crypt.verify(password, raw.decode("ascii"))
    digest = _decode(raw.decode("ascii"), _HEX, 16, guess=True)
    return digest is not None and _digest("md5")(password, digest)


def _scram(algorithm: str) -> Callable[[bytes, bytes], bool]:
    """
    Dovecot's SCRAM-SHA-*: C{iterations,salt,StoredKey,ServerKey}.
    """

    def verify(password: bytes, raw: bytes) -> bool:
        secret = scram.parse_dovecot(raw.decode("ascii"), algorithm)
        return secret is not None and scram.verify_password(secret, password)

    return verify


def _verify_cram_md5(password: bytes, raw: bytes) -> bool:
    return hmac.compare_digest(hmac_md5.context_of(password), raw)


_SCHEME_TABLE: dict[str, _Scheme] = {
    "PLAIN": _Scheme(_NONE, 0, _verify_plain, cheap=True),
    "CLEAR": _Scheme(_NONE, 0, _verify_plain, cheap=True),
    "CLEARTEXT": _Scheme(_NONE, 0, _verify_plain, cheap=True),
    "CRYPT": _Scheme(_NONE, 0, _verify_crypt),
    "DES-CRYPT": _Scheme(_NONE, 0, _verify_des),
    "MD5-CRYPT": _Scheme(_NONE, 0, _only((b"$1$",), _passlib(md5_crypt))),
    # MD5's data may be MD5-CRYPT (a thousand rounds) as well as a digest.
    "MD5": _Scheme(_NONE, 0, _verify_md5),
    "SHA256-CRYPT": _Scheme(_NONE, 0, _only((b"$5$",), _passlib(sha256_crypt))),
    "SHA512-CRYPT": _Scheme(_NONE, 0, _only((b"$6$",), _passlib(sha512_crypt))),
    "BLF-CRYPT": _Scheme(_NONE, 0, _only((b"$2a$", b"$2b$", b"$2y$"), _verify_bcrypt)),
    "ARGON2ID": _Scheme(_NONE, 0, _only((b"$argon2id$",), _verify_argon2)),
    "ARGON2I": _Scheme(_NONE, 0, _only((b"$argon2i$",), _verify_argon2)),
    "ARGON2": _Scheme(_NONE, 0, _only((b"$argon2id$", b"$argon2i$"), _verify_argon2)),
    "SHA": _Scheme(_B64, 20, _digest("sha1"), cheap=True),
    "SHA1": _Scheme(_B64, 20, _digest("sha1"), cheap=True),
    "SHA256": _Scheme(_B64, 32, _digest("sha256"), cheap=True),
    "SHA512": _Scheme(_B64, 64, _digest("sha512"), cheap=True),
    "PLAIN-MD5": _Scheme(_HEX, 16, _digest("md5"), cheap=True),
    "LDAP-MD5": _Scheme(_B64, 16, _digest("md5"), cheap=True),
    "SMD5": _Scheme(_B64, 0, _salted("md5"), cheap=True),
    "SSHA": _Scheme(_B64, 0, _salted("sha1"), cheap=True),
    "SSHA256": _Scheme(_B64, 0, _salted("sha256"), cheap=True),
    "SSHA512": _Scheme(_B64, 0, _salted("sha512"), cheap=True),
    "SCRAM-SHA-1": _Scheme(_NONE, 0, _scram("SHA-1")),
    "SCRAM-SHA-256": _Scheme(_NONE, 0, _scram("SHA-256")),
    "CRAM-MD5": _Scheme(_HEX, hmac_md5.CONTEXT_SIZE, _verify_cram_md5, cheap=True),
    "HMAC-MD5": _Scheme(_HEX, hmac_md5.CONTEXT_SIZE, _verify_cram_md5, cheap=True),
}

_PLAINTEXT_SCHEMES = frozenset({"PLAIN", "CLEAR", "CLEARTEXT"})
_CRAM_MD5_SCHEMES = frozenset({"CRAM-MD5", "HMAC-MD5"})
_SCRAM_SCHEMES = {"SCRAM-SHA-1": "SHA-1", "SCRAM-SHA-256": "SHA-256"}

#: What L{secret_kinds} can name: the challenge-response mechanisms a stored
#: value can serve.
SECRET_KINDS = frozenset({"PLAIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"})


def _lookup(name: str) -> tuple[str, _Scheme, str, bool]:
    """
    Find a scheme by its (case-insensitive) name with an optional encoding
    suffix.

    @return: the base name upper-cased, the scheme, the encoding to decode
        with and whether a suffix chose that encoding.
    @raise UnknownScheme: for an unknown scheme or encoding suffix.
    """
    base, dot, suffix = name.upper().partition(".")
    scheme = _SCHEME_TABLE.get(base)
    if scheme is None:
        raise UnknownScheme(f"unknown password scheme {name!r}")
    if not dot:
        return base, scheme, scheme.encoding, False
    encoding = _ENCODING_SUFFIXES.get(suffix)
    if encoding is None:
        raise UnknownScheme(f"unknown encoding {suffix!r} in password scheme {name!r}")
    return base, scheme, encoding, True


def _decode(data: str, encoding: str, raw_size: int, guess: bool) -> bytes | None:
    """
    Decode a stored value's data; C{None} when it is not validly encoded.

    With C{guess} (no explicit suffix) and a fixed C{raw_size}, data exactly
    twice that long is tried as hex first, like Dovecot's password_decode.
    """
    if encoding == _NONE:
        return data.encode("utf-8")
    try:
        ascii_data = data.encode("ascii")
    except UnicodeEncodeError:
        return None
    if guess and raw_size:
        encoding = _HEX if len(ascii_data) == 2 * raw_size else _B64
    raw = None
    if encoding == _HEX:
        try:
            raw = binascii.unhexlify(ascii_data)
        except (binascii.Error, ValueError):
            if not guess:
                return None
    if raw is None:
        try:
            raw = base64.b64decode(ascii_data, validate=True)
        except (binascii.Error, ValueError):
            return None
    if raw_size and len(raw) != raw_size:
        return None
    return raw


def parse_stored(stored: str) -> tuple[str, str]:
    """
    Split a stored password into its scheme name and data.

    A value without a C{{SCHEME}} prefix is Dovecot's default, C{CRYPT}.

    @return: C{(scheme, data)}: the scheme upper-cased as written, encoding
        suffix included (C{"PLAIN.B64"}), and the data after the prefix.
    @raise UnknownScheme: the prefix is unterminated or names an unknown
        scheme or encoding.
    """
    if not stored.startswith("{"):
        return _IMPLICIT_SCHEME, stored
    end = stored.find("}")
    if end < 0:
        raise UnknownScheme("password scheme prefix has no closing '}'")
    name = stored[1:end]
    _lookup(name)
    return name.upper(), stored[end + 1 :]


def _raw_value(stored: str) -> tuple[str, _Scheme, bytes] | None:
    """
    Parse and decode a stored value: (base scheme name, scheme, raw value),
    or C{None} when it is unknown or malformed.
    """
    try:
        name, data = parse_stored(stored)
    except UnknownScheme:
        return None
    base, scheme, encoding, explicit = _lookup(name)
    raw = _decode(data, encoding, scheme.raw_size, guess=not explicit)
    if raw is None:
        return None
    return base, scheme, raw


def verify_password(stored: str, password: bytes) -> bool:
    """
    Does C{password} match the stored password value C{stored}?

    @param stored: a Dovecot password value, C{{SCHEME}data} or bare crypt(3)
        data.
    @param password: the password the client sent.
    @return: C{True} only on a match.  An unknown scheme, malformed data,
        an empty value or an over-long password gives C{False}; this never
        raises.
    """
    try:
        if len(password) > MAX_PASSWORD_BYTES:
            return False
        parsed = _raw_value(stored)
        if parsed is None:
            return False
        _, scheme, raw = parsed
        return bool(raw) and bool(scheme.verify(password, raw))
    except Exception:
        # Malformed data surfaces as ValueError, TypeError, UnicodeError...
        # from three libraries; whatever it is, it is not a match.
        return False


def is_cheap(stored: str) -> bool:
    """
    Does verifying a password against C{stored} cost only a single fast
    digest or compare (PLAIN and its kin, the unsalted and salted SHA and
    MD5 digests, a CRAM-MD5 context)?  Callers run such checks inline
    rather than paying for a thread hand-off.

    C{False} for the deliberately slow schemes (crypt(3) variants, bcrypt,
    Argon2, SCRAM's PBKDF2), for C{{MD5}} (its data may be MD5-CRYPT) and
    for unknown or malformed values.  Never raises.
    """
    try:
        parsed = _raw_value(stored)
    except Exception:
        return False
    return parsed is not None and parsed[1].cheap


def plaintext_of(stored: str) -> bytes | None:
    """
    The plaintext password of a stored value that keeps one (PLAIN, CLEAR,
    CLEARTEXT and their C{.B64}/C{.HEX} forms), for challenge-response
    mechanisms such as APOP; C{None} for any other, a malformed or an empty
    value (an empty password never matches, here as in L{verify_password}).
    """
    parsed = _raw_value(stored)
    if parsed is None or parsed[0] not in _PLAINTEXT_SCHEMES:
        return None
    return parsed[2] or None


def cram_md5_context_of(stored: str) -> bytes | None:
    """
    The 32-byte HMAC-MD5 context of a C{{CRAM-MD5}} (or C{{HMAC-MD5}})
    value, which answers any CRAM-MD5 challenge (L{popd.auth.hmac_md5});
    C{None} for any other or a malformed value.
    """
    parsed = _raw_value(stored)
    if parsed is None or parsed[0] not in _CRAM_MD5_SCHEMES:
        return None
    return parsed[2]


def scram_secret_of(stored: str, algorithm: str) -> scram.ScramSecret | None:
    """
    The SCRAM secret of a C{{SCRAM-SHA-1}} or C{{SCRAM-SHA-256}} value for
    C{algorithm} (C{"SHA-1"} or C{"SHA-256"}); C{None} for any other value,
    one for the other hash, or a malformed one.  (A plaintext value serves
    SCRAM too, through L{scram.derive_secret}; that is the caller's choice
    of salt.)
    """
    parsed = _raw_value(stored)
    if parsed is None or _SCRAM_SCHEMES.get(parsed[0]) != algorithm:
        return None
    try:
        return scram.parse_dovecot(parsed[2].decode("ascii"), algorithm)
    except UnicodeDecodeError:
        return None


def secret_kinds(stored: str) -> frozenset[str]:
    """
    Which challenge-response mechanisms a stored value can serve, among
    L{SECRET_KINDS}: all of them for a plaintext password, C{CRAM-MD5} for
    a CRAM-MD5 context, C{SCRAM-SHA-1} or C{SCRAM-SHA-256} for a SCRAM
    secret, none for a hash.  (C{"PLAIN"} means the plaintext itself is
    there, which APOP needs.)
    """
    parsed = _raw_value(stored)
    if parsed is None or not parsed[2]:
        return frozenset()
    name = parsed[0]
    if name in _PLAINTEXT_SCHEMES:
        return SECRET_KINDS
    if name in _CRAM_MD5_SCHEMES:
        return frozenset({"CRAM-MD5"})
    if name in _SCRAM_SCHEMES:
        if scram_secret_of(stored, _SCRAM_SCHEMES[name]) is None:
            return frozenset()
        return frozenset({name})
    return frozenset()


def hash_password(
    password: bytes, scheme: str = DEFAULT_SCHEME, *, rounds: int | None = None
) -> str:
    """
    Make a stored password value the way C{doveadm pw -s SCHEME} prints it,
    so it verifies in Dovecot as well as in popd.

    @param password: the new password; at most L{MAX_PASSWORD_BYTES} bytes
        and no NUL (Dovecot reads passwords as C strings).
    @param scheme: one of L{SCHEMES}, any letter case.
    @param rounds: like C{doveadm pw -r}: Argon2 time cost, SHA-crypt rounds,
        bcrypt's log2 cost or SCRAM's iterations; ignored by the others.
        C{None} for popd's defaults.
    @return: C{"{SCHEME}data"}.  PLAIN gives C{{PLAIN.B64}} when the password
        is not UTF-8 or holds a character a passwd-file line cannot (C{:} or
        a control character).
    @raise UnknownScheme: C{scheme} is not one of L{SCHEMES}.
    @raise ValueError: the password or C{rounds} cannot be used with it.
    """
    name = scheme.upper()
    if name not in SCHEMES:
        raise UnknownScheme(
            f"cannot hash with {scheme!r}; choose one of {', '.join(SCHEMES)}"
        )
    if b"\0" in password:
        raise ValueError("a password cannot contain a NUL byte")
    if len(password) > MAX_PASSWORD_BYTES:
        raise ValueError(f"a password cannot be longer than {MAX_PASSWORD_BYTES} bytes")

    if name == "ARGON2ID":
        hasher = argon2.PasswordHasher(
            time_cost=rounds or _ARGON2_TIME_COST,
            memory_cost=_ARGON2_MEMORY_KIB,
            parallelism=1,
            hash_len=32,
            salt_len=16,
            type=_Argon2Type.ID,
        )
        data = hasher.hash(password)
    elif name == "BLF-CRYPT":
        if len(password) > _BCRYPT_MAX_BYTES:
            raise ValueError(
                f"BLF-CRYPT only uses a password's first {_BCRYPT_MAX_BYTES} bytes;"
                " use ARGON2ID for longer passwords"
            )
        salt = bcrypt.gensalt(rounds or _BCRYPT_COST, prefix=b"2b")
        # $2b$ and $2y$ are the same algorithm; Dovecot writes $2y$.
        data = "$2y$" + bcrypt.hashpw(password, salt).decode("ascii")[4:]
    elif name in ("SHA512-CRYPT", "SHA256-CRYPT"):
        handler = sha512_crypt if name == "SHA512-CRYPT" else sha256_crypt
        data = handler.using(rounds=rounds or _SHA_CRYPT_ROUNDS).hash(password)
    elif name in ("SSHA512", "SSHA256"):
        salt = os.urandom(_SSHA_SALT_BYTES)
        algorithm = "sha512" if name == "SSHA512" else "sha256"
        digest = hashlib.new(algorithm, password + salt).digest()
        data = base64.b64encode(digest + salt).decode("ascii")
    elif name in _SCRAM_SCHEMES:
        iterations = rounds or scram.DEFAULT_ITERATIONS
        if not 1 <= iterations <= scram.MAX_ITERATIONS:
            raise ValueError(
                f"SCRAM iterations must be 1 to {scram.MAX_ITERATIONS}, not {rounds}"
            )
        secret = scram.derive_secret(
            password, _SCRAM_SCHEMES[name], iterations=iterations
        )
        data = secret.dovecot()
    elif name == "CRAM-MD5":
        data = hmac_md5.context_of(password).hex()
    elif name == "MD5-CRYPT":
        data = md5_crypt.hash(password)
    else:
        return _plain(password)
    return f"{{{name}}}{data}"


def _plain(password: bytes) -> str:
    try:
        text = password.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if (
        text is None
        or ":" in text
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
    ):
        return "{PLAIN.B64}" + base64.b64encode(password).decode("ascii")
    return "{PLAIN}" + text


_dummy_lock = threading.Lock()
_dummy: str | None = None


def dummy_hash() -> str:
    """
    A stored password in the default scheme that no one knows the password
    of.  Checkers verify against it for unknown users, so a failed login
    costs the same whether or not the user exists.  Made on first use.
    """
    global _dummy
    with _dummy_lock:
        if _dummy is None:
            _dummy = hash_password(os.urandom(32).hex().encode("ascii"))
        return _dummy


def __getattr__(name: str) -> str:
    # DUMMY_HASH is computed lazily: importing this module stays cheap.
    if name == "DUMMY_HASH":
        return dummy_hash()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
