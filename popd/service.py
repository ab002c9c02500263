"""
The twistd service tree, built from L{Settings}: the portal, the maildrop
provider and one listener per configured endpoint.

This module and the twistd plugin are the only places that know every
part; everything else meets through interfaces.
"""

from __future__ import annotations

from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from popd.auth.passwdfile import PasswdFile, PasswdFileChecker
from popd.config import ConfigError, Settings
from popd.interfaces import IMaildropProvider
from popd.maildrops.maildir import MaildirProvider
from popd.protocol import POP3Factory, SessionPolicy
from popd.realm import MaildropRealm
from popd.tls import create_self_signed, load_certificate_options

log = Logger()


class ListenerService(Service):
    """
    Listens on one endpoint while running.

    The port is bound in C{privilegedStartService}, before twistd drops root
    privileges, and a failure to bind stops the start with a clear message.
    """

    def __init__(self, reactor, description: str, factory, label: str) -> None:
        self.description = description
        self.factory = factory
        self.label = label
        self.port = None
        self.setName(f"{label} {description}")
        try:
            self.endpoint = serverFromString(reactor, description)
        except (ValueError, TypeError, KeyError) as error:
            raise ConfigError(
                f"[{label}] listen: {description!r} is not a valid endpoint: {error}"
            ) from None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        outcome: list = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            # twistd would print a traceback for any other exception.
            raise SystemExit(
                f"popd: [{self.label}] listen: cannot listen on "
                f"{self.description!r}: {outcome[0].getErrorMessage()}"
            )
        self.port = outcome[0] if outcome else None
        log.info(
            "{label} listening on {address} ({description})",
            label=self.label.upper(),
            address=_address(self.port),
            description=self.description,
        )

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def _address(port) -> str:
    if port is None:
        return "(pending)"
    host = port.getHost()
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    return str(getattr(host, "name", host))


def build_provider(settings: Settings) -> IMaildropProvider:
    """
    The maildrop store the settings name.
    """
    return MaildirProvider(settings.maildrop_path)


def build_portal(settings: Settings, provider: IMaildropProvider) -> Portal:
    """
    A portal whose realm opens maildrops from C{provider}, checking
    passwords against the passwd-file.
    """
    checker = PasswdFileChecker(PasswdFile(settings.passwd_file))
    return Portal(MaildropRealm(provider), [checker])


def build_policy(settings: Settings) -> SessionPolicy:
    """
    The per-session part of the settings.
    """
    return SessionPolicy(
        plaintext=settings.plaintext,
        trusted_networks=settings.trusted_networks,
        auth_timeout=settings.auth_timeout,
        transaction_timeout=settings.transaction_timeout,
        max_bad_commands=settings.max_bad_commands,
        max_auth_failures=settings.max_auth_failures,
        apop=settings.apop,
        expire=settings.expire,
        login_delay=settings.login_delay,
        folder_separator=settings.folder_separator,
    )


def prepare_tls(settings: Settings, hostname: str):
    """
    Load the certificate options, first creating the self-signed pair of
    the embedded defaults if it does not exist yet.
    """
    certificate, key = settings.tls_certificate, settings.tls_key
    if settings.generated_tls and not (certificate.exists() and key.exists()):
        create_self_signed(certificate, key, hostname)
        log.info(
            "created a self-signed TLS certificate {certificate}",
            certificate=str(certificate),
        )
    return load_certificate_options(certificate, key, settings.tls_min_version)


def make_service(settings: Settings, reactor=None) -> MultiService:
    """
    Every listener of C{settings}, sharing one portal and one policy.
    """
    if reactor is None:
        from twisted.internet import reactor
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    policy = build_policy(settings)
    tls_options = prepare_tls(settings, policy.hostname)
    portal = build_portal(settings, build_provider(settings))

    top = MultiService()
    plain = POP3Factory(portal, policy, tls_options=tls_options)
    for description in settings.pop3_listen:
        ListenerService(reactor, description, plain, "pop3").setServiceParent(top)
    implicit = TLSMemoryBIOFactory(
        tls_options, False, POP3Factory(portal, policy, implicit_tls=True)
    )
    for description in settings.pop3s_listen:
        ListenerService(reactor, description, implicit, "pop3s").setServiceParent(top)
    return top
