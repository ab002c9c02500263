"""
Tests for L{popd.maildrops.maildir}, run without a reactor: the provider is
given a thread pool that runs work at once and a reactor that calls back at
once, so every L{Deferred} has fired when the call returns.
"""

import hashlib
import io
import json
import os
import re
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from popd.interfaces import (
    IMaildrop,
    IMaildropProvider,
    MaildropError,
    MaildropInUse,
    MaildropUnavailable,
    MessageInfo,
    NoSuchFolder,
    NoSuchUser,
)
from popd.maildrops import maildir, snapshot_cache
from popd.maildrops.maildir import (
    CHUNK_SIZE,
    DOVECOT_UIDLIST_FILE,
    INDEX_FILE,
    RETRIEVED_FILE,
    SIZE_CACHE_FILE,
    UID_MAP_FILE,
    MaildirProvider,
    parse_dovecot_uidlist,
    uid_for,
)
from popd.maildrops.snapshot_cache import SETTLE_SECONDS, file_stamp
from popd.stream import file_wire_size
from popd.testing.immediate import ImmediateReactor, ImmediateThreadPool
from popd.testing.immediate import fired_result as result

REPO = Path(__file__).resolve().parents[1]


def crlf_reference(data: bytes) -> int:
    return len(re.sub(rb"(?<!\r)\n", b"\r\n", data))


def make_provider(root: Path, **kwargs) -> MaildirProvider:
    return MaildirProvider(
        str(root / "%u" / "Maildir"),
        reactor=ImmediateReactor(),
        threadpool=ImmediateThreadPool(),
        **kwargs,
    )


@pytest.fixture
def provider(tmp_path: Path) -> MaildirProvider:
    return make_provider(tmp_path)


@pytest.fixture
def box(tmp_path: Path, provider: MaildirProvider) -> Path:
    """
    Bob's (empty, created) Maildir.
    """
    result(provider.open("bob")).release()
    return tmp_path / "bob" / "Maildir"


def put(box: Path, name: str, data: bytes, sub: str = "cur") -> Path:
    """
    Place a message the way another delivery agent would.
    """
    path = box / sub / name
    path.write_bytes(data)
    return path


def count_message_opens(monkeypatch: pytest.MonkeyPatch, box: Path) -> list:
    """
    Record every C{os.open} of a file in C{new/} or C{cur/}.
    """
    opened = []
    real_open = os.open
    message_dirs = (str(box / "new"), str(box / "cur"))

    def counting_open(path, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) in message_dirs:
            opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    return opened


def read_all(drop, index: int) -> bytes:
    with result(drop.read(index)) as message:
        return message.read()


# Interfaces


def test_provides_interfaces(provider: MaildirProvider) -> None:
    verifyObject(IMaildropProvider, provider)
    drop = result(provider.open("bob"))
    verifyObject(IMaildrop, drop)
    drop.release()


# Delivery


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"Subject: hi\n\nbody\n",
        b"Subject: hi\r\n\r\n.\r\n..dots\r\n",
        bytes(range(256)) * 3,
        b"\r\n" * CHUNK_SIZE + b"tail\r",
    ],
)
def test_delivery_round_trip(provider: MaildirProvider, message: bytes) -> None:
    uid = result(provider.deliver("bob", message))
    drop = result(provider.open("bob"))
    assert drop.messages == (MessageInfo(uid, crlf_reference(message)),)
    assert read_all(drop, 0) == message
    drop.release()


def test_delivery_from_file(provider: MaildirProvider) -> None:
    message = b"line\n" * (3 * CHUNK_SIZE // 5 + 7)
    result(provider.deliver("bob", io.BytesIO(message)))
    drop = result(provider.open("bob"))
    assert drop.messages[0].size == crlf_reference(message)
    assert read_all(drop, 0) == message
    drop.release()


def test_delivery_lands_in_new_with_sizes(
    provider: MaildirProvider, tmp_path: Path
) -> None:
    uid = result(provider.deliver("bob", b"a\nb\r\n"))
    box = tmp_path / "bob" / "Maildir"
    [name] = os.listdir(box / "new")
    assert name.endswith(",S=5,W=6")
    assert uid == uid_for(name)
    assert os.listdir(box / "tmp") == []
    assert re.fullmatch(r"[0-9]+\.M[0-9]{6}P[0-9]+Q[0-9]+R[0-9a-f]+\..*", name)


def test_delivery_durable_before_it_fires(
    provider: MaildirProvider, tmp_path: Path, monkeypatch
) -> None:
    """
    The file is synced before it is linked into C{new/}, and C{new/} after.
    """
    box = tmp_path / "bob" / "Maildir"
    result(provider.deliver("bob", b"first\n"))
    events = []
    real_fsync, real_link = os.fsync, os.link

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def recording_link(source, target):
        events.append(("link", os.path.dirname(target)))
        real_link(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "link", recording_link)
    result(provider.deliver("bob", b"second\n"))
    [synced_file, linked, synced_dir] = events
    assert synced_file[0] == "fsync"
    assert os.path.dirname(synced_file[1]) == str(box / "tmp")
    assert linked == ("link", str(box / "new"))
    assert synced_dir == ("fsync", str(box / "new"))


def test_commit_syncs_directories(
    provider: MaildirProvider, tmp_path: Path, monkeypatch
) -> None:
    result(provider.deliver("bob", b"m\n"))
    drop = result(provider.open("bob"))
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    result(drop.commit([0]))
    box = tmp_path / "bob" / "Maildir"
    assert sorted(synced) == [str(box / "cur"), str(box / "new")]


def test_delivery_names_unique(provider: MaildirProvider) -> None:
    uids = {result(provider.deliver("bob", b"x\n")) for _ in range(50)}
    assert len(uids) == 50


def test_delivery_creates_private_maildir(
    provider: MaildirProvider, tmp_path: Path
) -> None:
    result(provider.deliver("bob", b"x"))
    box = tmp_path / "bob" / "Maildir"
    for sub in (box, box / "new", box / "cur", box / "tmp"):
        assert stat.S_IMODE(sub.stat().st_mode) & 0o077 == 0


def test_delivery_ignores_session_lock(provider: MaildirProvider) -> None:
    drop = result(provider.open("bob"))
    result(provider.deliver("bob", b"new mail\n"))
    assert drop.messages == ()
    drop.release()


def test_failed_delivery_leaves_nothing(
    provider: MaildirProvider, tmp_path: Path
) -> None:
    class Broken(io.BytesIO):
        def read(self, size=-1):
            raise OSError(5, "Input/output error")

    with pytest.raises(MaildropUnavailable, match="Input/output error"):
        result(provider.deliver("bob", Broken()))
    box = tmp_path / "bob" / "Maildir"
    assert os.listdir(box / "tmp") == os.listdir(box / "new") == []


# Sizes


@given(
    parts=st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"."])),
    chunk_size=st.integers(min_value=1, max_value=7),
)
def test_crlf_size_any_chunking(parts: list, chunk_size: int) -> None:
    data = b"".join(parts)
    assert file_wire_size(io.BytesIO(data), chunk_size) == crlf_reference(data)


@settings(max_examples=30, deadline=None)
@given(
    body=st.lists(st.sampled_from([b"x" * 1000, b"\r", b"\n", b"\r\n"]), max_size=200),
    pad=st.integers(min_value=0, max_value=3),
)
def test_stored_sizes_follow_crlf_rule(body: list, pad: int) -> None:
    """
    Messages without C{,W=} are measured by reading them, also across the
    64 KiB chunk boundary.
    """
    data = b"y" * (CHUNK_SIZE - pad) + b"".join(body)
    with tempfile.TemporaryDirectory() as root:
        provider = make_provider(Path(root))
        result(provider.open("bob")).release()
        put(Path(root) / "bob" / "Maildir", "1.msg:2,", data)
        drop = result(provider.open("bob"))
        assert drop.messages[0].size == crlf_reference(data)
        drop.release()


