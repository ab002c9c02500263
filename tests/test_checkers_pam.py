"""
Tests for popd.auth.pam against the real libpam: as root, a PAM service
file in /etc/pam.d using pam_unix and a temporary system user, both removed
afterwards.  Skipped, saying why, when not root or the tools are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.logger import capturedLogs

from popd.testing import stop_reactor_threadpool, wait_for

PAM_D = Path("/etc/pam.d")
PAM_UNIX = ("auth required pam_unix.so nodelay\naccount required pam_unix.so\n",)
PASSWORD = "Pam test pass 1"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the PAM tests create a system user and a PAM service: root only"
    for tool in ("useradd", "userdel", "chpasswd", "usermod", "chage"):
        if shutil.which(tool) is None:
            return f"the PAM tests need {tool}"
    if not PAM_D.is_dir():
        return "there is no /etc/pam.d"
    try:
        import pamela  # noqa: F401
    except (ImportError, OSError) as error:
        return f"pamela or libpam is missing: {error}"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


def sh(*command: str, stdin: str | None = None) -> None:
    subprocess.run(
        command, input=stdin, text=True, check=True, capture_output=True, timeout=60
    )


@pytest.fixture(scope="module")
def service():
    """
    A PAM service checking /etc/shadow with pam_unix, removed at the end.
    """
    name = f"popd-test-{uuid.uuid4().hex[:8]}"
    path = PAM_D / name
    path.write_text(PAM_UNIX[0])
    try:
        yield name
    finally:
        path.unlink(missing_ok=True)
        stop_reactor_threadpool()


@pytest.fixture
def user():
    """
    A temporary system user with a password, removed at the end.
    """
    name = f"popdt{uuid.uuid4().hex[:8]}"
    sh("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name)
    try:
        sh("chpasswd", stdin=f"{name}:{PASSWORD}\n")
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)


def make_checker(service: str):
    from popd.auth.pam import PAMChecker

    return PAMChecker(service)


def login(checker, user, password):
    if isinstance(user, str):
        user = user.encode()
    if isinstance(password, str):
        password = password.encode()
    return checker.requestAvatarId(UsernamePassword(user, password))


def failure_of(d):
    try:
        result = wait_for(d, 30)
    except Exception as error:
        return error
    pytest.fail(f"expected a failure, got {result!r}")


def test_right_password(service, user):
    assert wait_for(login(make_checker(service), user, PASSWORD), 30) == user


@pytest.mark.parametrize(
    "who, password",
    [
        ("user", "wrong password"),
        ("nobody-such", PASSWORD),
        ("user", PASSWORD + "\0trailing"),
        ("user", ""),
    ],
)
def test_refusals_are_alike(service, user, who, password):
    name = user if who == "user" else f"{user}x"
    error = failure_of(login(make_checker(service), name, password))
    assert type(error) is UnauthorizedLogin


def test_locked_and_expired_accounts_are_refused(service, user):
    checker = make_checker(service)
    sh("usermod", "--lock", user)
    assert type(failure_of(login(checker, user, PASSWORD))) is UnauthorizedLogin
    sh("usermod", "--unlock", user)
    assert wait_for(login(checker, user, PASSWORD), 30) == user
    sh("chage", "--expiredate", "1", user)
    assert type(failure_of(login(checker, user, PASSWORD))) is UnauthorizedLogin


def test_pam_runs_in_a_thread_and_never_sleeps_after_a_failure(
    service, user, monkeypatch
):
    from popd.auth import pam

    threads = []
    real = pam.authenticate

    def spy(*args):
        threads.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(pam, "authenticate", spy)
    # Without nodelay pam_unix asks libpam for a two-second delay.
    (PAM_D / f"{service}-delay").write_text("auth required pam_unix.so\n")
    try:
        checker = make_checker(f"{service}-delay")
        started = time.monotonic()
        failure_of(login(checker, user, "wrong"))
        assert time.monotonic() - started < 1.5
    finally:
        (PAM_D / f"{service}-delay").unlink()
    assert threads and threads[0] is not threading.main_thread()


def test_service_without_a_file_warns():
    with capturedLogs() as events:
        checker = make_checker(f"popd-missing-{uuid.uuid4().hex[:6]}")
    assert any("there is no /etc/pam.d/" in str(e.get("log_format")) for e in events)
    assert checker.service.startswith("popd-missing-")


@pytest.mark.parametrize("name", ["", "../etc/passwd", "a/b", "."])
def test_bad_service_names(name):
    with pytest.raises(ValueError):
        make_checker(name)


def test_factory_default_service():
    from twisted.cred import strcred

    checker = strcred.makeChecker("pam")
    assert checker.service == "popd"
