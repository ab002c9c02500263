"""
Tests for popd.auth.sqlusers: users in SQLite and PostgreSQL tables, for
real (through adbapi and the reactor's thread pool), and the C{sql:}
argument string and configuration keys.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from popd.auth import schemes
from popd.auth.credentials import APOPCredentials
from popd.auth.errors import AuthUnavailable
from popd.auth.sqlusers import (
    DEFAULT_QUERY,
    SQLUsersChecker,
    _paramstyle_query,
    check_query,
    split_argument,
)
from popd.testing import wait_for

pytest_plugins = ["sqlsupport"]
pytestmark = pytest.mark.usefixtures("sql_reactor_threadpool")

# Cheap but real hashes.
ALICE = schemes.hash_password(b"secret", "SHA512-CRYPT", rounds=1000)
BOB = "{PLAIN}hunter2"

USERS = [
    ("alice", ALICE, "Alice"),
    ("bob", BOB, "bob"),
    ("carol", None, "carol"),
    ("dave@example.org", "{PLAIN}pw", "dave"),
    ("twin", "{PLAIN}pw", "twin1"),
    ("twin", "{PLAIN}pw", "twin2"),
]


def fill_sqlite(path: Path) -> str:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (username TEXT, password TEXT, mailbox TEXT)")
        db.executemany("INSERT INTO users VALUES (?, ?, ?)", USERS)
    return f"sqlite:///{path}"


def fill_postgresql(dsn: str) -> str:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute("CREATE TABLE users (username TEXT, password TEXT, mailbox TEXT)")
        with db.cursor() as cursor:
            cursor.executemany("INSERT INTO users VALUES (%s, %s, %s)", USERS)
    return dsn


@pytest.fixture(params=["sqlite", "postgresql"])
def users_dsn(request, tmp_path) -> str:
    if request.param == "sqlite":
        return fill_sqlite(tmp_path / "users.db")
    return fill_postgresql(request.getfixturevalue("postgresql_dsn"))


@pytest.fixture
def make_checker():
    made: list[SQLUsersChecker] = []

    def make(dsn: str, query: str = DEFAULT_QUERY) -> SQLUsersChecker:
        checker = SQLUsersChecker(dsn, query)
        checker.pool.start()
        made.append(checker)
        return checker

    yield make
    for checker in made:
        checker.close()


def wait(d):
    return wait_for(d, 30)


def failure_of(d) -> BaseException:
    try:
        result = wait(d)
    except Exception as error:
        return error
    pytest.fail(f"expected a failure, got {result!r}")


def login(checker, user: bytes, password: bytes):
    return checker.requestAvatarId(UsernamePassword(user, password))


def test_right_password(users_dsn, make_checker):
    checker = make_checker(users_dsn)
    assert wait(login(checker, b"alice", b"secret")) == "alice"
    assert wait(login(checker, b"bob", b"hunter2")) == "bob"


@pytest.mark.parametrize(
    "user, password",
    [
        (b"alice", b"wrong"),
        (b"mallory", b"secret"),
        (b"carol", b""),  # NULL password
        (b"twin", b"pw"),  # two rows: ambiguous
        (b"ALICE", b"secret"),  # the default query matches exactly
        (b"\xff", b"secret"),
        (b"al\x00ice", b"secret"),
        (b"", b"secret"),
    ],
)
def test_refusals(users_dsn, make_checker, user, password):
    checker = make_checker(users_dsn)
    assert isinstance(failure_of(login(checker, user, password)), UnauthorizedLogin)


def test_unknown_user_costs_a_dummy_verification_off_the_reactor_thread(
    users_dsn, make_checker, monkeypatch
):
    verified = []
    real = schemes.verify_password

    def spy(stored, password):
        verified.append((stored, threading.current_thread()))
        return real(stored, password)

    monkeypatch.setattr(schemes, "verify_password", spy)
    checker = make_checker(users_dsn)
    failure_of(login(checker, b"mallory", b"x"))
    failure_of(login(checker, b"carol", b"x"))
    failure_of(login(checker, b"alice", b"x"))
    dummy = schemes.dummy_hash()
    assert [stored for stored, _ in verified] == [dummy, dummy, ALICE]
    assert all(thread is not threading.main_thread() for _, thread in verified)


def test_query_with_avatar_column_and_parameters(users_dsn, make_checker):
    checker = make_checker(
        users_dsn,
        "SELECT password, mailbox FROM users "
        "WHERE username = :local || '@' || :domain OR username = lower(:user)",
    )
    assert wait(login(checker, b"ALICE", b"secret")) == "Alice"
    assert wait(login(checker, b"dave@example.org", b"pw")) == "dave"


def test_query_with_a_literal_percent(users_dsn, make_checker):
    checker = make_checker(
        users_dsn,
        "SELECT password FROM users WHERE username LIKE 'b%' AND :user = :user",
    )
    assert wait(login(checker, b"bob", b"hunter2")) == "bob"


def test_apop_for_plain_passwords(users_dsn, make_checker):
    import hashlib

    checker = make_checker(users_dsn)
    challenge = b"<1.2@pop.example>"
    digest = hashlib.md5(challenge + b"hunter2").hexdigest().encode()
    apop = APOPCredentials(b"bob", challenge, digest)
    assert wait(checker.requestAvatarId(apop)) == "bob"
    wrong = APOPCredentials(b"alice", challenge, digest)
    assert isinstance(failure_of(checker.requestAvatarId(wrong)), UnauthorizedLogin)


def test_missing_sqlite_database_is_unavailable_and_not_created(tmp_path, make_checker):
    path = tmp_path / "missing.db"
    checker = make_checker(f"sqlite:///{path}")
    error = failure_of(login(checker, b"alice", b"secret"))
    assert isinstance(error, AuthUnavailable)
    assert not path.exists()


def test_missing_table_is_unavailable(tmp_path, make_checker):
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    checker = make_checker(f"sqlite:///{path}")
    error = failure_of(login(checker, b"alice", b"secret"))
    assert isinstance(error, AuthUnavailable)
    assert "users" in str(error)


def test_unreachable_postgresql_is_unavailable(make_checker):
    checker = make_checker("postgresql://popd@127.0.0.1:1/none?connect_timeout=2")
    error = failure_of(login(checker, b"alice", b"secret"))
    assert isinstance(error, AuthUnavailable)


# The argument string, the query and the configuration


@pytest.mark.parametrize(
    "argument, expected",
    [
        ("sqlite:///var/lib/popd/users.db", ("sqlite:///var/lib/popd/users.db", "")),
        (
            "postgresql://popd@db/mail SELECT pw FROM u WHERE n = :user",
            ("postgresql://popd@db/mail", "SELECT pw FROM u WHERE n = :user"),
        ),
        (
            "host=/run/postgresql dbname=mail  select pw from u where n = :user",
            ("host=/run/postgresql dbname=mail", "select pw from u where n = :user"),
        ),
        ("SELECT 1 WHERE :user", ("", "SELECT 1 WHERE :user")),
        ("", ("", "")),
    ],
)
def test_split_argument(argument, expected):
    assert split_argument(argument) == expected


def test_queries_must_use_the_user_name():
    assert check_query(DEFAULT_QUERY) == DEFAULT_QUERY
    for bad in ("", "SELECT password FROM users", "SELECT x WHERE y = :username"):
        with pytest.raises(ValueError):
            check_query(bad)


def test_psycopg_parameters():
    assert _paramstyle_query(
        "SELECT p FROM u WHERE n = :user AND d LIKE '%x' AND c::text = :domain", False
    ) == (
        "SELECT p FROM u WHERE n = %(user)s AND d LIKE '%%x' AND c::text = %(domain)s"
    )
    assert _paramstyle_query(DEFAULT_QUERY, True) == DEFAULT_QUERY
