"""
Tests for popd.auth.checkpassword: a real checkpassword program, written by
the test, run through C{reactor.spawnProcess} with descriptor 3.
"""

from __future__ import annotations

import ast
import os
import stat
import sys
import time
from pathlib import Path

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, gatherResults
from twisted.python.failure import Failure

from popd.auth.checkpassword import CheckpasswordChecker, parse_command
from popd.auth.errors import AuthUnavailable

TIMEOUT = 30.0

# The qmail interface: read user\0password\0timestamp\0 from descriptor 3,
# exit 1 to refuse, 111 for a temporary failure, or run the subprogram.
PROGRAM = """\
#!{python}
import os, sys, time
data = b""
while len(data) < 513:
    chunk = os.read(3, 513 - len(data))
    if not chunk:
        break
    data += chunk
with open({log!r}, "ab") as log:
    log.write(repr((data, sys.argv[1:], sorted(os.environ))).encode() + b"\\n")
user, password, stamp, rest = data.split(b"\\0", 3)
if user == b"temp":
    sys.exit(111)
if user == b"slow":
    time.sleep(30)
if user == b"crash":
    sys.stderr.write("database exploded\\nsecond line\\n")
    sys.exit(3)
if user == b"kill":
    os.kill(os.getpid(), 9)
if (user, password) in ((b"alice", b"secret"), (b"j\\xc3\\xbcrgen", b"p w")):
    os.execvp(sys.argv[1], sys.argv[1:])
sys.exit(1)
"""


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "checkpassword"
    path.write_text(
        PROGRAM.format(python=sys.executable, log=str(tmp_path / "calls.log"))
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def calls(program: Path) -> list:
    log = program.parent / "calls.log"
    if not log.exists():
        return []
    return [ast.literal_eval(line) for line in log.read_text().splitlines()]


def run(d: Deferred, timeout: float = TIMEOUT):
    """
    Turn the global reactor until C{d} fires, reaping child processes (no
    SIGCHLD handler runs without C{reactor.run()}).
    """
    from twisted.internet import reactor
    from twisted.internet.process import reapAllProcesses

    results: list = []
    d.addBoth(results.append)
    deadline = time.monotonic() + timeout
    while not results and time.monotonic() < deadline:
        reactor.iterate(0.01)
        reapAllProcesses()
    assert results, "the checker did not answer in time"
    return results[0]


def login(checker, user: bytes, password: bytes):
    return run(checker.requestAvatarId(UsernamePassword(user, password)))


def failed_with(result, kind) -> bool:
    return isinstance(result, Failure) and result.check(kind) is not None


def test_right_password_runs_the_subprogram(program):
    checker = CheckpasswordChecker(parse_command(str(program)))
    assert login(checker, b"alice", b"secret") == "alice"
    ((data, argv, environment),) = calls(program)
    user, password, stamp, rest = data.split(b"\0")
    assert (user, password, rest) == (b"alice", b"secret", b"")
    assert stamp.startswith(b"<") and stamp.endswith(b"@popd>")
    assert len(argv) == 1 and argv[0].endswith("/true")
    assert set(environment) <= {"PATH", "SERVICE", "LC_CTYPE"}


def test_utf8_names_and_spaces(program):
    checker = CheckpasswordChecker(parse_command(str(program)))
    assert login(checker, "jürgen".encode(), b"p w") == "jürgen"


def test_given_subprogram_and_arguments(program, tmp_path):
    command = parse_command(f"'{program}' /bin/true --flag")
    assert command == [str(program), "/bin/true", "--flag"]
    checker = CheckpasswordChecker(command)
    assert login(checker, b"alice", b"secret") == "alice"


@pytest.mark.parametrize(
    "user, password",
    [
        (b"alice", b"wrong"),
        (b"mallory", b"secret"),
    ],
)
def test_exit_1_refuses(program, user, password):
    checker = CheckpasswordChecker(parse_command(str(program)))
    assert failed_with(login(checker, user, password), UnauthorizedLogin)


@pytest.mark.parametrize(
    "user, password",
    [
        (b"ali\0ce", b"secret"),
        (b"alice", b"sec\0ret"),
        (b"alice", b"x" * 600),
        (b"", b"secret"),
        (b"\xff", b"secret"),
    ],
)
def test_refused_without_running_anything(program, user, password):
    checker = CheckpasswordChecker(parse_command(str(program)))
    assert failed_with(login(checker, user, password), UnauthorizedLogin)
    assert calls(program) == []


def test_exit_111_is_a_temporary_failure(program):
    checker = CheckpasswordChecker(parse_command(str(program)))
    result = login(checker, b"temp", b"x")
    assert failed_with(result, AuthUnavailable)
    assert "temporary failure" in result.getErrorMessage()


def test_other_exit_status_is_an_error_with_its_first_line(program):
    checker = CheckpasswordChecker(parse_command(str(program)))
    result = login(checker, b"crash", b"x")
    assert failed_with(result, AuthUnavailable)
    message = result.getErrorMessage()
    assert "exited with status 3: database exploded" in message
    assert "second line" not in message


def test_killed_program_is_an_error(program):
    checker = CheckpasswordChecker(parse_command(str(program)))
    result = login(checker, b"kill", b"x")
    assert failed_with(result, AuthUnavailable)
    assert "signal 9" in result.getErrorMessage()


def test_slow_program_is_killed(program):
    checker = CheckpasswordChecker(parse_command(str(program)), timeout=0.5)
    started = time.monotonic()
    result = login(checker, b"slow", b"x")
    assert failed_with(result, AuthUnavailable)
    assert "did not answer within 0.5 s" in result.getErrorMessage()
    assert time.monotonic() - started < 10


def test_concurrent_logins_are_bounded(program, monkeypatch):
    from popd.auth import checkpassword

    monkeypatch.setattr(checkpassword, "MAX_RUNNING", 3)
    checker = CheckpasswordChecker(parse_command(str(program)))
    users = [(b"alice", b"secret"), (b"bob", b"x")] * 6
    d = gatherResults(
        [
            checker.requestAvatarId(UsernamePassword(u, p)).addErrback(
                lambda f: f.trap(UnauthorizedLogin) and "refused"
            )
            for u, p in users
        ]
    )
    assert checker._running.tokens == 0 and len(checker._running.waiting) == 9
    assert run(d) == ["alice", "refused"] * 6
    assert len(calls(program)) == 12


def test_missing_program_is_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match="is not an executable program"):
        parse_command(str(tmp_path / "nope"))
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(ValueError, match="is not an executable program"):
        parse_command(str(plain))
    with pytest.raises(ValueError, match="needs a program"):
        parse_command("  ")
    with pytest.raises(ValueError, match="cannot read"):
        parse_command("'unterminated")


def test_program_found_on_the_path():
    command = parse_command("true")
    assert os.path.isabs(command[0]) and command[0].endswith("/true")


def test_program_removed_after_start_is_unavailable(program):
    checker = CheckpasswordChecker(parse_command(str(program)))
    program.unlink()
    result = login(checker, b"alice", b"secret")
    assert failed_with(result, AuthUnavailable)
