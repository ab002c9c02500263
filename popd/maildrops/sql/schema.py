"""
The SQL store's schema and its versioned migrations.

The table C{popd_schema(version, name, applied_at)} has one row per applied
migration; the database's version is the highest C{version} there (0 when the
table is missing).  L{upgrade} applies the missing migrations in order, each
in a transaction of its own (PostgreSQL and SQLite both have transactional
DDL) and under a lock, so two upgrades at once apply each migration once.

Version 1 ("messages and folders"):

  - C{popd_messages}: one row per message.  C{id} (autoincrement / identity)
    gives the message order; C{user_name} and C{folder} (C{''} for INBOX)
    name the maildrop; C{uid} (unique per maildrop) is the UIDL;
    C{stored_size} the octets stored, C{wire_size} the octets with CRLF line
    endings (what STAT and LIST report, computed at delivery);
    C{delivered_at} and C{retrieved_at} (NULL until a session retrieved it);
    C{content} the message as delivered.  An index on C{(user_name, folder,
    id)} that also holds C{uid}, C{wire_size} and C{retrieved_at} serves the
    snapshot at open without touching the content.  On PostgreSQL the
    content is stored uncompressed out of line (C{STORAGE EXTERNAL}), so a
    large message is read in slices at the cost of each slice only.
  - C{popd_folders}: the folders (other than INBOX) a user has, created by
    the first delivery into them.

Timestamps are C{TIMESTAMPTZ} on PostgreSQL and POSIX seconds (C{REAL}) on
SQLite; the store reads both as POSIX seconds.

L{upgrade} and L{current_version} are plain blocking DB-API code for the
C{popd db upgrade} admin command; the store runs L{read_version} and
L{apply_migrations} in its connection pool.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from popd.interfaces import MaildropUnavailable
from popd.maildrops.sql.dialects import Target, parse_dsn

#: The constant of the transaction-level advisory lock that serialises
#: upgrades on PostgreSQL ("popd" "up" in ASCII).
_UPGRADE_LOCK = 0x706F_7064_7570


class SchemaOutOfDate(MaildropUnavailable):
    """
    The database schema is older than this popd needs; an administrator
    must run C{popd db upgrade}.
    """


class SchemaError(Exception):
    """
    The database's schema cannot be used or upgraded by this popd.
    """


@dataclass(frozen=True)
class Migration:
    """
    One step of the schema: the statements for each dialect.
    """

    version: int
    name: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...]

    def statements(self, target: Target) -> tuple[str, ...]:
        return self.sqlite if target.is_sqlite else self.postgresql


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        name="messages and folders",
        sqlite=(
            """
            CREATE TABLE popd_folders (
                user_name TEXT NOT NULL,
                folder TEXT NOT NULL,
                created_at REAL NOT NULL,
                PRIMARY KEY (user_name, folder)
            )
            """,
            # AUTOINCREMENT: an id is never handed out twice, even after the
            # newest message is deleted, so the order stays delivery order.
            """
            CREATE TABLE popd_messages (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                user_name TEXT NOT NULL,
                folder TEXT NOT NULL DEFAULT '',
                uid TEXT NOT NULL,
                stored_size INTEGER NOT NULL,
                wire_size INTEGER NOT NULL,
                delivered_at REAL NOT NULL,
                retrieved_at REAL,
                content BLOB NOT NULL,
                UNIQUE (user_name, folder, uid)
            )
            """,
            """
            CREATE INDEX popd_messages_by_maildrop ON popd_messages
                (user_name, folder, id, uid, wire_size, retrieved_at)
            """,
        ),
        postgresql=(
            """
            CREATE TABLE popd_folders (
                user_name TEXT NOT NULL,
                folder TEXT NOT NULL,
                created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (user_name, folder)
            )
            """,
            """
            CREATE TABLE popd_messages (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                user_name TEXT NOT NULL,
                folder TEXT NOT NULL DEFAULT '',
                uid TEXT NOT NULL,
                stored_size BIGINT NOT NULL,
                wire_size BIGINT NOT NULL,
                delivered_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                retrieved_at TIMESTAMPTZ,
                content BYTEA NOT NULL,
                CONSTRAINT popd_messages_uid_key UNIQUE (user_name, folder, uid)
            )
            """,
            "ALTER TABLE popd_messages ALTER COLUMN content SET STORAGE EXTERNAL",
            """
            CREATE INDEX popd_messages_by_maildrop ON popd_messages
                (user_name, folder, id) INCLUDE (uid, wire_size, retrieved_at)
            """,
        ),
    ),
)

#: The schema version this popd works with.
LATEST_VERSION = MIGRATIONS[-1].version

_CREATE_SCHEMA_TABLE = {
    "sqlite": """
        CREATE TABLE IF NOT EXISTS popd_schema (
            version INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at REAL NOT NULL
        )
    """,
    "postgresql": """
        CREATE TABLE IF NOT EXISTS popd_schema (
            version INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )
    """,
}


def upgrade(dsn: str) -> list[str]:
    """
    Bring the database of C{dsn} to L{LATEST_VERSION}.  Blocking.

    @return: the names of the migrations applied, in order (none if it was
        up to date).
    @raise SchemaError: the database is newer than this popd.
    @raise Exception: the DB-API module's errors (cannot connect, ...).
    """
    target = parse_dsn(dsn)
    with contextlib.closing(target.connect()) as connection:
        return apply_migrations(connection, target)


def current_version(dsn: str) -> int:
    """
    The schema version of the database of C{dsn}: 0 if popd never upgraded
    it (a missing SQLite file is not created).  Blocking.
    """
    target = parse_dsn(dsn)
    if target.is_sqlite and not os.path.exists(target.path):
        return 0
    with contextlib.closing(target.connect()) as connection:
        cursor = connection.cursor()
        try:
            return read_version(cursor, target)
        finally:
            cursor.close()
            connection.rollback()


def read_version(cursor: Any, target: Target) -> int:
    """
    The schema version, read with C{cursor}.
    """
    if target.is_sqlite:
        cursor.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'popd_schema'"
        )
    else:
        cursor.execute("SELECT to_regclass('popd_schema') IS NOT NULL")
    row = cursor.fetchone()
    if not row or not row[0]:
        return 0
    cursor.execute("SELECT MAX(version) FROM popd_schema")
    row = cursor.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def check_version(version: int) -> None:
    """
    @raise SchemaError: C{version} is newer than this popd knows.
    """
    if version > LATEST_VERSION:
        raise SchemaError(
            f"the database schema is at version {version}, newer than this"
            f" popd knows ({LATEST_VERSION}): upgrade popd"
        )


def apply_migrations(
    connection: Any,
    target: Target,
    migrations: tuple[Migration, ...] = MIGRATIONS,
) -> list[str]:
    """
    Apply the missing C{migrations}, each in its own transaction, through a
    DB-API C{connection} (or an C{adbapi} connection wrapper).

    @return: the names of the migrations applied.
    """
    applied = []
    for migration in migrations:
        if _apply_one(connection, target, migration):
            applied.append(migration.name)
    return applied


def _apply_one(connection: Any, target: Target, migration: Migration) -> bool:
    """
    Apply C{migration} unless the database already has it.

    @return: whether it was applied.
    """
    return _in_transaction(connection, target, _apply_locked, target, migration)


def _apply_locked(cursor: Any, target: Target, migration: Migration) -> bool:
    cursor.execute(_CREATE_SCHEMA_TABLE[target.dialect])
    version = read_version(cursor, target)
    check_version(version)
    if version >= migration.version:
        return False
    if version != migration.version - 1:
        raise SchemaError(
            f"the database schema is at version {version}; migration"
            f" {migration.version} cannot follow it"
        )
    for statement in migration.statements(target):
        cursor.execute(statement)
    cursor.execute(
        target.sql(
            "INSERT INTO popd_schema (version, name, applied_at)"
            f" VALUES (?, ?, {target.now})"
        ),
        (migration.version, migration.name),
    )
    return True


def _in_transaction(
    connection: Any, target: Target, function: Callable[..., Any], *args: Any
) -> Any:
    """
    Run C{function(cursor, *args)} in one transaction, holding the upgrade
    lock: SQLite's write lock (C{BEGIN IMMEDIATE}), or a PostgreSQL advisory
    lock released at the end of the transaction.
    """
    cursor = connection.cursor()
    try:
        if target.is_sqlite:
            cursor.execute("BEGIN IMMEDIATE")
        else:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_UPGRADE_LOCK,))
        result = function(cursor, *args)
        connection.commit()
        return result
    except BaseException:
        with contextlib.suppress(Exception):
            connection.rollback()
        raise
    finally:
        with contextlib.suppress(Exception):
            cursor.close()
