"""
The POP3 server protocol: RFC 1939 with RFC 2449 (CAPA, response codes,
pipelining), RFC 2595 (STLS), RFC 5034 (AUTH) and RFC 6856 (UTF8).

It knows neither storage nor password formats: credentials go to a Cred
portal, which answers with an L{IMaildrop}; messages come out of that
maildrop as files and leave through L{popd.stream}.
"""

from __future__ import annotations

import os
import socket
import time
from base64 import b64encode
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import ip_address, ip_network
from itertools import islice
from operator import attrgetter

from twisted.cred.credentials import IUsernameHashedPassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from popd import metrics, sasl
from popd.auth.credentials import APOPCredentials
from popd.auth.errors import AuthUnavailable
from popd.auth.throttle import LoginThrottle
from popd.interfaces import (
    IMaildrop,
    MaildropError,
    MaildropInUse,
    MaildropUnavailable,
    MessageInfo,
    NoSuchFolder,
)
from popd.listing import send_lines
from popd.parser import MAX_BUFFERED_LINE, Line, LineParser, OverlongLine
from popd.realm import LoginRequest
from popd.stream import SendAborted, send_message

log = Logger()

# RFC 2449 section 4: a command line is at most 255 octets with its CRLF.
MAX_COMMAND_OCTETS = 255
# Pipelined lines waiting while a command is busy; past this the transport
# stops reading, so a client cannot make the server queue without bound.
MAX_QUEUED_LINES = 64
# Lines of a LIST or UIDL listing written as one.
_LISTING_BLOCK = 256
# Seconds a connection closed for inactivity may take to send its last
# reply before it is cut off (a client that reads nothing never takes it).
ABORT_AFTER_TIMEOUT = 1.0


@dataclass(frozen=True)
class SessionPolicy:
    """
    Everything a session needs to know about the server's configuration.

    @ivar plaintext: C{"tls-only"} refuses USER/PASS and plaintext SASL
        before TLS except from trusted networks; C{"always"} allows them.
    @ivar trusted_networks: where plaintext login is allowed without TLS.
    @ivar auth_timeout: idle seconds allowed before login.
    @ivar transaction_timeout: idle seconds allowed after login (RFC 1939
        section 3 asks for at least ten minutes).
    @ivar max_bad_commands: unknown or malformed commands before the server
        hangs up.
    @ivar max_auth_failures: failed logins per connection before hang-up.
    @ivar apop: offer APOP (a timestamp in the greeting).
    @ivar expire: the EXPIRE capability's argument (C{"NEVER"} or days), or
        C{None} to omit it.  With days, messages first retrieved that long
        ago are removed at QUIT; with 0, as soon as they are retrieved.
    @ivar per_user_expire: users may have their own EXPIRE policy, so CAPA
        before login says C{EXPIRE n USER}.
    @ivar folder_separator: splits C{alice#Archive} into the user and the
        folder to open; empty to turn folder selection off.
    @ivar login_delay: the LOGIN-DELAY capability's seconds, or C{None}.
        When set (and not 0), a user who logged in less than that long ago
        is refused with C{[LOGIN-DELAY]} after a correct password.
    @ivar failure_delay: seconds before every failed-login reply (Dovecot's
        C{auth_failure_delay}); L{throttle} may make it longer.
    @ivar throttle: the failure counts and last logins that every session
        sharing this policy shares (see L{popd.auth.throttle}).
    """

    plaintext: str = "tls-only"
    trusted_networks: tuple = ("127.0.0.0/8", "::1/128")
    auth_timeout: float = 120.0
    transaction_timeout: float = 600.0
    max_bad_commands: int = 20
    max_auth_failures: int = 3
    apop: bool = False
    expire: str | None = None
    login_delay: int | None = None
    folder_separator: str = "#"
    per_user_expire: bool = False
    failure_delay: float = 2.0
    throttle: LoginThrottle = field(
        default_factory=LoginThrottle, compare=False, repr=False
    )
    implementation: str = "popd"
    hostname: str = field(default_factory=socket.gethostname)

    @cached_property
    def _networks(self) -> tuple:
        return tuple(ip_network(network) for network in self.trusted_networks)

    def is_trusted(self, host: str | None) -> bool:
        """
        Whether C{host} lies in a trusted network (UNIX sockets do).
        """
        if host is None:
            return True
        try:
            address = ip_address(host)
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)


class _Reply:
    """
    Shorthands for the status lines; response codes per RFC 2449 section 8.
    """

    @staticmethod
    def ok(text: str = "") -> bytes:
        return b"+OK" + (b" " + text.encode("utf-8") if text else b"") + b"\r\n"

    @staticmethod
    def err(text: str, code: str | None = None) -> bytes:
        prefix = f"[{code}] " if code else ""
        return f"-ERR {prefix}{text}\r\n".encode()


class CommandError(Exception):
    """
    A command the client got wrong: answered with C{-ERR}, counted as bad.
    """


