"""
The twistd service tree, built from L{Settings}: the portal, the maildrop
provider and one listener per configured endpoint.

This module and the twistd plugin are the only places that know every
part; everything else meets through interfaces.
"""

from __future__ import annotations

import os
import signal
import threading

from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from popd.auth.chain import CheckerChain
from popd.auth.factories import build_checkers
from popd.auth.passwdfile import STALE, PasswdEntry, PasswdFile
from popd.config import ConfigError, Settings
from popd.interfaces import IMaildropProvider
from popd.maildrops.maildir import MaildirProvider
from popd.protocol import POP3Factory, SessionPolicy
from popd.realm import MaildropRealm
from popd.tls import ServerTLS, create_self_signed, server_tls

log = Logger()

#: The listen backlog asked for where a listener's description names none.
#: Twisted's default, 50, overflows when hundreds of clients connect at once
#: (a burst of reconnections): Linux then drops their handshakes, and the
#: clients wait for a greeting for seconds or time out.  The kernel caps the
#: figure at net.core.somaxconn.
DEFAULT_BACKLOG = 1024
_BACKLOG_KINDS = frozenset({"tcp", "tcp6", "unix", "ssl"})


#: Descriptors a connection may hold at once: its socket, its maildrop's
#: lock file and a message being sent.
_FILES_PER_CONNECTION = 3
#: Descriptors for everything else: listeners, log, database, threads.
_FILES_SPARE = 1024


def raise_open_files_limit(max_connections: int, reactor) -> None:
    """
    Raise the soft open-files limit as far as C{max_connections} needs and
    the hard limit allows.  Shells and systemd start services with a soft
    limit of 1024 (systemd's hard one is 524288), which would stop popd
    near 1,000 connections whatever C{[limits] max_connections} says: past
    it, Twisted accepts and at once closes new connections ("EMFILE
    recovery").  Not under the select reactor, which cannot watch
    descriptors past FD_SETSIZE (1024).
    """
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    from twisted.internet.selectreactor import SelectReactor

    if isinstance(reactor, SelectReactor):
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max_connections:
        wanted = max_connections * _FILES_PER_CONNECTION + _FILES_SPARE
    else:
        wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    # At least one descriptor per connection, or some will be cut off.
    needed = max_connections + _FILES_SPARE
    if max_connections and soft != resource.RLIM_INFINITY and soft < needed:
        log.warn(
            "The open-files limit ({limit}) is below what [limits] "
            "max_connections = {connections} needs ({needed}): raise the hard "
            "limit (systemd: LimitNOFILE=) or lower max_connections",
            limit=soft,
            connections=max_connections,
            needed=needed,
        )


def with_backlog(description: str) -> str:
    """
    C{description} with C{backlog=DEFAULT_BACKLOG} added for the endpoint
    kinds that take one, unless it says a backlog itself.
    """
    kind = description.partition(":")[0].strip().lower()
    if kind in _BACKLOG_KINDS and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


class ListenerService(Service):
    """
    Listens on one endpoint while running.

    The port is bound in C{privilegedStartService}, before twistd drops root
    privileges, and a failure to bind stops the start with a clear message.
    """

    def __init__(
        self,
        reactor,
        description: str,
        factory,
        label: str,
        inherited: tuple[int, int] | None = None,
        serve: bool = True,
    ) -> None:
        """
        @param inherited: in a worker process, C{(descriptor, address
            family)} of the listening socket its master bound, to adopt
            instead of binding C{description}.
        @param serve: C{False} in the master of worker processes, which
            binds the socket (as root, for ports below 1024) but leaves
            accepting connections to the workers.
        """
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.label = label
        self.inherited = inherited
        self.serve = serve
        self.port = None
        self.endpoint = None
        if inherited is not None:
            return
        try:
            self.endpoint = serverFromString(reactor, with_backlog(description))
        except IndexError:
            # systemd:...:index=N past the sockets systemd passed (or none).
            raise ConfigError(
                f"[{label}] listen: {description!r}: no such socket was passed "
                "by systemd (LISTEN_FDS, LISTEN_FDNAMES)"
            ) from None
        except (ValueError, TypeError, KeyError) as error:
            raise ConfigError(
                f"[{label}] listen: {description!r} is not a valid endpoint: {error}"
            ) from None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.inherited is not None:
            descriptor, family = self.inherited
            self.port = self.reactor.adoptStreamPort(descriptor, family, self.factory)
            os.close(descriptor)  # adoptStreamPort took a duplicate
            log.info(
                "{label} accepting on {address} (from the master)",
                label=self.label.upper(),
                address=_address(self.port),
            )
            return
        outcome: list = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            # twistd would print a traceback for any other exception.
            raise SystemExit(
                f"popd: [{self.label}] listen: cannot listen on "
                f"{self.description!r}: {outcome[0].getErrorMessage()}"
            )
        self.port = outcome[0] if outcome else None
        if not self.serve and self.port is not None:
            self.port.stopReading()
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
    name = getattr(host, "name", None)
    return os.fsdecode(name) if name is not None else str(host)


