"""
Where popd's log goes, and in which form: C{[server] log_format} (C{text},
twistd's classic lines, or C{json}, one JSON object per line with every
structured field of the event) and C{[server] log_file} (default: twistd's
own log, standard output under C{twistd -n}).

Events are C{twisted.logger} events throughout: a session's steps carry
their fields (C{user}, C{client}, C{mechanism}, C{reason}, ...) as event
keys, so the JSON form is ready for a log pipeline and the text form for
people and fail2ban.

With C{[server] workers} each worker writes its events as JSON lines on its
standard output and the master re-publishes them (L{relay_event}), so every
line comes out of the one place twistd was told to log to, tagged with the
worker's number and pid.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

from twisted.logger import (
    ILogObserver,
    eventFromJSON,
    formatEvent,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import provider

from popd.config import ConfigError


class ReopenableFile(io.TextIOBase):
    """
    A log file opened for appending, which L{reopen} opens again by name:
    after logrotate moved it, C{systemctl reload popd} (SIGHUP) starts the
    new file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = self._open()

    def _open(self):
        try:
            return open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        except OSError as error:
            raise ConfigError(
                f"[server] log_file: cannot open {self.path}: {error.strerror}"
            ) from None

    def write(self, text: str) -> int:
        return self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        """
        Open the path again; on failure keep writing to the old file.
        """
        try:
            new = self._open()
        except ConfigError:
            return
        old, self._file = self._file, new
        old.close()


def open_log_file(settings) -> ReopenableFile | None:
    return ReopenableFile(settings.log_file) if settings.log_file else None


def observer_for(settings, output=None):
    """
    The log observer C{settings} ask for, or C{None} for twistd's own
    (text, with no C{log_file}).

    @param output: the file to write to (default C{log_file}, or standard
        output).
    """
    if output is None:
        output = open_log_file(settings)
    if settings.log_format == "json":
        return json_observer(output or sys.stdout)
    if output is None:
        return None
    return textFileLogObserver(output)


def json_observer(output):
    """
    One JSON object per line: every field of the event, and C{text}, the
    message as the text log would say it (for people, and for C{grep}).
    """
    write = jsonFileLogObserver(output, recordSeparator="")

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        if "text" not in event:
            event = {**event, "text": formatEvent(event)}
        write(event)

    return observe


def worker_observer(output):
    """
    A worker's observer: every event as one JSON line on C{output}, for the
    master to read (see L{relay_event}).
    """
    return jsonFileLogObserver(output, recordSeparator="")


def relay_event(line: bytes, worker: int, pid: int, publish) -> None:
    """
    Publish a worker's JSON log line C{line} to the master's observers
    (C{publish}), tagged with C{worker} and C{pid}; a line that is no JSON
    event (a crash message on standard output) becomes an event of its own.
    """
    text = line.decode("utf-8", "replace").rstrip("\n")
    if not text:
        return
    try:
        event = eventFromJSON(text)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        event = {"log_format": "{line}", "line": text, "log_namespace": "popd.worker"}
    event.setdefault("log_time", time.time())
    event["worker"] = worker
    event["worker_pid"] = pid
    event["log_system"] = f"worker {worker} pid {pid}"
    publish(event)