@pytest.mark.parametrize("boundary", [b"\r\n", b"\r\r\n", b"\n\n", b"\r\r"])
def test_chunk_boundary(box: Path, provider: MaildirProvider, boundary: bytes) -> None:
    data = b"z" * (CHUNK_SIZE - 1) + boundary + b"end\n"
    put(box, "1.msg", data)
    drop = result(provider.open("bob"))
    assert drop.messages[0].size == crlf_reference(data)
    drop.release()


def test_w_field_honoured(box: Path, provider: MaildirProvider, monkeypatch) -> None:
    put(box, "1.msg,S=3,W=999:2,S", b"ab\n")
    opened = count_message_opens(monkeypatch, box)
    drop = result(provider.open("bob"))
    assert drop.messages[0].size == 999
    assert opened == []
    drop.release()


def test_s_field_not_taken_for_crlf_size(box: Path, provider: MaildirProvider) -> None:
    put(box, "1.msg,S=3:2,S", b"ab\n")
    drop = result(provider.open("bob"))
    assert drop.messages[0].size == 4
    drop.release()


def test_size_cache_written_and_reused(
    box: Path, provider: MaildirProvider, monkeypatch
) -> None:
    put(box, "1.a", b"one\n")
    put(box, "2.b:2,S", b"two\r\n\n")
    put(box, "3.c", b"three", sub="new")
    first = result(provider.open("bob"))
    first.release()
    assert (box / SIZE_CACHE_FILE).exists()
    opened = count_message_opens(monkeypatch, box)
    second = result(provider.open("bob"))
    assert opened == []
    assert second.messages == first.messages
    assert [m.size for m in second.messages] == [5, 7, 5]
    second.release()


def test_size_cache_not_rewritten_without_news(
    box: Path, provider: MaildirProvider
) -> None:
    put(box, "1.a", b"one\n")
    result(provider.open("bob")).release()
    cache = box / SIZE_CACHE_FILE
    os.utime(cache, (0, 0))
    result(provider.open("bob")).release()
    assert cache.stat().st_mtime == 0


def test_size_cache_drops_vanished(box: Path, provider: MaildirProvider) -> None:
    put(box, "1.gone", b"one\n")
    put(box, "2.kept", b"two\n")
    result(provider.open("bob")).release()
    (box / "cur" / "1.gone").unlink()
    put(box, "3.new", b"three\n")
    result(provider.open("bob")).release()
    cache = (box / SIZE_CACHE_FILE).read_bytes()
    assert b"2.kept 5\n" in cache
    assert b"3.new 7\n" in cache
    assert b"1.gone" not in cache


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00\xff garbage",
        b"popd-sizes 1\n1.a notanumber\n",
        b"popd-sizes 1\n1.a\n",
        b"popd-sizes 1\n1.a -3\n",
        b"popd-sizes 2\n1.a 100\n",
    ],
)
def test_corrupt_size_cache_ignored(
    box: Path, provider: MaildirProvider, garbage: bytes
) -> None:
    put(box, "1.a", b"one\n")
    (box / SIZE_CACHE_FILE).write_bytes(garbage)
    drop = result(provider.open("bob"))
    assert drop.messages[0].size == 5
    drop.release()
    assert (box / SIZE_CACHE_FILE).read_bytes() == b"popd-sizes 1\n1.a 5\n"


def test_cut_off_cache_line_not_trusted(
    box: Path, provider: MaildirProvider, monkeypatch
) -> None:
    """
    A crash may cut the last line short ("1234" to "12"); it is not used,
    while the complete lines before it still are.
    """
    put(box, "1.a", b"one\n")
    put(box, "2.b", b"two\n")
    (box / SIZE_CACHE_FILE).write_bytes(b"popd-sizes 1\n1.a 5\n2.b 1")
    opened = count_message_opens(monkeypatch, box)
    drop = result(provider.open("bob"))
    assert [m.size for m in drop.messages] == [5, 5]
    assert opened == [str(box / "cur" / "2.b")]
    drop.release()


# UIDs and order


def test_uid_stable_after_move_to_cur(
    provider: MaildirProvider, tmp_path: Path
) -> None:
    uid = result(provider.deliver("bob", b"hello\n"))
    box = tmp_path / "bob" / "Maildir"
    [name] = os.listdir(box / "new")
    first = result(provider.open("bob"))
    first.release()
    os.rename(box / "new" / name, box / "cur" / (name + ":2,S"))
    second = result(provider.open("bob"))
    assert second.messages == first.messages == (MessageInfo(uid, 7),)
    assert read_all(second, 0) == b"hello\n"
    second.release()


@pytest.mark.parametrize(
    "name",
    ["x" * 71, "1.with space", "1.jürgen", "1.tab\there"],
)
def test_unusable_base_names_get_hashed_uid(
    box: Path, provider: MaildirProvider, name: str
) -> None:
    put(box, name + ":2,S", b"m\n")
    drop = result(provider.open("bob"))
    uid = drop.messages[0].uid
    assert uid == hashlib.sha1(name.encode()).hexdigest()
    assert len(uid) == 40
    drop.release()


def test_seventy_character_base_name_kept(box: Path, provider: MaildirProvider) -> None:
    name = "1." + "x" * 68
    put(box, name + ":2,", b"m\n")
    drop = result(provider.open("bob"))
    assert drop.messages[0].uid == name
    drop.release()


def test_snapshot_in_delivery_order(box: Path, provider: MaildirProvider) -> None:
    put(box, "10.b:2,S", b"")
    put(box, "9.z", b"", sub="new")
    put(box, "10.a", b"")
    put(box, "nodigits", b"")
    put(box, "100.a", b"", sub="new")
    drop = result(provider.open("bob"))
    assert [m.uid for m in drop.messages] == [
        "nodigits",
        "9.z",
        "10.a",
        "10.b",
        "100.a",
    ]
    drop.release()


def test_skips_dotfiles_links_and_directories(
    box: Path, provider: MaildirProvider, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"not yours\n")
    put(box, ".hidden", b"x")
    (box / "cur" / "1.link").symlink_to(secret)
    (box / "new" / "2.dir").mkdir()
    put(box, "3.real", b"x")
    drop = result(provider.open("bob"))
    assert [m.uid for m in drop.messages] == ["3.real"]
    drop.release()


def test_same_base_name_twice_listed_once(box: Path, provider: MaildirProvider) -> None:
    put(box, "1.dup", b"x", sub="new")
    put(box, "1.dup:2,S", b"x")
    drop = result(provider.open("bob"))
    assert [m.uid for m in drop.messages] == ["1.dup"]
    drop.release()


# Sessions


def test_snapshot_unchanged_by_delivery(provider: MaildirProvider) -> None:
    result(provider.deliver("bob", b"first\n"))
    drop = result(provider.open("bob"))
    before = drop.messages
    result(provider.deliver("bob", b"second\n"))
    assert drop.messages == before
    assert len(before) == 1
    result(drop.commit([]))
    drop = result(provider.open("bob"))
    assert len(drop.messages) == 2
    drop.release()


def test_commit_deletes_only_given(provider: MaildirProvider) -> None:
    uids = [result(provider.deliver("bob", b"m%d\n" % i)) for i in range(4)]
    drop = result(provider.open("bob"))
    result(drop.commit([1, 3, 1]))
    drop = result(provider.open("bob"))
    assert [m.uid for m in drop.messages] == [uids[0], uids[2]]
    drop.release()


def test_release_deletes_nothing(provider: MaildirProvider) -> None:
    result(provider.deliver("bob", b"m\n"))
    drop = result(provider.open("bob"))
    result(drop.release())
    result(drop.release())
    result(drop.commit([0]))
    drop = result(provider.open("bob"))
    assert len(drop.messages) == 1
    drop.release()


