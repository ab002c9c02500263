"""
Tests for L{popd.maildrops.sql.store} and L{popd.maildrops.sql.locks}, on
SQLite and (when reachable) PostgreSQL; the whole store contract is checked
by C{test_contract_sqlite.py} and C{test_contract_postgresql.py}.
"""

from __future__ import annotations

import gc
import io
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.register_assert_rewrite("sqlsupport")

from sqlsupport import (  # noqa: E402
    Holder,
    eventually,
    failure_of,
    query,
    wait,
)

from popd.interfaces import (  # noqa: E402
    MaildropError,
    MaildropInUse,
    MaildropUnavailable,
    NoSuchFolder,
    NoSuchUser,
)
from popd.maildrops.sql import SQLProvider, parse_dsn, queries  # noqa: E402
from popd.maildrops.sql import locks as sql_locks  # noqa: E402
from popd.stream import wire_size  # noqa: E402

pytest_plugins = ["sqlsupport"]
pytestmark = pytest.mark.usefixtures("sql_reactor_threadpool")


@pytest.fixture
def provider(sql_dsn: str) -> Iterator[SQLProvider]:
    provider = SQLProvider.from_dsn(sql_dsn)
    yield provider
    wait(provider.close())


def read_all(drop: Any, index: int) -> bytes:
    message = wait(drop.read(index))
    try:
        return message.read()
    finally:
        message.close()


def rows(sql_dsn: str, user: str = "alice") -> list[tuple]:
    return query(
        sql_dsn,
        "SELECT uid, folder, stored_size, wire_size FROM popd_messages"
        " WHERE user_name = ? ORDER BY id",
        user,
    )


# Delivery


def test_delivery_stores_sizes_and_content(provider: SQLProvider, sql_dsn: str) -> None:
    message = b"Subject: hi\n\nline\r\nbare\rcr\n"
    uid = wait(provider.deliver("alice", message))
    assert len(uid) == 32 and int(uid, 16) >= 0
    assert rows(sql_dsn) == [(uid, "", len(message), wire_size(message))]
    (content,) = query(sql_dsn, "SELECT content FROM popd_messages")[0]
    assert bytes(content) == message


def test_delivery_from_file_in_chunks(
    provider: SQLProvider, sql_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queries, "CHUNK_SIZE", 5)
    message = b"a\r\nb\nc\r" * 7 + b"\n"
    uid = wait(provider.deliver("alice", io.BytesIO(message), "Sent"))
    assert rows(sql_dsn) == [(uid, "Sent", len(message), wire_size(message))]


