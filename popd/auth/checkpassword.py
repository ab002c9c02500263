"""
The qmail checkpassword interface as a Twisted Cred checker
(C{checkpassword:PROGRAM [ARGUMENTS...]}).

For each login popd runs PROGRAM (with its arguments, then the
subprogram) and writes C{user NUL password NUL timestamp NUL} to its file
descriptor 3, as qmail-popup does (L{https://cr.yp.to/checkpwd/interface.html}).
The exit status decides:

  - 0: the password is right; the avatar ID is the user name as sent;
  - 1: refused (unknown user or wrong password alike);
  - 111: a temporary failure (L{AuthUnavailable}, C{-ERR [SYS/TEMP]});
  - anything else, a signal, or no answer within L{TIMEOUT} seconds: an
    error, logged, and also L{AuthUnavailable}.

A checkpassword program runs its subprogram (its last argument) after a
success; popd needs nothing from it, so when the argument string names only
the program popd appends C{true}.  The program's standard output and error
are read (and the first line of its errors logged); its standard input is
closed.  The process runs through C{reactor.spawnProcess}, so nothing
blocks the reactor; at most L{MAX_RUNNING} run at once, later logins wait
their turn.  The environment is only C{PATH} (popd's) and
C{SERVICE=pop3}.  User names and passwords containing NUL, or longer than
the 512 bytes the interface allows together, are refused without running
anything.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from zope.interface import implementer

from popd.auth.errors import AuthUnavailable

__all__ = ["CheckpasswordChecker", "parse_command"]

#: Seconds a checkpassword program may take before it is killed.
TIMEOUT = 10.0
#: Programs running at once, per checker.
MAX_RUNNING = 10
#: The most the interface lets the program read from descriptor 3.
MAX_INPUT = 512
# Output kept from a program, per stream.
_MAX_OUTPUT = 4096

_log = Logger()
_REFUSED = "Authentication failed"


def parse_command(argument: str) -> list[str]:
    """
    The argv for the C{checkpassword:} argument string: shell words, the
    program made absolute, C{true} appended when no subprogram is given.

    @raise ValueError: no program, or it is not an executable file.
    """
    try:
        words = shlex.split(argument)
    except ValueError as error:
        raise ValueError(f"cannot read the command line: {error}") from None
    if not words:
        raise ValueError("checkpassword needs a program: checkpassword:/path/to/prog")
    program = words[0]
    found = shutil.which(program) if "/" not in program else program
    if found is None or not (os.path.isfile(found) and os.access(found, os.X_OK)):
        raise ValueError(f"{program} is not an executable program")
    words[0] = os.path.abspath(found)
    if len(words) == 1:
        words.append(shutil.which("true") or "/bin/true")
    return words


class _Run(ProcessProtocol):
    """
    One run of the program: feeds descriptor 3, collects the exit status.
    """

    def __init__(self, data: bytes, done: defer.Deferred) -> None:
        self.data = data
        self.done = done
        self.errors = b""
        self.timed_out = False

    def connectionMade(self) -> None:
        self.transport.closeChildFD(0)
        self.transport.writeToChild(3, self.data)
        self.transport.closeChildFD(3)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2 and len(self.errors) < _MAX_OUTPUT:
            self.errors += data[: _MAX_OUTPUT - len(self.errors)]

    def processEnded(self, reason) -> None:
        if not self.done.called:
            self.done.callback((reason.value, self.timed_out, self.errors))


@implementer(ICredentialsChecker)
class CheckpasswordChecker:
    """
    Checks USER/PASS and SASL PLAIN credentials with a checkpassword
    program.

    @param argv: the program, its arguments and the subprogram (see
        L{parse_command}).
    @param reactor: spawns the processes; the global reactor by default.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, argv: list[str], reactor=None, timeout: float = TIMEOUT):
        if reactor is None:
            from twisted.internet import reactor
        self.argv = list(argv)
        self.timeout = timeout
        self._reactor = reactor
        self._running = defer.DeferredSemaphore(MAX_RUNNING)

    def requestAvatarId(self, credentials) -> defer.Deferred[str]:
        """
        @return: a L{Deferred} firing with the user name (C{str}), or
            failing with L{UnauthorizedLogin} or L{AuthUnavailable}.
        """
        try:
            username = credentials.username
            if isinstance(username, str):
                username = username.encode("utf-8")
            password = credentials.password
            if isinstance(password, str):
                password = password.encode("utf-8")
            name = username.decode("utf-8")
        except (AttributeError, UnicodeError):
            return defer.fail(UnauthorizedLogin(_REFUSED))
        stamp = b"<%d.%d@popd>" % (os.getpid(), time.time_ns())
        data = b"\0".join((username, password, stamp)) + b"\0"
        if not username or b"\0" in username + password or len(data) > MAX_INPUT:
            return defer.fail(UnauthorizedLogin(_REFUSED))
        d = self._running.run(self._spawn, data)
        return d.addCallback(self._outcome, name)

    def _spawn(self, data: bytes) -> defer.Deferred:
        # A program that cannot be executed would exit 1 in the forked child,
        # which reads as "wrong password": say what it is instead.
        if not os.access(self.argv[0], os.X_OK):
            raise AuthUnavailable(f"{self.argv[0]} is not an executable program")
        done: defer.Deferred = defer.Deferred()
        run = _Run(data, done)
        environment = {"PATH": os.environ.get("PATH", os.defpath), "SERVICE": "pop3"}
        try:
            self._reactor.spawnProcess(
                run,
                self.argv[0],
                self.argv,
                env=environment,
                childFDs={0: "w", 1: "r", 2: "r", 3: "w"},
            )
        except OSError as error:
            raise AuthUnavailable(f"cannot run {self.argv[0]}: {error}") from None

        def kill() -> None:
            run.timed_out = True
            try:
                run.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass

        timer = self._reactor.callLater(self.timeout, kill)

        def stop_timer(result):
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(stop_timer)

    def _outcome(self, ended, name: str) -> str:
        reason, timed_out, errors = ended
        program = self.argv[0]
        if isinstance(reason, ProcessDone):
            return name
        status = reason.exitCode if isinstance(reason, ProcessTerminated) else None
        if status == 1:
            raise UnauthorizedLogin(_REFUSED)
        first_line = errors.decode("utf-8", "replace").strip().split("\n")[0][:200]
        if timed_out:
            problem = f"{program} did not answer within {self.timeout:g} s"
        elif status == 111:
            problem = f"{program} reported a temporary failure"
        elif status is not None:
            problem = f"{program} exited with status {status}"
        else:
            problem = f"{program} was killed by signal {reason.signal}"
        if first_line:
            problem += f": {first_line}"
        if status != 111:
            _log.error("checkpassword: {problem}", problem=problem)
        raise AuthUnavailable(problem)
