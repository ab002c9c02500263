"""
C{popd deliver}, as an MTA runs it: the exit codes it understands
(sysexits), the trace fields, the size limit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from popd.delivery.pipe import spool_message

REPO = Path(__file__).resolve().parents[1]
EX_NOUSER, EX_CANTCREAT, EX_TEMPFAIL = 67, 73, 75


def deliver(directory: Path, *arguments: str, stdin: bytes, config: str = ""):
    config_file = directory / "popd.toml"
    config_file.write_text('[server]\ndata_dir = "data"\n' + config)
    return subprocess.run(
        [sys.executable, "-m", "popd.cli", "--config", str(config_file)]
        + ["deliver", *arguments],
        input=stdin,
        capture_output=True,
        cwd=directory,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "passwd").write_text("alice:{PLAIN}pw\nbob:{PLAIN}pw\n")
    return tmp_path


def stored(site: Path, user: str, folder: str | None = None) -> list[bytes]:
    maildir = site / "data" / "mail" / user / "Maildir"
    if folder:
        maildir = maildir / f".{folder}"
    new = maildir / "new"
    if not new.exists():
        return []
    return [path.read_bytes() for path in sorted(new.iterdir())]


MESSAGE = b"Subject: hi\n\nbody\n"


def test_by_hand_the_message_is_stored_as_it_is(site):
    result = deliver(site, "alice", stdin=MESSAGE)
    assert result.returncode == 0, result.stderr
    assert stored(site, "alice") == [MESSAGE]


def test_with_a_sender_trace_fields_are_added(site):
    result = deliver(site, "alice", "-f", "bob@example.org", stdin=MESSAGE)
    assert result.returncode == 0, result.stderr
    assert stored(site, "alice") == [
        b"Return-Path: <bob@example.org>\nDelivered-To: alice\n" + MESSAGE
    ]


def test_null_sender_and_address(site):
    result = deliver(site, "alice", "-f", "", "-a", "alice@example.test", stdin=MESSAGE)
    assert result.returncode == 0, result.stderr
    assert stored(site, "alice") == [
        b"Return-Path: <>\nDelivered-To: alice@example.test\n" + MESSAGE
    ]


def test_envelope_line_and_old_return_path_are_replaced(site):
    message = (
        b"From bob@example.org  Tue Jan  2 10:00:00 2024\n"
        b"Return-Path: <forged@example.org>\n"
        b"Return-Path: <folded@\n  example.org>\n" + MESSAGE
    )
    result = deliver(site, "alice", stdin=message)
    assert result.returncode == 0, result.stderr
    assert stored(site, "alice") == [
        b"Return-Path: <bob@example.org>\nDelivered-To: alice\n" + MESSAGE
    ]


def test_address_and_detail_reach_the_user(site):
    (site / "data" / "mail" / "alice" / "Maildir" / ".Lists" / "new").mkdir(
        parents=True
    )
    for sub in ("cur", "tmp"):
        (site / "data" / "mail" / "alice" / "Maildir" / sub).mkdir()
        (site / "data" / "mail" / "alice" / "Maildir" / ".Lists" / sub).mkdir()
    (site / "data" / "mail" / "alice" / "Maildir" / "new").mkdir()
    config = "[delivery]\ndetail_folders = true\n"
    result = deliver(site, "Alice+lists@example.test", stdin=MESSAGE, config=config)
    assert result.returncode == 0, result.stderr
    assert stored(site, "alice", "Lists") == [MESSAGE]
    # --folder wins over the detail.
    result = deliver(
        site, "alice+lists", "--folder", "INBOX", stdin=MESSAGE, config=config
    )
    assert result.returncode == 0, result.stderr
    assert stored(site, "alice") == [MESSAGE]


def test_unknown_user_is_ex_nouser(site):
    result = deliver(site, "ghost@example.test", stdin=MESSAGE)
    assert result.returncode == EX_NOUSER, result.stderr
    assert b"Traceback" not in result.stderr


def test_size_limit_is_ex_cantcreat(site):
    config = "[delivery]\nmax_message_size = 100\n"
    result = deliver(site, "alice", stdin=b"x" * 101, config=config)
    assert result.returncode == EX_CANTCREAT, result.stderr
    assert b"larger than 100" in result.stderr
    assert stored(site, "alice") == []
    # Exactly at the limit (counted with CRLF line ends) is fine.
    result = deliver(
        site, "alice", stdin=b"x" * 48 + b"\n" + b"y" * 48 + b"\n", config=config
    )
    assert result.returncode == 0, result.stderr


def test_unwritable_maildrop_root_is_ex_tempfail(site):
    (site / "blocked").write_text("a file where a directory should be")
    config = '[maildrop]\npath = "blocked/%u/Maildir"\n'
    result = deliver(site, "alice", stdin=MESSAGE, config=config)
    assert result.returncode == EX_TEMPFAIL, result.stderr
    assert b"Traceback" not in result.stderr


def test_unreadable_passwd_file_is_ex_tempfail(site):
    config = f"[auth]\npasswd_file = {json.dumps(str(site))}\n"
    result = deliver(site, "alice", stdin=MESSAGE, config=config)
    assert result.returncode == EX_TEMPFAIL, result.stderr


def test_broken_configuration_is_ex_tempfail(site):
    result = deliver(site, "alice", stdin=MESSAGE, config="[delivery]\nbogus = 1\n")
    assert result.returncode == EX_TEMPFAIL, result.stderr
    assert b"bogus" in result.stderr


def test_large_message_is_spooled_not_held(site, tmp_path):
    import io

    big = b"Subject: big\n\n" + b"z" * 2_000_000 + b"\n"
    message = spool_message(io.BytesIO(big), limit=None, directory=tmp_path)
    try:
        assert not message.spool.in_memory
        assert message.spool.reader().read() == big
        assert message.sender is None
    finally:
        message.spool.close()
    result = deliver(site, "alice", stdin=big)
    assert result.returncode == 0, result.stderr
    assert stored(site, "alice") == [big]
