"""
Local delivery, whatever brought the message: the recipient checks, the
spool and the store call that LMTP, SMTP and the C{deliver} pipe share.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from popd.config import Settings
from popd.delivery.headers import trace_headers
from popd.delivery.recipients import PasswdFileUsers, Recipient, RecipientResolver
from popd.delivery.spool import Spool, spool_directory
from popd.interfaces import IMaildropProvider, NoSuchUser

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "LocalDelivery",
    "Outcome",
    "local_delivery",
    "outcome_of",
    "user_files",
]

log = Logger()

#: C{[delivery] max_message_size}'s default: 50 MiB.
DEFAULT_MAX_MESSAGE_SIZE = 50 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Outcome:
    """
    How one recipient's delivery ended, as an SMTP reply.

    @ivar code: the reply code (250, 451, 550, 552).
    @ivar status: the enhanced status code (RFC 3463).
    @ivar text: the rest of the reply line.
    """

    code: int
    status: str
    text: str

    @property
    def ok(self) -> bool:
        return self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


def outcome_of(error: BaseException) -> Outcome:
    """
    The reply for a failed delivery: only an unknown user is permanent.

    Every other error (a full disk, a store that is down, even one the store
    calls permanent) is temporary, so the MTA keeps the message queued and
    tries again; it bounces the message after its own queue lifetime if the
    trouble lasts.  Losing mail to a misconfiguration is worse than a delay.
    """
    if isinstance(error, NoSuchUser):
        return Outcome(550, "5.1.1", "User unknown")
    return Outcome(451, "4.3.0", "Temporary failure, please try again later")


class LocalDelivery:
    """
    Delivers spooled messages into a store.

    @ivar max_message_size: the largest message accepted (CRLF octets).
    @ivar hostname: this host's name in replies and C{Received:} fields.
    """

    def __init__(
        self,
        provider: IMaildropProvider,
        resolver: RecipientResolver,
        *,
        spool_dir: Path | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        hostname: str | None = None,
    ) -> None:
        self.provider = provider
        self.resolver = resolver
        self.spool_dir = spool_dir
        self.max_message_size = max_message_size
        self.hostname = hostname or socket.gethostname()

    def resolve(self, address: str) -> Deferred[Recipient]:
        """
        The recipient C{address} reaches (see L{RecipientResolver.resolve}).
        """
        return self.resolver.resolve(address)

    def new_spool(self) -> Spool:
        """
        An empty spool in the spool directory.

        @raise OSError: the spool directory cannot be made.
        """
        return Spool(self.spool_dir)

    def deliver(
        self,
        spool: Spool,
        recipient: Recipient,
        *,
        sender: str | None,
        received: bytes = b"",
    ) -> Deferred[str]:
        """
        Store one copy of the spooled message for C{recipient}, under its
        own C{Return-Path}, C{Delivered-To} and C{received} fields.

        @return: a L{Deferred} firing with the new UID once the copy is on
            stable storage.  Nothing else may read C{spool} until it fires.
        """
        prefix = trace_headers(
            sender=sender,
            recipient=recipient.address,
            received=received,
            head=spool.head,
        )
        return maybeDeferred(
            self.provider.deliver,
            recipient.avatar_id,
            spool.reader(prefix),
            folder=recipient.folder,
        )


def user_files(settings: Settings) -> list[Path]:
    """
    The passwd-files delivery checks recipients against: those of the
    C{passwd-file} checkers in C{[auth] checkers}, else C{[auth]
    passwd_file}.

    Other kinds of user database (SQL, PAM, checkpassword) can only check
    passwords, not tell whether a user exists: their users are unknown to
    delivery, which is logged once at start.
    """
    descriptions = getattr(settings, "checkers", ()) or ()
    files = [
        Path(description.partition(":")[2])
        for description in descriptions
        if description.startswith("passwd-file:")
    ]
    others = sorted(
        {
            description.partition(":")[0]
            for description in descriptions
            if not description.startswith("passwd-file:")
        }
    )
    if others:
        log.warn(
            "delivery knows only the users of passwd-files, not those of "
            "{others}: mail for them is refused as for unknown users",
            others=", ".join(others),
        )
    return files or [settings.passwd_file]


def local_delivery(
    settings: Settings, provider: IMaildropProvider, hostname: str | None = None
) -> LocalDelivery:
    """
    The L{LocalDelivery} of C{settings}: users from the passwd-file, the
    C{[delivery]} rules, the spool in C{<data_dir>/spool}.
    """
    resolver = RecipientResolver(
        PasswdFileUsers(*user_files(settings)),
        provider,
        mode=settings.delivery_recipient,
        delimiter=settings.recipient_delimiter,
        detail_folders=settings.detail_folders,
    )
    return LocalDelivery(
        provider,
        resolver,
        spool_dir=spool_directory(settings.data_dir),
        max_message_size=settings.max_message_size,
        hostname=hostname,
    )