def test_second_commit_harmless(provider: MaildirProvider) -> None:
    result(provider.deliver("bob", b"m\n"))
    drop = result(provider.open("bob"))
    result(drop.commit([]))
    result(provider.deliver("bob", b"later\n"))
    assert result(drop.commit([0])) is None
    assert result(drop.release()) is None
    drop = result(provider.open("bob"))
    assert len(drop.messages) == 2
    drop.release()


def test_commit_tolerates_vanished_and_moved(
    provider: MaildirProvider, tmp_path: Path
) -> None:
    for i in range(3):
        result(provider.deliver("bob", b"m%d\n" % i))
    drop = result(provider.open("bob"))
    box = tmp_path / "bob" / "Maildir"
    names = sorted(os.listdir(box / "new"))
    (box / "new" / names[0]).unlink()
    os.rename(box / "new" / names[1], box / "cur" / (names[1] + ":2,S"))
    result(drop.commit([0, 1]))
    assert os.listdir(box / "cur") == []
    assert os.listdir(box / "new") == [names[2]]


def test_read_follows_moved_message(provider: MaildirProvider, tmp_path: Path) -> None:
    result(provider.deliver("bob", b"moving\n"))
    drop = result(provider.open("bob"))
    box = tmp_path / "bob" / "Maildir"
    [name] = os.listdir(box / "new")
    os.rename(box / "new" / name, box / "cur" / (name + ":2,S"))
    assert read_all(drop, 0) == b"moving\n"
    os.rename(box / "cur" / (name + ":2,S"), box / "cur" / (name + ":2,RS"))
    assert read_all(drop, 0) == b"moving\n"
    drop.release()


def test_read_vanished_message(provider: MaildirProvider, tmp_path: Path) -> None:
    uid = result(provider.deliver("bob", b"gone\n"))
    drop = result(provider.open("bob"))
    box = tmp_path / "bob" / "Maildir"
    for name in os.listdir(box / "new"):
        (box / "new" / name).unlink()
    with pytest.raises(MaildropError, match=f"{re.escape(uid)}.*removed"):
        result(drop.read(0))
    drop.release()


def test_read_refuses_planted_symlink(
    provider: MaildirProvider, tmp_path: Path
) -> None:
    result(provider.deliver("bob", b"mine\n"))
    drop = result(provider.open("bob"))
    box = tmp_path / "bob" / "Maildir"
    [name] = os.listdir(box / "new")
    (tmp_path / "secret").write_bytes(b"not yours\n")
    (box / "new" / name).unlink()
    (box / "new" / name).symlink_to(tmp_path / "secret")
    with pytest.raises(MaildropError):
        result(drop.read(0))
    drop.release()


def test_read_bad_index(provider: MaildirProvider) -> None:
    result(provider.deliver("bob", b"m\n"))
    drop = result(provider.open("bob"))
    with pytest.raises(IndexError):
        drop.read(1)
    with pytest.raises(IndexError):
        drop.read(-1)
    with pytest.raises(IndexError):
        drop.commit([5])
    drop.release()


def test_read_after_release_fails(provider: MaildirProvider) -> None:
    result(provider.deliver("bob", b"m\n"))
    drop = result(provider.open("bob"))
    drop.release()
    with pytest.raises(MaildropError, match="closed"):
        result(drop.read(0))


# Locking


@pytest.mark.parametrize(
    "close", [lambda drop: drop.release(), lambda drop: drop.commit([])]
)
def test_second_open_in_use_until_closed(
    provider: MaildirProvider, close: Callable
) -> None:
    drop = result(provider.open("bob"))
    with pytest.raises(MaildropInUse):
        result(provider.open("bob"))
    result(close(drop))
    result(provider.open("bob")).release()


def test_users_and_folders_lock_separately(provider: MaildirProvider) -> None:
    result(provider.deliver("bob", b"m\n", folder="Sent"))
    bob = result(provider.open("bob"))
    alice = result(provider.open("alice"))
    sent = result(provider.open("bob", folder="Sent"))
    for drop in (bob, alice, sent):
        drop.release()


def test_lock_released_when_scan_fails(
    provider: MaildirProvider, box: Path, monkeypatch
) -> None:
    def failing_snapshot(root, *args):
        raise OSError(5, "Input/output error", root)

    monkeypatch.setattr(maildir, "_snapshot", failing_snapshot)
    with pytest.raises(MaildropUnavailable, match="Input/output error"):
        result(provider.open("bob"))
    monkeypatch.undo()
    result(provider.open("bob")).release()


def test_lock_released_when_commit_fails(
    provider: MaildirProvider, monkeypatch
) -> None:
    result(provider.deliver("bob", b"m\n"))
    drop = result(provider.open("bob"))

    def failing_remove(root, message):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(maildir, "_remove", failing_remove)
    with pytest.raises(MaildropUnavailable, match="Permission denied"):
        result(drop.commit([0]))
    result(provider.open("bob")).release()


HOLDER = """
import sys
from twisted.internet import reactor
from popd.maildrops.maildir import MaildirProvider

held = []

def locked(drop):
    held.append(drop)  # an unreferenced maildrop's lock goes with it
    print("locked", len(drop.messages), flush=True)

def failed(failure):
    print("failed", failure.getErrorMessage(), flush=True)
    reactor.stop()

provider = MaildirProvider(sys.argv[1])
reactor.callWhenRunning(
    lambda: provider.open("bob").addCallbacks(locked, failed)
)
reactor.run()
"""


