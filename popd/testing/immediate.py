"""
A thread pool and reactor that run a store's "threaded" work at once, on
the calling thread, so every L{Deferred} a store returns has fired when the
call returns: unit tests need neither threads nor a running reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


class ImmediateThreadPool:
    """
    Stands in for a ThreadPool: runs work at once and counts the calls, so a
    test can also see how often work was sent to the pool.
    """

    def __init__(self) -> None:
        self.calls = 0

    def callInThreadWithCallback(self, onResult, function, *args, **kwargs) -> None:
        self.calls += 1
        try:
            result = function(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class ImmediateReactor:
    """
    Stands in for the reactor of L{deferToThreadPool}: delivers results
    from the "thread" at once.
    """

    def __init__(self, threadpool: ImmediateThreadPool | None = None) -> None:
        self.threadpool = threadpool or ImmediateThreadPool()

    def callFromThread(self, function, *args, **kwargs) -> None:
        function(*args, **kwargs)

    def getThreadPool(self) -> ImmediateThreadPool:
        return self.threadpool


def fired_result(d: Deferred) -> Any:
    """
    The result of an already fired L{Deferred}; raise its failure.
    """
    outcome: list = []
    d.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]
