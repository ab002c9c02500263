"""
Several worker processes on one host sharing the listening sockets
(C{[server] workers = N} or C{"auto"}, one per core).

The master is what twistd runs.  It binds every listener in
C{privilegedStartService}, as root for ports below 1024, before twistd drops
privileges (C{--uid}/C{--gid}); then it starts the workers, as the serving
user.  Each worker (C{python -m popd.worker}, L{popd.worker}) is a whole
popd (its own portal, maildrop store, throttle and connection limits) that
adopts the listening sockets (C{reactor.adoptStreamPort}) and accepts
connections from them; the kernel hands each connection to one worker.  The
master accepts none itself.

The master:

  - passes each worker its settings through a pipe (descriptor 3) and the
    listening sockets as descriptors 4 and up;
  - re-publishes each worker's log events (JSON lines on the worker's
    standard output) in its own log, tagged C{worker N pid P}, so the
    log goes where twistd was told;
  - restarts a worker that dies, after a pause that grows while workers
    keep dying young (a worker that fails on its configuration, exit
    status 78, stops the whole server instead);
  - forwards SIGHUP (reload TLS certificates, reopen the log) and, on
    SIGTERM, stops the workers (SIGTERM, then SIGKILL after
    L{STOP_TIMEOUT} seconds) before it exits;
  - serves C{[metrics] listen}: the workers write their metrics to files
    in a directory of the master's (C{prometheus_client}'s multiprocess
    mode) and the master serves their sum.

A worker exits when its master dies (Linux's parent-death signal), so no
worker is left holding the sockets.  Locks hold across workers as across any
processes: C{flock} for Maildir and mbox, dot-locks, PostgreSQL advisory
locks.  What a worker keeps in memory (failed-login penalties, LOGIN-DELAY
times, connection counts) is its own.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from twisted.internet import error as internet_error
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger, globalLogPublisher

import popd
from popd.config import ConfigError, Settings
from popd.service import (
    ListenerService,
    PopdService,
    build_mechanisms,
    build_policy,
    listener_service,
    listeners,
    prepare_tls,
)

log = Logger()

#: Seconds the workers have to exit on SIGTERM before they are killed.
STOP_TIMEOUT = 10.0
#: A worker that lived less than this many seconds died young: the pause
#: before the next restart doubles, up to L{MAX_RESTART_DELAY}.
YOUNG = 10.0
MIN_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
#: The exit status of a worker that cannot use the configuration.
EX_CONFIG = 78
#: The longest log line read from a worker; longer ones are cut.
MAX_LOG_LINE = 1 << 20
#: The descriptor a worker reads its settings from; sockets follow it.
SETTINGS_FD = 3


class WorkerProtocol(ProcessProtocol):
    """
    The master's end of one worker process: its log lines and its exit.
    """

    def __init__(self, master: MasterService, index: int) -> None:
        self.master = master
        self.index = index
        self.pid: int | None = None
        self.started = master.reactor.seconds()
        self.ended = Deferred()
        self._buffers = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd not in self._buffers:
            return
        buffer = self._buffers[fd] + data
        *lines, rest = buffer.split(b"\n")
        if len(rest) > MAX_LOG_LINE:
            lines.append(rest[:MAX_LOG_LINE])
            rest = b""
        self._buffers[fd] = rest
        for line in lines:
            self._line(fd, line)

    def _line(self, fd: int, line: bytes) -> None:
        from popd.logging import relay_event

        if fd == 1:
            relay_event(line, self.index, self.pid, globalLogPublisher)
        elif line.strip():
            log.warn(
                "worker {worker} pid {pid}: {line}",
                worker=self.index,
                pid=self.pid,
                line=line.decode("utf-8", "replace"),
            )

    def processEnded(self, reason) -> None:
        for fd, rest in self._buffers.items():
            if rest:
                self._line(fd, rest)
        self._buffers = {1: b"", 2: b""}
        self.master.worker_ended(self, reason)
        self.ended.callback(None)


class MasterService(PopdService):
    """
    Binds the listeners, runs C{settings.workers} workers on them.
    """

    def __init__(self, settings: Settings, reactor) -> None:
        super().__init__(settings, reactor)
        self.workers: dict[int, WorkerProtocol] = {}
        self.metrics_dir: str | None = None
        self._sockets: list[tuple[str, int, ListenerService]] = []
        self._restarts: dict[int, object] = {}
        self._delays: dict[int, float] = {}
        self._stopping = False
        placeholder = Factory()
        placeholder.noisy = False
        for label, index, description in listeners(settings):
            listener = listener_service(
                reactor, settings, label, description, placeholder, serve=False
            )
            listener.setServiceParent(self)
            self._sockets.append((label, index, listener))
        if settings.metrics_listen:
            # Bound now (privileged); the directory of the workers' files
            # is made in startService, by the user the workers run as.
            from popd.metrics import metrics_site, multiprocess_registry

            site = metrics_site(multiprocess_registry(lambda: self.metrics_dir))
            for description in settings.metrics_listen:
                ListenerService(reactor, description, site, "metrics").setServiceParent(
                    self
                )

    def startService(self) -> None:
        super().startService()
        if self.settings.metrics_listen:
            self.metrics_dir = tempfile.mkdtemp(prefix="popd-metrics-")
        log.info("starting {count} worker processes", count=self.settings.workers)
        for index in range(1, self.settings.workers + 1):
            self._spawn(index)

    def _sockets_for_child(self) -> tuple[dict[int, object], list]:
        child_fds: dict[int, object] = {0: "w", 1: "r", 2: "r", SETTINGS_FD: "w"}
        described = []
        descriptor = SETTINGS_FD + 1
        for label, index, listener in self._sockets:
            port = listener.port
            if port is None:
                continue
            child_fds[descriptor] = port.fileno()
            family = int(getattr(port, "addressFamily", 0)) or int(port.socket.family)
            described.append([label, index, descriptor, family])
            descriptor += 1
        return child_fds, described

    def _spawn(self, index: int) -> None:
        import json

        self._restarts.pop(index, None)
        child_fds, described = self._sockets_for_child()
        env = dict(os.environ)
        # The popd the master runs, whatever its sys.path came from.
        source = str(Path(popd.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            [source, *filter(None, [env.get("PYTHONPATH")])]
        )
        if self.metrics_dir is not None:
            from popd.metrics import MULTIPROCESS_DIR

            env[MULTIPROCESS_DIR] = self.metrics_dir
        else:
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        arguments = [
            sys.executable,
            "-m",
            "popd.worker",
            "--index",
            str(index),
            "--parent",
            str(os.getpid()),
            "--sockets",
            json.dumps(described),
        ]
        worker = WorkerProtocol(self, index)
        try:
            self.reactor.spawnProcess(
                worker, sys.executable, arguments, env=env, childFDs=child_fds
            )
        except OSError as error:
            log.error(
                "cannot start worker {worker}: {error}", worker=index, error=error
            )
            self._schedule_restart(index, young=True)
            return
        self.workers[index] = worker
        worker.transport.writeToChild(SETTINGS_FD, pickle.dumps(self.settings))
        worker.transport.closeChildFD(SETTINGS_FD)
        worker.transport.closeStdin()
        log.info("worker {worker} started pid={pid}", worker=index, pid=worker.pid)

    def worker_ended(self, worker: WorkerProtocol, reason) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.metrics_dir is not None and worker.pid is not None:
            from popd.metrics import worker_gone

            try:
                worker_gone(self.metrics_dir, worker.pid)
            except OSError:
                pass
        status = reason.value
        code = getattr(status, "exitCode", None)
        signalled = getattr(status, "signal", None)
        how = f"signal {signalled}" if signalled else f"status {code}"
        if self._stopping or not self.running:
            log.info(
                "worker {worker} pid={pid} exited ({how})",
                worker=worker.index,
                pid=worker.pid,
                how=how,
            )
            return
        if code == EX_CONFIG:
            log.critical(
                "worker {worker} pid={pid} cannot use the configuration; stopping",
                worker=worker.index,
                pid=worker.pid,
            )
            self._stopping = True
            self.reactor.callLater(0, self.reactor.stop)
            return
        young = self.reactor.seconds() - worker.started < YOUNG
        delay = self._schedule_restart(worker.index, young)
        log.warn(
            "worker {worker} pid={pid} died ({how}); restarting it in {delay}s",
            worker=worker.index,
            pid=worker.pid,
            how=how,
            delay=delay,
        )

    def _schedule_restart(self, index: int, young: bool) -> float:
        if young:
            delay = min(
                MAX_RESTART_DELAY,
                max(MIN_RESTART_DELAY, self._delays.get(index, 0) * 2),
            )
        else:
            delay = MIN_RESTART_DELAY
        self._delays[index] = delay
        self._restarts[index] = self.reactor.callLater(delay, self._spawn, index)
        return delay

    def reload(self) -> None:
        super().reload()
        self.signal_workers(signal.SIGHUP)

    def signal_workers(self, number: int) -> None:
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(number)
            except internet_error.ProcessExitedAlready:
                pass

    def stopService(self) -> Deferred:
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        running = [worker.ended for worker in self.workers.values()]
        self.signal_workers(signal.SIGTERM)
        kill = self.reactor.callLater(STOP_TIMEOUT, self.signal_workers, signal.SIGKILL)
        waiting = DeferredList(running) if running else succeed(None)

        def stopped(_ignored: object) -> Deferred | None:
            if kill.active():
                kill.cancel()
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
            return PopdService.stopService(self)

        return waiting.addBoth(stopped)


def make_master(settings: Settings, reactor) -> MasterService:
    """
    The master of C{settings.workers} workers.  What can be checked without
    opening stores is checked here, so that a broken configuration stops
    twistd with one line rather than in every worker.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    policy = build_policy(settings)
    prepare_tls(settings, policy.hostname)  # also creates the self-signed pair
    build_mechanisms(settings)
    if settings.metrics_listen:
        from popd.metrics import available

        if not available():
            raise ConfigError("[metrics] listen needs the prometheus_client package")
    return MasterService(settings, reactor)