def test_open_in_use_by_another_process(
    provider: MaildirProvider, tmp_path: Path
) -> None:
    """
    A popd process (with the real reactor and thread pool) holds bob's
    maildrop; this one is refused until that process is killed.
    """
    result(provider.deliver("bob", b"m\n"))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "%u" / "Maildir")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
    )
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(holder.stdout, selectors.EVENT_READ)
            assert selector.select(30), "the holder did not answer"
        assert holder.stdout.readline() == b"locked 1\n"
        with pytest.raises(MaildropInUse):
            result(provider.open("bob"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    result(provider.open("bob")).release()


# Names, folders and errors


@pytest.mark.parametrize("user", ["../x", "a/b", "\x00", ".", "..", "a\nb", ""])
def test_unsafe_user_names(
    provider: MaildirProvider, tmp_path: Path, user: str
) -> None:
    with pytest.raises(NoSuchUser):
        result(provider.open(user))
    with pytest.raises(NoSuchUser):
        result(provider.deliver(user, b"m\n"))
    with pytest.raises(NoSuchUser):
        result(provider.folders(user))
    assert os.listdir(tmp_path) == []


def test_missing_maildir_without_create(tmp_path: Path) -> None:
    provider = make_provider(tmp_path, create=False)
    with pytest.raises(NoSuchUser):
        result(provider.open("bob"))
    with pytest.raises(NoSuchUser):
        result(provider.deliver("bob", b"m\n"))
    assert os.listdir(tmp_path) == []


def test_missing_folder_without_create(tmp_path: Path, box: Path) -> None:
    provider = make_provider(tmp_path, create=False)
    result(provider.open("bob")).release()
    with pytest.raises(MaildropError, match="no folder"):
        result(provider.open("bob", folder="Sent"))


def test_folders(provider: MaildirProvider, box: Path) -> None:
    assert result(provider.folders("bob")) == []
    result(provider.deliver("bob", b"sent\n", folder="Sent"))
    result(provider.deliver("bob", b"list\n", folder="Lists.python"))
    (box / ".NotAMaildir").mkdir()
    (box / ".file").write_bytes(b"")
    (box / "..bad").mkdir()
    assert result(provider.folders("bob")) == ["Lists.python", "Sent"]
    assert (box / ".Sent" / "maildirfolder").exists()


def test_folder_delivery_creates_the_maildir_too(
    provider: MaildirProvider, tmp_path: Path
) -> None:
    result(provider.deliver("bob", b"m\n", folder="Sent"))
    box = tmp_path / "bob" / "Maildir"
    assert sorted(os.listdir(box)) == [".Sent", "cur", "new", "tmp"]
    assert result(provider.folders("bob")) == ["Sent"]


def test_folders_of_missing_user(provider: MaildirProvider, tmp_path: Path) -> None:
    assert result(provider.folders("nobody")) == []
    assert os.listdir(tmp_path) == []


def test_folder_sessions_are_separate(provider: MaildirProvider) -> None:
    inbox_uid = result(provider.deliver("bob", b"inbox\n"))
    sent_uid = result(provider.deliver("bob", b"sent\n", folder="Sent"))
    sent = result(provider.open("bob", folder="Sent"))
    assert [m.uid for m in sent.messages] == [sent_uid]
    assert read_all(sent, 0) == b"sent\n"
    sent.release()
    for name in ("INBOX", "inbox", None):
        drop = result(provider.open("bob", folder=name))
        assert [m.uid for m in drop.messages] == [inbox_uid]
        drop.release()


@pytest.mark.parametrize("folder", ["../x", "a/b", ".", "..", ".Sent", "a..b", "\x00"])
def test_unsafe_folder_names(
    provider: MaildirProvider, tmp_path: Path, folder: str
) -> None:
    with pytest.raises(MaildropError):
        result(provider.open("bob", folder=folder))
    with pytest.raises(MaildropError):
        result(provider.deliver("bob", b"m\n", folder=folder))
    assert os.listdir(tmp_path) == []


def test_os_errors_become_unavailable(provider: MaildirProvider, box: Path) -> None:
    """
    A broken Maildir (here C{new} is a file) is a temporary failure, not a
    raw C{OSError}, and the lock is not left behind.
    """
    (box / "new").rmdir()
    (box / "new").write_bytes(b"")
    with pytest.raises(MaildropUnavailable):
        result(provider.open("bob"))
    with pytest.raises(MaildropUnavailable):
        result(provider.deliver("bob", b"m\n"))
    (box / "new").unlink()
    result(provider.open("bob")).release()


# Folders are made by delivery, never by open


def test_open_unknown_folder_creates_nothing(
    provider: MaildirProvider, box: Path
) -> None:
    with pytest.raises(NoSuchFolder):
        result(provider.open("bob", folder="Sent"))
    assert not (box / ".Sent").exists()
    assert result(provider.folders("bob")) == []


def test_open_folder_of_missing_user(provider: MaildirProvider, tmp_path: Path) -> None:
    with pytest.raises(NoSuchFolder):
        result(provider.open("nobody", folder="Sent"))
    assert os.listdir(tmp_path) == []


def test_deliver_to_missing_folder_without_create(tmp_path: Path, box: Path) -> None:
    provider = make_provider(tmp_path, create=False)
    with pytest.raises(NoSuchFolder):
        result(provider.deliver("bob", b"m\n", folder="Sent"))
    assert not (box / ".Sent").exists()


def test_unsafe_folder_name_is_no_such_folder(provider: MaildirProvider) -> None:
    with pytest.raises(NoSuchFolder):
        result(provider.open("bob", folder="../x"))


# Retrieval times (popd-retrieved)


def test_retrieved_recorded_in_file(
    provider: MaildirProvider, box: Path, monkeypatch
) -> None:
    first = result(provider.deliver("bob", b"one\n"))
    second = result(provider.deliver("bob", b"two\n"))
    monkeypatch.setattr(maildir.time, "time", lambda: 1700000000.75)
    drop = result(provider.open("bob"))
    assert [m.retrieved_at for m in drop.messages] == [None, None]
    result(drop.commit([], [1]))
    assert (box / RETRIEVED_FILE).read_bytes() == (
        b"popd-retrieved 1\n%s 1700000000\n" % second.encode()
    )
    monkeypatch.setattr(maildir.time, "time", lambda: 1800000000.0)
    drop = result(provider.open("bob"))
    assert [(m.uid, m.retrieved_at) for m in drop.messages] == [
        (first, None),
        (second, 1700000000.0),
    ]
    # A later retrieval keeps the first time; deleting drops the line.
    result(drop.commit([1], [0, 1]))
    assert (box / RETRIEVED_FILE).read_bytes() == (
        b"popd-retrieved 1\n%s 1800000000\n" % first.encode()
    )
    assert not list(box.glob(RETRIEVED_FILE + ".*")), "no temporary file is left"


def test_retrieved_follows_moves_and_drops_vanished(
    provider: MaildirProvider, box: Path
) -> None:
    result(provider.deliver("bob", b"one\n"))
    kept = result(provider.deliver("bob", b"two\n"))
    drop = result(provider.open("bob"))
    result(drop.commit([], [0, 1]))
    first, second = sorted(os.listdir(box / "new"))
    (box / "new" / first).unlink()
    os.rename(box / "new" / second, box / "cur" / (second + ":2,S"))
    third = result(provider.deliver("bob", b"three\n"))
    drop = result(provider.open("bob"))
    assert drop.messages[0].uid == kept and drop.messages[0].retrieved_at
    result(drop.commit([]))
    lines = (box / RETRIEVED_FILE).read_bytes().splitlines()
    assert len(lines) == 3, "a commit that records nothing new rewrites nothing"
    drop = result(provider.open("bob"))
    assert drop.messages[1].uid == third
    result(drop.commit([], [1]))
    lines = (box / RETRIEVED_FILE).read_bytes().splitlines()
    assert [line.split()[0] for line in lines[1:]] == [
        second.encode(),
        third.encode(),
    ]


def test_release_records_nothing(provider: MaildirProvider, box: Path) -> None:
    result(provider.deliver("bob", b"one\n"))
    result(provider.open("bob")).release()
    result(result(provider.open("bob")).commit([]))
    assert not (box / RETRIEVED_FILE).exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"popd-retrieved 9\nx 1\n", b"garbage", b"popd-retrieved 1\n1.a 12"],
)
def test_odd_retrieved_file_ignored(box: Path, provider: MaildirProvider, content):
    put(box, "1.a", b"m\n")
    (box / RETRIEVED_FILE).write_bytes(content)
    drop = result(provider.open("bob"))
    assert drop.messages[0].retrieved_at is None
    result(drop.commit([], [0]))
    assert (box / RETRIEVED_FILE).read_bytes().startswith(b"popd-retrieved 1\n1.a ")


def test_retrieved_index_checked(provider: MaildirProvider) -> None:
    drop = result(provider.open("bob"))
    with pytest.raises(IndexError):
        drop.commit([], [0])
    drop.release()


# Given UIDs (popd-uids)


def test_given_uid_kept_in_map(provider: MaildirProvider, box: Path) -> None:
    assert result(provider.deliver("bob", b"m\n", uid="imported-7")) == "imported-7"
    [name] = os.listdir(box / "new")
    assert (box / UID_MAP_FILE).read_bytes() == b"popd-uids 1\n%s imported-7\n" % (
        name.encode()
    )
    drop = result(provider.open("bob"))
    assert drop.messages == (MessageInfo("imported-7", 3),)
    drop.release()
    os.rename(box / "new" / name, box / "cur" / (name + ":2,S"))
    assert [m.uid for m in result(provider.open("bob")).messages] == ["imported-7"]


def test_given_uid_recorded_before_the_message_shows(
    provider: MaildirProvider, box: Path, monkeypatch
) -> None:
    seen = []
    real_link = maildir._link_or_rename

    def link(source, target):
        seen.append((box / UID_MAP_FILE).read_bytes())
        real_link(source, target)

    monkeypatch.setattr(maildir, "_link_or_rename", link)
    result(provider.deliver("bob", b"m\n", uid="early"))
    assert seen and seen[0].endswith(b" early\n")


