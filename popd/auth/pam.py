"""
System users through PAM, as a Twisted Cred checker (C{pam:SERVICE}).

Each login runs C{pam_authenticate} and then C{pam_acct_mgmt} (expired or
locked accounts are refused) for the service's stack in
C{/etc/pam.d/SERVICE}, in the reactor's thread pool, never on the reactor
thread.  The C{pamela} package (ctypes, no compiler needed) speaks to
libpam.

Every refusal a PAM stack can give (unknown user, wrong password, expired
account, a module asking more than one question) is the same
L{UnauthorizedLogin}; only libpam's own breakdowns (no such module, a
system or memory error) are L{AuthUnavailable}.  popd asks libpam not to
sleep after a failure (C{PAM_FAIL_DELAY}): a sleeping module would hold a
pool thread, and popd's own failure delay already paces the client without
blocking anyone.  User names and passwords containing NUL are refused
before PAM sees them, since C strings would cut them short.

To check passwords in C{/etc/shadow} with C{pam_unix} the process must be
able to read it: run popd as root without C{--uid}, or in the C{shadow}
group.  A minimal service file, C{/etc/pam.d/popd}::

    auth     required  pam_unix.so nodelay
    account  required  pam_unix.so
"""

from __future__ import annotations

import ctypes
import os
import threading

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from popd.auth.errors import AuthUnavailable

__all__ = ["PAMChecker"]

_log = Logger()
_REFUSED = "Authentication failed"

# Linux-PAM's return codes that mean libpam itself broke down, not that
# the user was refused: PAM_OPEN_ERR, PAM_SYMBOL_ERR, PAM_SERVICE_ERR,
# PAM_SYSTEM_ERR, PAM_BUF_ERR, PAM_ABORT.
_BREAKDOWNS = frozenset({1, 2, 3, 4, 5, 26})
_PAM_FAIL_DELAY = 10  # the item that replaces libpam's failure sleep
_DELAY_FUNCTION = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)


@_DELAY_FUNCTION
def _no_sleep(retval, usec, appdata):
    """
    libpam calls this instead of sleeping after a failure.
    """


_pam_lock = threading.Lock()
_pam = None


def _pamela():
    """
    The pamela module and our own C{pam_set_item} binding (pamela's takes
    only strings), loaded once.

    @raise ImportError: pamela is not installed or libpam is missing.
    """
    global _pam
    with _pam_lock:
        if _pam is None:
            try:
                import pamela
            except (ImportError, OSError, TypeError) as error:
                raise ImportError(
                    "pam needs the pamela package and libpam "
                    f"(pip install pamela): {error}"
                ) from None
            set_item = pamela.LIBPAM["pam_set_item"]
            set_item.restype = ctypes.c_int
            set_item.argtypes = [pamela.PamHandle, ctypes.c_int, ctypes.c_void_p]
            _pam = (pamela, set_item)
        return _pam


def authenticate(service: str, username: bytes, password: bytes) -> int:
    """
    Run the service's auth and account stacks; blocking.

    @return: PAM's result code, 0 for success.
    """
    pamela, set_item = _pamela()
    conversation = pamela.new_simple_password_conv([password], "utf-8")
    try:
        handle = pamela.pam_start(service, username, conv_func=conversation)
    except pamela.PAMError as error:
        return error.errno if error.errno is not None else 4
    result = 4
    try:
        set_item(handle, _PAM_FAIL_DELAY, ctypes.cast(_no_sleep, ctypes.c_void_p))
        result = pamela.PAM_AUTHENTICATE(handle, 0)
        if result == 0:
            result = pamela.PAM_ACCT_MGMT(handle, 0)
    finally:
        pamela.PAM_END(handle, result)
    return result


@implementer(ICredentialsChecker)
class PAMChecker:
    """
    Checks USER/PASS and SASL PLAIN credentials with a PAM service.

    @param service: the PAM service name (C{/etc/pam.d/SERVICE}).
    @param reactor: the reactor for results; the global one by default.
    @param threadpool: where PAM runs; the reactor's pool by default.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, service: str, reactor=None, threadpool=None) -> None:
        if not service or "/" in service or service in (".", ".."):
            raise ValueError(f"{service!r} is not a PAM service name")
        _pamela()
        if not os.path.exists(os.path.join("/etc/pam.d", service)):
            _log.warn(
                "PAM service {service}: there is no /etc/pam.d/{service}; "
                "libpam will use the 'other' service",
                service=service,
            )
        self.service = service
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._threadpool = threadpool

    def requestAvatarId(self, credentials) -> defer.Deferred[str]:
        """
        @return: a L{Deferred} firing with the user name (C{str}), or
            failing with L{UnauthorizedLogin} or L{AuthUnavailable}.
        """
        try:
            username = credentials.username
            if isinstance(username, bytes):
                username = username.decode("utf-8")
            password = credentials.password
            if isinstance(password, str):
                password = password.encode("utf-8")
        except (AttributeError, UnicodeError):
            return defer.fail(UnauthorizedLogin(_REFUSED))
        if not username or "\0" in username or b"\0" in password:
            return defer.fail(UnauthorizedLogin(_REFUSED))
        threadpool = self._threadpool or self._reactor.getThreadPool()
        d = deferToThreadPool(
            self._reactor,
            threadpool,
            authenticate,
            self.service,
            username.encode("utf-8"),
            password,
        )
        return d.addCallback(self._outcome, username)

    def _outcome(self, result: int, username: str) -> str:
        if result == 0:
            return username
        if result in _BREAKDOWNS:
            raise AuthUnavailable(f"PAM service {self.service}: error {result}")
        raise UnauthorizedLogin(_REFUSED)
