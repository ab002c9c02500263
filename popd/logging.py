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
import json
import sys
import time
from pathlib import Path

from twisted.logger import (
    ILogObserver,
    InvalidLogLevelError,
    LogLevel,
    eventAsText,
    formatEvent,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import implementer, provider

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


#: How late a worker may write an ordinary log line, in seconds: lines
#: written together cost the worker and the master one system call and one
#: wake-up instead of one each.  Longer makes the master's bursts longer:
#: with 0.1, one session in a hundred waited 2 ms more for a CPU (bench.run,
#: 1 client: p99 3.3 ms against 2.0 with 0.01, and 16 clients made 2,240
#: sessions/s against 2,360).
RELAY_DELAY = 0.01

#: Values a relayed event keeps as fields; others only show in its text.
_PLAIN_TYPES = (str, int, float, bool, type(None))


@implementer(ILogObserver)
class WorkerObserver:
    """
    A worker's observer: every event as one JSON line on C{output}, for the
    master to re-publish (L{relay_event}): its text formatted here (with the
    traceback of a failure) and its fields that JSON carries as they are.

    Ordinary lines are written in batches, at most L{RELAY_DELAY} seconds
    late; a warning or worse, and every line while the reactor is not
    running, is written at once with what waits before it, so nothing that
    explains a crash is left in a buffer.  L{flush} writes what waits.
    """

    def __init__(self, output, reactor=None) -> None:
        self._output = output
        self._reactor = reactor
        self._waiting: list[str] = []
        self._flush_call = None

    def __call__(self, event: dict) -> None:
        self._waiting.append(_relay_line(event))
        level = event.get("log_level")
        reactor = self._reactor_if_running()
        if reactor is None or (level is not None and level >= LogLevel.warn):
            self.flush()
        elif self._flush_call is None:
            self._flush_call = reactor.callLater(RELAY_DELAY, self.flush)

    def flush(self) -> None:
        """
        Write the lines that wait.
        """
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self._waiting:
            lines, self._waiting = self._waiting, []
            self._output.write("".join(lines))
            self._output.flush()

    def _reactor_if_running(self):
        if self._reactor is None:
            if "twisted.internet.reactor" not in sys.modules:
                return None
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor if getattr(self._reactor, "running", False) else None


def _relay_line(event: dict) -> str:
    """
    One event as the JSON line a worker relays: its plain fields, and
    C{text}, the message formatted here.
    """
    fields = {
        key: value
        for key, value in event.items()
        if type(value) in _PLAIN_TYPES and not key.startswith("log_")
    }
    level = event.get("log_level")
    fields["log_level"] = getattr(level, "name", "info")
    fields["log_time"] = event.get("log_time")
    fields["log_namespace"] = event.get("log_namespace")
    fields["text"] = _text(event)
    return json.dumps(fields, default=repr) + "\n"


def _text(event: dict) -> str:
    """
    The message of C{event}, as Twisted's text log would say it (without
    time and system).  popd's own events use plain C{str.format} fields,
    which C{format_map} fills in C; anything else (a failure's traceback,
    Twisted's C{{callable()}} fields) goes through Twisted's formatter.
    """
    log_format = event.get("log_format")
    if isinstance(log_format, str) and "log_failure" not in event:
        try:
            return log_format.format_map(event)
        except Exception:
            pass
    return eventAsText(event, includeTimestamp=False, includeSystem=False)


def relay_event(line: bytes, worker: int, pid: int, publish) -> None:
    """
    Publish a worker's JSON log line C{line} (L{WorkerObserver}) to the
    master's observers (C{publish}), tagged with C{worker} and C{pid}; a
    line that is no such event (a crash message on standard output) becomes
    an event of its own.
    """
    text = line.decode("utf-8", "replace").rstrip("\n")
    if not text:
        return
    try:
        event = json.loads(text)
    except ValueError:
        event = None
    if isinstance(event, dict) and isinstance(event.get("text"), str):
        # The text is formatted already: formatting "{text}" is one lookup.
        event["log_format"] = "{text}"
        try:
            event["log_level"] = LogLevel.levelWithName(event.get("log_level"))
        except (InvalidLogLevelError, TypeError):
            event["log_level"] = LogLevel.info
    else:
        event = {"log_format": "{line}", "line": text, "log_namespace": "popd.worker"}
    if not isinstance(event.get("log_time"), int | float):
        event["log_time"] = time.time()
    event["worker"] = worker
    event["worker_pid"] = pid
    event["log_system"] = f"worker {worker} pid {pid}"
    publish(event)
