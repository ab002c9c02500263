"""
Waiting for a L{Deferred} in a plain (synchronous) test, however the store
behind it produces its result.

A store that does its blocking work in threads (C{deferToThreadPool} on the
global reactor's pool, or C{twisted.enterprise.adbapi}) only fires its
Deferreds once the reactor runs the callbacks the worker threads queued with
C{callFromThread}.  L{wait_for} does that without C{reactor.run()} (which
can run only once per process, and never inside pytest): it starts the global
reactor's thread pool if nobody has, then turns the reactor with
C{reactor.iterate()} (timed calls, I/O and calls from threads) until the
Deferred fires or a timeout passes.  A Deferred that has already fired (an
in-memory store) costs nothing.

The global reactor's pool would otherwise only start with C{reactor.run()},
and its worker threads are not daemon threads: L{stop_reactor_threadpool}
stops them again (the contract kit does it after each test class; a test
module using L{wait_for} on its own should do it in a fixture), and the
reactor makes a new pool the next time one is asked for.  As a safety net,
the pool is also stopped when the interpreter exits.

What this does not do for you: an C{adbapi.ConnectionPool} also starts only
when the reactor runs, so a test that makes one calls its C{start()} and
later its C{close()} (see L{popd.testing.contract}).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

#: How long L{wait_for} waits by default, in seconds.
DEFAULT_TIMEOUT = 30.0

_MAX_STEP = 0.01
_exit_hook_registered = False


class DeferredTimeout(AssertionError):
    """
    A L{Deferred} did not fire in time: the store is stuck or never reports
    its result through the reactor.
    """


def global_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def start_reactor_threadpool() -> None:
    """
    Start the global reactor's thread pool (creating it if needed) so work
    given to C{reactor.getThreadPool()} runs without C{reactor.run()}.

    The first call also arranges for the pool to be stopped when the
    interpreter exits, before it waits for non-daemon threads (the pool's
    workers are such threads, and would otherwise hang the exit of a test
    run that forgot L{stop_reactor_threadpool}).
    """
    global _exit_hook_registered
    pool = global_reactor().getThreadPool()
    if not pool.started:
        pool.start()
    if not _exit_hook_registered:
        _exit_hook_registered = True
        # threading's own hook for what must run before it joins threads,
        # as concurrent.futures uses; atexit would run too late.
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(stop_reactor_threadpool)


def stop_reactor_threadpool() -> None:
    """
    Stop the global reactor's thread pool if there is one, joining its
    threads; the reactor makes a fresh one when next asked.
    """
    reactor = global_reactor()
    if getattr(reactor, "threadpool", None) is None:
        return
    # _stopThreadPool also removes the start-up and shut-down triggers that
    # the reactor registered for this pool; it is what reactor shut-down uses.
    reactor._stopThreadPool()


def wait_for(d: Any, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """
    Run the global reactor until C{d} fires, and return its result.

    @param d: a L{Deferred}, or any other value, which is returned as is (so
        a store method may also return a plain value).
    @raise Exception: whatever C{d} failed with.
    @raise DeferredTimeout: C{d} did not fire within C{timeout} seconds; it
        is cancelled.
    """
    if not isinstance(d, Deferred):
        return d
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    if not outcome:
        start_reactor_threadpool()
        reactor = global_reactor()
        deadline = time.monotonic() + timeout
        while not outcome and time.monotonic() < deadline:
            # Wait at most 10 ms, less if a timed call is due sooner (a
            # store stepping with callLater(0) must not crawl); calls from
            # threads wake the reactor at once.
            due = reactor.timeout()
            reactor.iterate(_MAX_STEP if due is None else min(due, _MAX_STEP))
        if not outcome:
            d.cancel()  # what it fails with now is swallowed by outcome
            raise DeferredTimeout(f"{d!r} did not fire within {timeout} seconds")
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result