def test_given_uid_refused_when_taken(provider: MaildirProvider, box: Path) -> None:
    natural = result(provider.deliver("bob", b"m\n"))
    result(provider.deliver("bob", b"m\n", uid="taken"))
    put(box, "1.hashed name", b"x\n")
    hashed = uid_for("1.hashed name")
    for uid in (natural, "taken", hashed):
        with pytest.raises(ValueError):
            result(provider.deliver("bob", b"dup\n", uid=uid))
    assert len(os.listdir(box / "new")) == 2
    assert os.listdir(box / "tmp") == []


@pytest.mark.parametrize("uid", ["", "a b", "x" * 71, "é", "\x7f", b"bytes", 7])
def test_invalid_given_uid(provider: MaildirProvider, tmp_path: Path, uid) -> None:
    with pytest.raises(ValueError):
        result(provider.deliver("bob", b"m\n", uid=uid))
    assert os.listdir(tmp_path) == []


def test_uid_map_pruned_on_commit(provider: MaildirProvider, box: Path) -> None:
    result(provider.deliver("bob", b"1\n", uid="one"))
    result(provider.deliver("bob", b"2\n", uid="two"))
    drop = result(provider.open("bob"))
    result(drop.commit([0]))
    lines = (box / UID_MAP_FILE).read_bytes().splitlines()
    assert lines[0] == b"popd-uids 1" and [line.split()[1] for line in lines[1:]] == [
        b"two"
    ]
    assert [m.uid for m in result(provider.open("bob")).messages] == ["two"]


def test_unknown_uid_map_format_refuses_open(
    provider: MaildirProvider, box: Path
) -> None:
    (box / UID_MAP_FILE).write_bytes(b"popd-uids 2\nwhatever\n")
    with pytest.raises(MaildropError, match="popd-uids"):
        result(provider.open("bob"))
    # The lock was not left behind.
    (box / UID_MAP_FILE).unlink()
    result(provider.open("bob")).release()


def test_given_uid_wins_over_a_base_name_clash(
    provider: MaildirProvider, box: Path
) -> None:
    """
    Should a message's own UID equal one given to another (never by popd's
    names, but another program may name a file so), each UID still appears
    once.
    """
    result(provider.deliver("bob", b"given\n", uid="9.clash"))
    put(box, "9.clash", b"named\n")
    uids = [m.uid for m in result(provider.open("bob")).messages]
    assert len(set(uids)) == 2 and "9.clash" in uids


# Dovecot's dovecot-uidlist

UIDLIST = (
    b"3 V1275660208 N25022 G3085f01b7f11094c501100008c4a11c1\n"
    b"25017 :1275660000.M1P1.host,S=1234\n"
    b"25018 W17 GAbC :1275660001.M2P2.host:2,S\n"
    b"25019 P4242-migrated S99 :1275660002.M3P3.host,S=5,W=9:2,RS\n"
    b"garbage line\n"
    b"0 :1275660003.M4P4.host\n"
    b"25020 :../escape\n"
)


def test_parse_dovecot_uidlist() -> None:
    records = parse_dovecot_uidlist(UIDLIST)
    assert sorted(records) == [
        "1275660000.M1P1.host,S=1234",
        "1275660001.M2P2.host",
        "1275660002.M3P3.host,S=5,W=9",
    ]
    assert records["1275660001.M2P2.host"] == {
        "u": "25018",
        "v": "1275660208",
        "W": "17",
        "G": "AbC",
        "f": "1275660001.M2P2.host",
    }
    assert records["1275660002.M3P3.host,S=5,W=9"]["P"] == "4242-migrated"


def test_parse_dovecot_uidlist_version_1_and_unknown() -> None:
    assert parse_dovecot_uidlist(b"1 1000 5\n3 1.a:2,S\n4 2.b\n") == {
        "1.a": {"u": "3", "v": "1000", "f": "1.a"},
        "2.b": {"u": "4", "v": "1000", "f": "2.b"},
    }
    assert parse_dovecot_uidlist(b"2 V1 N2\n1 :1.a\n") == {}
    assert parse_dovecot_uidlist(b"3 N2\n1 :1.a\n") == {}
    assert parse_dovecot_uidlist(b"") == {}


def dovecot_box(box: Path) -> None:
    (box / DOVECOT_UIDLIST_FILE).write_bytes(UIDLIST)
    put(box, "1275660000.M1P1.host,S=1234", b"first\n", sub="new")
    put(box, "1275660001.M2P2.host:2,S", b"second\nline\n")
    put(box, "1275660002.M3P3.host,S=5,W=9:2,RS", b"third\n")
    put(box, "1275660003.M9P9.host", b"popd's own\n", sub="new")


def test_dovecot_uidls_kept(provider: MaildirProvider, box: Path) -> None:
    dovecot_box(box)
    drop = result(provider.open("bob"))
    assert drop.messages == (
        MessageInfo(f"{25017:08X}{1275660208:08X}", 7),
        # The W field gives the size (17, though the file has 14 octets in
        # CRLF form: the uidlist is trusted, as the ,W= of a name is).
        MessageInfo(f"{25018:08X}{1275660208:08X}", 17),
        MessageInfo("4242-migrated", 9),
        MessageInfo("1275660003.M9P9.host", 12),
    )
    drop.release()


def test_dovecot_uidls_off(tmp_path: Path, box: Path) -> None:
    dovecot_box(box)
    provider = make_provider(tmp_path, dovecot_uidl=False)
    drop = result(provider.open("bob"))
    assert [m.uid for m in drop.messages] == [
        "1275660000.M1P1.host,S=1234",
        "1275660001.M2P2.host",
        "1275660002.M3P3.host,S=5,W=9",
        "1275660003.M9P9.host",
    ]
    assert drop.messages[1].size == 14
    drop.release()


@pytest.mark.parametrize(
    ("uidl_format", "uidl"),
    [
        ("%08Xv%08Xu", "4C0907B0000061B9"),
        ("%v.%u", "1275660208.25017"),
        ("%v-%u", "1275660208-25017"),
        ("%u", "25017"),
        ("%08xu%%%f", "000061b9%1275660000.M1P1.host,S=1234"),
        ("%g", "1275660000.M1P1.host,S=1234"),
    ],
)
def test_dovecot_uidl_formats(
    tmp_path: Path, box: Path, uidl_format: str, uidl: str
) -> None:
    dovecot_box(box)
    provider = make_provider(tmp_path, dovecot_uidl_format=uidl_format)
    drop = result(provider.open("bob"))
    assert drop.messages[0].uid == uidl
    drop.release()


@pytest.mark.parametrize("uidl_format", ["", "%m", "%08Xu%", "%s"])
def test_unknown_dovecot_uidl_format(tmp_path: Path, uidl_format: str) -> None:
    with pytest.raises(ValueError):
        make_provider(tmp_path, dovecot_uidl_format=uidl_format)


def test_given_uid_refused_when_dovecot_has_it(
    provider: MaildirProvider, box: Path
) -> None:
    dovecot_box(box)
    with pytest.raises(ValueError):
        result(provider.deliver("bob", b"m\n", uid=f"{25017:08X}{1275660208:08X}"))
    with pytest.raises(ValueError):
        result(provider.deliver("bob", b"m\n", uid="4242-migrated"))


# The snapshot cache (popd.maildrops.snapshot_cache)