def test_delivery_does_not_run_on_the_calling_thread(
    provider: SQLProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Every statement runs in a pool thread, never on the reactor's.
    """
    threads = []
    execute = queries._execute

    def recording(*args: Any) -> None:
        threads.append(threading.current_thread())
        execute(*args)

    monkeypatch.setattr(queries, "_execute", recording)
    wait(provider.deliver("alice", b"x\n", "Sent"))
    drop = wait(provider.open("alice", "Sent"))
    read_all(drop, 0)
    wait(drop.commit([0]))
    wait(provider.folders("alice"))
    assert threads and threading.main_thread() not in threads


def test_delivery_is_one_transaction(
    provider: SQLProvider, sql_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A delivery that fails after creating the folder leaves no folder.
    """

    def failing(cursor: Any, target: Any, statement: str, *params: Any) -> None:
        if statement.startswith("INSERT INTO popd_messages"):
            raise target.dbapi().OperationalError("disk on fire")
        cursor.execute(target.sql(statement), params)

    monkeypatch.setattr(queries, "_execute", failing)
    error = failure_of(provider.deliver("alice", b"x\n", "Sent"))
    assert isinstance(error, MaildropUnavailable)
    assert "disk on fire" in str(error)
    monkeypatch.undo()
    assert query(sql_dsn, "SELECT * FROM popd_folders") == []
    assert wait(provider.folders("alice")) == []


def test_given_uid_kept_and_duplicates_refused(provider: SQLProvider) -> None:
    assert wait(provider.deliver("alice", b"1\n", uid="imported.1")) == "imported.1"
    error = failure_of(provider.deliver("alice", b"2\n", uid="imported.1"))
    assert isinstance(error, ValueError)
    # The same UID in another folder or for another user is fine.
    assert wait(provider.deliver("alice", b"3\n", "Sent", uid="imported.1"))
    assert wait(provider.deliver("bob", b"4\n", uid="imported.1"))
    for bad in ("", "a b", "x" * 71, "\xe9", 7):
        assert isinstance(
            failure_of(provider.deliver("alice", b"5\n", uid=bad)), ValueError
        )


def test_concurrent_duplicate_deliveries_one_wins(provider: SQLProvider) -> None:
    ds = [provider.deliver("alice", b"%d\n" % n, uid="same") for n in range(6)]
    outcomes = []
    for d in ds:
        try:
            outcomes.append(wait(d))
        except ValueError:
            outcomes.append(None)
    assert outcomes.count("same") == 1
    drop = wait(provider.open("alice"))
    assert [info.uid for info in drop.messages] == ["same"]
    wait(drop.release())


def test_uids_never_reused(provider: SQLProvider) -> None:
    seen = set()
    for _ in range(3):
        uid = wait(provider.deliver("alice", b"same\n"))
        assert uid not in seen
        seen.add(uid)
        drop = wait(provider.open("alice"))
        wait(drop.commit(range(len(drop.messages))))


# Names


@pytest.mark.parametrize(
    "user",
    [
        "alice'; DROP TABLE popd_messages; --",
        'bob"',
        "%s%s?",
        "caf\xe9@example.org",
        "x" * 200,
    ],
)
def test_odd_user_names_are_just_data(
    provider: SQLProvider, sql_dsn: str, user: str
) -> None:
    uid = wait(provider.deliver(user, b"for " + user.encode() + b"\n", "Se%s?t"))
    assert wait(provider.folders(user)) == ["Se%s?t"]
    drop = wait(provider.open(user, "Se%s?t"))
    assert [info.uid for info in drop.messages] == [uid]
    assert read_all(drop, 0) == b"for " + user.encode() + b"\n"
    wait(drop.commit([0]))
    assert wait(wait(provider.open(user, "Se%s?t")).release()) is None
    assert query(sql_dsn, "SELECT COUNT(*) FROM popd_messages") == [(0,)]
    assert wait(provider.folders("alice")) == []


@pytest.mark.parametrize("user", ["", "a/b", "..", "x\x00y", "a\nb", None])
def test_unusable_user_names(provider: SQLProvider, user: Any) -> None:
    for call in (
        lambda: provider.open(user),
        lambda: provider.deliver(user, b"x\n"),
        lambda: provider.folders(user),
    ):
        assert isinstance(failure_of(call()), NoSuchUser)


@pytest.mark.parametrize("folder", ["", ".", "a..b", "a/b", "x\x00", ".Sent"])
def test_unusable_folder_names(
    provider: SQLProvider, sql_dsn: str, folder: str
) -> None:
    assert isinstance(failure_of(provider.open("alice", folder)), NoSuchFolder)
    assert isinstance(
        failure_of(provider.deliver("alice", b"x\n", folder)), MaildropError
    )
    assert query(sql_dsn, "SELECT COUNT(*) FROM popd_messages") == [(0,)]


@pytest.mark.parametrize("name", [None, "INBOX", "inbox", "InBox"])
def test_inbox_names(provider: SQLProvider, sql_dsn: str, name: str | None) -> None:
    uid = wait(provider.deliver("alice", b"x\n", name))
    assert rows(sql_dsn)[0][:2] == (uid, "")
    assert wait(provider.folders("alice")) == []
    drop = wait(provider.open("alice", name))
    assert [info.uid for info in drop.messages] == [uid]
    assert isinstance(failure_of(provider.open("alice")), MaildropInUse)
    wait(drop.release())


# Sessions


def test_snapshot_and_commit(provider: SQLProvider, sql_dsn: str) -> None:
    uids = [wait(provider.deliver("alice", b"n: %d\n" % n)) for n in range(4)]
    drop = wait(provider.open("alice"))
    late = wait(provider.deliver("alice", b"late\n"))
    assert [info.uid for info in drop.messages] == uids
    assert [info.size for info in drop.messages] == [len(b"n: 0\r\n")] * 4
    before = time.time()
    wait(drop.commit([0, 2], [1, 2]))
    after = time.time()
    drop = wait(provider.open("alice"))
    assert [info.uid for info in drop.messages] == [uids[1], uids[3], late]
    first = drop.messages[0].retrieved_at
    assert before - 2 <= first <= after + 2
    assert drop.messages[1].retrieved_at is None
    wait(drop.release())


def test_commit_in_batches(
    provider: SQLProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queries, "ID_BATCH", 3)
    uids = [wait(provider.deliver("alice", b"%d\n" % n)) for n in range(10)]
    drop = wait(provider.open("alice"))
    wait(drop.commit(range(7), [7, 8, 9]))
    drop = wait(provider.open("alice"))
    assert [info.uid for info in drop.messages] == uids[7:]
    assert all(info.retrieved_at is not None for info in drop.messages)
    wait(drop.release())


def test_commit_and_read_tolerate_vanished_rows(
    provider: SQLProvider, sql_dsn: str
) -> None:
    uids = [wait(provider.deliver("alice", b"%d\n" % n)) for n in range(3)]
    drop = wait(provider.open("alice"))
    query(sql_dsn, "DELETE FROM popd_messages WHERE uid = ?", uids[1])
    assert isinstance(failure_of(drop.read(1)), MaildropError)
    wait(drop.commit([1, 2], [0, 1]))
    drop = wait(provider.open("alice"))
    assert [info.uid for info in drop.messages] == [uids[0]]
    wait(drop.release())


def test_closed_maildrop(provider: SQLProvider) -> None:
    wait(provider.deliver("alice", b"x\n"))
    drop = wait(provider.open("alice"))
    wait(drop.release())
    assert isinstance(failure_of(drop.read(0)), MaildropError)
    assert wait(drop.commit([0])) is None
    assert wait(drop.release()) is None
    with pytest.raises(IndexError):
        drop.read(1)
    drop = wait(provider.open("alice"))
    assert len(drop.messages) == 1, "a commit after release deleted something"
    with pytest.raises(IndexError):
        drop.commit([5])
    wait(drop.release())


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    content=st.binary(min_size=0, max_size=3000),
    chunk=st.integers(min_value=1, max_value=700),
    limit=st.integers(min_value=0, max_value=2000),
)
def test_read_in_slices(
    provider: SQLProvider,
    monkeypatch: pytest.MonkeyPatch,
    content: bytes,
    chunk: int,
    limit: int,
) -> None:
    monkeypatch.setattr(queries, "CHUNK_SIZE", chunk)
    monkeypatch.setattr(queries, "MEMORY_LIMIT", limit)
    uid = wait(provider.deliver("hypothesis", content))
    drop = wait(provider.open("hypothesis"))
    try:
        index = [info.uid for info in drop.messages].index(uid)
        message = wait(drop.read(index))
        assert isinstance(message, io.BytesIO) == (len(content) <= limit)
        try:
            assert message.read() == content
        finally:
            message.close()
        assert drop.messages[index].size == wire_size(content)
    finally:
        wait(drop.commit([index]))