def build_provider(settings: Settings) -> IMaildropProvider:
    """
    The maildrop store the settings name (C{[maildrop] type}).
    """
    if settings.maildrop_type == "mbox":
        from popd.maildrops.mbox import MboxProvider

        return MboxProvider(
            settings.maildrop_path,
            folder_dir_template=settings.mbox_folders,
            variant=settings.mbox_variant,
        )
    if settings.maildrop_type == "sql":
        from popd.maildrops.sql import SQLProvider

        try:
            return SQLProvider.from_dsn(settings.dsn)
        except ValueError as error:
            raise ConfigError(f"[maildrop] dsn: {error}") from None
    return MaildirProvider(
        settings.maildrop_path,
        cache_messages=settings.maildir_cache_messages,
        index=settings.maildir_index,
    )


def build_portal(settings: Settings, provider: IMaildropProvider) -> Portal:
    """
    A portal whose realm opens maildrops from C{provider}, checking
    passwords with the configured checkers (C{[auth] checkers} or
    C{--auth}; the passwd-file by default), asked in order.
    """
    try:
        checkers = build_checkers(
            settings.checkers, settings.sql_dsn, settings.sql_query
        )
    except ValueError as error:
        raise ConfigError(f"[auth] checkers: {error}") from None
    if not checkers:
        raise ConfigError("[auth] checkers: no user database configured")
    log.info(
        "users from {checkers}",
        checkers=", ".join(d.partition(":")[0] for d in settings.checkers),
    )
    realm = MaildropRealm(provider, user_expire=passwd_file_expire(settings))
    return Portal(realm, [CheckerChain(checkers)])


def passwd_file_expire(settings: Settings):
    """
    A user's own retention policy from the passwd-file's C{expire=} extra
    field (days after first retrieval, or C{NEVER}), where users live in
    passwd-files; C{None} where they do not.
    """
    files = [
        PasswdFile(description.partition(":")[2])
        for description in settings.checkers
        if description.startswith("passwd-file:")
    ]
    if not files:
        return None

    def expire_of(entry: PasswdEntry) -> str | None:
        value = entry.extra.get("expire")
        if value is not None and (value == "NEVER" or value.isdigit()):
            return value
        return None

    def read(avatar_id: str) -> str | None:
        for passwd_file in files:
            entry = passwd_file.lookup(avatar_id)
            if entry is not None:
                return expire_of(entry)
        return None

    def user_expire(avatar_id: str) -> Deferred:
        # What the files said less than a second ago is answered at once;
        # reading them again is never done on the reactor thread.
        for passwd_file in files:
            entry = passwd_file.cached_lookup(avatar_id)
            if entry is STALE:
                return deferToThread(read, avatar_id)
            if entry is not None:
                return succeed(expire_of(entry))
        return succeed(None)

    return user_expire


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
        failure_delay=settings.failure_delay,
        apop=settings.apop,
        expire=settings.expire,
        per_user_expire=settings.expire is not None
        and any(d.startswith("passwd-file:") for d in settings.checkers),
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
    # Client certificates are only asked for where SASL EXTERNAL uses them.
    client_ca = settings.tls_client_ca if settings.external else None
    return server_tls(
        certificate,
        key,
        settings.tls_min_version,
        client_ca=client_ca,
        ciphers=settings.tls_ciphers,
        sni=settings.tls_sni,
    )


def build_mechanisms(settings: Settings) -> tuple:
    """
    The SASL mechanisms C{[auth] mechanisms} names, in order: built in,
    registered with L{popd.sasl.register_mechanism}, or Twisted plugins.
    """
    from popd import sasl

    try:
        return sasl.registry.select(settings.sasl_mechanisms)
    except sasl.UnknownMechanism as error:
        known = ", ".join(sasl.registry.names())
        raise ConfigError(
            f"[auth] mechanisms: no SASL mechanism {error.args[0]!r} (known: {known})"
        ) from None


class PopdService(MultiService):
    """
    The whole server of one process: its listeners, plus what a running
    server does as a whole.

      - SIGHUP reloads the TLS certificates (L{ServerTLS.reload}: new
        handshakes get the new ones, sessions go on) and reopens
        C{[server] log_file}.
      - Under twistd it installs the log observer of C{[server]
        log_format} and C{log_file} (as the application's
        C{ILogObserver}, which twistd uses unless given C{--logger}).
    """

    def __init__(self, settings: Settings, reactor, tls: ServerTLS | None = None):
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.tls = tls
        self._log_output = None
        self._previous_hup = None

    def setServiceParent(self, parent) -> None:
        if hasattr(parent, "setComponent"):  # twistd's application
            from twisted.logger import ILogObserver

            from popd.logging import observer_for, open_log_file

            self._log_output = open_log_file(self.settings)
            observer = observer_for(self.settings, self._log_output)
            if observer is not None:
                parent.setComponent(ILogObserver, observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP") and threading.current_thread() is (
            threading.main_thread()
        ):
            self._previous_hup = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self):
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        return super().stopService()

    def _hangup(self, signum, frame) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """
        What SIGHUP does: reload the TLS certificates, reopen the log file.
        """
        log.info("SIGHUP: reloading TLS certificates and reopening the log")
        if self._log_output is not None:
            self._log_output.reopen()
        if self.tls is not None:
            self.tls.reload()