def look_from_the_future(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Make every snapshot count as taken long after the Maildir last changed,
    as if the files had settled: C{maildir.time.time} runs ahead by more
    than L{SETTLE_SECONDS}.
    """
    real_time = time.time
    monkeypatch.setattr(maildir.time, "time", lambda: real_time() + SETTLE_SECONDS + 1)


def tick() -> None:
    """
    Let the filesystem's coarse clock move on, so that the next change gets
    a modification time of its own, as it would in real time.
    """
    time.sleep(0.02)


def count_scans(monkeypatch: pytest.MonkeyPatch, box: Path) -> list[str]:
    """
    Record every listing of C{new/} or C{cur/}.
    """
    scanned = []
    real_scandir = os.scandir
    message_dirs = {str(box / "new"): "new", str(box / "cur"): "cur"}

    def counting_scandir(path="."):
        name = message_dirs.get(os.fspath(path))
        if name is not None:
            scanned.append(name)
        return real_scandir(path)

    monkeypatch.setattr(maildir.os, "scandir", counting_scandir)
    return scanned


def count_table_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """
    Record every read of one of popd's files (C{popd-uids},
    C{popd-retrieved}, C{popd-sizes}).
    """
    loaded = []
    real_load = maildir._load_table

    def recording_load(path, header):
        loaded.append(os.path.basename(path))
        return real_load(path, header)

    monkeypatch.setattr(maildir, "_load_table", recording_load)
    return loaded


def uids_and_sizes(drop) -> list[tuple[str, int]]:
    return [(m.uid, m.size) for m in drop.messages]


def test_unchanged_settled_maildir_not_scanned_again(
    box: Path, provider: MaildirProvider, monkeypatch
) -> None:
    put(box, "1.a", b"one\n")
    put(box, "2.b:2,S", b"two\r\n\n")
    delivered = result(provider.deliver("bob", b"three\n"))
    look_from_the_future(monkeypatch)
    first = result(provider.open("bob"))
    first.release()
    scans = count_scans(monkeypatch, box)
    opened = count_message_opens(monkeypatch, box)
    loaded = count_table_loads(monkeypatch)
    second = result(provider.open("bob"))
    assert scans == [] and opened == [] and loaded == []
    assert second.messages == first.messages
    assert uids_and_sizes(second) == [("1.a", 5), ("2.b", 7), (delivered, 7)]
    assert read_all(second, 1) == b"two\r\n\n"
    second.release()


def test_counting_scans_sees_a_scan(
    box: Path, provider: MaildirProvider, monkeypatch
) -> None:
    """
    The control for the tests that count no scan.
    """
    scans = count_scans(monkeypatch, box)
    result(provider.open("bob")).release()
    assert sorted(scans) == ["cur", "new"]


def test_recent_changes_scanned_again(
    box: Path, provider: MaildirProvider, monkeypatch
) -> None:
    # However slow the run, the messages put here count as just delivered.
    monkeypatch.setattr(snapshot_cache, "SETTLE_SECONDS", 3600.0)
    put(box, "1.a", b"one\n")
    first = result(provider.open("bob"))
    first.release()
    scans = count_scans(monkeypatch, box)
    second = result(provider.open("bob"))
    assert sorted(scans) == ["cur", "new"]
    assert second.messages == first.messages
    second.release()


def test_unsettled_table_read_again(
    box: Path, provider: MaildirProvider, monkeypatch
) -> None:
    """
    A settled listing is reused while a table that changed too recently
    (here C{dovecot-uidlist}, dated at the moment the snapshot is taken) is
    read again.
    """
    put(box, "1.a", b"one\n")
    look_from_the_future(monkeypatch)
    uidlist = box / DOVECOT_UIDLIST_FILE
    uidlist.write_bytes(b"3 V1 N2\n1 Pfirst :1.a\n")
    now = time.time()
    os.utime(uidlist, (now, now))
    first = result(provider.open("bob"))
    first.release()
    assert [m.uid for m in first.messages] == ["first"]
    scans = count_scans(monkeypatch, box)
    loaded = count_table_loads(monkeypatch)
    second = result(provider.open("bob"))
    assert scans == [], "the listing had settled"
    assert UID_MAP_FILE in loaded
    assert [m.uid for m in second.messages] == ["first"]
    second.release()


@pytest.mark.parametrize(
    ("table", "content"),
    [
        (DOVECOT_UIDLIST_FILE, b"3 V1 N2\n1 Pfirst :1.a\n"),
        (UID_MAP_FILE, b"popd-uids 1\n1.a first\n"),
    ],
)
def test_changed_table_read_without_a_scan(
    box: Path, provider: MaildirProvider, monkeypatch, table: str, content: bytes
) -> None:
    """
    When only a table changed (Dovecot numbered the messages, a UID was
    given), the listing is reused and the UIDs read again.
    """
    put(box, "1.a", b"one\n")
    look_from_the_future(monkeypatch)
    drop = result(provider.open("bob"))
    drop.release()
    assert uids_and_sizes(drop) == [("1.a", 5)]
    (box / table).write_bytes(content)
    scans = count_scans(monkeypatch, box)
    drop = result(provider.open("bob"))
    assert scans == []
    assert uids_and_sizes(drop) == [("first", 5)]
    drop.release()


def test_delivery_after_cached_snapshot_seen(
    box: Path, provider: MaildirProvider, monkeypatch
) -> None:
    first = result(provider.deliver("bob", b"one\n"))
    look_from_the_future(monkeypatch)
    result(provider.open("bob")).release()
    tick()
    second = result(provider.deliver("bob", b"two\n"))
    drop = result(provider.open("bob"))
    assert [m.uid for m in drop.messages] == [first, second]
    drop.release()
    tick()
    put(box, "9999999999.other", b"by another agent\n", sub="new")
    drop = result(provider.open("bob"))
    assert uids_and_sizes(drop)[2] == ("9999999999.other", 18)
    drop.release()


def test_removal_by_another_program_seen(
    box: Path, provider: MaildirProvider, monkeypatch
) -> None:
    put(box, "1.a", b"one\n")
    put(box, "2.b", b"two\n", sub="new")
    put(box, "3.c:2,S", b"three\n")
    look_from_the_future(monkeypatch)
    result(provider.open("bob")).release()
    tick()
    (box / "new" / "2.b").unlink()
    drop = result(provider.open("bob"))
    assert [m.uid for m in drop.messages] == ["1.a", "3.c"]
    drop.release()
    tick()
    (box / "cur" / "3.c:2,S").unlink()
    drop = result(provider.open("bob"))
    assert [m.uid for m in drop.messages] == ["1.a"]
    drop.release()


def test_move_to_cur_by_another_program_keeps_the_uid(
    box: Path, provider: MaildirProvider, monkeypatch
) -> None:
    uid = result(provider.deliver("bob", b"moving\n"))
    look_from_the_future(monkeypatch)
    first = result(provider.open("bob"))
    first.release()
    tick()
    [name] = os.listdir(box / "new")
    os.rename(box / "new" / name, box / "cur" / (name + ":2,S"))
    scans = count_scans(monkeypatch, box)
    drop = result(provider.open("bob"))
    assert sorted(scans) == ["cur", "new"]
    assert drop.messages == first.messages
    assert drop.messages[0].uid == uid
    assert read_all(drop, 0) == b"moving\n"
    drop.release()
    # And a flag change within cur/.
    tick()
    os.rename(box / "cur" / (name + ":2,S"), box / "cur" / (name + ":2,RS"))
    drop = result(provider.open("bob"))
    assert drop.messages == first.messages
    assert read_all(drop, 0) == b"moving\n"
    drop.release()


def test_recorded_retrievals_seen_without_a_scan(
    box: Path, provider: MaildirProvider, monkeypatch
) -> None:
    first = result(provider.deliver("bob", b"one\n"))
    second = result(provider.deliver("bob", b"two\n"))
    look_from_the_future(monkeypatch)
    drop = result(provider.open("bob"))
    assert [m.retrieved_at for m in drop.messages] == [None, None]
    result(drop.commit([], [1]))
    recorded = float(int(time.time()))
    scans = count_scans(monkeypatch, box)
    loaded = count_table_loads(monkeypatch)
    drop = result(provider.open("bob"))
    assert scans == []
    assert RETRIEVED_FILE in loaded
    assert [(m.uid, m.retrieved_at) for m in drop.messages] == [
        (first, None),
        (second, pytest.approx(recorded, abs=1)),
    ]
    drop.release()
    # Settled now: reused whole, still with the time.
    loaded.clear()
    again = result(provider.open("bob"))
    assert scans == [] and loaded == []
    assert again.messages == drop.messages
    again.release()


def test_no_cache_scans_every_time(tmp_path: Path, monkeypatch) -> None:
    provider = make_provider(tmp_path, cache_messages=0, index=False)
    result(provider.deliver("bob", b"one\n"))
    box = tmp_path / "bob" / "Maildir"
    look_from_the_future(monkeypatch)
    scans = count_scans(monkeypatch, box)
    for _ in range(3):
        result(provider.open("bob")).release()
    assert sorted(scans) == ["cur"] * 3 + ["new"] * 3


@pytest.mark.parametrize(("capacity", "scans_expected"), [(3, 2), (4, 1)])
def test_maildir_bigger_than_the_cache_not_kept(
    tmp_path: Path, monkeypatch, capacity: int, scans_expected: int
) -> None:
    """
    A snapshot weighs its messages plus one: three messages need room for
    four.
    """
    provider = make_provider(tmp_path, cache_messages=capacity, index=False)
    for i in range(3):
        result(provider.deliver("bob", b"m%d\n" % i))
    box = tmp_path / "bob" / "Maildir"
    look_from_the_future(monkeypatch)
    scans = count_scans(monkeypatch, box)
    result(provider.open("bob")).release()
    result(provider.open("bob")).release()
    assert scans.count("new") == scans_expected


def test_cache_keeps_maildirs_apart(tmp_path: Path, monkeypatch) -> None:
    provider = make_provider(tmp_path)
    bob = result(provider.deliver("bob", b"bob's\n"))
    alice = result(provider.deliver("alice", b"alice's\n"))
    sent = result(provider.deliver("bob", b"sent\n", folder="Sent"))
    look_from_the_future(monkeypatch)
    for _ in range(2):
        drops = [
            result(provider.open("bob")),
            result(provider.open("alice")),
            result(provider.open("bob", folder="Sent")),
        ]
        assert [[m.uid for m in drop.messages] for drop in drops] == [
            [bob],
            [alice],
            [sent],
        ]
        for drop in drops:
            drop.release()


def test_computed_size_not_read_again_on_rescan(
    tmp_path: Path, box: Path, provider: MaildirProvider, monkeypatch
) -> None:
    """
    Sizes a snapshot had to read are remembered in memory: a rescan after a
    delivery reads none again, even without C{popd-sizes}.
    """
    put(box, "1.a", b"one\ntwo\n")
    first = result(provider.open("bob"))
    first.release()
    (box / SIZE_CACHE_FILE).unlink()
    tick()
    later = result(provider.deliver("bob", b"later\n"))
    scans = count_scans(monkeypatch, box)
    opened = count_message_opens(monkeypatch, box)
    drop = result(provider.open("bob"))
    assert sorted(scans) == ["cur", "new"]
    assert opened == []
    assert uids_and_sizes(drop) == [("1.a", 10), (later, 7)]
    drop.release()
    # The control: without the cache in memory, the message is read.
    uncached = make_provider(tmp_path, cache_messages=0)
    drop = result(uncached.open("bob"))
    assert opened == [str(box / "cur" / "1.a")]
    assert uids_and_sizes(drop) == [("1.a", 10), (later, 7)]
    drop.release()


def test_own_deletion_seen_by_the_next_open(
    box: Path, provider: MaildirProvider, monkeypatch
) -> None:
    result(provider.deliver("bob", b"one\n"))
    kept = result(provider.deliver("bob", b"two\n"))
    put(box, "9999999999.c:2,S", b"three\n")
    look_from_the_future(monkeypatch)
    drop = result(provider.open("bob"))
    tick()
    result(drop.commit([0, 2]))
    drop = result(provider.open("bob"))
    assert [m.uid for m in drop.messages] == [kept]
    drop.release()


def pooled_provider(tmp_path: Path) -> tuple[MaildirProvider, ImmediateThreadPool]:
    pool = ImmediateThreadPool()
    provider = MaildirProvider(
        str(tmp_path / "%u" / "Maildir"),
        reactor=ImmediateReactor(),
        threadpool=pool,
    )
    return provider, pool


def test_read_runs_on_the_calling_thread(tmp_path: Path) -> None:
    provider, pool = pooled_provider(tmp_path)
    result(provider.deliver("bob", b"one\n"))
    result(provider.deliver("bob", b"two\n"))
    drop = result(provider.open("bob"))
    before = pool.calls
    assert read_all(drop, 0) == b"one\n"
    assert read_all(drop, 1) == b"two\n"
    assert pool.calls == before
    result(drop.commit([0]))
    assert pool.calls == before + 1, "a commit that deletes runs in the pool"
    assert len(result(provider.open("bob")).messages) == 1


def test_read_of_a_moved_message_looks_in_the_pool(tmp_path: Path) -> None:
    provider, pool = pooled_provider(tmp_path)
    result(provider.deliver("bob", b"moving\n"))
    drop = result(provider.open("bob"))
    box = tmp_path / "bob" / "Maildir"
    [name] = os.listdir(box / "new")
    os.rename(box / "new" / name, box / "cur" / (name + ":2,S"))
    before = pool.calls
    assert read_all(drop, 0) == b"moving\n"
    assert pool.calls == before + 1
    # The new place is remembered.
    assert read_all(drop, 0) == b"moving\n"
    assert pool.calls == before + 1
    drop.release()


def test_commits_that_write_nothing_stay_off_the_pool(tmp_path: Path) -> None:
    provider, pool = pooled_provider(tmp_path)
    result(provider.deliver("bob", b"one\n"))
    drop = result(provider.open("bob"))
    before = pool.calls
    result(drop.commit([]))
    assert pool.calls == before
    drop = result(provider.open("bob"))
    before = pool.calls
    result(drop.commit([], [0]))
    assert pool.calls == before + 1, "recording a first retrieval writes"
    drop = result(provider.open("bob"))
    before = pool.calls
    result(drop.commit([], [0]))
    assert pool.calls == before, "already recorded"
    drop = result(provider.open("bob"))
    before = pool.calls
    result(drop.release())
    assert pool.calls == before
    # Each of these released the lock.
    result(provider.open("bob")).release()


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


def test_commit_with_nothing_new_syncs_and_writes_nothing(
    provider: MaildirProvider, box: Path, monkeypatch
) -> None:
    result(provider.deliver("bob", b"one\n"))
    drop = result(provider.open("bob"))
    result(drop.commit([], [0]))
    retrieved = box / RETRIEVED_FILE
    stamp = file_stamp(str(retrieved))
    content = retrieved.read_bytes()
    tick()
    drop = result(provider.open("bob"))
    assert drop.messages[0].retrieved_at is not None
    synced = record_fsyncs(monkeypatch)
    result(drop.commit([], [0]))
    assert synced == []
    assert file_stamp(str(retrieved)) == stamp
    assert retrieved.read_bytes() == content
    result(provider.open("bob")).release()


def test_commit_recording_retrievals_syncs_no_message_directory(
    provider: MaildirProvider, box: Path, monkeypatch
) -> None:
    result(provider.deliver("bob", b"one\n"))
    drop = result(provider.open("bob"))
    synced = record_fsyncs(monkeypatch)
    result(drop.commit([], [0]))
    assert str(box / "new") not in synced
    assert str(box / "cur") not in synced
    # popd-retrieved itself is made durable, and its rename.
    tmp, directory = synced
    assert tmp.startswith(str(box / RETRIEVED_FILE) + ".") and tmp.endswith(".tmp")
    assert directory == str(box)
    assert (box / RETRIEVED_FILE).exists()


def test_many_unsized_messages_measured_in_order(
    box: Path, provider: MaildirProvider, monkeypatch
) -> None:
    # Small enough to be read at once, and larger than a read.
    monkeypatch.setattr(maildir, "CHUNK_SIZE", 64)
    bodies = []
    for i in range(50):
        body = b"Subject: %d\n\n" % i + b"line\r\n" * (i * 37 % 10) + b"x\n" * i
        bodies.append(body)
        # Names out of order in the directory listing, but not in time.
        put(box, f"{1000 + i}.M{i}P1.host", body, sub="cur" if i % 3 else "new")
    drop = result(provider.open("bob"))
    assert uids_and_sizes(drop) == [
        (f"{1000 + i}.M{i}P1.host", crlf_reference(body))
        for i, body in enumerate(bodies)
    ]
    for i in (0, 17, 49):
        assert read_all(drop, i) == bodies[i]
    drop.release()


def cached_then_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[MaildirProvider, ImmediateThreadPool]:
    """
    A provider with bob's one-message Maildir in memory, checked to open
    off the pool; then a second message delivered.
    """
    provider, pool = pooled_provider(tmp_path)
    result(provider.deliver("bob", b"one\n"))
    look_from_the_future(monkeypatch)
    result(provider.open("bob")).release()
    before = pool.calls
    drop = result(provider.open("bob"))
    assert pool.calls == before, "the snapshot in memory is good"
    assert len(drop.messages) == 1
    with pytest.raises(MaildropInUse):
        result(provider.open("bob"))
    drop.release()
    tick()
    result(provider.deliver("bob", b"two\n"))
    return provider, pool


def test_open_of_an_unchanged_maildir_stays_off_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, pool = cached_then_changed(tmp_path, monkeypatch)
    before = pool.calls
    drop = result(provider.open("bob"))
    assert pool.calls == before + 2, "scanned in the pool, then popd-index saved"
    assert len(drop.messages) == 2
    with pytest.raises(MaildropInUse):
        result(provider.open("bob"))
    drop.release()


def test_lock_released_when_a_scan_handed_to_the_pool_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, _ = cached_then_changed(tmp_path, monkeypatch)

    def failing_snapshot(*args):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(maildir, "_snapshot", failing_snapshot)
    with pytest.raises(MaildropUnavailable):
        result(provider.open("bob"))
    monkeypatch.undo()
    result(provider.open("bob")).release()


# popd-index: the snapshot on disk, for other processes


def test_index_spares_another_process_the_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_provider(tmp_path)
    uids = [result(first.deliver("bob", b"m%d\n" % i)) for i in range(3)]
    box = tmp_path / "bob" / "Maildir"
    look_from_the_future(monkeypatch)
    drop = result(first.open("bob"))
    result(drop.commit([], [1]))
    result(first.open("bob")).release()
    assert (box / INDEX_FILE).exists()
    scans = count_scans(monkeypatch, box)
    opened = count_message_opens(monkeypatch, box)
    other = make_provider(tmp_path)
    drop = result(other.open("bob"))
    assert scans == [] and opened == []
    assert [m.uid for m in drop.messages] == uids
    assert [m.size for m in drop.messages] == [4, 4, 4]
    assert [m.retrieved_at is not None for m in drop.messages] == [False, True, False]
    assert read_all(drop, 2) == b"m2\n"
    drop.release()


def test_index_not_written_while_the_maildir_changes(tmp_path: Path) -> None:
    provider = make_provider(tmp_path)
    result(provider.deliver("bob", b"m\n"))
    result(provider.open("bob")).release()
    assert not (tmp_path / "bob" / "Maildir" / INDEX_FILE).exists()


def test_stale_index_is_scanned_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = make_provider(tmp_path)
    result(provider.deliver("bob", b"one\n"))
    look_from_the_future(monkeypatch)
    result(provider.open("bob")).release()
    box = tmp_path / "bob" / "Maildir"
    assert (box / INDEX_FILE).exists()
    tick()
    second = result(provider.deliver("bob", b"two\n"))
    scans = count_scans(monkeypatch, box)
    drop = result(make_provider(tmp_path).open("bob"))
    assert sorted(scans) == ["cur", "new"]
    assert [m.uid for m in drop.messages][1] == second
    drop.release()


@pytest.mark.parametrize(
    ("name", "row"),
    [
        ("new/../../../etc/passwd", ["x", 4, None]),
        ("new/1.a/../../../../etc/passwd", ["x", 4, None]),
        ("new/1.a\ncur/..", ["x", 4, None]),
        ("tmp/1.a", ["x", 4, None]),
        ("new/.hidden", ["x", 4, None]),
        ("/etc/passwd", ["x", 4, None]),
        ("new/1.a", ["bad uid", 4, None]),
        ("new/1.a", ["x\ny", 4, None]),
        ("new/1.a", ["x", -4, None]),
        ("new/1.a", ["x", "4", None]),
        ("new/1.a", ["x", 4, "yesterday"]),
        ("new/1.a", ["x"]),
        (7, ["x", 4, None]),
    ],
)
def test_forged_index_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: object, row: list
) -> None:
    """
    The owner of a Maildir can write its popd-index: an entry that does not
    look like popd's own makes the whole file count as missing.
    """
    provider = make_provider(tmp_path)
    uid = result(provider.deliver("bob", b"mine\n"))
    look_from_the_future(monkeypatch)
    result(provider.open("bob")).release()
    box = tmp_path / "bob" / "Maildir"
    version, directories, tables, names, rows = json.loads(
        (box / INDEX_FILE).read_bytes()
    )
    assert len(names) == len(rows) == 1
    forged = [version, directories, tables, [*names, name], [*rows, row]]
    (box / INDEX_FILE).write_text(json.dumps(forged))
    drop = result(make_provider(tmp_path).open("bob"))
    assert [(m.uid, m.size) for m in drop.messages] == [(uid, 6)]
    drop.release()


def test_index_as_written_is_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The forgery test's control: the same rewrite with popd's own entry is
    read back, and its listing used.
    """
    provider = make_provider(tmp_path)
    result(provider.deliver("bob", b"mine\n"))
    look_from_the_future(monkeypatch)
    result(provider.open("bob")).release()
    box = tmp_path / "bob" / "Maildir"
    version, directories, tables, names, rows = json.loads(
        (box / INDEX_FILE).read_bytes()
    )
    rows[0][1] = 99
    rewritten = [version, directories, tables, names, rows]
    (box / INDEX_FILE).write_text(json.dumps(rewritten))
    drop = result(make_provider(tmp_path).open("bob"))
    assert [m.size for m in drop.messages] == [99], "the index was used"
    drop.release()


@pytest.mark.parametrize(
    "content", [b"", b"garbage", b"[2, [], [], []]", b"[1, [null], [], []]", b"{}"]
)
def test_malformed_index_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    provider = make_provider(tmp_path)
    uid = result(provider.deliver("bob", b"mine\n"))
    box = tmp_path / "bob" / "Maildir"
    (box / INDEX_FILE).write_bytes(content)
    look_from_the_future(monkeypatch)
    drop = result(provider.open("bob"))
    assert [m.uid for m in drop.messages] == [uid]
    drop.release()


def test_index_with_a_uid_twice_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = make_provider(tmp_path)
    uids = [result(provider.deliver("bob", b"m%d\n" % i)) for i in range(2)]
    look_from_the_future(monkeypatch)
    result(provider.open("bob")).release()
    box = tmp_path / "bob" / "Maildir"
    version, directories, tables, names, rows = json.loads(
        (box / INDEX_FILE).read_bytes()
    )
    rows[1][0] = rows[0][0]
    forged = [version, directories, tables, names, rows]
    (box / INDEX_FILE).write_text(json.dumps(forged))
    drop = result(make_provider(tmp_path).open("bob"))
    assert [m.uid for m in drop.messages] == uids
    drop.release()
