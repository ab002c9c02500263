"""
The SQL store's statements: the blocking DB-API side, run in the pool's
threads (never on the reactor's) by L{popd.maildrops.sql.store}.

Each public function takes a cursor (an C{adbapi} transaction) and the
L{Target} first, as C{ConnectionPool.runInteraction} calls it, except
L{prepare_schema}, which takes a connection (C{runWithConnection}).
User and folder names only ever travel as bound parameters.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from tempfile import TemporaryFile
from typing import Any, BinaryIO

from twisted.logger import Logger

from popd.interfaces import MaildropError, NoSuchFolder
from popd.maildrops.sql.dialects import Target
from popd.maildrops.sql.schema import (
    LATEST_VERSION,
    SchemaOutOfDate,
    apply_migrations,
    check_version,
    read_version,
)
from popd.stream import WireSizeCounter

#: How much of a message one query reads.
CHUNK_SIZE = 256 * 1024

#: The largest message a reader holds in memory; a larger one is copied to
#: an (unlinked) temporary file.
MEMORY_LIMIT = 1024 * 1024

#: How many ids one DELETE or UPDATE names at most.
ID_BATCH = 500

_log = Logger()


def prepare_schema(connection: Any, target: Target, auto_upgrade: bool) -> None:
    """
    Check that the schema is current; with C{auto_upgrade} (SQLite) bring
    it there.

    @raise SchemaOutOfDate: it is older, and may not be upgraded here.
    @raise SchemaError: it is newer than this popd.
    """
    cursor = connection.cursor()
    try:
        version = read_version(cursor, target)
    finally:
        cursor.close()
    check_version(version)
    if version == LATEST_VERSION:
        return
    if not auto_upgrade:
        raise SchemaOutOfDate(
            f"the database schema of {target.display} is at version {version},"
            f" popd needs version {LATEST_VERSION}: run `popd db upgrade`"
        )
    connection.commit()
    applied = apply_migrations(connection, target)
    _log.info(
        "Upgraded the database {where}: {applied}",
        where=target.display,
        applied=", ".join(applied) or "nothing to do",
    )


def _execute(cursor: Any, target: Target, statement: str, *params: Any) -> None:
    cursor.execute(target.sql(statement), params)


def _execute_binary(cursor: Any, target: Target, statement: str, *params: Any) -> None:
    """
    Execute a query whose results hold content: psycopg then receives bytea
    in binary rather than as hex text of twice the size.
    """
    if target.is_sqlite:
        cursor.execute(statement, params)
    else:
        cursor.execute(target.sql(statement), params, binary=True)


def _begin(cursor: Any, statement: str | None) -> None:
    if statement:
        cursor.execute(statement)


def check_folder(cursor: Any, target: Target, user: str, folder: str) -> None:
    _execute(
        cursor,
        target,
        "SELECT 1 FROM popd_folders WHERE user_name = ? AND folder = ?",
        user,
        folder,
    )
    if cursor.fetchone() is None:
        raise NoSuchFolder(f"{user!r} has no folder {folder!r}")


def snapshot(
    cursor: Any, target: Target, user: str, folder: str
) -> list[tuple[int, str, int, float | None]]:
    _execute(
        cursor,
        target,
        f"SELECT id, uid, wire_size, {target.epoch('retrieved_at')}"
        " FROM popd_messages WHERE user_name = ? AND folder = ? ORDER BY id",
        user,
        folder,
    )
    return [tuple(row) for row in cursor.fetchall()]


def list_folders(cursor: Any, target: Target, user: str) -> list[str]:
    _execute(
        cursor,
        target,
        "SELECT folder FROM popd_folders WHERE user_name = ? AND folder <> ''",
        user,
    )
    return sorted(row[0] for row in cursor.fetchall())


def deliver(
    cursor: Any,
    target: Target,
    user: str,
    folder: str,
    message: bytes | BinaryIO,
    uid: str,
) -> str:
    # Read the message before the transaction: a slow source must not hold
    # SQLite's write lock.
    content, wire = _content(message)
    _begin(cursor, target.begin_write)
    _begin(cursor, target.durable)
    if folder:
        _execute(
            cursor,
            target,
            "INSERT INTO popd_folders (user_name, folder, created_at)"
            f" VALUES (?, ?, {target.now}) ON CONFLICT (user_name, folder) DO NOTHING",
            user,
            folder,
        )
    try:
        _execute(
            cursor,
            target,
            "INSERT INTO popd_messages (user_name, folder, uid, stored_size,"
            " wire_size, delivered_at, content)"
            f" VALUES (?, ?, ?, ?, ?, {target.now}, ?)",
            user,
            folder,
            uid,
            len(content),
            wire,
            content,
        )
    except target.dbapi().IntegrityError:
        raise ValueError(
            f"the maildrop already has a message with UID {uid!r}"
        ) from None
    return uid


def _content(message: bytes | BinaryIO) -> tuple[bytes, int]:
    """
    The whole message and its CRLF size.
    """
    counter = WireSizeCounter()
    if isinstance(message, bytes | bytearray | memoryview):
        content = bytes(message)
        counter.feed(content)
        return content, counter.size
    chunks = []
    while True:
        chunk = message.read(CHUNK_SIZE)
        if not chunk:
            break
        counter.feed(chunk)
        chunks.append(chunk)
    return b"".join(chunks), counter.size


def read(cursor: Any, target: Target, message_id: int, uid: str) -> BinaryIO:
    _begin(cursor, target.begin_read)
    slices = _slices(cursor, target, message_id, uid)
    total, first = next(slices)
    copy: BinaryIO = io.BytesIO() if total <= MEMORY_LIMIT else TemporaryFile()
    try:
        copy.write(first)
        for chunk in slices:
            copy.write(chunk)
        copy.seek(0)
    except BaseException:
        copy.close()
        raise
    return copy


def _slices(cursor: Any, target: Target, message_id: int, uid: str) -> Iterator[Any]:
    """
    Yield the length of a message's content and its first slice, then its
    further slices, one query each.

    @raise MaildropError: the message is gone.
    """
    gone = MaildropError(f"message {uid} was removed by another program")
    _execute_binary(
        cursor,
        target,
        "SELECT length(content), substr(content, 1, CAST(? AS INTEGER))"
        " FROM popd_messages WHERE id = ?",
        CHUNK_SIZE,
        message_id,
    )
    row = cursor.fetchone()
    if row is None:
        raise gone
    total, first = int(row[0]), bytes(row[1] or b"")
    yield total, first
    offset = len(first)
    # One query per further slice: their number is known, so the loop is bound.
    for _ in range(-(-(total - offset) // CHUNK_SIZE)):
        _execute_binary(
            cursor,
            target,
            "SELECT substr(content, CAST(? AS INTEGER), CAST(? AS INTEGER))"
            " FROM popd_messages WHERE id = ?",
            offset + 1,
            CHUNK_SIZE,
            message_id,
        )
        row = cursor.fetchone()
        if row is None or not row[0]:
            raise gone
        chunk = bytes(row[0])
        yield chunk
        offset += len(chunk)
        if offset >= total:
            break


def commit(
    cursor: Any,
    target: Target,
    user: str,
    folder: str,
    check_lock: Callable[[Any], None],
    doomed: list[int],
    seen: list[int],
) -> None:
    _begin(cursor, target.begin_write)
    _begin(cursor, target.durable)
    check_lock(cursor)
    for batch in _batches(doomed):
        _execute(
            cursor,
            target,
            "DELETE FROM popd_messages WHERE user_name = ? AND folder = ?"
            f" AND id IN ({', '.join('?' * len(batch))})",
            user,
            folder,
            *batch,
        )
    for batch in _batches(seen):
        _execute(
            cursor,
            target,
            f"UPDATE popd_messages SET retrieved_at = {target.now}"
            " WHERE user_name = ? AND folder = ? AND retrieved_at IS NULL"
            f" AND id IN ({', '.join('?' * len(batch))})",
            user,
            folder,
            *batch,
        )


def _batches(ids: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(ids), ID_BATCH):
        yield ids[start : start + ID_BATCH]
