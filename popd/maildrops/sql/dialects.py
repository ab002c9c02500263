"""
Where the SQL store's database is and how to speak to it: a DSN becomes a
L{Target} (the DB-API module, how to connect, the dialect's few differences).

Supported DSNs:

  - C{sqlite:///absolute/path.db} (also C{sqlite:/absolute/path.db}; a
    relative C{sqlite:name.db} is taken from the current directory, so a
    caller with a data directory resolves it first).  The file is created
    with mode 0600.
  - C{postgresql://user@host:port/dbname} or C{postgres://...}, or a libpq
    keyword string such as C{host=/run/postgresql dbname=mail}; handed to
    psycopg 3 as they are.

All SQL is written with C{?} placeholders, which L{Target.sql} turns into
psycopg's C{%s}; no statement contains a literal C{?} or C{%}.  Values (user
and folder names above all) only ever travel as bound parameters.
"""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

#: Seconds a SQLite connection waits for another writer before giving up.
SQLITE_BUSY_TIMEOUT = 10.0

#: Seconds psycopg waits for a connection unless the DSN says otherwise.
POSTGRESQL_CONNECT_TIMEOUT = 10

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


class UnsupportedDSN(ValueError):
    """
    A DSN names no database popd can use.
    """


@dataclass(frozen=True)
class Target:
    """
    One database and how to reach it.

    @ivar dialect: C{"sqlite"} or C{"postgresql"}.
    @ivar module: the DB-API module's import name.
    @ivar args: positional arguments of the module's C{connect}.
    @ivar kwargs: its keyword arguments.
    @ivar path: the SQLite database file (C{None} for PostgreSQL).
    @ivar display: the DSN without any password, for messages.
    """

    dialect: str
    module: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    path: str | None = None
    display: str = ""

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def dbapi(self) -> Any:
        """
        The DB-API module (psycopg is only imported when used).
        """
        if self.is_sqlite:
            return sqlite3
        import psycopg

        return psycopg

    def sql(self, statement: str) -> str:
        """
        C{statement} with this module's placeholders.
        """
        if self.is_sqlite:
            return statement
        return statement.replace("?", "%s")

    def connect(self) -> Any:
        """
        A new DB-API connection, set up the way the store needs it (see
        L{prepare_connection}).  Blocking.
        """
        self.create_file()
        connection = self.dbapi().connect(*self.args, **self.kwargs)
        try:
            prepare_connection(self, connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def create_file(self) -> None:
        """
        Create a missing SQLite database file (and its directory) with mode
        0600 (0700), so the mail in it is not readable by others whatever
        the umask; SQLite gives its journal files the database's mode.
        """
        if self.is_sqlite:
            _create_private_file(self.path)

    # What differs between the dialects, as SQL fragments.

    @property
    def now(self) -> str:
        """
        The database's clock, in the type of the timestamp columns.
        """
        if self.is_sqlite:
            return "((julianday('now') - 2440587.5) * 86400.0)"
        return "now()"

    def epoch(self, column: str) -> str:
        """
        A timestamp column as POSIX seconds (a float, or NULL).
        """
        if self.is_sqlite:
            return column
        return f"CAST(EXTRACT(EPOCH FROM {column}) AS DOUBLE PRECISION)"

    @property
    def begin_write(self) -> str | None:
        """
        What starts a transaction that will write; C{None}: it starts by
        itself.  SQLite takes the write lock at once, so waiting for another
        writer honours the busy timeout instead of failing midway.
        """
        return "BEGIN IMMEDIATE" if self.is_sqlite else None

    @property
    def begin_read(self) -> str | None:
        """
        What starts a transaction that reads several times consistently.
        """
        return "BEGIN" if self.is_sqlite else None

    @property
    def durable(self) -> str | None:
        """
        What makes this transaction's commit wait for stable storage even if
        the server's default says otherwise.
        """
        return None if self.is_sqlite else "SET LOCAL synchronous_commit TO on"


def parse_dsn(dsn: str) -> Target:
    """
    Turn a DSN into a L{Target}.

    @raise UnsupportedDSN: it is neither an SQLite nor a PostgreSQL DSN, or
        it names SQLite's in-memory database (each pooled connection would
        see a database of its own).
    """
    if not isinstance(dsn, str) or not dsn.strip():
        raise UnsupportedDSN("the database DSN is empty")
    dsn = dsn.strip()
    lowered = dsn.lower()
    if lowered.startswith("sqlite:"):
        return _sqlite_target(dsn)
    if lowered.startswith(("postgresql://", "postgres://")):
        return _postgresql_target(dsn, _redacted_url(dsn))
    if not _SCHEME.match(dsn) and "=" in dsn:
        return _postgresql_target(dsn, _redacted_keywords(dsn))
    scheme = dsn.split(":", 1)[0] if ":" in dsn else dsn
    raise UnsupportedDSN(
        f"unsupported database DSN {scheme!r}: use sqlite:///path/to/file.db"
        " or postgresql://user@host/dbname"
    )


def _sqlite_target(dsn: str) -> Target:
    rest = dsn[len("sqlite:") :]
    if rest.startswith("//"):
        netloc, _, path = rest[2:].partition("/")
        if netloc and netloc != "localhost":
            raise UnsupportedDSN(f"an SQLite DSN names no host: {dsn!r}")
        path = "/" + path
    else:
        path = rest
    if "?" in path or "#" in path:
        raise UnsupportedDSN(f"an SQLite DSN takes no parameters: {dsn!r}")
    if not path or path in ("/", ":memory:") or path.endswith("/"):
        raise UnsupportedDSN(f"an SQLite DSN needs a file name: {dsn!r}")
    path = os.path.abspath(path)
    return Target(
        dialect="sqlite",
        module="sqlite3",
        args=(path,),
        kwargs={
            "timeout": SQLITE_BUSY_TIMEOUT,
            # Transactions are begun explicitly (see Target.begin_write).
            "isolation_level": None,
            # adbapi closes its connections from the reactor thread.
            "check_same_thread": False,
        },
        path=path,
        display=f"sqlite:///{path.lstrip('/')}",
    )


def _postgresql_target(dsn: str, display: str) -> Target:
    kwargs: dict[str, Any] = {}
    lowered = dsn.lower()
    if "connect_timeout" not in lowered:
        kwargs["connect_timeout"] = POSTGRESQL_CONNECT_TIMEOUT
    if "application_name" not in lowered:
        kwargs["application_name"] = "popd"
    return Target(
        dialect="postgresql",
        module="psycopg",
        args=(dsn,),
        kwargs=kwargs,
        display=display,
    )


def _redacted_url(dsn: str) -> str:
    try:
        parts = urlsplit(dsn)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}@{hostport}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return dsn.split("://", 1)[0] + "://..."


def _redacted_keywords(dsn: str) -> str:
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)


def prepare_connection(target: Target, connection: Any) -> None:
    """
    Set up a new connection: for SQLite, write-ahead logging (readers never
    wait for the writer) with a full sync at each commit, which is what makes
    a delivery durable once acknowledged.
    """
    if target.is_sqlite:
        cursor = connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.fetchall()
            cursor.execute("PRAGMA synchronous = FULL")
        finally:
            cursor.close()


def _create_private_file(path: str | None) -> None:
    if path is None or os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)
