"""
The delivery listeners: LMTP (RFC 2033) for an MTA's local delivery, and
SMTP for an MTA set up to relay to popd as its next hop.

Both are L{twisted.mail.smtp.ESMTP} underneath: its greeting, reply
formatting (C{sendCode}), idle timeout and connection handling.  What
popd needs differently is done here:

  - B{pipelining} (RFC 2920, which LMTP requires): commands are handled
    strictly one after another; while a recipient lookup or a delivery is
    under way, further input waits (the transport is paused), so a
    pipelining client gets its replies in order.  Twisted's server would
    run the next command before the lookup had answered.
  - B{DATA}: the mail data is decoded as it arrives (L{DataDecoder}) into
    one spool for all recipients (L{Spool}: memory up to 1 MiB, then an
    unlinked file in C{<data_dir>/spool}), rather than line by line into
    one message object per recipient; lines of any length are accepted.
  - B{one reply per recipient} after LMTP's DATA, in the order of the
    accepted RCPT commands, each sent when that recipient's copy is on
    stable storage (its L{IMaildropProvider.deliver} has fired);
    recipients are delivered one after another, each reading the spool
    again behind its own C{Return-Path}, C{Delivered-To} and C{Received}
    fields.  A failure for one recipient (451 4.3.0) does not touch the
    others' copies.
  - B{SMTP's one reply}: every recipient is tried; 250 if all got the
    message, the first permanent reply if all failed permanently, else
    451 4.3.0, so that the MTA tries again.  The MTA then retries all
    recipients, so one that had already got it gets it twice: a duplicate
    is better than a loss.  Configure the MTA to send one recipient per
    transaction to popd's SMTP port (Postfix: a transport with
    C{_destination_recipient_limit = 1}) to rule that out, or use LMTP.
  - recipients are checked against the user database at RCPT (550 5.1.1
    unknown, 451 4.3.0 when it cannot be read), and the message size
    against C{[delivery] max_message_size} at MAIL (C{SIZE=}) and during
    DATA (552 5.3.4), with C{SIZE} advertised.
  - addresses are taken as given: no default domain is added to a bare
    local part, and UTF-8 addresses (SMTPUTF8) are accepted.

There is no AUTH and no STARTTLS: anyone who can connect can deliver mail to
any local user, as with an MX.  Listen on loopback or a UNIX socket.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.mail.smtp import COMMAND, DATA, ESMTP, SMTPFactory
from twisted.python.failure import Failure

from popd import metrics
from popd.delivery.agent import LocalDelivery, Outcome, outcome_of
from popd.delivery.data import DataDecoder
from popd.delivery.headers import received_header
from popd.delivery.recipients import Recipient
from popd.delivery.spool import Spool
from popd.interfaces import MaildropError

__all__ = [
    "LMTPFactory",
    "LMTPServer",
    "SMTPDeliveryFactory",
    "SMTPServer",
]

log = Logger()

# Limits, all in one place.
#: The longest command line (RFC 5321 asks for at least 512 octets).
MAX_COMMAND_LINE = 4096
#: Recipients per transaction (RFC 5321 asks for at least 100).
MAX_RECIPIENTS = 1000
#: Unknown commands and syntax errors before the server hangs up.
MAX_BAD_COMMANDS = 20
#: Seconds of silence before the server hangs up (RFC 5321 section 4.5.3.2).
IDLE_TIMEOUT = 600

_QUOTED = rb'"(?:[^"\\\r\n]|\\.)*"'
_PATH = (
    rb"(?:<(?P<path>(?:" + _QUOTED + rb'|[^<>\s"])*)>|(?P<bare>[^<>\s"]+))'
    rb"(?:\s+(?P<params>.*))?\Z"
)
_MAIL = re.compile(rb"FROM:\s*" + _PATH, re.I | re.S)
_RCPT = re.compile(rb"TO:\s*" + _PATH, re.I | re.S)
_SOURCE_ROUTE = re.compile(r"\A@[^:]*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SIZE_VALUE = re.compile(rb"[0-9]{1,20}\Z")


def parse_path(match: re.Match) -> str | None:
    """
    The address of a C{MAIL FROM:} or C{RCPT TO:} path, without angle
    brackets or source route, or C{None} if it is not UTF-8 or holds a
    control character.  The null path C{<>} is C{""}.
    """
    raw = match.group("path")
    if raw is None:
        raw = match.group("bare")
    try:
        address = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    address = _SOURCE_ROUTE.sub("", address)
    if _CONTROL.search(address):
        return None
    return address


@dataclass
class _Transaction:
    """
    One mail transaction: from MAIL to the end of DATA (or RSET).
    """

    sender: str
    id: str = field(default_factory=lambda: secrets.token_hex(6))
    recipients: list[Recipient] = field(default_factory=list)


class _DeliveryServer(ESMTP):
    """
    What the LMTP and SMTP servers share.  C{lmtp} and C{commands} say
    which one this is.
    """

    lmtp = False
    commands: frozenset[str] = frozenset()
    timeout = IDLE_TIMEOUT

    def __init__(self, agent: LocalDelivery) -> None:
        ESMTP.__init__(self)
        self.agent = agent
        self._buffer = b""
        self._busy = False
        self._processing = False
        self._lost = False
        self._quitting = False
        self._discarding = False
        self._greeted = False
        self._extended = False
        self._bad_commands = 0
        self._transaction: _Transaction | None = None
        self._decoder: DataDecoder | None = None
        self._spool: Spool | None = None
        self._spool_error: OSError | None = None

    # Replies

    def reply(self, code: int, status: str | None, text: str | bytes) -> None:
        """
        Send one reply line, with its enhanced status code (RFC 2034).
        """
        if isinstance(text, str):
            text = text.encode("utf-8", "replace")
        if status:
            text = status.encode("ascii") + b" " + text
        self.sendCode(code, text)

    def _reply_outcome(self, outcome: Outcome, recipient: Recipient | None) -> None:
        text = outcome.text
        if recipient is not None:
            text = f"<{recipient.address}> {text}"
        self.reply(outcome.code, outcome.status, text)

    def greeting(self) -> bytes:
        kind = b"LMTP" if self.lmtp else b"ESMTP"
        return self.host + b" " + kind + b" popd ready"

    def extensions(self) -> dict:
        return {
            b"PIPELINING": None,
            b"SIZE": [str(self.agent.max_message_size).encode("ascii")],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
            b"SMTPUTF8": None,
        }

    def timeoutConnection(self) -> None:
        self.reply(421, "4.4.2", self.host + b" Error: timeout exceeded")
        self._quitting = True
        self.transport.loseConnection()

    # Input: one command at a time, DATA decoded as it comes

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        self.resetTimeout()
        self._process()

    def _process(self) -> None:
        """
        Handle what is buffered, in order, until it is used up or a
        command waits for an answer (C{_busy}).
        """
        if self._processing:
            return
        self._processing = True
        try:
            while self._buffer and not (self._busy or self._lost or self._quitting):
                if self.mode == DATA:
                    data, self._buffer = self._buffer, b""
                    rest = self._decoder.feed(data)
                    if rest is not None:
                        self._buffer = rest
                        self._end_of_data()
                    continue
                newline = self._buffer.find(b"\n")
                if newline == -1:
                    if len(self._buffer) > MAX_COMMAND_LINE:
                        self._buffer = b""
                        if not self._discarding:
                            self._discarding = True
                            self._bad_command(500, "5.5.2", "Line too long")
                    break
                line = self._buffer[:newline]
                self._buffer = self._buffer[newline + 1 :]
                if self._discarding:
                    self._discarding = False
                    continue
                if len(line) > MAX_COMMAND_LINE:
                    self._bad_command(500, "5.5.2", "Line too long")
                    continue
                self._command(line.rstrip(b"\r"))
        finally:
            self._processing = False

    def _command(self, line: bytes) -> None:
        verb, _, rest = line.strip().partition(b" ")
        name = verb.decode("ascii", "replace").upper()
        if name not in self.commands:
            if name in ("HELO", "EHLO") and self.lmtp:
                self._bad_command(500, "5.5.1", "This is LMTP: use LHLO")
            elif name == "LHLO":
                self._bad_command(500, "5.5.1", "This is SMTP: use EHLO")
            else:
                self._bad_command(500, "5.5.2", "Command unrecognized")
            return
        getattr(self, "do_" + name)(rest.strip())

    def _bad_command(self, code: int, status: str, text: str) -> None:
        self._bad_commands += 1
        if self._bad_commands > MAX_BAD_COMMANDS:
            self.reply(421, "4.7.0", self.host + b" Too many errors")
            self._quitting = True
            self.transport.loseConnection()
            return
        self.reply(code, status, text)

    def _wait(self, deferred: Deferred) -> None:
        """
        Hold further input until C{deferred} (a command's work) has fired.
        """
        self._busy = True
        self.setTimeout(None)
        self.transport.pauseProducing()

        def done(result: object) -> None:
            self._busy = False
            if isinstance(result, Failure):
                log.failure("delivery protocol error", result)
                if not self._lost:
                    self.reply(451, "4.3.0", "Local error in processing")
            if self._lost:
                return
            self.transport.resumeProducing()
            self.setTimeout(self.timeout)
            self._process()

        deferred.addBoth(done)

    def connectionLost(self, reason: Failure) -> None:
        self._lost = True
        self.setTimeout(None)
        if self.mode == DATA and self._spool is not None:
            self._spool.close()
            self._spool = None

    # Commands shared by LMTP and SMTP

    def _hello(self, rest: bytes, *, extended: bool, verb: str) -> None:
        if not rest:
            self._bad_command(501, "5.5.4", f"Syntax: {verb} hostname")
            return
        self._helo = (rest.split()[0], self._peer())
        self._greeted = True
        self._extended = extended
        self._transaction = None
        if extended:
            self.sendCode(250, self.host + b"\n" + self.listExtensions())
        else:
            self.sendCode(250, self.host)

    def _peer(self) -> bytes:
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None) or getattr(peer, "name", None) or "local"
        if isinstance(host, bytes):
            return host
        return str(host).encode("utf-8", "replace")

    def do_MAIL(self, rest: bytes) -> None:
        if not self._greeted:
            verb = "LHLO" if self.lmtp else "EHLO/HELO"
            self.reply(503, "5.5.1", f"Error: send {verb} first")
            return
        if self._transaction is not None:
            self.reply(503, "5.5.1", "Error: nested MAIL command")
            return
        match = _MAIL.match(rest)
        if not match:
            self._bad_command(501, "5.5.4", "Syntax: MAIL FROM:<address>")
            return
        sender = parse_path(match)
        if sender is None:
            self._bad_command(501, "5.1.7", "Bad sender address syntax")
            return
        for parameter in (match.group("params") or b"").split():
            key, equals, value = parameter.partition(b"=")
            key = key.upper()
            if not self._extended:
                self._bad_command(555, "5.5.4", "MAIL parameters need EHLO")
                return
            if key == b"SIZE" and equals and _SIZE_VALUE.match(value):
                if int(value) > self.agent.max_message_size:
                    self.reply(
                        552,
                        "5.3.4",
                        "Message size exceeds fixed maximum message size",
                    )
                    return
            elif key == b"BODY" and value.upper() in (b"7BIT", b"8BITMIME"):
                pass
            elif key == b"SMTPUTF8" and not equals:
                pass
            else:
                name = key.decode("ascii", "replace")
                self._bad_command(555, "5.5.4", f"Unsupported parameter {name}")
                return
        self._transaction = _Transaction(sender)
        self.reply(250, "2.1.0", "Sender OK")

    def do_RCPT(self, rest: bytes) -> None:
        transaction = self._transaction
        if transaction is None:
            self.reply(503, "5.5.1", "Error: need MAIL command")
            return
        match = _RCPT.match(rest)
        if not match:
            self._bad_command(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return
        if match.group("params"):
            self._bad_command(555, "5.5.4", "RCPT parameters are not supported")
            return
        address = parse_path(match)
        if not address:
            self._bad_command(501, "5.1.3", "Bad recipient address syntax")
            return
        if len(transaction.recipients) >= MAX_RECIPIENTS:
            self.reply(452, "4.5.3", "Error: too many recipients")
            return

        def accepted(recipient: Recipient) -> None:
            if not self._lost:
                transaction.recipients.append(recipient)
                self.reply(250, "2.1.5", f"<{address}> Recipient OK")

        def rejected(failure: Failure) -> None:
            outcome = outcome_of(failure.value)
            if outcome.temporary:
                _log_problem(
                    failure,
                    "{kind} {id}: cannot check recipient {address}: {error}",
                    kind=self._kind,
                    id=transaction.id,
                    address=address,
                )
            if not self._lost:
                self.reply(outcome.code, outcome.status, f"<{address}> {outcome.text}")

        self._wait(self.agent.resolve(address).addCallbacks(accepted, rejected))

    def do_DATA(self, rest: bytes) -> None:
        transaction = self._transaction
        if transaction is None:
            self.reply(503, "5.5.1", "Error: need MAIL command")
            return
        if not transaction.recipients:
            if self.lmtp:
                self.reply(503, "5.5.1", "Error: no valid recipients")
            else:
                self.reply(554, "5.5.1", "Error: no valid recipients")
            return
        if rest:
            self._bad_command(501, "5.5.4", "Syntax: DATA")
            return
        try:
            self._spool = self.agent.new_spool()
        except OSError as error:
            log.error(
                "{kind} {id}: cannot spool: {error}",
                kind=self._kind,
                id=transaction.id,
                error=error,
            )
            self._transaction = None
            self.reply(451, "4.3.0", "Temporary failure, please try again later")
            return
        self._spool_error = None
        self._decoder = DataDecoder(self._spool_write, self.agent.max_message_size)
        self.mode = DATA
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _spool_write(self, data: bytes) -> None:
        if self._spool_error is None:
            try:
                self._spool.write(data)
            except OSError as error:
                self._spool_error = error

    def _end_of_data(self) -> None:
        self.mode = COMMAND
        transaction, self._transaction = self._transaction, None
        spool, self._spool = self._spool, None
        decoder, self._decoder = self._decoder, None
        failed = None
        if decoder.too_large:
            log.info(
                "{kind} {id}: refused a message of more than {limit} octets",
                kind=self._kind,
                id=transaction.id,
                limit=self.agent.max_message_size,
            )
            failed = Outcome(552, "5.3.4", "Message too big for system")
        elif self._spool_error is not None:
            log.error(
                "{kind} {id}: cannot spool: {error}",
                kind=self._kind,
                id=transaction.id,
                error=self._spool_error,
            )
            failed = outcome_of(self._spool_error)
        if failed is not None:
            spool.close()
            if self.lmtp:
                for recipient in transaction.recipients:
                    self._reply_outcome(failed, recipient)
            else:
                self._reply_outcome(failed, None)
            return
        self._wait(ensureDeferred(self._deliver_all(transaction, spool, decoder.size)))

    async def _deliver_all(
        self, transaction: _Transaction, spool: Spool, size: int
    ) -> None:
        """
        Deliver to each recipient in turn; LMTP replies for each as soon as
        its copy is stored, SMTP once for all.
        """
        outcomes: list[Outcome] = []
        try:
            for recipient in transaction.recipients:
                if self._lost:
                    # The client will try again anyway: do not make more
                    # copies that it will deliver a second time.
                    break
                outcome = await self._deliver_one(transaction, spool, size, recipient)
                outcomes.append(outcome)
                if self.lmtp and not self._lost:
                    self._reply_outcome(outcome, recipient)
        finally:
            spool.close()
        if not self.lmtp and not self._lost:
            self._reply_outcome(_summary(outcomes), None)

    async def _deliver_one(
        self, transaction: _Transaction, spool: Spool, size: int, recipient: Recipient
    ) -> Outcome:
        received = received_header(
            protocol=self._with,
            helo=self._helo[0],
            peer=self._helo[1],
            by=self.agent.hostname,
            transaction_id=transaction.id,
            recipient=recipient.address,
        )
        started = time.perf_counter()
        try:
            uid = await self.agent.deliver(
                spool, recipient, sender=transaction.sender, received=received
            )
        except Exception as error:
            outcome = outcome_of(error)
            metrics.delivery(
                self._kind.lower(),
                "temporary" if outcome.temporary else "permanent",
                started,
            )
            _log_problem(
                Failure(),
                "{kind} {id}: delivery to {address} ({user}) failed: {error}",
                kind=self._kind,
                id=transaction.id,
                address=recipient.address,
                user=recipient.avatar_id,
            )
            return outcome
        metrics.delivery(self._kind.lower(), "delivered", started)
        log.info(
            "{kind} {id}: delivered {size} octets from <{sender}> to {address} "
            "({user}{folder}) as {uid}",
            kind=self._kind,
            id=transaction.id,
            size=size,
            sender=transaction.sender,
            address=recipient.address,
            user=recipient.avatar_id,
            folder=f", folder {recipient.folder}" if recipient.folder else "",
            uid=uid,
        )
        return Outcome(250, "2.0.0", f"Saved as {uid}")

    @property
    def _kind(self) -> str:
        return "LMTP" if self.lmtp else "SMTP"

    @property
    def _with(self) -> str:
        if self.lmtp:
            return "LMTP"
        return "ESMTP" if self._extended else "SMTP"

    def do_RSET(self, rest: bytes) -> None:
        self._transaction = None
        self.reply(250, "2.0.0", "OK")

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(250, "2.0.0", "OK")

    def do_VRFY(self, rest: bytes) -> None:
        self.reply(252, "2.5.2", "Cannot VRFY user, but will accept message")

    def do_HELP(self, rest: bytes) -> None:
        names = " ".join(sorted(self.commands))
        self.reply(214, "2.0.0", f"Commands: {names}")

    def do_QUIT(self, rest: bytes) -> None:
        self.reply(221, "2.0.0", "Bye")
        self._quitting = True
        self.transport.loseConnection()


def _log_problem(failure: Failure, text: str, **fields: object) -> None:
    """
    Log a failed lookup or delivery: one line for what a store or the user
    database reports (a full disk, a file it cannot read), a traceback for
    anything else, which is a bug.
    """
    if failure.check(MaildropError, OSError):
        log.error(text, error=failure.getErrorMessage(), **fields)
    else:
        log.failure(text, failure, error=failure.getErrorMessage(), **fields)


def _summary(outcomes: list[Outcome]) -> Outcome:
    """
    SMTP's one reply after DATA for all recipients' outcomes.
    """
    if outcomes and all(outcome.ok for outcome in outcomes):
        return Outcome(250, "2.0.0", f"Delivered to {len(outcomes)} recipient(s)")
    if outcomes and not any(outcome.ok or outcome.temporary for outcome in outcomes):
        return outcomes[0]
    return Outcome(451, "4.3.0", "Temporary failure, please try again later")


class LMTPServer(_DeliveryServer):
    """
    LMTP (RFC 2033): LHLO, and one reply per accepted recipient after DATA.
    """

    lmtp = True
    commands = frozenset(
        {"LHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "HELP", "QUIT"}
    )

    def do_LHLO(self, rest: bytes) -> None:
        self._hello(rest, extended=True, verb="LHLO")


class SMTPServer(_DeliveryServer):
    """
    SMTP (RFC 5321) for local delivery: EHLO or HELO, one reply after DATA.
    """

    commands = frozenset(
        {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "HELP", "QUIT"}
    )

    def do_EHLO(self, rest: bytes) -> None:
        self._hello(rest, extended=True, verb="EHLO")

    def do_HELO(self, rest: bytes) -> None:
        self._hello(rest, extended=False, verb="HELO")


class _DeliveryFactory(SMTPFactory):
    protocol = _DeliveryServer
    noisy = False

    def __init__(self, agent: LocalDelivery) -> None:
        super().__init__()
        self.agent = agent
        self.domain = agent.hostname.encode("ascii", "replace")

    def buildProtocol(self, addr) -> _DeliveryServer:
        server = self.protocol(self.agent)
        server.factory = self
        server.host = self.domain
        return server


class LMTPFactory(_DeliveryFactory):
    """
    Makes an L{LMTPServer} for each connection.
    """

    protocol = LMTPServer


class SMTPDeliveryFactory(_DeliveryFactory):
    """
    Makes an L{SMTPServer} for each connection.
    """

    protocol = SMTPServer
