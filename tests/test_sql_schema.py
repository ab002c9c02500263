"""
Tests for L{popd.maildrops.sql.schema} (migrations) and
L{popd.maildrops.sql.dialects} (DSNs), and for how the store checks the
schema at first use.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

pytest.register_assert_rewrite("sqlsupport")

from sqlsupport import failure_of, query, wait  # noqa: E402

from popd.interfaces import MaildropError, MaildropUnavailable  # noqa: E402
from popd.maildrops.sql import (  # noqa: E402
    LATEST_VERSION,
    MIGRATIONS,
    SchemaError,
    SchemaOutOfDate,
    SQLProvider,
    UnsupportedDSN,
    current_version,
    parse_dsn,
    upgrade,
)

pytest_plugins = ["sqlsupport"]
pytestmark = pytest.mark.usefixtures("sql_reactor_threadpool")


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_dsn(request: pytest.FixtureRequest) -> str:
    """
    An empty database of each kind, not upgraded.
    """
    return request.getfixturevalue(f"{request.param}_dsn")


# DSNs


@pytest.mark.parametrize(
    ("dsn", "path"),
    [
        ("sqlite:///var/lib/popd/popd.db", "/var/lib/popd/popd.db"),
        ("sqlite:/var/lib/popd/popd.db", "/var/lib/popd/popd.db"),
        ("sqlite://localhost/var/lib/popd.db", "/var/lib/popd.db"),
        ("SQLite:///x/../y.db", "/y.db"),
        ("sqlite:relative.db", os.path.abspath("relative.db")),
    ],
)
def test_sqlite_dsns(dsn: str, path: str) -> None:
    target = parse_dsn(dsn)
    assert (target.dialect, target.module, target.path) == ("sqlite", "sqlite3", path)
    assert target.args == (path,)
    assert target.display == "sqlite:///" + path.lstrip("/")


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://popd@db.example.org:5432/mail",
        "postgres://popd@db.example.org/mail",
        "postgresql:///mail?host=/run/postgresql",
        "host=/run/postgresql dbname=mail user=popd",
        "dbname=mail",
    ],
)
def test_postgresql_dsns(dsn: str) -> None:
    target = parse_dsn(dsn)
    assert (target.dialect, target.module, target.path) == (
        "postgresql",
        "psycopg",
        None,
    )
    assert target.args == (dsn,)
    assert target.kwargs["connect_timeout"] > 0
    assert target.kwargs["application_name"] == "popd"


def test_postgresql_dsn_settings_win() -> None:
    target = parse_dsn("postgresql://h/db?connect_timeout=3&application_name=mail")
    assert target.kwargs == {}


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://popd:s3cret@db:5432/mail", "postgresql://popd@db:5432/mail"),
        ("host=db password=s3cret dbname=mail", "host=db password=*** dbname=mail"),
        ("host=db password='s3 cret' dbname=m", "host=db password=*** dbname=m"),
    ],
)
def test_password_never_shown(dsn: str, shown: str) -> None:
    assert parse_dsn(dsn).display == shown
    assert "s3" not in repr(SQLProvider.from_dsn(dsn))


@pytest.mark.parametrize(
    "dsn",
    [
        "",
        "   ",
        "mysql://root@localhost/mail",
        "sqlite::memory:",
        "sqlite://",
        "sqlite:///",
        "sqlite:///var/lib/",
        "sqlite://otherhost/var/popd.db",
        "sqlite:///var/popd.db?mode=ro",
        "/var/lib/popd.db",
    ],
)
def test_unsupported_dsns(dsn: str) -> None:
    with pytest.raises(UnsupportedDSN):
        parse_dsn(dsn)
    with pytest.raises(ValueError):
        SQLProvider.from_dsn(dsn)


def test_statements_use_bound_parameters() -> None:
    """
    The placeholder rewriting for psycopg only touches C{?}.
    """
    sqlite = parse_dsn("sqlite:///x.db")
    postgresql = parse_dsn("postgresql://h/db")
    statement = "SELECT a FROM t WHERE b = ? AND c = ?"
    assert sqlite.sql(statement) == statement
    assert postgresql.sql(statement) == "SELECT a FROM t WHERE b = %s AND c = %s"


# Migrations


def test_migrations_are_numbered_in_order() -> None:
    versions = [migration.version for migration in MIGRATIONS]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    assert LATEST_VERSION == versions[-1]
    for migration in MIGRATIONS:
        assert migration.sqlite and migration.postgresql and migration.name


def test_current_version_creates_no_sqlite_file(sqlite_dsn: str) -> None:
    assert current_version(sqlite_dsn) == 0
    assert not os.path.exists(parse_dsn(sqlite_dsn).path)


def test_upgrade_applies_all_then_none(empty_dsn: str) -> None:
    assert current_version(empty_dsn) == 0
    assert upgrade(empty_dsn) == [migration.name for migration in MIGRATIONS]
    assert current_version(empty_dsn) == LATEST_VERSION
    assert upgrade(empty_dsn) == []
    assert current_version(empty_dsn) == LATEST_VERSION
    rows = query(empty_dsn, "SELECT version, name FROM popd_schema ORDER BY version")
    assert rows == [(m.version, m.name) for m in MIGRATIONS]
    applied_at = query(empty_dsn, "SELECT applied_at FROM popd_schema")
    assert all(row[0] is not None for row in applied_at)


def test_schema_tables(empty_dsn: str) -> None:
    upgrade(empty_dsn)
    assert query(empty_dsn, "SELECT COUNT(*) FROM popd_messages") == [(0,)]
    assert query(empty_dsn, "SELECT COUNT(*) FROM popd_folders") == [(0,)]
    # UIDs are unique per user and folder only.
    now = parse_dsn(empty_dsn).now
    insert = (
        "INSERT INTO popd_messages (user_name, folder, uid, stored_size, wire_size,"
        f" delivered_at, content) VALUES (?, ?, ?, 1, 1, {now}, ?)"
    )
    query(empty_dsn, insert, "alice", "", "u1", b"x")
    query(empty_dsn, insert, "alice", "Sent", "u1", b"x")
    query(empty_dsn, insert, "bob", "", "u1", b"x")
    with pytest.raises(parse_dsn(empty_dsn).dbapi().IntegrityError):
        query(empty_dsn, insert, "alice", "", "u1", b"y")


def test_concurrent_upgrades_apply_once(empty_dsn: str) -> None:
    results: list = []

    def run() -> None:
        try:
            results.append(upgrade(empty_dsn))
        except Exception as e:  # reported below
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4, results
    assert sorted(map(len, results)) == [0, 0, 0, len(MIGRATIONS)], results
    assert current_version(empty_dsn) == LATEST_VERSION


def test_newer_schema_refused(empty_dsn: str) -> None:
    upgrade(empty_dsn)
    target = parse_dsn(empty_dsn)
    query(
        empty_dsn,
        "INSERT INTO popd_schema (version, name, applied_at)"
        f" VALUES (?, ?, {target.now})",
        LATEST_VERSION + 1,
        "from the future",
    )
    with pytest.raises(SchemaError, match="newer than this popd"):
        upgrade(empty_dsn)
    provider = SQLProvider.from_dsn(empty_dsn)
    try:
        error = failure_of(provider.open("alice"))
        assert isinstance(error, MaildropError)
        assert not isinstance(error, MaildropUnavailable)
        assert "upgrade popd" in str(error)
    finally:
        wait(provider.close())


def test_sqlite_upgrades_itself(sqlite_dsn: str) -> None:
    provider = SQLProvider.from_dsn(sqlite_dsn)
    try:
        wait(provider.check())
        assert current_version(sqlite_dsn) == LATEST_VERSION
        uid = wait(provider.deliver("alice", b"hi\n"))
        drop = wait(provider.open("alice"))
        assert [info.uid for info in drop.messages] == [uid]
        wait(drop.release())
    finally:
        wait(provider.close())


def test_sqlite_files_are_private(sqlite_dsn: str) -> None:
    old = os.umask(0o022)
    try:
        upgrade(sqlite_dsn)
    finally:
        os.umask(old)
    path = Path(parse_dsn(sqlite_dsn).path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    provider = SQLProvider.from_dsn(sqlite_dsn)
    try:
        wait(wait(provider.open("alice")).release())
    finally:
        wait(provider.close())
    locks = Path(f"{path}.locks")
    assert stat.S_IMODE(locks.stat().st_mode) == 0o700
    for name in os.listdir(path.parent):
        if name.startswith(path.name) and name != locks.name:
            mode = stat.S_IMODE((path.parent / name).stat().st_mode)
            assert mode & 0o077 == 0, f"{name} is mode {mode:o}"


def test_postgresql_needs_an_upgrade(postgresql_dsn: str) -> None:
    provider = SQLProvider.from_dsn(postgresql_dsn)
    try:
        for call in (
            lambda: provider.open("alice"),
            lambda: provider.deliver("alice", b"x\n"),
            lambda: provider.folders("alice"),
            provider.check,
        ):
            error = failure_of(call())
            assert isinstance(error, SchemaOutOfDate)
            assert isinstance(error, MaildropUnavailable)
            assert "run `popd db upgrade`" in str(error)
            assert f"version 0, popd needs version {LATEST_VERSION}" in str(error)
        assert current_version(postgresql_dsn) == 0, "the store upgraded by itself"
        # Once an administrator upgrades, the running store works.
        upgrade(postgresql_dsn)
        uid = wait(provider.deliver("alice", b"x\n"))
        drop = wait(provider.open("alice"))
        assert [info.uid for info in drop.messages] == [uid]
        wait(drop.release())
    finally:
        wait(provider.close())


def test_postgresql_unreachable_is_unavailable() -> None:
    provider = SQLProvider.from_dsn(
        "postgresql://popd:secret@127.0.0.1:1/mail?connect_timeout=2"
    )
    try:
        error = failure_of(provider.open("alice"))
        assert isinstance(error, MaildropUnavailable)
        assert "secret" not in str(error)
        assert "127.0.0.1" in str(error)
    finally:
        wait(provider.close())


def test_sqlite_unwritable_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    provider = SQLProvider.from_dsn(f"sqlite:///{blocker}/popd.sqlite3")
    try:
        error = failure_of(provider.deliver("alice", b"x\n"))
        assert isinstance(error, MaildropUnavailable)
    finally:
        wait(provider.close())
