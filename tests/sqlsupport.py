"""
Shared fixtures and helpers for the SQL store's tests (a pytest plugin: test
modules load it with C{pytest_plugins = ["sqlsupport"]}; nothing here is
autouse, so other modules are not affected once it is loaded).

PostgreSQL: the server named by C{POPD_TEST_POSTGRESQL} (default
C{postgresql://postgres@127.0.0.1:5432/postgres}, trust authentication).
The first test that needs it creates a database C{popd_test_<random>} for
the whole run and drops it at the end; each test gets an empty schema of
its own in it (through C{search_path} in the DSN).  Without a reachable
server those tests skip, saying why.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from popd.testing import stop_reactor_threadpool, wait_for

REPO = Path(__file__).resolve().parents[1]

ADMIN_DSN = os.environ.get(
    "POPD_TEST_POSTGRESQL", "postgresql://postgres@127.0.0.1:5432/postgres"
)

#: Seconds any one Deferred may take in these tests.
TIMEOUT = 30.0


def _admin_connect(dsn: str = ADMIN_DSN) -> Any:
    import psycopg

    return psycopg.connect(dsn, autocommit=True, connect_timeout=3)


def _with_database(dsn: str, database: str) -> str:
    """
    C{dsn} (a URL) naming another database.
    """
    base, _, _ = dsn.partition("?")
    scheme, _, rest = base.partition("://")
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}/{database}"


_unreachable: list[str] = []


@pytest.fixture(scope="session")
def postgresql_database() -> Iterator[str]:
    """
    The DSN of a database of this test run's own, dropped at the end.
    """
    if _unreachable:
        pytest.skip(_unreachable[0])
    try:
        admin = _admin_connect()
    except Exception as e:  # any failure to connect means: no server here
        # Tried once per run: a host that swallows packets costs one timeout.
        _unreachable.append(f"PostgreSQL is not reachable at {ADMIN_DSN}: {e}")
        pytest.skip(_unreachable[0])
    name = f"popd_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(ADMIN_DSN, name)
    finally:
        with _admin_connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgresql_dsn(postgresql_database: str) -> Iterator[str]:
    """
    The DSN of an empty schema of this test's own (not upgraded).
    """
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with _admin_connect(postgresql_database) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    yield f"{postgresql_database}?options={quote(f'-csearch_path={schema}')}"
    with _admin_connect(postgresql_database) as admin:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def sqlite_dsn(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'popd.sqlite3'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_dsn(request: pytest.FixtureRequest) -> str:
    """
    An empty, upgraded database of each kind.
    """
    from popd.maildrops.sql import upgrade

    value = request.getfixturevalue(f"{request.param}_dsn")
    upgrade(value)
    return value


@pytest.fixture(scope="module")
def sql_reactor_threadpool() -> Iterator[None]:
    """
    Stop the global reactor's thread pool (which L{wait} starts) at the end
    of a module: its threads are not daemons.  Not autouse, since this
    plugin's fixtures are seen by every module once loaded; modules ask for
    it with C{pytestmark}.
    """
    yield
    stop_reactor_threadpool()


def wait(d: Any, timeout: float = TIMEOUT) -> Any:
    return wait_for(d, timeout)


def failure_of(d: Any, timeout: float = TIMEOUT) -> BaseException:
    """
    The exception C{d} failed with; fails the test if it succeeded.
    """
    try:
        result = wait(d, timeout)
    except Exception as e:
        return e
    pytest.fail(f"expected a failure, got {result!r}")


def connect(dsn: str) -> Any:
    """
    A plain DB-API connection to the store's database, for looking behind
    its back.
    """
    from popd.maildrops.sql import parse_dsn

    return parse_dsn(dsn).connect()


def query(dsn: str, statement: str, *params: Any) -> list[tuple]:
    """
    Run one statement (C{?} placeholders) in its own transaction.
    """
    from popd.maildrops.sql import parse_dsn

    target = parse_dsn(dsn)
    with contextlib.closing(target.connect()) as connection:
        cursor = connection.cursor()
        cursor.execute(target.sql(statement), params)
        rows = [tuple(row) for row in cursor.fetchall()] if cursor.description else []
        connection.commit()
        return rows


def holder_code(dsn: str, user: str = "alice", folder: str | None = None) -> str:
    """
    Python source for another process that opens a maildrop, says
    C{LOCKED} (or C{IN-USE ...}) and then holds it until killed, for at most
    a minute.
    """
    return textwrap.dedent(
        f"""
        import sys, time
        from popd.interfaces import MaildropInUse
        from popd.maildrops.sql import SQLProvider
        from popd.testing import wait_for

        provider = SQLProvider.from_dsn({dsn!r})
        try:
            drop = wait_for(provider.open({user!r}, {folder!r}), 30)
        except MaildropInUse as e:
            print("IN-USE", e, flush=True)
            sys.exit(0)
        print("LOCKED", flush=True)
        time.sleep(60)
        """
    )


class Holder:
    """
    Another process holding a maildrop (see L{holder_code}).
    """

    def __init__(self, dsn: str, user: str = "alice", folder: str | None = None):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.process = subprocess.Popen(
            [sys.executable, "-c", holder_code(dsn, user, folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )

    def first_line(self, timeout: float = TIMEOUT) -> str:
        import selectors

        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                self.kill()
                pytest.fail("the other process said nothing in time")
        line = self.process.stdout.readline().decode("utf-8", "replace").strip()
        if not line:
            _, err = self.process.communicate(timeout=timeout)
            pytest.fail("the other process failed:\n" + err.decode("utf-8", "replace"))
        return line

    def kill(self) -> None:
        """
        SIGKILL: no clean-up of any kind in the other process.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.communicate(timeout=TIMEOUT)

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.kill()


def eventually(
    attempt: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """
    Call C{attempt} until it returns without raising, for at most
    C{timeout} seconds; then let its last exception through.  In between,
    the reactor turns, so work queued for it (a release) gets done.
    """
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        try:
            return attempt()
        except Exception:
            if time.monotonic() >= deadline:
                raise
        wait(deferLater(reactor, interval, lambda: None))
    return attempt()