PROXY_PREFIX = "haproxy:"


def split_proxy(description: str) -> tuple[str, bool]:
    """
    C{haproxy:tcp:110} is C{tcp:110} with the PROXY protocol (Twisted's
    endpoint syntax; popd wraps it itself, see L{popd.proxy}).
    """
    if description.startswith(PROXY_PREFIX):
        return description[len(PROXY_PREFIX) :], True
    return description, False


def listeners(settings: Settings) -> list[tuple[str, int, str]]:
    """
    Every listener of C{settings} as C{(label, index, description)}, in
    the order they are started: delivery first, so that once POP3 says it
    listens, so does everything.
    """
    return [
        (label, index, description)
        for label, descriptions in (
            ("lmtp", settings.lmtp_listen),
            ("smtp", settings.smtp_listen),
            ("pop3", settings.pop3_listen),
            ("pop3s", settings.pop3s_listen),
        )
        for index, description in enumerate(descriptions)
    ]


def listener_service(
    reactor,
    settings: Settings,
    label: str,
    description: str,
    factory,
    inherited: tuple[int, int] | None = None,
    serve: bool = True,
) -> ListenerService:
    """
    The listener for one C{description}, with the PROXY protocol in front
    of C{factory} where C{[label] proxy_protocol} or a C{haproxy:} prefix
    asks for it.
    """
    endpoint, proxied = split_proxy(description)
    proxied = proxied or getattr(settings, f"{label}_proxy_protocol", False)
    if proxied:
        if not settings.trusted_proxies:
            raise ConfigError(
                f"[{label}] listen: {description!r} speaks the PROXY protocol, "
                "which needs [server] trusted_proxies"
            )
        from popd.proxy import ProxyFactory

        factory = ProxyFactory(factory, settings.trusted_proxies, label, reactor)
    return ListenerService(
        reactor, endpoint, factory, label, inherited=inherited, serve=serve
    )


def make_service(
    settings: Settings, reactor=None, inherited: dict | None = None
) -> MultiService:
    """
    Every listener of C{settings}, sharing one portal and one policy; with
    C{[server] workers} above 1, the master that runs that many worker
    processes instead (L{popd.workers}).

    @param inherited: in a worker process (L{popd.worker}), the listening
        sockets the master bound, C{{(label, index): (descriptor,
        family)}} (see L{listeners}).
    """
    if reactor is None:
        from twisted.internet import reactor
    if settings.workers > 1 and inherited is None:
        from popd.workers import make_master

        return make_master(settings, reactor)
    from popd.limits import ConnectionLimiter, LimitedFactory, limits_per_worker

    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    raise_open_files_limit(settings.max_connections, reactor)
    policy = build_policy(settings)
    tls = prepare_tls(settings, policy.hostname)
    provider = build_provider(settings)
    portal = build_portal(settings, provider)
    mechanisms = build_mechanisms(settings)

    factories = {}
    if settings.lmtp_listen or settings.smtp_listen:
        from popd.delivery import local_delivery
        from popd.delivery.server import LMTPFactory, SMTPDeliveryFactory

        delivery = local_delivery(settings, provider, policy.hostname)
        factories["lmtp"] = LMTPFactory(delivery)
        factories["smtp"] = SMTPDeliveryFactory(delivery)
    # One count for both POP3 listeners, behind the PROXY protocol (the
    # real client address) and inside TLS (the refusal reaches the client).
    limiter = ConnectionLimiter(
        *limits_per_worker(
            settings.max_connections,
            settings.max_connections_per_ip,
            settings.workers,
        )
    )
    factories["pop3"] = LimitedFactory(
        POP3Factory(portal, policy, tls_options=tls, mechanisms=mechanisms),
        limiter,
        "pop3",
        reactor,
    )
    factories["pop3s"] = TLSMemoryBIOFactory(
        tls,
        False,
        LimitedFactory(
            POP3Factory(portal, policy, implicit_tls=True, mechanisms=mechanisms),
            limiter,
            "pop3s",
            reactor,
        ),
    )

    top = PopdService(settings, reactor, tls)
    for label, index, description in listeners(settings):
        adopted = None if inherited is None else inherited.get((label, index))
        if inherited is not None and adopted is None:
            continue
        listener_service(
            reactor, settings, label, description, factories[label], adopted
        ).setServiceParent(top)
    if settings.metrics_listen and inherited is None:
        from popd.metrics import metrics_site

        site = metrics_site()
        for description in settings.metrics_listen:
            ListenerService(reactor, description, site, "metrics").setServiceParent(top)
    return top
