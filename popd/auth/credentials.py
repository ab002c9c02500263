"""
Cred credentials particular to POP3 and its SASL mechanisms, and the
interfaces through which a checker says what it can check.

What each login method hands the portal, and what a checker needs to
accept it:

  - USER/PASS, PLAIN, LOGIN: Twisted's L{IUsernamePassword}; any checker.
  - APOP: L{APOPCredentials} (L{IUsernameHashedPassword}); the checker must
    know the plaintext password.
  - CRAM-MD5: L{CramMD5Credentials} (L{ICramMD5Credentials}, which extends
    L{IUsernameHashedPassword}); the plaintext, or Dovecot's stored HMAC-MD5
    context (L{ICramMD5Credentials.checkHMACMD5Context}).
  - SCRAM-SHA-1/-256: L{ScramCredentials} (L{IScramSHA1Credentials} or
    L{IScramSHA256Credentials}); the checker must also provide
    L{IScramSecretSource}, since the mechanism needs the salt before the
    client can prove anything.
  - EXTERNAL: L{CertificateCredentials} (L{ICertificateCredentials}); the
    TLS layer verified the certificate, the checker only says whether that
    user exists and may log in.

A checker lists in C{credentialInterfaces} all it can ever check (the portal
routes by them); one that provides L{IUsableCredentials} also says which of
those can succeed for some user right now, so that CAPA offers only
mechanisms that can work.
"""

from __future__ import annotations

import hashlib
import hmac

from twisted.cred.credentials import ICredentials, IUsernameHashedPassword
from zope.interface import Attribute, Interface, alsoProvides, implementer

from popd.auth import hmac_md5, scram
from popd.auth.scram import ScramSecret

__all__ = [
    "APOPCredentials",
    "CertificateCredentials",
    "CramMD5Credentials",
    "ICertificateCredentials",
    "ICramMD5Credentials",
    "IScramCredentials",
    "IScramSHA1Credentials",
    "IScramSHA256Credentials",
    "IScramSecretSource",
    "IUsableCredentials",
    "SCRAM_INTERFACES",
    "ScramCredentials",
    "ScramSecret",
    "scram_secret_source",
    "usable_credential_interfaces",
]


class IUsableCredentials(Interface):
    """
    A checker that knows which of its C{credentialInterfaces} can succeed
    now: a password database holding only hashes cannot check APOP or
    CRAM-MD5, one without SCRAM secrets or plaintexts cannot check SCRAM.
    """

    def usableCredentialInterfaces():
        """
        The subset of C{credentialInterfaces} that can succeed for at least
        one user now.  Called on the reactor thread for every CAPA: it must
        not block (answer from what was last read, and refresh elsewhere).

        @return: a collection of interfaces.
        """


class ICramMD5Credentials(IUsernameHashedPassword):
    """
    A CRAM-MD5 (RFC 2195) response.  C{checkPassword(plaintext)} checks it
    with the password; a checker that only keeps Dovecot's HMAC-MD5 context
    uses L{checkHMACMD5Context}.
    """

    def checkHMACMD5Context(context):
        """
        @param context: the 32-byte HMAC-MD5 context of the password
            (L{popd.auth.hmac_md5.context_of}).
        @return: whether the response was made with that password.
        """


class IScramCredentials(ICredentials):
    """
    The client's final SCRAM message: a proof that it knows the password,
    for the salt and iteration count the server sent it.
    """

    username = Attribute("bytes: the user name the client sent (n=), unescaped.")
    algorithm = Attribute('str: "SHA-1" or "SHA-256".')

    def checkSecret(secret):
        """
        @param secret: the user's L{ScramSecret} for this algorithm.
        @return: whether the client's proof matches that secret (and it is
            the salt and iteration count the client was given).
        """


class IScramSHA1Credentials(IScramCredentials):
    """
    SCRAM-SHA-1 credentials: a checker lists this interface if it can look
    up SHA-1 secrets.
    """


class IScramSHA256Credentials(IScramCredentials):
    """
    SCRAM-SHA-256 credentials: a checker lists this interface if it can
    look up SHA-256 secrets.
    """


#: The credentials interface of each SCRAM algorithm.
SCRAM_INTERFACES = {"SHA-1": IScramSHA1Credentials, "SHA-256": IScramSHA256Credentials}


class IScramSecretSource(Interface):
    """
    A checker that can hand out SCRAM secrets, which the SCRAM mechanisms
    need before the client's proof (the salt and the iteration count go to
    the client first).
    """

    def scram_secret(username, algorithm):
        """
        @param username: the user name (C{bytes}, UTF-8, or C{str}), without
            any folder suffix.
        @param algorithm: C{"SHA-1"} or C{"SHA-256"}.
        @return: a L{Deferred} firing with the user's L{ScramSecret}, or
            with C{None} when there is no such user or no secret for that
            algorithm.  The salt of a secret derived from a plaintext
            password must stay the same between calls, since the checker
            looks the secret up again to check the proof.
        """


class ICertificateCredentials(ICredentials):
    """
    A user named by a TLS client certificate that the TLS layer verified
    against the configured CAs (SASL EXTERNAL).
    """

    username = Attribute("bytes: the user the certificate names.")
    certificate = Attribute("cryptography.x509.Certificate: the client's certificate.")


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