AUTHORIZATION, TRANSACTION, UPDATE = "AUTHORIZATION", "TRANSACTION", "UPDATE"


def _ascii(text: bytes) -> str:
    return text.decode("ascii", "replace")


def _sasl_initial(text: bytes) -> bool:
    """
    Whether a line is AUTH with an initial response: such a line may be as
    long as any SASL response (the parser's limit), for clients that send a
    long initial response (an OAuth token) instead of waiting for C{+ }.
    """
    return text[:5].upper() == b"AUTH " and b" " in text[5:].strip(b" ")


def _printable(name: bytes | str | None) -> str:
    """
    A user name as the client sent it, safe for a log line.
    """
    if name is None:
        return "-"
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in name[:256])


def _tls_error(reason: Failure | None) -> str | None:
    """
    C{"TLS error: <OpenSSL's reason>"} if a connection was lost to an error
    of the TLS layer (pyOpenSSL's C{SSL.Error}, not imported here), else
    C{None}.
    """
    if reason is None or not reason.type.__module__.startswith("OpenSSL"):
        return None
    try:
        # SSL.Error's argument: a list of (library, function, reason).
        detail = str(reason.value.args[0][-1][-1])
    except (IndexError, TypeError):
        detail = ""
    return f"TLS error: {detail}" if detail else "TLS error"


def _disable_nagle(transport) -> None:
    """
    Send replies at once: with Nagle's algorithm a reply waits for the ACK
    of the previous one, which clients delay, costing a round trip each.
    """
    while transport is not None:
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
            return
        transport = getattr(transport, "transport", None)


def _login_outcome(failure: Failure) -> str:
    """
    The metrics label of a failed login.
    """
    if failure.check(UnauthorizedLogin):
        return "failure"
    if failure.check(MaildropInUse):
        return "in_use"
    if failure.check(MaildropUnavailable, AuthUnavailable):
        return "unavailable"
    return "error"


