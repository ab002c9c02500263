"""
EXTERNAL (RFC 4422 appendix A) with a TLS client certificate.

Offered only over TLS, when the client presented a certificate that the TLS
layer verified against C{[tls] client_ca}, and when C{[auth] external} is
on.  The certificate names the user:

  - the names it carries are its subject's common names (CN), then its
    e-mail addresses (subjectAltName rfc822Name entries), in order: CN
    first, like Dovecot's default C{ssl_cert_username_field = commonName};
  - with an empty authorization identity the user is the first of these
    (skipping any that holds the folder separator);
  - a client may instead name one of them as its authorization identity,
    exactly as written in the certificate, optionally with a folder suffix
    (C{alice@example.org#Archive}).

The checker then only says whether that user exists and may log in.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID
from zope.interface import implementer

from popd.auth.credentials import CertificateCredentials, ICertificateCredentials
from popd.sasl.base import Challenge, ISASLMechanism, SASLContext, SASLError
from popd.sasl.simple import Exchange

__all__ = ["EXTERNAL", "ExternalExchange", "certificate_identities"]


def certificate_identities(certificate) -> list[str]:
    """
    The user names a certificate carries: its subject CNs, then its
    rfc822Name subjectAltNames, in order, without duplicates.
    """
    names = [
        attribute.value
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    try:
        extension = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except x509.ExtensionNotFound:
        pass
    else:
        names += extension.value.get_values_for_type(x509.RFC822Name)
    unique: list[str] = []
    for name in names:
        if isinstance(name, str) and name and name not in unique:
            unique.append(name)
    return unique


class ExternalExchange(Exchange):
    def step(self, response: bytes | None) -> Challenge | CertificateCredentials:
        if response is None:
            return Challenge(b"")
        certificate = self.context.peer_certificate
        identities = certificate_identities(certificate)
        account = self.context.account_name
        if not response:
            for identity in identities:
                encoded = identity.encode("utf-8")
                if account(encoded) == encoded:
                    return CertificateCredentials(encoded, certificate)
            raise SASLError("The client certificate names no user.")
        try:
            name = account(response).decode("utf-8")
        except UnicodeDecodeError:
            raise SASLError("Malformed EXTERNAL authorization identity.") from None
        if name not in identities:
            raise SASLError("The client certificate does not name that user.")
        return CertificateCredentials(response, certificate)


@implementer(ISASLMechanism)
class ExternalMechanism:
    name = "EXTERNAL"
    plaintext = False

    def available(self, context: SASLContext) -> bool:
        return (
            context.secure
            and context.peer_certificate is not None
            and context.can_check(ICertificateCredentials)
        )

    def start(self, context: SASLContext) -> ExternalExchange:
        return ExternalExchange(context)

    def __repr__(self) -> str:
        return "<SASL mechanism EXTERNAL>"


EXTERNAL = ExternalMechanism()
