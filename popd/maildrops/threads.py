"""
Running a file store's blocking work off the reactor thread.

Maildir and mbox do all their filesystem work in a thread pool and report
operating-system failures the same way: this is that one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from popd.interfaces import MaildropUnavailable


def translating_os_errors(function: Callable[..., Any], *args: Any) -> Any:
    """
    Call C{function}, reporting any C{OSError} as a temporary failure: a
    full disk, a permission or an I/O error may well be gone next time.
    """
    try:
        return function(*args)
    except OSError as e:
        raise unavailable(e) from e


def unavailable(error: OSError) -> MaildropUnavailable:
    """
    The temporary failure that operating-system C{error} is to a session,
    naming the file, with C{error} as its cause.
    """
    where = f": {error.filename}" if error.filename else ""
    failure = MaildropUnavailable(f"{error.strerror or error}{where}")
    failure.__cause__ = error
    return failure


class BlockingRunner:
    """
    Runs blocking calls in a thread pool: the reactor's own unless one is
    given (tests pass a synchronous one).
    """

    def __init__(self, reactor: Any = None, threadpool: Any = None) -> None:
        self._reactor = reactor
        self._threadpool = threadpool

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred:
        """
        Run C{function(*args)} in the pool, turning C{OSError} into
        L{MaildropUnavailable}.
        """
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        if self._threadpool is None:
            self._threadpool = self._reactor.getThreadPool()
        return deferToThreadPool(
            self._reactor, self._threadpool, translating_os_errors, function, *args
        )
