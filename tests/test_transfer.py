"""
Moving mail between stores (popd import/export) and retention runs
(popd expire): UIDs kept, re-runs idempotent, only retrieved mail expires.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred

from popd.maildrops.maildir import MaildirProvider
from popd.testing import MemoryMaildropProvider, stop_reactor_threadpool, wait_for
from popd.transfer import copy_mailbox, expire_mailbox, provider_from_spec

REPO = Path(__file__).resolve().parent.parent
MESSAGES = [b"Subject: a\n\none\n", b"Subject: b\n\n.dot\n", b"Subject: a\n\none\n"]


@pytest.fixture(autouse=True, scope="module")
def _threads():
    yield
    stop_reactor_threadpool()


def run(coroutine):
    return wait_for(Deferred.fromCoroutine(coroutine))


def contents(provider, user, folder=None):
    maildrop = wait_for(provider.open(user, folder))
    try:
        found = []
        for index, info in enumerate(maildrop.messages):
            message = wait_for(maildrop.read(index))
            found.append((info.uid, message.read()))
            message.close()
        return found
    finally:
        wait_for(maildrop.release())


def test_copy_keeps_uids_and_content_and_is_idempotent(tmp_path):
    source = MemoryMaildropProvider()
    for message in MESSAGES:
        source.deliver("alice", message)
    target = MaildirProvider(str(tmp_path / "%u" / "Maildir"))
    progress = []
    report = run(
        copy_mailbox(
            source, "alice", target, "bob", progress=lambda *a: progress.append(a)
        )
    )
    assert (report.copied, report.skipped) == (3, 0)
    assert progress[-1] == (3, 3)
    assert contents(target, "bob") == contents(source, "alice")
    again = run(copy_mailbox(source, "alice", target, "bob"))
    assert (again.copied, again.skipped) == (0, 3)
    assert len(contents(target, "bob")) == 3
    assert source.contents("alice") == MESSAGES


def test_copy_of_a_folder(tmp_path):
    source = MemoryMaildropProvider()
    source.deliver("alice", b"x\n", folder="Archive")
    target = MaildirProvider(str(tmp_path / "%u" / "Maildir"))
    assert run(copy_mailbox(source, "alice", target, "alice", "Archive")).copied == 1
    assert [m for _, m in contents(target, "alice", "Archive")] == [b"x\n"]


def test_expire_removes_only_old_retrieved_mail():
    provider = MemoryMaildropProvider()
    for message in MESSAGES:
        provider.deliver("alice", message)
    maildrop = wait_for(provider.open("alice"))
    wait_for(maildrop.commit([], [0, 1]))
    assert run(expire_mailbox(provider, "alice", 30)) == 0
    assert run(expire_mailbox(provider, "alice", 30, now=time.time() + 31 * 86400)) == 2
    assert provider.contents("alice") == [MESSAGES[2]]


@pytest.mark.parametrize("spec", ["maildir", "mbox:", "ftp:/x", "sql:"])
def test_bad_store_spec(spec):
    with pytest.raises(ValueError, match="is not a store"):
        provider_from_spec(spec)


def popd(cwd, *argv, stdin=b""):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "popd.cli", *argv],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_maildir_to_sqlite_to_mbox_round_trip_keeps_uids(tmp_path):
    assert (
        popd(tmp_path, "adduser", "alice", "--password-stdin", stdin=b"pw\n").returncode
        == 0
    )
    for message in MESSAGES:
        assert popd(tmp_path, "deliver", "alice", stdin=message).returncode == 0
    maildir = MaildirProvider(str(tmp_path / "popd-data" / "mail" / "%u" / "Maildir"))
    original = contents(maildir, "alice")
    config = tmp_path / "sql.toml"
    config.write_text('[server]\ndata_dir = "popd-data"\n[maildrop]\ntype = "sql"\n')
    spec = f"maildir:{tmp_path}/popd-data/mail/%u/Maildir"
    result = popd(tmp_path, "--config", str(config), "import", "alice", "--from", spec)
    assert result.returncode == 0, result.stderr
    assert b"copied 3 messages" in result.stdout and b"3/3 messages" in result.stderr
    rerun = popd(
        tmp_path, "--config", str(config), "import", "alice", "--from", spec, "-q"
    )
    assert b"skipped 3 already there" in rerun.stdout and rerun.stderr == b""
    mbox = tmp_path / "alice.mbox"
    result = popd(
        tmp_path, "--config", str(config), "export", "alice", "--to", f"mbox:{mbox}"
    )
    assert result.returncode == 0, result.stderr
    from popd.maildrops.mbox import MboxProvider

    assert contents(MboxProvider(str(mbox)), "alice") == original


def test_expire_command(tmp_path):
    assert (
        popd(tmp_path, "adduser", "alice", "--password-stdin", stdin=b"pw\n").returncode
        == 0
    )
    assert popd(tmp_path, "deliver", "alice", stdin=b"x\n").returncode == 0
    result = popd(tmp_path, "expire", "alice", "--days", "0")
    assert result.returncode == 0 and b"removed 0 expired messages" in result.stdout
    missing = popd(tmp_path, "expire", "alice")
    assert missing.returncode != 0 and b"no retention policy" in missing.stderr