@implementer(IUsernameHashedPassword)
class APOPCredentials:
    """
    What an APOP command proves (RFC 1939, section 7): the client knows the
    password whose MD5 digest, after the greeting's challenge, it sent.

    A checker that can recover the user's plaintext password calls
    L{checkPassword} with it; no other checker can verify APOP.

    @ivar username: the name as the client sent it.
    @ivar challenge: the server's greeting timestamp, angle brackets included
        (C{b"<1896.697170952@dbc.mtview.ca.us>"}).
    @ivar digest: the hex digest the client sent, in either letter case.
    """

    def __init__(self, username: bytes, challenge: bytes, digest: bytes) -> None:
        self.username = username
        self.challenge = challenge
        self.digest = digest

    def checkPassword(self, password: bytes | str) -> bool:
        """
        Is C{digest} the MD5 of C{challenge + password}?  Compared in
        constant time so the reply's timing says nothing about the digest.
        """
        if isinstance(password, str):
            password = password.encode("utf-8")
        expected = hashlib.md5(self.challenge + password).hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.digest.lower())

    def __repr__(self) -> str:
        # Never show the digest: it is a password equivalent for this session.
        return f"<APOPCredentials username={self.username!r}>"


@implementer(ICramMD5Credentials)
class CramMD5Credentials:
    """
    What a CRAM-MD5 response (RFC 2195) proves: the client knows the key
    whose HMAC-MD5 of the server's C{challenge} is C{digest}.

    @ivar username: the name as the client sent it.
    @ivar challenge: the challenge the server sent (C{<...@host>}).
    @ivar digest: the hex digest the client sent (lower case per the RFC;
        either case accepted).
    """

    def __init__(self, username: bytes, challenge: bytes, digest: bytes) -> None:
        self.username = username
        self.challenge = challenge
        self.digest = digest

    def _matches(self, expected: bytes) -> bool:
        return hmac.compare_digest(expected.hex().encode("ascii"), self.digest.lower())

    def checkPassword(self, password: bytes | str) -> bool:
        expected = hmac.new(_as_bytes(password), self.challenge, "md5").digest()
        return self._matches(expected)

    def checkHMACMD5Context(self, context: bytes) -> bool:
        if len(context) != hmac_md5.CONTEXT_SIZE:
            return False
        return self._matches(hmac_md5.hmac_md5_with_context(context, self.challenge))

    def __repr__(self) -> str:
        return f"<CramMD5Credentials username={self.username!r}>"


class ScramCredentials:
    """
    The end of a SCRAM exchange (RFC 5802): the client's proof over the
    AuthMessage, for the salt and iteration count it was sent.

    Provides L{IScramSHA1Credentials} or L{IScramSHA256Credentials} after
    its C{algorithm}, so the portal finds a checker that has such secrets.
    """

    def __init__(
        self,
        username: bytes,
        algorithm: str,
        auth_message: bytes,
        proof: bytes,
        salt: bytes,
        iterations: int,
    ) -> None:
        self.username = username
        self.algorithm = algorithm
        self.auth_message = auth_message
        self.proof = proof
        self.salt = salt
        self.iterations = iterations
        # One class for both algorithms: what it provides follows the
        # instance's algorithm.
        alsoProvides(self, SCRAM_INTERFACES[algorithm])

    def checkSecret(self, secret: ScramSecret) -> bool:
        if (
            secret.algorithm != self.algorithm
            or secret.iterations != self.iterations
            or not hmac.compare_digest(secret.salt, self.salt)
        ):
            return False
        return scram.verify_proof(secret, self.auth_message, self.proof)

    def __repr__(self) -> str:
        return f"<ScramCredentials {self.algorithm} username={self.username!r}>"


@implementer(ICertificateCredentials)
class CertificateCredentials:
    """
    SASL EXTERNAL over TLS: the user the verified client certificate names.
    """

    def __init__(self, username: bytes, certificate) -> None:
        self.username = username
        self.certificate = certificate

    def __repr__(self) -> str:
        return f"<CertificateCredentials username={self.username!r}>"


def usable_credential_interfaces(checker) -> frozenset:
    """
    What C{checker} can check now: its own answer if it provides
    L{IUsableCredentials}; for a chain of checkers (one with a C{checkers}
    list, like L{popd.auth.chain.CheckerChain}) the union of its members';
    otherwise everything it lists in C{credentialInterfaces}.
    """
    if IUsableCredentials.providedBy(checker):
        return frozenset(checker.usableCredentialInterfaces())
    members = getattr(checker, "checkers", None)
    if isinstance(members, list | tuple):
        usable: set = set()
        for member in members:
            usable |= usable_credential_interfaces(member)
        return frozenset(usable)
    return frozenset(getattr(checker, "credentialInterfaces", ()))


@implementer(IScramSecretSource)
class _FirstSecret:
    """
    The secret sources of a chain's members, asked in order: the first
    secret found wins, as the first checker to accept wins in the chain.
    """

    def __init__(self, sources: list) -> None:
        self.sources = sources

    def scram_secret(self, username, algorithm: str):
        from twisted.internet.defer import maybeDeferred, succeed

        def ask(secret, index: int):
            if secret is not None or index >= len(self.sources):
                return secret
            d = maybeDeferred(self.sources[index].scram_secret, username, algorithm)
            return d.addCallback(ask, index + 1)

        return succeed(None).addCallback(ask, 0)


def scram_secret_source(checker, algorithm: str):
    """
    Where SCRAM-C{algorithm} secrets come from for C{checker}: itself if it
    provides L{IScramSecretSource}; for a chain of checkers, those of its
    members that check that algorithm, asked in order; else C{None}.
    """
    if IScramSecretSource.providedBy(checker):
        return checker
    members = getattr(checker, "checkers", None)
    if not isinstance(members, list | tuple):
        return None
    interface = SCRAM_INTERFACES[algorithm]
    sources = [
        source
        for member in members
        if interface in getattr(member, "credentialInterfaces", ())
        and (source := scram_secret_source(member, algorithm)) is not None
    ]
    return _FirstSecret(sources) if sources else None
