"""
Logging (L{popd.logging}): JSON lines with every structured field
(C{[server] log_format = "json"}), a log file reopened on SIGHUP
(C{log_file}), and workers' events relayed through the master.
"""

from __future__ import annotations

import io
import json
import os
import signal

from helpers.ops_e2e import LaunchedPopd, wait_for
from helpers.popd_e2e import RawPOP3, config_text, twistd_command
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, LogPublisher, formatEvent

from popd.logging import RELAY_DELAY, WorkerObserver, json_observer, relay_event


def events_of(output: str) -> list[dict]:
    """
    Every line of C{output} as JSON (each must be one).
    """
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def log_in(server, user: str, password: str) -> None:
    with RawPOP3(server.pop3_port) as client:
        assert client.command(f"USER {user}").startswith(b"+OK")
        assert client.command(f"PASS {password}").startswith(b"+OK")
        assert client.command("QUIT").startswith(b"+OK")


def test_json_observer_keeps_fields_and_adds_text():
    output = io.StringIO()
    publisher = LogPublisher(json_observer(output))
    Logger(observer=publisher).info(
        "login user={user} client={client}", user="jo", client="192.0.2.1"
    )
    (event,) = events_of(output.getvalue())
    assert event["user"] == "jo" and event["client"] == "192.0.2.1"
    assert event["text"] == "login user=jo client=192.0.2.1"
    assert event["log_level"]["name"] == "info"


class RunningClock(Clock):
    """
    A reactor clock that says it is running, as a worker's reactor does.
    """

    running = True


def relayed(observer_output: str) -> list[dict]:
    """
    What the master publishes for a worker's output.
    """
    received: list[dict] = []
    for line in observer_output.splitlines(keepends=True):
        relay_event(line.encode(), 2, 4242, received.append)
    return received


def test_relayed_worker_events_are_tagged():
    output = io.StringIO()
    Logger(observer=WorkerObserver(output), namespace="popd.protocol").info(
        "login user={user} {{braces}}", user="jo"
    )
    received = relayed(output.getvalue())
    relay_event(b"Fatal Python error: oops\n", 2, 4242, received.append)
    relay_event(b"\n", 2, 4242, received.append)
    assert len(received) == 2, "an empty line is no event"
    event = received[0]
    assert event["user"] == "jo" and event["worker"] == 2
    assert event["log_system"] == "worker 2 pid 4242"
    assert event["log_namespace"] == "popd.protocol"
    assert event["log_level"] is LogLevel.info
    assert formatEvent(event) == "login user=jo {braces}"
    assert received[1]["line"] == "Fatal Python error: oops"


def test_relayed_failure_keeps_its_traceback():
    output = io.StringIO()
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        Logger(observer=WorkerObserver(output)).failure("command failed")
    (event,) = relayed(output.getvalue())
    assert event["log_level"] is LogLevel.critical
    text = formatEvent(event)
    assert text.startswith("command failed")
    assert "ZeroDivisionError" in text and "Traceback" in text


def test_worker_lines_wait_a_moment_but_warnings_do_not():
    output = io.StringIO()
    clock = RunningClock()
    log = Logger(observer=WorkerObserver(output, clock))
    log.info("first")
    log.info("second")
    assert output.getvalue() == ""
    clock.advance(RELAY_DELAY)
    assert [formatEvent(e) for e in relayed(output.getvalue())] == ["first", "second"]
    log.info("third")
    log.warn("trouble")
    texts = [formatEvent(e) for e in relayed(output.getvalue())]
    assert texts[-2:] == ["third", "trouble"]
    assert clock.getDelayedCalls() == []


def test_worker_lines_go_at_once_without_a_running_reactor():
    output = io.StringIO()
    observer = WorkerObserver(output, Clock())
    Logger(observer=observer).info("starting")
    assert formatEvent(relayed(output.getvalue())[0]) == "starting"


def test_json_log_on_standard_output(popd_factory):
    server = popd_factory(
        "json-log", plaintext="always", server_extra='log_format = "json"'
    )
    server.add_plain_user("jo", "json-pass")
    log_in(server, "jo", "json-pass")
    wait_for(lambda: "session end user=jo" in server.output())
    events = events_of(server.output())
    (login,) = [e for e in events if e.get("text", "").startswith("login user=jo")]
    assert login["user"] == "jo"
    assert login["client"] == "127.0.0.1"
    assert login["mechanism"] == "USER"
    (end,) = [e for e in events if e.get("text", "").startswith("session end user=jo")]
    assert end["end"] == "quit" and end["pid"] == server.process.pid


def test_json_log_of_workers(popd_factory):
    server = popd_factory(
        "json-workers",
        plaintext="always",
        server_extra='log_format = "json"\nworkers = 2',
    )
    server.add_plain_user("jw", "json-pass")
    wait_for(lambda: server.output().count("POP3 accepting on") >= 2, timeout=30)
    log_in(server, "jw", "json-pass")
    wait_for(lambda: "session end user=jw" in server.output())
    (end,) = [
        e
        for e in events_of(server.output())
        if e.get("text", "").startswith("session end user=jw")
    ]
    assert end["worker"] in (1, 2) and end["worker_pid"] == end["pid"]
    assert end["pid"] != server.process.pid


def test_log_file_reopened_on_sighup(tmp_path, pki):
    path = tmp_path / "popd.log"
    config = tmp_path / "popd.toml"
    config.write_text(config_text(pki, server_extra=f'log_file = "{path}"'))
    server = LaunchedPopd(tmp_path, config, twistd_command("--config", str(config)))
    server.start(listeners=())
    try:
        # The log goes to the file, not to standard output.
        wait_for(lambda: path.exists() and "POP3 listening on" in path.read_text())
        assert "POP3 listening on" not in server.output()
        os.rename(path, tmp_path / "popd.log.1")  # as logrotate does
        server.process.send_signal(signal.SIGHUP)
        wait_for(
            lambda: path.exists() and "TLS certificates reloaded" in path.read_text()
        )
        assert "SIGHUP" in (tmp_path / "popd.log.1").read_text()
    finally:
        server.stop()
    assert "Traceback" not in path.read_text()


def test_relayed_text_as_twisted_formats_it():
    """
    The worker formats with str.format where it can, and with Twisted's
    formatter where str.format cannot (calls in fields).
    """
    output = io.StringIO()
    log = Logger(observer=WorkerObserver(output))
    log.info("took {duration:.3f}s for {user!r}", duration=0.12345, user="jo")
    log.info("called {answer()}", answer=lambda: 42)
    texts = [formatEvent(event) for event in relayed(output.getvalue())]
    assert texts == ["took 0.123s for 'jo'", "called 42"]