def test_large_message_goes_to_a_file(provider: SQLProvider) -> None:
    data = bytes(range(256)) * (5 * 1024 * 1024 // 256 + 7)
    wait(provider.deliver("alice", io.BytesIO(data)))
    drop = wait(provider.open("alice"))
    message = wait(drop.read(0))
    try:
        assert not isinstance(message, io.BytesIO)
        assert message.fileno() >= 0
        assert message.read() == data
    finally:
        message.close()
        wait(drop.release())


# Locking


def test_in_use_in_this_process(provider: SQLProvider) -> None:
    drop = wait(provider.open("alice"))
    error = failure_of(provider.open("alice"))
    assert isinstance(error, MaildropInUse) and "'alice'" in str(error)
    wait(drop.release())
    wait(wait(provider.open("alice")).release())


def test_abandoned_maildrop_is_released(provider: SQLProvider) -> None:
    drop = wait(provider.open("alice"))
    assert isinstance(failure_of(provider.open("alice")), MaildropInUse)
    del drop
    gc.collect()

    def reopen() -> Any:
        return wait(provider.open("alice"))

    wait(eventually(reopen).release())


def test_in_use_per_maildrop(provider: SQLProvider) -> None:
    wait(provider.deliver("alice", b"x\n", "Sent"))
    drop = wait(provider.open("alice"))
    try:
        assert isinstance(failure_of(provider.open("alice")), MaildropInUse)
        sent = wait(provider.open("alice", "Sent"))
        error = failure_of(provider.open("alice", "Sent"))
        assert isinstance(error, MaildropInUse) and "'Sent'" in str(error)
        wait(sent.release())
        wait(wait(provider.open("bob")).release())
    finally:
        wait(drop.release())
    wait(wait(provider.open("alice")).commit([]))
    wait(wait(provider.open("alice")).release())


def test_two_providers_exclude_each_other(sql_dsn: str) -> None:
    """
    Two providers (as two processes would have) over one database.
    """
    first, second = SQLProvider.from_dsn(sql_dsn), SQLProvider.from_dsn(sql_dsn)
    try:
        drop = wait(first.open("alice"))
        assert isinstance(failure_of(second.open("alice")), MaildropInUse)
        wait(drop.release())
        drop = wait(second.open("alice"))
        assert isinstance(failure_of(first.open("alice")), MaildropInUse)
        wait(drop.release())
    finally:
        wait(first.close())
        wait(second.close())


def test_in_use_across_processes_and_crash(provider: SQLProvider, sql_dsn: str) -> None:
    """
    A real second process holds the maildrop; once it is SIGKILLed (no
    clean-up at all) the lock is gone.
    """
    wait(provider.deliver("alice", b"x\n"))
    with Holder(sql_dsn) as holder:
        assert holder.first_line() == "LOCKED"
        error = failure_of(provider.open("alice"))
        assert isinstance(error, MaildropInUse)
        # Delivery goes on, and another maildrop is free.
        wait(provider.deliver("alice", b"y\n"))
        wait(wait(provider.open("bob")).release())
        holder.kill()

    def reopen() -> Any:
        return wait(provider.open("alice"))

    # The server may take a moment to notice the dead connection.
    drop = eventually(reopen, timeout=10)
    assert len(drop.messages) == 2
    # And the other way round: the other process is refused.
    try:
        with Holder(sql_dsn) as holder:
            assert holder.first_line().startswith("IN-USE")
    finally:
        wait(drop.release())


def test_close_releases_and_refuses(sql_dsn: str) -> None:
    provider = SQLProvider.from_dsn(sql_dsn)
    wait(provider.deliver("alice", b"x\n"))
    pending = provider.deliver("alice", b"y\n")
    closing = provider.close()
    assert wait(pending)
    wait(closing)
    for call in (
        lambda: provider.open("alice"),
        lambda: provider.deliver("alice", b"x\n"),
        lambda: provider.folders("alice"),
    ):
        assert isinstance(failure_of(call()), MaildropUnavailable)
    assert wait(provider.close()) is None
    other = SQLProvider.from_dsn(sql_dsn)
    try:
        drop = wait(other.open("alice"))
        assert len(drop.messages) == 2
        wait(drop.release())
    finally:
        wait(other.close())


def test_sqlite_lock_files_are_hashed(sqlite_dsn: str) -> None:
    """
    Lock files are named by a hash: no user or folder name reaches a path,
    and an unknown folder makes no lock file.
    """
    provider = SQLProvider.from_dsn(sqlite_dsn)
    try:
        assert isinstance(failure_of(provider.open("e@x", "Nope")), NoSuchFolder)
        wait(provider.deliver("..e@x", b"x\n", "Sent"))
        wait(wait(provider.open("..e@x", "Sent")).release())
        directory = parse_dsn(sqlite_dsn).path + ".locks"
        names = os.listdir(directory)
        assert len(names) == 1 and len(names[0]) == 45 and names[0].endswith(".lock")
    finally:
        wait(provider.close())


# PostgreSQL only


@pytest.fixture
def pg_provider(postgresql_dsn: str) -> Iterator[SQLProvider]:
    from popd.maildrops.sql import upgrade

    upgrade(postgresql_dsn)
    provider = SQLProvider.from_dsn(postgresql_dsn)
    yield provider
    wait(provider.close())


def advisory_locks(sql_dsn: str) -> list[tuple[int, int, int]]:
    return query(
        sql_dsn,
        "SELECT classid::bigint, objid::bigint, pid FROM pg_locks"
        " WHERE locktype = 'advisory' AND objsubid = 1 AND granted"
        " AND database = (SELECT oid FROM pg_database"
        " WHERE datname = current_database())",
    )


def test_advisory_lock_is_visible_and_released(
    pg_provider: SQLProvider, postgresql_dsn: str
) -> None:
    tag = sql_locks.lock_tag(sql_locks.advisory_key("alice", ""))
    drop = wait(pg_provider.open("alice"))
    held = advisory_locks(postgresql_dsn)
    assert [row[:2] for row in held] == [tag]
    assert held[0][2] == drop._lock.pid
    wait(drop.release())
    assert advisory_locks(postgresql_dsn) == []


def test_one_lock_connection_for_many_sessions(
    pg_provider: SQLProvider, postgresql_dsn: str
) -> None:
    users = [f"user{n}" for n in range(20)]
    drops = [wait(pg_provider.open(user)) for user in users]
    try:
        held = advisory_locks(postgresql_dsn)
        assert len(held) == len(users)
        assert len({pid for _, _, pid in held}) == 1
    finally:
        for drop in drops:
            wait(drop.release())


def test_commit_refused_when_the_lock_was_lost(
    pg_provider: SQLProvider, postgresql_dsn: str
) -> None:
    uid = wait(pg_provider.deliver("alice", b"x\n"))
    drop = wait(pg_provider.open("alice"))
    # The lock connection dies (server restart, network trouble, an admin).
    query(postgresql_dsn, "SELECT pg_terminate_backend(?)", drop._lock.pid)
    eventually(lambda: _assert_no_locks(postgresql_dsn))
    error = failure_of(drop.commit([0]))
    assert isinstance(error, MaildropUnavailable)
    assert "lost its lock" in str(error) and "nothing was changed" in str(error)

    # Nothing was deleted, and the store recovers with a new lock connection.
    def reopen() -> Any:
        return wait(pg_provider.open("alice"))

    drop = eventually(reopen)
    assert [info.uid for info in drop.messages] == [uid]
    assert isinstance(failure_of(pg_provider.open("alice")), MaildropInUse)
    wait(drop.commit([0]))
    drop = wait(pg_provider.open("alice"))
    assert drop.messages == ()
    wait(drop.release())


def _assert_no_locks(sql_dsn: str) -> None:
    assert advisory_locks(sql_dsn) == []


def test_pool_connection_loss_is_survived(
    pg_provider: SQLProvider, postgresql_dsn: str
) -> None:
    uid = wait(pg_provider.deliver("alice", b"x\n"))
    query(
        postgresql_dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'popd' AND pid <> pg_backend_pid()",
    )

    def reopen() -> Any:
        return wait(pg_provider.open("alice"))

    drop = eventually(reopen)
    assert [info.uid for info in drop.messages] == [uid]
    wait(drop.release())


def test_delivery_is_durable_on_postgresql(
    pg_provider: SQLProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements = []
    begin = queries._begin

    def recording(cursor: Any, statement: str | None) -> None:
        statements.append(statement)
        begin(cursor, statement)

    monkeypatch.setattr(queries, "_begin", recording)
    wait(pg_provider.deliver("alice", b"x\n"))
    assert "SET LOCAL synchronous_commit TO on" in statements
