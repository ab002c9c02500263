"""
One worker process of C{[server] workers}: C{python -m popd.worker}, started
by the master (L{popd.workers}) and by nothing else.

It reads its L{Settings} from descriptor 3 (a pipe from the master), adopts
the listening sockets the master passed (C{--sockets}: label, index,
descriptor, address family), builds a whole popd on them
(L{popd.service.make_service}) and runs it until SIGTERM.  Its log events go
to standard output as JSON lines, which the master re-publishes.  It exits
when the master does (Linux's parent-death signal), and with status 78 if it
cannot use the configuration, which stops the master rather than restarting
it forever.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pickle
import signal
import sys

#: See L{popd.workers.EX_CONFIG} and L{popd.workers.SETTINGS_FD}.
EX_CONFIG = 78
SETTINGS_FD = 3
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """
    Have the kernel send SIGTERM when the master dies; exit at once if it
    already has.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        sys.exit(0)


def _stop_once_on_signals(reactor) -> None:
    """
    Stop on the first SIGTERM or SIGINT and ignore repeats: under systemd
    both the master and the service manager may send one.
    """
    stopping = []

    def stop(signum, frame) -> None:
        if not stopping:
            stopping.append(signum)
            reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def _read_settings():
    with os.fdopen(SETTINGS_FD, "rb") as pipe:
        return pickle.load(pipe)  # noqa: S301 - from our own master


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m popd.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--sockets", required=True)
    arguments = parser.parse_args(argv)
    _die_with_parent(arguments.parent)

    from twisted.logger import Logger, globalLogBeginner

    from popd.logging import WorkerObserver

    output = os.fdopen(os.dup(1), "w", encoding="utf-8")
    observer = WorkerObserver(output)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=True)
    log = Logger(namespace="popd.worker")

    settings = _read_settings()
    inherited = {
        (label, index): (descriptor, family)
        for label, index, descriptor, family in json.loads(arguments.sockets)
    }

    from twisted.internet import reactor

    from popd.config import ConfigError
    from popd.service import make_service

    try:
        service = make_service(settings, reactor, inherited=inherited)
        service.privilegedStartService()
    except (ConfigError, SystemExit) as error:
        log.critical("worker cannot start: {error}", error=str(error))
        return EX_CONFIG
    reactor.callWhenRunning(service.startService)
    reactor.callWhenRunning(_stop_once_on_signals, reactor)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    log.info("worker {index} running", index=arguments.index)
    reactor.run()
    observer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
