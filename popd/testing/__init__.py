"""
Testing helpers for popd and for anyone writing a store for it:

  - L{MemoryMaildropProvider}: an in-memory store keeping the whole contract
    of L{popd.interfaces}, for protocol tests and as a reference.
  - L{wait_for}: wait for a store's L{Deferred} in a synchronous test, even
    when the store works in threads (see L{popd.testing.reactor}).
  - C{popd.testing.contract.MaildropContract}: the store contract as pytest
    tests, run against a store with one subclass.  It is not imported here
    because it needs pytest, which a server does not.
"""

from popd.testing.memory import MemoryMaildrop, MemoryMaildropProvider
from popd.testing.reactor import (
    DeferredTimeout,
    start_reactor_threadpool,
    stop_reactor_threadpool,
    wait_for,
)

__all__ = [
    "DeferredTimeout",
    "MemoryMaildrop",
    "MemoryMaildropProvider",
    "start_reactor_threadpool",
    "stop_reactor_threadpool",
    "wait_for",
]