class POP3Server(Protocol, TimeoutMixin):
    """
    One POP3 session.  Commands are handled strictly in order: a handler
    that waits (PASS, RETR) holds the queue until its reply is written.
    """

    _STATE_COMMANDS = {
        AUTHORIZATION: frozenset(
            {"CAPA", "USER", "PASS", "APOP", "AUTH", "STLS", "UTF8", "QUIT"}
        ),
        TRANSACTION: frozenset(
            {
                "CAPA",
                "STAT",
                "LIST",
                "RETR",
                "DELE",
                "NOOP",
                "RSET",
                "QUIT",
                "TOP",
                "UIDL",
                "X-FOLDERS",
            }
        ),
        UPDATE: frozenset(),
    }
    _ALL_COMMANDS = frozenset().union(*_STATE_COMMANDS.values())

    def __init__(self, factory: POP3Factory) -> None:
        self.factory = factory
        self.policy = factory.policy
        self.callLater = factory.reactor.callLater
        self.state = AUTHORIZATION
        self._parser = LineParser()
        self._queue: deque[Line | OverlongLine] = deque()
        self._busy = False
        self._running = False
        self._abort_call = None
        self._reading_paused = False
        self._closing = False
        self._secure = False
        self._user: bytes | None = None
        self._challenge: bytes | None = None
        self._sasl_step: Callable[[bytes], Deferred | None] | None = None
        self._bad_commands = 0
        self._auth_failures = 0
        self._maildrop = None
        self._avatar_id: str | None = None
        self._deleted: set[int] = set()
        # The maildrop's size, summed once at login.
        self._octets = 0
        self._retrieved_now: set[int] = set()
        self._request: LoginRequest | None = None
        self._started = time.monotonic()
        self._login_started: float | None = None
        self._end_reason = "disconnected"
        self._retrieved = [0, 0]
        self._removed = [0, 0]

    # Connection life cycle

    def connectionMade(self) -> None:
        self._secure = self.factory.implicit_tls
        _disable_nagle(self.transport)
        peer = self.transport.getPeer()
        self._peer_host = getattr(peer, "host", None)
        self._trusted = self.policy.is_trusted(self._peer_host)
        self.setTimeout(self.policy.auth_timeout)
        greeting = "POP3 server ready."
        if self.policy.apop and self.factory.portal_supports_apop:
            self._challenge = (
                f"<{os.getpid()}.{time.time_ns()}@{self.policy.hostname}>".encode()
            )
            greeting += " " + self._challenge.decode()
        self.transport.write(_Reply.ok(greeting))

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        lines = self._parser.feed(data)
        if lines:
            # Only whole lines count as activity: a client dribbling a
            # byte at a time (slow loris) is still timed out.
            self.resetTimeout()
        self._queue.extend(lines)
        self._run_queue()

    def connectionLost(self, reason: Failure = None) -> None:
        self.setTimeout(None)
        if self._abort_call is not None:
            self._abort_call.cancel()
            self._abort_call = None
        self._closing = True
        self._queue.clear()
        if self.state != AUTHORIZATION:
            metrics.session_ended()
        if self._maildrop is not None:
            maildrop, self._maildrop = self._maildrop, None
            maildrop.release().addErrback(
                lambda failure: log.failure("releasing maildrop", failure)
            )
        tls_error = _tls_error(reason)
        if tls_error and self._end_reason == "disconnected":
            # A failed handshake (plain text on the TLS port, an old TLS
            # version) or a broken TLS record: say so, on the one line.
            self._end_reason = tls_error
        self._log_session()

    def timeoutConnection(self) -> None:
        self._end_reason = "timeout"
        self._close(_Reply.err("Disconnected for inactivity."))
        # loseConnection waits for what is written to drain, which a client
        # that reads nothing never lets happen: it has been idle the whole
        # timeout already, so cut it off after a moment.
        self._abort_call = self.callLater(ABORT_AFTER_TIMEOUT, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        self.transport.abortConnection()

    def _close(self, last_reply: bytes | None = None) -> None:
        if last_reply is not None:
            self.transport.write(last_reply)
        self._closing = True
        self._queue.clear()
        self.transport.loseConnection()

    def _log_session(self) -> None:
        log.info(
            "session end user={user} client={client} tls={tls} "
            "retrieved={retrieved}/{retrieved_octets} "
            "deleted={deleted}/{deleted_octets} duration={duration:.3f}s "
            "end={end} pid={pid}",
            pid=os.getpid(),
            user=self._avatar_id or "-",
            client=self._peer_host,
            tls="yes" if self._secure else "no",
            retrieved=self._retrieved[0],
            retrieved_octets=self._retrieved[1],
            deleted=self._removed[0],
            deleted_octets=self._removed[1],
            duration=time.monotonic() - self._started,
            end=self._end_reason,
        )

    # The command queue

    def _run_queue(self) -> None:
        if self._running:
            # A command finished while the loop below runs (its Deferred
            # had fired already): the loop goes on with the next one.  Not
            # recursing keeps the stack flat however many are pipelined.
            return
        self._running = True
        try:
            while self._queue and not self._busy and not self._closing:
                waiting = self._handle_line(self._queue.popleft())
                if waiting is not None:
                    self._busy = True
                    waiting.addErrback(self._internal_error)
                    waiting.addBoth(self._command_done)
        finally:
            self._running = False
        self._throttle_reading()

    def _command_done(self, _ignored: object) -> None:
        self._busy = False
        self.resetTimeout()
        self._run_queue()

    def _throttle_reading(self) -> None:
        if self._closing:
            return
        full = len(self._queue) >= MAX_QUEUED_LINES
        if full and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        elif not full and self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    def _internal_error(self, failure: Failure) -> None:
        log.failure("command failed", failure)
        self._close(_Reply.err("Internal error.", "SYS/TEMP"))

    def _handle_line(self, line: Line | OverlongLine) -> Deferred | None:
        if self._sasl_step is not None:
            step, self._sasl_step = self._sasl_step, None
            if isinstance(line, OverlongLine):
                self._sasl_abandon()
                self._bad(
                    _Reply.err(
                        f"SASL response too long (over {MAX_BUFFERED_LINE} octets).",
                        "AUTH",
                    )
                )
                return None
            return step(line.text)
        if isinstance(line, OverlongLine) or (
            line.octets > MAX_COMMAND_OCTETS and not _sasl_initial(line.text)
        ):
            self._bad(_Reply.err("Command line too long."))
            return None
        keyword, _, argument = line.text.partition(b" ")
        command = _ascii(keyword).upper()
        if command not in self._STATE_COMMANDS[self.state]:
            if command in self._ALL_COMMANDS:
                self._bad(_Reply.err(f"{command} is not valid in this state."))
            else:
                self._bad(_Reply.err(f"Unknown command: {command[:40]}"))
            return None
        handler = getattr(self, "do_" + command.replace("-", "_"))
        started = time.perf_counter()
        try:
            return metrics.command_done(command, started, handler(argument))
        except CommandError as error:
            metrics.command(command, started)
            self._bad(_Reply.err(str(error)))
            return None

    def _bad(self, reply: bytes) -> None:
        self._bad_commands += 1
        if self._bad_commands >= self.policy.max_bad_commands:
            self._end_reason = "too many bad commands"
            self._close(reply + _Reply.err("Too many bad commands."))
        else:
            self.transport.write(reply)

    # AUTHORIZATION state

    def _plaintext_allowed(self) -> bool:
        return self.policy.plaintext == "always" or self._secure or self._trusted

    def capabilities(self) -> list[str]:
        """
        The CAPA lines true for this connection right now.

        RFC 2449 section 5 wants what AUTHORIZATION offers announced in both
        states, so the list only depends on TLS and the policy.
        """
        capabilities = [
            "CAPA",
            "TOP",
            "UIDL",
            "RESP-CODES",
            "AUTH-RESP-CODE",
            "PIPELINING",
            "UTF8 USER",
        ]
        if self._plaintext_allowed():
            capabilities.append("USER")
        mechanisms = self._mechanisms()
        if mechanisms:
            capabilities.append("SASL " + " ".join(mechanisms))
        if self.factory.tls_options is not None and not self._secure:
            capabilities.append("STLS")
        expire = self._expire_policy()
        if expire is not None:
            # RFC 2449 section 6.7: before login, USER says the policy may
            # differ per user; after login the user's own value is shown.
            per_user = self.state == AUTHORIZATION and self.policy.per_user_expire
            capabilities.append(f"EXPIRE {expire}{' USER' if per_user else ''}")
        if self.policy.login_delay is not None:
            capabilities.append(f"LOGIN-DELAY {self.policy.login_delay}")
        if self.policy.folder_separator:
            capabilities.append("X-FOLDERS")
        capabilities.append(f"IMPLEMENTATION {self.policy.implementation}")
        return capabilities

    def _sasl_context(self) -> sasl.SASLContext:
        certificate = None
        if self._secure:
            get_certificate = getattr(self.transport, "getPeerCertificate", None)
            peer = get_certificate() if get_certificate is not None else None
            if peer is not None:
                certificate = peer.to_cryptography()
        return sasl.SASLContext(
            secure=self._secure,
            plaintext_allowed=self._plaintext_allowed(),
            portal=self.factory.portal,
            peer_certificate=certificate,
            hostname=self.policy.hostname,
            folder_separator=self.policy.folder_separator,
        )

    def _mechanisms(self, context: sasl.SASLContext | None = None) -> list[str]:
        """
        The names of the SASL mechanisms usable in this session now: those
        configured, less plaintext ones where plaintext login is refused and
        those that cannot work (see L{sasl.ISASLMechanism.available}).
        """
        context = context or self._sasl_context()
        return [
            mechanism.name
            for mechanism in self.factory.mechanisms
            if (context.plaintext_allowed or not mechanism.plaintext)
            and mechanism.available(context)
        ]

    def do_CAPA(self, argument: bytes) -> Deferred:
        self._no_argument(argument)
        self.transport.write(_Reply.ok("Capability list follows"))
        return send_lines(
            self.transport,
            (f"{line}\r\n".encode() for line in self.capabilities()),
        )

    def do_STLS(self, argument: bytes) -> None:
        self._no_argument(argument)
        if self._secure:
            raise CommandError("TLS is already active.")
        if self.factory.tls_options is None:
            raise CommandError("TLS support isn't enabled.")
        self.transport.write(_Reply.ok("Begin TLS negotiation now."))
        # RFC 2595 section 4 and CVE-2011-0411: whatever the client sent
        # after STLS, before the handshake, is not to be trusted.
        self._queue.clear()
        self._parser.reset()
        self._user = None
        self.transport.startTLS(self.factory.tls_options)
        self._secure = True

    def do_UTF8(self, argument: bytes) -> None:
        self._no_argument(argument)
        # User names and passwords are UTF-8 in any case, and messages pass
        # through unchanged, so the command only has to be acknowledged.
        self.transport.write(_Reply.ok("UTF8 enabled"))

    def do_USER(self, argument: bytes) -> None:
        if not argument:
            raise CommandError("USER needs a user name.")
        if not self._plaintext_allowed():
            self._user = None
            self.transport.write(self._plaintext_refused())
            return
        self._user = argument
        self.transport.write(_Reply.ok())

    def _plaintext_refused(self) -> bytes:
        return _Reply.err(
            "Plaintext authentication disallowed on non-secure (SSL/TLS) connections.",
            "AUTH",
        )

    def do_PASS(self, argument: bytes) -> Deferred | None:
        if self._user is None:
            raise CommandError("No user name given: USER comes first.")
        user, self._user = self._user, None
        return self._login(UsernamePassword(user, argument), "USER")

    def do_APOP(self, argument: bytes) -> Deferred | None:
        if self._challenge is None:
            raise CommandError("APOP is not enabled.")
        user, _, digest = argument.rpartition(b" ")
        if not user or len(digest) != 32:
            raise CommandError("Usage: APOP name digest")
        return self._login(APOPCredentials(user, self._challenge, digest), "APOP")

    def do_AUTH(self, argument: bytes) -> Deferred | None:
        context = self._sasl_context()
        if not argument:
            self.transport.write(_Reply.ok("Methods supported:"))
            names = self._mechanisms(context)
            return send_lines(
                self.transport, (f"{name}\r\n".encode() for name in names)
            )
        word, _, initial = argument.partition(b" ")
        name = _ascii(word).upper()
        mechanism = next((m for m in self.factory.mechanisms if m.name == name), None)
        if mechanism is not None and mechanism.plaintext:
            if not context.plaintext_allowed:
                self.transport.write(self._plaintext_refused())
                return None
        if mechanism is None or not mechanism.available(context):
            raise CommandError("Unsupported authentication mechanism.")
        exchange = mechanism.start(context)
        return self._sasl_exchange(name, exchange, initial or None)

    def _sasl_exchange(
        self, name: str, exchange, line: bytes | None
    ) -> Deferred | None:
        """
        Give the exchange the client's next line (C{None}: AUTH without an
        initial response).  C{*} cancels (RFC 5034 section 4); malformed
        base64 or a response the mechanism refuses ends the exchange with
        C{-ERR [AUTH]}, and the session goes on.
        """
        if line == b"*":
            self.transport.write(_Reply.err("Authentication cancelled."))
            return None
        try:
            response = None if line is None else sasl.decode_response(line)
            outcome = exchange.step(response)
        except sasl.SASLError as error:
            return self._sasl_refused(error)
        return self._sasl_outcome(name, exchange, outcome)

    def _sasl_outcome(self, name: str, exchange, outcome) -> Deferred | None:
        if isinstance(outcome, Deferred):
            return outcome.addCallbacks(
                lambda result: self._sasl_outcome(name, exchange, result),
                self._sasl_failed,
            )
        if self._closing:
            return None
        if isinstance(outcome, sasl.Challenge):
            self.transport.write(b"+ " + b64encode(outcome.data) + b"\r\n")
            self._sasl_step = lambda line: self._sasl_exchange(name, exchange, line)
            return None
        return self._login(outcome, name, exchange.success_data)

    def _sasl_refused(self, error: sasl.SASLError) -> None:
        if not self._closing:
            self.transport.write(_Reply.err(str(error), "AUTH"))
            self._count_auth_failure()

    def _sasl_failed(self, failure: Failure) -> None:
        """
        A step that waited (a SCRAM secret lookup) failed.
        """
        if failure.check(sasl.SASLError):
            return self._sasl_refused(failure.value)
        if failure.check(AuthUnavailable):
            log.warn(
                "user database unavailable: {error}", error=failure.getErrorMessage()
            )
        else:
            log.failure("SASL exchange failed", failure)
        if not self._closing:
            self.transport.write(
                _Reply.err("Authentication is temporarily unavailable.", "SYS/TEMP")
            )
        return None

    def _sasl_abandon(self) -> None:
        """
        An exchange ended by an over-long line: unlock the maildrop held
        while waiting for the client's answer to the success data.
        """
        if self.state == AUTHORIZATION and self._maildrop is not None:
            maildrop, self._maildrop = self._maildrop, None
            maybeDeferred(maildrop.release).addErrback(
                lambda failure: log.failure("releasing maildrop", failure)
            )

    def _send_success_data(self, result, credentials, mechanism: str, data: bytes):
        """
        RFC 5034 section 4: POP3 has no room for a mechanism's additional
        data with success (SCRAM's server signature) in C{+OK}, so it goes
        as one more challenge, which the client answers with an empty line;
        only then does the session enter TRANSACTION.  The maildrop stays
        locked meanwhile (and is released if the client goes away).
        """
        maildrop = result[1]
        self._maildrop = maildrop
        self.transport.write(b"+ " + b64encode(data) + b"\r\n")

        def acknowledged(line: bytes) -> Deferred | None:
            self._maildrop = None
            if line in (b"", b"="):
                return self._logged_in(result, credentials, mechanism)
            maybeDeferred(maildrop.release).addErrback(
                lambda failure: log.failure("releasing maildrop", failure)
            )
            if line == b"*":
                self.transport.write(_Reply.err("Authentication cancelled."))
            else:
                self.transport.write(
                    _Reply.err(
                        "Expected an empty response to the server's final message.",
                        "AUTH",
                    )
                )
            return None

        self._sasl_step = acknowledged
        return None

    def _login(self, credentials, mechanism: str, success_data=None) -> Deferred:
        request = LoginRequest()
        separator = self.policy.folder_separator.encode()
        if separator and separator in credentials.username:
            user, _, folder = credentials.username.partition(separator)
            credentials.username = user
            request.folder = folder.decode("utf-8", "replace")
        self._request = request
        self._login_started = time.perf_counter()
        login = self.factory.portal.login(credentials, request, IMaildrop)
        return login.addCallbacks(
            self._logged_in,
            self._login_failed,
            callbackArgs=(credentials, mechanism, success_data),
            errbackArgs=(mechanism, credentials),
        )

    def _logged_in(
        self, result, credentials, mechanism: str, success_data=None
    ) -> Deferred | None:
        """
        @param success_data: the SASL exchange's C{success_data} method, or
            C{None}; its data is sent before C{+OK} (L{_send_success_data}).
        """
        _interface, maildrop, _logout = result
        if self._closing:
            maildrop.release()
            return None
        data = success_data() if success_data is not None else None
        if data is not None:
            return self._send_success_data(result, credentials, mechanism, data)
        if self.policy.login_delay:
            wait = self.policy.throttle.login_wait(
                credentials.username,
                self.factory.reactor.seconds(),
                self.policy.login_delay,
            )
            if wait > 0:
                return self._login_too_soon(maildrop, credentials, mechanism, wait)
            self.policy.throttle.logged_in(
                credentials.username, self.factory.reactor.seconds()
            )
        self._maildrop = maildrop
        self._avatar_id = credentials.username
        if isinstance(self._avatar_id, bytes):
            self._avatar_id = self._avatar_id.decode("utf-8", "replace")
        self.state = TRANSACTION
        self.setTimeout(self.policy.transaction_timeout)
        metrics.login("success", mechanism, self._login_started)
        metrics.session_started()
        log.info(
            "login user={user} client={client} mechanism={mechanism}",
            user=self._avatar_id,
            client=self._peer_host,
            mechanism=mechanism,
        )
        count = len(maildrop.messages)
        self._octets = sum(message.size for message in maildrop.messages)
        self.transport.write(
            _Reply.ok(f"Logged in, {count} messages ({self._octets} octets).")
        )
        return None

    def _login_too_soon(
        self, maildrop, credentials, mechanism: str, wait: float
    ) -> Deferred | None:
        """
        Refuse a correct login under LOGIN-DELAY (RFC 2449 section 6.5),
        unlocking the maildrop the portal opened.
        """
        maybeDeferred(maildrop.release).addErrback(
            lambda failure: log.failure("releasing maildrop", failure)
        )
        metrics.login("login_delay", mechanism, self._login_started)
        user = _printable(credentials.username)
        log.info(
            "login refused user={user} client={client} mechanism={mechanism} "
            "reason=LOGIN-DELAY",
            user=user,
            client=self._peer_host,
            mechanism=mechanism,
        )
        reply = _Reply.err(
            f"Logged in less than {self.policy.login_delay} seconds ago; "
            f"wait {int(wait + 0.999)} more seconds.",
            "LOGIN-DELAY",
        )
        delay = self.policy.throttle.delay(
            self.policy.failure_delay,
            self._peer_host,
            credentials.username,
            self.factory.reactor.seconds(),
        )
        return self._reply_later(reply, delay, counts=False)

    def _login_failed(
        self, failure: Failure, mechanism: str, credentials=None
    ) -> Deferred | None:
        """
        Answer a failed login, after the failure delay and any penalty (see
        L{popd.auth.throttle}).  An unknown user, a wrong password and a
        refused user are one L{UnauthorizedLogin}, one reply, one delay.
        """
        username = getattr(credentials, "username", None)
        log.info(
            "login failed user={user} client={client} mechanism={mechanism} "
            "reason={reason}",
            user=_printable(username),
            client=self._peer_host,
            mechanism=mechanism,
            reason=failure.type.__name__,
        )
        throttle, now = self.policy.throttle, self.factory.reactor.seconds()
        base = self.policy.failure_delay
        metrics.login(_login_outcome(failure), mechanism, self._login_started)
        if failure.check(UnauthorizedLogin):
            delay = throttle.failed(base, self._peer_host, username, now)
            reply = _Reply.err("Authentication failed.", "AUTH")
            return self._reply_later(reply, delay, counts=True)
        if failure.check(NoSuchFolder):
            reply = _Reply.err("There is no such folder.")
        elif failure.check(MaildropInUse):
            reply = _Reply.err("Mailbox is locked by another POP3 session.", "IN-USE")
        elif failure.check(MaildropUnavailable):
            reply = _Reply.err("Mailbox is temporarily unavailable.", "SYS/TEMP")
        elif failure.check(MaildropError):
            reply = _Reply.err("Mailbox cannot be opened.", "SYS/PERM")
        elif failure.check(AuthUnavailable):
            log.warn(
                "user database unavailable: {error}", error=failure.getErrorMessage()
            )
            reply = _Reply.err("Authentication is temporarily unavailable.", "SYS/TEMP")
        else:
            log.failure("login error", failure)
            reply = _Reply.err("Internal error.", "SYS/TEMP")
        delay = throttle.delay(base, self._peer_host, username, now)
        return self._reply_later(reply, delay, counts=False)

    def _reply_later(self, reply: bytes, delay: float, counts: bool) -> Deferred | None:
        """
        Write a failed login's C{reply} after C{delay} seconds on the
        factory's reactor, holding this session's later commands but no
        other session; then count it towards C{max_auth_failures} if
        C{counts}.  The idle timeout does not run meanwhile: the client is
        waiting for us.
        """

        def send(_ignored: object = None) -> None:
            if self._closing:
                return
            self.setTimeout(self.policy.auth_timeout)
            self.transport.write(reply)
            if counts:
                self._count_auth_failure()

        if delay <= 0:
            send()
            return None
        self.setTimeout(None)
        return deferLater(self.factory.reactor, delay, send)

    def _count_auth_failure(self) -> None:
        self._auth_failures += 1
        if self._auth_failures >= self.policy.max_auth_failures:
            self._end_reason = "too many authentication failures"
            self._close(_Reply.err("Too many authentication failures.", "AUTH"))

    # TRANSACTION state

    def _no_argument(self, argument: bytes) -> None:
        if argument:
            raise CommandError("This command takes no arguments.")

    def _arguments(self, argument: bytes, required: int, optional: int = 0) -> list:
        words = argument.split()
        if len(words) < required:
            raise CommandError("Missing argument.")
        if len(words) > required + optional:
            raise CommandError("Too many arguments.")
        return words

    def _message_index(self, word: bytes) -> int:
        if not word.isdigit() or len(word) > 10:
            raise CommandError(f"Invalid message number: {_ascii(word)[:20]}")
        number = int(word)
        if not 1 <= number <= len(self._maildrop.messages):
            raise CommandError(f"There's no message {number}.")
        if number - 1 in self._deleted:
            raise CommandError(f"Message {number} is deleted.")
        return number - 1

    def _live(self):
        deleted = self._deleted
        for index, message in enumerate(self._maildrop.messages):
            if index not in deleted:
                yield index + 1, message

    def do_STAT(self, argument: bytes) -> None:
        self._no_argument(argument)
        messages = self._maildrop.messages
        count = len(messages) - len(self._deleted)
        octets = self._octets - sum(messages[index].size for index in self._deleted)
        self.transport.write(_Reply.ok(f"{count} {octets}"))

    def _listing(self, argument: bytes, field_of) -> Deferred | None:
        words = self._arguments(argument, 0, 1)
        if words:
            index = self._message_index(words[0])
            message = self._maildrop.messages[index]
            self.transport.write(_Reply.ok(f"{index + 1} {field_of(message)}"))
            return None
        self.transport.write(_Reply.ok())
        return send_lines(self.transport, self._listing_blocks(field_of))

    def _listing_blocks(self, field_of: Callable[[MessageInfo], object]):
        """
        The lines of a LIST or UIDL listing, a few hundred to each C{bytes}
        (a hundred thousand of them one by one cost four times as much).
        """
        live = self._live()
        while block := "".join(
            f"{number} {field_of(message)}\r\n"
            for number, message in islice(live, _LISTING_BLOCK)
        ):
            yield block.encode()

    def do_LIST(self, argument: bytes) -> Deferred | None:
        return self._listing(argument, attrgetter("size"))

    def do_UIDL(self, argument: bytes) -> Deferred | None:
        return self._listing(argument, attrgetter("uid"))

    def do_RETR(self, argument: bytes) -> Deferred:
        (word,) = self._arguments(argument, 1)
        return self._send(self._message_index(word), None)

    def do_TOP(self, argument: bytes) -> Deferred:
        word, lines = self._arguments(argument, 2)
        index = self._message_index(word)
        if not lines.isdigit() or len(lines) > 10:
            raise CommandError(f"Invalid line count: {_ascii(lines)[:20]}")
        return self._send(index, int(lines))

    def _send(self, index: int, body_lines: int | None) -> Deferred:
        size = self._maildrop.messages[index].size

        def opened(message):
            if self._closing:
                # The client went while the store opened the message: a
                # TLS transport that has lost its connection cannot take a
                # producer any more (Twisted raises AttributeError).
                message.close()
                return None
            self.transport.write(_Reply.ok(f"{size} octets"))
            return send_message(
                self.transport,
                message,
                body_lines,
                on_progress=self.resetTimeout,
                clock=self.factory.reactor,
            ).addCallbacks(sent, broken)

        def sent(octets: int) -> None:
            metrics.octets_sent(octets)
            if body_lines is None:
                self._retrieved_now.add(index)
                self._retrieved[0] += 1
                self._retrieved[1] += octets

        def unreadable(failure: Failure) -> None:
            failure.trap(MaildropError, OSError)
            log.warn(
                "message {number} of {user} unreadable: {error}",
                number=index + 1,
                user=self._avatar_id,
                error=failure.getErrorMessage(),
            )
            self.transport.write(_Reply.err("Message can't be read.", "SYS/TEMP"))

        def broken(failure: Failure) -> None:
            # Half a message is on the wire: the session cannot go on.
            if failure.check(SendAborted):
                # The client hung up mid-message: ordinary, worth no traceback.
                # (Or the server did, for inactivity: that reason stays.)
                if not self._closing:
                    self._end_reason = "disconnected during RETR"
            elif not self._closing:
                log.failure("sending message failed", failure)
                self._end_reason = "message send failed"
                self.transport.abortConnection()
            self._closing = True

        return maybeDeferred(self._maildrop.read, index).addCallbacks(
            opened, unreadable
        )

    def do_DELE(self, argument: bytes) -> None:
        (word,) = self._arguments(argument, 1)
        index = self._message_index(word)
        self._deleted.add(index)
        self.transport.write(_Reply.ok(f"Message {index + 1} marked for deletion."))

    def do_NOOP(self, argument: bytes) -> None:
        self._no_argument(argument)
        self.transport.write(_Reply.ok())

    def do_RSET(self, argument: bytes) -> None:
        self._no_argument(argument)
        self._deleted.clear()
        count = len(self._maildrop.messages)
        self.transport.write(_Reply.ok(f"Maildrop has {count} messages."))

    def do_QUIT(self, argument: bytes) -> Deferred | None:
        self._end_reason = "quit"
        if self.state == AUTHORIZATION:
            self._close(_Reply.ok("Logging out."))
            return None
        self.state = UPDATE
        maildrop, self._maildrop = self._maildrop, None
        deleted = sorted(self._deleted | self._expired(maildrop))

        def committed(_ignored: object) -> None:
            self._removed[0] = len(deleted)
            self._removed[1] = sum(maildrop.messages[i].size for i in deleted)
            self._close(
                _Reply.ok(
                    "Logging out, messages deleted." if deleted else "Logging out."
                )
            )

        def failed(failure: Failure) -> None:
            log.failure(
                "committing deletions for {user}", failure, user=self._avatar_id
            )
            self._close(
                _Reply.err("Some deleted messages were not removed.", "SYS/TEMP")
            )

        return maybeDeferred(
            maildrop.commit, deleted, sorted(self._retrieved_now)
        ).addCallbacks(committed, failed)

    def _expire_policy(self) -> str | None:
        """
        The retention policy in force: the user's own once logged in, else
        the server's.
        """
        if self._request is not None and self._request.expire is not None:
            return self._request.expire
        return self.policy.expire

    def _expired(self, maildrop) -> set[int]:
        """
        The messages the EXPIRE policy removes at this QUIT: those first
        retrieved at least that many days ago, or with EXPIRE 0 every
        message retrieved (RFC 2449 section 6.7).
        """
        days = self._expire_policy()
        if days is None or not days.isdigit():
            return set()
        cutoff = time.time() - int(days) * 86400
        expired = {
            index
            for index, message in enumerate(maildrop.messages)
            if message.retrieved_at is not None and message.retrieved_at <= cutoff
        }
        if int(days) == 0:
            expired |= self._retrieved_now
        return expired

    def do_X_FOLDERS(self, argument: bytes) -> Deferred:
        """
        List the user's folders (INBOX first), any of which can be opened by
        logging in as C{user<separator>folder}.
        """
        self._no_argument(argument)
        if not self.policy.folder_separator:
            raise CommandError("Unknown command: X-FOLDERS")

        def listed(names: list[str]) -> Deferred:
            self.transport.write(_Reply.ok("Folders follow."))
            lines = ["INBOX", *names]
            return send_lines(
                self.transport, (f"{name}\r\n".encode() for name in lines)
            )

        def failed(failure: Failure) -> None:
            failure.trap(MaildropError, OSError)
            self.transport.write(_Reply.err("Folders can't be listed now.", "SYS/TEMP"))

        return maybeDeferred(self._request.list_folders).addCallbacks(listed, failed)


class POP3Factory(Factory):
    """
    Builds L{POP3Server} sessions that share one portal and one policy.

    @ivar tls_options: the context factory STLS starts TLS with, or C{None}
        where STLS is not offered.
    @ivar implicit_tls: whether sessions run inside TLS from the start
        (RFC 8314 implicit TLS, port 995).
    @ivar reactor: the clock for timeouts and the pacing of long replies.
    @ivar mechanisms: the SASL mechanisms (L{sasl.ISASLMechanism}) to
        offer, in CAPA's order, each where it can work; by default
        L{sasl.DEFAULT_MECHANISMS}.
    """

    protocol = POP3Server
    noisy = False

    def __init__(
        self,
        portal,
        policy: SessionPolicy,
        tls_options=None,
        implicit_tls: bool = False,
        reactor=None,
        mechanisms=None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.portal = portal
        self.policy = policy
        self.tls_options = None if implicit_tls else tls_options
        self.implicit_tls = implicit_tls
        if mechanisms is None:
            mechanisms = sasl.default_mechanisms()
        self.mechanisms = tuple(mechanisms)

    @property
    def portal_supports_apop(self) -> bool:
        """
        Whether APOP can work now: a checker takes L{IUsernameHashedPassword}
        and (if it says) knows some user's plaintext password.
        """
        usable = sasl.usable_interfaces(self.portal)
        return IUsernameHashedPassword in usable

    def buildProtocol(self, addr) -> POP3Server:
        return POP3Server(self)
