"""
Tests for L{popd.maildrops.locking}: one holder, in this process or another.
"""

import gc
import os
import selectors
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from popd.interfaces import MaildropInUse
from popd.maildrops.locking import acquire_lock

REPO = Path(__file__).resolve().parents[1]

HOLDER = """
import sys
from popd.maildrops.locking import acquire_lock
lock = acquire_lock(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""

TRIER = """
import sys
from popd.interfaces import MaildropInUse
from popd.maildrops.locking import acquire_lock
try:
    acquire_lock(sys.argv[1])
except MaildropInUse:
    sys.exit(3)
"""


def python(snippet: str, *args: str, **kwargs) -> subprocess.Popen:
    """
    Start a Python process running C{snippet} with popd importable.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", snippet, *args], env=env, **kwargs)


def start_holder(lock_path: str) -> subprocess.Popen:
    """
    Start a process holding the lock on C{lock_path}; return once it does.
    """
    holder = python(HOLDER, lock_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert read_line(holder, timeout=30) == b"locked\n"
    return holder


def read_line(process: subprocess.Popen, timeout: float) -> bytes:
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            process.kill()
            pytest.fail("the child process did not answer")
    return process.stdout.readline()


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdin.close()
    process.stdout.close()


def test_second_acquire_in_same_process_fails(tmp_path: Path) -> None:
    path = str(tmp_path / "lock")
    with acquire_lock(path):
        with pytest.raises(MaildropInUse):
            acquire_lock(path)


def test_release_lets_the_next_one_in(tmp_path: Path) -> None:
    path = str(tmp_path / "lock")
    lock = acquire_lock(path)
    assert lock.held
    lock.release()
    assert not lock.held
    lock.release()
    acquire_lock(path).release()


def test_context_manager_releases(tmp_path: Path) -> None:
    path = str(tmp_path / "lock")
    with acquire_lock(path) as lock:
        assert lock.path == path
    assert not lock.held
    acquire_lock(path).release()


def test_forgotten_lock_goes_with_its_object(tmp_path: Path) -> None:
    path = str(tmp_path / "lock")
    lock = acquire_lock(path)
    del lock
    gc.collect()
    acquire_lock(path).release()


def test_lock_file_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    acquire_lock(str(path)).release()
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    assert path.exists()


def test_symlinked_lock_file_refused(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        acquire_lock(str(tmp_path / "link"))
    assert not (tmp_path / "elsewhere").exists()


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    path = str(tmp_path / "lock")
    holder = start_holder(path)
    try:
        with pytest.raises(MaildropInUse):
            acquire_lock(path)
    finally:
        kill(holder)
    acquire_lock(path).release()


def test_other_process_sees_our_lock(tmp_path: Path) -> None:
    path = str(tmp_path / "lock")
    with acquire_lock(path):
        assert python(TRIER, path).wait(timeout=30) == 3
    assert python(TRIER, path).wait(timeout=30) == 0
